"""Step previews (runtime/previews.py): the fitted latent -> RGB map, the lazy preview handed to the
step callback, and its fallback through the VAE for folders without a fitted map."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
from PIL import Image

from sdonnx.errors import ModelError
from sdonnx.models import EMBEDDED_MODEL
from sdonnx.models.draw import evaluation_prompts
from sdonnx.runtime import previews
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.pipeline import Pipeline
from sdonnx.runtime.previews import LatentRGB, fit_latent_rgb

def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse else float("inf")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(progress=False)


def test_fit_recovers_a_linear_vae():
    """A VAE whose latent is a known linear function of the pooled colours is fitted exactly."""
    mix = np.array([[0.5, -0.2, 0.1, 0.3], [0.1, 0.6, -0.3, 0.2], [-0.2, 0.1, 0.7, -0.4]])  # RGB -> 4 channels

    def encode(pixels):
        pooled = pixels.reshape(len(pixels), 3, 16, 8, 16, 8).mean(axis=(3, 5))
        return np.einsum("nchw,ck->nkhw", pooled, mix) + 0.05

    fit = fit_latent_rgb(encode, 8)
    latents = encode(previews.fit_pictures(seed=1, count=2))
    want = previews.fit_pictures(seed=1, count=2).reshape(2, 3, 16, 8, 16, 8).mean(axis=(3, 5))
    got = np.einsum("nkhw,kc->nchw", latents, np.asarray(fit.factors)) + np.asarray(fit.bias)[:, None, None]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_embedded_previews_are_its_decoder_s_and_cheap(pipe):
    """The embedded model records no latent_rgb (a linear map reads its tiny VAE badly: median 15 dB;
    see docs/serve.md), so its previews are the decoder's: the last one is the image itself."""
    assert pipe.manifest.latent_rgb is None
    costs = []
    for prompt, _ in evaluation_prompts(4, seed=3):
        last = []
        image = pipe(prompt, seed=0, callback=lambda i, s, x, preview: last.append(preview), previews=True)[0]
        started = time.perf_counter()
        shown = last[-1]()[0]
        costs.append(time.perf_counter() - started)
        assert np.array_equal(np.asarray(shown), np.asarray(image))  # Euler's last x0 estimate is the image
    assert np.median(costs) < 0.2  # ~10 ms here; generous for slow machines


def test_an_export_records_its_map_and_previews_use_it(tiny_exports, monkeypatch):
    """`sdonnx export` fits latent_rgb against the source VAE; previews then never run the decoder."""
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False)
    fit = pipe.manifest.latent_rgb
    assert fit is not None and len(fit.factors) == pipe.manifest.latent_channels
    last = []
    image = pipe("a red cube", seed=0, steps=3, callback=lambda i, s, x, preview: last.append(preview),
                 previews=True)[0]
    monkeypatch.setattr("sdonnx.runtime.pipeline.decode", lambda *a, **k: pytest.fail("the decoder ran"))
    shown = last[-1]()[0]
    assert shown.size == image.size and shown.mode == "RGB"


def test_previews_cost_nothing_unless_called(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(LatentRGB, "image", lambda self, latent, factor: calls.append(1))
    steps = []
    pipe("a red circle", seed=0, steps=4, callback=lambda i, s, x, preview: steps.append(i), previews=True)
    assert steps == [0, 1, 2, 3] and calls == []
    pipe("a red circle", seed=0, steps=4, callback=lambda i, s, x: steps.append(i))  # previews off: 3 arguments


def test_preview_follows_the_estimate_and_can_stop_the_run(pipe):
    shown = []

    def watch(step, sigma, latents, preview):
        shown.append(preview()[0])
        return False if step == 2 else None

    from sdonnx.runtime.pipeline import GenerationCancelled

    with pytest.raises(GenerationCancelled):
        pipe("a blue square on a white background", seed=0, steps=10, callback=watch, previews=True)
    assert len(shown) == 3 and psnr(shown[0], shown[2]) < 60  # the estimate moves between steps


def test_without_a_fitted_map_the_vae_decodes_the_preview(optimum_fixture):
    pipe = Pipeline.load(optimum_fixture, progress=False)
    assert pipe.manifest.latent_rgb is None
    last = []
    image = pipe("a red cube", seed=0, steps=3, height=16, width=16, sampler="euler",
                 callback=lambda i, s, x, preview: last.append(preview), previews=True)[0]
    assert np.array_equal(np.asarray(last[-1]()[0]), np.asarray(image))  # Euler's last x0 is the image


@pytest.mark.parametrize("bad", [{"factors": [[1, 2, 3]], "bias": [0, 0, 0]}, {"factors": "x"},
                                 {"factors": [[1, 2, 3]] * 4, "bias": [0, 0]}])
def test_a_malformed_map_is_a_model_error(tmp_path, bad):
    raw = json.loads((EMBEDDED_MODEL / "manifest.json").read_text())
    raw["latent_rgb"] = bad
    with pytest.raises(ModelError, match="latent_rgb"):
        Manifest.from_dict(raw)


def test_the_map_round_trips_through_the_manifest():
    manifest = Manifest.read(EMBEDDED_MODEL)
    again = Manifest.from_dict(json.loads(manifest.to_json()))
    assert again.latent_rgb == manifest.latent_rgb and dataclasses.asdict(again) == dataclasses.asdict(manifest)


def test_cli_preview_file_is_rewritten_as_steps_go(tmp_path, monkeypatch):
    from sdonnx import cli
    from sdonnx.files import replace_file as real_replace

    written = []

    def counting(path, write):
        written.append(path)
        return real_replace(path, write)

    monkeypatch.setattr("sdonnx.runtime.cli.replace_file", counting)
    preview, out = tmp_path / "now.png", tmp_path / "out.png"
    code = cli.main(["generate", "a red circle on a blue background", "--steps", "10", "--seed", "1", "-q",
                     "--preview", str(preview), "--preview-every", "3", "-o", str(out)])
    assert code == 0 and written == [preview] * 3  # steps 3, 6 and 9
    assert Image.open(preview).size == (64, 64) and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("flags, named", [(["--preview", "/no/such/folder/p.png"], "--preview"),
                                          (["--preview", "p.jpg"], "--preview"),
                                          (["--preview", "p.png", "--preview-every", "0"], "--preview-every")])
def test_cli_preview_flags_are_checked_first(flags, named, capsys, tmp_path, monkeypatch):
    from sdonnx import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "x", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"sdonnx generate: error: {named}:")
