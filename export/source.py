"""Resolve an export SOURCE (diffusers folder, hub id, single-file checkpoint) into PyTorch modules."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdonnx.errors import ExportError, InputError
from sdonnx.runtime.manifest import PREDICTION_TYPES, TIMESTEP_SPACINGS, TrainingSchedule

# What a diffusers Stable Diffusion folder must hold for the four graphs, tokenizer and schedule.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# SDXL (a U-Net with "text_time" conditioning) adds the pooled, projected second encoder and its tokenizer;
# the refiner (StableDiffusionXLImg2ImgPipeline) has only those, its model_index says text_encoder: [null, null].
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
TEXT_TIME = "text_time"
# What SDXL's time_ids hold, by count: (height, width) pairs, or the refiner's aesthetic score instead of the
# target size (diffusers' StableDiffusionXL*Pipeline._get_add_time_ids).
TIME_IDS = {
    6: ("original_size", "crops_coords_top_left", "target_size"),
    5: ("original_size", "crops_coords_top_left", "aesthetic_score"),
}
# SD's x4 upscaler (StableDiffusionUpscalePipeline) adds the DDPM schedule that noises the low-res image; its
# U-Net takes latents || that image and the noise level as class labels (diffusers' default max: 350).
UPSCALER_PARTS = ("low_res_scheduler",)
MAX_NOISE_LEVEL = 350
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TextTime:
    """SDXL's extra U-Net conditioning, read from the U-Net and text_encoder_2 configs.

    text_embeds_dim: text_encoder_2's projection (the U-Net's text_embeds input); time_ids: what the
    time_ids input holds (5 or 6 values, TIME_IDS).
    """

    text_embeds_dim: int
    time_ids: tuple[str, ...]
    time_id_count: int


@dataclass(frozen=True)
class UpscalerSource:
    """What an x4 upscaler adds: the low-res image's noise schedule (low_res_scheduler's config) and
    the highest noise level the U-Net's class embedding was trained for (model_index.json)."""

    low_res_scheduler_config: dict
    max_noise_level: int


@dataclass
class SourceModel:
    """The PyTorch side of a Stable Diffusion checkpoint, as the exporter needs it (fp32, eval mode).

    SD 1.x/2.x: text_encoder and tokenizer. SDXL: also text_encoder_2 (CLIPTextModelWithProjection) and
    tokenizer_2; the refiner has only those (text_encoder and tokenizer None). pipeline_config holds
    model_index.json's pipeline settings (force_zeros_for_empty_prompt, requires_aesthetics_score, ...).
    """

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel, or None (SDXL refiner)
    tokenizer: Any  # transformers.CLIPTokenizer, or None (SDXL refiner)
    scheduler_config: dict
    description: str  # what SOURCE was, recorded in the manifest
    text_encoder_2: Any = None  # transformers.CLIPTextModelWithProjection (SDXL)
    tokenizer_2: Any = None  # transformers.CLIPTokenizer (SDXL; pads with "!")
    pipeline_config: dict = field(default_factory=dict)
    # diffusers' StableDiffusionSafetyChecker and its CLIP preprocessing config, when the folder has them.
    safety_checker: Any = None
    feature_extractor: dict | None = None
    upscaler: UpscalerSource | None = None  # SD's x4 upscaler (StableDiffusionUpscalePipeline)
    # Read once from the configs here, so that they outlive the modules (released as their graphs are done).
    text_time: TextTime | None = field(init=False, default=None)
    text_widths: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.text_widths = {
            name: int(module.config.hidden_size)
            for name in ("text_encoder", "text_encoder_2")
            if (module := getattr(self, name)) is not None
        }
        self.text_time = text_time_conditioning(self)
        check_class_labels(self)

    @property
    def sdxl(self) -> bool:
        return self.text_time is not None

    @property
    def requires_aesthetics_score(self) -> bool:
        return self.text_time is not None and "aesthetic_score" in self.text_time.time_ids


