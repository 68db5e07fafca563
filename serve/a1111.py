"""AUTOMATIC1111's `/sdapi/v1` request and response shapes, and their translation to sdonnx's.

Request bodies are pydantic models with A1111's field names (modules/api/models.py); unknown fields
are ignored as A1111 ignores them. Fields A1111 has and sdonnx does not honour are accepted at their
default values and refused otherwise (422 naming the field), so a client never gets an image made
without the hires fix, face restoration or script it asked for. Where a field is left out, the
model's own settings apply (its native size, its recommended steps and CFG scale) rather than
A1111's SD 1.5 defaults (512x512, 50 steps), which suit few other models.

`translate` turns a body into a `Work`, every value checked against the model's facts before it
queues; `run` executes it on the worker thread (n_iter iterations of batch_size images, image k of
iteration i seeded seed + i*batch_size + k as A1111 does); `response` shapes what A1111 returns:
base64 PNGs with their `parameters` text, the request echoed, and the `info` JSON string.

Names only, never paths: a model is one of the catalog's, a LoRA (`<lora:NAME:W>`) one of the LoRA
folder's or the model's own, so no request field reaches a file outside them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from sdonnx import __version__
from sdonnx.errors import InputError
from sdonnx.runtime.metadata import format_parameters, png_bytes, split_parameters
from sdonnx.runtime.controlnet import Control
from sdonnx.runtime.pipeline import GenerationCancelled, GenerationConfig
from sdonnx.runtime.prompts import lora_tags
from sdonnx.runtime.sampling import BY_A1111_NAME, SAMPLERS
from sdonnx.serve.catalog import Catalog
from sdonnx.serve.config import Limits

MAX_SEED = 2**32 - 1  # a random seed short enough to retype, as A1111 draws them
MAX_ITERATIONS = 64
# A1111's scheduler names and labels -> sdonnx's schedule kinds; the others (uniform, sgm_uniform, ...) it lacks.
SCHEDULERS = {"automatic": "default", "karras": "karras", "exponential": "exponential"}
SCHEDULER_LABELS = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential"}
# GenerationConfig's field -> the A1111 field it came from, so a 422 names what the client sent.
A1111_FIELD = {
    "guidance": "cfg_scale", "batch": "batch_size", "strength": "denoising_strength", "sampler": "sampler_name",
    "schedule": "scheduler", "image": "init_images", "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "loras": "prompt", "hires_scale": "hr_scale", "hires_strength": "denoising_strength",
    "hires_steps": "hr_second_pass_steps", "hires_upscaler": "hr_upscaler",
    "only_masked_padding": "inpaint_full_res_padding",
}
HR_UPSCALERS = {"Latent": "latent", "Latent (nearest)": "latent-nearest", "Lanczos": "lanczos"}
# Fields sdonnx does not honour, with the value that means "off" (anything else is refused).
UNSUPPORTED = {
    "restore_faces": False, "tiling": False, "subseed_strength": 0.0, "styles": [],
    "script_name": None, "refiner_checkpoint": None,
}
# A1111's ControlNet extension, as alwayson_scripts["controlnet"]["args"] units (what webuiapi sends).
CONTROL_MODES = {"Balanced": False, "ControlNet is more important": True, 0: False, 2: True}
RESIZE_MODES = {"Just Resize": "stretch", "Crop and Resize": "crop", 0: "stretch", 1: "crop"}
FILL = ("Resize and Fill", 2)  # padding: the same as stretching when the control image has the output's shape
CONTROL_MODULES = ("none", "canny")
# With enable_hr, the hires pass's own settings sdonnx does not honour (it reuses the first pass's).
HR_UNSUPPORTED = {"hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None}


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI, the fields sdonnx reads)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: a random seed")
    sampler_name: str | None = Field(None, description='A1111 sampler name ("Euler a", "DPM++ 2M", ...)')
    sampler_index: str = Field("Euler", description="the older name of sampler_name")
    scheduler: str | None = Field(None, description="automatic, karras or exponential")
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = Field(None, description="default: the model's recommended steps")
    cfg_scale: float | None = Field(None, description="default: the model's recommended guidance")
    width: int | None = Field(None, description="default: the model's native size")
    height: int | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    enable_hr: bool = Field(False, description="the hires fix: draw at width x height, upscale by hr_scale, "
                            "img2img there at denoising_strength")
    hr_scale: float = 2.0
    hr_upscaler: str | None = Field(None, description="Latent (default), Latent (nearest) or Lanczos")
    hr_second_pass_steps: int = Field(0, description="0: steps")
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    restore_faces: bool | None = None
    tiling: bool | None = None
    subseed_strength: float = 0.0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    refiner_checkpoint: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields and the init image, mask and strength."""

    init_images: list[str] = Field(default_factory=list, description="base64 images, with or without a data: prefix")
    mask: str | None = Field(None, description="base64 mask, white = repaint")
    inpainting_mask_invert: int = Field(0, description="1: repaint the black part instead")
    resize_mode: int = Field(0, description="0: just resize, 1: crop and resize")
    inpaint_full_res: bool = Field(True, description="with a mask: repaint only the masked area at width x height "
                                   "(A1111's default), else the whole picture")
    inpaint_full_res_padding: int = Field(0, description="pixels around the mask's box")
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations, OpenAI's image API (the fields a local model can honour)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    n: int = 1
    size: str | None = Field(None, description='"WIDTHxHEIGHT"; default: the model\'s native size')
    response_format: str = "b64_json"
    model: str | None = None


