"""A request checked against the model before any graph runs: what only the model's facts can say.

`GenerationConfig` checks each field on its own; `check_request` checks the request against the
manifest, cheaply and before the first session opens (the CLI runs it before loading the graphs):
the mode suits the U-Net, sizes are multiples of the VAE factor, the init image is large enough and
the mask its size, the text encoder has the clip-skip output asked for, and the request fits in
memory. A batch too large for memory but whose images fit alone is split into runs.

The memory estimate (`estimate_peak`) is the resident weights plus the larger of a U-Net run and a
VAE decode, each linear in its pixels and quadratic in the tokens of an attention that is not
computed in blocks:
- U-Net: 172 bytes per latent pixel per channel of its first block, per image of the run (SD 1.5,
  fused attention, one CFG call at 512 px: 0.45 GB over its 3.28 GB of weights), plus 12 bytes per
  score (three float32 copies of softmax's input and output) for tokens^2 x heads held at once:
  all heads for `--attention full` (optimum's exports, and folders that do not say), one for
  `sliced`, none for `fused`.
- VAE decode, one image at a time: 32 bytes per image pixel per channel of its first block (SD's
  decoder at 512 px: ~1.0 GB, the 5.29 GB pipeline peak less 4.1 GB of weights and 0.2 GB of
  runtime) plus its mid-block attention, one head over the latent pixels, unless the export fused
  it (manifest vae_attention). Low memory decodes 256-pixel tiles.
`python benchmarks/memory_estimate.py` prints measured peaks beside these estimates.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Collection, Mapping

import numpy as np
from PIL import Image

from sdonnx.config import check_int, is_int, is_real
from sdonnx.errors import InputError
from sdonnx.runtime.images import default_size, open_image
from sdonnx.runtime.manifest import TOKENIZERS, Manifest, text_encoders
from sdonnx.runtime.masked import crop_region
from sdonnx.runtime.memory import MemoryPolicy
from sdonnx.runtime.prompts import lora_tags, tokenize_prompt
from sdonnx.runtime.starts import ImageInput, check_mode, default_strength, inpainting_unet
from sdonnx.runtime.text import check_conditioning_fields, hidden_output
from sdonnx.runtime.tiles import check_tile
from sdonnx.runtime.tokenizer import ClipTokenizer

UNET_BYTES_PER_PIXEL_CHANNEL = 172
VAE_BYTES_PER_PIXEL_CHANNEL = 32
SCORE_BYTES = 12
MARGIN = 1.15  # allocator slack and what the estimate leaves out (prompt chunks, the PNG encoder)
NATIVE_SIZE_RATIO = 2  # beyond this factor from the native size a model draws repeats or blur
SD_CHANNELS = {"unet": 320, "vae_decoder": 128}  # first-block widths of SD 1.x/2.x, for folders without configs


@dataclass(frozen=True)
class Request:
    """A request ready to run: the config (strength resolved), the image size, the opened init image
    and mask, whether the U-Net inpaints, the batch split into runs that fit in memory, and the LoRAs
    and embeddings to apply (checked against the model by the pipeline)."""

    config: object  # GenerationConfig (typed loosely: pipeline.py imports this module)
    height: int
    width: int
    image: Image.Image | None
    mask: ImageInput | None
    inpainting: bool
    runs: tuple[int, ...]
    loras: tuple = ()
    # Textual inversion: the tokenizers that know the request's embedding words, and per text
    # encoder the token-table rows those words borrow ({} when the request names none).
    tokenizers: Mapping[str, ClipTokenizer] | None = None
    rows: Mapping[str, Mapping[int, np.ndarray]] = field(default_factory=dict)
    controls: tuple = ()  # controlnet.ControlRequest per Control, checked against the model
    hires: tuple[int, int] | None = None  # (height, width) of the hires fix's second pass, None without one


def check_request(
    manifest: Manifest, root: Path, policy: MemoryPolicy, config, image: ImageInput | None, mask: ImageInput | None,
    *, available: int | None = None, tokenizers: Mapping[str, ClipTokenizer] | None = None,
    loaded: Collection[str] = (),
) -> Request:
    """Check `config` with its init image and mask against the model; InputError naming the field.

    The returned request's config has every default resolved: steps and guidance from the model's
    recommended settings, strength from the mode.
    """
    if manifest.upscaler is not None:
        raise InputError("model", str(root), "a text-to-image model (this folder is an x4 upscaler: give it a "
                         "low-res image with Pipeline.upscale or `sdonnx upscale`)")
    config = config.with_defaults(manifest.recommended)
    if config.hires_scale is not None and config.hires_strength is None:
        config = replace(config, hires_strength=HIRES_STRENGTH)
    inpainting = inpainting_unet(manifest, root)
    check_mode(inpainting, image, mask, manifest.unet_in_channels)
    opened = open_image(image, "image") if image is not None else None
    config = _resolved_strength(config, opened, mask)
    height, width = _size(manifest, config, opened)
    if opened is not None and mask is not None:
        opened_mask = open_image(mask, "mask")
        if opened_mask.size != opened.size:
            raise InputError(
                "mask", f"{opened_mask.width}x{opened_mask.height}", f"the init image's size, {opened.width}x{opened.height}"
            )
        mask = opened_mask
    if config.only_masked:
        if mask is None:
            raise InputError("only_masked", True, "an init image and a mask (it is a way of inpainting)")
        crop_region(mask, padding=config.only_masked_padding, aspect=(width, height))  # a mask with white in it
    _check_clip_skip(manifest, config.clip_skip)
    check_conditioning_fields(manifest, config)
    check_cache_interval(manifest, config)
    if tokenizers is None:
        tokenizers = folder_tokenizers(root, manifest)
    for tokenizer in tokenizers.values():
        _check_prompts(tokenizer, config)
    hires = _hires(manifest, config, height, width, opened)
    runs = _runs(manifest, root, policy, config.batch, *(hires or (height, width)), available, loaded)
    _warn_far_from_native(manifest, height, width)
    return Request(config, height, width, opened, mask, inpainting, runs, hires=hires)


@dataclass(frozen=True)
class UpscaleRequest:
    """An x4 upscale ready to run: the config (defaults resolved), the opened low-res image, the noise
    level, the U-Net tile (None: whole) and the batch split into runs that fit in memory."""

    config: object
    image: Image.Image
    noise_level: int
    tile: int | None
    runs: tuple[int, ...]
    tokenizers: Mapping[str, ClipTokenizer] | None = None
    rows: Mapping[str, Mapping[int, np.ndarray]] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def width(self) -> int:
        return self.image.width


DEFAULT_NOISE_LEVEL = 20  # diffusers' StableDiffusionUpscalePipeline and the x4 model card's
MIN_UPSCALE_SIDE = 8
# GenerationConfig fields an upscale has no use for: its size is the image's times the VAE factor, it
# always starts from noise, and no LoRA, ControlNet, hires pass or refiner belongs to the upscaler.
_NOT_FOR_UPSCALE = ("height", "width", "strength", "hires_scale", "hires_strength", "hires_steps", "only_masked",
                    "refiner_switch", "loras", "control")


def check_upscale(
    manifest: Manifest, root: Path, policy: MemoryPolicy, config, image: ImageInput, noise_level: object,
    tile: object = None, *, tokenizers: Mapping[str, ClipTokenizer] | None = None, available: int | None = None,
    loaded: Collection[str] = (),
) -> UpscaleRequest:
    """Check an x4 upscale against the model before any graph runs; InputError naming the field.

    tile: the U-Net tile in latent pixels (= low-res image pixels), None: the memory policy's."""
    if manifest.upscaler is None:
        raise InputError("model", str(root), "an x4 upscaler folder (`sdonnx export` of a "
                         "StableDiffusionUpscalePipeline folder); this model draws from text: use generate")
    defaults = {f.name: f.default for f in fields(config)}
    for name in _NOT_FOR_UPSCALE:
        if getattr(config, name) != defaults[name]:
            raise InputError(name, getattr(config, name), f"{defaults[name]!r}: not used by an upscale "
                             "(the size is the image's x the VAE factor; no LoRA, ControlNet, hires pass or refiner)")
    if lora_tags(config.prompt):
        raise InputError("prompt", config.prompt, "no <lora:...> tags (an upscale takes no LoRA)")
    check_int("noise_level", noise_level, 0, manifest.upscaler.max_noise_level,
              what=" (the upscaler's max_noise_level: levels above it were never trained)")
    tile = policy.unet_tile if tile is None else check_tile(tile)
    if image is None:
        raise InputError("image", None, "the low-res image to upscale")
    opened = open_image(image, "image")
    f = manifest.vae_downsample
    for name, side in (("height", opened.height), ("width", opened.width)):
        if not MIN_UPSCALE_SIDE <= side <= MAX_SIDE // f:
            raise InputError(f"image {name}", side, f"{MIN_UPSCALE_SIDE} to {MAX_SIDE // f} pixels (x{f}: at most "
                             f"{MAX_SIDE} out)")
    config = config.with_defaults(manifest.recommended)
    _check_clip_skip(manifest, config.clip_skip)
    check_conditioning_fields(manifest, config)
    check_cache_interval(manifest, config)
    for tokenizer in (tokenizers if tokenizers is not None else folder_tokenizers(root, manifest)).values():
        _check_prompts(tokenizer, config)
    # The U-Net runs one tile at a time: the estimate's size is a tile's (the decode's own tiles aside).
    height, width = (opened.height, opened.width) if tile is None else (min(opened.height, tile), min(opened.width, tile))
    runs = _runs(manifest, root, policy, config.batch, height * f, width * f, available, loaded)
    return UpscaleRequest(config, opened, int(noise_level), tile, runs, tokenizers)


