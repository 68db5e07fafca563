"""Noise sources: where the initial latents and the stochastic samplers get their Gaussian draws.

A noise source is anything with `standard_normal(shape) -> ndarray`; `numpy.random.Generator` is one.
Stochastic samplers draw only through it, one array of the latent's shape per noise injection and in
the order diffusers' schedulers draw theirs, so a source that replays another library's draws
reproduces that library's result exactly.

`noise_source(seed, kind="torch")` replays `torch.randn(shape, generator=torch.Generator("cpu")
.manual_seed(seed))`, call after call, without torch: the same seed gives the same image as diffusers
on CPU. torch's CPU generator is a Mersenne Twister seeded with the seed's low 32 bits; NumPy's
legacy MT19937 seeding yields the same 32-bit words. torch turns them into normals two ways:
- tensors of >= 16 elements: one float32 uniform per element (the word's low 24 bits / 2**24), then
  Box-Muller on blocks of 16 (the first 8 uniforms give the radius, the next 8 the angle); when the
  size is not a multiple of 16, 16 fresh uniforms redo the last 16 elements.
- smaller tensors: one element at a time in float64 (53-bit uniforms from two words, Box-Muller on a
  pair), the pair's second normal cached in the generator for the next element, even across calls.
The float32 Box-Muller of torch's x86 builds (AVX2 and AVX-512 kernels) evaluates log, sin and cos
with avx_mathfun's Cephes polynomials, compiled with fused multiply-adds; `_log_ps` and `_sincos_ps`
replay that instruction sequence (read from libtorch_cpu's machine code), one float32 rounding per
instruction, so the draws are bit-identical to torch's. torch builds without AVX2 (ARM, old x86)
call libm's logf/sincosf instead and differ from these by up to ~2e-6, far below an 8-bit image.

Batches: with `batch=B`, image k draws from its own generator seeded S+k (diffusers with a list of
generators), so any image of a batch can be reproduced alone with seed S+k.
"""

from __future__ import annotations

import math
import secrets
from typing import Protocol

import numpy as np

from sdonnx.errors import InputError

KINDS = ("torch", "numpy")
_BLOCK = 16  # torch's Box-Muller block: 8 radii then 8 angles
_TWO_PI = 2.0 * math.pi
_F32 = np.float32
# avx_mathfun's Cephes constants, as float32.
_LOG_POLY = np.array(
    [7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
     -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1],
    dtype=np.float32,
)
_LOG_Q1, _LOG_Q2, _SQRT_HALF = _F32(-2.12194440e-4), _F32(0.693359375), _F32(0.707106781186547524)
_FOUR_OVER_PI = _F32(1.27323954473516)
_PI_OVER_4_PARTS = (_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8))
_COS_POLY = (_F32(2.443315711809948e-5), _F32(-1.388731625493765e-3), _F32(4.166664568298827e-2))
_SIN_POLY = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))


class NoiseSource(Protocol):
    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray: ...