@dataclass(frozen=True)
class Work:
    """A checked request: the model to run it on, its config (seed chosen), n_iter iterations, and
    the init image and mask (img2img)."""

    model: str
    config: GenerationConfig
    n_iter: int
    label: str
    image: Image.Image | None = None
    mask: Image.Image | None = None
    vae: str | None = None  # a served VAE's name (A1111's sd_vae), None: the model's own


@dataclass(frozen=True)
class Result:
    """What a job made: the images with their infotexts, and whether it was interrupted."""

    images: tuple[Image.Image, ...]
    infotexts: tuple[str, ...]
    model_title: str
    interrupted: bool
    timestamp: str  # when the job began, A1111's job_timestamp


def translate(body: Txt2ImgRequest, catalog: Catalog, current: str, *, clip_skip: int = 1,
              limits: Limits = Limits(), vae: str | None = None) -> Work:
    """`body` -> Work, checked against the server's limits and the model (InputError naming A1111's
    field) without loading it. current: the model /options selected; override_settings'
    sd_model_checkpoint may name another."""
    img2img = isinstance(body, Img2ImgRequest)
    for name, off in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value is not None and value != off:
            raise InputError(name, value, f"{off!r}: sdonnx does not support it")
    overrides = dict(body.override_settings or {})
    model = catalog.name_of(overrides.pop("sd_model_checkpoint", current), "override_settings.sd_model_checkpoint")
    clip_skip = overrides.pop("CLIP_stop_at_last_layers", clip_skip)
    vae = catalog.vae_of(overrides.pop("sd_vae", vae), model, "override_settings.sd_vae")
    check_iterations(body.n_iter)
    image, mask = read_images(body) if img2img else (None, None)
    sampler, schedule = sampler_and_schedule(body.sampler_name or body.sampler_index, body.scheduler)
    seed = secrets.randbelow(MAX_SEED + 1) if body.seed in (-1, None) else body.seed
    fields = dict(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, guidance=body.cfg_scale,
        sampler=sampler, schedule=schedule, seed=seed, batch=body.batch_size, height=body.height, width=body.width,
        clip_skip=clip_skip, strength=body.denoising_strength if img2img else None,
        **({"only_masked": True, "only_masked_padding": body.inpaint_full_res_padding}
           if img2img and mask is not None and body.inpaint_full_res else {}),
        **(hires_fields(body) if body.enable_hr and not img2img else {}),
    )
    fields["control"] = controls_from(body.alwayson_scripts, catalog.controlnets(model), body.width, body.height)
    try:
        config = GenerationConfig(**fields)
        check_seed_range(config, body.n_iter)
        check_lora_names(config.prompt, catalog.loras(model))
        request = catalog.check(model, config, image, mask)
    except InputError as e:
        raise as_a1111(e) from None
    check_limits(request.config, body.n_iter, request.height, request.width, limits)
    if request.hires is not None and max(request.hires) > limits.max_side:
        raise InputError("hr_scale", body.hr_scale, f"an upscaled size of at most {limits.max_side} on this server "
                         f"(--max-side); {request.hires[1]}x{request.hires[0]} asked")
    return Work(model, request.config, body.n_iter, "img2img" if img2img else "txt2img", image, mask, vae)


