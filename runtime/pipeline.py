"""Text to image: prompt -> tokens -> embeddings -> noise -> sampler loop -> VAE decode -> images.

`Pipeline.load(folder)` opens the graphs once; each call validates a `GenerationConfig` before any
work and runs the steps below in order, each a small function with its shapes in the docstring.
The seed used (chosen at random when none is given) is recorded on every image as
`image.info["seed"]`, with the image's position in the batch as `image.info["batch_index"]`.

A progress `callback(step, sigma, latents)` runs after every sampler step; returning `False` (not
just a falsy value) stops the run by raising `GenerationCancelled` from inside the sampler loop.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdonnx.errors import InputError, SdonnxError
from sdonnx.runtime.denoiser import Denoiser
from sdonnx.runtime.images import check_finite, decode
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.noise import NoiseSource, noise_source
from sdonnx.runtime.providers import RuntimeOptions
from sdonnx.runtime.samplers import SAMPLERS
from sdonnx.runtime.samplers import sample as run_sampler
from sdonnx.runtime.schedules import SCHEDULES, Sigmas, make_sigmas
from sdonnx.runtime.session import Session
from sdonnx.runtime.tokenizer import ClipTokenizer

MAX_STEPS = 1000
RNGS = ("torch", "numpy")
MAX_SEED = 2**64 - 1  # what torch.manual_seed accepts, so seeds carry over to a torch generator
SIZE_MULTIPLE = 8  # the SD VAE's downsample factor; the pipeline re-checks against the model's own

StepCallback = Callable[[int, float, np.ndarray], "bool | None"]


class GenerationCancelled(SdonnxError):
    """A step callback returned False; no image was produced."""


@dataclass(frozen=True)
class GenerationConfig:
    """One text-to-image request. height/width None: the model's native size."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 7.5
    sampler: str = "euler"
    schedule: str = "default"
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    batch: int = 1
    guidance_rescale: float = 0.0
    strength: float = 1.0  # img2img / inpaint: how far to noise the init image (1.0 = ignore it)
    clip_skip: int = 1  # A1111's convention: 1 = the text encoder's last layer, 2 = the one before
    rng: str = "torch"  # noise generator: "torch" (the same noise as torch.manual_seed on CPU) or "numpy"

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(name, getattr(self, name), "a string")
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("batch", self.batch, 1, None)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_size(name, getattr(self, name), SIZE_MULTIPLE)
        if not _is_real(self.guidance) or not math.isfinite(self.guidance) or self.guidance < 0:
            raise InputError("guidance", self.guidance, "a finite number >= 0 (<= 1 disables classifier-free guidance)")
        if not _is_real(self.guidance_rescale) or not 0.0 <= self.guidance_rescale <= 1.0:
            raise InputError("guidance_rescale", self.guidance_rescale, "a number in [0, 1]")
        if not _is_real(self.strength) or not 0.0 <= self.strength <= 1.0:
            raise InputError("strength", self.strength, "a number in [0, 1]")
        _check_int("clip_skip", self.clip_skip, 1, 12)
        if self.rng not in RNGS:
            raise InputError("rng", self.rng, f"one of {list(RNGS)}")
        if self.sampler not in SAMPLERS:
            raise InputError("sampler", self.sampler, f"one of {sorted(SAMPLERS)}")
        if self.schedule not in SCHEDULES:
            raise InputError("schedule", self.schedule, f"one of {sorted(SCHEDULES)}")


def check_size(name: str, value: object, multiple: int) -> None:
    """InputError unless `value` is a positive multiple of `multiple`."""
    if not _is_int(value) or value <= 0 or value % multiple:
        raise InputError(name, value, f"a positive multiple of {multiple} (the VAE's downsample factor)")


