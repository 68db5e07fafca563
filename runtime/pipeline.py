"""Text to image: prompt -> tokens -> embeddings -> noise -> sampler loop -> VAE decode -> images.

img2img and inpainting share that flow and change where it starts (`Pipeline._start`): the init
image is VAE-encoded and noised to the sigma that `strength` selects, and the sampler runs the
rest of the plan (`schedules.strength_tail`), as diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline do. Inpainting feeds a 9-channel U-Net the mask and the masked
image's latents (`Denoiser.extra_channels`) and keeps the init image outside the mask for a
4-channel one (`KeepUnmasked`).

`Pipeline.load(folder)` opens the graphs once; each call validates a `GenerationConfig` before any
work and runs the steps below in order, each a small function with its shapes in the docstring.
Image k of a batch draws its noise from seed + k (`noise.noise_source`), so it can be made again
alone; that seed (the first one chosen at random when none is given) is recorded on the image as
`image.info["seed"]`, with the image's position in the batch as `image.info["batch_index"]`.

A progress `callback(step, sigma, latents)` runs after every sampler step; returning `False` (not
just a falsy value) stops the run by raising `GenerationCancelled` from inside the sampler loop.
"""

from __future__ import annotations

import ctypes
import gc
import math
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdonnx.errors import InputError, ModelError, SdonnxError
from sdonnx.models import EMBEDDED_MODEL
from sdonnx.runtime.denoiser import Denoise, Denoiser, KeepUnmasked, check_guidance_interval
from sdonnx.runtime.images import (
    DECODE_TILE, check_finite, decode, default_size, encode, image_pixels, mask_pixels, open_image,
)
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.noise import KINDS as RNGS
from sdonnx.runtime.noise import NoiseSource, noise_source
from sdonnx.runtime.prompts import CLIP_SKIP_OUTPUT, apply_weights, tokenize_prompt
from sdonnx.runtime.providers import RuntimeOptions
from sdonnx.runtime.samplers import SAMPLERS, run_plan
from sdonnx.runtime.schedules import SCHEDULES, Sigmas, make_sigmas, strength_tail
from sdonnx.runtime.session import Session
from sdonnx.runtime.tokenizer import ClipTokenizer

MAX_STEPS = 1000
MAX_SEED = 2**64 - 1  # what torch.manual_seed accepts, so seeds carry over to a torch generator
IMG2IMG_STRENGTH = 0.8  # diffusers' default: keeps the composition, redraws the detail
SIZE_MULTIPLE = 8  # the SD VAE's downsample factor; the pipeline re-checks against the model's own

StepCallback = Callable[[int, float, np.ndarray], "bool | None"]
ImageInput = Image.Image | Path | str  # a PIL image or the path of an image file


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
    guidance_interval: tuple[float, float] | None = None  # (low, high) sigmas where CFG applies; None: all steps
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
        if self.guidance_interval is not None:
            check_guidance_interval(self.guidance_interval)
            object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
        if not _is_real(self.strength) or not 0.0 <= self.strength <= 1.0:
            raise InputError("strength", self.strength, "a number in [0, 1]")
        _check_int("clip_skip", self.clip_skip, 1, 12)
        if self.rng not in RNGS:
            raise InputError("rng", self.rng, f"one of {list(RNGS)}")
        if self.sampler not in SAMPLERS:
            raise InputError("sampler", self.sampler, f"one of {sorted(SAMPLERS)}")
        if self.schedule not in SCHEDULES:
            raise InputError("schedule", self.schedule, f"one of {sorted(SCHEDULES)}")


