"""Resolve an export SOURCE (diffusers folder, hub id, single-file checkpoint) into PyTorch modules."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdonnx.errors import ExportError, InputError
from sdonnx.runtime.manifest import PREDICTION_TYPES, TIMESTEP_SPACINGS, TrainingSchedule

# What a diffusers Stable Diffusion folder must hold for the four graphs, tokenizer and schedule.
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SourceModel:
    """The PyTorch side of a Stable Diffusion checkpoint, as the exporter needs it (fp32, eval mode)."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict
    description: str  # what SOURCE was, recorded in the manifest


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
    """Load each component of a diffusers folder on its own with from_pretrained, as fp32 in eval mode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    missing = [name for name in ("model_index.json", *PIPELINE_PARTS) if not (folder / name).exists()]
    if missing:
        raise InputError(
            "source", str(folder), f"a diffusers Stable Diffusion folder; missing {', '.join(missing)} "
            f"(needs model_index.json and {'/, '.join(PIPELINE_PARTS)}/)"
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

    unet = load(UNet2DConditionModel, "unet")
    vae = load(AutoencoderKL, "vae")
    text_encoder = load(CLIPTextModel, "text_encoder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    except Exception as e:
        raise ExportError(f"tokenizer: cannot load {folder / 'tokenizer'}: {type(e).__name__}: {e}") from e
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(scheduler_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"scheduler: cannot read {scheduler_path}: {e}") from e
    return SourceModel(unet, vae, text_encoder, tokenizer, scheduler_config, description)


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
    )
    return schedule, prediction_type
