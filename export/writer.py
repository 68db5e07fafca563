"""Atomic output: an export is built in a hidden folder beside OUT and renamed into place when complete.

Same filesystem, so the final rename is atomic; on any exception or Ctrl-C the hidden folder is
removed and OUT is untouched. Also writes the folder's non-ONNX files in optimum's layout.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sdonnx.errors import ExportError, InputError

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@contextmanager
def staged_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty folder beside `out`; it becomes `out` only if the block completes.

    Checks `out` first (so that a bad destination fails before any heavy work): an existing file or
    a non-empty folder without overwrite, or a parent that is missing or not writable, is an InputError.
    """
    out = Path(out)
    if out.is_file():
        raise InputError("out", str(out), "a folder path (a file is there)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError("out", str(out), "a new or empty folder (pass --overwrite to replace it)")
    staging = _sibling(out, "partial")
    try:
        staging.mkdir()
    except OSError as e:
        raise InputError("out", str(out), f"a path in an existing, writable folder ({e.strerror})") from None
    try:
        yield staging
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sibling(out: Path, role: str) -> Path:
    return out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.{role}"


def _publish(staging: Path, out: Path) -> None:
    """Rename staging to out; an existing out is moved aside first and deleted only once replaced."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