def folder_tokenizers(root: Path, manifest: Manifest) -> dict[str, ClipTokenizer]:
    """Each text encoder's tokenizer, read from the model folder (no graph loaded)."""
    return {name: ClipTokenizer.from_folder(root / TOKENIZERS[name], manifest.tokenizer_max_length)
            for name in text_encoders(manifest)}


HIRES_STRENGTH = 0.7  # A1111's denoising strength for the hires pass


def hires_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
    """The hires pass's (height, width): the first pass's times `scale`, rounded down to `multiple`."""
    return int(height * scale) // multiple * multiple, int(width * scale) // multiple * multiple


def _hires(manifest: Manifest, config, height: int, width: int, image) -> tuple[int, int] | None:
    """The hires pass's size, its strength and steps checked; None without a hires fix. (The config's
    hires_strength is resolved by the caller: `check_request` returns it set.)"""
    if config.hires_scale is None:
        return None
    if image is not None:
        raise InputError("hires_scale", config.hires_scale, "a text-to-image request (img2img has no hires pass)")
    size = hires_size(height, width, config.hires_scale, manifest.vae_downsample)
    for name, side in zip(("height", "width"), size):
        check_size(name, side, manifest.vae_downsample)
    strength = config.hires_strength if config.hires_strength is not None else HIRES_STRENGTH
    steps = config.hires_steps or config.steps
    if int(steps * strength) < 1:
        raise InputError("hires_strength", strength, f"at least 1/{steps}, so that hires steps * strength makes one step")
    return size


