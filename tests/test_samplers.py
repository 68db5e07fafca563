"""Parity of the NumPy plans, samplers and Denoiser with diffusers' schedulers, the oracle.

A deterministic synthetic U-Net (`fake_unet`, NumPy) runs in diffusers' StableDiffusionPipeline loop
(init_noise_sigma, scale_model_input, batched CFG, rescale_noise_cfg, scheduler.step) and in sdonnx's
(make_plan, UNetModel under GuidedDenoiser, run_plan). Both start from the same torch.randn noise. Stochastic samplers
replay diffusers' own draws: the diffusers run records every draw (randn_tensor patched in the
scheduler's module) and the sdonnx sampler draws from `ReplayNoise`, which checks each shape.

Tolerance: max|ours - diffusers| <= RTOL * max|diffusers| on the final latent, RTOL = 1e-5, both
float32 (measured differences are 1e-7..2e-6 relative: float32 rounding of k- vs VP-space arithmetic).
The schedulers, their noise injection and the stand-ins for optional dependencies are in
`diffusers_oracle`, shared with the image-level parity tests.

Known differences, tested separately with their own documented bounds: diffusers' PNDM mixes raw v
outputs for v-prediction (ours mixes eps), and KDPM2-ancestral with karras sigmas feeds two different
timesteps at one sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime.denoiser import Conditioning, Guidance, GuidedDenoiser, UNetModel, rescale_noise_cfg
from sdonnx.runtime.manifest import TensorSpec, TrainingSchedule
from sdonnx.runtime.noise import noise_source
from sdonnx.runtime.pipeline import GenerationConfig
from sdonnx.runtime.sampling import SAMPLERS, make_plan, run_plan, sampler_info
from sdonnx.runtime.schedules import SCHEDULES, sigma_to_timestep, training_sigmas

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers_oracle import ORACLES, ReplayNoise, oracle_scheduler  # noqa: E402 (needs torch and diffusers)

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")  # diffusers' torch/NumPy 2 interop

RTOL = 1e-5
BATCH, TOKENS, DIM = 2, 5, 8
LATENT_SHAPE = (BATCH, 4, 8, 8)
TEXT_PROJECTION = np.random.default_rng(0).standard_normal((DIM, 4)).astype(np.float32)
TIMESTEP_SCALAR = TensorSpec("timestep", "float32", ())

def fake_unet(sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
    """A smooth, nonlinear, timestep- and text-dependent stand-in for the U-Net (NumPy, float32)."""
    t = float(np.asarray(timestep).reshape(-1)[0])
    gain, skip = 0.6 + t / 1200, 0.3 * math.cos(t / 170)
    bias = np.tanh(text.mean(axis=1) @ TEXT_PROJECTION)[:, :, None, None] * (0.5 + t / 2000)
    return (np.tanh(sample * gain) * 0.9 + sample * skip + bias).astype(np.float32)


@dataclass(frozen=True)
class Case:
    sampler: str
    prediction: str = "epsilon"
    spacing: str = "leading"
    kind: str = "default"
    steps: int = 10
    guidance: float = 3.0
    rescale: float = 0.0

    def __str__(self) -> str:
        fields = (self.sampler, self.prediction, self.spacing, self.kind, self.steps)
        return "-".join(map(str, fields)) + f"-g{self.guidance}-r{self.rescale}"

    def config(self) -> dict:
        """The model's scheduler config: the tiny models' schedule (scaled_linear 0.00085..0.012,
        1000 steps, steps_offset 1) with this case's spacing and prediction type."""
        return dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing=self.spacing, prediction_type=self.prediction,
            clip_sample=False, set_alpha_to_one=False,
        )


@dataclass
class Inputs:
    noise: np.ndarray
    cond: np.ndarray
    uncond: np.ndarray


def make_inputs(seed: int = 0) -> Inputs:
    noise = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed)).numpy()
    rng = np.random.default_rng(seed)
    cond, uncond = (rng.standard_normal((BATCH, TOKENS, DIM)).astype(np.float32) for _ in range(2))
    return Inputs(noise, cond, uncond)