def run(work: Work, worker, catalog: Catalog) -> Result:
    """Run `work` on the worker thread: n_iter generations of its batch; interrupt keeps what is done."""
    timestamp = time.strftime("%Y%m%d%H%M%S")
    pipe = catalog.pipeline(work.model, work.vae)
    worker.begin(work.n_iter, work.config.steps)
    images, infotexts = [], []
    for i in range(work.n_iter):
        if not worker.next_iteration(i):
            break
        config = replace(work.config, seed=work.config.seed + i * work.config.batch)
        try:
            made = pipe.generate(config, image=work.image, mask=work.mask, callback=worker.on_step, previews=True)
        except GenerationCancelled:
            continue  # skipped (go on) or interrupted (next_iteration stops)
        except InputError as e:  # what only the loaded model can check (a prompt's length, say)
            raise as_a1111(e) from None
        for image in made:
            images.append(image)
            infotexts.append(format_parameters(config, seed=image.info["seed"], model=pipe.model,
                                               size=image.info.get("generation_size", image.size),
                                               lora_hashes=image.info.get("lora_hashes"),
                                               controlnets=image.info.get("controlnets"),
                                               vae=image.info.get("vae")))
    return Result(tuple(images), tuple(infotexts), catalog.title(work.model), worker.interrupted, timestamp)


def response(body: BaseModel, work: Work, result: Result) -> dict[str, Any]:
    """A1111's TextToImageResponse / ImageToImageResponse: images, the request echoed, info JSON."""
    config = work.config
    images = [png_base64(image, text) for image, text in zip(result.images, result.infotexts)]
    if isinstance(body, Img2ImgRequest) and body.include_init_images:
        images += body.init_images
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest):
        parameters.update(init_images=None, mask=None)  # as A1111: the request without its images
    seeds = [image.info["seed"] for image in result.images]
    info = {
        "prompt": config.prompt, "all_prompts": [config.prompt] * len(seeds),
        "negative_prompt": config.negative_prompt, "all_negative_prompts": [config.negative_prompt] * len(seeds),
        "seed": config.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": result.images[0].width if result.images else config.width,
        "height": result.images[0].height if result.images else config.height,
        "sampler_name": SAMPLERS[config.sampler].a1111_name, "scheduler": _scheduler_name(config.schedule),
        "cfg_scale": config.guidance, "steps": config.steps, "batch_size": config.batch, "n_iter": work.n_iter,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": work.model,
        "sd_model_hash": result.model_title.rpartition("[")[2].rstrip("]") or None, "sd_vae_name": work.vae,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": config.strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": list(result.infotexts), "styles": [], "job_timestamp": result.timestamp,
        "clip_skip": config.clip_skip,
        "is_using_inpainting_conditioning": False, "interrupted": result.interrupted,
        "nsfw": [bool(image.info.get("nsfw", False)) for image in result.images],  # the safety checker's flags
        "version": f"sdonnx {__version__}",
    }
    return {"images": images if body.send_images else [], "parameters": parameters, "info": json.dumps(info)}


