"""Sampling plans: the noise levels a sampler visits, chosen exactly as diffusers' schedulers choose them.

Everything runs in k-diffusion space: sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod) and
x = latent_vp / alpha = x0 + sigma * eps. A `Plan` carries what the pipeline needs:

    plan = make_plan(manifest.schedule, steps, sampler="dpmpp_2m", kind="karras")   # sampling.py
    x = noise * plan.noise_scale                # noise [B, C, h, w] unit variance, as diffusers' `latents=`
    latent = run_plan(plan, denoise, x, rng=rng, callback=callback)   # x0 * plan.latent_scale

and the U-Net adapter (`denoiser.UNetModel`) reads the plan's exact timesteps. The plan rules below
(`discrete_plan`, `multistep_plan`, `alpha_plan`, `lcm_plan`) are what the sampler registry
(`sampling.SAMPLERS`) names for each sampler.

img2img and inpainting run the tail of the plan that `strength` selects (`strength_tail`), starting
from x = init_latent + sigmas[0] * noise, diffusers' add_noise in k-space for every scheduler.

Each diffusers scheduler picks its own timesteps, and the plan reproduces those choices, quirks
included: the Euler family's initial noise is sqrt(sigma_max^2 + 1) for "leading" spacing but sigma_max
for "linspace"/"trailing"; DDIM/PNDM/DDPM/LCM/UniPC/DPM-Solver start from unit noise in VP space
(noise_scale = sqrt(sigma_max^2 + 1)); DDIM/PNDM end at sigma(t=0) instead of 0 (set_alpha_to_one=False,
as in every SD config; 0 when a config sets it) and return a VP latent (latent_scale = alpha there); DPM-Solver/UniPC lay
steps+1 points and drop t=0 and use integer timesteps (karras rounded, exponential truncated), KDPM2
rounds karras timesteps, Euler/Heun/LMS do not; LCM picks its own timesteps from 50 original steps.

Not reproduced: DDIM and PNDM step to t - T // steps but then evaluate the next *listed* timestep;
for "linspace", or "trailing" when steps does not divide T, those differ and the sample is fed at a
noise level it does not have. Here they step to the next listed timestep ("leading", the SD
configs' spacing, and "trailing" with steps dividing T match diffusers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import numpy as np

from sdonnx.errors import InputError
from sdonnx.runtime.manifest import TrainingSchedule

LCM_ORIGINAL_STEPS = 50
LCM_TIMESTEP_SCALING = 10.0
KARRAS_RHO = 7.0
PLAN_MATCH_RTOL = 1e-6


@dataclass(frozen=True, eq=False)
class Plan:
    """One sampling plan: `sigmas` [N+1] (float32, descending) and what goes with them.

    timesteps [N]: the U-Net timestep diffusers feeds at sigmas[:N] (may be fractional or rounded;
    sigmas between plan points, such as DPM2's midpoints, map through `sigma_to_timestep`).
    noise_scale: x_T = unit noise * noise_scale. latent_scale: latent = x_0 * latent_scale.
    timestep_scaling: set for LCM, whose consistency boundary condition the Denoiser applies.
    """

    sampler: str
    sigmas: np.ndarray
    timesteps: np.ndarray
    noise_scale: float
    latent_scale: float = 1.0
    timestep_scaling: float | None = None

    def __post_init__(self) -> None:
        self.sigmas.flags.writeable = False
        self.timesteps.flags.writeable = False

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep_at(self, sigma: float) -> float | None:
        """The timestep diffusers uses at this plan sigma, or None for a sigma off the plan.

        Matching is to 1e-6 relative, so a sigma that equals a plan sigma mathematically (DPM-2
        ancestral's midpoint is the next sigma) gets its timestep whatever the float rounding.
        """
        hit = np.flatnonzero(np.isclose(self.sigmas[:-1], sigma, rtol=PLAN_MATCH_RTOL, atol=0))
        return float(self.timesteps[hit[0]]) if hit.size else None

    def step_at(self, sigma: float) -> int:
        """The step whose interval holds `sigma`: the last i with sigmas[i] >= sigma (to 1e-6 relative)."""
        at_or_above = np.flatnonzero(self.sigmas[:-1] >= sigma * (1 - PLAN_MATCH_RTOL))
        return int(at_or_above[-1]) if at_or_above.size else 0


@lru_cache(maxsize=8)
def training_sigmas(schedule: TrainingSchedule) -> np.ndarray:
    """[num_train_timesteps] float32, ascending in t, computed in float32 as diffusers does.

    A zero-terminal-SNR schedule gets alphas_cumprod[-1] = 2**-24, as diffusers' Euler does, so
    that sigma_max stays finite.
    """
    alphas_cumprod = np.asarray(schedule.alphas_cumprod, dtype=np.float32)
    if alphas_cumprod[-1] == 0:
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = 2.0**-24
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sigmas.flags.writeable = False
    return sigmas


def sigma_to_timestep(schedule: TrainingSchedule, sigma: float | np.ndarray) -> np.ndarray:
    """k-diffusion's DiscreteSchedule.sigma_to_t: linear interpolation of the timestep in log sigma."""
    log_sigmas = np.log(training_sigmas(schedule))
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    low_value, high_value = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((low_value - log_sigma) / (low_value - high_value), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(ladder: np.ndarray, steps: int) -> np.ndarray:
    """Karras et al. 2022 (rho = 7) between the ends of `ladder`."""
    ramp = np.linspace(0, 1, steps)
    max_inv_rho, min_inv_rho = ladder[0] ** (1 / KARRAS_RHO), ladder[-1] ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def exponential_sigmas(ladder: np.ndarray, steps: int) -> np.ndarray:
    """Evenly spaced in log sigma between the ends of `ladder`."""
    return np.exp(np.linspace(math.log(ladder[0]), math.log(ladder[-1]), steps))


def default_sigmas(ladder: np.ndarray, steps: int) -> np.ndarray:
    """The scheduler's own ladder: the training sigmas at its timestep_spacing's timesteps."""
    return ladder


# A schedule kind maps a scheduler's reference ladder (descending sigmas) to `steps` noise levels.
SCHEDULES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "default": default_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
}


def _spaced_timesteps(schedule: TrainingSchedule, steps: int, *, skip_last: bool, integer: bool) -> np.ndarray:
    """diffusers' timestep_spacing (Table 2 of arXiv:2305.08891), descending.

    skip_last: DPM-Solver and UniPC lay steps + 1 points and drop the lowest.
    integer: round linspace points (DDIM family); the Euler family keeps them fractional.
    """
    total, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
    if spacing == "trailing":
        return np.arange(total, 0, -total / steps).round() - 1
    points = steps + 1 if skip_last else steps
    if spacing == "linspace":
        timesteps = np.linspace(0, total - 1, points, dtype=np.float64 if integer else np.float32)
        timesteps = timesteps.round() if integer else timesteps
    else:
        timesteps = (np.arange(points) * (total // points)).round() + schedule.steps_offset
    timesteps = timesteps[::-1].astype(np.float64)
    return timesteps[:-1] if skip_last else timesteps


def _at(schedule: TrainingSchedule, timesteps: np.ndarray) -> np.ndarray:
    train = training_sigmas(schedule)
    return np.interp(timesteps, np.arange(len(train)), train)


def _vp_unit_noise(sigmas: np.ndarray) -> float:
    """Unit-variance noise in VP space is noise * sqrt(sigma_max^2 + 1) in k-space."""
    return math.sqrt(float(sigmas[0]) ** 2 + 1)


def discrete_plan(
    schedule: TrainingSchedule, steps: int, kind: str, sampler: str, *, round_karras: bool = False
) -> Plan:
    """Euler, Euler ancestral, Heun, LMS, DPM2 (ancestral), DPM++ SDE: *DiscreteScheduler conventions."""
    timesteps = _spaced_timesteps(schedule, steps, skip_last=False, integer=False)
    sigmas = SCHEDULES[kind](_at(schedule, timesteps), steps)
    if kind != "default":
        timesteps = sigma_to_timestep(schedule, sigmas)
        if round_karras and kind == "karras":
            timesteps = timesteps.round()
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    sigma_max = float(sigmas.max())
    noise_scale = _vp_unit_noise(sigmas) if schedule.timestep_spacing == "leading" else sigma_max
    return Plan(sampler, sigmas, timesteps.astype(np.float32).astype(np.float64), noise_scale)


def multistep_plan(schedule: TrainingSchedule, steps: int, kind: str, sampler: str) -> Plan:
    """DPM-Solver++ (2M, 2M SDE) and UniPC: steps + 1 grid, int64 timesteps, VP unit noise, final sigma 0."""
    if kind == "default":
        timesteps = _spaced_timesteps(schedule, steps, skip_last=True, integer=True)
        sigmas = _at(schedule, timesteps)
    else:
        sigmas = SCHEDULES[kind](training_sigmas(schedule)[::-1].astype(np.float64), steps)
        timesteps = sigma_to_timestep(schedule, sigmas)
        timesteps = timesteps.round() if kind == "karras" else np.trunc(timesteps)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    return Plan(sampler, sigmas, timesteps, _vp_unit_noise(sigmas))


def alpha_plan(
    schedule: TrainingSchedule, steps: int, kind: str, sampler: str, *, final_alpha_one: bool | None = None
) -> Plan:
    """DDIM and PNDM (final alpha = alphas_cumprod[0], or 1 when the config sets set_alpha_to_one) and
    DDPM (final alpha = 1), all VP-native. final_alpha_one None: the schedule's set_alpha_to_one."""
    timesteps = _spaced_timesteps(schedule, steps, skip_last=False, integer=True)
    one = schedule.set_alpha_to_one if final_alpha_one is None else final_alpha_one
    final = 0.0 if one else training_sigmas(schedule)[0]
    sigmas = np.append(_at(schedule, timesteps), final).astype(np.float32)
    alpha_final = 1 / math.sqrt(float(sigmas[-1]) ** 2 + 1)
    return Plan(sampler, sigmas, timesteps, _vp_unit_noise(sigmas), latent_scale=alpha_final)


def lcm_plan(schedule: TrainingSchedule, steps: int, kind: str, sampler: str) -> Plan:
    """LCMScheduler: `steps` of the 50 original LCM timesteps, evenly by index; ignores timestep_spacing."""
    stride = schedule.num_train_timesteps // LCM_ORIGINAL_STEPS
    origin = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * stride - 1)[::-1]
    picks = np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, num=steps, endpoint=False)).astype(np.int64)
    timesteps = origin[picks].astype(np.float64)
    sigmas = np.append(_at(schedule, timesteps), 0.0).astype(np.float32)
    return Plan(sampler, sigmas, timesteps, _vp_unit_noise(sigmas), timestep_scaling=LCM_TIMESTEP_SCALING)


def split_plan(plan: Plan, schedule: TrainingSchedule, switch: float) -> tuple[Plan, Plan]:
    """`plan` cut where diffusers' denoising_end / denoising_start = `switch` cut it (the base and
    refiner "ensemble of experts"): the head runs the steps whose timestep is at or above
    round(T * (1 - switch)) and ends at the sigma where the tail starts; its latent_scale is 1, so it
    returns x in k-space, what the tail starts from. Multistep samplers restart their history in the
    tail, as after strength_tail; diffusers' second-order schedulers shift an even cut by one.
    """
    cutoff = int(round(schedule.num_train_timesteps * (1 - switch)))
    k = int((plan.timesteps >= cutoff).sum())
    if not 0 < k < plan.steps:
        raise InputError("refiner_switch", switch, f"a fraction that leaves steps to both models (it gives the base {k} "
                         f"of {plan.steps})")
    head = replace(plan, sigmas=plan.sigmas[: k + 1], timesteps=plan.timesteps[:k], latent_scale=1.0)
    return head, replace(plan, sigmas=plan.sigmas[k:], timesteps=plan.timesteps[k:])


def strength_tail(plan: Plan, strength: float) -> Plan:
    """The last int(steps * strength) steps of `plan`, cut where diffusers' img2img and inpainting
    pipelines cut their scheduler's timesteps (get_timesteps, then set_begin_index).

    The tail starts at sigmas[0] = the noise level the init image is noised to; noise_scale and
    latent_scale carry over unchanged. The sampler runs it as a fresh plan: diffusers' LMS and PNDM
    instead carry state over the cut (LMS's order, PNDM's repeated timestep), which is not reproduced.
    GenerationConfig makes sure at least one step is left.
    """
    steps = min(int(plan.steps * strength), plan.steps)
    start = plan.steps - steps
    return replace(plan, sigmas=plan.sigmas[start:], timesteps=plan.timesteps[start:])
