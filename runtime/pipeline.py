"""Text to image: prompt -> tokens -> embeddings -> start latents -> sampler loop -> VAE decode -> images.

`Pipeline.load(folder)` opens the graphs once; `generate` validates a `GenerationConfig` and the
request against the model before any work, then runs the steps below in order, each a small
function with its shapes in the docstring. img2img and inpainting change only where sampling starts
(starts.py); the U-Net is run by the denoiser (denoiser.py) and nothing else; each graph is taken
for its step with `sessions.use`, which applies the memory policy (memory.py).

Image k of a batch draws its noise from seed + k (`noise.noise_source`), so it can be made again
alone; that seed (the first one chosen at random when none is given) is recorded on the image as
`image.info["seed"]`, with the image's position in the batch as `image.info["batch_index"]`.

A progress `callback(step, sigma, latents)` runs after every sampler step; returning `False` (not
just a falsy value) stops the run by raising `GenerationCancelled` from inside the sampler loop.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdonnx.config import check_choice, check_int
from sdonnx.errors import InputError, ModelError, SdonnxError
from sdonnx.models import EMBEDDED_MODEL
from sdonnx.runtime.denoiser import Guidance, GuidedDenoiser, UNetModel, text_conditioning
from sdonnx.runtime.images import check_finite, decode, encode
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.noise import KINDS as RNGS
from sdonnx.runtime.noise import NoiseSource, noise_source
from sdonnx.runtime.prompts import CLIP_SKIP_OUTPUT, apply_weights, tokenize_prompt
from sdonnx.runtime.providers import RuntimeOptions
from sdonnx.runtime.request import Request, check_request, check_size, check_strength
from sdonnx.runtime.sampling import check_schedule, make_plan, run_plan, sampler_info
from sdonnx.runtime.schedules import Plan, strength_tail
from sdonnx.runtime.session import Session
from sdonnx.runtime.starts import ImageInput, Start, read_init, start_latents
from sdonnx.runtime.tokenizer import ClipTokenizer

MAX_STEPS = 1000
DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.5  # for models whose manifest recommends nothing
MAX_BATCH = 256  # images per request; memory-bound batches are split into runs below this
MAX_SEED = 2**64 - 1  # what torch.manual_seed accepts, so seeds carry over to a torch generator
SIZE_MULTIPLE = 8  # the SD VAE's downsample factor; the pipeline re-checks against the model's own

StepCallback = Callable[[int, float, np.ndarray], "bool | None"]


class GenerationCancelled(SdonnxError):
    """A step callback returned False; no image was produced."""


@dataclass(frozen=True)
class GenerationConfig:
    """One request. height/width None: the model's native size (or the init image's). steps and
    guidance None: the model's recommended settings (manifest `recommended`), else 30 and 7.5.

    sampler takes sdonnx's names or A1111's ("Euler a"), and holds sdonnx's name once made.
    strength: img2img / inpainting only, how far to noise the init image (1.0 = ignore it); None
    takes the mode's default (`starts.default_strength`: 0.8 for img2img, 1.0 for inpainting).
    """

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    sampler: str = "euler"
    schedule: str = "default"
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    batch: int = 1
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] | None = None  # (low, high) sigmas where CFG applies; None: all steps
    strength: float | None = None
    clip_skip: int = 1  # A1111's convention: 1 = the text encoder's last layer, 2 = the one before
    rng: str = "torch"  # noise generator: "torch" (the same noise as torch.manual_seed on CPU) or "numpy"

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(name, getattr(self, name), "a string")
        info = sampler_info(self.sampler)
        object.__setattr__(self, "sampler", info.name)
        if self.steps is not None:
            check_int("steps", self.steps, 1, info.max_steps or MAX_STEPS)
        check_schedule(info, self.schedule)
        check_int("batch", self.batch, 1, MAX_BATCH)
        if self.seed is not None:  # image k of the batch uses seed + k, which must be a seed too
            check_int("seed", self.seed, 0, MAX_SEED - (self.batch - 1))
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_size(name, getattr(self, name), SIZE_MULTIPLE)
        Guidance(1.0 if self.guidance is None else self.guidance, self.guidance_rescale, self.guidance_interval)
        if self.guidance_interval is not None:
            object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
        if self.strength is not None:
            check_strength(self.strength, self.steps or 1)
        check_int("clip_skip", self.clip_skip, 1, 12)
        check_choice("rng", self.rng, RNGS)

    def with_defaults(self, recommended: Mapping[str, object]) -> GenerationConfig:
        """This config with steps and guidance it leaves open taken from `recommended` (a model card:
        {"steps", "guidance", "samplers": {name: {"steps", "guidance"}}}, a sampler's own entry first)."""
        recommended = {**recommended, **recommended.get("samplers", {}).get(self.sampler, {})}
        steps = self.steps if self.steps is not None else recommended.get("steps", DEFAULT_STEPS)
        guidance = self.guidance if self.guidance is not None else recommended.get("guidance", DEFAULT_GUIDANCE)
        return replace(self, steps=steps, guidance=guidance)

    @property
    def guidance_settings(self) -> Guidance:
        """Guidance; call on a config whose defaults are resolved (`with_defaults`)."""
        return Guidance(self.guidance, self.guidance_rescale, self.guidance_interval)


class Pipeline:
    """A loaded model folder, ready to turn prompts into images.

    progress: show a tqdm bar over the sampler steps.
    """

    def __init__(self, model: ModelFolder, tokenizer: ClipTokenizer, *, progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.progress = progress

    @classmethod
    def load(
        cls,
        path: Path | str | None = None,
        options: RuntimeOptions | None = None,
        *,
        progress: bool = True,
        **option_fields,
    ) -> Pipeline:
        """Open the text encoder, U-Net and VAE decoder of `path`, and its VAE encoder if it has one.

        path None: the embedded model (sdonnx.models.EMBEDDED_MODEL), which needs no download.
        options: how the graphs run; or give RuntimeOptions' fields as keywords instead
        (provider="cpu", threads=2, low_memory=True, ...).
        """
        if options is not None and option_fields:
            raise InputError("options", sorted(option_fields), "either options=RuntimeOptions(...) or its fields, not both")
        options = options if options is not None else RuntimeOptions(**option_fields)
        model = ModelFolder.load(EMBEDDED_MODEL if path is None else path, options, optional=("vae_encoder",))
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

    def img2img(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        image: ImageInput,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        **settings,
    ) -> list[Image.Image]:
        """Repaint `image` (a PIL image or an image file, any mode) after `prompt`.

        strength in [0, 1] (default 0.8): how much of the plan runs; the image is noised to the sigma
        where the last int(steps * strength) steps begin. height/width default to the image's size
        rounded down to a multiple of 8; an image of another size is resized (Lanczos, with a warning).
        latents: the unit noise added to the encoded image [batch, C, height/f, width/f].
        """
        config = GenerationConfig(prompt, negative_prompt or "", **settings)
        return self.generate(config, image=image, latents=latents, callback=callback)

    def inpaint(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        image: ImageInput,
        mask: ImageInput,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        **settings,
    ) -> list[Image.Image]:
        """Repaint the white part of `mask` in `image` after `prompt`; the rest stays the image's.

        mask: any mode, converted to grayscale and binarized at 0.5; it must be the image's size.
        A 9-channel (inpainting) U-Net sees the mask and the masked image; a regular 4-channel one
        gets the image blended back outside the mask at every step. strength (default 1) 1 starts
        from pure noise. Otherwise as img2img.
        """
        if mask is None:
            raise InputError("mask", None, "a mask image (white = repaint); for no mask, use Pipeline.img2img")
        config = GenerationConfig(prompt, negative_prompt or "", **settings)
        return self.generate(config, image=image, mask=mask, latents=latents, callback=callback)

    def check(
        self, config: GenerationConfig, *, image: ImageInput | None = None, mask: ImageInput | None = None
    ) -> Request:
        """`config` with its init image and mask checked against this model (request.py), no graph run."""
        memory = self.model.options.memory
        return check_request(self.manifest, self.model.root, memory, config, image, mask, tokenizer=self.tokenizer)

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

        See __call__ for `latents` and `callback`, img2img and inpaint for `image` and `mask`. A batch
        too large for memory runs in parts (`Request.runs`); image k still uses seed + k.
        Each image's `info` holds its seed, its batch index and the strength used (img2img, inpaint).
        """
        request = self.check(config, image=image, mask=mask)
        config = request.config
        seed = config.seed if config.seed is not None else secrets.randbelow(2**32)  # short enough to retype
        images, first = [], 0
        for count in request.runs:
            part = None if latents is None else latents[first : first + count]
            images += self._run(request, replace(config, batch=count), seed + first, part, callback)
            first += count
        for index, image in enumerate(images):
            image.info.update(seed=seed + index, batch_index=index)
            if request.image is not None:
                image.info["strength"] = config.strength
        return images

    def _run(
        self,
        request: Request,
        config: GenerationConfig,
        seed: int,
        latents: np.ndarray | None,
        callback: StepCallback | None,
    ) -> list[Image.Image]:
        """One run of config.batch images from `seed`: tokens -> embeddings -> start -> sampler -> decode."""
        m = self.manifest
        init = read_init(request.image, request.mask, request.height, request.width) if request.image else None
        plan = make_plan(m.schedule, config.steps, sampler=config.sampler, kind=config.schedule)
        if init is not None:
            plan = strength_tail(plan, config.strength)
        rng = noise_source(seed, config.rng, config.batch)  # image k: seed + k
        f = m.vae_downsample
        shape = (config.batch, m.latent_channels, request.height // f, request.width // f)
        cond, uncond = self._embeddings(config)  # first: a prompt over the length limit fails before any image work
        start = start_latents(
            init, config.strength, shape=shape, plan=plan, rng=rng, latents=latents,
            encode=lambda pixels: self._encode(pixels, rng, config.batch), inpainting=request.inpainting, factor=f,
        )
        latent = self._denoise(start, cond, uncond, plan, config.guidance_settings, rng, callback)
        with self.model.sessions.use("vae_decoder") as vae_decoder:
            return decode(vae_decoder, latent, m, tile=self.model.options.memory.decode_tile)

    def _embeddings(self, config: GenerationConfig) -> tuple[np.ndarray, np.ndarray | None]:
        """cond [B, k*77, D] and uncond (None when guidance <= 1: the unconditional half never runs)."""
        guided = config.guidance_settings.enabled
        with self.model.sessions.use("text_encoder") as text_encoder:
            cond = encode_prompt(
                text_encoder, self.tokenizer, config.prompt, config.batch,
                clip_skip=config.clip_skip, pad_to=config.negative_prompt if guided else None,
            )
            if not guided:
                return cond, None
            uncond = encode_prompt(
                text_encoder, self.tokenizer, config.negative_prompt, config.batch,
                clip_skip=config.clip_skip, pad_to=config.prompt, field="negative_prompt",
            )
        return cond, uncond

    def _encode(self, pixels: np.ndarray, rng: NoiseSource, batch: int) -> np.ndarray:
        """pixels [1, 3, H, W] -> latents [batch, C, H/f, W/f], one encoder sample per image."""
        if "vae_encoder" not in self.model.sessions:
            raise ModelError(
                f"{self.model.root}: no vae_encoder graph, which img2img and inpainting need "
                "(`sdonnx export` writes one)"
            )
        with self.model.sessions.use("vae_encoder") as vae_encoder:
            return encode(vae_encoder, pixels, self.manifest, rng, batch)

    def _denoise(
        self,
        start: Start,
        cond: np.ndarray,
        uncond: np.ndarray | None,
        plan: Plan,
        guidance: Guidance,
        rng: NoiseSource,
        callback: StepCallback | None,
    ) -> np.ndarray:
        """The sampler loop from start.x [B, C, h, w] to the final latent [B, C, h, w] (before
        1/scaling_factor), x_0 * plan.latent_scale (`sampling.run_plan`).

        The U-Net session is taken for this step only, so the memory policy can close it when it
        returns.
        """
        with self.model.sessions.use("unet") as unet:
            denoise = GuidedDenoiser(
                UNetModel.for_session(unet, self.manifest, plan),
                text_conditioning(cond, start.channels),
                None if uncond is None else text_conditioning(uncond, start.channels),
                guidance,
                max_batch=self.model.options.memory.unet_max_batch,
            )
            if start.keep is not None:
                denoise = start.keep.wrap(denoise)
            with tqdm(total=plan.steps, disable=not self.progress, unit="step", leave=False) as bar:

                def on_step(info: dict) -> None:
                    bar.update(1)
                    if callback is not None and callback(info["i"], info["sigma"], info["x"]) is False:
                        raise GenerationCancelled(
                            f"cancelled by the step callback at step {info['i'] + 1} of {plan.steps}"
                        )

                latent = run_plan(plan, denoise, start.x, rng=rng, callback=on_step)
            if start.keep is not None:
                latent = start.keep.final(latent)
            check_finite(latent, unet, "out_sample")
        return latent


def encode_prompt(
    text_encoder: Session,
    tokenizer: ClipTokenizer,
    prompt: str,
    batch: int,
    *,
    clip_skip: int = 1,
    pad_to: str | None = None,
    field: str = "prompt",
) -> np.ndarray:
    """prompt -> embeddings float32 [batch, k * L, D], read-only (identical for every step).

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
    embeddings = np.broadcast_to(joined, (batch, k * length, width)).astype(np.float32)
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
