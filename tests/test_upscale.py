"""SD's x4 upscaler: export, parity with diffusers' StableDiffusionUpscalePipeline, tiles, CLI, bad input.

The oracle is diffusers' pipeline on a tiny random upscaler (tiny_models.build_tiny_upscaler) with the
same prompt, seed and scheduler: the image must match within 2/255 (8-bit rounding alone is 0.5/255,
which is what these cases measure), for the model's own DDIM and for Euler and Euler ancestral, whose
per-step noise comes from the same torch generator stream.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdonnx.errors import ExportError, InputError, ModelError
from sdonnx.export import ExportConfig, export_model
from sdonnx.runtime import Pipeline
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.tiles import tiled, windows
from tiny_models import build_tiny_upscaler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

TOLERANCE = 2 / 255
PROMPT, NEGATIVE = "a cat on a sofa", "blurry"
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_tiny_upscaler(tmp_path_factory.mktemp("upscaler") / "source")


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("upscaler-onnx") / "onnx"
    export_model(ExportConfig(source=str(source), out=out, quiet=True))
    return out


@pytest.fixture(scope="module")
def pipe(exported):
    return Pipeline.load(exported, provider="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(source):
    pipeline = diffusers.StableDiffusionUpscalePipeline.from_pretrained(source)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def low_res():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8))  # 32x24 -> 128x96


def test_export_records_the_upscaler(exported, source):
    m = Manifest.read(exported)
    assert m.family == "x4-upscaler" and m.vae_downsample == 4 and m.unet_in_channels == 7
    assert m.upscaler.max_noise_level == 350 and m.upscaler.image_channels == 3
    expected = diffusers.DDPMScheduler.from_pretrained(source, subfolder="low_res_scheduler").alphas_cumprod.numpy()
    np.testing.assert_array_equal(np.asarray(m.upscaler.noise_schedule.alphas_cumprod, np.float32), expected)
    labels = m.graphs["unet"].input("class_labels")
    assert labels is not None and labels.dtype == "int64"
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    assert (exported / "low_res_scheduler" / "scheduler_config.json").is_file()


@pytest.mark.parametrize("sampler", SCHEDULERS)
def test_upscale_matches_diffusers(sampler, pipe, reference, low_res, record_property):
    scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(reference.scheduler.config)
    oracle = diffusers.StableDiffusionUpscalePipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(PROMPT, image=low_res, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=6.0,
                      noise_level=30, generator=torch.manual_seed(7), output_type="np").images[0]
    (ours,) = pipe.upscale(PROMPT, NEGATIVE, image=low_res, steps=5, guidance=6.0, noise_level=30, seed=7,
                           sampler=sampler)
    assert ours.size == (128, 96) and ours.info["noise_level"] == 30
    delta = np.abs(np.asarray(ours, np.float64) / 255 - expected)
    record_property("max_delta_255", round(float(delta.max()) * 255, 3))
    assert delta.max() <= TOLERANCE, f"max {delta.max() * 255:.2f}/255, mean {delta.mean() * 255:.2f}/255"


def test_noise_level_changes_the_image(pipe, low_res):
    """The class label and the noised image both reach the U-Net: another level, another image."""
    (a,) = pipe.upscale(PROMPT, image=low_res, steps=2, seed=1, noise_level=0)
    (b,) = pipe.upscale(PROMPT, image=low_res, steps=2, seed=1, noise_level=300)
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() > 1


def test_batch_image_k_is_seed_plus_k(pipe, low_res):
    images = pipe.upscale(PROMPT, image=low_res, steps=2, seed=10, batch=2)
    (second,) = pipe.upscale(PROMPT, image=low_res, steps=2, seed=11)
    assert [i.info["seed"] for i in images] == [10, 11]
    np.testing.assert_array_equal(np.asarray(images[1]), np.asarray(second))


def test_tiles_blend_to_the_whole(pipe, low_res):
    """A tile as large as the image is the untiled run; small tiles (MultiDiffusion) stay close to it."""
    (whole,) = pipe.upscale(PROMPT, image=low_res, steps=3, seed=2)
    (one_tile,) = pipe.upscale(PROMPT, image=low_res, steps=3, seed=2, tile=32)
    (tiles,) = pipe.upscale(PROMPT, image=low_res, steps=3, seed=2, tile=16)
    np.testing.assert_array_equal(np.asarray(one_tile), np.asarray(whole))
    a, b = np.asarray(tiles, np.float64), np.asarray(whole, np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert tiles.size == whole.size and 25 < psnr < 80, psnr  # close, and not the untiled run again


def test_low_memory_tiles_the_unet(exported, low_res, monkeypatch):
    """The memory policy's tile reaches the upscale: patched to 16, low memory gives the tile=16 image."""
    from sdonnx.runtime import memory

    monkeypatch.setattr(memory, "UNET_TILE", 16)
    low = Pipeline.load(exported, provider="cpu", progress=False, low_memory=True)
    assert low.model.options.memory.unet_tile == 16
    normal = Pipeline.load(exported, provider="cpu", progress=False)
    (ours,) = low.upscale(PROMPT, image=low_res, steps=2, seed=4)
    (tiles,) = normal.upscale(PROMPT, image=low_res, steps=2, seed=4, tile=16)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(tiles))