@dataclass(frozen=True)
class InitImage:
    """img2img / inpainting input at the generation size: pixels float32 [1, 3, H, W] in [-1, 1];
    mask float32 [1, 1, H, W] of 0/1 (1 = repaint), None for img2img."""

    pixels: np.ndarray
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class Start:
    """Where the sampler starts: x [B, C, h, w] in k-space, and what inpainting adds to the run.

    extra_channels: for a 9-channel U-Net, mask || masked-image latents [B, 1 + C, h, w].
    keep: for a 4-channel U-Net, the init latents kept outside the mask.
    """

    x: np.ndarray
    extra_channels: np.ndarray | None = None
    keep: KeepUnmasked | None = None


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
    def load(cls, path: Path | str | None = None, provider: str = "auto", *, progress: bool = True,
             **options) -> Pipeline:
        """Open the text encoder, U-Net and VAE decoder of `path`, and its VAE encoder if it has one.

        path None: the embedded model (sdonnx.models.EMBEDDED_MODEL), which needs no download.

        options: RuntimeOptions' other fields (threads, graph_optimization, memory_arena, device_id,
        low_memory, graph_cache).
        """
        if path is None:
            path = EMBEDDED_MODEL
        model = ModelFolder.load(path, RuntimeOptions(provider=provider, **options), optional=("vae_encoder",))
        tokenizer = ClipTokenizer.from_folder(model.tokenizer_dir, model.manifest.tokenizer_max_length)
        return cls(model, tokenizer, progress=progress)

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    @property
    def low_memory(self) -> bool:
        return self.model.options.low_memory

    def _release(self, component: str) -> None:
        """In low-memory mode, close `component`'s session: its step of the pipeline is done."""
        if self.low_memory:
            self.model.sessions.release(component)
            return_freed_memory()

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

    def img2img(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        image: ImageInput,
        strength: float = IMG2IMG_STRENGTH,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        **settings,
    ) -> list[Image.Image]:
        """Repaint `image` (a PIL image or an image file, any mode) after `prompt`.

        strength in [0, 1]: how much of the plan runs; the image is noised to the sigma where the last
        int(steps * strength) steps begin. height/width default to the image's size rounded down to
        a multiple of 8; an image of another size is resized (Lanczos, with a warning).
        latents: the unit noise added to the encoded image [batch, C, height/f, width/f].
        """
        config = GenerationConfig(prompt, negative_prompt or "", strength=strength, **settings)
        return self.generate(config, image=image, latents=latents, callback=callback)

    def inpaint(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        image: ImageInput,
        mask: ImageInput,
        strength: float = 1.0,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        **settings,
    ) -> list[Image.Image]:
        """Repaint the white part of `mask` in `image` after `prompt`; the rest stays the image's.

        mask: any mode, converted to grayscale and binarized at 0.5; it must be the image's size.
        A 9-channel (inpainting) U-Net sees the mask and the masked image; a regular 4-channel one
        gets the image blended back outside the mask at every step. strength 1 starts from pure noise.
        Otherwise as img2img.
        """
        config = GenerationConfig(prompt, negative_prompt or "", strength=strength, **settings)
        return self.generate(config, image=image, mask=mask, latents=latents, callback=callback)

    def generate(
        self,
        config: GenerationConfig,
        *,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """Run `config`: text to image; with `image`, img2img; with `image` and `mask`, inpainting.

        See __call__ for `latents` and `callback`, img2img and inpaint for `image` and `mask`.
        """
        m, sessions = self.manifest, self.model.sessions
        self._check_mode(image, mask)
        opened = open_image(image, "image") if image is not None else None
        default = default_size(opened, m.vae_downsample) if opened else (m.default_image_size,) * 2
        height, width = config.height or default[0], config.width or default[1]
        check_size("height", height, m.vae_downsample)
        check_size("width", width, m.vae_downsample)
        init = read_init(opened, mask, height, width) if opened else None
        plan = make_sigmas(m.schedule, config.steps, sampler=config.sampler, kind=config.schedule)
        if init is not None:
            plan = strength_tail(plan, config.strength)
        seed = config.seed if config.seed is not None else secrets.randbelow(2**32)  # short enough to retype
        rng = noise_source(seed, config.rng, config.batch)  # image k: seed + k
        shape = (config.batch, m.latent_channels, height // m.vae_downsample, width // m.vae_downsample)
        cond, uncond = self._embeddings(config)  # first: a prompt over the length limit fails before any image work
        self._release("text_encoder")
        start = self._start(init, config.strength, shape, plan, rng, latents)
        latent = self._denoise(start, cond, uncond, plan, config, rng, callback)
        self._release("unet")
        images = decode(sessions["vae_decoder"], latent, m, tile=DECODE_TILE if self.low_memory else None)
        self._release("vae_decoder")
        for index, image in enumerate(images):
            image.info.update(seed=seed + index, batch_index=index)
        return images

    def _embeddings(self, config: GenerationConfig) -> tuple[np.ndarray, np.ndarray | None]:
        """cond [B, k*77, D] and uncond (None when guidance <= 1: the unconditional half never runs)."""
        text_encoder = self.model.sessions["text_encoder"]
        dtype = self.manifest.graphs["unet"].input("encoder_hidden_states").dtype
        guided = config.guidance > 1
        cond = encode_prompt(
            text_encoder, self.tokenizer, config.prompt, config.batch, dtype,
            clip_skip=config.clip_skip, pad_to=config.negative_prompt if guided else None,
        )
        if not guided:
            return cond, None
        uncond = encode_prompt(
            text_encoder, self.tokenizer, config.negative_prompt, config.batch, dtype,
            clip_skip=config.clip_skip, pad_to=config.prompt, field="negative_prompt",
        )
        return cond, uncond

    def _check_mode(self, image: ImageInput | None, mask: ImageInput | None) -> None:
        """The request must suit the U-Net: a 9-channel (inpainting) U-Net only inpaints."""
        if mask is not None and image is None:
            raise InputError("image", None, "an init image to go with the mask")
        if self._inpainting_unet and mask is None:
            raise InputError(
                "mask", None, "an init image and a mask: this is an inpainting model (its U-Net takes "
                f"{self.manifest.unet_in_channels} input channels); use Pipeline.inpaint, or --init-image with --mask"
            )

    @property
    def _inpainting_unet(self) -> bool:
        """True for a U-Net that takes latents || mask || masked-image latents, False for a plain one."""
        m = self.manifest
        if m.unet_in_channels not in (m.latent_channels, 2 * m.latent_channels + 1):
            raise ModelError(
                f"{self.model.root}: the U-Net takes {m.unet_in_channels} input channels, expected "
                f"{m.latent_channels} (latents) or {2 * m.latent_channels + 1} (inpainting)"
            )
        return m.unet_in_channels != m.latent_channels

    def _start(
        self,
        init: InitImage | None,
        strength: float,
        shape: tuple[int, ...],
        plan: Sigmas,
        rng: NoiseSource,
        latents: np.ndarray | None,
    ) -> Start:
        """Starting x [B, C, h, w] (`shape`, k-space) and the inpainting inputs.

        Draws from `rng` in diffusers' order: the init image's encoder sample (when it is used),
        the unit noise (or the caller's `latents`), the masked image's encoder sample (inpainting).
        img2img always starts from the image noised to plan.sigmas[0]; inpainting at strength 1
        from pure noise, as diffusers' pipelines do.
        """
        if init is None:
            return Start(initial_noise(shape, rng, latents) * plan.noise_scale)
        batch, inpainting_unet = shape[0], self._inpainting_unet
        image_latents = None
        if init.mask is None or not inpainting_unet or strength < 1:
            image_latents = self._encode(init.pixels, rng, batch)
        noise = initial_noise(shape, rng, latents)
        if init.mask is not None and strength == 1:
            x = noise * plan.noise_scale
        else:
            x = image_latents + float(plan.sigmas[0]) * noise
        if init.mask is None:
            return Start(x)
        factor = self.manifest.vae_downsample
        mask = np.repeat(init.mask[:, :, ::factor, ::factor], batch, axis=0)  # torch's "nearest" interpolate
        if inpainting_unet:
            masked_latents = self._encode(init.pixels * (1 - init.mask), rng, batch)
            return Start(x, extra_channels=np.concatenate([mask, masked_latents], axis=1))
        # diffusers samples the masked image's latents for a 4-channel U-Net too, which ignores them:
        # the draw is made (and not used) so that the samplers' later draws stay in step with its.
        rng.standard_normal(shape)
        return Start(x, keep=KeepUnmasked(image_latents, noise, mask, plan.sigmas))

    def _encode(self, pixels: np.ndarray, rng: NoiseSource, batch: int) -> np.ndarray:
        """pixels [1, 3, H, W] -> latents [batch, C, H/f, W/f], one encoder sample per image."""
        encoder = self.model.sessions.get("vae_encoder")
        if encoder is None:
            raise ModelError(
                f"{self.model.root}: no vae_encoder graph, which img2img and inpainting need "
                "(`sdonnx export` writes one)"
            )
        latents = encode(encoder, pixels, self.manifest, rng, batch)
        self._release("vae_encoder")
        return latents

    def _denoise(
        self,
        start: Start,
        cond: np.ndarray,
        uncond: np.ndarray | None,
        plan: Sigmas,
        config: GenerationConfig,
        rng: NoiseSource,
        callback: StepCallback | None,
    ) -> np.ndarray:
        """The sampler loop from start.x [B, C, h, w] to the final latent [B, C, h, w].

        Everything that holds the U-Net session lives in here, so low-memory mode can release it
        as soon as this returns.
        """
        denoise = self._denoiser(cond, uncond, plan, config, start.extra_channels)
        if start.keep is not None:
            denoise = start.keep.wrap(denoise)
        latent = self._sample(denoise, plan, start.x, rng, callback)
        if start.keep is not None:
            latent = start.keep.final(latent)
        check_finite(latent, self.model.sessions["unet"], "out_sample")
        return latent

    def _denoiser(
        self,
        cond: np.ndarray,
        uncond: np.ndarray,
        plan: Sigmas,
        config: GenerationConfig,
        extra_channels: np.ndarray | None,
    ) -> Denoiser:
        unet = self.model.sessions["unet"]
        # Low memory: one image of the batch (CFG's uncond || cond included) per run, which halves
        # the activations at least. A timestep of rank 1 is sliced with the batch; a scalar is shared.
        slices = 1 if self.low_memory and not isinstance(unet.input("sample").shape[0], int) else None

        def run_unet(sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
            size = slices or len(sample)
            outputs = [
                unet.run(
                    sample=sample[i : i + size],
                    timestep=timestep[i : i + size] if timestep.ndim else timestep,
                    encoder_hidden_states=encoder_hidden_states[i : i + size],
                )["out_sample"]
                for i in range(0, len(sample), size)
            ]
            return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

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
            extra_channels=extra_channels,
            guidance_interval=config.guidance_interval,
        )

    def _sample(
        self,
        denoise: Denoise,
        plan: Sigmas,
        x: np.ndarray,
        rng: NoiseSource,
        callback: StepCallback | None,
    ) -> np.ndarray:
        """Starting x float32 [B, C, h, w] (k-space) -> the denoised latent [B, C, h, w] (before
        1/scaling_factor), x_0 * plan.latent_scale (`samplers.run_plan`)."""
        with tqdm(total=plan.steps, disable=not self.progress, unit="step", leave=False) as bar:

            def on_step(info: dict) -> None:
                bar.update(1)
                if callback is not None and callback(info["i"], info["sigma"], info["x"]) is False:
                    raise GenerationCancelled(f"cancelled by the step callback at step {info['i'] + 1} of {plan.steps}")

            return run_plan(plan, denoise, x, rng=rng, callback=on_step)


def return_freed_memory() -> None:
    """Hand memory freed by a closed session back to the OS: glibc keeps freed heap pages for reuse,
    so without malloc_trim the process's resident size never falls to the next step's needs."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass


def encode_prompt(
    text_encoder: Session,
    tokenizer: ClipTokenizer,
    prompt: str,
    batch: int,
    dtype: str,
    *,
    clip_skip: int = 1,
    pad_to: str | None = None,
    field: str = "prompt",
) -> np.ndarray:
    """prompt -> embeddings [batch, k * L, D] in `dtype`, read-only (identical for every step).

    The prompt's k chunks of L = tokenizer.max_length tokens (prompts.py: long prompts, attention
    weights, BREAK) are encoded once and the result repeated `batch` times. pad_to: the other prompt
    of the classifier-free-guidance pair; empty chunks are appended until this one has at least as
    many chunks, since the U-Net runs both halves in one batch. clip_skip: A1111's convention, 1 = the
    last layer; n > 1 reads the graph's `clip_skip_n` output (final_layer_norm(hidden_states[-n])).
    field: the GenerationConfig field `prompt` comes from, named in errors (pad_to's errors name the other).
    """
    chunks = tokenize_prompt(tokenizer, prompt, field=field)
    if pad_to is not None:
        other = "negative_prompt" if field == "prompt" else "prompt"
        chunks = chunks.padded(len(tokenize_prompt(tokenizer, pad_to, field=other)), tokenizer)
    output = "last_hidden_state" if clip_skip == 1 else CLIP_SKIP_OUTPUT.format(clip_skip)
    if output not in text_encoder.output_names:
        raise ModelError(
            f"{text_encoder.path}: clip_skip={clip_skip} needs the text encoder output {output!r}, which this "
            f"graph lacks (outputs: {text_encoder.output_names}); re-export the model with `sdonnx export`"
        )
    embeddings = apply_weights(_run_in_batches(text_encoder, chunks.ids, output), chunks.weights)
    k, length, width = embeddings.shape
    joined = embeddings.reshape(1, k * length, width)
    embeddings = np.broadcast_to(joined, (batch, k * length, width)).astype(dtype)
    embeddings.flags.writeable = False
    return embeddings


def _run_in_batches(text_encoder: Session, ids: np.ndarray, output: str) -> np.ndarray:
    """input_ids [N, L] -> `output` float32 [N, L, D]: one run, or runs of the graph's batch when that is fixed."""
    spec = text_encoder.input("input_ids")
    size = spec.shape[0] if isinstance(spec.shape[0], int) else len(ids)
    # A fixed batch is filled up with copies of the last chunk, whose outputs are dropped.
    filled = np.pad(ids, ((0, -len(ids) % size), (0, 0)), mode="edge").astype(spec.dtype)
    runs = [text_encoder.run(input_ids=group)[output] for group in np.split(filled, len(filled) // size)]
    return np.concatenate(runs)[: len(ids)].astype(np.float32)


def read_init(image: Image.Image, mask: ImageInput | None, height: int, width: int) -> InitImage:
    """The opened init image and the mask (opened here) at height x width, as diffusers preprocesses them."""
    pixels = image_pixels(image, height, width)
    if mask is None:
        return InitImage(pixels)
    return InitImage(pixels, mask_pixels(open_image(mask, "mask"), image, height, width))


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