def run_diffusers(monkeypatch, case: Case, inputs: Inputs, unet=fake_unet) -> tuple[np.ndarray, list[np.ndarray]]:
    """StableDiffusionPipeline's denoising loop around the diffusers scheduler; returns (latents, draws)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as torch_rescale

    scheduler, draws = oracle_scheduler(
        monkeypatch, case.sampler, case.config(), kind=case.kind, noise=noise_source(1234)
    )
    scheduler.set_timesteps(case.steps)
    guided = case.guidance > 1
    text = np.concatenate([inputs.uncond, inputs.cond]) if guided else inputs.cond
    latents = torch.from_numpy(inputs.noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        out = torch.from_numpy(unet(model_input.numpy(), np.asarray(float(t)), text))
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + case.guidance * (out_cond - out_uncond)
            if case.rescale > 0:
                out = torch_rescale(out, out_cond, guidance_rescale=case.rescale)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents.numpy(), draws


def run_sdonnx(case: Case, inputs: Inputs, draws: list[np.ndarray], unet=fake_unet) -> np.ndarray:
    schedule = TrainingSchedule.from_scheduler_config(case.config())
    plan = make_plan(schedule, case.steps, sampler=case.sampler, kind=case.kind)
    denoise = make_denoiser(
        unet, schedule=schedule, prediction_type=case.prediction, cond=inputs.cond, uncond=inputs.uncond,
        guidance=case.guidance, guidance_rescale=case.rescale, plan=plan,
    )
    return run_plan(plan, denoise, inputs.noise * plan.noise_scale, rng=ReplayNoise(draws))


def relative_diff(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape and ours.dtype == np.float32
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def parity(monkeypatch, case: Case, seed: int = 0) -> float:
    inputs = make_inputs(seed)
    reference, draws = run_diffusers(monkeypatch, case, inputs)
    return relative_diff(run_sdonnx(case, inputs, draws), reference)


PREDICTIONS = ("epsilon", "v_prediction")
CASES = [
    *(Case(s, p) for s in SAMPLERS if s not in ("pndm", "plms") for p in PREDICTIONS),
    Case("pndm"), Case("plms", steps=7),
    *(Case(s, "v_prediction", spacing=sp) for sp in ("trailing", "linspace")
      for s in ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde",
                "dpmpp_sde", "unipc", "ddpm", "lcm")),
    Case("ddim", spacing="trailing"), Case("pndm", spacing="trailing"),
    *(Case(s, p, kind=k) for k in ("karras", "exponential") for p in PREDICTIONS
      for s in ("euler", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "unipc")),
    Case("dpm_2_ancestral", kind="exponential"),
    *(Case(s, guidance=1.0) for s in ("euler", "dpmpp_2m", "ddim", "euler_ancestral")),
    *(Case(s, "v_prediction", guidance=7.5, rescale=0.7) for s in ("euler", "dpmpp_2m_sde", "unipc", "ddim")),
    *(Case(s, steps=1) for s in ("euler", "heun", "dpmpp_2m", "unipc", "pndm", "lcm", "ddim", "dpm_2_ancestral")),
    *(Case(s, steps=25) for s in ("dpmpp_2m", "unipc", "pndm", "lms", "dpmpp_sde")),
    Case("lcm", steps=4), Case("dpmpp_2m", kind="karras", steps=30),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sampler_matches_diffusers(monkeypatch, case):
    assert parity(monkeypatch, case) <= RTOL


def test_pndm_v_prediction_matches_plms_on_eps(monkeypatch):
    """diffusers' PNDM combines raw model outputs, which for v-prediction are v's at different
    timesteps (rel. diff ~8e-2 from ours). Ours combines eps, which is diffusers' PLMS run on the
    equivalent epsilon model eps = sqrt(a) v + sqrt(1 - a) x: that is what this test checks."""
    case = Case("pndm", "v_prediction")
    alphas_cumprod = np.asarray(TrainingSchedule.from_scheduler_config(case.config()).alphas_cumprod, np.float32)

    def eps_unet(sample, timestep, text):
        a = alphas_cumprod[int(np.asarray(timestep).reshape(-1)[0])]
        return (math.sqrt(a) * fake_unet(sample, timestep, text) + math.sqrt(1 - a) * sample).astype(np.float32)

    inputs = make_inputs()
    reference, _ = run_diffusers(monkeypatch, replace(case, prediction="epsilon"), inputs, unet=eps_unet)
    assert relative_diff(run_sdonnx(case, inputs, []), reference) <= RTOL


def test_dpm_2_ancestral_karras_within_timestep_rounding(monkeypatch):
    """KDPM2Ancestral rounds karras timesteps for its first evaluations but not at its midpoints,
    and with eta 1 the midpoint is exactly the next sigma, so diffusers feeds that sigma two
    timesteps up to 0.5 apart. The Denoiser maps a sigma to one timestep (the rounded one): the
    bound here is for that, about 50x RTOL on this timestep-sensitive fake U-Net."""
    for prediction in PREDICTIONS:
        assert parity(monkeypatch, Case("dpm_2_ancestral", prediction, kind="karras")) <= 1e-3


def test_every_sampler_has_an_oracle():
    assert set(SAMPLERS) == set(ORACLES)
    assert set(SCHEDULES) == {"default", "karras", "exponential"}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a1111_names_resolve_to_the_same_sampler(name):
    info = SAMPLERS[name]
    assert sampler_info(info.a1111_name).function is info.function
    assert GenerationConfig("x", sampler=info.a1111_name).sampler in (name, "plms")


def tiny_schedule(**overrides) -> TrainingSchedule:
    return TrainingSchedule.from_scheduler_config({**Case("euler").config(), **overrides})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(sampler="dpmpp_3m"), "sampler"),
        (dict(schedule="beta"), "schedule"),
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=True), "steps"),
        (dict(steps=1001), "steps"),
        (dict(sampler="ddim", schedule="karras"), "schedule"),
        (dict(sampler="pndm", schedule="exponential"), "schedule"),
        (dict(sampler="lcm", steps=51), "steps"),
    ],
)
def test_config_rejects_bad_plans_before_any_work(kwargs, field):
    with pytest.raises(InputError) as error:
        GenerationConfig("x", **kwargs)
    assert error.value.field == field


def test_plan_refuses_more_steps_than_the_model_was_trained_with():
    with pytest.raises(InputError, match="training steps") as error:
        make_plan(tiny_schedule(num_train_timesteps=500), 600, sampler="euler")
    assert error.value.field == "steps"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(InputError, match="dpmpp_2m_sde"):
        GenerationConfig("x", sampler="nope")
    with pytest.raises(InputError, match="exponential"):
        GenerationConfig("x", schedule="nope")
    with pytest.raises(InputError, match="Euler a"):
        sampler_info("nope")


def test_sigma_to_timestep_inverts_the_training_schedule():
    schedule = tiny_schedule()
    timesteps = np.arange(schedule.num_train_timesteps)
    np.testing.assert_allclose(sigma_to_timestep(schedule, training_sigmas(schedule)), timesteps, atol=1e-3)
    assert sigma_to_timestep(schedule, 1e3) == schedule.num_train_timesteps - 1
    assert sigma_to_timestep(schedule, 0.0) == 0


def test_plan_places_noise_and_maps_back_to_vp():
    schedule = tiny_schedule()
    euler = make_plan(schedule, 10, sampler="euler")
    ddim = make_plan(schedule, 10, sampler="ddim")
    sigma_max = float(euler.sigmas[0])
    assert euler.noise_scale == pytest.approx(math.sqrt(sigma_max**2 + 1)) and euler.latent_scale == 1
    assert make_plan(tiny_schedule(timestep_spacing="trailing"), 10, sampler="euler").noise_scale == pytest.approx(
        float(training_sigmas(schedule)[-1]), rel=1e-6
    )
    assert ddim.sigmas[-1] == training_sigmas(schedule)[0]
    assert ddim.latent_scale == pytest.approx(math.sqrt(schedule.alphas_cumprod[0]), rel=1e-6)
    assert make_plan(schedule, 10, sampler="pndm").steps == 10


def recording_unet(calls: list):
    def unet(sample, timestep, text):
        calls.append((sample.shape, sample.dtype, np.asarray(timestep), text.copy()))
        return fake_unet(sample.astype(np.float32), timestep, text)

    return unet


def make_denoiser(
    unet, *, spec=TIMESTEP_SCALAR, guidance=3.0, guidance_rescale=0.0, guidance_interval=None, cond=None,
    uncond=None, prediction_type="epsilon", schedule=None, sample_dtype="float32", plan=None, max_batch=None,
    guided=True,
) -> GuidedDenoiser:
    """The denoiser the pipeline builds, around `unet(sample, timestep, text)`; uncond defaults to
    make_inputs()' unless guided=False."""
    inputs = make_inputs()
    cond = inputs.cond if cond is None else cond
    uncond = (inputs.uncond if guided else None) if uncond is None else uncond

    def run(sample, timestep, encoder_hidden_states):
        return unet(sample, timestep, encoder_hidden_states)

    sample_spec = TensorSpec("sample", sample_dtype, ("batch", 4, "height", "width"))
    model = UNetModel(run, schedule or tiny_schedule(), prediction_type, sample_spec, spec, plan)
    return GuidedDenoiser(
        model, Conditioning({"encoder_hidden_states": cond}),
        None if uncond is None else Conditioning({"encoder_hidden_states": uncond}),
        Guidance(guidance, guidance_rescale, guidance_interval), max_batch=max_batch,
    )


