"""Noise sources: where the stochastic samplers get their Gaussian draws.

A noise source is anything with `standard_normal(shape) -> ndarray`; `numpy.random.Generator` is one.
Stochastic samplers draw only through it, one array of the latent's shape per noise injection and in
the order diffusers' schedulers draw theirs, so a source that replays another library's draws (a test
replaying `torch.randn`) reproduces that library's result exactly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from sdonnx.errors import InputError


class NoiseSource(Protocol):
    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray: ...


def noise_source(seed: int | None = None) -> NoiseSource:
    """The default source: NumPy's PCG64 generator (seed None draws fresh entropy)."""
    return np.random.default_rng(seed)


def require_noise(rng: NoiseSource | None) -> NoiseSource:
    """Check before any U-Net work that a stochastic sampler was given a source."""
    if rng is None or not callable(getattr(rng, "standard_normal", None)):
        raise InputError("rng", rng, "a noise source with standard_normal(shape) (this sampler is stochastic)")
    return rng


def gaussian_like(rng: NoiseSource, x: np.ndarray) -> np.ndarray:
    """One unit-variance draw of x's shape, in x's dtype."""
    noise = np.asarray(rng.standard_normal(x.shape))
    if noise.shape != x.shape:
        raise InputError("rng", f"a draw of shape {noise.shape}", f"shape {x.shape}")
    return noise.astype(x.dtype, copy=False)
