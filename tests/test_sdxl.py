"""SDXL in the runtime: a real optimum SDXL export (../shared/fixtures/optimum-tiny-sdxl) against
diffusers' StableDiffusionXL pipelines on its source/ folder, the oracle.

The fixture is SDXL's architecture at tiny size: two text encoders (32 and 40 wide, the second with a
32-wide projection) whose penultimate hidden states are concatenated (72), pooled text_embeds, time
ids of 6, VAE scaling 0.13025, force_zeros_for_empty_prompt. Same weights, prompt, starting noise
and per-step noise (as in test_pipeline_parity) -> the same image within 2/255 (8-bit rounding is
0.5/255, which is what the passing cases measure).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.runtime import GenerationConfig, Pipeline
from sdonnx.runtime.noise import noise_source
from sdonnx.runtime.sampling import SAMPLERS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers_oracle import oracle_scheduler  # noqa: E402 (needs torch and diffusers)
from test_img2img import init_image, share_noise  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning", "ignore::UserWarning")

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "optimum-tiny-sdxl"
TOLERANCE = 2 / 255
PROMPT, NEGATIVE = "a red cube on a table", "blurry, ugly"
STEPS, GUIDANCE, SEED = 8, 7.5, 5
SETTINGS = {"lcm": (4, 1.0)}
NAMES = [name for name in SAMPLERS if name != "plms"]


@pytest.fixture(scope="module")
def folder() -> Path:
    if not FIXTURE.is_dir():
        pytest.fail(f"{FIXTURE} is missing: the tests need shared/ beside the clone")
    return FIXTURE


@pytest.fixture(scope="module")
def reference(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder / "source")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(folder) -> Pipeline:
    return Pipeline.load(folder, provider="cpu", progress=False)


def latents_for(pipe: Pipeline, height: int | None = None, width: int | None = None, batch: int = 1) -> np.ndarray:
    m = pipe.manifest
    h, w = (height or m.default_image_size) // m.vae_downsample, (width or m.default_image_size) // m.vae_downsample
    return noise_source(0).standard_normal((batch, m.latent_channels, h, w)).astype(np.float32)


def delta(ours, expected: np.ndarray) -> float:
    return float(np.abs(np.asarray(ours, dtype=np.float64) / 255 - expected).max())


def txt2img(reference, pipe, monkeypatch, sampler="euler", *, negative=NEGATIVE, height=None, width=None, seed=SEED,
            ours_settings=None, theirs_settings=None) -> float:
    steps, guidance = SETTINGS.get(sampler, (STEPS, GUIDANCE))
    latents = latents_for(pipe, height, width)
    scheduler, _ = oracle_scheduler(monkeypatch, sampler, reference.scheduler.config, noise=noise_source(SEED))
    oracle = diffusers.StableDiffusionXLPipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(
        PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
        latents=torch.from_numpy(latents), height=height, width=width, output_type="np", **(theirs_settings or {}),
    ).images[0]
    (ours,) = pipe(PROMPT, negative, steps=steps, guidance=guidance, sampler=sampler, seed=seed, latents=latents,
                   height=height, width=width, **(ours_settings or {}))
    return delta(ours, expected)


def test_facts_come_from_optimums_configs(pipe):
    m = pipe.manifest
    assert m.pooled_text_encoder == "text_encoder_2" and m.text_hidden_states == "penultimate"
    assert m.time_ids == ("original_size", "crops_coords_top_left", "target_size")
    assert m.force_zeros_for_empty_prompt and m.vae_scaling_factor == pytest.approx(0.13025)
    assert set(pipe.tokenizers) == {"text_encoder", "text_encoder_2"}
    assert pipe.tokenizers["text_encoder_2"].pad_id != pipe.tokenizers["text_encoder"].pad_id  # "!" pads the second


@pytest.mark.parametrize("sampler", NAMES)
def test_txt2img_matches_diffusers(reference, pipe, monkeypatch, sampler):
    assert txt2img(reference, pipe, monkeypatch, sampler) <= TOLERANCE


def test_empty_negative_prompt_is_zeros_as_diffusers(reference, pipe, monkeypatch):
    assert txt2img(reference, pipe, monkeypatch, negative="") <= TOLERANCE


def test_zeroing_matters(reference, pipe, monkeypatch, folder, tmp_path):
    """Without force_zeros_for_empty_prompt the empty negative is the encoded "": another image."""
    copy = Path(shutil.copytree(folder, tmp_path / "no-zeros", ignore=shutil.ignore_patterns("source")))
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    encoded = Pipeline.load(copy, provider="cpu", progress=False)
    assert not encoded.manifest.force_zeros_for_empty_prompt
    assert txt2img(reference, encoded, monkeypatch, negative="") > 5 * TOLERANCE


@pytest.mark.parametrize(("height", "width"), [(48, 80), (80, 48)])
def test_non_square_sizes_feed_their_time_ids(reference, pipe, monkeypatch, height, width):
    assert txt2img(reference, pipe, monkeypatch, height=height, width=width) <= TOLERANCE


def test_micro_conditioning_matches_diffusers(reference, pipe, monkeypatch):
    settings = dict(original_size=(128, 96), crops_coords_top_left=(8, 16), target_size=(64, 64),
                    negative_original_size=(32, 32), negative_target_size=(64, 64))
    assert txt2img(reference, pipe, monkeypatch, ours_settings=settings, theirs_settings=settings) <= TOLERANCE
    assert txt2img(reference, pipe, monkeypatch, ours_settings=settings) > 5 * TOLERANCE  # the ids are used


def test_guidance_rescale_matches_diffusers(reference, pipe, monkeypatch):
    assert txt2img(reference, pipe, monkeypatch, ours_settings=dict(guidance_rescale=0.7),
                   theirs_settings=dict(guidance_rescale=0.7)) <= TOLERANCE


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim", "euler_ancestral"])
def test_img2img_matches_diffusers(reference, pipe, monkeypatch, sampler):
    image = init_image()
    scheduler = share_noise(monkeypatch, sampler, reference, noise_source(SEED))
    oracle = diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, output_type="np").images[0]
    (ours,) = pipe.img2img(PROMPT, NEGATIVE, image=image, strength=0.6, steps=STEPS, guidance=GUIDANCE,
                           sampler=sampler, seed=SEED)
    assert delta(ours, expected) <= TOLERANCE


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim", "euler_ancestral"])
def test_inpaint_matches_diffusers(reference, pipe, monkeypatch, sampler):
    assert inpaint_delta(reference, pipe, monkeypatch, sampler, box=(16, 16, 48, 40), strength=0.75) <= TOLERANCE


def inpaint_delta(reference, pipe, monkeypatch, sampler: str, *, box: tuple[int, int, int, int], strength: float):
    """Max |sdonnx - diffusers' StableDiffusionXLInpaintPipeline| for a white `box` of the mask."""
    from PIL import Image

    image = init_image()
    mask = Image.new("L", image.size, 0)
    mask.paste(255, box)
    scheduler = share_noise(monkeypatch, sampler, reference, noise_source(SEED))
    oracle = diffusers.StableDiffusionXLInpaintPipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np").images[0]
    (ours,) = pipe.inpaint(PROMPT, NEGATIVE, image=image, mask=mask, strength=strength, steps=STEPS,
                           guidance=GUIDANCE, sampler=sampler, seed=SEED)
    return delta(ours, expected)


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_trailing_euler_ancestral_without_guidance_matches_diffusers(folder, reference, monkeypatch, tmp_path,
                                                                            steps):
    """SDXL-Turbo is a plain SDXL U-Net sampled with trailing spacing, Euler ancestral, guidance 0."""
    copy = Path(shutil.copytree(folder, tmp_path / "turbo", ignore=shutil.ignore_patterns("source")))
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    config["timestep_spacing"] = "trailing"
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    turbo = Pipeline.load(copy, provider="cpu", progress=False)
    latents = latents_for(turbo)
    scheduler, _ = oracle_scheduler(monkeypatch, "euler_ancestral", config, noise=noise_source(SEED))
    oracle = diffusers.StableDiffusionXLPipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=torch.from_numpy(latents),
                      output_type="np").images[0]
    (ours,) = turbo(PROMPT, steps=steps, guidance=0.0, sampler="Euler a", seed=SEED, latents=latents)
    assert delta(ours, expected) <= TOLERANCE


