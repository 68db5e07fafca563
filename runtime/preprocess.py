"""Control-image preprocessors: canny edges with OpenCV (`pip install "sdonnx[control]"`).

The runtime itself takes already-processed control images; this module is the one place that
makes them, and imports OpenCV only when called. Canny is what the ControlNet papers and
A1111's extension use for edge ControlNets: `cv2.Canny` on the 8-bit grayscale image, white edges
on black, as an RGB image. Model-based preprocessors (depth, pose) need their own network; sdonnx
runs none, so give it the depth map or pose drawing a preprocessor made.

    sdonnx preprocess canny photo.png edges.png --low 100 --high 200
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sdonnx.config import check_int
from sdonnx.errors import InputError, SdonnxError
from sdonnx.runtime.images import as_8bit, open_image

INSTALL_HINT = 'pip install "sdonnx[control]"'
CANNY_LOW, CANNY_HIGH = 100, 200  # A1111's and diffusers' examples


def canny(image: Image.Image | str | Path, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """Canny edges of `image` (any mode, or an image file): white edges on black, RGB, same size.

    low / high: the hysteresis thresholds on the gradient magnitude, 0..255, low <= high.
    """
    check_int("low", low, 0, 255)
    check_int("high", high, 0, 255)
    if low > high:
        raise InputError("low", low, f"at most high ({high})")
    try:
        import cv2
    except ImportError:
        raise SdonnxError(f"canny edges need OpenCV; install it with: {INSTALL_HINT}") from None
    gray = np.asarray(as_8bit(open_image(image, "image"), "L", "image"))
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
