"""Samplers: pure k-diffusion-style loops, each reproducing one diffusers scheduler.

Contract. Every sampler is `sample_x(denoise, x, sigmas, *, rng=None, callback=None) -> x`:
- x [B, C, h, w] float32 lives in k-diffusion space, x = latent_vp / alpha = x0 + sigma * eps. The
  pipeline starts from `noise * plan.noise_scale` and decodes `x * plan.latent_scale`
  (`schedules.Plan`; `sampling.run_plan` runs a plan).
- sigmas [N+1] descending come from the plan `sampling.make_plan` makes for *this* sampler: each
  diffusers scheduler picks its own timesteps. The last sigma is 0, or sigma(t=0) for DDIM/PNDM.
- denoise(x, sigma) -> x0 is the only access to the model (`denoiser.GuidedDenoiser`); samplers never
  see timesteps.
- rng: stochastic samplers draw only through it (`noise.NoiseSource`), one array of x's shape per
  noise injection, in the order diffusers draws; draws multiplied by zero are skipped.
- callback(info) runs once per step with i, sigma, sigma_next, x (before the step) and denoised;
  cancelling is the caller's business (raise from it).

All coefficients are Python floats, so x stays float32 as in diffusers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np
from numpy.polynomial import Polynomial

from sdonnx.errors import InputError
from sdonnx.runtime.noise import NoiseSource, gaussian_like, require_noise

Denoise = Callable[[np.ndarray, float], np.ndarray]
Callback = Callable[[dict[str, Any]], None]
Sampler = Callable[..., np.ndarray]
Terms = list[tuple[float, np.ndarray]]

LMS_ORDER = 4


def _steps(sigmas: np.ndarray) -> Iterator[tuple[int, float, float]]:
    sigmas = np.asarray(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise InputError("sigmas", f"shape {sigmas.shape}", "a 1-D plan of at least 2 noise levels")
    for i in range(len(sigmas) - 1):
        yield i, float(sigmas[i]), float(sigmas[i + 1])


def _report(
    callback: Callback | None, i: int, sigma: float, sigma_next: float, x: np.ndarray, denoised: np.ndarray
) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised})


def _derivative(x: np.ndarray, denoised: np.ndarray, sigma: float) -> np.ndarray:
    """dx/dsigma of the probability-flow ODE; equals the predicted noise eps."""
    return (x - denoised) / sigma


def _ancestral_step(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """Split a step to sigma_to into a deterministic step to sigma_down plus fresh noise of sigma_up (eta 1)."""
    sigma_up = min(sigma_to, math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _ancestral_update(
    x: np.ndarray, denoised: np.ndarray, sigma: float, sigma_to: float, rng: NoiseSource
) -> np.ndarray:
    sigma_down, sigma_up = _ancestral_step(sigma, sigma_to)
    x = x + (sigma_down - sigma) * _derivative(x, denoised, sigma)
    return x + gaussian_like(rng, x) * sigma_up if sigma_up > 0 else x


def sample_euler(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """Euler (EulerDiscreteScheduler). DDIM with eta 0 is this same step in k-space:
    sqrt(a') x0 + sqrt(1 - a') eps, divided by sqrt(a'), is x0 + sigma' eps."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        x = x + (sigma_next - sigma) * _derivative(x, denoised, sigma)
    return x


def sample_euler_ancestral(
    denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None
) -> np.ndarray:
    """Ancestral Euler (EulerAncestralDiscreteScheduler). DDPM's posterior step (fixed_small variance)
    is this same step in k-space: its mean is x0 + sigma_down eps and its std sigma_up."""
    rng = require_noise(rng)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        x = _ancestral_update(x, denoised, sigma, sigma_next, rng)
    return x


def sample_heun(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """Heun's second-order method (HeunDiscreteScheduler); the step to sigma 0 is Euler."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        d = _derivative(x, denoised, sigma)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _derivative(x_2, denoise(x_2, sigma_next), sigma_next)
            x = x + (d + d_2) / 2 * dt
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


def _dpm_2_step(denoise: Denoise, x: np.ndarray, d: np.ndarray, sigma: float, sigma_to: float) -> np.ndarray:
    """x at sigma (derivative d there) -> x at sigma_to > 0, through the log-sigma midpoint's derivative."""
    sigma_mid = _log_midpoint(sigma, sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = _derivative(x_2, denoise(x_2, sigma_mid), sigma_mid)
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """DPM-Solver-2 (KDPM2DiscreteScheduler): midpoint at the log-sigma middle; the step to 0 is Euler."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        d = _derivative(x, denoised, sigma)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x = _dpm_2_step(denoise, x, d, sigma, sigma_next)
    return x


def sample_dpm_2_ancestral(
    denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None
) -> np.ndarray:
    """Ancestral DPM-Solver-2 (KDPM2AncestralDiscreteScheduler): DPM-2 to sigma_down, then noise of sigma_up."""
    rng = require_noise(rng)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        d = _derivative(x, denoised, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            x = _dpm_2_step(denoise, x, d, sigma, sigma_down)
            x = x + gaussian_like(rng, x) * sigma_up
    return x


def _lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of node sigma_(i-j)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    basis = Polynomial([1.0])
    for node in nodes[:j] + nodes[j + 1 :]:
        basis = basis * Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


def sample_lms(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """Linear multistep of order 4 on the ODE derivative (LMSDiscreteScheduler)."""
    derivatives: list[np.ndarray] = []
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        derivatives = [*derivatives[-(LMS_ORDER - 1) :], _derivative(x, denoised, sigma)]
        order = len(derivatives)
        coefficients = [_lms_coefficient(sigmas, i, j, order) for j in range(order)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(derivatives)))
    return x


def _dpmpp_2m(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, rng, callback, *, eta: float) -> np.ndarray:
    """DPM-Solver++(2M), midpoint form, with eta = 0 (ODE) or 1 (SDE variant, fresh noise each step).

    First order on the first step and on the final step to sigma 0 (lower_order_final), where the
    update lands exactly on the prediction.
    """
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            estimate = denoised
            if old_denoised is not None:
                estimate = denoised + (0.5 * h / h_last) * (denoised - old_denoised)
            x = (sigma_next / sigma * math.exp(-eta * h)) * x - math.expm1(-h - eta * h) * estimate
            if eta > 0:
                x = x + gaussian_like(rng, x) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)))
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_2m(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """DPM-Solver++(2M) (DPMSolverMultistepScheduler, dpmsolver++, order 2, midpoint)."""
    return _dpmpp_2m(denoise, x, sigmas, None, callback, eta=0.0)


def sample_dpmpp_2m_sde(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """SDE-DPM-Solver++(2M) (DPMSolverMultistepScheduler, sde-dpmsolver++, order 2, midpoint)."""
    return _dpmpp_2m(denoise, x, sigmas, require_noise(rng), callback, eta=1.0)


def sample_dpmpp_sde(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """DPM-Solver++ SDE (DPMSolverSDEScheduler; k-diffusion's dpmpp_sde with r = 1/2, eta 1).

    Two ancestral half-steps per step, each drawing its own noise. diffusers draws these from a
    Brownian tree (torchsde); here every draw comes from `rng`, in the same order.
    """
    rng = require_noise(rng)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = x + (sigma_next - sigma) * _derivative(x, denoised, sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_next)
            x_2 = _ancestral_update(x, denoised, sigma, sigma_mid, rng)
            x = _ancestral_update(x, denoise(x_2, sigma_mid), sigma, sigma_next, rng)
    return x


def _adams_bashforth(history: list[np.ndarray]) -> np.ndarray:
    """PNDM's fixed multistep weights (newest last), which assume equal steps."""
    if len(history) == 1:
        return history[-1]
    if len(history) == 2:
        return (3 * history[-1] - history[-2]) / 2
    if len(history) == 3:
        return (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
    return (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])


def sample_pndm(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """PLMS (PNDMScheduler with skip_prk_steps) on eps = dx/dsigma.

    PNDM's transfer step is DDIM's, which is Euler in k-space. Like diffusers, the first step is Heun
    (the U-Net runs twice at sigmas[1], so N steps cost N + 1 calls) and its correction is left out
    of the multistep history. diffusers combines the raw model outputs, so for v-prediction it
    mixes v rather than eps; this sampler always combines eps, since which to mix depends on the
    prediction type that samplers do not see (the tests measure the difference).
    """
    history: list[np.ndarray] = []
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        eps = _derivative(x, denoised, sigma)
        history = [*history[-3:], eps]
        if i == 0 and len(sigmas) > 2:
            x_euler = x + (sigma_next - sigma) * eps
            eps_2 = _derivative(x_euler, denoise(x_euler, sigma_next), sigma_next)
            x = x + (sigma_next - sigma) * ((eps + eps_2) / 2)
        else:
            x = x + (sigma_next - sigma) * _adams_bashforth(history)
    return x


def _unipc_update(x: np.ndarray, sigma: float, sigma_to: float, m0: np.ndarray, terms: Terms) -> np.ndarray:
    """UniPC-bh2 with x0 prediction in k-space: the exponential-integrator step from sigma plus
    the B(h)-weighted corrections sum(rho * D)."""
    h = math.log(sigma / sigma_to)
    estimate = m0
    for rho, d in terms:
        estimate = estimate + rho * d
    return (sigma_to / sigma) * x - math.expm1(-h) * estimate


def _unipc_correction(
    sigmas: np.ndarray, i: int, outputs: list[np.ndarray], denoised: np.ndarray, order: int
) -> Terms:
    """UniC's terms at step i, whose point was predicted with `order` from the previous outputs.

    Order 2 solves [[1, 1], [r, 1]] rho = b for the weights of the history and of the new output.
    """
    m0 = outputs[-1]
    if order == 1:
        return [(0.5, denoised - m0)]
    sigma_0 = float(sigmas[i - 1])
    h = math.log(sigma_0 / float(sigmas[i]))
    r = math.log(sigma_0 / float(sigmas[i - 2])) / h
    b_h = math.expm1(-h)
    phi_2 = b_h / -h - 1
    b_1, b_2 = phi_2 / b_h, (phi_2 / -h - 0.5) * 2 / b_h
    rho_0 = (b_1 - b_2) / (1 - r)
    return [(rho_0, (outputs[-2] - m0) / r), (b_1 - rho_0, denoised - m0)]


def sample_unipc(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """UniPC (UniPCMultistepScheduler defaults: bh2, order 2, x0 prediction, lower_order_final).

    Each new model output first corrects the point it was evaluated at (UniC, reusing that same
    evaluation), then predicts the next point (UniP) from the corrected one.
    """
    steps = len(sigmas) - 1
    outputs: list[np.ndarray] = []
    x_last, order_last = x, 1
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        if i > 0:
            terms = _unipc_correction(sigmas, i, outputs, denoised, order_last)
            x = _unipc_update(x_last, float(sigmas[i - 1]), sigma, outputs[-1], terms)
        outputs = [*outputs[-1:], denoised]
        order = min(2, steps - i, len(outputs))
        x_last, order_last = x, order
        if sigma_next == 0:
            x = denoised
        elif order == 1:
            x = _unipc_update(x, sigma, sigma_next, denoised, [])
        else:
            r = math.log(sigma / float(sigmas[i - 1])) / math.log(sigma / sigma_next)
            x = _unipc_update(x, sigma, sigma_next, denoised, [(0.5, (outputs[-2] - denoised) / r)])
    return x


def sample_lcm(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, rng=None, callback=None) -> np.ndarray:
    """Latent consistency sampling (LCMScheduler): jump to the prediction, re-noise to the next sigma.

    The consistency boundary condition is applied by the Denoiser (plan.timestep_scaling).
    """
    rng = require_noise(rng)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoise(x, sigma)
        _report(callback, i, sigma, sigma_next, x, denoised)
        x = denoised + gaussian_like(rng, denoised) * sigma_next if sigma_next > 0 else denoised
    return x
