"""The sampler registry: one record per sampler name, and the two calls that use it.

Each `SamplerInfo` says everything sdonnx knows about a sampler: its loop (samplers.py), the rule
that lays its plan as its diffusers scheduler would (schedules.py), its name in A1111 (PNG
parameters, `--sampler "Euler a"`), the schedules its scheduler offers and its step limit. Config
validation, the CLI's help, PNG parameters and the pipeline all read this one table.

    plan = make_plan(manifest.schedule, 30, sampler="dpmpp_2m", kind="karras")
    latent = run_plan(plan, denoise, noise * plan.noise_scale, rng=rng)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from sdonnx.errors import InputError
from sdonnx.runtime import samplers as s
from sdonnx.runtime.manifest import TrainingSchedule
from sdonnx.runtime.noise import NoiseSource
from sdonnx.runtime.schedules import (
    LCM_ORIGINAL_STEPS, SCHEDULES, Plan, alpha_plan, discrete_plan, lcm_plan, multistep_plan,
)

PlanRule = Callable[[TrainingSchedule, int, str, str], Plan]
ALL_SCHEDULES = tuple(SCHEDULES)


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler: `function(denoise, x, sigmas, rng=, callback=)` over the plan `plan` lays.

    schedules: the SCHEDULES kinds its diffusers scheduler offers (DDIM-family schedulers have no
    karras or exponential sigmas). max_steps: a limit of the sampler's own (LCM picks from 50
    original steps), None when only the model's training steps bound it.
    """

    name: str
    function: Callable[..., np.ndarray]
    plan: PlanRule
    a1111_name: str
    schedules: tuple[str, ...] = ALL_SCHEDULES
    max_steps: int | None = None


_DEFAULT_ONLY = ("default",)
_discrete_rounded = partial(discrete_plan, round_karras=True)
_ddim_plan = alpha_plan  # the final alpha as the config's set_alpha_to_one says

# DDIM (eta 0) and DDPM are the Euler and ancestral Euler steps in k-space (see those samplers'
# docstrings); what differs is their plan: integer timesteps, VP initial noise, DDIM's final alpha.
SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo("euler", s.sample_euler, discrete_plan, "Euler"),
        SamplerInfo("euler_ancestral", s.sample_euler_ancestral, discrete_plan, "Euler a"),
        SamplerInfo("heun", s.sample_heun, discrete_plan, "Heun"),
        SamplerInfo("dpm_2", s.sample_dpm_2, _discrete_rounded, "DPM2"),
        SamplerInfo("dpm_2_ancestral", s.sample_dpm_2_ancestral, _discrete_rounded, "DPM2 a"),
        SamplerInfo("lms", s.sample_lms, discrete_plan, "LMS"),
        SamplerInfo("dpmpp_2m", s.sample_dpmpp_2m, multistep_plan, "DPM++ 2M"),
        SamplerInfo("dpmpp_2m_sde", s.sample_dpmpp_2m_sde, multistep_plan, "DPM++ 2M SDE"),
        SamplerInfo("dpmpp_sde", s.sample_dpmpp_sde, discrete_plan, "DPM++ SDE"),
        SamplerInfo("ddim", s.sample_euler, _ddim_plan, "DDIM", _DEFAULT_ONLY),
        SamplerInfo("ddpm", s.sample_euler_ancestral, partial(alpha_plan, final_alpha_one=True), "DDPM",
                    _DEFAULT_ONLY),
        SamplerInfo("pndm", s.sample_pndm, _ddim_plan, "PLMS", _DEFAULT_ONLY),
        SamplerInfo("plms", s.sample_pndm, _ddim_plan, "PLMS", _DEFAULT_ONLY),
        SamplerInfo("unipc", s.sample_unipc, multistep_plan, "UniPC"),
        SamplerInfo("lcm", s.sample_lcm, lcm_plan, "LCM", _DEFAULT_ONLY, LCM_ORIGINAL_STEPS),
    )
}
# A1111 display name -> sampler; "PLMS" reads back as plms (pndm's other name, listed last).
BY_A1111_NAME = {info.a1111_name: info.name for info in SAMPLERS.values()}


def sampler_info(name: object, field: str = "sampler") -> SamplerInfo:
    """The record of `name`, an sdonnx name ("euler_ancestral") or A1111's ("Euler a")."""
    if isinstance(name, str):
        found = SAMPLERS.get(name) or SAMPLERS.get(BY_A1111_NAME.get(name, ""))
        if found is not None:
            return found
    raise InputError(field, name, f"one of {sorted(SAMPLERS)} or A1111's names {sorted(BY_A1111_NAME)}")


def check_schedule(info: SamplerInfo, kind: object, field: str = "schedule") -> None:
    """InputError unless the sampler's scheduler offers sigmas of `kind`."""
    if kind not in SCHEDULES:
        raise InputError(field, kind, f"one of {sorted(SCHEDULES)}")
    if kind not in info.schedules:
        raise InputError(
            field, kind, f"one of {list(info.schedules)} for sampler {info.name!r} (its diffusers scheduler "
            f"has no {kind} sigmas)"
        )


def make_plan(schedule: TrainingSchedule, steps: int, *, sampler: str, kind: str = "default") -> Plan:
    """The plan diffusers' scheduler for `sampler` would follow with `steps` and the `kind` of sigmas.

    steps, sampler and kind come validated from a GenerationConfig; what only the model knows, its
    number of training steps, is checked here.
    """
    if steps > schedule.num_train_timesteps:
        raise InputError("steps", steps, f"at most the model's {schedule.num_train_timesteps} training steps")
    return SAMPLERS[sampler].plan(schedule, int(steps), kind, sampler)


def run_plan(
    plan: Plan,
    denoise: s.Denoise,
    x: np.ndarray,
    *,
    rng: NoiseSource | None = None,
    callback: s.Callback | None = None,
) -> np.ndarray:
    """Starting x [B, C, h, w] in k-space (noise * plan.noise_scale, or an image noised to
    plan.sigmas[0]) -> the latent the VAE decodes: the plan's sampler over its sigmas, then
    x * plan.latent_scale, which is diffusers' final `latents` for the matching scheduler."""
    function = SAMPLERS[plan.sampler].function
    return function(denoise, x, plan.sigmas, rng=rng, callback=callback) * plan.latent_scale
