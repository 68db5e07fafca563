"""Calibration data for static quantization: the fp32 pipeline's own graph inputs on real prompts.

Each prompt is generated with the fp32 folder; every call to a recorded graph (the U-Net: one
batched uncond||cond call per sampler step) is kept, so the activation ranges cover the whole step
range, from pure noise to nearly clean latents.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sdonnx.errors import InputError
from sdonnx.runtime.model import ModelFolder, Sessions
from sdonnx.runtime.pipeline import Pipeline, load_tokenizers
from sdonnx.runtime.providers import RuntimeOptions
from sdonnx.runtime.session import Session

# Subjects, styles and lighting as users write them; short and long, with and without commas.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "portrait of an old fisherman, dramatic lighting, highly detailed",
    "a red sports car on a mountain road at sunset",
    "watercolor painting of a lighthouse in a storm",
    "a bowl of ramen, studio photograph, shallow depth of field",
    "isometric illustration of a tiny city, pastel colors",
    "an astronaut riding a horse on the moon",
    "a dense forest in fog, cinematic, 35mm film",
)
MAX_CALIBRATION_SIZE = 256  # pixels: activation ranges do not depend on the image size


def read_prompts(path: Path | None) -> tuple[str, ...]:
    """One prompt per non-blank line of `path`; the default list when None. InputError if unusable."""
    if path is None:
        return DEFAULT_PROMPTS
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError("calibration_prompts", str(path), f"a readable UTF-8 text file ({e})") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise InputError("calibration_prompts", str(path), "a file with one prompt per line (it has none)")
    return prompts


class Recorder:
    """A Session stand-in that keeps a copy of every feed before running the real graph."""

    def __init__(self, session: Session):
        self.session = session
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(value) for name, value in inputs.items()})
        return self.session.run(**inputs)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def record_feeds(
    folder: Path, components: Sequence[str], prompts: Sequence[str], *, steps: int
) -> Mapping[str, list[dict[str, np.ndarray]]]:
    """Generate each prompt (seed = its index) with the fp32 folder; the feeds of `components` by name.

    Images are min(model's default size, 256) pixels square, `steps` Euler steps, CFG 7.5.
    """
    model = ModelFolder.load(folder, RuntimeOptions(provider="cpu"))
    recorders = {c: Recorder(model.sessions[c]) for c in components}
    sessions = Sessions(list(model.sessions), lambda c, _weights=None: recorders.get(c) or model.sessions[c],
                        model.sessions.policy)
    recorded = replace(model, sessions=sessions)
    pipe = Pipeline(recorded, load_tokenizers(model), progress=False)
    size = min(model.manifest.default_image_size, MAX_CALIBRATION_SIZE)
    for seed, prompt in enumerate(prompts):
        pipe(prompt, steps=steps, seed=seed, height=size, width=size)
    return {c: r.feeds for c, r in recorders.items()}