def test_batch_images_are_their_seeds_alone(pipe):
    batch = pipe(PROMPT, steps=3, seed=11, batch=2)
    alone = pipe(PROMPT, steps=3, seed=12)
    np.testing.assert_array_equal(np.asarray(batch[1]), np.asarray(alone[0]))


def test_low_memory_changes_no_pixel(folder, pipe):
    low = Pipeline.load(folder, provider="cpu", progress=False, low_memory=True)
    a, b = pipe(PROMPT, NEGATIVE, steps=3, seed=2), low(PROMPT, NEGATIVE, steps=3, seed=2)
    assert np.abs(np.asarray(a[0], dtype=int) - np.asarray(b[0], dtype=int)).max() <= 1
    assert low.model.sessions.opened == ()


@pytest.mark.parametrize(("field", "value"), [("aesthetic_score", 6.0), ("original_size", (1, 2, 3)),
                                               ("crops_coords_top_left", (-1, 0))])
def test_micro_conditioning_is_checked(pipe, field, value):
    with pytest.raises(InputError) as error:
        pipe(PROMPT, steps=1, **{field: value})
    assert error.value.field == field


def test_sd1_models_refuse_sdxl_fields():
    sd1 = Pipeline.load(progress=False)  # the embedded model
    with pytest.raises(InputError, match="takes no original_size") as error:
        sd1("a red circle", steps=1, original_size=(64, 64))
    assert error.value.field == "original_size"


def test_cli_generates_from_an_sdxl_folder(folder, tmp_path):
    from sdonnx.cli import main

    out = tmp_path / "sdxl.png"
    assert main(["generate", PROMPT, "-m", str(folder), "--steps", "2", "--seed", "1", "-o", str(out), "-q"]) == 0
    assert image_size(out) == (64, 64)


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


