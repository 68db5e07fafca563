"""Inpainting only the masked area (A1111's "Inpaint area: Only masked", its API's inpaint_full_res).

A small mask in a large picture is repainted at the generation size instead of at the picture's:
the mask's bounding box, grown by `padding` pixels and then widened or heightened to the generation
size's aspect ratio (staying inside the picture), is cut out of image and mask, scaled to the
generation size, inpainted there, scaled back and pasted into the picture through the mask, so
everything outside the mask keeps the picture's own pixels.

    region = crop_region(mask, padding=32, aspect=(512, 512))   # (left, top, right, bottom)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdonnx.errors import InputError
from sdonnx.runtime.images import MASK_THRESHOLD, as_8bit


def crop_region(mask: Image.Image, *, padding: int, aspect: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the part to repaint: the mask's white bounding box plus `padding`,
    grown to the aspect ratio width:height of `aspect` (width, height) inside the mask's size."""
    white = np.asarray(as_8bit(mask, "L", "mask"), dtype=np.float32) / 255 >= MASK_THRESHOLD
    rows, cols = np.flatnonzero(white.any(axis=1)), np.flatnonzero(white.any(axis=0))
    if not len(rows):
        raise InputError("mask", "an all-black mask", "a mask with a white part to repaint")
    size = (mask.width, mask.height)
    box = [max(cols[0] - padding, 0), max(rows[0] - padding, 0), min(cols[-1] + 1 + padding, size[0]),
           min(rows[-1] + 1 + padding, size[1])]
    width, height = box[2] - box[0], box[3] - box[1]
    if width * aspect[1] > height * aspect[0]:  # too wide: grow the height
        box[1], box[3] = _grown(box[1], box[3], round(width * aspect[1] / aspect[0]), size[1])
    else:
        box[0], box[2] = _grown(box[0], box[2], round(height * aspect[0] / aspect[1]), size[0])
    return tuple(int(v) for v in box)


def _grown(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """[low, high) grown about its centre to `length` (at most `limit`), shifted to stay in [0, limit)."""
    length = min(length, limit)
    low -= (length - (high - low)) // 2
    low = min(max(low, 0), limit - length)
    return low, low + length


def cut(image: Image.Image, mask: Image.Image, region: tuple[int, int, int, int], width: int, height: int
        ) -> tuple[Image.Image, Image.Image]:
    """The region of image and mask at the generation size (Lanczos for the image, bilinear for the mask)."""
    return (image.convert("RGB").crop(region).resize((width, height), Image.Resampling.LANCZOS),
            as_8bit(mask, "L", "mask").crop(region).resize((width, height), Image.Resampling.BILINEAR))


def paste(picture: Image.Image, repainted: Image.Image, mask: Image.Image, region: tuple[int, int, int, int]
          ) -> Image.Image:
    """`picture` with the repainted region, scaled back to the region, pasted through the mask."""
    out = picture.convert("RGB").copy()
    size = (region[2] - region[0], region[3] - region[1])
    alpha = as_8bit(mask, "L", "mask").crop(region)
    out.paste(repainted.resize(size, Image.Resampling.LANCZOS), region[:2], alpha)
    return out
