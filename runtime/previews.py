"""Step previews: the sampler's current x0 estimate as an image, in about a millisecond.

A latent pixel decodes to roughly the mean colour of its patch, nearly linearly in the latent's
channels, so a C x 3 matrix and a bias (`LatentRGB`, manifest `latent_rgb`) turn a latent into a
small RGB image where the VAE decoder takes seconds at SD sizes. `fit_latent_rgb` finds them by
least squares against a model's own VAE: it encodes seeded colour fields and fits the latents to
the pictures' colours pooled onto the latent grid. Export records the fit; a folder without one
previews through its VAE decoder (exact, as slow as the final decode).

    pipe(prompt, callback=lambda step, sigma, latents, preview: preview().save("now.png"), previews=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

FIT_PICTURES = 16  # seeded colour fields the fit sees
FIT_SIZE = 128  # their side in pixels (a multiple of any VAE factor in use)
FIT_CELLS = 4  # each picture is a FIT_CELLS x FIT_CELLS grid of random colours, smoothly blended


@dataclass(frozen=True)
class LatentRGB:
    """RGB in [-1, 1] = latent (diffusion space, per pixel) @ factors + bias."""

    factors: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float]

    @classmethod
    def from_json(cls, raw: object, channels: int, where: str) -> LatentRGB:
        from sdonnx.errors import ModelError

        try:
            factors = np.asarray(raw["factors"], dtype=np.float64)  # type: ignore[index]
            bias = np.asarray(raw["bias"], dtype=np.float64)  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            raise ModelError(f"{where}: latent_rgb: got {raw!r}, expected {{\"factors\": [[r, g, b] per latent "
                             "channel], \"bias\": [r, g, b]}") from None
        if factors.shape != (channels, 3) or bias.shape != (3,) or not np.isfinite(factors).all():
            raise ModelError(f"{where}: latent_rgb: factors {factors.shape} and bias {bias.shape}, expected "
                             f"({channels}, 3) and (3,), finite")
        return cls(tuple(tuple(float(v) for v in row) for row in factors), tuple(float(v) for v in bias))

    def to_json(self) -> dict:
        return {"factors": [list(row) for row in self.factors], "bias": list(self.bias)}

    def pixels(self, latent: np.ndarray) -> np.ndarray:
        """latent [C, h, w] -> uint8 [h, w, 3]."""
        rgb = np.tensordot(np.asarray(latent, np.float32), np.asarray(self.factors, np.float32), axes=([0], [0]))
        rgb += np.asarray(self.bias, np.float32)
        return np.clip((rgb + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)

    def image(self, latent: np.ndarray, factor: int) -> Image.Image:
        """latent [C, h, w] -> an RGB image of the final image's size (h*factor x w*factor)."""
        small = Image.fromarray(self.pixels(latent), "RGB")
        return small.resize((small.width * factor, small.height * factor), Image.Resampling.BILINEAR)


def fit_latent_rgb(encode: Callable[[np.ndarray], np.ndarray], factor: int, *, seed: int = 0) -> LatentRGB:
    """Least-squares LatentRGB for a VAE. encode: pixels float32 [N, 3, H, W] in [-1, 1] -> its latents
    in diffusion space (scaled and shifted as the U-Net sees them) [N, C, H/factor, W/factor]."""
    pixels = fit_pictures(seed)
    latents = np.asarray(encode(pixels), np.float64)
    n, channels, h, w = latents.shape
    pooled = pixels.reshape(n, 3, h, factor, w, factor).mean(axis=(3, 5))
    x = np.concatenate([latents.transpose(0, 2, 3, 1).reshape(-1, channels), np.ones((n * h * w, 1))], axis=1)
    y = pooled.transpose(0, 2, 3, 1).reshape(-1, 3)
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    return LatentRGB(tuple(tuple(float(v) for v in row) for row in coefficients[:channels]),
                     tuple(float(v) for v in coefficients[channels]))


def fit_pictures(seed: int = 0, count: int = FIT_PICTURES, size: int = FIT_SIZE) -> np.ndarray:
    """`count` seeded pictures float32 [count, 3, size, size] in [-1, 1]: grids of random colours
    (saturated and grey ones both) blended smoothly, so every colour region spans many latent pixels."""
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(count):
        cells = rng.uniform(0, 255, (FIT_CELLS, FIT_CELLS, 3))
        cells[rng.random((FIT_CELLS, FIT_CELLS)) < 0.3] = rng.uniform(0, 255, (1, 3)).mean()  # some greys
        image = Image.fromarray(cells.astype(np.uint8), "RGB").resize((size, size), Image.Resampling.BICUBIC)
        pictures.append(np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return np.stack(pictures)


def preview_of(latent_rgb: LatentRGB | None, decode: Callable[[np.ndarray], Sequence[Image.Image]],
               denoised: np.ndarray, factor: int) -> Callable[[], list[Image.Image]]:
    """A zero-argument function giving the previews of `denoised` [B, C, h, w]: through `latent_rgb`
    when the model has one, else through `decode` (the VAE). Nothing is computed until it is called."""
    if latent_rgb is None:
        return lambda: list(decode(denoised))
    return lambda: [latent_rgb.image(latent, factor) for latent in denoised]