def text_time_conditioning(source: SourceModel) -> TextTime | None:
    """SDXL's text_embeds width and time_ids from the configs; None for an SD 1.x/2.x U-Net.

    The U-Net's add_embedding takes text_embeds || sinusoidal(time_ids), so
    projection_class_embeddings_input_dim = text_encoder_2's projection_dim + count * addition_time_embed_dim.
    Raises ExportError when the parts do not fit one another (nothing is exported then).
    """
    unet = source.unet.config
    kind = getattr(unet, "addition_embed_type", None)
    if kind is None:
        if source.text_encoder_2 is not None:
            raise ExportError(
                f"text_encoder_2: the source has one, but its U-Net has no SDXL conditioning "
                f"(unet.addition_embed_type is null, expected {TEXT_TIME!r})"
            )
        if source.text_encoder is None:
            raise ExportError("text_encoder: missing, and the U-Net has no SDXL (text_time) conditioning")
        return None
    if kind != TEXT_TIME:
        raise ExportError(
            f"unet.addition_embed_type: got {kind!r}, expected null (SD 1.x/2.x) or {TEXT_TIME!r} (SDXL)"
        )
    if source.text_encoder_2 is None or source.tokenizer_2 is None:
        raise ExportError(
            "text_encoder_2: an SDXL (text_time) U-Net needs text_encoder_2 (CLIPTextModelWithProjection) "
            "and tokenizer_2 for its pooled text_embeds"
        )
    if not hasattr(source.text_encoder_2, "text_projection"):
        raise ExportError(
            f"text_encoder_2: got {type(source.text_encoder_2).__name__}, expected CLIPTextModelWithProjection "
            "(SDXL's U-Net takes its projected pooled output as text_embeds)"
        )
    text_embeds_dim = int(source.text_encoder_2.config.projection_dim)
    time_dim = int(unet.addition_time_embed_dim)
    total = int(unet.projection_class_embeddings_input_dim)
    count, rest = divmod(total - text_embeds_dim, time_dim)
    if rest or count not in TIME_IDS:
        raise ExportError(
            f"unet.projection_class_embeddings_input_dim: got {total}, expected text_encoder_2's projection_dim "
            f"{text_embeds_dim} + 5 or 6 time ids x addition_time_embed_dim {time_dim} "
            f"({', '.join(str(text_embeds_dim + n * time_dim) for n in sorted(TIME_IDS))})"
        )
    aesthetic = source.pipeline_config.get("requires_aesthetics_score")
    if aesthetic is not None and bool(aesthetic) != (count == 5):
        raise ExportError(
            f"model_index.json: requires_aesthetics_score is {str(aesthetic).lower()}, but the U-Net takes "
            f"{count} time ids ({'with' if count == 5 else 'without'} an aesthetic score)"
        )
    widths = [source.text_widths[name] for name in ("text_encoder", "text_encoder_2") if name in source.text_widths]
    if sum(widths) != int(unet.cross_attention_dim):
        raise ExportError(
            f"unet.cross_attention_dim: got {unet.cross_attention_dim}, expected the text encoders' widths "
            f"{' + '.join(map(str, widths))} = {sum(widths)} (SDXL concatenates their hidden states)"
        )
    return TextTime(text_embeds_dim, TIME_IDS[count], count)


def check_class_labels(source: SourceModel) -> None:
    """A U-Net with class embeddings must be an x4 upscaler's: latents || the 3-channel low-res image,
    one class per noise level up to max_noise_level. ExportError otherwise (nothing is exported)."""
    unet, upscaler = source.unet.config, source.upscaler
    classes = getattr(unet, "num_class_embeds", None)
    if upscaler is None:
        if classes is not None or getattr(unet, "class_embed_type", None) is not None:
            raise ExportError("unet.num_class_embeds: a class-conditional U-Net, expected none (only the x4 upscaler's "
                              "noise-level classes are supported, with its low_res_scheduler/)")
        return
    latent = int(source.vae.config.latent_channels)
    if int(unet.in_channels) != latent + 3:
        raise ExportError(f"unet.in_channels: got {unet.in_channels}, expected the x4 upscaler's {latent + 3} "
                          f"(vae.latent_channels {latent} + the 3 channels of the low-res image)")
    if classes is None or int(classes) <= upscaler.max_noise_level:
        raise ExportError(f"unet.num_class_embeds: got {classes}, expected more than model_index.json's "
                          f"max_noise_level {upscaler.max_noise_level} (one class per noise level)")


