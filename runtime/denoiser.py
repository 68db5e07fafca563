"""The denoiser, composed as k-diffusion's external.py: a U-Net adapter wrapped by guidance.

Samplers see k-diffusion space only (x = x0 + sigma * eps) and call `denoise(x, sigma) -> x0`.
Two small pieces make that call:

- `UNetModel`, the model adapter, is the only code that runs the U-Net. It knows the prediction
  type, how sigma maps to the U-Net's timestep (the plan's exact timesteps; dtype and rank as the
  graph declares them), the input scaling x / sqrt(sigma^2 + 1), and LCM's boundary condition.
  Everything else the U-Net reads comes in as data, a `Conditioning`: the text embeddings and any
  other named input (SDXL's `text_embeds` and `time_ids` are two more entries), channels
  appended to the sample (an inpainting U-Net's mask and masked-image latents), and ControlNets
  (controlnet.py `ControlHint`), run on the scaled sample at each step their window covers and
  summed into the U-Net's residual inputs.
- `GuidedDenoiser` is classifier-free guidance around it: the uncond || cond batch, the scale,
  guidance rescale, the sigma interval where guidance applies, and at most how many images go
  into one U-Net run (the memory policy's choice).

Feature caching (DeepCache, Ma et al., CVPR 2024): adjacent steps' deep U-Net features barely
change, so with `cache_interval` N the whole U-Net runs on steps 0, N, 2N, ... and returns, besides
its output, the features entering its last up block's last layer (deep_feature); the steps between
run only the shallow graph (export/graphs.py `_UNetShallow`: conv_in, that last layer, the output
convolution) on the last deep_feature. The GuidedDenoiser keeps those features, one per batch part
it runs (CFG pair or cond alone, low memory's halves), for its one sampler run; the adapter runs
whichever graph it is given features for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping

import numpy as np

from sdonnx.config import check_real
from sdonnx.errors import InputError, ModelError
from sdonnx.runtime.controlnet import ControlHint, control_residuals
from sdonnx.runtime.manifest import PREDICTION_TYPES, Manifest, TensorSpec, TrainingSchedule
from sdonnx.runtime.schedules import Plan, sigma_to_timestep
from sdonnx.runtime.session import Session

UNet = Callable[..., np.ndarray]  # unet(sample=, timestep=, encoder_hidden_states=, ...) -> model output
TIMESTEP_DTYPES = ("float32", "float16", "int64", "int32")
LCM_SIGMA_DATA = 0.5
MAX_GUIDANCE = 50.0  # A1111's slider stops at 30; far beyond, the guided output is noise
UNET_OUTPUT = "out_sample"
DEEP_FEATURE = "deep_feature"


@dataclass(frozen=True)
class Conditioning:
    """What the U-Net sees for a batch of B images besides its sample and timestep.

    inputs: U-Net inputs by name, each [B, ...]: encoder_hidden_states [B, S, D] always; families
    with more conditioning add entries (SDXL: text_embeds [B, 1280], time_ids [B, 6]).
    channels: [B, E, h, w] appended to the scaled sample on the channel axis, or None.
    controls: the ControlNets acting on these B images, each with its control image [B, 3, H, W].
    The arrays are the same at every step, so they are made read-only once.
    """

    inputs: Mapping[str, np.ndarray]
    channels: np.ndarray | None = None
    controls: tuple[ControlHint, ...] = ()

    def __post_init__(self) -> None:
        arrays = [*self.inputs.values(), *([] if self.channels is None else [self.channels]),
                  *(hint.image for hint in self.controls)]
        if not arrays or len({len(a) for a in arrays}) != 1:
            shapes = {k: np.shape(v) for k, v in self.inputs.items()}
            raise InputError("conditioning", f"shapes {shapes}, channels {np.shape(self.channels)}", "one batch size")
        if self.channels is not None and np.ndim(self.channels) != 4:
            raise InputError("channels", f"shape {np.shape(self.channels)}", "[batch, channels, h, w]")
        for array in arrays:
            array.flags.writeable = False

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def after(self, first: Conditioning) -> Conditioning:
        """first || self on the batch axis (CFG's uncond || cond)."""
        if set(first.inputs) != set(self.inputs) or (first.channels is None) != (self.channels is None):
            raise InputError("uncond", sorted(first.inputs), f"the inputs of cond, {sorted(self.inputs)}")
        for name, value in first.inputs.items():
            if np.shape(value) != np.shape(self.inputs[name]):
                raise InputError(f"uncond {name}", f"shape {np.shape(value)}", f"cond's {np.shape(self.inputs[name])}")
        if len(first.controls) != len(self.controls):
            raise InputError("uncond controls", len(first.controls), f"cond's {len(self.controls)}")
        channels = None if self.channels is None else np.concatenate([first.channels, self.channels])
        controls = tuple(mine.after(theirs) for mine, theirs in zip(self.controls, first.controls))
        return Conditioning({k: np.concatenate([first.inputs[k], v]) for k, v in self.inputs.items()}, channels,
                            controls)

    def window(self, rows: slice, cols: slice) -> Conditioning:
        """This conditioning for a tile of the latent (tiles.py): its appended channels cropped to it."""
        if self.controls:
            raise InputError("controls", len(self.controls), "none on a tiled U-Net (control images are whole)")
        return Conditioning(self.inputs, None if self.channels is None else self.channels[..., rows, cols])

    def part(self, start: int, stop: int) -> Conditioning:
        """Images start..stop of the batch."""
        channels = None if self.channels is None else self.channels[start:stop]
        return Conditioning({k: v[start:stop] for k, v in self.inputs.items()}, channels,
                            tuple(hint.part(start, stop) for hint in self.controls))


@dataclass(frozen=True)
class UNetModel:
    """The model adapter: x [B, C, h, w] float32 at sigma, with a Conditioning of batch B, -> the
    U-Net's output [B, C, h, w] float32 (`predict`); that output -> x0 (`denoised`).

    unet(**feeds) -> output: the only U-Net call there is. sample_spec / timestep_spec: the graph's
    declared inputs (their dtypes, the timestep's rank, a fixed batch). input_dtypes: the declared
    dtype of each conditioning input, which `cast` converts to (a fp16 graph). plan: the sampling plan,
    whose exact timesteps (rounded or fractional, as diffusers' scheduler chose them) and LCM
    boundary condition apply; sigmas off the plan map by log-sigma interpolation.
    """

    unet: UNet
    schedule: TrainingSchedule
    prediction_type: str
    sample_spec: TensorSpec
    timestep_spec: TensorSpec
    plan: Plan | None = None
    input_dtypes: Mapping[str, str] = field(default_factory=dict)
    # Feature caching: the whole U-Net with its deep_feature, (**feeds) -> (output, deep_feature), and the
    # shallow graph, (**feeds, deep_feature=) -> output, with its declared input dtypes; None without.
    features: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None
    shallow: UNet | None = None
    shallow_inputs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"prediction_type: got {self.prediction_type!r}, expected one of {list(PREDICTION_TYPES)}")
        spec = self.timestep_spec
        if spec.dtype not in TIMESTEP_DTYPES or spec.rank > 1:
            raise ModelError(
                f"unet input {spec.name!r}: got {spec.dtype} of rank {spec.rank}, "
                f"expected one of {list(TIMESTEP_DTYPES)} of rank 0 or 1"
            )

    @classmethod
    def for_session(cls, unet: Session, manifest: Manifest, plan: Plan, shallow: Session | None = None) -> UNetModel:
        """The adapter of a loaded U-Net session under `manifest`'s facts; with the shallow graph's
        session, able to cache features (the U-Net must then output deep_feature)."""

        def run(**feeds: np.ndarray) -> np.ndarray:
            return unet.run(**feeds)[UNET_OUTPUT]

        def with_features(**feeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            outputs = unet.run(**feeds)
            return outputs[UNET_OUTPUT], outputs[DEEP_FEATURE]

        dtypes = {spec.name: spec.dtype for spec in (*unet.inputs, *unet.optional)}
        cached = {}
        if shallow is not None:
            if unet.output(DEEP_FEATURE) is None:
                raise ModelError(f"{unet.path}: the U-Net has no {DEEP_FEATURE!r} output, which feature caching needs "
                                 "(re-export the model with `sdonnx export`)")
            cached = dict(features=with_features, shallow=lambda **feeds: shallow.run(**feeds)[UNET_OUTPUT],
                          shallow_inputs={spec.name: spec.dtype for spec in shallow.inputs})
        return cls(
            run, manifest.schedule, manifest.prediction_type, unet.input("sample"), unet.input("timestep"), plan, dtypes,
            **cached,
        )

    @property
    def fixed_batch(self) -> bool:
        """True for a graph exported with a fixed batch, whose runs cannot be split."""
        return isinstance(self.sample_spec.shape[0], int)

    def cast(self, cond: Conditioning) -> Conditioning:
        """`cond` with each input in the dtype the graph declares for it (done once, not per step);
        ControlNets cast what they take of them to their own graph's dtypes."""
        inputs = {k: v.astype(self.input_dtypes.get(k, v.dtype), copy=False) for k, v in cond.inputs.items()}
        return Conditioning(inputs, cond.channels, cond.controls)

    def predict(self, x: np.ndarray, sigma: float, cond: Conditioning) -> np.ndarray:
        """One U-Net run on x [B, C, h, w] at sigma -> its raw output [B, C, h, w] float32.

        The ControlNets acting at this step see the scaled sample without the appended channels
        (an inpainting U-Net's), as diffusers' ControlNet pipelines feed them.
        """
        return np.asarray(self.unet(**self._feeds(x, sigma, cond)), dtype=np.float32)

    def predict_cached(self, x: np.ndarray, sigma: float, cond: Conditioning, feature: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """`predict` under feature caching -> (output float32, deep_feature): with `feature` (an earlier
        step's deep_feature for this batch part) the shallow graph alone, which gives it back; without,
        the whole U-Net, whose deep_feature this step makes."""
        if self.features is None or self.shallow is None:
            raise ModelError("feature caching: this U-Net adapter was made without the shallow graph")
        feeds = self._feeds(x, sigma, cond)
        if feature is None:
            out, feature = self.features(**feeds)
        else:
            wanted = self.shallow_inputs
            feeds = {k: v.astype(wanted[k], copy=False) for k, v in feeds.items() if k in wanted}
            out = self.shallow(**feeds, deep_feature=feature.astype(wanted[DEEP_FEATURE], copy=False))
        return np.asarray(out, dtype=np.float32), feature

    def _feeds(self, x: np.ndarray, sigma: float, cond: Conditioning) -> dict[str, np.ndarray]:
        """The U-Net's inputs for x [B, C, h, w] at sigma under `cond`."""
        scaled = x * (1 / math.sqrt(sigma**2 + 1))
        sample = scaled.astype(self.sample_spec.dtype, copy=False)
        if cond.channels is not None:
            sample = np.concatenate([sample, cond.channels.astype(self.sample_spec.dtype, copy=False)], axis=1)
        t = self.timestep(sigma)
        timestep = timestep_input(self.timestep_spec, t, len(sample))
        feeds = dict(cond.inputs)
        if cond.controls:
            residuals = control_residuals(cond.controls, scaled, t, cond.inputs, self.step(sigma), self._steps)
            feeds |= {k: v.astype(self.input_dtypes.get(k, v.dtype), copy=False) for k, v in residuals.items()}
        return {"sample": sample, "timestep": timestep, **feeds}

    def step(self, sigma: float) -> int:
        """The plan's step whose interval holds `sigma` (0 without a plan)."""
        return self.plan.step_at(sigma) if self.plan is not None else 0

    @property
    def _steps(self) -> int:
        return self.plan.steps if self.plan is not None else 1

    def denoised(self, x: np.ndarray, sigma: float, out: np.ndarray) -> np.ndarray:
        """x0 from x at sigma and the U-Net's (guided) output for it."""
        if self.prediction_type == "epsilon":
            denoised = x - sigma * out
        elif self.prediction_type == "v_prediction":
            denoised = x / (sigma**2 + 1) + out * (-sigma / math.sqrt(sigma**2 + 1))
        else:
            denoised = out
        if self.plan is not None and self.plan.timestep_scaling is not None:
            denoised = self._consistency_boundary(denoised, x * (1 / math.sqrt(sigma**2 + 1)), self.timestep(sigma))
        return denoised

    def timestep(self, sigma: float) -> float:
        exact = self.plan.timestep_at(sigma) if self.plan is not None else None
        return exact if exact is not None else float(sigma_to_timestep(self.schedule, sigma))

    def _consistency_boundary(self, denoised: np.ndarray, sample_vp: np.ndarray, t: float) -> np.ndarray:
        """LCM's c_skip/c_out on the VP sample (LCMScheduler.get_scalings_for_boundary_condition_discrete).

        It lives here rather than in the sampler because it is a function of the timestep, which
        only this adapter knows; for t > 0 it moves x0 by less than 1e-5.
        """
        scaled = t * self.plan.timestep_scaling
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / math.sqrt(scaled**2 + LCM_SIGMA_DATA**2)
        return c_out * denoised + c_skip * sample_vp


def timestep_input(spec: TensorSpec, t: float, batch: int) -> np.ndarray:
    """The timestep array a graph declaring `spec` takes: a scalar, or [batch] (or its fixed size);
    rounded for integer timesteps."""
    dtype = np.dtype(spec.dtype)
    value = round(t) if dtype.kind == "i" else t
    if spec.rank == 0:
        return np.asarray(value, dtype=dtype)
    size = spec.shape[0]
    return np.full((size if isinstance(size, int) else batch,), value, dtype=dtype)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance. scale <= 1 turns it off (the unconditional half never runs).
    rescale: diffusers' guidance_rescale (Lin et al. 2023). interval: (low, high) sigmas; guidance
    applies only for sigma in [low, high], and outside it the U-Net runs the cond half alone, half
    the work (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample
    and distribution quality"); None: every step.
    """

    scale: float = 1.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_real("guidance", self.scale, 0, MAX_GUIDANCE, what=" (<= 1 turns classifier-free guidance off)")
        check_real("guidance_rescale", self.rescale, 0, 1)
        if self.interval is not None:
            check_guidance_interval(self.interval)

    @property
    def enabled(self) -> bool:
        return self.scale > 1.0

    def applies_at(self, sigma: float) -> bool:
        """Whether the step at `sigma` runs the unconditional half too."""
        return self.enabled and (self.interval is None or self.interval[0] <= sigma <= self.interval[1])

    def combine(self, out_uncond: np.ndarray, out_cond: np.ndarray) -> np.ndarray:
        out = out_uncond + self.scale * (out_cond - out_uncond)
        return rescale_noise_cfg(out, out_cond, self.rescale) if self.rescale > 0 else out


@dataclass(frozen=True)
class GuidedDenoiser:
    """denoise(x [B, C, h, w] float32, sigma) -> x0 [B, C, h, w] float32: `model` under guidance.

    cond / uncond: Conditionings of batch B (uncond may be None when guidance is off). Guided steps
    run the U-Net on uncond || cond. max_batch: at most this many images per U-Net run (the memory
    policy's unet_max_batch); None, or a graph with a fixed batch, runs the whole batch at once.
    cache_interval: feature caching (module docstring); > 1 needs a model made with the shallow graph.
    One instance serves one sampler run: it holds that run's cached features.
    """

    model: UNetModel
    cond: Conditioning
    uncond: Conditioning | None = None
    guidance: Guidance = field(default_factory=Guidance)
    max_batch: int | None = None
    cache_interval: int = 1
    # (guided, part) -> the deep_feature of the last whole U-Net run on that batch part
    _features: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.cache_interval > 1 and self.model.shallow is None:
            raise InputError("cache_interval", self.cache_interval, "1, or a U-Net adapter with the shallow graph")
        if self.guidance.enabled:
            if self.uncond is None:
                raise InputError("uncond", None, "unconditional inputs when guidance > 1")
            self._pair  # checks that uncond and cond match, once

    @cached_property
    def _cond(self) -> Conditioning:
        return self.model.cast(self.cond)

    @cached_property
    def _pair(self) -> Conditioning:
        """uncond || cond, the same every step."""
        return self.model.cast(self.cond.after(self.uncond))

    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        batch = len(x)
        if batch != len(self.cond):
            raise InputError("cond", f"batch {len(self.cond)}", f"batch {batch}, the latents' batch")
        if self.guidance.applies_at(sigma):
            out = self._predict(np.concatenate([x, x]), sigma, self._pair, guided=True)
            out = self.guidance.combine(out[:batch], out[batch:])
        else:
            out = self._predict(x, sigma, self._cond, guided=False)
        return self.model.denoised(x, sigma, out)

    def _predict(self, x: np.ndarray, sigma: float, cond: Conditioning, *, guided: bool) -> np.ndarray:
        size = len(x) if self.max_batch is None or self.model.fixed_batch else self.max_batch
        if size >= len(x):  # one run: no slicing of the conditioning on the per-step path
            return self._run(x, sigma, cond, (guided, 0))
        outputs = [self._run(x[i : i + size], sigma, cond.part(i, i + size), (guided, i)) for i in range(0, len(x), size)]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _run(self, x: np.ndarray, sigma: float, cond: Conditioning, part: tuple[bool, int]) -> np.ndarray:
        """One U-Net run on a batch part; under feature caching, the whole U-Net on every
        cache_interval-th step (and whenever this part has no features yet), the shallow graph between."""
        if self.cache_interval == 1:
            return self.model.predict(x, sigma, cond)
        whole = self.model.step(sigma) % self.cache_interval == 0
        out, self._features[part] = self.model.predict_cached(x, sigma, cond, None if whole else self._features.get(part))
        return out


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


def rescale_noise_cfg(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """Lin et al. 2023, section 3.4: pull the guided output's per-sample std back to the conditional one's."""
    axes = tuple(range(1, guided.ndim))
    std_cond = cond.std(axis=axes, keepdims=True, ddof=1)
    std_guided = guided.std(axis=axes, keepdims=True, ddof=1)
    return phi * (guided * (std_cond / std_guided)) + (1 - phi) * guided