def translate_openai(body: OpenAIImageRequest, catalog: Catalog, current: str, *, limits: Limits = Limits()) -> Work:
    """OpenAI's generations request as a txt2img one: n images, size "WxH"; only b64_json responses."""
    if body.response_format != "b64_json":
        raise InputError("response_format", body.response_format, '"b64_json" (this server keeps no image URLs)')
    width = height = None
    if body.size is not None:
        parts = body.size.split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise InputError("size", body.size, '"WIDTHxHEIGHT", e.g. "512x512"')
        width, height = int(parts[0]), int(parts[1])
    request = Txt2ImgRequest(prompt=body.prompt, batch_size=body.n, width=width, height=height,
                             override_settings={"sd_model_checkpoint": body.model} if body.model else None)
    try:
        return translate(request, catalog, current, limits=limits)
    except InputError as e:
        raise InputError({"batch_size": "n", "width": "size", "height": "size",
                          "override_settings.sd_model_checkpoint": "model"}.get(e.field, e.field),
                         e.received, e.expected) from None


def png_info(body: PngInfoRequest) -> dict[str, Any]:
    """POST /sdapi/v1/png-info: the image's `parameters` text, its settings under A1111's keys, and
    its other text chunks."""
    image = decode_image(body.image, "image")
    items = {k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    parameters: dict[str, Any] = {}
    if text.strip():
        prompt, negative, raw = split_parameters(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **raw}
    return {"info": text, "items": items, "parameters": parameters}


def samplers() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: A1111 names, sdonnx's as aliases."""
    names: dict[str, list[str]] = {}
    for info in SAMPLERS.values():
        names.setdefault(info.a1111_name, []).append(info.name)
    return [{"name": name, "aliases": aliases, "options": {}} for name, aliases in names.items()]


def schedulers() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers."""
    return [{"name": name, "label": SCHEDULER_LABELS[name], "aliases": None,
             "default_rho": 7.0 if name == "karras" else -1, "need_inner_model": False} for name in SCHEDULERS]


def sampler_and_schedule(sampler: str, scheduler: str | None) -> tuple[str, str]:
    """A1111's sampler_name ("DPM++ 2M", or the older "DPM++ 2M Karras") and scheduler (name or label)."""
    base, _, suffix = sampler.rpartition(" ")
    schedule = "default"
    if sampler not in BY_A1111_NAME and base in BY_A1111_NAME and suffix.lower() in SCHEDULERS:
        sampler, schedule = base, SCHEDULERS[suffix.lower()]
    if sampler in BY_A1111_NAME:
        sampler = BY_A1111_NAME[sampler]
    elif sampler not in SAMPLERS:
        raise InputError("sampler_name", sampler, f"one of {sorted(BY_A1111_NAME)}")
    if scheduler is not None:
        key = scheduler.lower()
        if key not in SCHEDULERS:
            raise InputError("scheduler", scheduler, f"one of {sorted(SCHEDULERS)} (sdonnx has no other)")
        schedule = SCHEDULERS[key] if key != "automatic" else schedule
    if schedule not in SAMPLERS[sampler].schedules:
        raise InputError("scheduler", scheduler or schedule, f"one of {SAMPLERS[sampler].schedules} for {sampler}")
    return sampler, schedule


def controls_from(scripts: dict[str, Any] | None, known: Mapping[str, Path], width: int | None,
                  height: int | None) -> tuple[Control, ...]:
    """alwayson_scripts -> Controls: the ControlNet extension's enabled units, each checked and named
    `alwayson_scripts.controlnet.args.I.FIELD`; any other script is refused (sdonnx runs none)."""
    scripts = dict(scripts or {})
    units = []
    for key in list(scripts):
        if key.lower() == "controlnet":
            args = scripts.pop(key).get("args", []) if isinstance(scripts[key], dict) else None
            if not isinstance(args, list):
                raise InputError(f"alwayson_scripts.{key}", scripts.get(key), '{"args": [unit, ...]}')
            units += [(f"alwayson_scripts.{key}.args.{i}", unit) for i, unit in enumerate(args)]
    if scripts:
        raise InputError("alwayson_scripts", sorted(scripts), "only controlnet (sdonnx runs no other script)")
    controls = []
    for field, unit in units:
        if not isinstance(unit, dict):
            raise InputError(field, unit, "a ControlNet unit object")
        if unit.get("enabled", True):
            controls.append(control_unit(field, unit, known, width, height))
    return tuple(controls)


def control_unit(field: str, unit: dict, known: Mapping[str, Path], width: int | None, height: int | None) -> Control:
    """One ControlNet unit of A1111's extension as a Control; InputError naming `field`.FIELD."""
    model = str(unit.get("model", "")).split(" [")[0]  # "name [hash]", as the extension lists them
    if model not in known:
        raise InputError(f"{field}.model", unit.get("model"), f"one of {sorted(known)} (GET /controlnet/model_list)")
    image = unit.get("image") or unit.get("input_image")
    if isinstance(image, dict):  # the extension's newer {"image": ..., "mask": ...}
        image = image.get("image")
    if not image:
        raise InputError(f"{field}.image", image, "a base64 control image")
    picture = decode_image(image, f"{field}.image")
    module = str(unit.get("module", "none")).lower()
    if module not in CONTROL_MODULES:
        raise InputError(f"{field}.module", unit.get("module"), f"one of {list(CONTROL_MODULES)}: give a processed "
                         "control image (sdonnx runs no model-based preprocessor)")
    if module == "canny":
        from sdonnx.runtime.preprocess import canny

        thresholds = [unit.get("threshold_a", 100), unit.get("threshold_b", 200)]
        for i, value in enumerate(thresholds):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not float(value).is_integer():
                raise InputError(f"{field}.threshold_{'ab'[i]}", value, "an integer from 0 to 255")
        try:
            picture = canny(picture, int(thresholds[0]), int(thresholds[1]))
        except InputError as e:
            raise InputError(f"{field}.threshold_{'a' if e.field == 'low' else 'b'}", e.received, e.expected) from None
    mode = _choice(unit.get("control_mode", "Balanced"))
    if mode not in CONTROL_MODES:
        raise InputError(f"{field}.control_mode", mode, '"Balanced" or "ControlNet is more important"')
    resize = _choice(unit.get("resize_mode", "Just Resize"))
    if resize in FILL and width and height and picture.width * height == picture.height * width:
        resize = "Just Resize"
    if resize not in RESIZE_MODES:
        raise InputError(f"{field}.resize_mode", resize, '"Just Resize", "Crop and Resize", or "Resize and Fill" '
                         "for a control image of the output's aspect ratio")
    try:
        return Control(known[model], picture, scale=unit.get("weight", 1.0), start=unit.get("guidance_start", 0.0),
                       end=unit.get("guidance_end", 1.0), guess_mode=CONTROL_MODES[mode], resize=RESIZE_MODES[resize])
    except InputError as e:
        names = {"control.scale": "weight", "control.start": "guidance_start", "control.end": "guidance_end"}
        raise InputError(f"{field}.{names.get(e.field, e.field)}", e.received, e.expected) from None


def _choice(value: object) -> str | int | None:
    """A unit's enum value as given (a name or an index), None for anything else (a list, a bool)."""
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def hires_fields(body: Txt2ImgRequest) -> dict[str, Any]:
    """A1111's enable_hr fields as GenerationConfig's hires_* ones."""
    for name, off in HR_UNSUPPORTED.items():
        if getattr(body, name) not in (off, None):
            raise InputError(name, getattr(body, name), f"{off!r}: sdonnx's hires pass reuses the first pass's")
    for name, first in (("hr_prompt", body.prompt), ("hr_negative_prompt", body.negative_prompt)):
        if getattr(body, name) not in ("", first):
            raise InputError(name, getattr(body, name), f"\"\" or {name[3:]}'s: the hires pass reuses it")
    upscaler = body.hr_upscaler or "Latent"
    if upscaler not in HR_UPSCALERS:
        raise InputError("hr_upscaler", upscaler, f"one of {sorted(HR_UPSCALERS)} (sdonnx has no other)")
    return dict(hires_scale=body.hr_scale, hires_strength=body.denoising_strength,
                hires_steps=body.hr_second_pass_steps or None, hires_upscaler=HR_UPSCALERS[upscaler])


def check_limits(config: GenerationConfig, n_iter: int, height: int, width: int, limits: Limits) -> None:
    """The server's own limits (`sdonnx serve --max-steps/--max-images/--max-side`)."""
    if config.steps > limits.max_steps:
        raise InputError("steps", config.steps, f"at most {limits.max_steps} on this server (--max-steps)")
    if config.batch * n_iter > limits.max_images:
        raise InputError("batch_size", config.batch, f"batch_size x n_iter ({n_iter}) at most {limits.max_images} "
                         "on this server (--max-images)")
    for name, side in (("width", width), ("height", height)):
        if side > limits.max_side:
            raise InputError(name, side, f"at most {limits.max_side} on this server (--max-side)")


def check_iterations(n_iter: object) -> None:
    if not isinstance(n_iter, int) or not 1 <= n_iter <= MAX_ITERATIONS:
        raise InputError("n_iter", n_iter, f"an integer from 1 to {MAX_ITERATIONS}")


def check_seed_range(config: GenerationConfig, n_iter: int) -> None:
    """Every image's seed (seed + i * batch + k) must be a seed too."""
    last = config.seed + n_iter * config.batch - 1
    if last > 2**64 - 1:
        raise InputError("seed", config.seed,
                         f"at most {2**64 - n_iter * config.batch} for {n_iter} x {config.batch} images")


def check_lora_names(prompt: str, names: Mapping[str, Path]) -> None:
    """Each <lora:NAME:W> must name one of `names` (the LoRA folder's and the model's own): no paths."""
    for name, *_ in lora_tags(prompt):
        if name not in names:
            raise InputError("prompt", f"<lora:{name}:...>",
                             f"a LoRA name from GET /sdapi/v1/loras ({', '.join(sorted(names)[:20]) or 'none here'})")


def read_images(body: Img2ImgRequest) -> tuple[Image.Image, Image.Image | None]:
    """The first init image (crop-resized to width x height for resize_mode 1) and the mask, decoded."""
    if not body.init_images:
        raise InputError("init_images", [], "one base64 image")
    image = decode_image(body.init_images[0], "init_images")
    if body.resize_mode not in (0, 1):
        raise InputError("resize_mode", body.resize_mode, "0 (just resize) or 1 (crop and resize)")
    if body.resize_mode == 1 and body.width and body.height:
        image = ImageOps.fit(image.convert("RGB"), (body.width, body.height), Image.Resampling.LANCZOS)
    mask = None
    if body.mask is not None:
        mask = decode_image(body.mask, "mask").convert("L")
        if body.inpainting_mask_invert not in (0, 1):
            raise InputError("inpainting_mask_invert", body.inpainting_mask_invert, "0 or 1")
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    return image, mask


def decode_image(text: str, field: str) -> Image.Image:
    """A base64 image, with or without a `data:image/...;base64,` prefix, fully read."""
    if not isinstance(text, str):
        raise InputError(field, type(text).__name__, "a base64 image")
    data = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, ValueError):
        shown = text[:40] + ("..." if len(text) > 40 else "")
        raise InputError(field, shown, "base64 (with or without a data: prefix)") from None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        why = "not an image Pillow reads" if isinstance(e, UnidentifiedImageError) else str(e)
        raise InputError(field, f"{len(data)} base64 characters", f"a PNG, JPEG or WebP image ({why})") from None
    return image


def png_base64(image: Image.Image, parameters: str) -> str:
    """The image as a base64 PNG carrying its A1111 `parameters` text."""
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


def as_a1111(error: InputError) -> InputError:
    """`error` with its field named as the A1111 request spells it."""
    if error.field.startswith("control."):  # checked against the model (size, family): the units' field
        return InputError("alwayson_scripts.controlnet.args." + error.field[len("control."):], error.received,
                          error.expected)
    head, sep, rest = error.field.partition(":")
    field = A1111_FIELD.get(head, head) + sep + rest
    return InputError(field, error.received, error.expected) if field != error.field else error


def _scheduler_name(schedule: str) -> str:
    return next(name for name, kind in SCHEDULERS.items() if kind == schedule)