def check_strength(strength: object, steps: int | None) -> None:
    """InputError unless strength is in [0, 1] and leaves at least one of `steps` to run (steps None:
    the model's recommended, checked once known)."""
    if not is_real(strength) or not 0.0 <= strength <= 1.0:
        raise InputError("strength", strength, "a number from 0 to 1")
    if steps is not None and int(steps * strength) < 1:
        raise InputError("strength", strength, f"at least 1/{steps}, so that steps * strength makes one step")


MAX_SIDE = 8192  # pixels; A1111's API allows any size, but past this one image is gigabytes of activations


def check_size(name: str, value: object, multiple: int) -> None:
    """InputError unless `value` is a positive multiple of `multiple`, at most MAX_SIDE."""
    if not is_int(value) or value <= 0 or value % multiple or value > MAX_SIDE:
        raise InputError(name, value, f"a positive multiple of {multiple} (the VAE's downsample factor) up to {MAX_SIDE}")


def _resolved_strength(config, image: Image.Image | None, mask: object):
    """`config` with the strength this request runs at: the mode's default when it names none."""
    if image is None:
        if config.strength is not None:
            raise InputError("strength", config.strength, "an init image to go with it (img2img or inpaint)")
        return config
    strength = config.strength if config.strength is not None else default_strength(mask)
    check_strength(strength, config.steps)
    return replace(config, strength=strength)


