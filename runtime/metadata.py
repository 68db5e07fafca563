"""PNG metadata: the A1111-style `parameters` text that lets an image be made again.

The text is A1111's "infotext", which other tools read too:

    a red cube on a table
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, ...

Sampler and schedule use A1111's display names (`sampling.SAMPLERS`' a1111_name, `SCHEDULE_NAMES`);
A1111 files of either era parse ("DPM++ 2M Karras", or "DPM++ 2M" plus "Schedule type: Karras").
Optional fields at their default are left out as A1111 does; a missing field reads back as the default.
Image k of a batch records its own seed, S + k, which regenerates it alone (see `noise`).

sdonnx writes A1111's "RNG: CPU" for its torch-compatible generator (A1111's CPU noise source is
that same generator) and "RNG: NumPy" for NumPy's; an A1111 file without "RNG" was made with GPU
noise, which sdonnx cannot replay, and reads back as the torch generator (same seed, other noise).

Model hash: A1111 writes the first 10 hex digits of the checkpoint's sha256. An ONNX folder has no
checkpoint, so sdonnx hashes what identifies its weights without reading gigabytes: the sha256 of
the U-Net's file hashes as manifest.json records them ("path sha256" lines, sorted), first 10 hex
digits. Those recorded hashes describe what ran because `ModelFolder.load` verified the files
against them (`integrity.verify_folder`). With verification off (RuntimeOptions.verify_integrity
False) the lines hold the sha256 of the U-Net files on disk instead, through the verify cache: read
once per file version, then one stat per file per image. Unchanged files give the same Model hash
either way. A folder without manifest.json (an optimum export) gets no Model hash.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdonnx import __version__
from sdonnx.errors import InputError
from sdonnx.files import replace_file
from sdonnx.runtime import integrity
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.pipeline import GenerationConfig
from sdonnx.runtime.providers import PROVIDERS, resolve_provider
from sdonnx.runtime.sampling import BY_A1111_NAME, SAMPLERS

PNG_KEY = "parameters"
SCHEDULE_NAMES = {"default": "Automatic", "karras": "Karras", "exponential": "Exponential"}
RNG_NAMES = {"torch": "CPU", "numpy": "NumPy"}
HIRES_UPSCALER_NAMES = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos"}
_SCHEDULES_BY_NAME = {name: schedule for schedule, name in SCHEDULE_NAMES.items()}
_RNGS_BY_NAME = {name: rng for rng, name in RNG_NAMES.items()}
_HIRES_UPSCALERS_BY_NAME = {name: upscaler for upscaler, name in HIRES_UPSCALER_NAMES.items()}
# One "Key: value" of the settings line; a value with commas or colons is JSON-quoted (A1111's re_param).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"
_NUMBERS = (  # (key, GenerationConfig field, type)
    ("Steps", "steps", int),
    ("CFG scale", "guidance", float),
    ("Seed", "seed", int),
    ("Denoising strength", "strength", float),
    ("Clip skip", "clip_skip", int),
    ("Guidance rescale", "guidance_rescale", float),
    ("Cache interval", "cache_interval", int),
    ("Refiner switch at", "refiner_switch", float),
    ("Hires upscale", "hires_scale", float),
    ("Hires steps", "hires_steps", int),
    ("Masked area padding", "only_masked_padding", int),
)


def format_parameters(
    config: GenerationConfig, *, seed: int, size: tuple[int, int], model: ModelFolder | None = None,
    refiner: ModelFolder | None = None, lora_hashes: Mapping[str, str] | None = None,
    controlnets: list[tuple[str, str]] | None = None, vae: tuple[str, str] | None = None,
    noise_level: int | None = None,
) -> str:
    """The `parameters` text of one image: `seed` is the image's own, `size` its (width, height).
    lora_hashes: {name: short hash} of the LoRAs applied (the image's info["lora_hashes"]), written as
    A1111's `Lora hashes: "name: hash, ..."`; the prompt keeps its <lora:...> tags.
    vae: (name, short hash) of the VAE used instead of the folder's (the image's info["vae"]).
    controlnets: (name, short hash) of each of config.control (the image's info["controlnets"]),
    written as A1111's ControlNet extension does (`ControlNet 0: "Module: none, Model: ..."`).
    noise_level: an x4 upscale's (`Noise level`), None for other images.

    Steps and guidance left open in `config` are written as they ran: the model's recommended ones.
    """
    config = config.with_defaults(model.manifest.recommended if model is not None else {})
    fields: dict[str, object] = {
        "Steps": config.steps,
        "Sampler": SAMPLERS[config.sampler].a1111_name,
        "Schedule type": SCHEDULE_NAMES[config.schedule] if config.schedule != "default" else None,
        "CFG scale": _number(config.guidance),
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
    }
    if model is not None:
        fields |= {"Model hash": model_hash(model), "Model": model.root.name}
    if vae is not None:  # a VAE of its own (the image's info["vae"]), as A1111 writes it
        fields |= {"VAE hash": vae[1], "VAE": vae[0]}
    hires = config.hires_scale is not None
    strength = config.hires_strength if hires else config.strength  # A1111 writes the hires pass's here
    fields |= {
        "Denoising strength": _number(strength) if strength not in (None, 1.0) or hires else None,
        "Clip skip": config.clip_skip if config.clip_skip != 1 else None,
        "RNG": RNG_NAMES[config.rng],
        "Guidance rescale": _number(config.guidance_rescale) if config.guidance_rescale else None,
        "Cache interval": config.cache_interval if config.cache_interval != 1 else None,
        "Guidance interval": ",".join(str(_number(v)) for v in config.guidance_interval)
        if config.guidance_interval else None,
        "Refiner": f"{refiner.root.name} [{model_hash(refiner)}]" if refiner is not None else None,
        "Refiner switch at": _number(config.refiner_switch) if config.refiner_switch is not None else None,
        "Hires upscale": _number(config.hires_scale) if hires else None,
        "Hires steps": config.hires_steps if hires and config.hires_steps else None,
        "Hires upscaler": HIRES_UPSCALER_NAMES[config.hires_upscaler] if hires else None,
        "Inpaint area": "Only masked" if config.only_masked else None,
        "Masked area padding": config.only_masked_padding if config.only_masked else None,
        "Noise level": noise_level,
        "Lora hashes": ", ".join(f"{name}: {h}" for name, h in lora_hashes.items()) if lora_hashes else None,
        **{f"ControlNet {i}": _control_text(control, name, h)
           for i, (control, (name, h)) in enumerate(zip(config.control, controlnets or ()))},
    }
    if model is not None:
        fields |= {
            "Provider": PROVIDERS[resolve_provider(model.options.provider)],  # no session reopened in low-memory mode
            "Precision": model.manifest.graphs["unet"].precision,
        }
    fields["Version"] = f"sdonnx {__version__}"
    settings = ", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items() if value is not None)
    negative = f"\n{_NEGATIVE} {config.negative_prompt}" if config.negative_prompt else ""
    return f"{config.prompt}{negative}\n{settings}"


_CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}
_RESIZE_MODES = {"stretch": "Just Resize", "crop": "Crop and Resize"}


def _control_text(control, name: str, short_hash: str) -> str:
    """One ControlNet as A1111's ControlNet extension writes it (the image was given already processed)."""
    return (f"Module: none, Model: {name} [{short_hash}], Weight: {_number(control.scale)}, "
            f"Resize Mode: {_RESIZE_MODES[control.resize]}, Guidance Start: {_number(control.start)}, "
            f"Guidance End: {_number(control.end)}, Control Mode: {_CONTROL_MODES[control.guess_mode]}")


def parse_parameters(text: str) -> dict[str, Any]:
    """A `parameters` text (sdonnx's or A1111's) -> GenerationConfig fields; unknown keys are ignored.

    InputError for a value sdonnx cannot honour (a sampler it lacks, a malformed number).
    """
    prompt, negative, raw = split_parameters(text)
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    if "Sampler" in raw:
        fields["sampler"], schedule = _sampler(raw["Sampler"])
        if schedule is not None:
            fields["schedule"] = schedule
    if raw.get("Schedule type") is not None:
        fields["schedule"] = _lookup("Schedule type", raw["Schedule type"], _SCHEDULES_BY_NAME)
    if "RNG" in raw:
        fields["rng"] = _lookup("RNG", raw["RNG"], _RNGS_BY_NAME)
    if "Guidance interval" in raw:
        try:
            fields["guidance_interval"] = tuple(float(v) for v in raw["Guidance interval"].split(","))
        except ValueError:
            raise InputError("parameters: Guidance interval", raw["Guidance interval"], "LOW,HIGH") from None
    if "Size" in raw:
        match = re.fullmatch(r"(\d+)x(\d+)", raw["Size"])
        if match is None:
            raise InputError("parameters: Size", raw["Size"], "WIDTHxHEIGHT")
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    for key, field, kind in _NUMBERS:
        if key in raw:
            try:
                fields[field] = kind(raw[key])
            except ValueError:
                raise InputError(f"parameters: {key}", raw[key], "an integer" if kind is int else "a number") from None
    if raw.get("Inpaint area") == "Only masked":
        fields["only_masked"] = True
    if "hires_scale" in fields:  # a hires-fix image: its denoising strength is the second pass's
        if "strength" in fields:
            fields["hires_strength"] = fields.pop("strength")
        if "Hires upscaler" in raw:
            fields["hires_upscaler"] = _lookup("Hires upscaler", raw["Hires upscaler"], _HIRES_UPSCALERS_BY_NAME)
    return fields


def split_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """A `parameters` text -> (prompt, negative prompt, {setting key: value as written})."""
    lines = text.strip().split("\n")
    settings = lines.pop() if len(_PARAM.findall(lines[-1])) >= 3 else ""
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.startswith(_NEGATIVE):
            negative = [line[len(_NEGATIVE):].strip()]
        else:
            (prompt if negative is None else negative).append(line)
    raw = {key.strip(): _unquote(value) for key, value in _PARAM.findall(settings)}
    return "\n".join(prompt).strip(), "\n".join(negative or []).strip(), raw


def model_hash(model: ModelFolder) -> str | None:
    """10 hex digits naming the U-Net's weights that ran (see the module docstring); None without a manifest.

    Verified at load: the manifest's recorded hashes. Verification off: the files' sha256 on disk,
    from the verify cache (`integrity.file_digests`), so gigabytes are read once, not per image.
    """
    files = _unet_files(model.manifest)
    if not files:
        return None
    if not model.options.verify_integrity:
        files = integrity.file_digests(model.root, sorted(files))
    return _hash_lines(files)


def recorded_hash(manifest) -> str | None:
    """The Model hash of a folder whose files match what its manifest records (as `ModelFolder.load`
    verifies them), from the manifest alone: for listing models without loading them."""
    files = _unet_files(manifest)
    return _hash_lines(files) if files else None


def _unet_files(manifest) -> dict[str, str]:
    unet_dir = PurePosixPath(manifest.graphs["unet"].path).parent
    return {path: digest for path, digest in manifest.files.items() if PurePosixPath(path).parent == unet_dir}


def _hash_lines(files: Mapping[str, str]) -> str:
    lines = sorted(f"{path} {digest}" for path, digest in files.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]


def read_parameters(path: Path) -> str:
    """The `parameters` text of the PNG at `path`; InputError if it is no image or has none."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(PNG_KEY)
    except (OSError, UnidentifiedImageError) as e:
        raise InputError("from_png", str(path), f"a readable PNG file ({e})") from None
    if not text or not text.strip():
        raise InputError("from_png", str(path), f"a PNG with a {PNG_KEY!r} text chunk (sdonnx and A1111 write one)")
    return text


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """`image` as PNG bytes, with its `parameters` text when given (what the server sends)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(PNG_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Write `image` with its `parameters` text to `path` atomically: a temporary file, then a rename.

    Through `sdonnx.files.replace_file`: a new file gets mode 0666 less the umask, a replaced file keeps
    its mode, and a symlink at `path` is written through to its target (the link stays), as PIL's save does.
    """
    data = png_bytes(image, parameters)
    replace_file(path, lambda f: f.write(data))


def _sampler(name: str) -> tuple[str, str | None]:
    """"DPM++ 2M Karras" -> ("dpmpp_2m", "karras"); a name without a suffix -> (sampler, None)."""
    if name in BY_A1111_NAME:
        return BY_A1111_NAME[name], None
    base, _, suffix = name.rpartition(" ")
    if base in BY_A1111_NAME and suffix in _SCHEDULES_BY_NAME:
        return BY_A1111_NAME[base], _SCHEDULES_BY_NAME[suffix]
    return _lookup("Sampler", name, BY_A1111_NAME), None


def _lookup(key: str, value: str, names: dict[str, str]) -> str:
    if value not in names:
        raise InputError(f"parameters: {key}", value, f"one of {sorted(set(names))} (sdonnx has no other)")
    return names[value]


def _number(value: float) -> int | float:
    """7.0 -> 7 and 7.5 -> 7.5, as A1111 writes numbers; no precision lost."""
    return int(value) if float(value).is_integer() else float(value)


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',\n:"') else value


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"') and value.endswith('"') and len(value) > 1:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
