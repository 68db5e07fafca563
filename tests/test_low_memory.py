"""Low-memory mode: graphs open one at a time, CFG halves in turn, tiled VAE decoding.

Peak memory itself is measured by the benchmarks; here: the mode changes no image, and the
sessions really are closed outside their step; tiled decoding blends without seams.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.cli import main as cli_main
from sdonnx.runtime.images import decode_tiled
from sdonnx.runtime.pipeline import Pipeline

SETTINGS = dict(steps=4, guidance=7.5, seed=3, batch=2)


@pytest.fixture(scope="module")
def pipes(optimum_fixture) -> tuple[Pipeline, Pipeline]:
    return (
        Pipeline.load(optimum_fixture, progress=False),
        Pipeline.load(optimum_fixture, progress=False, low_memory=True),
    )


def test_low_memory_changes_no_pixel(pipes):
    normal, low = (pipe("a cat", **SETTINGS) for pipe in pipes)
    for a, b in zip(normal, low):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_low_memory_opens_one_graph_at_a_time(pipes):
    _, low = pipes
    assert low.model.sessions.opened == ()  # nothing held after load
    seen = []
    low("a cat", callback=lambda step, sigma, x: seen.append(low.model.sessions.opened), **SETTINGS)
    assert seen and all(opened == ("unet",) for opened in seen)
    assert low.model.sessions.opened == ()


def test_normal_mode_keeps_every_graph_open(pipes):
    normal, _ = pipes
    normal("a cat", **SETTINGS)
    assert set(normal.model.sessions.opened) >= {"text_encoder", "unet", "vae_decoder"}


class PointwiseDecoder:
    """A stand-in decoder whose pixels depend on their own latent only: x8 nearest upsampling of tanh."""

    path, name = Path("pointwise"), "vae_decoder"

    def run(self, latent_sample):
        pixels = np.tanh(latent_sample[:, :3]).repeat(8, axis=2).repeat(8, axis=3)
        return {"sample": pixels}


@pytest.mark.parametrize("shape", [(1, 4, 37, 20), (2, 4, 16, 16), (1, 4, 8, 50)])
def test_tiles_blend_back_to_the_whole_image(shape):
    latents = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    whole = PointwiseDecoder().run(latents)["sample"]
    tiled = decode_tiled(PointwiseDecoder(), latents, tile=16, factor=8)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_tile_must_be_usable():
    latents = np.zeros((1, 4, 8, 8), dtype=np.float32)
    with pytest.raises(InputError, match="tile"):
        decode_tiled(PointwiseDecoder(), latents, tile=2, factor=8)


def test_cli_low_memory_flag(optimum_fixture, tmp_path):
    out = tmp_path / "low.png"
    cli_main(["generate", "a cat", "-m", str(optimum_fixture), "-o", str(out), "--steps", "2", "--seed", "1",
              "--low-memory", "--quiet"])
    assert out.is_file()