@pytest.mark.parametrize(
    ("spec", "shape", "dtype"),
    [
        (TensorSpec("timestep", "float32", ()), (), np.float32),
        (TensorSpec("timestep", "int64", ("batch",)), (2 * BATCH,), np.int64),
        (TensorSpec("timestep", "float32", ("batch",)), (2 * BATCH,), np.float32),
        (TensorSpec("timestep", "float16", (1,)), (1,), np.float16),
    ],
)
def test_timestep_dtype_and_rank(spec, shape, dtype):
    calls: list = []
    schedule = tiny_schedule()
    sigma = float(np.interp(412.3, np.arange(1000), training_sigmas(schedule)))
    make_denoiser(recording_unet(calls), spec=spec)(make_inputs().noise, sigma)
    (_, _, timestep, _), = calls
    assert timestep.shape == shape and timestep.dtype == dtype
    expected = float(sigma_to_timestep(schedule, sigma))
    assert expected == pytest.approx(412.3, abs=0.05)
    expected = round(expected) if dtype == np.int64 else expected
    np.testing.assert_allclose(timestep.astype(np.float64), expected, rtol=1e-3)


def test_guidance_off_makes_one_call_on_the_conditional_batch():
    calls: list = []
    inputs = make_inputs()
    make_denoiser(recording_unet(calls), guidance=1.0, guided=False)(inputs.noise, 3.0)
    (shape, _, _, text), = calls
    assert shape == LATENT_SHAPE
    np.testing.assert_array_equal(text, inputs.cond)


