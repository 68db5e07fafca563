"""ControlNet: export, parity with diffusers' ControlNet pipelines, and bad input.

Tiny ControlNets are built from the tiny U-Nets (`ControlNetModel.from_unet`) with every weight
then perturbed, the zero-initialized convolutions included, so that the residuals matter. Parity:
the same weights, noise and scheduler as diffusers' StableDiffusionControlNetPipeline (and its
img2img and inpaint variants) give the same image within TOLERANCE, compared before either side
rounds to 8 bits (rounding alone is worth 0.5/255); noise is shared as in tests/test_img2img.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime import Control, Pipeline
from sdonnx.runtime import images as images_module
from sdonnx.runtime.noise import noise_source

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from test_img2img import init_image  # noqa: E402
from test_img2img import share_noise as img2img_noise  # noqa: E402
from test_pipeline_parity import (  # noqa: E402,F401 (fixtures are used by name)
    GUIDANCE, NEGATIVE_PROMPT, PROMPT, SEED, STEPS, pipelines, references,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

TOLERANCE = 0.5 / 255
RANDN_MODULES = (
    "diffusers.models.autoencoders.vae",
    "diffusers.pipelines.controlnet.pipeline_controlnet",
    "diffusers.pipelines.controlnet.pipeline_controlnet_img2img",
    "diffusers.pipelines.controlnet.pipeline_controlnet_inpaint",
    "diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl",
)


def build_controlnet(unet_folder, out, seed: int):
    """A ControlNet for the U-Net at `unet_folder`, every weight perturbed with `seed`, saved to `out`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    net.save_pretrained(out)
    return net


@pytest.fixture(scope="session")
def controlnets(tiny_sources, tmp_path_factory):
    """{name: (diffusers ControlNetModel, exported folder)}: two for sd1, one for sd2."""
    from sdonnx.export import ExportConfig, export_model

    root = tmp_path_factory.mktemp("controlnets")
    (root / "onnx").mkdir()
    made = {}
    for name, kind, seed in (("a", "sd1", 1), ("b", "sd1", 2), ("sd2", "sd2", 3)):
        net = build_controlnet(tiny_sources[kind] / "unet", root / "src" / name, seed)
        export_model(ExportConfig(str(root / "src" / name), root / "onnx" / name, quiet=True))
        made[name] = (net, root / "onnx" / name)
    return made


def control_image(size: int = 64, seed: int = 7) -> Image.Image:
    """An edge-map-like picture: white strokes on black."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size, 2)
        pixels[y, :] = 255 if rng.random() < 0.5 else pixels[y, :]
        pixels[:, x] = 255
    return Image.fromarray(pixels)


def unrounded(monkeypatch, run) -> np.ndarray:
    """The first image `run()` makes, [H, W, 3] in [0, 1] as decoded, before 8-bit rounding."""
    captured, real = [], images_module.to_images

    def capture(pixels):
        captured.append(np.clip(pixels.astype(np.float64) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
        return real(pixels)

    monkeypatch.setattr(images_module, "to_images", capture)
    run()
    monkeypatch.setattr(images_module, "to_images", real)
    return captured[0][0]


def check_delta(ours: np.ndarray, expected: np.ndarray, record_property) -> None:
    delta = np.abs(ours - expected)
    record_property("max_delta_255", round(float(delta.max()) * 255, 4))
    assert delta.max() <= TOLERANCE, f"max {delta.max() * 255:.3f}/255, mean {delta.mean() * 255:.3f}/255"


def share_noise(monkeypatch, reference, noise):
    """diffusers' Euler for `reference`, every randn_tensor of the ControlNet pipelines drawing from `noise`."""
    return img2img_noise(monkeypatch, "euler", reference, noise, RANDN_MODULES)


# (id, ControlNets with their settings, diffusers kwargs): each case names its nets and settings once.
CASES = {
    "one": ([("a", {})], {}),
    "two-scales": ([("a", {"scale": 0.7}), ("b", {"scale": 1.3})], {}),
    "guess-mode": ([("a", {"guess_mode": True})], {"guess_mode": True}),
    "window": ([("a", {"start": 0.25, "end": 0.75})], {}),
}


def _oracle_kwargs(settings: list[tuple[str, dict]], images: list[Image.Image]) -> dict:
    one = len(settings) == 1
    pick = (lambda values: values[0]) if one else list
    return {
        "image": pick(images),
        "controlnet_conditioning_scale": pick([s.get("scale", 1.0) for _, s in settings]),
        "control_guidance_start": pick([s.get("start", 0.0) for _, s in settings]),
        "control_guidance_end": pick([s.get("end", 1.0) for _, s in settings]),
    }


