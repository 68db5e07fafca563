"""Overlapping tiles with blend ramps: the tiled VAE decode (images.py) and the tiled U-Net.

Tiles of `tile` pixels overlap their neighbours by a quarter of that; each tile weighs in with a ramp
that rises across the overlap and is 1 elsewhere, and the weighted sum is normalized, so the blend
is seamless wherever the tiles agree.

`tiled` runs a denoiser on such tiles of the latent at every step and blends their x0 estimates
(MultiDiffusion, Bar-Tal et al. 2023): what the x4 upscaler does for large images, whose latent is
the low-res image's size. The samplers see one denoiser over the whole latent; each tile's own sees
only its window (its conditioning's appended channels cropped to it).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sdonnx.errors import InputError

Denoise = Callable[[np.ndarray, float], np.ndarray]
MIN_TILE = 4


def check_tile(tile: object, field: str = "tile") -> int:
    """`tile` as an int of at least MIN_TILE latent pixels; InputError naming `field` otherwise."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < MIN_TILE:
        raise InputError(field, tile, f"an int >= {MIN_TILE} (latent pixels)")
    return tile


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of `tile` covering `size`, at least `overlap` apart from their neighbours' ends."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def ramp(length: int, rise: int, rising: bool, falling: bool) -> np.ndarray:
    """Weights along one axis of a tile: rising over the first `rise` pixels, falling over the last."""
    weights = np.ones(length, dtype=np.float32)
    edge = (np.arange(rise, dtype=np.float32) + 0.5) / rise  # never 0: every pixel keeps a weight
    if rising:
        weights[:rise] = np.minimum(weights[:rise], edge)
    if falling:
        weights[length - rise :] = np.minimum(weights[length - rise :], edge[::-1])
    return weights


def windows(height: int, width: int, tile: int, scale: int = 1) -> list[tuple[slice, slice, np.ndarray]]:
    """(rows, cols, weights) of each tile covering height x width: its slices, and its blend weights at
    `scale` times that resolution, [rows * scale, cols * scale] (the decoder's pixels for latent tiles)."""
    check_tile(tile)
    overlap = tile // 4
    found = []
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            rows, cols = min(tile, height), min(tile, width)
            weights = np.outer(ramp(rows * scale, overlap * scale, top > 0, top + rows < height),
                               ramp(cols * scale, overlap * scale, left > 0, left + cols < width))
            found.append((slice(top, top + rows), slice(left, left + cols), weights))
    return found


def tiled(make: Callable[[slice, slice], Denoise], height: int, width: int, tile: int) -> Denoise:
    """denoise(x [B, C, height, width], sigma) -> x0, the blend of make(rows, cols)(x[..., rows, cols], sigma)
    over the tiles `windows` gives. make(rows, cols) is called once per tile, here."""
    parts = [(rows, cols, weights, make(rows, cols)) for rows, cols, weights in windows(height, width, tile)]
    total = np.zeros((height, width), dtype=np.float32)
    for rows, cols, weights, _ in parts:
        total[rows, cols] += weights

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        out = np.zeros_like(x, dtype=np.float32)
        for rows, cols, weights, part in parts:
            out[..., rows, cols] += part(np.ascontiguousarray(x[..., rows, cols]), sigma) * weights
        return out / total

    return denoise
