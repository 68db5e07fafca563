"""Long and weighted prompts, as AUTOMATIC1111's web UI reads them.

Attention syntax (`parse_prompt_attention`): `(text)` multiplies the weight of text by 1.1, `[text]`
divides it by 1.1, `(text:1.5)` multiplies it by 1.5; nesting multiplies; `\\(`, `\\)`, `\\[`, `\\]`
and `\\\\` are literal characters; brackets left open apply to the end of the prompt and a closing
bracket with no opener is literal text, so no string is an error except a malformed number in
`(text:weight)`. The keyword `BREAK` ends the current chunk.

Chunks (`tokenize_prompt`): each parsed piece is tokenized on its own, its tokens carrying its
weight; the tokens fill chunks of `max_length - 2` (75 for CLIP), each framed [bos] ids [eos] and
padded with the pad token to max_length (77). The text encoder encodes every chunk independently;
the chunks' embeddings are joined along the sequence axis, which the U-Net accepts at any length.

Extra networks (`lora_tags`): `<lora:NAME:WEIGHT>` (also `<lora:NAME>`, weight 1, and the older
`<lyco:...>`) anywhere in the prompt names a LoRA to apply; tags are removed from the text the
encoder sees (`strip_tags`), as A1111 does, and activate LoRAs from the prompt only, not the
negative prompt.

Weighting (`apply_weights`): each token's embedding is multiplied by its weight, then the chunk is
rescaled so that its mean equals the unweighted chunk's mean (A1111's original emphasis).

Deliberate differences from A1111: BREAK inside brackets still breaks (A1111 multiplies its marker's
weight and then feeds the literal word "BREAK" with a negative weight); a malformed weight such as
`(a:1.2.3)` is an InputError (A1111 raises ValueError); no textual-inversion embeddings and no
"comma padding backtrack" (A1111 moves up to 20 tokens after the last comma of a full chunk to the
next chunk), so a prompt over 75 tokens may split at another place than A1111's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sdonnx.errors import InputError
from sdonnx.runtime.tokenizer import ClipTokenizer

MAX_WEIGHT = 10.0  # A1111 has no limit; 1.5 is strong and 3 already distorts the image
ROUND_BRACKET = 1.1
SQUARE_BRACKET = 1 / 1.1
BREAK = ("BREAK", -1.0)  # A1111's marker for the BREAK keyword in a parsed prompt
# The U-Net's cross-attention scores grow with the context: at 20 chunks (1540 tokens) one score
# matrix of SD 1.x at 512x512 already holds 2 x 8 heads x 4096 x 1540 floats (400 MB); CLIP was trained
# on single 75-token chunks and what lies beyond a few of them barely steers the image anyway.
MAX_CHUNKS = 20
# The text encoder output holding final_layer_norm(hidden_states[-n]), what A1111's "Clip skip: n" and
# diffusers' clip_skip=n-1 condition on; `sdonnx export` adds it for a few n (export/graphs.py).
CLIP_SKIP_OUTPUT = "clip_skip_{}"

_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]?           # an escaped bracket or backslash; a lone backslash is dropped
    | [(\[]                 # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)  # the end of (text:weight)
    | [)\]]                 # a closing bracket
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that does not end (text:weight)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_TAG = re.compile(r"<(lora|lyco):([^>]*)>")


def strip_tags(text: str) -> str:
    """The prompt without its extra-network tags."""
    return _TAG.sub("", text)


def lora_tags(text: str, *, field: str = "prompt") -> list[tuple[str, float, float]]:
    """(NAME, TEXT ENCODER WEIGHT, U-NET WEIGHT) of each tag, in order; InputError for a malformed one.

    A1111's forms: `<lora:NAME>` (1), `<lora:NAME:W>` (both W), `<lora:NAME:TE:UNET>`, and the named
    `<lora:NAME:te=TE:unet=UNET>` (either may be left out: unet defaults to te, te to 1)."""
    tags = []
    for match in _TAG.finditer(text):
        name, *rest = match[2].split(":")
        weights = _tag_weights(rest)
        if not name.strip() or weights is None:
            raise InputError(field, match[0], "<lora:NAME:WEIGHT> or <lora:NAME:TE:UNET> (A1111's forms, "
                                              "te=/unet= named too): a file name and finite numbers")
        tags.append((name.strip(), *weights))
    return tags


def _tag_weights(parts: list[str]) -> tuple[float, float] | None:
    """A tag's weights after its name: (te, unet); None when they do not parse."""
    named, positional = {}, []
    for part in parts:
        key, sep, value = part.partition("=")
        if sep:
            if key.strip() not in ("te", "unet") or key.strip() in named:
                return None
            named[key.strip()] = value
        elif named:  # a positional weight after a named one
            return None
        else:
            positional.append(part)
    if len(positional) > 2:
        return None
    values = dict(zip(("te", "unet"), positional)) | named
    if len(positional) + len(named) != len(values):  # a weight given both ways
        return None
    try:
        te = float(values.get("te", 1.0))
        unet = float(values["unet"]) if "unet" in values else te
    except ValueError:
        return None
    return (te, unet) if np.isfinite(te) and np.isfinite(unet) else None