def test_tiled_denoiser_is_exact_where_tiles_agree():
    """Tiles whose denoisers agree blend to exactly that denoiser, over every pixel, at any tile size."""
    x = np.random.default_rng(0).standard_normal((2, 4, 37, 50)).astype(np.float32)
    for tile in (4, 9, 16, 64):
        denoise = tiled(lambda rows, cols: (lambda part, sigma: part * 0.5 + sigma), 37, 50, tile)
        np.testing.assert_allclose(denoise(x, 2.0), x * 0.5 + 2.0, rtol=1e-6, atol=1e-6)
    covered = np.zeros((37, 50))
    for rows, cols, weights in windows(37, 50, 16):
        covered[rows, cols] += weights
    assert covered.min() > 0


def test_previews_are_upscaled_size(pipe, low_res):
    seen = []
    pipe.upscale(PROMPT, image=low_res, steps=2, seed=1, previews=True,
                 callback=lambda step, sigma, latents, preview: seen.append(preview()[0].size))
    assert seen == [(128, 96)] * 2


@pytest.mark.parametrize(("settings", "field"), [
    ({"noise_level": 351}, "noise_level"),
    ({"noise_level": -1}, "noise_level"),
    ({"noise_level": 2.5}, "noise_level"),
    ({"tile": 2}, "tile"),
    ({"height": 64}, "height"),
    ({"strength": 0.5}, "strength"),
    ({"hires_scale": 2.0}, "hires_scale"),
    ({"loras": {"x": 1.0}}, "loras"),
    ({"image": None}, "image"),
    ({"image": Image.new("RGB", (4, 32))}, "image width"),
])
def test_bad_upscale_requests_name_the_field(pipe, low_res, settings, field):
    settings = {"image": low_res, **settings}
    with pytest.raises(InputError) as e:
        pipe.upscale(PROMPT, steps=2, **settings)
    assert e.value.field == field


def test_lora_tag_is_refused(pipe, low_res):
    with pytest.raises(InputError, match="lora") as e:
        pipe.upscale(PROMPT + " <lora:detail:1>", image=low_res, steps=2)
    assert e.value.field == "prompt"


def test_modes_stay_apart(pipe, tiny_exports, low_res):
    """An upscaler draws no image from text, and a text-to-image model upscales nothing."""
    with pytest.raises(InputError, match="x4 upscaler") as e:
        pipe(PROMPT, steps=2)
    assert e.value.field == "model"
    other = Pipeline.load(tiny_exports["sd2"], provider="cpu", progress=False)
    with pytest.raises(InputError, match="upscaler folder") as e:
        other.upscale(PROMPT, image=low_res, steps=2)
    assert e.value.field == "model"


def test_manifest_rejects_a_noise_level_off_its_schedule(exported):
    raw = json.loads((exported / "manifest.json").read_text())
    raw["upscaler"]["max_noise_level"] = 1000
    with pytest.raises(ModelError, match=r"upscaler\.max_noise_level"):
        Manifest.from_dict(raw)


def test_export_refuses_a_class_conditional_unet_that_is_no_upscaler(source, tmp_path):
    import shutil

    broken = tmp_path / "source"
    shutil.copytree(source, broken)
    index = json.loads((broken / "model_index.json").read_text())
    del index["low_res_scheduler"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match="num_class_embeds"):
        export_model(ExportConfig(source=str(broken), out=tmp_path / "out", quiet=True))
    assert not (tmp_path / "out").exists()


def test_cli_upscale_writes_the_png(exported, low_res, tmp_path):
    image = tmp_path / "low.png"
    low_res.save(image)
    out = tmp_path / "big.png"
    run = subprocess.run([sys.executable, "-m", "sdonnx", "upscale", PROMPT, "--image", str(image), "-m", str(exported),
                          "--steps", "2", "--seed", "3", "--noise-level", "40", "-o", str(out), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with Image.open(out) as written:
        assert written.size == (128, 96)
        assert "Noise level: 40" in written.info["parameters"] and "Seed: 3" in written.info["parameters"]


def test_cli_refuses_bad_noise_level_before_loading(exported, low_res, tmp_path):
    image = tmp_path / "low.png"
    low_res.save(image)
    run = subprocess.run([sys.executable, "-m", "sdonnx", "upscale", PROMPT, "--image", str(image), "-m", str(exported),
                          "--noise-level", "999", "-o", str(tmp_path / "x.png")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "--noise-level: got 999" in run.stderr
    assert not (tmp_path / "x.png").exists()
