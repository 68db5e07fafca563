"""CLIP tokenization with the `tokenizers` library, id for id what transformers' CLIPTokenizer gives.

Optimum folders carry vocab.json + merges.txt but no tokenizer.json, so the tokenizer is built the
way transformers builds CLIPTokenizer: NFC + whitespace folding + lowercase, CLIP's split regex,
byte-level BPE with the "</w>" end-of-word suffix. The special tokens (bos, eos, unk, pad) come from
tokenizer_config.json / special_tokens_map.json and are registered as transformers registers them,
so a pad token of "!" (SD 2.x) also splits "!" out of prompts exactly as diffusers' pipelines do.

`token_ids` gives a text's BPE ids alone and `frame` turns up to max_length - 2 of them into
[bos] + ids + [eos], padded with the pad id to max_length: prompts.py cuts long and weighted prompts
into chunks with these two. Called on a list of prompts, the tokenizer frames each whole prompt,
truncated, as diffusers' pipelines do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sdonnx.errors import ModelError
from sdonnx.runtime.model import read_json

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class ClipTokenizer:
    """Prompts -> input_ids for the CLIP text encoder."""

    def __init__(self, backend: Tokenizer, *, bos_id: int, eos_id: int, pad_id: int, max_length: int,
                 words: Mapping[str, Sequence[int]] | None = None):
        if max_length < 2:
            raise ModelError(f"tokenizer max_length: got {max_length}, expected at least 2 (bos and eos)")
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.max_length = max_length
        # Whole words that stand for fixed ids (textual-inversion names), matched before BPE.
        self.words = dict(words or {})
        self._words = (re.compile("|".join(rf"(?<![\w-]){re.escape(w)}(?![\w-])" for w in sorted(self.words, key=len,
                                                                                                reverse=True)))
                       if self.words else None)

    def with_words(self, words: Mapping[str, Sequence[int]]) -> ClipTokenizer:
        """This tokenizer with `words` (name -> ids) tokenized as those ids."""
        return ClipTokenizer(self.backend, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
                             max_length=self.max_length, words=words)

    @classmethod
    def from_folder(cls, folder: Path | str, max_length: int) -> ClipTokenizer:
        """Read tokenizer.json if present, else vocab.json + merges.txt, plus the special-token configs."""
        folder = Path(folder)
        config = read_tokenizer_config(folder)
        if (folder / "tokenizer.json").is_file():
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
            backend.no_padding()
            backend.no_truncation()
        else:
            backend = _clip_bpe(folder, _token_text(config.get("unk_token")) or "<|endoftext|>")
        _register_special_tokens(backend, config)

        def token_id(key: str) -> int:
            text = _token_text(config.get(key))
            token_id = backend.token_to_id(text) if text is not None else None
            if token_id is None:
                raise ModelError(f"{folder}: {key}: got {text!r}, expected a token of the vocabulary")
            return token_id

        return cls(
            backend,
            bos_id=token_id("bos_token"),
            eos_id=token_id("eos_token"),
            pad_id=token_id("pad_token"),
            max_length=max_length,
        )

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> input_ids int64 [len(prompts), max_length]."""
        return np.array([self.frame(self.token_ids(p)) for p in prompts], dtype=np.int64)

    def token_ids(self, prompt: str) -> list[int]:
        """The BPE ids of `prompt`, without bos/eos and untruncated."""
        if self._words is None:
            return self.backend.encode(prompt, add_special_tokens=False).ids
        ids, start = [], 0
        for match in self._words.finditer(prompt):
            ids += self.backend.encode(prompt[start:match.start()], add_special_tokens=False).ids
            ids += list(self.words[match[0]])
            start = match.end()
        return ids + self.backend.encode(prompt[start:], add_special_tokens=False).ids

    def frame(self, ids: Sequence[int]) -> list[int]:
        """[bos] + ids (truncated to fit) + [eos], padded to max_length."""
        body = list(ids[: self.max_length - 2])
        framed = [self.bos_id, *body, self.eos_id]
        return framed + [self.pad_id] * (self.max_length - len(framed))


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json with special_tokens_map.json's entries on top, as transformers merges them."""
    config = read_json(folder / "tokenizer_config.json", required=False)
    special = read_json(folder / "special_tokens_map.json", required=False)
    config.update({k: v for k, v in special.items() if k in SPECIAL_KEYS})
    return config


def _clip_bpe(folder: Path, unk_token: str) -> Tokenizer:
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise ModelError(f"{folder}: missing {name} (and no tokenizer.json)")
    try:
        model = BPE.from_file(
            str(folder / "vocab.json"),
            str(folder / "merges.txt"),
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk_token,
        )
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ModelError(f"{folder}: unreadable vocab.json / merges.txt: {e}") from e
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _register_special_tokens(backend: Tokenizer, config: dict[str, Any]) -> None:
    """Add the tokens transformers treats as added tokens: they are matched before BPE."""
    declared = [
        AddedToken(entry["content"], **{k: bool(entry[k]) for k in _TOKEN_FLAGS if k in entry})
        for entry in config.get("added_tokens_decoder", {}).values()
        if isinstance(entry, dict) and "content" in entry
    ]
    known = {token.content for token in declared}
    for key in SPECIAL_KEYS:
        value = config.get(key)
        text = _token_text(value)
        if text is None or text in known:
            continue
        flags = {k: bool(value[k]) for k in _TOKEN_FLAGS if isinstance(value, dict) and k in value}
        # transformers' default for a special token given by name: matched on the raw text.
        declared.append(AddedToken(text, **{"normalized": False, **flags, "special": True}))
        known.add(text)
    backend.add_special_tokens([t for t in declared if t.special])
    backend.add_tokens([t for t in declared if not t.special])


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer configs write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