def test_guidance_makes_one_batched_call_uncond_first():
    calls: list = []
    inputs = make_inputs()
    denoiser = make_denoiser(recording_unet(calls), guidance=4.0)
    denoised = denoiser(inputs.noise, 3.0)
    (shape, _, _, text), = calls
    assert shape == (2 * BATCH, *LATENT_SHAPE[1:])
    np.testing.assert_array_equal(text, np.concatenate([inputs.uncond, inputs.cond]))
    t = np.asarray(denoiser.model.timestep(3.0))
    sample_in = inputs.noise / math.sqrt(10)
    out_uncond, out_cond = fake_unet(sample_in, t, inputs.uncond), fake_unet(sample_in, t, inputs.cond)
    expected = inputs.noise - 3.0 * (out_uncond + 4.0 * (out_cond - out_uncond))
    np.testing.assert_allclose(denoised, expected, rtol=1e-5, atol=1e-5)


def test_float16_graph_gets_float16_sample():
    calls: list = []
    make_denoiser(recording_unet(calls), sample_dtype="float16")(make_inputs().noise, 2.0)
    assert calls[0][1] == np.float16


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as torch_rescale

    rng = np.random.default_rng(3)
    guided, cond = (rng.standard_normal(LATENT_SHAPE).astype(np.float32) * s for s in (3.0, 1.0))
    expected = torch_rescale(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=0.7).numpy()
    np.testing.assert_allclose(rescale_noise_cfg(guided, cond, 0.7), expected, rtol=1e-5, atol=1e-6)