def _controls(settings, images, controlnets) -> list[Control]:
    return [Control(controlnets[name][1], image, **s) for (name, s), image in zip(settings, images)]


def _oracle(cls, reference, settings, controlnets, scheduler):
    nets = [controlnets[name][0] for name, _ in settings]
    oracle = cls.from_pipe(reference, controlnet=nets[0] if len(nets) == 1 else nets, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    return oracle


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers(case, controlnets, references, pipelines, monkeypatch, record_property):
    settings, extra = CASES[case]
    images = [control_image(seed=7 + i) for i in range(len(settings))]
    m = pipelines["sd1"].manifest
    latents = noise_source(0).standard_normal((1, m.latent_channels, m.sample_size, m.sample_size)).astype(np.float32)
    scheduler = share_noise(monkeypatch, references["sd1"], noise_source(SEED))
    oracle = _oracle(diffusers.StableDiffusionControlNetPipeline, references["sd1"], settings, controlnets, scheduler)
    expected = oracle(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        latents=torch.from_numpy(latents), output_type="np", **_oracle_kwargs(settings, images), **extra,
    ).images[0]
    ours = unrounded(monkeypatch, lambda: pipelines["sd1"](
        PROMPT, NEGATIVE_PROMPT, steps=STEPS, guidance=GUIDANCE, sampler="euler", seed=SEED, latents=latents,
        control=_controls(settings, images, controlnets),
    ))
    plain = unrounded(monkeypatch, lambda: pipelines["sd1"](
        PROMPT, NEGATIVE_PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED, latents=latents))
    assert np.abs(plain - expected).max() > 20 * TOLERANCE, "the ControlNet changed nothing"
    check_delta(ours, expected, record_property)


def test_img2img_with_control_matches_diffusers(controlnets, references, pipelines, monkeypatch, record_property):
    settings = [("a", {"scale": 0.8})]
    images = [control_image()]
    scheduler = share_noise(monkeypatch, references["sd1"], noise_source(SEED))
    oracle = _oracle(diffusers.StableDiffusionControlNetImg2ImgPipeline, references["sd1"], settings, controlnets,
                     scheduler)
    kwargs = _oracle_kwargs(settings, images)
    expected = oracle(
        PROMPT, image=init_image(), control_image=kwargs.pop("image"), strength=0.6, negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np", **kwargs,
    ).images[0]
    ours = unrounded(monkeypatch, lambda: pipelines["sd1"].img2img(
        PROMPT, NEGATIVE_PROMPT, image=init_image(), strength=0.6, steps=STEPS, guidance=GUIDANCE, sampler="euler",
        seed=SEED, control=_controls(settings, images, controlnets),
    ))
    check_delta(ours, expected, record_property)


def test_inpaint_with_control_matches_diffusers(controlnets, references, pipelines, monkeypatch, record_property):
    settings = [("a", {})]
    images = [control_image()]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    scheduler = share_noise(monkeypatch, references["sd1"], noise_source(SEED))
    oracle = _oracle(diffusers.StableDiffusionControlNetInpaintPipeline, references["sd1"], settings, controlnets,
                     scheduler)
    kwargs = _oracle_kwargs(settings, images)
    expected = oracle(
        PROMPT, image=init_image(), mask_image=mask, control_image=kwargs.pop("image"), strength=1.0,
        negative_prompt=NEGATIVE_PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
        **kwargs,
    ).images[0]
    ours = unrounded(monkeypatch, lambda: pipelines["sd1"].inpaint(
        PROMPT, NEGATIVE_PROMPT, image=init_image(), mask=mask, strength=1.0, steps=STEPS, guidance=GUIDANCE,
        sampler="euler", seed=SEED, control=_controls(settings, images, controlnets),
    ))
    check_delta(ours, expected, record_property)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_sources, tiny_sdxl_exports, tmp_path_factory):
    """(diffusers SDXL pipeline, our Pipeline, diffusers ControlNet, its export) for the tiny SDXL."""
    from sdonnx.export import ExportConfig, export_model

    root = tmp_path_factory.mktemp("sdxl-controlnet")
    net = build_controlnet(tiny_sdxl_sources["sdxl"] / "unet", root / "src", seed=4)
    export_model(ExportConfig(str(root / "src"), root / "onnx", quiet=True))
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_sources["sdxl"])
    return reference, Pipeline.load(tiny_sdxl_exports["sdxl"], provider="cpu", progress=False), net, root / "onnx"