def _size(manifest: Manifest, config, image: Image.Image | None) -> tuple[int, int]:
    """(height, width): the config's, else the init image's (rounded down), else the model's native size."""
    factor = manifest.vae_downsample
    default = default_size(image, factor) if image else (manifest.default_image_size,) * 2
    height, width = config.height or default[0], config.width or default[1]
    check_size("height", height, factor)
    check_size("width", width, factor)
    return height, width


def check_cache_interval(manifest: Manifest, config) -> None:
    """Feature caching needs the folder's shallow U-Net graph, and with LoRAs a float one: LoRAs reach it
    through the U-Net's merged weights of the same initializer names (lora.Adapters.apply), which a
    quantized graph renames."""
    interval = config.cache_interval
    if interval == 1:
        return
    if "unet_shallow" not in manifest.graphs:
        raise InputError("cache_interval", interval, "1: this folder has no unet_shallow graph, which feature caching "
                         "runs between whole U-Net steps (`sdonnx export --feature-cache` writes one)")
    precision = manifest.graphs["unet_shallow"].precision
    if (config.loras or lora_tags(config.prompt)) and precision not in ("fp32", "fp16"):
        raise InputError("cache_interval", interval, f"1 with LoRAs on this folder's {precision} shallow U-Net graph "
                         "(LoRAs reach it in fp32 and fp16 folders; or bake them in with `sdonnx export --lora`)")


def _check_clip_skip(manifest: Manifest, clip_skip: int) -> None:
    """Every text encoder must have the output clip_skip reads (known before loading for sdonnx folders)."""
    for name in text_encoders(manifest):
        outputs = [o.name for o in manifest.graphs[name].outputs]
        if clip_skip == 1 or not outputs or hidden_output(outputs, manifest.text_hidden_states, clip_skip):
            continue
        usable = [n for n in range(2, 13) if hidden_output(outputs, manifest.text_hidden_states, n)]
        raise InputError(
            "clip_skip", clip_skip, f"1 or one this text encoder was exported with ({usable or 'none'}; "
            "re-export the model with `sdonnx export` for more)"
        )


def _check_prompts(tokenizer: ClipTokenizer, config) -> None:
    """Both prompts must parse: weights in range, no more chunks than the U-Net can attend to."""
    tokenize_prompt(tokenizer, config.prompt, field="prompt")
    tokenize_prompt(tokenizer, config.negative_prompt, field="negative_prompt")


def _warn_far_from_native(manifest: Manifest, height: int, width: int) -> None:
    native = manifest.default_image_size
    ratio = max(height, width) / native, native / min(height, width)
    if max(ratio) > NATIVE_SIZE_RATIO:
        warnings.warn(
            f"size: {width}x{height} is far from this model's native {native}x{native}; expect repeated "
            "or blurred shapes, and a long run (hires fix or a model trained at that size do better)",
            stacklevel=4,
        )


