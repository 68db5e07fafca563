"""Seeds that mean the same as in PyTorch: sdonnx's torch-compatible noise against torch.randn itself.

Draw level: `noise_source(seed)` against `torch.randn(shape, generator=torch.Generator("cpu")
.manual_seed(seed))` for sizes on both of torch's paths (< 16 elements: float64 Box-Muller with a
cached second value; >= 16: float32 blocks of 16, the tail redrawn), seeds beyond 32 bits, and
sequences of draws mixing both paths. Against torch's x86 kernels (AVX2, AVX-512) every draw must
be bit-identical. torch builds without them (ATEN_CPU_CAPABILITY=default, ARM) use libm for the
float32 log/sin/cos and are held to MAX_LIBM_DIFF (measured up to 2.0e-6).

Image level: `pipe(prompt, seed=S, sampler="euler_ancestral")` with no latents against diffusers'
StableDiffusionPipeline with `generator=torch.Generator("cpu").manual_seed(S)`: initial latents and
every per-step draw come from the same stream; batches against a list of generators [S, S+1].
"""

from __future__ import annotations

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.runtime.noise import noise_source
from sdonnx.runtime.pipeline import GenerationConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from test_pipeline_parity import NEGATIVE_PROMPT, PROMPT, STEPS, TOLERANCE, pipelines, references  # noqa: E402,F401

EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
MAX_LIBM_DIFF = 5e-6
SEEDS = [0, 1, 42, 2**32 + 5, 2**63]
SHAPES = [(n,) for n in range(1, 41)] + [(3, 5), (4, 8, 8), (2, 4, 64, 64)]
SEQUENCE = [(3,), (20,), (1,), (5,), (16,), (1, 4, 8, 8), (7,), (1,), (2, 4, 8, 8), (33,)]


def torch_randn(generator, shape) -> np.ndarray:
    return torch.randn(shape, generator=generator).numpy()


def check_draw(expected: np.ndarray, ours: np.ndarray) -> float:
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    diff = float(np.abs(ours - expected).max())
    if EXACT or expected.size < 16:
        np.testing.assert_array_equal(ours, expected)
    assert diff <= MAX_LIBM_DIFF
    return diff


@pytest.mark.parametrize("seed", SEEDS)
def test_single_draws_match_torch_randn(seed, record_property):
    worst = 0.0
    for shape in SHAPES:
        generator = torch.Generator("cpu").manual_seed(seed)
        worst = max(worst, check_draw(torch_randn(generator, shape), noise_source(seed).standard_normal(shape)))
    record_property("max_abs_diff", worst)


@pytest.mark.parametrize("seed", SEEDS)
def test_consecutive_draws_continue_torch_stream(seed, record_property):
    """Calls continue one stream, including the cached second normal of the small-tensor path."""
    generator, source = torch.Generator("cpu").manual_seed(seed), noise_source(seed)
    worst = max(check_draw(torch_randn(generator, shape), source.standard_normal(shape)) for shape in SEQUENCE)
    record_property("max_abs_diff", worst)


def test_seed_and_stream_position_matter():
    """Guards against a test that passes whatever the source: other seeds and positions are far off."""
    expected = torch_randn(torch.Generator("cpu").manual_seed(7), (64,))
    assert np.abs(noise_source(8).standard_normal((64,)) - expected).max() > 0.5
    source = noise_source(7)
    source.standard_normal((1,))
    assert np.abs(source.standard_normal((64,)) - expected).max() > 0.5


def test_batch_rows_follow_one_generator_per_seed():
    source = noise_source(9, batch=3)
    generators = [torch.Generator("cpu").manual_seed(9 + k) for k in range(3)]
    for shape in [(3, 4, 8, 8), (3, 2), (3, 4, 8, 8)]:
        expected = np.concatenate([torch_randn(g, (1, *shape[1:])) for g in generators])
        check_draw(expected, source.standard_normal(shape))
    with pytest.raises(InputError, match="batch of 3 rows"):
        source.standard_normal((2, 4))


def test_numpy_kind_is_numpys_generator():
    ours = noise_source(3, kind="numpy").standard_normal((2, 5))
    np.testing.assert_array_equal(ours, np.random.default_rng(3).standard_normal((2, 5)))
    rows = noise_source(3, kind="numpy", batch=2).standard_normal((2, 5))
    np.testing.assert_array_equal(rows[1], np.random.default_rng(4).standard_normal((1, 5))[0].astype(np.float32))
    with pytest.raises(InputError, match="rng"):
        GenerationConfig("x", rng="cuda")  # kinds are checked where the user names one


# --- end to end: seed=S in sdonnx is manual_seed(S) in diffusers ---------------------------------

SEED = 1234


def diffusers_images(reference, seeds: list[int]) -> np.ndarray:
    """diffusers' images [B, H, W, 3] in [0, 1], Euler a, one CPU generator per image."""
    scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config)
    oracle = diffusers.StableDiffusionPipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return oracle(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=STEPS, num_images_per_prompt=len(seeds),
        generator=generators if len(seeds) > 1 else generators[0], output_type="np",
    ).images


def sdonnx_images(pipeline, seed: int, batch: int = 1, rng: str = "torch"):
    return pipeline(PROMPT, NEGATIVE_PROMPT, steps=STEPS, sampler="euler_ancestral", seed=seed, batch=batch, rng=rng)


def delta(images, expected: np.ndarray) -> np.ndarray:
    return np.abs(np.stack([np.asarray(i, dtype=np.float64) / 255 for i in images]) - expected)


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_seed_gives_diffusers_image(kind, references, pipelines, record_property):
    expected = diffusers_images(references[kind], [SEED])
    d = delta(sdonnx_images(pipelines[kind], SEED), expected)
    record_property("max_delta_255", round(float(d.max()) * 255, 3))
    assert d.max() <= TOLERANCE, f"max {d.max() * 255:.2f}/255"
    assert delta(sdonnx_images(pipelines[kind], SEED, rng="numpy"), expected).max() > 5 * TOLERANCE


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_batch_gives_diffusers_images_with_a_generator_per_image(references, pipelines, record_property):
    pipeline = pipelines["sd1"]
    images = sdonnx_images(pipeline, SEED, batch=2)
    d = delta(images, diffusers_images(references["sd1"], [SEED, SEED + 1]))
    record_property("max_delta_255", round(float(d.max()) * 255, 3))
    assert d.max() <= TOLERANCE, f"max {d.max() * 255:.2f}/255"
    assert [i.info["seed"] for i in images] == [SEED, SEED + 1]
    (alone,) = sdonnx_images(pipeline, SEED + 1)  # image 2 of the batch, made alone from its own seed
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(images[1], dtype=int)).max() <= 1