def load_source(source: str, *, allow_pickle: bool = False, config: Path | None = None) -> SourceModel:
    """Load SOURCE: a diffusers folder, a single-file checkpoint, or a hub id ("org/name").

    Raises InputError for a SOURCE of the wrong kind and ExportError for weights that cannot be read.
    """
    path = Path(source).expanduser()
    if path.is_file():
        from sdonnx.export.single_file import load_single_file  # refuses pickles unless allow_pickle

        return load_single_file(path, allow_pickle=allow_pickle, config=config)
    if config is not None:
        raise InputError("config", str(config), "only with a single-file SOURCE (.safetensors checkpoint)")
    if path.is_dir():
        return load_folder(path, allow_pickle=allow_pickle, description=f"diffusers folder {path.resolve()}")
    if _HUB_ID.match(source):
        from sdonnx.export import hub

        try:
            folder = hub.download(source)
        except ExportError as e:
            raise ExportError(f"source: {source!r} is no local path, so it was read as a hub id: {e}") from e
        return load_folder(folder, allow_pickle=allow_pickle, description=f"hub {source}")
    raise InputError(
        "source", source, "an existing diffusers folder, a .safetensors checkpoint or a hub id like 'org/name'"
    )


def load_folder(folder: Path, *, allow_pickle: bool, description: str) -> SourceModel:
    """Load each component of a diffusers folder on its own with from_pretrained, as fp32 in eval mode.

    SDXL folders (model_index.json lists text_encoder_2, or the U-Net has text_time conditioning) need
    text_encoder_2/ and tokenizer_2/ too; text_encoder/ and tokenizer/ unless model_index.json says
    [null, null] for them (the refiner).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    pipeline_config = read_model_index(folder)
    parts = pipeline_parts(folder, pipeline_config)
    missing = [name for name in ("model_index.json", *parts) if not (folder / name).exists()]
    if missing:
        kind = "an SDXL" if "text_encoder_2" in parts else "a"
        raise InputError(
            "source", str(folder), f"{kind} diffusers Stable Diffusion folder; missing {', '.join(missing)} "
            f"(needs model_index.json and {'/, '.join(parts)}/)"
        )

    def load(cls: Any, part: str) -> Any:
        kwargs = _weights_kwargs(folder / part, allow_pickle)
        try:
            module = cls.from_pretrained(folder / part, **kwargs)
        except Exception as e:
            files = ", ".join(str(p) for p in _weight_files(folder / part))
            raise ExportError(f"{part}: cannot load {files}: {type(e).__name__}: {e}") from e
        if module.dtype != torch.float32:  # transformers keeps a checkpoint's fp16; parity is measured in fp32
            module = module.to(torch.float32)
        return module.eval().requires_grad_(False)

    def tokenizer(part: str) -> Any:
        if part not in parts:
            return None
        try:
            return CLIPTokenizer.from_pretrained(folder / part)
        except Exception as e:
            raise ExportError(f"{part}: cannot load {folder / part}: {type(e).__name__}: {e}") from e

    unet = load(UNet2DConditionModel, "unet")
    vae = load(AutoencoderKL, "vae")
    text_encoder = load(CLIPTextModel, "text_encoder") if "text_encoder" in parts else None
    text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2") if "text_encoder_2" in parts else None
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"scheduler: cannot read {scheduler_path}: {e}") from e
    safety_checker, feature_extractor = None, None
    if _listed(pipeline_config, "safety_checker") and (folder / "safety_checker").is_dir():
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        safety_checker = load(StableDiffusionSafetyChecker, "safety_checker")
        extractor = folder / "feature_extractor" / "preprocessor_config.json"
        try:
            feature_extractor = json.loads(extractor.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"feature_extractor: the safety checker needs {extractor}: {e}") from e
    return SourceModel(
        unet, vae, text_encoder, tokenizer("tokenizer"), scheduler_config, description,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer("tokenizer_2"), pipeline_config=pipeline_config,
        safety_checker=safety_checker, feature_extractor=feature_extractor,
        upscaler=_upscaler(folder, pipeline_config) if "low_res_scheduler" in parts else None,
    )


def _upscaler(folder: Path, model_index: dict) -> UpscalerSource:
    """An x4 upscaler folder's low_res_scheduler config and max_noise_level; ExportError naming a bad one."""
    path = folder / "low_res_scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"low_res_scheduler: cannot read {path}: {e}") from e
    level = model_index.get("max_noise_level", MAX_NOISE_LEVEL)
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ExportError(f"model_index.json: max_noise_level: got {level!r}, expected an integer >= 0")
    if not isinstance(config, dict):
        raise ExportError(f"low_res_scheduler: {path} holds a {type(config).__name__}, expected a JSON object")
    return UpscalerSource(config, level)


