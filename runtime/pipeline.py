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
With `previews=True` it is called as `callback(step, sigma, latents, preview)`: `preview()` returns
the images of the step's x0 estimate (previews.py), computed only if the callback calls it.
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdonnx.config import check_bool, check_choice, check_int, check_real, is_int
from sdonnx.errors import InputError, ModelError, SdonnxError
from sdonnx.models import EMBEDDED_MODEL
from sdonnx.runtime.denoiser import Conditioning, Guidance, GuidedDenoiser, UNetModel
from sdonnx.runtime import embeddings, graph_cache
from sdonnx.runtime.controlnet import Control, ControlHint, ControlNets, ControlRequest, check_controls
from sdonnx.runtime.images import (
    check_finite, decode, default_size, encode, image_pixels, open_image, resize_latents,
)
from sdonnx.runtime.masked import crop_region, cut, paste
from sdonnx.runtime.lora import Adapters, LoraChoice, check_weight, choose
from sdonnx.runtime.manifest import Manifest, text_encoders
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.noise import KINDS as RNGS
from sdonnx.runtime.noise import NoiseSource, noise_source
from sdonnx.runtime.previews import preview_of
from sdonnx.runtime.safety import FEATURE_EXTRACTOR, ClipPreprocess, SafetyChecker
from sdonnx.runtime.session import Session
from sdonnx.runtime.vae import DECODER as VAE_DECODER
from sdonnx.runtime.vae import ENCODER as VAE_ENCODER
from sdonnx.runtime.vae import Vae, VaeManifest, load_vae
from sdonnx.runtime.prompts import lora_tags, strip_tags
from sdonnx.runtime.providers import RuntimeOptions, session_providers
from sdonnx.runtime.request import (
    DEFAULT_NOISE_LEVEL, Request, UpscaleRequest, check_request, check_size, check_strength, check_upscale,
)
from sdonnx.runtime.sampling import check_schedule, make_plan, run_plan, sampler_info
from sdonnx.runtime.schedules import Plan, split_plan, strength_tail
from sdonnx.runtime.starts import ImageInput, Start, initial_noise, read_init, start_latents, upscale_start
from sdonnx.runtime.text import conditioning
from sdonnx.runtime.tiles import tiled
from sdonnx.runtime.tokenizer import ClipTokenizer

MAX_STEPS = 1000
REFINER_SWITCH = 0.8  # diffusers' ensemble-of-experts example and A1111's default
DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.5  # for models whose manifest recommends nothing
MAX_BATCH = 256  # images per request; memory-bound batches are split into runs below this
MAX_SEED = 2**64 - 1  # what torch.manual_seed accepts, so seeds carry over to a torch generator
HIRES_UPSCALERS = ("latent", "latent-nearest", "lanczos")
MAX_PADDING = 256  # A1111's slider
MAX_HIRES_SCALE = 4
MAX_CACHE_INTERVAL = 10  # DeepCache's paper goes to 20 on DDIM's 100 steps; at 20-50 steps, past 5 images blur
SIZE_MULTIPLE = 8  # the SD VAE's downsample factor; the pipeline re-checks against the model's own

StepCallback = Callable[..., "bool | None"]  # (step, sigma, latents[, preview]) -> False to stop
Watch = Callable[[dict], "bool | None"]  # the sampler loop's view of a StepCallback


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
    # SDXL micro-conditioning (models whose manifest has time_ids), diffusers' names and meaning:
    # (height, width) sizes and (top, left) crops; None: the image size, (0, 0); the negative_* ones
    # default to the positive ones. aesthetic scores (the refiner): None is 6.0 and 2.5.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    # With a refiner (generate's `refiner=`): the share of the plan the base runs, diffusers'
    # denoising_end for the base and denoising_start for the refiner, A1111's "Refiner switch at".
    refiner_switch: float | None = None
    # Hires fix (A1111's two-pass txt2img): draw at height x width, upscale by hires_scale (the latent,
    # bilinear or nearest, or the decoded image with Lanczos), then img2img there at hires_strength
    # (None: 0.7, A1111's) over hires_steps (None: steps). The images come out at the upscaled size.
    hires_scale: float | None = None
    hires_strength: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str = "latent"
    # Inpainting only the masked area (A1111's "Only masked", masked.py): the mask's box grown by
    # only_masked_padding pixels and to the generation size's aspect ratio is repainted at that size
    # and pasted back; the images come out at the init image's size.
    only_masked: bool = False
    only_masked_padding: int = 32
    # LoRAs to apply for this request, {file or name: weight} (names resolve in the pipeline's
    # lora_dir), besides the prompt's <lora:NAME:WEIGHT> tags; held as ((name, weight), ...).
    loras: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    # ControlNets steering this request (controlnet.py Control): one, or a sequence whose residuals add up.
    control: Control | tuple[Control, ...] = ()
    # Feature caching (DeepCache, denoiser.py): run the whole U-Net every cache_interval steps and only its
    # shallow graph between, on the deep features of the last whole run. 1: every step whole (off).
    cache_interval: int = 1

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
            check_strength(self.strength, self.steps)
        check_int("clip_skip", self.clip_skip, 1, 12)
        check_choice("rng", self.rng, RNGS)
        for name in PAIR_FIELDS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _pair(name, getattr(self, name)))
        for name, high in (("aesthetic_score", 10), ("negative_aesthetic_score", 10), ("refiner_switch", 1)):
            if getattr(self, name) is not None:
                check_real(name, getattr(self, name), 0, high)
        _check_hires(self)
        check_bool("only_masked", self.only_masked)
        check_int("only_masked_padding", self.only_masked_padding, 0, MAX_PADDING)
        object.__setattr__(self, "loras", _loras(self.loras))
        object.__setattr__(self, "control", _controls(self.control))
        lora_tags(self.prompt)  # a malformed tag fails here, with the rest of the config
        _check_cache_interval(self)

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


