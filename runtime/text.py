"""Prompt -> what the U-Net is conditioned on: text embeddings, and for SDXL-style models a pooled
embedding and the micro-conditioning time ids. The manifest says which applies; nothing here asks
what the model is called.

- Each text encoder (SD 1.x/2.x: `text_encoder`; SDXL: `text_encoder` and `text_encoder_2`; the
  SDXL refiner: `text_encoder_2` alone) encodes the prompt's chunks (prompts.py: long prompts,
  weights, BREAK) with its own tokenizer; their hidden states are concatenated along the width
  (768 + 1280 = 2048 for SDXL), chunk by chunk, as A1111 does.
- Which hidden states: `manifest.text_hidden_states` "final" reads last_hidden_state (clip skip n:
  the graph's `clip_skip_n` output, final layer norm applied); "penultimate" reads the raw
  hidden_states.{N - clip_skip} of an N-layer encoder, as SDXL does (diffusers' hidden_states[-2]).
- pooled (`manifest.pooled_text_encoder`): that encoder's `text_embeds` for the first chunk, A1111's
  choice for long prompts (diffusers truncates at 77 tokens, so up to 77 tokens both agree).
- time ids (`manifest.time_ids`): original_size + crops_coords_top_left + target_size (SDXL base)
  or + aesthetic_score instead of target_size (the refiner), per image, as diffusers builds them.
- force_zeros_for_empty_prompt: an empty negative prompt is zeros (embeddings and pooled), not "".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping, Sequence

import numpy as np

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime.manifest import Manifest, text_encoders
from sdonnx.runtime.prompts import CLIP_SKIP_OUTPUT, Chunks, apply_weights, tokenize_prompt
from sdonnx.runtime.session import Session
from sdonnx.runtime.tokenizer import ClipTokenizer

HIDDEN_STATES = "hidden_states.{}"
POOLED_OUTPUT = "text_embeds"
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' refiner defaults


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder graph and the tokenizer that feeds it."""

    name: str
    session: Session
    tokenizer: ClipTokenizer


def hidden_output(output_names: Sequence[str], hidden: str, clip_skip: int) -> str | None:
    """The output an encoder is read from at `clip_skip` (A1111's numbering), or None if it lacks it."""
    if hidden == "final":
        name = "last_hidden_state" if clip_skip == 1 else CLIP_SKIP_OUTPUT.format(clip_skip)
    else:
        layers = [int(n.rsplit(".", 1)[1]) for n in output_names if n.startswith(HIDDEN_STATES.format(""))]
        if not layers or max(layers) - clip_skip < 0:
            return None
        name = HIDDEN_STATES.format(max(layers) - clip_skip)
    return name if name in output_names else None