def pipeline_parts(folder: Path, model_index: dict) -> tuple[str, ...]:
    """The component folders a diffusers folder must hold, by its model_index.json and U-Net config."""
    sdxl = _listed(model_index, "text_encoder_2") or _unet_config(folder).get("addition_embed_type") == TEXT_TIME
    if not sdxl:
        return (*PIPELINE_PARTS, *UPSCALER_PARTS) if _listed(model_index, "low_res_scheduler") else PIPELINE_PARTS
    # A component the index marks [null, null] is absent on purpose (the refiner's text_encoder/tokenizer).
    first = tuple(name for name in ("text_encoder", "tokenizer") if not _marked_absent(model_index, name))
    return ("unet", "vae", *first, *SDXL_PARTS, "scheduler")


def _listed(model_index: dict, name: str) -> bool:
    entry = model_index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _marked_absent(model_index: dict, name: str) -> bool:
    entry = model_index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is None


def read_model_index(folder: Path) -> dict:
    """A diffusers folder's model_index.json ({} when there is none); ExportError naming it when unreadable."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        return {}  # reported with the other missing parts
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"model_index.json: cannot read {path}: {e}") from e
    if not isinstance(index, dict):
        raise ExportError(f"model_index.json: {path} holds a {type(index).__name__}, expected a JSON object")
    return index


def _unet_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # a missing U-Net is reported by name; an unreadable config by from_pretrained
    return config if isinstance(config, dict) else {}


def _weight_files(part: Path) -> list[Path]:
    from sdonnx.export.single_file import PICKLE_SUFFIXES

    suffixes = (".safetensors", *PICKLE_SUFFIXES)
    return sorted(p for p in part.iterdir() if p.is_file() and p.suffix in suffixes) if part.is_dir() else []


def _weights_kwargs(part: Path, allow_pickle: bool) -> dict[str, Any]:
    """from_pretrained arguments for the weights present: safetensors (maybe only a variant) or allowed pickles."""
    names = [p.name for p in _weight_files(part)]
    safetensors = [n for n in names if n.endswith(".safetensors")]
    if safetensors:
        # "diffusion_pytorch_model.fp16.safetensors" or a shard "model.fp16-00001-of-00002.safetensors"
        variants = {n.split(".")[1].split("-")[0] for n in safetensors if n.count(".") > 1}
        plain = any(n.count(".") == 1 for n in safetensors)
        if plain or not variants:
            return {"use_safetensors": True}
        if len(variants) == 1:
            return {"use_safetensors": True, "variant": variants.pop()}
        raise InputError("source", str(part), f"one set of weights, found variants {sorted(variants)}")
    if names:
        if not allow_pickle:
            raise InputError(
                "source", str(part), "safetensors weights (this folder has only pickle weights, which can run "
                "code when loaded; pass --allow-pickle only for a source you trust)"
            )
        return {"use_safetensors": False}
    raise InputError("source", str(part), "weights (*.safetensors) beside config.json")


def scheduler_facts(scheduler_config: dict) -> tuple[TrainingSchedule, str]:
    """The training schedule and prediction type, from the diffusers scheduler the config names.

    The scheduler object is built so that its class defaults fill what the config leaves out (spacing
    differs per class) and alphas_cumprod is its own tensor, bit for bit (e.g. Euler's zero-SNR clamp).
    DDPM, which shares the beta-schedule code, stands in for classes this diffusers does not know.
    """
    import diffusers

    cls = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = diffusers.DDPMScheduler
    try:
        scheduler = cls.from_config(scheduler_config)
        alphas_cumprod = scheduler.alphas_cumprod.tolist()
    except Exception as e:
        raise ExportError(f"scheduler: cannot build {cls.__name__} from its config: {type(e).__name__}: {e}") from e
    resolved = dict(scheduler.config)
    spacing = resolved.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise ExportError(f"scheduler.timestep_spacing: got {spacing!r}, expected one of {list(TIMESTEP_SPACINGS)}")
    prediction_type = resolved.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ExportError(
            f"scheduler.prediction_type: got {prediction_type!r}, expected one of {list(PREDICTION_TYPES)}"
        )
    schedule = TrainingSchedule(
        num_train_timesteps=len(alphas_cumprod),
        alphas_cumprod=tuple(float(a) for a in alphas_cumprod),
        timestep_spacing=spacing,
        steps_offset=int(resolved.get("steps_offset", 0)),
        beta_schedule=str(resolved.get("beta_schedule", "linear")),
        # What DDIM/PNDM.from_config would use: the config's, else their default (True).
        set_alpha_to_one=bool(scheduler_config.get("set_alpha_to_one", True)),
    )
    return schedule, prediction_type
