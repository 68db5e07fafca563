"""Textual inversion: embedding files used by their name in the prompt, the same images as diffusers'
`load_textual_inversion` on the tiny SD 1.x and SDXL models (max |Δpixel| <= 2/255, and the
embedding must move the image)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.runtime import Pipeline
from sdonnx.runtime.noise import noise_source

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import save_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

TOLERANCE, MOVES = 2 / 255, 10 / 255
STEPS, GUIDANCE = 6, 7.5


def vectors(count: int, width: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((count, width)) * 0.5).astype(np.float32)


def images(reference, pipe, prompt: str, negative: str = "blurry"):
    m = pipe.manifest
    x = noise_source(0).standard_normal((1, m.latent_channels, m.sample_size, m.sample_size)).astype(np.float32)
    oracle = copy.deepcopy(reference)
    oracle.scheduler = diffusers.EulerDiscreteScheduler.from_config(oracle.scheduler.config)
    oracle.set_progress_bar_config(disable=True)
    return x, oracle


def run(pipe, prompt, x, negative="blurry"):
    image = pipe(prompt, negative, latents=x, steps=STEPS, guidance=GUIDANCE, sampler="euler", seed=0)[0]
    return np.asarray(image, dtype=np.float64) / 255


def test_a1111_embedding_matches_diffusers(tiny_sources, tiny_exports, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors(3, 32, 1)}, str(folder / "my-style.safetensors"))
    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sources["sd1"], safety_checker=None)
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, embeddings_dir=folder)
    prompt = "a red cube in my-style, on a table"
    x, oracle = images(reference, pipe, prompt)
    oracle.load_textual_inversion(str(folder / "my-style.safetensors"), token="my-style")
    expected = oracle(prompt, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=torch.from_numpy(x), output_type="np").images[0]
    got = run(pipe, prompt, x)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(got - run(pipe, "a red cube in my style, on a table", x)).max() >= MOVES
    assert np.array_equal(run(pipe, "a red cube", x), run(Pipeline.load(tiny_exports["sd1"], provider="cpu",
                                                                          progress=False), "a red cube", x))


def test_sdxl_embedding_has_vectors_for_both_encoders(tiny_sdxl_sources, tiny_sdxl_exports, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    pipe = Pipeline.load(tiny_sdxl_exports["sdxl"], provider="cpu", progress=False, embeddings_dir=folder)
    widths = {c: pipe.adapters.token_table(c)[1][1] for c in ("text_encoder", "text_encoder_2")}
    clip_l, clip_g = vectors(2, widths["text_encoder"], 2), vectors(2, widths["text_encoder_2"], 3)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(folder / "xlstyle.safetensors"))
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_sources["sdxl"])
    prompt = "a red cube, xlstyle"
    x, oracle = images(reference, pipe, prompt)
    oracle.load_textual_inversion(torch.from_numpy(clip_l), token="xlstyle", text_encoder=oracle.text_encoder,
                                  tokenizer=oracle.tokenizer)
    oracle.load_textual_inversion(torch.from_numpy(clip_g), token="xlstyle", text_encoder=oracle.text_encoder_2,
                                  tokenizer=oracle.tokenizer_2)
    expected = oracle(prompt, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=torch.from_numpy(x), output_type="np").images[0]
    got = run(pipe, prompt, x)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(got - run(pipe, "a red cube, xl style", x)).max() >= MOVES


def test_bad_embeddings_get_clear_errors(tiny_exports, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors(2, 48, 1)}, str(folder / "wide.safetensors"))
    save_file({"clip_l": vectors(2, 32, 1), "clip_g": vectors(2, 40, 1)}, str(folder / "xl.safetensors"))
    save_file({"a": vectors(1, 32, 1), "b": vectors(1, 32, 1)}, str(folder / "two.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"nonsense")
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, embeddings_dir=folder)
    for word, message in (("wide", "width 32"), ("xl", "another family"), ("two", "emb_params"),
                          ("broken", "corrupt or not safetensors")):
        with pytest.raises(InputError, match=message):
            pipe(f"a cube, {word}", steps=1)
    with pytest.raises(InputError, match="embeddings_dir"):
        Pipeline.load(tiny_exports["sd1"], embeddings_dir=tmp_path / "nowhere")