def test_sdxl_with_control_matches_diffusers(sdxl, monkeypatch, record_property):
    reference, pipe, net, folder = sdxl
    m = pipe.manifest
    latents = noise_source(0).standard_normal((1, m.latent_channels, m.sample_size, m.sample_size)).astype(np.float32)
    size = m.sample_size * m.vae_downsample
    image = control_image(size)
    scheduler = share_noise(monkeypatch, reference, noise_source(SEED))
    oracle = diffusers.StableDiffusionXLControlNetPipeline.from_pipe(reference, controlnet=net, scheduler=scheduler)
    oracle.set_progress_bar_config(disable=True)
    expected = oracle(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, image=image, controlnet_conditioning_scale=0.8,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np",
    ).images[0]
    ours = unrounded(monkeypatch, lambda: pipe(
        PROMPT, NEGATIVE_PROMPT, steps=STEPS, guidance=GUIDANCE, sampler="euler", seed=SEED, latents=latents,
        control=Control(folder, image, scale=0.8)))
    plain = unrounded(monkeypatch, lambda: pipe(
        PROMPT, NEGATIVE_PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED, latents=latents))
    assert np.abs(plain - expected).max() > 20 * TOLERANCE, "the ControlNet changed nothing"
    check_delta(ours, expected, record_property)


def test_sd_controlnet_is_refused_by_sdxl(sdxl, controlnets):
    with pytest.raises(InputError, match="control.model"):
        sdxl[1]("x", steps=1, control=Control(controlnets["a"][1], control_image()))


def test_export_writes_the_controlnet_layout(controlnets):
    folder = controlnets["a"][1]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "controlnet" and manifest["conditioning_downsample"] == 8
    names = [r["name"] for r in manifest["residuals"]]
    assert names[-1] == "mid_block_additional_residual" and names[0] == "down_block_0_additional_residual"
    inputs = [t["name"] for t in manifest["graphs"]["controlnet"]["inputs"]]
    assert inputs == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"]
    assert manifest["graphs"]["controlnet"]["check"]["psnr_db"] > 60
    with pytest.raises(ModelError, match="ControlNet"):
        Pipeline.load(folder)


# --- bad input ---------------------------------------------------------------------------------------


def test_controlnet_of_another_family_is_refused_before_any_run(controlnets, pipelines):
    with pytest.raises(InputError, match="cross-attention width 32"):
        pipelines["sd1"]("x", steps=1, control=Control(controlnets["sd2"][1], control_image()))


def test_control_image_of_another_aspect_ratio(controlnets, pipelines):
    wide = control_image().resize((128, 64))
    with pytest.raises(InputError, match=r"control.image: got '128x64'.*resize='crop'"):
        pipelines["sd1"]("x", steps=1, control=Control(controlnets["a"][1], wide))
    (image,) = pipelines["sd1"]("x", steps=1, seed=1, control=Control(controlnets["a"][1], wide, resize="crop"))
    assert image.size == (64, 64)


def test_non_image_and_bad_settings(controlnets, pipelines, tmp_path):
    text = tmp_path / "edges.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="control.image"):
        pipelines["sd1"]("x", steps=1, control=Control(controlnets["a"][1], text))
    with pytest.raises(InputError, match="control.scale"):
        Control(controlnets["a"][1], control_image(), scale=float("nan"))
    with pytest.raises(InputError, match="control.end"):
        Control(controlnets["a"][1], control_image(), start=0.6, end=0.4)
    with pytest.raises(InputError, match="control.model"):
        pipelines["sd1"]("x", steps=1, control=Control(tmp_path / "nowhere", control_image()))


def test_unet_without_residual_inputs_is_refused(controlnets, optimum_fixture):
    pipe = Pipeline.load(optimum_fixture, provider="cpu", progress=False)
    with pytest.raises(InputError, match="exported without them"):
        pipe("x", steps=1, control=Control(controlnets["a"][1], control_image()))


