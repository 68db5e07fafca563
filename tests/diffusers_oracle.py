"""diffusers' schedulers as the oracle for sdonnx's samplers: which one, how it is built, where its noise comes from.

`oracle_scheduler(monkeypatch, sampler, model_config, noise=source)` returns the diffusers scheduler
matching an sdonnx sampler, built `from_config` of a model's scheduler config, whose per-step noise
is drawn from `source` (an sdonnx noise source) and recorded; `ReplayNoise` hands the recorded draws
to an sdonnx sampler in the same order.

Two stand-ins, because optional dependencies are not installed here:
- LMSDiscreteScheduler integrates its coefficients with scipy.integrate.quad; an 8-point Gauss-Legendre
  rule (exact for these cubic polynomials) takes its place.
- DPMSolverSDEScheduler imports torchsde only for its Brownian-tree noise: the import is stubbed and
  BrownianTreeNoiseSampler replaced by draws from the source, so the solver itself is diffusers'.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from functools import cache

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# sampler -> (diffusers module, scheduler class, config beyond the model's). DDIM's eta is 0, the
# default of both DDIMScheduler.step and StableDiffusionPipeline.
DPM_SOLVER = ("scheduling_dpmsolver_multistep", "DPMSolverMultistepScheduler")
ORACLES = {
    "euler": ("scheduling_euler_discrete", "EulerDiscreteScheduler", {}),
    "euler_ancestral": ("scheduling_euler_ancestral_discrete", "EulerAncestralDiscreteScheduler", {}),
    "heun": ("scheduling_heun_discrete", "HeunDiscreteScheduler", {}),
    "dpm_2": ("scheduling_k_dpm_2_discrete", "KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("scheduling_k_dpm_2_ancestral_discrete", "KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("scheduling_lms_discrete", "LMSDiscreteScheduler", {}),
    "dpmpp_2m": (*DPM_SOLVER, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (*DPM_SOLVER, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": ("scheduling_dpmsolver_sde", "DPMSolverSDEScheduler", {}),
    "ddim": ("scheduling_ddim", "DDIMScheduler", {}),
    "pndm": ("scheduling_pndm", "PNDMScheduler", {"skip_prk_steps": True}),
    "plms": ("scheduling_pndm", "PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("scheduling_unipc_multistep", "UniPCMultistepScheduler", {}),
    "lcm": ("scheduling_lcm", "LCMScheduler", {}),
    "ddpm": ("scheduling_ddpm", "DDPMScheduler", {}),
}
KIND_FLAGS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
# Every SD config has clip_sample false; a PNDM config has no such key and DDIM/DDPM default it to true.
MODEL_DEFAULTS = {"clip_sample": False}


class ReplayNoise:
    """A noise source returning recorded draws in order, checking each requested shape."""

    def __init__(self, draws: list[np.ndarray]):
        self.draws, self.used = draws, 0

    def standard_normal(self, shape):
        if self.used == len(self.draws):
            raise AssertionError(f"sampler drew more noise than diffusers ({len(self.draws)} draws)")
        draw = self.draws[self.used]
        assert draw.shape == tuple(shape), (draw.shape, shape)
        self.used += 1
        return draw


def gauss_legendre_quad(f, a, b, epsrel=None):
    """scipy.integrate.quad's interface; exact for polynomials of degree <= 15."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    a, b = float(a), float(b)
    half, middle = (b - a) / 2, (a + b) / 2
    return half * sum(w * float(f(middle + half * x)) for x, w in zip(nodes, weights)), 0.0


@cache
def scheduler_module(sampler: str) -> types.ModuleType:
    name = f"diffusers.schedulers.{ORACLES[sampler][0]}"
    if name.endswith("dpmsolver_sde") and importlib.util.find_spec("torchsde") is None:
        sys.modules["torchsde"] = types.ModuleType("torchsde")
        try:
            return importlib.import_module(name)
        finally:
            del sys.modules["torchsde"]
    return importlib.import_module(name)


def oracle_scheduler(
    monkeypatch, sampler: str, model_config: Mapping, *, kind: str = "default", noise=None
) -> tuple[object, list[np.ndarray]]:
    """(the diffusers scheduler for `sampler`, the list its noise draws are appended to, in order).

    noise: a noise source (`standard_normal(shape)`) the scheduler draws from instead of torch's
    generator; the patches last as long as `monkeypatch`.
    """
    module = scheduler_module(sampler)
    draws: list[np.ndarray] = []

    def record(shape, generator=None, device=None, dtype=None, **_):
        if noise is None:
            raise AssertionError(f"{ORACLES[sampler][1]} drew noise but no source was given")
        draw = np.asarray(noise.standard_normal(tuple(shape)), dtype=np.float32)
        draws.append(draw)
        return torch.from_numpy(draw).to(device=device, dtype=dtype or torch.float32)

    class RecordedBrownianNoise:
        def __init__(self, x, *args, **kwargs):
            self.shape = x.shape

        def __call__(self, sigma, sigma_next):
            return record(self.shape)

    monkeypatch.setattr(module, "randn_tensor", record, raising=False)
    monkeypatch.setattr(module, "integrate", types.SimpleNamespace(quad=gauss_legendre_quad), raising=False)
    monkeypatch.setattr(module, "BrownianTreeNoiseSampler", RecordedBrownianNoise, raising=False)
    _, class_name, extra = ORACLES[sampler]
    config = {**MODEL_DEFAULTS, **model_config, **extra, **KIND_FLAGS[kind]}
    return getattr(module, class_name).from_config(config), draws