def parse_prompt_attention(text: str, *, field: str = "prompt") -> list[tuple[str, float]]:
    """A prompt -> [(piece, weight)], runs of equal weight merged, BREAK as the pair `BREAK`.

    Reproduces A1111's modules/prompt_parser.py (see the module docstring for the differences):
    >>> parse_prompt_attention("a (red:1.5) [cube]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cube', 0.9090909090909091)]
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []  # index into pieces where each open bracket starts
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if tuple(piece) != BREAK:
                piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, token, field))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_BRACKET)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_BRACKET)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_BRACKET)
    for start in square_open:
        multiply_from(start, SQUARE_BRACKET)

    merged: list[tuple[str, float]] = []
    for piece, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight and BREAK not in (merged[-1], (piece, weight)):
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged


def _weight(number: str, token: str, field: str) -> float:
    try:
        weight = float(number)
    except ValueError:
        raise InputError(field, token, "a number after ':' in (text:weight), such as (cat:1.2)") from None
    if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
        # Far outside this the embeddings, and so the image, are noise: say so rather than draw it.
        raise InputError(field, token, f"a weight from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} in (text:weight)")
    return weight


@dataclass(frozen=True)
class Chunks:
    """A tokenized prompt: ids int64 [k, max_length], framed and padded; weights float32 [k, max_length]."""

    ids: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def padded(self, count: int, tokenizer: ClipTokenizer) -> Chunks:
        """These chunks followed by empty ones ([bos] [eos] padding, weight 1) up to `count`."""
        extra = count - len(self)
        if extra <= 0:
            return self
        empty = np.array([tokenizer.frame([])] * extra, dtype=np.int64)
        return Chunks(
            np.concatenate([self.ids, empty]),
            np.concatenate([self.weights, np.ones(empty.shape, dtype=np.float32)]),
        )


def tokenize_prompt(tokenizer: ClipTokenizer, text: str, *, field: str = "prompt") -> Chunks:
    """A prompt -> its chunks (at least one; an empty prompt is one empty chunk).

    InputError when it needs more than MAX_CHUNKS chunks: counted before anything is encoded.
    """
    size = tokenizer.max_length - 2
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close_chunk() -> None:
        nonlocal ids, weights
        if len(chunks) == MAX_CHUNKS:
            raise InputError(
                field,
                f"{text[:60]!r}{'...' if len(text) > 60 else ''} ({len(text)} characters)",
                f"at most {MAX_CHUNKS} chunks of {size} tokens ({MAX_CHUNKS * size} tokens, BREAK included)",
            )
        chunks.append((ids, weights))
        ids, weights = [], []

    for piece, weight in parse_prompt_attention(strip_tags(text), field=field):
        if (piece, weight) == BREAK:
            close_chunk()
            continue
        for token in tokenizer.token_ids(piece):
            if len(ids) == size:
                close_chunk()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close_chunk()
    framed = np.array([tokenizer.frame(chunk_ids) for chunk_ids, _ in chunks], dtype=np.int64)
    # bos, eos and padding keep weight 1, as in A1111.
    framed_weights = np.ones(framed.shape, dtype=np.float32)
    for row, (_, chunk_weights) in enumerate(chunks):
        framed_weights[row, 1 : 1 + len(chunk_weights)] = chunk_weights
    return Chunks(framed, framed_weights)


def apply_weights(embeddings: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """embeddings float32 [k, L, D] x weights [k, L] -> float32 [k, L, D], each chunk's mean restored.

    Returns `embeddings` itself when every weight is 1 (nothing to scale, bit for bit).
    """
    if np.all(weights == 1.0):
        return embeddings
    original_mean = embeddings.mean(axis=(1, 2), keepdims=True)
    weighted = embeddings * weights[:, :, None]
    return weighted * (original_mean / weighted.mean(axis=(1, 2), keepdims=True))