def _runs(
    manifest: Manifest, root: Path, policy: MemoryPolicy, batch: int, height: int, width: int, available: int | None,
    loaded: Collection[str],
) -> tuple[int, ...]:
    """The batch as runs that fit in `available` bytes (None: what the machine has free now); `loaded`
    graphs are in memory already, so what is free now does not include them and neither does the need."""
    available = available_memory() if available is None else available
    need = estimate_peak(manifest, root, policy, batch, height, width, loaded)
    if available is None or need <= available:
        return (batch,)
    single = estimate_peak(manifest, root, policy, 1, height, width, loaded)
    if single <= available:
        per_run = max(n for n in range(1, batch + 1) if estimate_peak(manifest, root, policy, n, height, width, loaded) <= available)
        return (per_run,) * (batch // per_run) + ((batch % per_run,) if batch % per_run else ())
    low = MemoryPolicy(release_sessions=True, unet_max_batch=1, decode_tile=policy.decode_tile or 32, arena=False)
    hint = "" if policy.release_sessions else (
        f"; --low-memory (low_memory=True) needs about {_gb(estimate_peak(manifest, root, low, 1, height, width))}"
    )
    raise InputError(
        "size", f"{width}x{height}",
        f"a size that fits in memory: one image needs about {_gb(single)}, {_gb(available)} is available{hint}; "
        "or a smaller size",
    )


def estimate_peak(
    manifest: Manifest, root: Path, policy: MemoryPolicy, batch: int, height: int, width: int,
    loaded: Collection[str] = (),
) -> int:
    """Estimated peak resident bytes of one run of `batch` images at height x width (module docstring),
    less the weights of the `loaded` graphs, which are resident already."""
    f = manifest.vae_downsample
    latent_pixels = (height // f) * (width // f)
    unet_channels, heads = _first_channels(root, "unet"), _heads(root)
    attention_heads = {"fused": 0, "sliced": 1}.get(manifest.unet_attention or "full", heads)
    run_images = 1 if policy.unet_max_batch == 1 else 2 * batch  # CFG doubles the batch
    unet = run_images * (
        UNET_BYTES_PER_PIXEL_CHANNEL * unet_channels * latent_pixels + SCORE_BYTES * latent_pixels**2 * attention_heads
    )
    if policy.decode_tile is not None:
        side = min(policy.decode_tile, max(height, width) // f)
        decode_height, decode_width = min(height, side * f), min(width, side * f)
    else:
        decode_height, decode_width = height, width
    decoded_latent = (decode_height // f) * (decode_width // f)
    vae_scores = 0 if manifest.vae_attention == "fused" else SCORE_BYTES * decoded_latent**2
    vae = VAE_BYTES_PER_PIXEL_CHANNEL * _first_channels(root, "vae_decoder") * decode_height * decode_width + vae_scores
    weights = {name: size for name, size in _graph_bytes(manifest, root).items() if name not in loaded}
    resident = (max(weights.values(), default=0) if policy.release_sessions else sum(weights.values()))
    return int(MARGIN * (resident + max(unet, vae)))


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable, capped by a cgroup limit; None where unknown."""
    try:
        info = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    if "MemAvailable" not in fields:
        return None
    available = int(fields["MemAvailable"].split()[0]) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _first_channels(root: Path, component: str) -> int:
    config = _config(root, component)
    channels = config.get("block_out_channels")
    return int(channels[0]) if isinstance(channels, list) and channels else SD_CHANNELS[component]


def _heads(root: Path) -> int:
    """The U-Net's attention heads (diffusers' SD 1.x configs call the head count attention_head_dim)."""
    heads = _config(root, "unet").get("num_attention_heads") or _config(root, "unet").get("attention_head_dim")
    if isinstance(heads, list):
        return max(int(h) for h in heads)
    return int(heads) if isinstance(heads, int) else 8


def _config(root: Path, component: str) -> dict:
    try:
        data = json.loads((root / component / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _graph_bytes(manifest: Manifest, root: Path) -> dict[str, int]:
    """Each graph's file size, external data included: what its session holds resident."""
    sizes = {}
    for name, spec in manifest.graphs.items():
        folder = (root / spec.path).parent
        sizes[name] = sum(p.stat().st_size for p in folder.glob("*") if p.is_file() and p.suffix != ".json")
    return sizes


def _gb(count: int) -> str:
    return f"{count / 2**30:.1f} GB"


