"""Inpainting: parity with diffusers' StableDiffusionInpaintPipeline for 4- and 9-channel U-Nets.

A regular (4-channel) tiny model gets the init image blended back outside the mask at every step;
the 9-channel one, built from the tiny sd1 folder with an inpainting U-Net (in_channels 9, seeded
random weights) and exported, sees the mask and the masked image's latents. Noise is shared with
diffusers as in test_img2img; tolerance and settings are test_pipeline_parity's.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime import Pipeline
from sdonnx.runtime.images import image_pixels, mask_pixels
from sdonnx.runtime.noise import noise_source

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from test_img2img import init_image, pixel_delta, share_noise  # noqa: E402 (needs torch and diffusers)
from test_pipeline_parity import (  # noqa: E402,F401 (fixtures are used by name)
    GUIDANCE, NEGATIVE_PROMPT, PROMPT, SEED, STEPS, TOLERANCE, pipelines, references,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

# (model, sampler, strength): "sd1"/"sd2" are the 4-channel tiny models, "9ch" the inpainting one.
# dpm_2 evaluates between plan sigmas, where the 4-channel blend takes the next plan sigma's noise.
CASES = [
    pytest.param(model, sampler, strength, id=f"{model}-{sampler}-{strength}")
    for model in ("sd1", "sd2", "9ch")
    for sampler, strength in (("euler", 1.0), ("euler", 0.75), ("dpmpp_2m", 1.0), ("ddim", 0.75),
                              ("euler_ancestral", 1.0), ("dpm_2", 0.75))
]


def repaint_mask(size: int = 64, mode: str = "L") -> Image.Image:
    """White (repaint) on a rectangle off the 8-pixel latent grid, with grey edges around 0.5."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[18:45, 10:37] = 255
    mask[17, 10:37], mask[45, 10:37] = 127, 128  # just below / at the binarization threshold
    return Image.fromarray(mask).convert(mode)


@pytest.fixture(scope="module")
def inpainting_model(tiny_sources, tmp_path_factory) -> tuple[object, Pipeline]:
    """(diffusers StableDiffusionInpaintPipeline, sdonnx Pipeline) of a tiny 9-channel model."""
    from diffusers import UNet2DConditionModel

    from sdonnx.export import ExportConfig, export_model

    root = tmp_path_factory.mktemp("inpainting")
    source = shutil.copytree(tiny_sources["sd1"], root / "source")
    config = dict(UNet2DConditionModel.load_config(source / "unet"), in_channels=9)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(source / "unet", safe_serialization=True)
    export_model(ExportConfig(str(source), root / "export", quiet=True))
    reference = diffusers.StableDiffusionInpaintPipeline.from_pretrained(source, safety_checker=None)
    return reference, Pipeline.load(root / "export", provider="cpu", progress=False)


@pytest.mark.parametrize(("model", "sampler", "strength"), CASES)
def test_inpaint_matches_diffusers(
    model, sampler, strength, references, pipelines, request, monkeypatch, record_property
):
    if model == "9ch":  # built only when a 9-channel case runs
        reference, pipeline = request.getfixturevalue("inpainting_model")
    else:
        reference, pipeline = references[model], pipelines[model]
    image, mask = init_image(), repaint_mask()
    scheduler = share_noise(monkeypatch, sampler, reference, noise_source(SEED))
    oracle = diffusers.StableDiffusionInpaintPipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(
        PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
    ).images[0]
    (ours,) = pipeline.inpaint(
        PROMPT, NEGATIVE_PROMPT, image=image, mask=mask, strength=strength, steps=STEPS, guidance=GUIDANCE,
        sampler=sampler, seed=SEED,
    )
    delta = pixel_delta(ours, expected)
    record_property("max_delta_255", round(float(delta.max()) * 255, 3))
    assert delta.max() <= TOLERANCE, f"max {delta.max() * 255:.2f}/255, mean {delta.mean() * 255:.2f}/255"


def test_nothing_to_repaint_gives_the_init_image_through_the_vae(pipelines):
    """A 4-channel model keeps the init latents outside the mask: with an all-black mask the result
    is the encoded image, whatever the prompt, steps or sampler (same seed, same encoder sample)."""
    black = Image.new("L", (64, 64))
    first = pipelines["sd1"].inpaint(PROMPT, image=init_image(), mask=black, steps=2, seed=4)[0]
    second = pipelines["sd1"].inpaint("a cat", image=init_image(), mask=black, steps=5, sampler="ddim", seed=4)[0]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    third = pipelines["sd1"].inpaint(PROMPT, image=init_image(), mask=repaint_mask(), steps=2, seed=4)[0]
    assert not np.array_equal(np.asarray(first), np.asarray(third))


def test_preprocessing_matches_diffusers_processors():
    """Image to [-1, 1] and mask to grey, Lanczos-resized and binarized, as VaeImageProcessor does."""
    from diffusers.image_processor import VaeImageProcessor

    image, mask = init_image(72, mode="RGB"), repaint_mask(72, mode="RGB")
    mask_processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    with pytest.warns(UserWarning, match="resized"):
        ours_image, ours_mask = image_pixels(image, 48, 64), mask_pixels(mask, image, 48, 64)
    np.testing.assert_allclose(ours_image, VaeImageProcessor().preprocess(image, 48, 64).numpy(), atol=1e-6)
    np.testing.assert_array_equal(ours_mask, mask_processor.preprocess(mask, 48, 64).numpy())
    assert set(np.unique(ours_mask)) == {0.0, 1.0}


def test_mask_size_must_be_the_image_size(pipelines):
    with pytest.raises(InputError, match="the init image's size, 64x64") as error:
        pipelines["sd1"].inpaint(PROMPT, image=init_image(), mask=repaint_mask(48), steps=2)
    assert error.value.field == "mask"


def test_unreadable_mask(pipelines, tmp_path):
    (tmp_path / "mask.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="readable image") as error:
        pipelines["sd1"].inpaint(PROMPT, image=init_image(), mask=tmp_path / "mask.png", steps=2)
    assert error.value.field == "mask"


def test_mask_needs_an_init_image(pipelines):
    from sdonnx.runtime.pipeline import GenerationConfig

    with pytest.raises(InputError, match="init image") as error:
        pipelines["sd1"].generate(GenerationConfig(PROMPT, steps=2), mask=repaint_mask())
    assert error.value.field == "image"


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_inpainting_model_only_inpaints(inpainting_model, mode):
    _, pipeline = inpainting_model
    with pytest.raises(InputError, match="inpainting model .*9 input channels.*inpaint") as error:
        if mode == "txt2img":
            pipeline(PROMPT, steps=2)
        else:
            pipeline.img2img(PROMPT, image=init_image(), steps=2)
    assert error.value.field == "mask"


def test_missing_vae_encoder_is_named(tiny_exports, tmp_path):
    folder = shutil.copytree(tiny_exports["sd1"], tmp_path / "model")
    (folder / "vae_encoder" / "model.onnx").unlink()
    pipeline = Pipeline.load(folder, provider="cpu", progress=False)
    (image,) = pipeline(PROMPT, steps=2, guidance=1.0)  # text to image needs no encoder
    with pytest.raises(ModelError, match="no vae_encoder graph"):
        pipeline.inpaint(PROMPT, image=init_image(), mask=repaint_mask(), steps=2)
