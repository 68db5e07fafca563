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
    import diffusers

    folder = Path(folder)
    inpainting = source.unet.config.in_channels == 9
    model_index = {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
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
    _write_json(folder / "model_index.json", model_index)
    _write_json(folder / "scheduler" / "scheduler_config.json", source.scheduler_config)
    source.text_encoder.config.save_pretrained(folder / "text_encoder")
    source.unet.save_config(folder / "unet")
    for name in ("vae_encoder", "vae_decoder"):
        source.vae.save_config(folder / name)
    write_tokenizer(folder / "tokenizer", source.tokenizer)


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