class TorchCPUNoise:
    """Replays the draws of one `torch.Generator("cpu").manual_seed(seed)` as float32 arrays."""

    def __init__(self, seed: int):
        self.seed = seed
        self._words = np.random.MT19937()
        self._words.state = np.random.RandomState(seed & 0xFFFFFFFF).get_state(legacy=False)
        self._cached_normal: float | None = None  # torch's next_double_normal_sample

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        size = math.prod(shape)
        if size >= _BLOCK:
            return self._normal_fill(size).reshape(shape)
        return np.array([self._scalar_normal() for _ in range(size)], dtype=np.float32).reshape(shape)

    def _uniforms(self, count: int) -> np.ndarray:
        """[count] float32 in [0, 1): each word's low 24 bits / 2**24, as torch's float uniform."""
        words = self._words.random_raw(count)
        return ((words & 0xFFFFFF).astype(np.float64) / 2.0**24).astype(np.float32)

    def _normal_fill(self, size: int) -> np.ndarray:
        """[size] float32 normals, size >= 16, as torch's normal_fill."""
        out = self._uniforms(size)
        whole = size - size % _BLOCK
        out[:whole] = _box_muller_16(out[:whole].reshape(-1, _BLOCK)).reshape(-1)
        if size % _BLOCK:
            out[-_BLOCK:] = _box_muller_16(self._uniforms(_BLOCK).reshape(1, _BLOCK)).reshape(-1)
        return out

    def _scalar_normal(self) -> float:
        """One float64 normal, as at::normal_distribution<double> (cached second value first)."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1, u2 = self._uniform_double(), self._uniform_double()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = _TWO_PI * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def _uniform_double(self) -> float:
        """A float64 uniform in [0, 1) from two words (first = high half), keeping 53 bits."""
        high, low = (int(w) for w in self._words.random_raw(2))
        return (((high << 32) | low) & ((1 << 53) - 1)) / 2.0**53


class BatchNoise:
    """Row k of every draw [B, ...] comes from its own source (diffusers' list of generators)."""

    def __init__(self, sources: list[NoiseSource]):
        self.sources = sources

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        if not shape or shape[0] != len(self.sources):
            raise InputError("shape", shape, f"a batch of {len(self.sources)} rows, one per seed")
        row = (1, *shape[1:])
        return np.concatenate([np.asarray(s.standard_normal(row), dtype=np.float32) for s in self.sources])


def _box_muller_16(uniforms: np.ndarray) -> np.ndarray:
    """[n, 16] float32 uniforms -> [n, 16] float32 normals, as torch's AVX2 NormalFill16."""
    radius = np.sqrt(_F32(-2.0) * _log_ps(_F32(1.0) - uniforms[:, :8]))  # 1 - u: [0, 1) -> (0, 1] for the log
    sin, cos = _sincos_ps(_F32(_TWO_PI) * uniforms[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1)


def _fma(a, b, c) -> np.ndarray:
    """float32 a * b + c as an FMA instruction gives it: the float64 product of float32 values is exact,
    and rounding the float64 sum again differs from one rounding only at near-ties (none seen in 10^6 draws)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _log_ps(x: np.ndarray) -> np.ndarray:
    """float32 natural log of x > 0 (normal numbers), as avx_mathfun's log256_ps in torch's build."""
    bits = x.view(np.int32)
    mantissa = ((bits & ~0x7F800000) | 0x3F000000).view(np.float32)  # in [0.5, 1)
    small = mantissa < _SQRT_HALF  # then use 2 * mantissa, keeping the polynomial's argument near 0
    exponent = ((bits >> 23) - 126).astype(np.float32) - small.astype(np.float32)
    x = (mantissa - _F32(1.0)) + np.where(small, mantissa, _F32(0.0))
    z = x * x
    y = np.full_like(x, _LOG_POLY[0])
    for p in _LOG_POLY[1:]:
        y = _fma(y, x, p)
    y = _fma(y * x, z, exponent * _LOG_Q1) - z * _F32(0.5)
    return _fma(exponent, _LOG_Q2, x + y)


def _sincos_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (sin x, cos x) for x >= 0, as avx_mathfun's sincos256_ps in torch's build."""
    octant = (x * _FOUR_OVER_PI).astype(np.int32)
    octant = (octant + 1) & ~1
    y = octant.astype(np.float32)
    for part in _PI_OVER_4_PARTS:  # x - octant * pi/4 in three parts: extended-precision reduction
        x = _fma(y, part, x)
    z = x * x
    cos = _fma(_fma(_COS_POLY[0], z, _COS_POLY[1]), z, _COS_POLY[2])
    cos = _fma(cos * z, z, -(z * _F32(0.5))) + _F32(1.0)
    sin = _fma(_fma(_SIN_POLY[0], z, _SIN_POLY[1]), z, _SIN_POLY[2])
    sin = _fma(x, sin * z, x)
    swap = (octant & 2) != 0  # octants where sin and cos trade polynomials
    sin, cos = np.where(swap, cos, sin), np.where(swap, sin, cos)
    return np.where(octant & 4, -sin, sin), np.where(~(octant - 2) & 4, -cos, cos)


def noise_source(seed: int | None = None, kind: str = "torch", batch: int = 1) -> NoiseSource:
    """A source for `batch` images from `seed` (None: a random one); image k uses seed + k.

    kind "torch": torch's CPU generator, draws identical to torch.randn; "numpy": NumPy's PCG64.
    kind and batch come checked from a GenerationConfig.
    """
    if seed is None:
        seed = secrets.randbelow(2**32)
    make = TorchCPUNoise if kind == "torch" else np.random.default_rng
    if batch == 1:
        return make(seed)
    return BatchNoise([make(seed + k) for k in range(batch)])


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