PAIR_FIELDS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
               "negative_crops_coords_top_left", "negative_target_size")


def _check_hires(config: GenerationConfig) -> None:
    check_choice("hires_upscaler", config.hires_upscaler, HIRES_UPSCALERS)
    if config.hires_scale is None:
        for name in ("hires_strength", "hires_steps"):
            if getattr(config, name) is not None:
                raise InputError(name, getattr(config, name), "hires_scale too (--hires-scale: the hires fix's factor)")
        return
    check_real("hires_scale", config.hires_scale, 1, MAX_HIRES_SCALE)
    if config.hires_strength is not None:
        check_real("hires_strength", config.hires_strength, 0, 1)
    if config.hires_steps is not None:
        check_int("hires_steps", config.hires_steps, 1, sampler_info(config.sampler).max_steps or MAX_STEPS)


def _check_cache_interval(config: GenerationConfig) -> None:
    """1 to MAX_CACHE_INTERVAL, and above 1 only without ControlNets, whose residuals would reach the
    whole runs only (LoRAs are checked against the folder: request.check_cache_interval)."""
    check_int("cache_interval", config.cache_interval, 1, MAX_CACHE_INTERVAL)
    if config.cache_interval > 1 and config.control:
        raise InputError("cache_interval", config.cache_interval, "1 with ControlNets (their residuals would "
                         "reach only the steps that run the whole U-Net)")


def _loras(value: object) -> tuple[tuple[str, float], ...]:
    """{name: weight} or ((name, weight), ...) -> ((name, weight), ...), each weight checked."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], (str, Path)) for p in pairs):
        raise InputError("loras", value, "{file or name: weight, ...}")
    for name, weight in pairs:
        check_weight(name, weight)
    return tuple((str(name), float(weight)) for name, weight in pairs)


def _controls(value: object) -> tuple[Control, ...]:
    """A Control or a sequence of them -> a tuple; InputError otherwise."""
    controls = (value,) if isinstance(value, Control) else value
    if not isinstance(controls, (list, tuple)) or not all(isinstance(c, Control) for c in controls):
        raise InputError("control", value, "a Control(model=..., image=...) or a list of them")
    return tuple(controls)


def _pair(name: str, value: object) -> tuple[int, int]:
    """(height, width) or (top, left): two integers >= 0; InputError naming `name` otherwise."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(is_int(v) and v >= 0 for v in value):
        raise InputError(name, value, "(height, width) or (top, left): two integers >= 0")
    return int(value[0]), int(value[1])