class Pipeline:
    """A loaded model folder, ready to turn prompts into images.

    progress: show a tqdm bar over the sampler steps.
    """

    def __init__(self, model: ModelFolder, tokenizer: ClipTokenizer, *, progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.progress = progress

    @classmethod
    def load(cls, path: Path | str, provider: str = "auto", *, progress: bool = True, **options) -> Pipeline:
        """Open the text encoder, U-Net and VAE decoder of `path`.

        options: RuntimeOptions' other fields (threads, graph_optimization, memory_arena, device_id).
        """
        model = ModelFolder.load(path, RuntimeOptions(provider=provider, **options))
        tokenizer = ClipTokenizer.from_folder(model.tokenizer_dir, model.manifest.tokenizer_max_length)
        return cls(model, tokenizer, progress=progress)

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        **settings,
    ) -> list[Image.Image]:
        """Generate images; `settings` are GenerationConfig's fields (steps, guidance, sampler, ...).

        latents: unit-variance starting noise [batch, C, height/f, width/f], as diffusers' `latents=`;
        when given, the seed only drives the noise of ancestral/SDE samplers.
        """
        config = GenerationConfig(prompt, negative_prompt or "", **settings)
        return self.generate(config, latents=latents, callback=callback)

    def generate(
        self,
        config: GenerationConfig,
        *,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Run `config`; see __call__ for `latents` and `callback`."""
        m, sessions = self.manifest, self.model.sessions
        height, width = config.height or m.default_image_size, config.width or m.default_image_size
        check_size("height", height, m.vae_downsample)
        check_size("width", width, m.vae_downsample)
        plan = make_sigmas(m.schedule, config.steps, sampler=config.sampler, kind=config.schedule)
        seed = config.seed if config.seed is not None else secrets.randbelow(2**32)  # short enough to retype
        rng = noise_source(seed)
        shape = (config.batch, m.latent_channels, height // m.vae_downsample, width // m.vae_downsample)
        noise = initial_noise(shape, rng, latents)

        context_dtype = sessions["unet"].input("encoder_hidden_states").dtype
        cond = encode_prompt(sessions["text_encoder"], self.tokenizer, config.prompt, config.batch, context_dtype)
        uncond = (  # guidance <= 1 never runs the unconditional half
            encode_prompt(sessions["text_encoder"], self.tokenizer, config.negative_prompt, config.batch, context_dtype)
            if config.guidance > 1
            else None
        )
        latent = self._sample(self._denoiser(cond, uncond, plan, config), plan, noise, rng, callback)
        check_finite(latent, sessions["unet"], "out_sample")
        images = decode(sessions["vae_decoder"], latent, m)
        for index, image in enumerate(images):
            image.info.update(seed=seed, batch_index=index)
        return images

    def _denoiser(self, cond: np.ndarray, uncond: np.ndarray, plan: Sigmas, config: GenerationConfig) -> Denoiser:
        unet = self.model.sessions["unet"]

        def run_unet(sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
            return unet.run(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states)["out_sample"]

        return Denoiser(
            run_unet,
            self.manifest.schedule,
            self.manifest.prediction_type,
            unet.input("timestep"),
            cond,
            uncond,
            guidance_scale=config.guidance,
            guidance_rescale=config.guidance_rescale,
            sample_dtype=unet.input("sample").dtype,
            plan=plan,
        )

    def _sample(
        self,
        denoiser: Denoiser,
        plan: Sigmas,
        noise: np.ndarray,
        rng: NoiseSource,
        callback: StepCallback | None,
    ) -> np.ndarray:
        """noise float32 [B, C, h, w] -> the denoised latent [B, C, h, w] (before 1/scaling_factor)."""
        with tqdm(total=plan.steps, disable=not self.progress, unit="step", leave=False) as bar:

            def on_step(info: dict) -> None:
                bar.update(1)
                if callback is not None and callback(info["i"], info["sigma"], info["x"]) is False:
                    raise GenerationCancelled(f"cancelled by the step callback at step {info['i'] + 1} of {plan.steps}")

            return run_sampler(plan, denoiser, noise, rng=rng, callback=on_step)


def encode_prompt(text_encoder: Session, tokenizer: ClipTokenizer, prompt: str, batch: int, dtype: str) -> np.ndarray:
    """prompt -> last_hidden_state [batch, L, D] in `dtype`, read-only (identical for every step).

    The prompt is encoded `batch` times in one run, so a graph exported with a fixed batch works too.
    """
    input_ids = tokenizer([prompt] * batch).astype(text_encoder.input("input_ids").dtype)
    embeddings = text_encoder.run(input_ids=input_ids)["last_hidden_state"].astype(dtype)
    embeddings.flags.writeable = False
    return embeddings


def initial_noise(shape: tuple[int, ...], rng: NoiseSource, latents: np.ndarray | None) -> np.ndarray:
    """Unit-variance noise float32 `shape` [B, C, h, w]: drawn from `rng`, or the caller's `latents`."""
    if latents is None:
        return np.asarray(rng.standard_normal(shape), dtype=np.float32)
    if not isinstance(latents, np.ndarray) or latents.shape != shape:
        got = latents.shape if isinstance(latents, np.ndarray) else type(latents).__name__
        raise InputError("latents", got, f"a numpy array of shape {shape} (batch, channels, height/f, width/f)")
    if not np.isfinite(latents).all():
        raise InputError("latents", "an array with NaN/inf", "finite values")
    return latents.astype(np.float32)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        expected = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise InputError(name, value, expected)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
