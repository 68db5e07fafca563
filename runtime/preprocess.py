"""Control-image preprocessors: canny edges with OpenCV (`pip install "sdonnx[control]"`).

The runtime itself takes already-processed control images; this module is the one place that
makes them, and imports OpenCV only when called. Canny is what the ControlNet papers and
A1111's extension use for edge ControlNets: `cv2.Canny` on the 8-bit grayscale image, white edges
on black, as an RGB image. Model-based preprocessors (depth, normals, line art) need their network:
`onnx_map` runs an ONNX one the user supplies (MiDaS/DPT depth exports, say) on ONNX Runtime: the
picture resized to the model's input and normalized with its mean and std, the output map scaled to
0..255 (min to max, as A1111's depth preprocessors do) and resized back. sdonnx ships no such model.

    sdonnx preprocess canny photo.png edges.png --low 100 --high 200
    sdonnx preprocess onnx photo.png depth.png --model dpt_hybrid.onnx --size 384 --mean 0.5 --std 0.5
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
MAP_SIZE = 384  # MiDaS' and DPT's input side, for a model whose input size is dynamic
MAX_MAP_SIZE = 2048


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


def onnx_map(image: Image.Image | str | Path, model: str | Path, *, size: int | None = None,
             mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
             invert: bool = False) -> Image.Image:
    """A control map of `image` by a user's ONNX model (one image input [1, 3, H, W], one map output
    [1, H', W'], [1, 1, H', W'] or [1, 3, H', W']): RGB, the picture's size, 0..255 from the map's min to max.

    size: the side the picture is resized to, when the model's input is dynamic (default 384; a
    static input's own size wins). mean, std: the model's input normalization, per channel or one
    for all ((pixel / 255 - mean) / std). invert: black where the map is largest (some depth models
    give distance, ControlNets want nearness white).
    """
    import onnxruntime as ort

    picture = as_8bit(open_image(image, "image"), "RGB", "image")
    path = Path(model)
    if not path.is_file():
        raise InputError("model", str(model), "an ONNX file of the preprocessor")
    mean, std = _per_channel("mean", mean), _per_channel("std", std)
    if any(v == 0 for v in std):
        raise InputError("std", std, "non-zero values")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own error types for a file that is no ONNX graph
        raise InputError("model", str(model), f"an ONNX graph ONNX Runtime can load ({e})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] not in (3, "C", None):
        raise InputError("model", str(model), f"one image input [1, 3, H, W] (it takes "
                         f"{[(i.name, i.shape) for i in inputs]})")
    height, width = (d if isinstance(d, int) else None for d in inputs[0].shape[2:])
    if size is not None:
        check_int("size", size, 8, MAX_MAP_SIZE)
    side = size or MAP_SIZE
    height, width = height or side, width or side
    pixels = np.asarray(picture.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255
    pixels = ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)[None]
    found = session.run([outputs[0].name], {inputs[0].name: pixels})[0]
    depth = np.asarray(found, np.float32).squeeze()
    if depth.ndim == 3:  # a 3-channel map (normals): each channel as it is
        depth = depth.transpose(1, 2, 0) if depth.shape[0] == 3 else depth
    if depth.ndim not in (2, 3) or not np.isfinite(depth).all():
        raise InputError("model", str(model), f"a finite map output ([1, H, W] or [1, C, H, W]); got {found.shape}")
    low, high = float(depth.min()), float(depth.max())
    scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    if invert:
        scaled = 1 - scaled
    array = (scaled * 255 + 0.5).astype(np.uint8)
    result = Image.fromarray(array if array.ndim == 3 else np.stack([array] * 3, axis=-1), "RGB")
    return result.resize(picture.size, Image.Resampling.BICUBIC)


def _per_channel(name: str, values: tuple[float, ...]) -> tuple[float, float, float]:
    values = tuple(values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
        raise InputError(name, values, "one number, or three (R, G, B)")
    return values  # type: ignore[return-value]