def test_sample_prediction_returns_the_output():
    calls: list = []
    inputs = make_inputs()
    denoised = make_denoiser(recording_unet(calls), guidance=1.0, prediction_type="sample")(inputs.noise, 5.0)
    np.testing.assert_array_equal(denoised, fake_unet(inputs.noise / math.sqrt(26), calls[0][2], inputs.cond))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(guidance=3.0, guided=False), InputError),
        (dict(guidance=-1.0), InputError),
        (dict(guidance_rescale=1.5), InputError),
        (dict(prediction_type="flow"), ModelError),
        (dict(spec=TensorSpec("timestep", "float32", (1, 1))), ModelError),
        (dict(spec=TensorSpec("timestep", "bool", ())), ModelError),
    ],
)
def test_denoiser_rejects_bad_config(kwargs, error):
    with pytest.raises(error):
        make_denoiser(fake_unet, **kwargs)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "ddpm", "lcm"])
def test_stochastic_samplers_need_noise_before_any_unet_call(name):
    calls: list = []
    plan = make_plan(tiny_schedule(), 4, sampler=name)
    with pytest.raises(InputError) as error:
        run_plan(plan, make_denoiser(recording_unet(calls)), make_inputs().noise)
    assert error.value.field == "rng" and not calls


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_once_per_step(name):
    plan = make_plan(tiny_schedule(), 6, sampler=name)
    seen: list[dict] = []
    run_plan(plan, make_denoiser(fake_unet), make_inputs().noise, rng=noise_source(0), callback=seen.append)
    assert [info["i"] for info in seen] == list(range(6))
    assert [info["sigma"] for info in seen] == [float(s) for s in plan.sigmas[:-1]]
    assert all(info["x"].shape == info["denoised"].shape == LATENT_SHAPE for info in seen)


def test_guidance_interval_skips_the_unconditional_half_outside_it():
    inputs = make_inputs()
    inside, outside, plain, unguided = [], [], [], []
    interval = (1.0, 5.0)
    guided_in = make_denoiser(recording_unet(inside), guidance=4.0, guidance_interval=interval)(inputs.noise, 3.0)
    guided_out = make_denoiser(recording_unet(outside), guidance=4.0, guidance_interval=interval)(inputs.noise, 7.0)
    full = make_denoiser(recording_unet(plain), guidance=4.0)(inputs.noise, 3.0)
    cond_only = make_denoiser(recording_unet(unguided), guidance=1.0, guided=False)(inputs.noise, 7.0)
    assert inside[0][0][0] == 2 * BATCH and outside[0][0][0] == BATCH
    np.testing.assert_array_equal(guided_in, full)
    np.testing.assert_array_equal(guided_out, cond_only)
    np.testing.assert_array_equal(outside[0][3], inputs.cond)


@pytest.mark.parametrize("interval", [(5.0, 1.0), (-1.0, 2.0), (0.0, float("inf")), (1.0,), "1,2"])
def test_guidance_interval_must_be_an_ordered_pair(interval):
    with pytest.raises(InputError, match="guidance_interval"):
        make_denoiser(recording_unet([]), guidance=4.0, guidance_interval=interval)


def test_max_batch_runs_one_image_at_a_time_with_the_same_result():
    inputs = make_inputs()
    whole, split = [], []
    together = make_denoiser(recording_unet(whole), guidance=4.0)(inputs.noise, 3.0)
    apart = make_denoiser(recording_unet(split), guidance=4.0, max_batch=1)(inputs.noise, 3.0)
    assert [c[0][0] for c in whole] == [2 * BATCH] and [c[0][0] for c in split] == [1] * (2 * BATCH)
    np.testing.assert_array_equal(np.concatenate([c[3] for c in split]), np.concatenate([inputs.uncond, inputs.cond]))
    np.testing.assert_allclose(apart, together, rtol=1e-6, atol=1e-6)


def test_conditioning_is_cast_once_to_the_dtypes_the_graph_declares():
    calls: list = []
    denoiser = make_denoiser(recording_unet(calls), guidance=4.0)
    model = replace(denoiser.model, input_dtypes={"encoder_hidden_states": "float16"})
    denoiser = replace(denoiser, model=model)
    denoiser(make_inputs().noise, 3.0)
    denoiser(make_inputs().noise, 2.0)
    assert all(text.dtype == np.float16 for *_, text in calls)
    assert denoiser._pair is denoiser._pair  # cached: one cast for the whole run
