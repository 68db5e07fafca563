"""The embedded model: shipped in the package, loaded by default, and drawing what the prompt asks.

The semantic test generates a handful of the fixed evaluation prompts (trained combinations and
held-out ones, fixed seeds, the runtime's default sampler) and asks the judge what it sees. It is
deterministic, so its floors are not about luck: they sit a margin below what the committed
weights reach on these prompts, and fail if the model, the runtime or the judge regresses.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from sdonnx.models import EMBEDDED_MODEL
from sdonnx.models.draw import evaluation_prompts
from sdonnx.models.evaluate import score
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
# Issue #5's budget for the committed weights: the fp16 source plus the exported ONNX folder.
SIZE_BUDGET = 40 * 2**20


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(progress=False)


def test_the_embedded_model_is_an_exported_folder_shipped_as_package_data():
    assert isinstance(EMBEDDED_MODEL, Path)
    manifest = Manifest.read(EMBEDDED_MODEL / "manifest.json")
    assert manifest.prediction_type == "epsilon" and manifest.latent_channels == 4 and manifest.vae_downsample == 8
    assert manifest.default_image_size == 64
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "embedded/onnx/**/*" in package_data["sdonnx.models"]


def test_the_committed_weights_fit_the_size_budget():
    folder = EMBEDDED_MODEL.parent
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {"onnx", "source"} <= {p.relative_to(folder).parts[0] for p in files}
    assert sum(p.stat().st_size for p in files) <= SIZE_BUDGET


def test_the_source_is_stored_in_fp16_safetensors():
    for part in ("text_encoder", "unet", "vae"):
        weights = EMBEDDED_MODEL.parent / "source" / part / "model.safetensors"
        if not weights.exists():
            weights = weights.with_name("diffusion_pytorch_model.safetensors")
        header_size = int.from_bytes(weights.read_bytes()[:8], "little")
        header = json.loads(weights.read_bytes()[8 : 8 + header_size])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}, part


def test_loading_with_no_path_opens_the_embedded_model(pipe):
    assert pipe.model.root.resolve() == EMBEDDED_MODEL.resolve()


def test_it_draws_what_the_prompt_asks(pipe):
    result = score(pipe, "euler", prompts=12)
    # Six trained and six held-out combinations; see the module docstring for the floors.
    for attribute in ("colour", "background", "shape", "size"):
        assert result.trained[attribute] >= 5 / 6, (attribute, result)
    assert result.heldout["background"] >= 5 / 6, result
    assert result.heldout["colour"] >= 4 / 6, result


def test_the_evaluation_prompts_are_the_fixed_set_the_readme_reports():
    pairs = evaluation_prompts(200)
    assert len(pairs) == 200 and sum(scene.heldout for _, scene in pairs) == 100
    assert pairs[:2] == evaluation_prompts(200)[:2]


def test_tiled_decoding_leaves_no_visible_seams(pipe):
    """Low-memory mode's tiles, on a trained VAE: 192x192 (24x24 latent) in 16x16 tiles vs whole."""
    import numpy as np

    from sdonnx.runtime.images import decode

    latents = []  # Euler's x after its last step (sigma 0): what the pipeline decodes
    pipe("a large red circle on a blue background", seed=1, height=192, width=192,
         callback=lambda step, sigma, x: latents.append(x))
    decoder = pipe.model.sessions["vae_decoder"]
    whole = np.asarray(decode(decoder, latents[-1], pipe.manifest)[0], dtype=np.float64)
    tiled = np.asarray(decode(decoder, latents[-1], pipe.manifest, tile=16)[0], dtype=np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((whole - tiled) ** 2))
    assert psnr >= 35.0
