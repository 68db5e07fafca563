"""The post-conversion check: each converted graph against its fp32 source on the same seeded inputs.

Inputs are realistic rather than arbitrary, so that overflow shows where it would in use: the text
encoder gets a tokenized prompt and the empty prompt; the U-Net gets unit-variance latents (what the
denoiser feeds after input scaling) at timesteps 999, 500 and 20 with the fp32 text encoder's own
embeddings; the VAE decoder gets latents at the scale the pipeline feeds (N(0,1) / scaling factor).
Parity is the worst case over the feeds, as export measures it (`sdonnx.export.check.compare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sdonnx.export.check import Parity, compare
from sdonnx.runtime.denoiser import timestep_input
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.providers import RuntimeOptions, session_options
from sdonnx.runtime.session import Session
from sdonnx.runtime.tokenizer import ClipTokenizer

CHECK_PROMPT = "a photo of an astronaut riding a horse on the moon"
CHECK_TIMESTEPS = (999.0, 500.0, 20.0)
MAX_CHECK_LATENT = 32  # latent pixels (256-pixel images): enough to see overflow, cheap on CPU

Feeds = dict[str, np.ndarray]


def load(path: Path, component: str) -> Session:
    return Session(path, ["CPUExecutionProvider"], session_options(RuntimeOptions(provider="cpu")), name=component)


def check_feeds(root: Path, manifest: Manifest, seed: int = 0) -> dict[str, list[Feeds]]:
    """Seeded inputs per component of the fp32 folder at `root` (runs its text encoder once)."""
    rng = np.random.default_rng(seed)
    m = manifest
    side = min(m.sample_size, MAX_CHECK_LATENT)
    tokenizer = ClipTokenizer.from_folder(root / "tokenizer", m.tokenizer_max_length)
    text_spec = m.graphs["text_encoder"]
    ids = tokenizer(["", CHECK_PROMPT]).astype(text_spec.inputs[0].dtype)
    text_encoder = load(root / text_spec.path, "text_encoder")
    embeddings = text_encoder.run(input_ids=ids)["last_hidden_state"]
    unet = m.graphs["unet"]
    sample = rng.standard_normal((2, m.unet_in_channels, side, side)).astype(np.float32)
    feeds = {
        "text_encoder": [{"input_ids": ids}],
        "unet": [
            {
                "sample": sample,
                "timestep": timestep_input(unet.input("timestep"), t, 2),
                "encoder_hidden_states": embeddings,
            }
            for t in CHECK_TIMESTEPS
        ],
        "vae_decoder": [
            {"latent_sample": rng.standard_normal((1, m.latent_channels, side, side)).astype(np.float32)
             / np.float32(m.vae_scaling_factor)}
        ],
        "vae_encoder": [
            {"sample": rng.uniform(-1, 1, (1, 3, side * m.vae_downsample, side * m.vae_downsample)).astype(np.float32)}
        ],
    }
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
