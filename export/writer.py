"""The export folder's non-ONNX files in optimum's layout: model_index.json, scheduler/, tokenizer/, configs.

The folder itself is built and published atomically by `sdonnx.files.staged_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdonnx.errors import ExportError

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def write_pipeline_files(folder: Path, source: Any) -> None:
    """model_index.json, scheduler/, tokenizer/ and each graph folder's config.json (as optimum writes them)."""
    if source.sdxl:
        _write_sdxl_files(Path(folder), source)
        return
    import diffusers

    folder = Path(folder)
    inpainting = source.unet.config.in_channels == 9
    pipeline = ("StableDiffusionUpscalePipeline" if source.upscaler is not None
                else "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline")
    model_index = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", source.scheduler_config.get("_class_name", "PNDMScheduler")],
        "text_encoder": ["transformers", type(source.text_encoder).__name__],
        "tokenizer": ["transformers", type(source.tokenizer).__name__],
        "unet": ["diffusers", type(source.unet).__name__],
        "vae": ["diffusers", type(source.vae).__name__],
    }
    if source.upscaler is not None:
        model_index["low_res_scheduler"] = ["diffusers", source.upscaler.low_res_scheduler_config.get(
            "_class_name", "DDPMScheduler")]
        model_index["max_noise_level"] = source.upscaler.max_noise_level
        _write_json(folder / "low_res_scheduler" / "scheduler_config.json", source.upscaler.low_res_scheduler_config)
    _write_json(folder / "model_index.json", model_index)
    _write_json(folder / "scheduler" / "scheduler_config.json", source.scheduler_config)
    source.text_encoder.config.save_pretrained(folder / "text_encoder")
    source.unet.save_config(folder / "unet")
    for name in ("vae_encoder", "vae_decoder"):
        source.vae.save_config(folder / name)
    write_tokenizer(folder / "tokenizer", source.tokenizer)


# What optimum's SDXL text encoder configs add: the graphs return every hidden state.
_EXPORT_MODEL_TYPES = {"text_encoder": "clip-text", "text_encoder_2": "clip-text-with-projection"}
_SDXL_PIPELINES = {  # (inpainting, aesthetic score) -> the diffusers pipeline class of that layout
    (False, False): "StableDiffusionXLPipeline",
    (False, True): "StableDiffusionXLImg2ImgPipeline",
    (True, False): "StableDiffusionXLInpaintPipeline",
    (True, True): "StableDiffusionXLInpaintPipeline",
}


def _write_sdxl_files(folder: Path, source: Any) -> None:
    """SDXL's layout (optimum's): text_encoder/ (not in the refiner), text_encoder_2/, tokenizer/, tokenizer_2/."""
    import diffusers

    pipeline = source.pipeline_config
    inpainting = source.unet.config.in_channels == 9

    def entry(module: Any, library: str) -> list:
        return [library, type(module).__name__] if module is not None else [None, None]

    model_index = {
        "_class_name": str(
            pipeline.get("_class_name") or _SDXL_PIPELINES[inpainting, source.requires_aesthetics_score]
        ),
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": bool(pipeline.get("force_zeros_for_empty_prompt", True)),
        "image_encoder": [None, None],
        # As the source says, or as its U-Net's five time ids say (checked against each other at load).
        **({"requires_aesthetics_score": source.requires_aesthetics_score}
           if "requires_aesthetics_score" in pipeline or source.requires_aesthetics_score else {}),
        "scheduler": ["diffusers", source.scheduler_config.get("_class_name", "EulerDiscreteScheduler")],
        "text_encoder": entry(source.text_encoder, "transformers"),
        "text_encoder_2": entry(source.text_encoder_2, "transformers"),
        "tokenizer": entry(source.tokenizer, "transformers"),
        "tokenizer_2": entry(source.tokenizer_2, "transformers"),
        "unet": ["diffusers", type(source.unet).__name__],
        "vae": ["diffusers", type(source.vae).__name__],
    }
    _write_json(folder / "model_index.json", model_index)
    _write_json(folder / "scheduler" / "scheduler_config.json", source.scheduler_config)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(source, name)
        if encoder is not None:
            encoder.config.save_pretrained(folder / name)
            path = folder / name / "config.json"
            config = json.loads(path.read_text(encoding="utf-8"))
            config.update(export_model_type=_EXPORT_MODEL_TYPES[name], output_hidden_states=True)
            _write_json(path, dict(sorted(config.items())))
    source.unet.save_config(folder / "unet")
    for name in ("vae_encoder", "vae_decoder"):
        source.vae.save_config(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(source, name) is not None:
            write_tokenizer(folder / name, getattr(source, name))


def write_tokenizer(folder: Path, tokenizer: Any) -> None:
    """save_pretrained, plus the files the runtime's BPE reads that tokenizers-backed saves may omit."""
    tokenizer.save_pretrained(folder)
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        tokenizer.backend_tokenizer.model.save(str(folder))
    if not (folder / "special_tokens_map.json").is_file():
        _write_json(folder / "special_tokens_map.json", tokenizer.special_tokens_map)
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"tokenizer: {type(tokenizer).__name__} did not produce {', '.join(missing)}")


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
