"""Textual inversion: embedding files whose names, written in a prompt, stand for learned token vectors.

A1111 and diffusers files (safetensors): `emb_params` [N, D] (A1111), `clip_l`/`clip_g` (SDXL: one
set per text encoder), or diffusers' `{token: vectors}`. The file's stem is the word that stands for
them: `a photo in the style of my-style` with my-style.safetensors in the embeddings folder. Each of
the N vectors takes one token position (counted against the 75-token chunk like any token).

The ONNX text encoders keep their token table as a fixed [49408, D] initializer, so no row can be
added; instead the vectors borrow the rows of the vocabulary's last ids (rare byte-pair merges),
never one the request's own text uses, and the table with those rows replaced reaches ONNX Runtime
as a merged LoRA weight does (lora.Adapters). The tokenizer maps the word to the borrowed ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from sdonnx.errors import InputError

SUFFIXES = (".safetensors",)
MAX_VECTORS = 75  # one chunk: more could not stand in a prompt at all
TABLE = "embeddings.token_embedding"  # the weight map's module of the token table
_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass(frozen=True)
class Embedding:
    """One embedding file: its word and, per text encoder, its vectors [N, D]."""

    name: str
    path: Path
    vectors: Mapping[str, np.ndarray]

    @property
    def count(self) -> int:
        return len(next(iter(self.vectors.values())))


def available(folder: Path | None) -> dict[str, Path]:
    """word (file stem) -> file for every embedding under `folder`, subfolders included."""
    if folder is None or not Path(folder).is_dir():
        return {}
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES)
    return {p.stem: p for p in reversed(files)}


def named_in(texts: Iterable[str], folder: Path | None) -> list[Path]:
    """The embedding files of `folder` whose word appears in any of `texts`, in name order."""
    found = available(folder)
    text = "\n".join(texts)
    return [path for name, path in sorted(found.items()) if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]


def read(path: Path, widths: Mapping[str, int]) -> Embedding:
    """The embedding at `path` for a model whose text encoders have `widths` ({name: hidden size})."""
    from sdonnx.runtime.lora import read_tensors

    tensors = read_tensors(path, field="embedding")
    if any(key in tensors for key in _SDXL_KEYS):
        vectors = {_SDXL_KEYS[k]: v for k, v in tensors.items() if k in _SDXL_KEYS}
    elif "emb_params" in tensors or len(tensors) == 1:
        only = tensors.get("emb_params", next(iter(tensors.values()), None))
        vectors = {next(iter(widths)): only}
    else:
        raise InputError("embedding", str(path), "a textual-inversion file: emb_params, clip_l/clip_g, or one "
                                                 f"{{token: vectors}} tensor; it has {sorted(tensors)[:5]}")
    vectors = {c: np.atleast_2d(np.asarray(v, dtype=np.float32)) for c, v in vectors.items()}
    if set(vectors) != set(widths):
        raise InputError("embedding", str(path), f"vectors for this model's text encoders {sorted(widths)}; it has "
                                                 f"them for {sorted(vectors)} (an embedding for another family?)")
    counts = {len(v) for v in vectors.values()}
    for component, v in vectors.items():
        if v.ndim != 2 or v.shape[1] != widths[component] or len(counts) != 1 or not 1 <= len(v) <= MAX_VECTORS:
            raise InputError("embedding", str(path), f"1 to {MAX_VECTORS} vectors of width {widths[component]} for "
                                                     f"{component}; it has {list(v.shape)} (another family?)")
        if not np.all(np.isfinite(v)):
            raise InputError("embedding", str(path), "finite vectors (it holds NaN or inf)")
    return Embedding(path.stem, path, vectors)


def borrow(embeddings: Sequence[Embedding], used: set[int], vocabulary: int, reserved: set[int]
           ) -> dict[str, list[int]]:
    """word -> the ids whose table rows its vectors take: the last ids of the vocabulary, skipping
    `used` (the request's own tokens) and `reserved` (bos, eos, pad)."""
    free = (i for i in range(vocabulary - 1, -1, -1) if i not in used and i not in reserved)
    return {e.name: [next(free) for _ in range(e.count)] for e in embeddings}


def table_rows(embeddings: Sequence[Embedding], ids: Mapping[str, list[int]], component: str
               ) -> dict[int, np.ndarray]:
    """row id -> vector, for one text encoder's table."""
    return {i: vector for e in embeddings for i, vector in zip(ids[e.name], e.vectors[component])}
