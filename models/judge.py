"""A deterministic judge of drawings: which colour, shape, size and position the picture shows.

It reads any RGB image of the kind `draw` makes (a model's output included) with NumPy alone:
the background is the nearest palette colour of the border's median, the object is the largest
connected region far from it, and its colour, size, shape and position follow from that region.
Anti-aliased and blurred edges count fractionally: each pixel's coverage is where it lies on the
line from the background colour to the object colour, so area and widths are sub-pixel accurate.

Shape: an apex-up triangle's area piles up towards its base, so its vertical skewness is about
-0.57 where a circle's and a square's is 0; blur shrinks it little. A circle and a square differ in
their fill ratio, area over (widest row x tallest column): pi/4 against 1. Size comes from the
shape's width, position from its centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdonnx.errors import InputError
from sdonnx.models.draw import EXTENTS, PALETTE, SCALE_JITTER, Scene, position_word

ATTRIBUTES = ("colour", "background", "shape", "size", "position")
BORDER = 2
# Pixels this far (as a fraction of the nearest other palette colour) from the background are object.
OBJECT_DISTANCE = 0.4
MIN_OBJECT_PIXELS = 4
# Halfway (geometrically) between the widest small shape and the narrowest large one.
SIZE_THRESHOLD = math.sqrt(EXTENTS["small"] * (1 + SCALE_JITTER) * EXTENTS["large"] * (1 - SCALE_JITTER))
# Halfway between a triangle's vertical skewness, -2 sqrt(2) / 5, and a symmetric shape's 0.
TRIANGLE_SKEW_BELOW = -math.sqrt(2) / 5
# Halfway between a circle's fill ratio and a square's.
SQUARE_FILL_ABOVE = (math.pi / 4 + 1) / 2

_NAMES = tuple(PALETTE)
_RGB = np.array([PALETTE[name] for name in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Verdict:
    """What the judge saw. Object fields are None when it found no object; x, y, extent in [0, 1]."""

    background: str
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    x: float | None = None
    y: float | None = None
    extent: float | None = None
    fill: float | None = None
    skew: float | None = None


def _nearest(rgb: np.ndarray, exclude: str | None = None) -> str:
    distances = np.linalg.norm(_RGB - rgb, axis=1)
    if exclude is not None:
        distances[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(distances))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask [H, W] (an all-False mask if it is empty)."""
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)
    while True:
        # Every pixel takes the largest label among itself and its neighbours until nothing changes.
        padded = np.pad(labels, 1)
        spread = np.maximum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == np.argmax(counts) if counts.any() else mask


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return np.logical_or.reduce([mask, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])


def _shape(skew: float, fill: float) -> str:
    if skew < TRIANGLE_SKEW_BELOW:
        return "triangle"
    return "square" if fill > SQUARE_FILL_ABOVE else "circle"


def _skewness(weights: np.ndarray) -> float:
    """Standardised third moment of the distribution with these weights over positions 0, 1, ..."""
    p = weights / weights.sum()
    offsets = np.arange(len(p)) - (p * np.arange(len(p))).sum()
    variance = (p * offsets**2).sum()
    return float((p * offsets**3).sum() / variance**1.5) if variance > 0 else 0.0


def judge(image: Image.Image) -> Verdict:
    """Read the background, and the largest object's colour, shape, size and position, from an image."""
    if not isinstance(image, Image.Image):
        raise InputError("image", type(image).__name__, "a PIL.Image")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    height, width = rgb.shape[:2]
    if min(height, width) <= 4 * BORDER:
        raise InputError("image", image.size, f"both sides > {4 * BORDER} pixels")
    frame = (rgb[:BORDER], rgb[-BORDER:], rgb[:, :BORDER], rgb[:, -BORDER:])
    border = np.concatenate([side.reshape(-1, 3) for side in frame])
    background_rgb = np.median(border, axis=0)
    background = _nearest(background_rgb)

    palette_gap = np.delete(np.linalg.norm(_RGB - PALETTE[background], axis=1), _NAMES.index(background)).min()
    distance = np.linalg.norm(rgb - background_rgb, axis=-1)  # [H, W]
    blob = _largest_component(distance > OBJECT_DISTANCE * palette_gap)
    if blob.sum() < MIN_OBJECT_PIXELS:
        return Verdict(background)
    # The blob's pixels farthest from the background are its interior, free of edge blending.
    blob_distance = distance[blob]
    object_rgb = np.median(rgb[blob][blob_distance >= np.median(blob_distance)], axis=0)
    colour = _nearest(object_rgb, exclude=background)

    axis = object_rgb - background_rgb
    along = (rgb - background_rgb) @ axis / (axis @ axis)  # [H, W]: 0 background, 1 object
    shape_mask = _largest_component(along > 0.5)
    if shape_mask.sum() < MIN_OBJECT_PIXELS:
        return Verdict(background)
    coverage = np.clip(along, 0, 1) * _dilate(shape_mask)
    area = coverage.sum()
    row_widths, column_heights = coverage.sum(axis=1), coverage.sum(axis=0)
    fill = float(area / (row_widths.max() * column_heights.max()))
    skew = _skewness(row_widths)
    # Pixel centres sit at half-integers in [0, side] coordinates.
    x = float((column_heights * (np.arange(width) + 0.5)).sum() / area / width)
    y = float((row_widths * (np.arange(height) + 0.5)).sum() / area / height)
    extent = float(max(row_widths.max() / width, column_heights.max() / height))
    return Verdict(
        background=background,
        colour=colour,
        shape=_shape(skew, fill),
        size="small" if extent < SIZE_THRESHOLD else "large",
        position=position_word(x, y),
        x=x,
        y=y,
        extent=extent,
        fill=fill,
        skew=skew,
    )


def grade(verdict: Verdict, scene: Scene) -> dict[str, bool]:
    """Per attribute, whether the verdict agrees with the scene the image was meant to show."""
    return {attribute: getattr(verdict, attribute) == getattr(scene, attribute) for attribute in ATTRIBUTES}


def accuracy(verdicts: list[Verdict], scenes: list[Scene]) -> dict[str, float]:
    """Per attribute, the fraction of verdicts that agree with their scenes."""
    if len(verdicts) != len(scenes) or not scenes:
        raise InputError("verdicts", len(verdicts), f"one verdict per scene ({len(scenes)}), at least one")
    grades = [grade(verdict, scene) for verdict, scene in zip(verdicts, scenes)]
    return {attribute: float(np.mean([g[attribute] for g in grades])) for attribute in ATTRIBUTES}
