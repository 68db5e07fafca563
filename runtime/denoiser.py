"""The one adapter between the U-Net and the samplers: (x, sigma) -> denoised x0.

Only this module knows the prediction type, how sigma maps to the U-Net's timestep (dtype and rank
included), the input scaling and classifier-free guidance. Samplers see k-diffusion space only:
x = x0 + sigma * eps, and the U-Net gets the VP sample x / sqrt(sigma^2 + 1).

Inpainting lives here too, as what the U-Net sees: a 9-channel U-Net gets the mask and the
masked image's latents after the scaled sample (`extra_channels`); for a 4-channel U-Net,
`KeepUnmasked` shows it the init image, noised to the current sigma, outside the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Callable

import numpy as np

from sdonnx.errors import InputError, ModelError

from .manifest import PREDICTION_TYPES, TensorSpec, TrainingSchedule
from .schedules import Sigmas, sigma_to_timestep

UNet = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Denoise = Callable[[np.ndarray, float], np.ndarray]
TIMESTEP_DTYPES = ("float32", "float16", "int64", "int32")
LCM_SIGMA_DATA = 0.5


@dataclass(frozen=True)
class Denoiser:
    """denoise(x [B, C, h, w] float32, sigma) -> x0 [B, C, h, w] float32, with one U-Net call.

    unet(sample, timestep, encoder_hidden_states) -> model output, all NumPy (an ONNX session's run).
    cond / uncond: text embeddings [B, S, D]. guidance_scale <= 1 skips the unconditional half; above
    it the U-Net runs once on the batch uncond || cond. guidance_rescale is diffusers' rescale_noise_cfg.
    plan: the sampling plan, whose exact timesteps (rounded or fractional, as diffusers' scheduler
    chose them) and LCM boundary condition apply; sigmas off the plan map by log-sigma interpolation.
    extra_channels: [B, E, h, w] appended to the scaled sample on the channel axis, for U-Nets that
    take more than the latent (an inpainting U-Net: mask || masked-image latents).
    guidance_interval: (low, high) sigmas; guidance applies only for sigma in [low, high] and outside
    it the U-Net runs the cond half alone, half the work (Kynkäänniemi et al. 2024, "Applying
    guidance in a limited interval improves sample and distribution quality").
    """

    unet: UNet
    schedule: TrainingSchedule
    prediction_type: str
    timestep_spec: TensorSpec
    cond: np.ndarray
    uncond: np.ndarray | None = None
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    sample_dtype: str = "float32"
    plan: Sigmas | None = None
    extra_channels: np.ndarray | None = None
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"prediction_type: got {self.prediction_type!r}, expected one of {list(PREDICTION_TYPES)}")
        spec = self.timestep_spec
        if spec.dtype not in TIMESTEP_DTYPES or spec.rank > 1:
            raise ModelError(
                f"unet input {spec.name!r}: got {spec.dtype} of rank {spec.rank}, "
                f"expected one of {list(TIMESTEP_DTYPES)} of rank 0 or 1"
            )
        if np.ndim(self.cond) != 3:
            raise InputError("cond", f"shape {np.shape(self.cond)}", "text embeddings [batch, tokens, dim]")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise InputError("guidance_scale", self.guidance_scale, "a finite number >= 0")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise InputError("guidance_rescale", self.guidance_rescale, "a number from 0 to 1")
        if self.extra_channels is not None and (
            np.ndim(self.extra_channels) != 4 or len(self.extra_channels) != len(self.cond)
        ):
            raise InputError(
                "extra_channels", f"shape {np.shape(self.extra_channels)}", f"[{len(self.cond)}, channels, h, w]"
            )
        if self.guidance_interval is not None:
            check_guidance_interval(self.guidance_interval)
        if self.guided:
            if self.uncond is None:
                raise InputError("uncond", None, "unconditional embeddings when guidance_scale > 1")
            if np.shape(self.uncond) != np.shape(self.cond):
                raise InputError("uncond", f"shape {np.shape(self.uncond)}", f"the shape of cond {np.shape(self.cond)}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def guided_at(self, sigma: float) -> bool:
        """Whether the step at `sigma` runs the unconditional half too."""
        if not self.guided:
            return False
        return self.guidance_interval is None or self.guidance_interval[0] <= sigma <= self.guidance_interval[1]

    @cached_property
    def _guided_embeddings(self) -> np.ndarray:
        """uncond || cond [2B, S, D], the same every step.

        Read-only, so a session with device IO binding uploads it once rather than every step.
        """
        return _read_only(np.concatenate([self.uncond, self.cond]))

    @cached_property
    def _cond_embeddings(self) -> np.ndarray:
        """cond [B, S, D], read-only as above."""
        return _read_only(np.array(self.cond))

    @cached_property
    def _extra_channels(self) -> np.ndarray:
        """extra_channels in the U-Net's sample dtype, cast once: they are the same every step."""
        return np.asarray(self.extra_channels).astype(self.sample_dtype)

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        batch = x.shape[0]
        if batch != np.shape(self.cond)[0]:
            raise InputError("cond", f"batch {np.shape(self.cond)[0]}", f"batch {batch}, the latents' batch")
        c_in = 1 / math.sqrt(sigma**2 + 1)
        sample = (x * c_in).astype(self.sample_dtype)
        if self.extra_channels is not None:
            sample = np.concatenate([sample, self._extra_channels], axis=1)
        guided = self.guided_at(sigma)
        if guided:
            sample = np.concatenate([sample, sample])
        embeddings = self._guided_embeddings if guided else self._cond_embeddings
        t = self.timestep(sigma)
        out = np.asarray(self.unet(sample, self._timestep_input(t, len(sample)), embeddings), dtype=np.float32)
        if guided:
            out_uncond, out_cond = out[:batch], out[batch:]
            out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
            if self.guidance_rescale > 0:
                out = rescale_noise_cfg(out, out_cond, self.guidance_rescale)
        denoised = self._denoised(x, sigma, out)
        if self.plan is not None and self.plan.timestep_scaling is not None:
            denoised = self._consistency_boundary(denoised, x * c_in, t)
        return denoised

    def timestep(self, sigma: float) -> float:
        exact = self.plan.timestep_at(sigma) if self.plan is not None else None
        return exact if exact is not None else float(sigma_to_timestep(self.schedule, sigma))

    def _timestep_input(self, t: float, batch: int) -> np.ndarray:
        dtype = np.dtype(self.timestep_spec.dtype)
        value = round(t) if dtype.kind == "i" else t
        if self.timestep_spec.rank == 0:
            return np.asarray(value, dtype=dtype)
        size = self.timestep_spec.shape[0]
        return np.full((size if isinstance(size, int) else batch,), value, dtype=dtype)

    def _denoised(self, x: np.ndarray, sigma: float, out: np.ndarray) -> np.ndarray:
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x / (sigma**2 + 1) + out * (-sigma / math.sqrt(sigma**2 + 1))
        return out

    def _consistency_boundary(self, denoised: np.ndarray, sample_vp: np.ndarray, t: float) -> np.ndarray:
        """LCM's c_skip/c_out on the VP sample (LCMScheduler.get_scalings_for_boundary_condition_discrete).

        It lives here rather than in the sampler because it is a function of the timestep, which
        only this adapter knows; for t > 0 it moves x0 by less than 1e-5.
        """
        scaled = t * self.plan.timestep_scaling
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / math.sqrt(scaled**2 + LCM_SIGMA_DATA**2)
        return c_out * denoised + c_skip * sample_vp


@dataclass(frozen=True)
class KeepUnmasked:
    """4-channel inpainting: the init image, noised to the current sigma, outside the mask.

    diffusers' StableDiffusionInpaintPipeline (4-channel U-Net) blends after every scheduler step:
    x = (1 - mask) * (latents + sigma_next * noise) + mask * x, and with the clean latents after the
    last. `wrap` blends the U-Net's input instead, which gives the same image without touching the
    samplers: every sampler combines x, denoised and fresh noise element by element and the mask is
    0 or 1, so where mask = 1 each trajectory is diffusers'; the only thing that mixes pixels is the
    U-Net, which sees the blended x; where mask = 0 the trajectory differs, but `final` replaces it
    with the clean latents. At the plan's first sigma nothing is blended: the first step sees the
    starting x (pure noise at strength 1, as in diffusers). Between plan sigmas (DPM-2's and DPM++
    SDE's midpoints) diffusers blends with the image noised to the next plan sigma, and so does this.
    Step callbacks see the unblended x.

    latents, noise: [B, C, h, w], the clean init latents and the unit noise that started the run;
    mask: [B, 1, h, w] of 0/1, 1 = repaint; sigmas: the plan's, descending.
    """

    latents: np.ndarray
    noise: np.ndarray
    mask: np.ndarray
    sigmas: np.ndarray

    def wrap(self, denoise: Denoise) -> Denoise:
        """denoise(x, sigma) whose U-Net input is blended below the plan's first sigma."""
        return partial(self._denoise, denoise)

    def final(self, latent: np.ndarray) -> np.ndarray:
        """The sampled latent [B, C, h, w] with the clean init latents outside the mask."""
        return self._blend(latent, self.latents)

    def _denoise(self, denoise: Denoise, x: np.ndarray, sigma: float) -> np.ndarray:
        if sigma < self.sigmas[0]:
            level = float(self.sigmas[np.searchsorted(-self.sigmas, -sigma)])  # the plan sigma at or below
            x = self._blend(x, self.latents + level * self.noise)
        return denoise(x, sigma)

    def _blend(self, x: np.ndarray, known: np.ndarray) -> np.ndarray:
        return (1 - self.mask) * known + self.mask * x


def check_guidance_interval(interval: object) -> None:
    """InputError unless `interval` is (low, high) with 0 <= low < high, both finite."""
    ok = (
        isinstance(interval, (tuple, list))
        and len(interval) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in interval)
        and 0 <= interval[0] < interval[1]
    )
    if not ok:
        raise InputError("guidance_interval", interval, "(low, high) sigmas with 0 <= low < high")


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def rescale_noise_cfg(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """Lin et al. 2023, section 3.4: pull the guided output's per-sample std back to the conditional one's."""
    axes = tuple(range(1, guided.ndim))
    std_cond = cond.std(axis=axes, keepdims=True, ddof=1)
    std_guided = guided.std(axis=axes, keepdims=True, ddof=1)
    return phi * (guided * (std_cond / std_guided)) + (1 - phi) * guided
