"""The post-conversion check: each converted graph against its fp32 source on the same seeded inputs.

Inputs are realistic rather than arbitrary, so that overflow shows where it would in use: each text
encoder gets a tokenized prompt and the empty prompt; the U-Net gets unit-variance latents (what the
denoiser feeds after input scaling) at timesteps 999, 500 and 20 with the fp32 text encoders' own
embeddings (and, for SDXL, their pooled embedding and time ids); the VAE decoder gets latents at
the scale the pipeline feeds (N(0,1) / scaling factor).
Parity is the worst case over the feeds, as export measures it (`sdonnx.export.check.compare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sdonnx.export.check import Parity, compare
from sdonnx.runtime.denoiser import timestep_input
from sdonnx.runtime.manifest import TOKENIZERS, Manifest, text_encoders
from sdonnx.runtime.pipeline import GenerationConfig
from sdonnx.runtime.providers import RuntimeOptions, session_options
from sdonnx.runtime.session import Session
from sdonnx.runtime.text import POOLED_OUTPUT, hidden_output, time_ids
from sdonnx.runtime.tokenizer import ClipTokenizer

CHECK_PROMPT = "a photo of an astronaut riding a horse on the moon"
CHECK_TIMESTEPS = (999.0, 500.0, 20.0)
MAX_CHECK_LATENT = 32  # latent pixels (256-pixel images): enough to see overflow, cheap on CPU

Feeds = dict[str, np.ndarray]


def load(path: Path, component: str) -> Session:
    return Session(path, ["CPUExecutionProvider"], session_options(RuntimeOptions(provider="cpu")), name=component)


def check_feeds(root: Path, manifest: Manifest, seed: int = 0) -> dict[str, list[Feeds]]:
    """Seeded inputs per component of the fp32 folder at `root` (runs its text encoders once): the
    U-Net gets what the runtime would feed it (text.py), pooled text_embeds and time ids included."""
    rng = np.random.default_rng(seed)
    m = manifest
    side = min(m.sample_size, MAX_CHECK_LATENT)
    pixels = side * m.vae_downsample
    feeds: dict[str, list[Feeds]] = {}
    hidden, pooled = [], None
    for name in text_encoders(m):
        tokenizer = ClipTokenizer.from_folder(root / TOKENIZERS[name], m.tokenizer_max_length)
        session = load(root / m.graphs[name].path, name)
        ids = tokenizer(["", CHECK_PROMPT]).astype(session.input("input_ids").dtype)
        feeds[name] = [{"input_ids": ids}]
        outputs = session.run(input_ids=ids)
        hidden.append(outputs[hidden_output(session.output_names, m.text_hidden_states, 1)])
        if name == m.pooled_text_encoder:
            pooled = outputs[POOLED_OUTPUT]
    conditioning = {"encoder_hidden_states": np.concatenate(hidden, axis=-1).astype(np.float32)}
    if pooled is not None:
        conditioning["text_embeds"] = pooled.astype(np.float32)
        conditioning["time_ids"] = np.array(time_ids(m, GenerationConfig("", batch=2), pixels, pixels))
    if m.upscaler is not None:
        conditioning["class_labels"] = np.full(2, 20, dtype=np.int64)  # the x4 upscaler's noise level
    unet = m.graphs["unet"]
    sample = rng.standard_normal((2, m.unet_in_channels, side, side)).astype(np.float32)
    feeds["unet"] = [
        {"sample": sample, "timestep": timestep_input(unet.input("timestep"), t, 2), **conditioning}
        for t in CHECK_TIMESTEPS
    ]
    if "unet_shallow" in m.graphs:  # a deep_feature of the declared width, as the U-Net's last layers see
        shallow = m.graphs["unet_shallow"]
        deep = rng.standard_normal((2, shallow.input("deep_feature").shape[1], side, side)).astype(np.float32)
        feeds["unet_shallow"] = [{k: v for k, v in feed.items() if shallow.input(k) is not None} | {"deep_feature": deep}
                                 for feed in feeds["unet"]]
    feeds["vae_decoder"] = [
        {"latent_sample": rng.standard_normal((1, m.latent_channels, side, side)).astype(np.float32)
         / np.float32(m.vae_scaling_factor)}
    ]
    feeds["vae_encoder"] = [{"sample": rng.uniform(-1, 1, (1, 3, pixels, pixels)).astype(np.float32)}]
    return {c: feeds[c] for c in m.graphs}


def run_all(session: Session, feeds: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
    """Outputs for each feed, inputs cast to the dtypes the graph declares (fp16 IO graphs)."""
    dtypes = {spec.name: spec.dtype for spec in session.inputs}
    return [session.run(**{k: v.astype(dtypes[k]) for k, v in feed.items()}) for feed in feeds]


def worst(reference: Sequence[Mapping[str, np.ndarray]], actual: Sequence[Mapping[str, np.ndarray]]) -> Parity:
    """Lowest PSNR and largest difference over all feeds and outputs."""
    parities = [compare(r, {k: v.astype(np.float32) for k, v in a.items()}) for r, a in zip(reference, actual)]
    return Parity(
        max(p.max_abs_diff for p in parities),
        max(p.max_abs_diff_of_range for p in parities),
        min(p.psnr_db for p in parities),
    )


def finite(outputs: Sequence[Mapping[str, np.ndarray]]) -> bool:
    return all(bool(np.isfinite(v).all()) for out in outputs for v in out.values())


def weight_map(src: Path, dst: Path, recorded: Mapping | None) -> dict:
    """The weight map of the converted graph at `dst` (runtime/weights.py), each entry checked against
    the fp32 graph at `src` (its recorded map, or one derived): a float weight must be the fp32 one in
    the new dtype, a quantized one must dequantize to within half a step of it. Modules the converted
    graph no longer holds as a weight (int4's packed MatMulNBits) are left out."""
    from sdonnx.errors import ModelError
    from sdonnx.runtime.onnx_file import read_graph
    from sdonnx.runtime.weights import derive, dequantize

    before, after = read_graph(src), read_graph(dst)
    reference = dict(recorded) if recorded is not None else derive(before)
    found = {name: ref for name, ref in derive(after).items() if name in reference}
    for name, ref in found.items():
        base = reference[name]
        expected = before.initializers[base.initializer].read().astype(np.float32)
        expected = expected.T if base.layout == "in_out" else expected
        stored = after.initializers[ref.initializer]
        if ref.scale is None:
            values, tolerance = stored.read().astype(np.float32), np.abs(expected) * 2**-10 + 2**-24
        else:
            scale = after.initializers[ref.scale].read()
            values = dequantize(stored.read(), scale, after.initializers[ref.zero_point].read(), ref.axis)
            tolerance = np.float32(scale.max()) * 0.5001
        values = values.T if ref.layout == "in_out" else values
        if values.shape != expected.shape or np.any(np.abs(values - expected) > tolerance):
            raise ModelError(f"{dst}: weight map entry {name!r} -> {ref.initializer!r} does not hold the fp32 "
                             f"graph's {base.initializer!r}")
    return found