def test_cli_control_flags_and_png_parameters(controlnets, tiny_exports, tmp_path):
    from sdonnx.cli import main
    from sdonnx.runtime.metadata import read_parameters

    edges = tmp_path / "edges.png"
    control_image().save(edges)
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "-m", str(tiny_exports["sd1"]), "--steps", "2", "--seed", "3", "-q", "-o", str(out),
            "--control", str(controlnets["a"][1]), "--control-image", str(edges), "--control-scale", "0.5",
            "--control-end", "0.5"]
    assert main(args) == 0
    parameters = read_parameters(out)
    assert (f'ControlNet 0: "Module: none, Model: a [{_short_hash(controlnets["a"][1])}], Weight: 0.5, '
            'Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 0.5, Control Mode: Balanced"') in parameters
    plain = tmp_path / "plain.png"
    assert main(args[:9] + ["-o", str(plain)]) == 0
    assert np.asarray(Image.open(out)).tolist() != np.asarray(Image.open(plain)).tolist()


def test_cli_control_errors_name_the_flag(controlnets, tiny_exports, tmp_path, capsys):
    from sdonnx.cli import main

    edges = tmp_path / "edges.png"
    control_image().save(edges)
    base = ["generate", "a cat", "-m", str(tiny_exports["sd1"]), "--steps", "1", "-q", "-o", str(tmp_path / "o.png")]
    assert main(base + ["--control", str(controlnets["a"][1])]) == 2
    assert "--control-image" in capsys.readouterr().err
    assert main(base + ["--control", str(controlnets["a"][1]), "--control-image", str(edges),
                        "--control-scale", "nan"]) == 2
    assert "--control-scale: got nan" in capsys.readouterr().err
    assert main(base + ["--control", str(controlnets["sd2"][1]), "--control-image", str(edges)]) == 2
    assert "--control: got" in capsys.readouterr().err


def _short_hash(folder) -> str:
    return json.loads((folder / "manifest.json").read_text())["files"]["controlnet/model.onnx"][:8]


def test_canny_preprocessor_makes_edges(tmp_path):
    from sdonnx.cli import main
    from sdonnx.runtime.preprocess import canny

    picture = Image.new("RGB", (64, 64), (20, 20, 200))
    picture.paste((240, 240, 0), (16, 16, 48, 48))
    edges = np.asarray(canny(picture))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[14:18, 20:44, 0].max(axis=0).min() == 255  # the square's top outline, every column
    assert edges[24:40, 24:40].max() == 0 and edges[:8, :8].max() == 0  # nothing inside it or in the flat corner
    source = tmp_path / "photo.png"
    picture.save(source)
    assert main(["preprocess", "canny", str(source), str(tmp_path / "edges.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "edges.png")), edges)
    with pytest.raises(InputError, match="low"):
        canny(picture, low=250, high=100)


def test_single_file_controlnet_exports_as_its_folder(controlnets, tmp_path):
    """An original-layout file of the same weights (with and without `control_model.`) gives the
    same graph outputs as the folder's export; the architecture comes from --config."""
    from ldm_checkpoint import write_controlnet_checkpoint
    from sdonnx.export import ExportConfig, export_model
    from sdonnx.export.check import run_onnx

    folder = controlnets["a"][1]
    source = folder.parent.parent / "src" / "a"
    reference = None
    for prefix in ("control_model.", ""):
        path = write_controlnet_checkpoint(source, tmp_path / f"control{len(prefix)}.safetensors", prefix)
        out = tmp_path / f"onnx{len(prefix)}"
        export_model(ExportConfig(str(path), out, config=source, quiet=True))
        rng = np.random.default_rng(0)
        feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
                 "timestep": np.asarray(300.0, np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
                 "controlnet_cond": rng.random((2, 3, 64, 64), dtype=np.float32),
                 "conditioning_scale": np.asarray(1.0, np.float32)}
        ours = run_onnx(out / "controlnet" / "model.onnx", feeds)
        reference = reference or run_onnx(folder / "controlnet" / "model.onnx", feeds)
        for name, value in reference.items():
            np.testing.assert_allclose(ours[name], value, atol=1e-5, err_msg=name)


def test_low_memory_releases_the_controlnet_with_the_unet(controlnets, tiny_exports):
    settings = dict(steps=3, seed=2, control=Control(controlnets["a"][1], control_image()))
    normal = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False)
    low = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, low_memory=True)
    (kept,), (released,) = normal("a cat", **settings), low("a cat", **settings)
    assert normal.controlnets._opened and not low.controlnets._opened
    assert "unet" not in low.model.sessions.opened
    assert np.abs(np.asarray(kept, float) - np.asarray(released, float)).max() <= 1