def conditioning(
    use: Callable[[str], ContextManager[Session]],
    tokenizers: Mapping[str, ClipTokenizer],
    manifest: Manifest,
    config,
    height: int,
    width: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The U-Net inputs besides sample and timestep, for the cond and uncond halves (uncond None when
    guidance <= 1: that half never runs): encoder_hidden_states [B, k * L, D], and for a model with
    pooled conditioning text_embeds [B, P] and time_ids [B, n].

    use(component): a context lending that text encoder's session (`Sessions.use`), one at a time.
    """
    guided = config.guidance_settings.enabled
    zero_negative = guided and manifest.force_zeros_for_empty_prompt and not config.negative_prompt
    halves = {"cond": (config.prompt, "prompt", config.negative_prompt if guided else None)}
    if guided and not zero_negative:
        halves["uncond"] = (config.negative_prompt, "negative_prompt", config.prompt)
    parts: dict[str, list[np.ndarray]] = {half: [] for half in halves}
    pooled: dict[str, np.ndarray] = {}
    for name in text_encoders(manifest):
        with use(name) as session:
            encoder = TextEncoder(name, session, tokenizers[name])
            for half, (text, field, other) in halves.items():
                hidden, pool = encode_chunks(encoder, manifest, text, clip_skip=config.clip_skip, pad_to=other,
                                             field=field)
                parts[half].append(hidden)
                if pool is not None:
                    pooled[half] = pool
    inputs = {half: {"encoder_hidden_states": join(parts[half], config.batch)} for half in halves}
    if manifest.pooled_text_encoder is not None:
        for half in halves:
            inputs[half]["text_embeds"] = _batched(pooled[half], config.batch)
            inputs[half]["time_ids"] = time_ids(manifest, config, height, width, negative=half == "uncond")
    if not guided:
        return inputs["cond"], None
    if zero_negative:
        uncond = {k: _read_only(np.zeros_like(v)) for k, v in inputs["cond"].items() if k != "time_ids"}
        if "time_ids" in inputs["cond"]:
            uncond["time_ids"] = time_ids(manifest, config, height, width, negative=True)
        return inputs["cond"], uncond
    return inputs["cond"], inputs["uncond"]


def encode_prompt(
    encoders: Sequence[TextEncoder],
    manifest: Manifest,
    prompt: str,
    batch: int,
    *,
    clip_skip: int = 1,
    pad_to: str | None = None,
    field: str = "prompt",
) -> tuple[np.ndarray, np.ndarray | None]:
    """prompt -> (embeddings float32 [batch, k * L, D], pooled float32 [batch, P] or None), read-only,
    every encoder's hidden states side by side (`encode_chunks`, `join`)."""
    encoded = [encode_chunks(e, manifest, prompt, clip_skip=clip_skip, pad_to=pad_to, field=field) for e in encoders]
    pooled = next((p for _, p in encoded if p is not None), None)
    return join([h for h, _ in encoded], batch), None if pooled is None else _batched(pooled, batch)


def encode_chunks(
    encoder: TextEncoder,
    manifest: Manifest,
    prompt: str,
    *,
    clip_skip: int = 1,
    pad_to: str | None = None,
    field: str = "prompt",
) -> tuple[np.ndarray, np.ndarray | None]:
    """One encoder: prompt -> its weighted hidden states float32 [k, L, D] and, for the pooled encoder,
    the first chunk's text_embeds [1, P].

    The prompt's k chunks of L tokens are encoded once (prompts.py). pad_to: the other prompt of the
    classifier-free-guidance pair; empty chunks are appended until this one has at least as many
    chunks, since the U-Net runs both halves in one batch. clip_skip: A1111's numbering (1 = the
    last layer). field: the GenerationConfig field `prompt` comes from, named in errors.
    """
    chunks = _chunks(encoder.tokenizer, prompt, pad_to, field)
    output = hidden_output(encoder.session.output_names, manifest.text_hidden_states, clip_skip)
    if output is None:
        raise ModelError(
            f"{encoder.session.path}: clip_skip={clip_skip} needs a text encoder output this graph lacks "
            f"(outputs: {encoder.session.output_names}); re-export the model with `sdonnx export`"
        )
    pooled = encoder.name == manifest.pooled_text_encoder
    outputs = _run_in_batches(encoder.session, chunks.ids, [output] + ([POOLED_OUTPUT] if pooled else []))
    return apply_weights(outputs[output], chunks.weights), outputs[POOLED_OUTPUT][:1] if pooled else None


def join(parts: Sequence[np.ndarray], batch: int) -> np.ndarray:
    """Each encoder's hidden states [k, L, D_i] -> [batch, k * L, sum D_i], read-only."""
    if len({len(p) for p in parts}) != 1:
        raise ModelError(f"the text encoders split the prompt into different numbers of chunks: {[len(p) for p in parts]}")
    hidden = np.concatenate(parts, axis=-1)
    k, length, width = hidden.shape
    return _batched(hidden.reshape(1, k * length, width), batch)


def _chunks(tokenizer: ClipTokenizer, prompt: str, pad_to: str | None, field: str) -> Chunks:
    chunks = tokenize_prompt(tokenizer, prompt, field=field)
    if pad_to is None:
        return chunks
    other = "negative_prompt" if field == "prompt" else "prompt"
    return chunks.padded(len(tokenize_prompt(tokenizer, pad_to, field=other)), tokenizer)


def _batched(array: np.ndarray, batch: int) -> np.ndarray:
    return _read_only(np.broadcast_to(array, (batch, *array.shape[1:])).astype(np.float32))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _run_in_batches(text_encoder: Session, ids: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    """input_ids [N, L] -> each of `outputs` float32 [N, ...]: one run, or runs of the graph's batch when fixed."""
    spec = text_encoder.input("input_ids")
    size = spec.shape[0] if isinstance(spec.shape[0], int) else len(ids)
    # A fixed batch is filled up with copies of the last chunk, whose outputs are dropped.
    filled = np.pad(ids, ((0, -len(ids) % size), (0, 0)), mode="edge").astype(spec.dtype)
    runs = [text_encoder.run(input_ids=group) for group in np.split(filled, len(filled) // size)]
    return {name: np.concatenate([r[name] for r in runs])[: len(ids)].astype(np.float32) for name in outputs}


def time_ids(manifest: Manifest, config, height: int, width: int, *, negative: bool = False) -> np.ndarray:
    """The U-Net's time_ids float32 [batch, n] for one half of the CFG pair, as diffusers' _get_add_time_ids.

    Sizes are (height, width) and crops (top, left), diffusers' order. The negative half, as in
    diffusers, has ids of its own only when both negative_original_size and negative_target_size
    are given (its crop then defaults to (0, 0)); otherwise it repeats the positive ones. Its
    aesthetic score is the negative one.
    """
    original = config.original_size or (height, width)
    crop = config.crops_coords_top_left or (0, 0)
    target = config.target_size or (height, width)
    score = config.aesthetic_score if config.aesthetic_score is not None else AESTHETIC_SCORE
    if negative:
        if config.negative_original_size is not None and config.negative_target_size is not None:
            original, target = config.negative_original_size, config.negative_target_size
            crop = config.negative_crops_coords_top_left or (0, 0)
        score = config.negative_aesthetic_score if config.negative_aesthetic_score is not None else NEGATIVE_AESTHETIC_SCORE
    values: Mapping[str, tuple[float, ...]] = {
        "original_size": tuple(original), "crops_coords_top_left": tuple(crop), "target_size": tuple(target),
        "aesthetic_score": (score,),
    }
    row = [float(v) for name in manifest.time_ids for v in values[name]]
    return _batched(np.array([row], dtype=np.float32), config.batch)


def check_conditioning_fields(manifest: Manifest, config) -> None:
    """SDXL's micro-conditioning fields only for a model with time ids (and the score for a refiner's)."""
    sizes = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
             "negative_crops_coords_top_left", "negative_target_size")
    scores = ("aesthetic_score", "negative_aesthetic_score")
    held = manifest.time_ids or ()
    for name in sizes + scores:
        if getattr(config, name) is None:
            continue
        needs = "aesthetic_score" if name in scores else name.removeprefix("negative_")
        if needs not in held:
            raise InputError(name, getattr(config, name), f"None: this model's U-Net takes no {needs} (time ids "
                             f"{list(held) or 'none'})")