# --- refiner: the base -> refiner hand-off -----------------------------------------------------------

@pytest.fixture(scope="module")
def refiner_source(reference, tmp_path_factory) -> Path:
    """A refiner-shaped pipeline from the fixture's parts: text_encoder_2 alone (40 wide), a seeded
    random U-Net taking aesthetic-score time ids (5 x 8 + 32 projection), requires_aesthetics_score."""
    config = {k: v for k, v in reference.unet.config.items() if not k.startswith("_")}
    config.update(cross_attention_dim=reference.text_encoder_2.config.hidden_size,
                  projection_class_embeddings_input_dim=5 * config["addition_time_embed_dim"] + 32)
    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel(**config)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=reference.vae, text_encoder=None, text_encoder_2=reference.text_encoder_2, tokenizer=None,
        tokenizer_2=reference.tokenizer_2, unet=unet, scheduler=reference.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    folder = tmp_path_factory.mktemp("refiner") / "source"
    refiner.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def refiner(refiner_source) -> Pipeline:
    from sdonnx.export import ExportConfig, export_model

    out = refiner_source.parent / "onnx"
    export_model(ExportConfig(source=str(refiner_source), out=out, quiet=True))
    return Pipeline.load(out, provider="cpu", progress=False)


def test_refiner_facts(refiner):
    m = refiner.manifest
    assert set(refiner.tokenizers) == {"text_encoder_2"} and "text_encoder" not in m.graphs
    assert m.time_ids == ("original_size", "crops_coords_top_left", "aesthetic_score")


@pytest.mark.parametrize("switch", [0.8, 0.5])
def test_base_then_refiner_matches_diffusers_ensemble(reference, pipe, refiner, refiner_source, switch):
    latents = latents_for(pipe)
    base_latents = diffusers.StableDiffusionXLPipeline.from_pipe(reference)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, denoising_end=switch,
        latents=torch.from_numpy(latents), output_type="latent",
    ).images
    oracle = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_source)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(PROMPT, negative_prompt=NEGATIVE, image=base_latents, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, denoising_start=switch, output_type="np").images[0]
    config = GenerationConfig(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, refiner_switch=switch)
    (ours,) = pipe.generate(config, latents=latents, refiner=refiner)
    assert delta(ours, expected) <= TOLERANCE
    (alone,) = pipe(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, latents=latents)
    assert delta(alone, expected) > 2 * TOLERANCE  # the refiner did run (measured 6.6/255 at 0.8)


def test_refiner_switch_without_a_refiner_is_refused(pipe):
    with pytest.raises(InputError) as error:
        pipe(PROMPT, steps=2, refiner_switch=0.8)
    assert error.value.field == "refiner_switch"


def test_a_switch_leaving_no_step_is_refused(pipe, refiner):
    with pytest.raises(InputError) as error:
        pipe.generate(GenerationConfig(PROMPT, steps=4, refiner_switch=0.01), refiner=refiner)
    assert error.value.field == "refiner_switch"


def test_cli_refiner_writes_a1111s_fields(folder, refiner, tmp_path):
    from PIL import Image

    from sdonnx.cli import main

    out = tmp_path / "refined.png"
    assert main(["generate", PROMPT, "-m", str(folder), "--refiner", str(refiner.model.root), "--steps", "4",
                 "--seed", "1", "-o", str(out), "-q"]) == 0
    with Image.open(out) as image:
        text = image.text["parameters"]
    assert "Refiner: onnx [" in text and "Refiner switch at: 0.8" in text


# --- SDXL inpainting U-Nets (9 input channels) ------------------------------------------------------

@pytest.fixture(scope="module")
def inpainting(reference, tmp_path_factory) -> tuple[object, Pipeline]:
    """The fixture's pipeline with a seeded random 9-channel U-Net (latents || mask || masked image), as
    diffusers' StableDiffusionXLInpaintPipeline, and its sdonnx export."""
    from sdonnx.export import ExportConfig, export_model

    config = {k: v for k, v in reference.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(9)
    unet = diffusers.UNet2DConditionModel(**{**config, "in_channels": 9})
    oracle = diffusers.StableDiffusionXLInpaintPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, text_encoder_2=reference.text_encoder_2,
        tokenizer=reference.tokenizer, tokenizer_2=reference.tokenizer_2, unet=unet, scheduler=reference.scheduler,
    )
    oracle.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("sdxl-inpainting")
    oracle.save_pretrained(root / "source")
    export_model(ExportConfig(source=str(root / "source"), out=root / "onnx", quiet=True))
    return oracle, Pipeline.load(root / "onnx", provider="cpu", progress=False)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_nine_channel_inpainting_matches_diffusers(inpainting, monkeypatch, sampler):
    oracle, ours = inpainting
    assert ours.manifest.unet_in_channels == 9
    assert inpaint_delta(oracle, ours, monkeypatch, sampler, box=(8, 24, 40, 56), strength=1.0) <= TOLERANCE