class Pipeline:
    """A loaded model folder, ready to turn prompts into images.

    progress: show a tqdm bar over the sampler steps.
    """

    def __init__(self, model: ModelFolder, tokenizers: Mapping[str, ClipTokenizer], *, progress: bool = True,
                 lora_dir: Path | str | None = None, embeddings_dir: Path | str | None = None,
                 control_dir: Path | str | None = None, safety: SafetyChecker | None = None, vae: Vae | None = None,
                 preview_vae: Vae | None = None):
        self.model = model
        self.safety = safety
        self.vae = vae  # a VAE of its own (vae.py), instead of the folder's
        self.preview_vae = preview_vae  # a VAE for step previews only (TAESD), vae.py
        self._vae_sessions: dict[tuple[Path, str], Session] = {}
        self.tokenizers = tokenizers  # by text encoder
        self.progress = progress
        self.lora_dir = None if lora_dir is None else Path(lora_dir)
        self.embeddings_dir = None if embeddings_dir is None else Path(embeddings_dir)
        self.control_dir = None if control_dir is None else Path(control_dir)
        self.adapters = Adapters(model.root, model.manifest)
        options = model.options
        self.controlnets = ControlNets(
            lambda path: graph_cache.open_session(path, session_providers(options), options, name="controlnet"),
            options.memory, verify=options.verify_integrity)

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The first text encoder's tokenizer."""
        return next(iter(self.tokenizers.values()))

    @classmethod
    def load(
        cls,
        path: Path | str | None = None,
        options: RuntimeOptions | None = None,
        *,
        progress: bool = True,
        lora_dir: Path | str | None = None,
        embeddings_dir: Path | str | None = None,
        control_dir: Path | str | None = None,
        safety_checker: bool | None = None,
        vae: Path | str | None = None,
        preview_vae: Path | str | None = None,
        **option_fields,
    ) -> Pipeline:
        """Open the text encoder, U-Net and VAE decoder of `path`, and its VAE encoder if it has one.

        path None: the embedded model (sdonnx.models.EMBEDDED_MODEL), which needs no download.
        options: how the graphs run; or give RuntimeOptions' fields as keywords instead
        (provider="cpu", threads=2, ...).
        lora_dir: where LoRA names (`loras={"name": 0.8}`, `<lora:name:0.8>`) are looked up.
        embeddings_dir: textual-inversion files, each used where its name is a word of a prompt.
        control_dir: where ControlNet names (`Control(model="canny", ...)`) are looked up.
        safety_checker: run the folder's safety checker on every image (safety.py); None: when the
        folder has one. True for a folder without one is an error.
        vae: an exported VAE folder (vae.py: a standalone AutoencoderKL, or TAESD) to decode and encode
        with instead of the folder's own. preview_vae: one for step previews only (a TAESD: fast).
        """
        if options is not None and option_fields:
            raise InputError("options", sorted(option_fields), "either options=RuntimeOptions(...) or its fields, not both")
        options = options if options is not None else RuntimeOptions(**option_fields)
        for name, folder in (("lora_dir", lora_dir), ("embeddings_dir", embeddings_dir), ("control_dir", control_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise InputError(name, str(folder), "an existing folder")
        if safety_checker is not None:
            check_bool("safety_checker", safety_checker)
        model = ModelFolder.load(EMBEDDED_MODEL if path is None else path, options,
                                 optional=("vae_encoder", "unet_shallow"))
        def chosen(folder: Path | str | None, field: str) -> Vae | None:
            if folder is None:
                return None
            try:
                return load_vae(folder, model.manifest, lambda graph, name: _open_verified(graph, name, options))
            except InputError as e:
                raise InputError(field, e.received, e.expected) from None

        return cls(model, load_tokenizers(model), progress=progress, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                   control_dir=control_dir, safety=open_safety_checker(model, safety_checker), vae=chosen(vae, "vae"),
                   preview_vae=chosen(preview_vae, "preview_vae"))

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
        previews: bool = False,
        **settings,
    ) -> list[Image.Image]:
        """Generate images; `settings` are GenerationConfig's fields (steps, guidance, sampler, ...).

        latents: unit-variance starting noise [batch, C, height/f, width/f], as diffusers' `latents=`;
        when given, the seed only drives the noise of ancestral/SDE samplers.
        """
        config = GenerationConfig(prompt, negative_prompt or "", **settings)
        return self.generate(config, latents=latents, callback=callback, previews=previews)

    def img2img(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        image: ImageInput,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        previews: bool = False,
        **settings,
    ) -> list[Image.Image]:
        """Repaint `image` (a PIL image or an image file, any mode) after `prompt`.

        strength in [0, 1] (default 0.8): how much of the plan runs; the image is noised to the sigma
        where the last int(steps * strength) steps begin. height/width default to the image's size
        rounded down to a multiple of 8; an image of another size is resized (Lanczos, with a warning).
        latents: the unit noise added to the encoded image [batch, C, height/f, width/f].
        """
        config = GenerationConfig(prompt, negative_prompt or "", **settings)
        return self.generate(config, image=image, latents=latents, callback=callback, previews=previews)

    def inpaint(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        image: ImageInput,
        mask: ImageInput,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        previews: bool = False,
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
        return self.generate(config, image=image, mask=mask, latents=latents, callback=callback,
                             previews=previews)

    def upscale(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        image: ImageInput,
        noise_level: int = DEFAULT_NOISE_LEVEL,
        tile: int | None = None,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        previews: bool = False,
        **settings,
    ) -> list[Image.Image]:
        """Make `image` (a low-res picture or image file, any mode) vae_downsample (4) times larger
        after `prompt`, with an x4 upscaler folder (diffusers' StableDiffusionUpscalePipeline).

        noise_level: 0 to the model's max_noise_level (350): how much noise the low-res image gets,
        so how much the model may invent rather than keep (default 20, diffusers'). tile: run the
        U-Net on blended tiles of that many low-res pixels (tiles.py; None: the memory policy's,
        whole unless low_memory). latents: the unit noise [batch, C, h, w] at the image's own size.
        settings: GenerationConfig's sampling fields (steps, guidance, sampler, seed, batch, ...).
        Each image's info holds its seed, batch index and the noise level.
        """
        config = GenerationConfig(prompt, negative_prompt or "", **settings)
        return self.run_upscale(config, image=image, noise_level=noise_level, tile=tile, latents=latents,
                                callback=callback, previews=previews)

    def run_upscale(self, config: GenerationConfig, *, image: ImageInput, noise_level: int = DEFAULT_NOISE_LEVEL,
                    tile: int | None = None, latents: np.ndarray | None = None, callback: StepCallback | None = None,
                    previews: bool = False) -> list[Image.Image]:
        """`upscale` for a GenerationConfig (as `generate` is for `__call__`)."""
        tokenizers, rows = self._embeddings(config)
        request = check_upscale(self.manifest, self.model.root, self.model.options.memory, config, image, noise_level,
                                tile, tokenizers=tokenizers, loaded=self.model.sessions.opened)
        request = replace(request, rows=rows)
        config, watch = request.config, self._watcher(callback, previews)
        images, seed = in_runs(config, request.runs, latents,
                               lambda part, seed, noise: self._upscale(request, part, seed, noise, watch))
        for index, upscaled in enumerate(images):
            upscaled.info.update(seed=seed + index, batch_index=index, noise_level=request.noise_level)
        return self.safety.apply(images) if self.safety is not None else images

    def _upscale(self, request: UpscaleRequest, config: GenerationConfig, seed: int, latents: np.ndarray | None,
                 watch: Watch | None) -> list[Image.Image]:
        """One run of config.batch upscales: tokens -> embeddings (+ the noise level as class labels)
        -> the noised low-res image [B, 3, h, w] and start noise [B, C, h, w] -> sampler (in tiles) ->
        decode -> B images of h*f x w*f."""
        m, (height, width) = self.manifest, (request.height, request.width)
        plan = make_plan(m.schedule, config.steps, sampler=config.sampler, kind=config.schedule)
        rng = noise_source(seed, config.rng, config.batch)
        self.adapters.apply(self.model.sessions, (), request.rows)
        f = m.vae_downsample
        cond, uncond = conditioning(self.model.sessions.use, request.tokenizers or self.tokenizers, m, config,
                                    height * f, width * f)
        labels = {"class_labels": np.full(config.batch, request.noise_level, dtype=np.int64)}
        start = upscale_start(image_pixels(request.image, height, width), m.upscaler, request.noise_level,
                              shape=(config.batch, m.latent_channels, height, width), plan=plan, rng=rng,
                              latents=latents)
        latent = self._denoise(start, cond | labels, None if uncond is None else uncond | labels, plan,
                               config.guidance_settings, rng, watch, tile=request.tile,
                               cache_interval=config.cache_interval)
        return self._decode(latent)

    def check(
        self, config: GenerationConfig, *, image: ImageInput | None = None, mask: ImageInput | None = None
    ) -> Request:
        """`config` with its init image, mask, LoRAs and ControlNets checked against this model
        (request.py, lora.py, controlnet.py), no graph run."""
        memory = self.model.options.memory
        tokenizers, rows = self._embeddings(config)
        request = check_request(self.manifest, self.model.root, memory, config, image, mask,
                                tokenizers=tokenizers, loaded=self.model.sessions.opened)
        loras = requested_loras(config, self.lora_dir, self.model.root)
        self.adapters.prepare(loras)
        controls = check_controls(request.config.control, self.controlnets, self.control_dir, self.manifest,
                                  request.height, request.width, self.model.root)
        check_hires_mix(request)
        return replace(request, loras=loras, tokenizers=tokenizers, rows=rows, controls=controls)

    def _embeddings(self, config: GenerationConfig) -> tuple[Mapping[str, ClipTokenizer], dict]:
        """The tokenizers that know the embedding words `config`'s prompts use, and the token-table
        rows those words borrow, per text encoder (embeddings.py)."""
        files = embeddings.named_in((config.prompt, config.negative_prompt), self.embeddings_dir)
        if not files:
            return self.tokenizers, {}
        tables = {c: self.adapters.token_table(c)[1] for c in self.tokenizers}
        found = [embeddings.read(path, {c: shape[1] for c, shape in tables.items()}) for path in files]
        used = {i for t in self.tokenizers.values() for text in (config.prompt, config.negative_prompt)
                for i in t.token_ids(strip_tags(text))}
        first = self.tokenizer
        ids = embeddings.borrow(found, used, min(shape[0] for shape in tables.values()),
                                {first.bos_id, first.eos_id, first.pad_id})
        rows = {c: embeddings.table_rows(found, ids, c) for c in self.tokenizers}
        return {c: t.with_words(ids) for c, t in self.tokenizers.items()}, rows

    def generate(
        self,
        config: GenerationConfig,
        *,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
        latents: np.ndarray | None = None,
        callback: StepCallback | None = None,
        refiner: Pipeline | None = None,
        previews: bool = False,
    ) -> list[Image.Image]:
        """Run `config`: text to image; with `image`, img2img; with `image` and `mask`, inpainting.

        See __call__ for `latents` and `callback`, img2img and inpaint for `image` and `mask`. A batch
        too large for memory runs in parts (`Request.runs`); image k still uses seed + k.
        refiner: a second model (an SDXL refiner) that runs the plan from config.refiner_switch (0.8
        when unset) on, from this model's latents, with its own conditioning, and decodes with its VAE.
        previews: call `callback(step, sigma, latents, preview)`, where `preview()` returns the batch's
        images of the step's x0 estimate (previews.py; computed only when called).
        Each image's `info` holds its seed, its batch index and the strength used (img2img, inpaint);
        with a safety checker (Pipeline.load's safety_checker), `nsfw`, and flagged images are black.
        """
        images = self._generate(config, image, mask, latents, callback, refiner, previews)
        return self.safety.apply(images) if self.safety is not None else images

    def _generate(self, config: GenerationConfig, image: ImageInput | None, mask: ImageInput | None,
                  latents: np.ndarray | None, callback: StepCallback | None, refiner: Pipeline | None,
                  previews: bool) -> list[Image.Image]:
        """generate's images, before the safety checker."""
        if config.only_masked:
            return self._only_masked(config, image, mask, latents, callback, refiner, previews)
        request = self.check(self._with_refiner(config, refiner), image=image, mask=mask)
        watch = self._watcher(callback, previews)
        images, seed = in_runs(request.config, request.runs, latents,
                               lambda part, seed, noise: self._run(request, part, seed, noise, watch, refiner))
        hashes = {choice.path.stem: self.adapters.short_hash(choice.path) for choice in request.loras}
        nets = [(c.folder.name, c.manifest.files.get(c.manifest.graphs["controlnet"].path, "")[:8])
                for c in request.controls]
        for index, image in enumerate(images):
            image.info.update(seed=seed + index, batch_index=index)
            if hashes:
                image.info["lora_hashes"] = hashes
            if nets:
                image.info["controlnets"] = nets
            if request.image is not None:
                image.info["strength"] = config.strength
            if self.vae is not None:
                image.info["vae"] = (self.vae.name, self.vae.manifest.files.get(
                    self.vae.manifest.graphs[VAE_DECODER].path, "")[:10])
            if request.hires is not None:  # the Size PNG parameters record (A1111's: the first pass's)
                image.info["generation_size"] = (request.width, request.height)
        return images

    def _only_masked(self, config: GenerationConfig, image: ImageInput | None, mask: ImageInput | None,
                     latents, callback, refiner, previews: bool) -> list[Image.Image]:
        """Inpaint only the masked area (masked.py): cut it out, inpaint it at the generation size
        (config's, else the init image's rounded to a multiple of 8), paste it back."""
        if image is None or mask is None:
            raise InputError("only_masked", True, "an init image and a mask (it is a way of inpainting)")
        picture, drawn = open_image(image, "image"), open_image(mask, "mask")
        if drawn.size != picture.size:
            raise InputError("mask", f"{drawn.width}x{drawn.height}", f"the init image's size, "
                             f"{picture.width}x{picture.height}")
        height, width = default_size(picture, SIZE_MULTIPLE)
        height, width = config.height or height, config.width or width
        region = crop_region(drawn, padding=config.only_masked_padding, aspect=(width, height))
        part, part_mask = cut(picture, drawn, region, width, height)
        made = self._generate(replace(config, only_masked=False, height=height, width=width), part, part_mask,
                              latents, callback, refiner, previews)
        pasted = []
        for image in made:
            whole = paste(picture, image, drawn, region)
            whole.info = {**image.info, "generation_size": (width, height), "inpaint_region": region}
            pasted.append(whole)
        return pasted

    def _run(
        self,
        request: Request,
        config: GenerationConfig,
        seed: int,
        latents: np.ndarray | None,
        watch: Watch | None,
        refiner: Pipeline | None = None,
    ) -> list[Image.Image]:
        """One run of config.batch images from `seed`: tokens -> embeddings -> start -> sampler -> decode
        (the refiner's sampler and decode, when there is one)."""
        m = self.manifest
        init = read_init(request.image, request.mask, request.height, request.width) if request.image else None
        plan = make_plan(m.schedule, config.steps, sampler=config.sampler, kind=config.schedule)
        if init is not None:
            plan = strength_tail(plan, config.strength)
        if refiner is not None:
            plan, tail = split_plan(plan, m.schedule, config.refiner_switch)
        rng = noise_source(seed, config.rng, config.batch)  # image k: seed + k
        f = m.vae_downsample
        shape = (config.batch, m.latent_channels, request.height // f, request.width // f)
        self.adapters.apply(self.model.sessions, request.loras, request.rows)
        # First: a prompt over the length limit fails before any image work.
        cond, uncond = conditioning(self.model.sessions.use, request.tokenizers or self.tokenizers, m, config,
                                    request.height, request.width)
        start = start_latents(
            init, config.strength, shape=shape, plan=plan, rng=rng, latents=latents,
            encode=lambda pixels: self._encode(pixels, rng, config.batch), inpainting=request.inpainting, factor=f,
        )
        latent = self._denoise(start, cond, uncond, plan, config.guidance_settings, rng, watch, request.controls,
                               cache_interval=config.cache_interval)
        if refiner is not None:
            return refiner._refine(config, request, latent, tail, rng, watch)
        if request.hires is not None:
            latent = self._hires(request, config, seed, latent, watch)
        return self._decode(latent)

    def _decode(self, latent: np.ndarray, *, tile: bool = True) -> list[Image.Image]:
        """latent [B, C, h, w] -> B images, tiled as the memory policy says (tile=False: whole)."""
        size = self.model.options.memory.decode_tile if tile else None
        if self.vae is not None:
            with self._vae_session(VAE_DECODER) as vae_decoder:
                return decode(vae_decoder, latent, self.vae.facts, tile=size)
        with self.model.sessions.use("vae_decoder") as vae_decoder:
            return decode(vae_decoder, latent, self.manifest, tile=size)

    @contextmanager
    def _vae_session(self, name: str, vae: Vae | None = None) -> Iterator[Session]:
        """Graph `name` of `vae` (default: the chosen VAE), held as the memory policy says."""
        vae = vae or self.vae
        key = (vae.folder, name)
        session = self._vae_sessions.get(key) or vae.open(name)
        try:
            yield session
        finally:
            if self.model.options.memory.release_sessions:
                self._vae_sessions.pop(key, None)
                session.close()
            else:
                self._vae_sessions[key] = session

    def _hires(self, request: Request, config: GenerationConfig, seed: int, latent: np.ndarray,
               watch: Watch | None) -> np.ndarray:
        """The hires fix's second pass: the first pass's latent [B, C, h, w] upscaled to request.hires
        (the latent itself, or its decoded images with Lanczos and encoded again), noised to the
        hires_strength tail of a hires_steps plan, and sampled at that size -> [B, C, H/f, W/f].

        It is img2img from the upscaled picture with the same seeds: with the Lanczos upscaler,
        exactly what `img2img(prompt, image=first_pass.resize(...), strength=hires_strength)` gives."""
        m, (height, width) = self.manifest, request.hires
        f = m.vae_downsample
        plan = make_plan(m.schedule, config.hires_steps or config.steps, sampler=config.sampler, kind=config.schedule)
        plan = strength_tail(plan, config.hires_strength)
        rng = noise_source(seed, config.rng, config.batch)  # the second pass draws its own noise, as A1111's
        if config.hires_upscaler == "lanczos":
            pictures = [image.resize((width, height), Image.Resampling.LANCZOS) for image in self._decode(latent)]
            pixels = np.concatenate([image_pixels(picture, height, width) for picture in pictures])
            latent = self._encode(pixels, rng, config.batch)
        else:
            latent = resize_latents(latent, height // f, width // f, nearest=config.hires_upscaler == "latent-nearest")
        x = latent + float(plan.sigmas[0]) * initial_noise(latent.shape, rng, None)
        cond, uncond = conditioning(self.model.sessions.use, request.tokenizers or self.tokenizers, m, config,
                                    height, width)
        return self._denoise(Start(x), cond, uncond, plan, config.guidance_settings, rng, watch,
                             cache_interval=config.cache_interval)

    def _refine(
        self, config: GenerationConfig, request: Request, x: np.ndarray, plan: Plan, rng: NoiseSource,
        watch: Watch | None,
    ) -> list[Image.Image]:
        """The refiner's part: x [B, C, h, w] (k-space, at plan.sigmas[0]) -> images, with this
        model's own text encoders, time ids (aesthetic scores) and VAE."""
        m = self.manifest
        config = _without_loras(config).with_defaults(m.recommended)
        cond, uncond = conditioning(self.model.sessions.use, self.tokenizers, m, config, request.height, request.width)
        latent = self._denoise(Start(x), cond, uncond, plan, config.guidance_settings, rng, watch,
                               cache_interval=config.cache_interval)
        return self._decode(latent)

    def _watcher(self, callback: StepCallback | None, previews: bool) -> Watch | None:
        """The user's step callback as the sampler loop calls it (with a lazy preview when asked)."""
        if callback is None:
            return None
        if not previews:
            return lambda info: callback(info["i"], info["sigma"], info["x"])
        return lambda info: callback(info["i"], info["sigma"], info["x"], self.preview(info["denoised"]))

    def preview(self, denoised: np.ndarray) -> Callable[[], list[Image.Image]]:
        """A zero-argument function giving the images of x0 estimates `denoised` [B, C, h, w] (k-space,
        as the sampler holds them): through Pipeline.load's preview_vae (TAESD) when given, else the
        manifest's latent_rgb map, else the VAE decoder (slow)."""
        m = self.manifest
        if self.preview_vae is not None:  # asked for: it wins over the fitted map
            def decode_preview(latents: np.ndarray) -> list[Image.Image]:
                with self._vae_session(VAE_DECODER, self.preview_vae) as vae_decoder:
                    return decode(vae_decoder, latents, self.preview_vae.facts)

            return preview_of(None, decode_preview, denoised, m.vae_downsample)
        return preview_of(m.latent_rgb, lambda latents: self._decode(latents, tile=False), denoised, m.vae_downsample)

    def _with_refiner(self, config: GenerationConfig, refiner: Pipeline | None) -> GenerationConfig:
        """`config` with its refiner switch (0.8 when unset) checked against the refiner, if any."""
        if refiner is None:
            if config.refiner_switch is not None:
                raise InputError("refiner_switch", config.refiner_switch, "a refiner to switch to (refiner=, --refiner)")
            return config
        check_hires_mix(None, refiner=True, config=config)
        config = replace(config, refiner_switch=config.refiner_switch or REFINER_SWITCH)
        self._check_refiner(refiner)
        refiner.check(_without_loras(config).with_defaults(self.manifest.recommended))
        return config

    def _check_refiner(self, refiner: Pipeline) -> None:
        """A refiner must continue this model's latents: same latent space and training schedule."""
        mine, theirs = self.manifest, refiner.manifest
        for fact in ("latent_channels", "vae_downsample"):
            if getattr(mine, fact) != getattr(theirs, fact):
                raise InputError("refiner", str(refiner.model.root), f"a model with this one's {fact} ({getattr(mine, fact)})")
        ours, its = np.asarray(mine.schedule.alphas_cumprod), np.asarray(theirs.schedule.alphas_cumprod)
        if ours.shape != its.shape or not np.allclose(ours, its, rtol=1e-5, atol=0):  # torch and NumPy cumprods differ by ~1e-6
            raise InputError("refiner", str(refiner.model.root), "a model trained with this one's noise schedule")

    def _encode(self, pixels: np.ndarray, rng: NoiseSource, batch: int) -> np.ndarray:
        """pixels [1, 3, H, W] -> latents [batch, C, H/f, W/f], one encoder sample per image (the chosen
        VAE's encoder when it has one, else the folder's: both write the same latent space)."""
        if self.vae is not None and self.vae.has_encoder:
            with self._vae_session(VAE_ENCODER) as vae_encoder:
                return encode(vae_encoder, pixels, self.vae.facts, rng, batch)
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
        cond: Mapping[str, np.ndarray],
        uncond: Mapping[str, np.ndarray] | None,
        plan: Plan,
        guidance: Guidance,
        rng: NoiseSource,
        watch: Watch | None,
        controls: tuple[ControlRequest, ...] = (),
        tile: int | None = None,
        cache_interval: int = 1,
    ) -> np.ndarray:
        """The sampler loop from start.x [B, C, h, w] to the final latent [B, C, h, w] (before
        1/scaling_factor), x_0 * plan.latent_scale (`sampling.run_plan`). tile: run the U-Net on
        tiles of that many latent pixels when the latent is larger (tiles.py; the upscaler's).
        cache_interval: feature caching's (denoiser.py), which also takes the shallow U-Net graph.

        The U-Net sessions (and the ControlNets') are taken for this step only, so the memory policy
        can close them when it returns.
        """
        sessions = self.model.sessions
        with (sessions.use("unet") as unet, self.controlnets.use(controls) as graphs,
              sessions.use("unet_shallow") if cache_interval > 1 else nullcontext() as shallow):
            batch = len(start.x)
            hints, uncond_hints = control_hints(controls, graphs, batch)
            model = UNetModel.for_session(unet, self.manifest, plan, shallow=shallow)
            cond_in = Conditioning(cond, start.channels, hints)
            uncond_in = None if uncond is None else Conditioning(uncond, start.channels, uncond_hints)

            def guided(cond: Conditioning, uncond: Conditioning | None) -> GuidedDenoiser:
                return GuidedDenoiser(model, cond, uncond, guidance, max_batch=self.model.options.memory.unet_max_batch,
                                      cache_interval=cache_interval)

            denoise = guided(cond_in, uncond_in)
            height, width = start.x.shape[2:]
            if tile is not None and max(height, width) > tile:
                denoise = tiled(lambda rows, cols: guided(
                    cond_in.window(rows, cols), None if uncond_in is None else uncond_in.window(rows, cols)),
                    height, width, tile)
            if start.keep is not None:
                denoise = start.keep.wrap(denoise)
            with tqdm(total=plan.steps, disable=not self.progress, unit="step", leave=False) as bar:

                def on_step(info: dict) -> None:
                    bar.update(1)
                    if watch is not None and watch(info) is False:
                        raise GenerationCancelled(
                            f"cancelled by the step callback at step {info['i'] + 1} of {plan.steps}"
                        )

                latent = run_plan(plan, denoise, start.x, rng=rng, callback=on_step)
            if start.keep is not None:
                latent = start.keep.final(latent)
            check_finite(latent, unet, "out_sample")
        return latent


def in_runs(config: GenerationConfig, runs: tuple[int, ...], latents: np.ndarray | None,
            run: Callable[[GenerationConfig, int, np.ndarray | None], list[Image.Image]]
            ) -> tuple[list[Image.Image], int]:
    """A request's images made run by run (`Request.runs`, what fits in memory), and its seed (config's, else
    a random one short enough to retype): run(config for that many images, their first seed, their part
    of the caller's `latents`) -> images, so image k still has seed + k."""
    seed = config.seed if config.seed is not None else secrets.randbelow(2**32)
    images, first = [], 0
    for count in runs:
        images += run(replace(config, batch=count), seed + first,
                      None if latents is None else latents[first : first + count])
        first += count
    return images, seed


def _open_verified(graph: Path, name: str, options: RuntimeOptions) -> Session:
    """A graph of a folder beside the model (a VAE's), its files checked against its manifest first."""
    from sdonnx.runtime.integrity import verify_folder

    folder = Path(graph).parent.parent
    verify_folder(folder, VaeManifest.read(folder), verify=options.verify_integrity)
    return graph_cache.open_session(graph, session_providers(options), options, name=name)


def open_safety_checker(model: ModelFolder, wanted: bool | None) -> SafetyChecker | None:
    """The folder's safety checker when `wanted` (None: when it has one); InputError for True without one."""
    spec = model.manifest.safety_checker
    if wanted is False or (wanted is None and spec is None):
        return None
    if spec is None:
        raise InputError("safety_checker", True, f"a model folder with a safety checker ({model.root} has none; "
                         "`sdonnx export` writes one when the source folder has it)")
    options = model.options
    preprocess = ClipPreprocess.read(model.root / FEATURE_EXTRACTOR)
    return SafetyChecker(lambda: graph_cache.open_session(model.root / spec.path, session_providers(options), options,
                                                          name="safety_checker"),
                         preprocess, keep=not options.memory.release_sessions)


def check_before_load(
    root: Path, facts: Manifest, memory, config: GenerationConfig, image: ImageInput | None = None,
    mask: ImageInput | None = None, *, lora_dir: Path | None = None, control_dir: Path | None = None,
    tokenizers: Mapping[str, ClipTokenizer] | None = None, adapters: Adapters | None = None,
) -> Request:
    """`config` with its image, mask, LoRAs and ControlNets checked against a model folder's facts
    (`model.read_facts`) before any graph loads: what the CLI and the server run so a bad request
    fails in milliseconds. `memory`: the MemoryPolicy it will run under. tokenizers, adapters: the
    folder's, kept by a caller that checks many requests (read from the folder when None). Embedding
    words are checked when the pipeline tokenizes."""
    request = check_request(facts, root, memory, config, image, mask, tokenizers=tokenizers)
    (adapters or Adapters(root, facts)).prepare(requested_loras(request.config, lora_dir, root))
    check_controls(request.config.control, ControlNets(None, memory), control_dir, facts, request.height,
                   request.width, root)
    check_hires_mix(request)
    return request


def check_hires_mix(request: Request | None, *, refiner: bool = False, config: GenerationConfig | None = None) -> None:
    """The hires fix runs alone: not with ControlNets (their images are the first pass's size) nor a refiner."""
    config = config if config is not None else request.config
    if config.hires_scale is None:
        return
    if refiner:
        raise InputError("hires_scale", config.hires_scale, "no refiner (the hires fix and a refiner do not mix yet)")
    if config.control:
        raise InputError("hires_scale", config.hires_scale,
                         "no ControlNet (the hires fix and ControlNet do not mix yet)")


def control_hints(controls: tuple[ControlRequest, ...], graphs, batch: int
                  ) -> tuple[tuple[ControlHint, ...], tuple[ControlHint, ...]]:
    """(cond, uncond) ControlHints for a batch: each control image repeated per image; in guess mode
    the unconditional rows are left out (diffusers feeds them zero residuals)."""
    cond, uncond = [], []
    for request, graph in zip(controls, graphs):
        image = np.repeat(request.image, batch, axis=0)
        cond.append(ControlHint(graph, image, np.ones(batch, bool), request.control))
        uncond.append(ControlHint(graph, image, np.full(batch, not request.control.guess_mode), request.control))
    return tuple(cond), tuple(uncond)


def requested_loras(config: GenerationConfig, lora_dir: Path | None, model_root: Path | None = None
                    ) -> tuple[LoraChoice, ...]:
    """The LoRAs `config` asks for: its prompt's <lora:NAME:WEIGHT> tags, then its `loras`."""
    return choose([(name, weight, "prompt", unet) for name, weight, unet in lora_tags(config.prompt)]
                  + [(name, weight, "loras") for name, weight in config.loras], lora_dir, model_root)


def _without_loras(config: GenerationConfig) -> GenerationConfig:
    """The refiner's view of a request: LoRAs belong to the base model they were trained for."""
    return replace(config, prompt=strip_tags(config.prompt), loras=())


def load_tokenizers(model: ModelFolder) -> dict[str, ClipTokenizer]:
    """The tokenizer of each of the model's text encoders (tokenizer/, tokenizer_2/)."""
    length = model.manifest.tokenizer_max_length
    return {name: ClipTokenizer.from_folder(model.tokenizer_dir_of(name), length) for name in text_encoders(model.manifest)}
