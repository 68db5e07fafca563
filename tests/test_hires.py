"""The hires fix (A1111's two-pass txt2img) on the embedded model: it is img2img from the upscaled
first pass with the same seed, its settings are checked before any work, recorded in A1111's PNG
parameters and read back, and the server's enable_hr reaches it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdonnx import cli
from sdonnx.errors import InputError
from sdonnx.runtime.images import resize_latents
from sdonnx.runtime.metadata import format_parameters, parse_parameters, read_parameters
from sdonnx.runtime.pipeline import GenerationConfig, Pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(progress=False)


def test_lanczos_hires_is_img2img_of_the_upscaled_first_pass(pipe):
    first = pipe(PROMPT, seed=3, steps=8)
    hires = pipe(PROMPT, seed=3, steps=8, batch=2, hires_scale=2, hires_upscaler="lanczos", hires_strength=0.5)
    assert [image.size for image in hires] == [(128, 128)] * 2
    for k, image in enumerate(hires):  # image k: seed 3 + k alone, both passes
        base = pipe(PROMPT, seed=3 + k, steps=8)[0] if k else first[0]
        want = pipe.img2img(PROMPT, image=base.resize((128, 128), Image.Resampling.LANCZOS), seed=3 + k, steps=8,
                            strength=0.5)[0]
        assert np.array_equal(np.asarray(image), np.asarray(want))
        assert image.info["generation_size"] == (64, 64)


def test_latent_hires_runs_its_steps_at_the_upscaled_size(pipe):
    steps = []
    images = pipe(PROMPT, seed=1, steps=6, hires_scale=1.5, hires_steps=10, hires_strength=0.5,
                  callback=lambda i, sigma, latents: steps.append(latents.shape[-1]))
    assert images[0].size == (96, 96)
    assert steps == [8] * 6 + [12] * 5  # six first-pass steps at 8x8 latents, int(10 * 0.5) at 12x12
    again = pipe(PROMPT, seed=1, steps=6, hires_scale=1.5, hires_steps=10, hires_strength=0.5)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    nearest = pipe(PROMPT, seed=1, steps=6, hires_scale=1.5, hires_steps=10, hires_strength=0.5,
                   hires_upscaler="latent-nearest")
    assert not np.array_equal(np.asarray(images[0]), np.asarray(nearest[0]))


def test_resize_latents_is_torchs_interpolate():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    for height, width in ((16, 16), (12, 20), (17, 9)):
        bilinear = torch.nn.functional.interpolate(torch.from_numpy(x), size=(height, width), mode="bilinear",
                                                   align_corners=False, antialias=False).numpy()
        nearest = torch.nn.functional.interpolate(torch.from_numpy(x), size=(height, width), mode="nearest").numpy()
        np.testing.assert_allclose(resize_latents(x, height, width), bilinear, atol=2e-6)
        np.testing.assert_array_equal(resize_latents(x, height, width, nearest=True), nearest)


@pytest.mark.parametrize("settings, field", [
    (dict(hires_scale=5), "hires_scale"),
    (dict(hires_scale=0.5), "hires_scale"),
    (dict(hires_scale=2, hires_strength=1.5), "hires_strength"),
    (dict(hires_strength=0.5), "hires_strength"),
    (dict(hires_steps=10), "hires_steps"),
    (dict(hires_scale=2, hires_steps=0), "hires_steps"),
    (dict(hires_scale=2, hires_upscaler="esrgan"), "hires_upscaler"),
])
def test_bad_hires_settings_name_their_field(settings, field):
    with pytest.raises(InputError) as error:
        GenerationConfig(PROMPT, **settings)
    assert error.value.field == field


def test_hires_checks_against_the_model_before_any_work(pipe):
    with pytest.raises(InputError, match="1/20") as error:
        pipe(PROMPT, hires_scale=2, hires_strength=0.01)
    assert error.value.field == "hires_strength"
    with pytest.raises(InputError, match="text-to-image") as error:
        pipe.img2img(PROMPT, image=Image.new("RGB", (64, 64)), hires_scale=2)
    assert error.value.field == "hires_scale"
    from sdonnx import Control

    with pytest.raises(InputError, match="ControlNet") as error:
        pipe(PROMPT, hires_scale=2, control=Control(model="embedded", image=Image.new("RGB", (64, 64))))
    assert error.value.field == "hires_scale"


def test_parameters_record_the_first_pass_and_read_back():
    config = GenerationConfig(PROMPT, steps=8, seed=3, hires_scale=2, hires_strength=0.5, hires_steps=6,
                              hires_upscaler="lanczos")
    text = format_parameters(config, seed=3, size=(64, 64))
    assert "Size: 64x64" in text and "Denoising strength: 0.5" in text
    assert "Hires upscale: 2, Hires steps: 6, Hires upscaler: Lanczos" in text
    back = parse_parameters(text)
    assert {k: back[k] for k in ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler")} == dict(
        hires_scale=2.0, hires_strength=0.5, hires_steps=6, hires_upscaler="lanczos")
    assert "strength" not in back  # a hires image's denoising strength is the second pass's
    a1111 = parse_parameters("x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
                             "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent")
    assert (a1111["hires_upscaler"], a1111["hires_strength"]) == ("latent", 0.7)
    with pytest.raises(InputError, match="Hires upscaler"):
        parse_parameters("x\nSteps: 20, Sampler: Euler, Seed: 1, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+")


def test_cli_hires_and_from_png_make_the_same_image(tmp_path):
    first, again = tmp_path / "hires.png", tmp_path / "again.png"
    assert cli.main(["generate", PROMPT, "--seed", "5", "--steps", "8", "--hires-scale", "2", "--hires-strength",
                     "0.4", "--hires-upscaler", "lanczos", "-q", "-o", str(first)]) == 0
    assert Image.open(first).size == (128, 128)
    assert "Size: 64x64" in read_parameters(first) and "Hires upscale: 2" in read_parameters(first)
    assert cli.main(["generate", "--from-png", str(first), "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_cli_hires_with_a_refiner_is_refused_before_loading(tmp_path, capsys):
    from sdonnx.models import EMBEDDED_MODEL

    code = cli.main(["generate", PROMPT, "--hires-scale", "2", "--refiner", str(EMBEDDED_MODEL), "-o",
                     str(tmp_path / "x.png")])
    assert code == 2 and "--hires-scale" in capsys.readouterr().err
