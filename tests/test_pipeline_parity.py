"""Image-level parity: every sampler against its diffusers scheduler, end to end on the tiny models.

For both tiny model shapes (sd1: epsilon prediction; sd2: v-prediction) and every sampler,
diffusers' StableDiffusionPipeline (the oracle, its scheduler from `diffusers_oracle`) runs the
diffusers folder and sdonnx's Pipeline runs the `sdonnx export` of it, with the same prompt,
negative prompt and starting noise (`latents=`). Stochastic samplers share their per-step noise
too: the diffusers scheduler draws from `noise_source(SEED)`, which is the source sdonnx's Pipeline
draws from with `seed=SEED` when `latents=` is given.

Tolerance: max |Δpixel| <= 2/255 between diffusers' float image and sdonnx's 8-bit one, both in
[0, 1] (8-bit rounding alone accounts for 0.5/255, which is what every passing case measures).

Known gap: diffusers' PNDM linearly combines the raw model outputs, v for a v-prediction model,
where sdonnx's sample_pndm combines eps. Two models with the same denoised(x, sigma), one predicting
eps and one v, get different PNDM images from diffusers, so no sampler that sees only denoised(x,
sigma) can match both: sd2 + pndm is a strict xfail (test_samplers checks that ours equals
diffusers' PLMS on the equivalent epsilon model).
"""

from __future__ import annotations

import numpy as np
import pytest

from sdonnx.runtime import Pipeline
from sdonnx.runtime.noise import noise_source
from sdonnx.runtime.sampling import SAMPLERS
from tiny_models import KINDS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers_oracle import oracle_scheduler  # noqa: E402 (needs torch and diffusers)

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")  # diffusers' torch/NumPy 2 interop

TOLERANCE = 2 / 255
PROMPT, NEGATIVE_PROMPT = "a red cube on a table", "blurry, ugly"
STEPS, GUIDANCE = 8, 7.5
# LCM as used with LCM-LoRA on a plain SD U-Net: few steps, no classifier-free guidance.
SETTINGS = {"lcm": (4, 1.0)}
SEED = 5
NAMES = [name for name in SAMPLERS if name != "plms"]  # plms is another name for pndm
PNDM_V_GAP = (
    "diffusers' PNDM mixes raw model outputs (v here), sdonnx's mixes eps: which to mix depends on the "
    "prediction type, which samplers do not see (measured max 49.9/255, mean 4.0/255)"
)
CASES = [
    pytest.param(
        kind, name, id=f"{kind}-{name}",
        marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=PNDM_V_GAP)
        if (kind, name) == ("sd2", "pndm") else (),
    )
    for kind in KINDS
    for name in NAMES
]


@pytest.fixture(scope="module")
def references(tiny_sources) -> dict[str, object]:
    """{kind: diffusers StableDiffusionPipeline} loaded once; each test derives one with its scheduler."""
    return {
        kind: diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        for kind, folder in tiny_sources.items()
    }


@pytest.fixture(scope="module")
def pipelines(tiny_exports) -> dict[str, Pipeline]:
    return {kind: Pipeline.load(folder, provider="cpu", progress=False) for kind, folder in tiny_exports.items()}


def image_delta(reference, pipeline: Pipeline, sampler: str, monkeypatch, *, seed: int = SEED) -> np.ndarray:
    """|sdonnx image - diffusers image| [H, W, 3] in [0, 1]; sdonnx draws its per-step noise with `seed`."""
    steps, guidance = SETTINGS.get(sampler, (STEPS, GUIDANCE))
    m = pipeline.manifest
    latents = noise_source(0).standard_normal((1, m.latent_channels, m.sample_size, m.sample_size))
    latents = latents.astype(np.float32)
    scheduler, _ = oracle_scheduler(monkeypatch, sampler, reference.scheduler.config, noise=noise_source(SEED))
    oracle = diffusers.StableDiffusionPipeline.from_pipe(reference, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=steps, guidance_scale=guidance,
        latents=torch.from_numpy(latents), output_type="np",
    ).images[0]
    (ours,) = pipeline(
        PROMPT, NEGATIVE_PROMPT, steps=steps, guidance=guidance, sampler=sampler, seed=seed, latents=latents
    )
    return np.abs(np.asarray(ours, dtype=np.float64) / 255 - expected)


@pytest.mark.parametrize(("kind", "sampler"), CASES)
def test_image_matches_diffusers(kind, sampler, references, pipelines, monkeypatch, record_property):
    delta = image_delta(references[kind], pipelines[kind], sampler, monkeypatch)
    record_property("max_delta_255", round(float(delta.max()) * 255, 3))
    record_property("mean_delta_255", round(float(delta.mean()) * 255, 3))
    assert delta.max() <= TOLERANCE, f"max {delta.max() * 255:.2f}/255, mean {delta.mean() * 255:.2f}/255"


@pytest.mark.parametrize("kind", KINDS)
def test_other_per_step_noise_fails_the_tolerance(kind, references, pipelines, monkeypatch):
    """The per-step noise must be the shared one: with another seed an ancestral sampler is far off."""
    delta = image_delta(references[kind], pipelines[kind], "euler_ancestral", monkeypatch, seed=SEED + 1)
    assert delta.max() > 5 * TOLERANCE
