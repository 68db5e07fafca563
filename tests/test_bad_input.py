"""Bad input, as a new user types it: each row must end in one clear error naming the field as the
user typed it (the flag on the CLI, the argument in the API), with no traceback and no file left
behind, and (CLI) before any graph of the model loads.

CLI rows run `sdonnx.cli.main` in-process against the embedded model; API rows call the Python API.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdonnx.cli import main
from sdonnx.errors import InputError, ModelError, SdonnxError
from sdonnx.runtime import model as model_module
from sdonnx.runtime.pipeline import GenerationConfig, Pipeline
from sdonnx.runtime.providers import RuntimeOptions


@pytest.fixture
def files(tmp_path):
    """Inputs a user might point at: images of several kinds, a text file, folders."""
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small-mask.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    for name, parameters in {
        "huge.png": "a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 100000x100000",
        "bogus-sampler.png": "a cat\nSteps: 4, Sampler: Bogus 3M, CFG scale: 7, Seed: 1, Size: 64x64",
    }.items():
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        Image.new("RGB", (8, 8)).save(tmp_path / name, pnginfo=info)
    (tmp_path / "empty").mkdir()
    (tmp_path / "folder.png").mkdir()
    diffusers_folder = tmp_path / "diffusers"
    (diffusers_folder / "unet").mkdir(parents=True)
    (diffusers_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "cache-file").write_text("")
    return tmp_path


P = "{tmp}"  # replaced by the test's folder
SDXL_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "optimum-tiny-sdxl"
GENERATE = [
    # (id, extra args, the flag the error must name)
    ("steps-0", ["--steps", "0"], "--steps"),
    ("steps-negative", ["--steps", "-1"], "--steps"),
    ("steps-too-many", ["--steps", "1001"], "--steps"),
    ("guidance-negative", ["--guidance", "-1"], "--guidance"),
    ("guidance-huge", ["--guidance", "1e30"], "--guidance"),
    ("guidance-nan", ["--guidance", "nan"], "--guidance"),
    ("rescale-above-1", ["--guidance-rescale", "2"], "--guidance-rescale"),
    ("interval-reversed", ["--guidance-interval", "5,1"], "--guidance-interval"),
    ("interval-text", ["--guidance-interval", "abc"], "--guidance-interval"),
    ("sampler-unknown", ["--sampler", "dpmpp_3m"], "--sampler"),
    ("sampler-schedule-mismatch", ["--sampler", "ddim", "--schedule", "karras"], "--schedule"),
    ("a1111-sampler-schedule-mismatch", ["--sampler", "PLMS", "--schedule", "exponential"], "--schedule"),
    ("lcm-too-many-steps", ["--sampler", "lcm", "--steps", "51"], "--steps"),
    ("schedule-unknown", ["--schedule", "beta"], "--schedule"),
    ("seed-negative", ["--seed", "-1"], "--seed"),
    ("seed-too-large", ["--seed", str(2**64)], "--seed"),
    ("seed-overflows-batch", ["--seed", str(2**64 - 1), "--batch", "2"], "--seed"),
    ("size-absurd", ["--size", "100000x100000"], "--size"),
    ("size-no-memory", ["--size", "4096x4096"], "--size"),
    ("size-not-multiple", ["--size", "63x64"], "--size"),
    ("size-negative", ["--size", "-64x64"], "--size"),
    ("size-text", ["--size", "big"], "--size"),
    ("size-zero", ["--size", "0x0"], "--size"),
    ("batch-zero", ["--batch", "0"], "--batch"),
    ("batch-huge", ["--batch", "100000"], "--batch"),
    ("clip-skip-zero", ["--clip-skip", "0"], "--clip-skip"),
    ("clip-skip-13", ["--clip-skip", "13"], "--clip-skip"),
    ("clip-skip-not-exported", ["--clip-skip", "9"], "--clip-skip"),
    ("strength-without-image", ["--strength", "0.5"], "--strength"),
    ("strength-above-1", ["--strength", "1.5", "--init-image", f"{P}/init.png"], "--strength"),
    ("strength-below-one-step", ["--strength", "0.01", "--steps", "10", "--init-image", f"{P}/init.png"],
     "--strength"),
    ("init-image-missing", ["--init-image", f"{P}/missing.png"], "--init-image"),
    ("init-image-not-an-image", ["--init-image", f"{P}/notes.txt"], "--init-image"),
    ("init-image-too-small", ["--init-image", f"{P}/tiny.png"], "--init-image"),
    ("mask-without-image", ["--mask", f"{P}/small-mask.png"], "--mask"),
    ("mask-wrong-size", ["--init-image", f"{P}/init.png", "--mask", f"{P}/small-mask.png"], "--mask"),
    ("mask-missing", ["--init-image", f"{P}/init.png", "--mask", f"{P}/missing.png"], "--mask"),
    ("output-not-png", ["-o", f"{P}/out.jpg"], "--output"),
    ("output-empty", ["-o", ""], "--output: got ''"),
    ("output-no-folder", ["-o", f"{P}/missing/out.png"], "--output"),
    ("output-is-a-folder", ["-o", f"{P}/folder.png"], "--output"),
    ("from-png-missing", ["--from-png", f"{P}/missing.png"], "--from-png"),
    ("from-png-without-parameters", ["--from-png", f"{P}/plain.png"], "--from-png"),
    ("from-png-absurd-size", ["--from-png", f"{P}/huge.png"], "--size"),
    ("from-png-unknown-sampler", ["--from-png", f"{P}/bogus-sampler.png"], "--from-png parameters: Sampler"),
    ("prompt-weight-huge", ["--negative-prompt", "(blurry:50)"], "--negative-prompt"),
    ("prompt-too-long", ["--negative-prompt", " BREAK ".join(["x"] * 30)], "--negative-prompt"),
    ("model-missing", ["-m", f"{P}/missing"], "--model"),
    ("provider-unknown", ["--provider", "quantum"], "--provider"),
    ("provider-azure", ["--provider", "AzureExecutionProvider"], "--provider"),
    ("provider-absent", ["--provider", "tensorrt"], "--provider"),
    ("threads-zero", ["--threads", "0"], "--threads"),
    ("device-id-negative", ["--device-id", "-1"], "--device-id"),
    ("graph-cache-is-a-file", ["--graph-cache", f"{P}/cache-file"], "--graph-cache"),
]
MODEL_ERRORS = [
    ("model-empty-folder", ["-m", f"{P}/empty"], "empty folder"),
    ("model-diffusers-not-exported", ["-m", f"{P}/diffusers"], "sdonnx export"),
]
OTHER_COMMANDS = [  # (id, argv, what the error line must say)
    ("prompt-missing", ["generate"], "error: PROMPT"),
    ("export-source-missing", ["export", f"{P}/missing-source", f"{P}/out"], "error: SOURCE"),
    ("export-pickle-refused", ["export", f"{P}/model.ckpt", f"{P}/out"], "pass --allow-pickle"),
    ("export-opset", ["export", f"{P}/diffusers", f"{P}/out", "--opset", "5"], "error: --opset"),
    ("export-static-shape", ["export", f"{P}/diffusers", f"{P}/out", "--static-shape", "1x500"],
     "error: --static-shape"),
    ("export-min-psnr", ["export", f"{P}/diffusers", f"{P}/out", "--min-psnr", "-1"], "error: --min-psnr"),
    ("export-recommended-steps", ["export", f"{P}/diffusers", f"{P}/out", "--recommended-steps", "0"],
     "error: --recommended-steps"),
    ("quantize-recipe", ["quantize", f"{P}/diffusers", f"{P}/out", "--recipe", "int3"], "error: --recipe"),
    ("quantize-block-size", ["quantize", f"{P}/diffusers", f"{P}/out", "--recipe", "int4", "--block-size", "7"],
     "error: --block-size"),
    ("info-missing", ["info", f"{P}/missing"], "error: --model"),
    ("quantize-into-its-source", ["quantize", str(SDXL_FIXTURE), str(SDXL_FIXTURE / "unet")], "error: OUT"),
    ("original-size-on-sd1", ["generate", "x", "--original-size", "64x64", "-o", f"{P}/o.png"], "error: --original-size"),
    ("crop-malformed", ["generate", "x", "-m", str(SDXL_FIXTURE), "--crop-top-left", "8", "-o", f"{P}/o.png"],
     "error: --crop-top-left"),
    ("refiner-switch-alone", ["generate", "x", "--refiner-switch", "0.8", "-o", f"{P}/o.png"], "error: --refiner-switch"),
    ("refiner-missing", ["generate", "x", "--refiner", f"{P}/missing", "-o", f"{P}/o.png"], "error: --refiner"),
]


def run_cli(argv, files, capsys) -> tuple[int, str]:
    before = sorted(p.name for p in files.rglob("*"))
    argv = [a.replace(P, str(files)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sorted(p.name for p in files.rglob("*")) == before, "a file was left behind"
    return code, err


@pytest.fixture
def no_graph_loads(monkeypatch):
    """Fail the test if a graph session would open: these errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a graph was loaded before the error")
    monkeypatch.setattr(model_module.graph_cache, "open_session", refuse)


@pytest.mark.parametrize(("argv", "flag"), [pytest.param(a, f, id=i) for i, a, f in GENERATE])
def test_generate_refuses_before_loading(argv, flag, files, capsys, no_graph_loads):
    code, err = run_cli(["generate", "a red circle", "-o", f"{P}/out.png", *argv], files, capsys)
    assert code == 2
    assert f"sdonnx generate: error: {flag}" in err or f"argument {flag}" in err, err


@pytest.mark.parametrize(("argv", "text"), [pytest.param(a, t, id=i) for i, a, t in MODEL_ERRORS])
def test_bad_model_folders_are_named(argv, text, files, capsys):
    code, err = run_cli(["generate", "a red circle", "-o", f"{P}/out.png", *argv], files, capsys)
    assert code == 2 and text in err and "sdonnx generate: error:" in err, err


@pytest.mark.parametrize(("argv", "needle"), [pytest.param(a, n, id=i) for i, a, n in OTHER_COMMANDS])
def test_other_commands_name_the_argument(argv, needle, files, capsys):
    if argv[0] == "export":
        (files / "model.ckpt").write_bytes(b"not a pickle")
    code, err = run_cli(argv, files, capsys)
    assert code == 2 and needle in err, err


API = [
    ("prompt-not-str", dict(prompt=3), "prompt"),
    ("steps-float", dict(steps=2.5), "steps"),
    ("steps-bool", dict(steps=True), "steps"),
    ("guidance-str", dict(guidance="7"), "guidance"),
    ("guidance-inf", dict(guidance=float("inf")), "guidance"),
    ("sampler-none", dict(sampler=None), "sampler"),
    ("batch-bool", dict(batch=True), "batch"),
    ("height-odd", dict(height=65), "height"),
    ("width-zero", dict(width=0), "width"),
    ("width-huge", dict(width=100_000), "width"),
    ("interval-short", dict(guidance_interval=(1.0,)), "guidance_interval"),
    ("strength-negative", dict(strength=-0.1), "strength"),
    ("clip-skip-str", dict(clip_skip="2"), "clip_skip"),
    ("rng-cuda", dict(rng="cuda"), "rng"),
]


@pytest.mark.parametrize(("settings", "field"), [pytest.param(s, f, id=i) for i, s, f in API])
def test_generation_config_names_the_field(settings, field):
    settings = {"prompt": "a cat", **settings}
    with pytest.raises(InputError) as error:
        GenerationConfig(**settings)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (dict(threads=0), "threads"),
        (dict(provider=3), "provider"),
        (dict(graph_optimization="max"), "graph_optimization"),
        (dict(low_memory="yes"), "low_memory"),
        (dict(verify_integrity=1), "verify_integrity"),
    ],
)
def test_runtime_options_name_the_field(settings, field):
    with pytest.raises(InputError) as error:
        RuntimeOptions(**settings)
    assert error.value.field == field


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(progress=False)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda p, t: p.inpaint("x", image=t / "init.png", mask=None), "mask"),
        (lambda p, t: p.img2img("x", image=123), "image"),
        (lambda p, t: p.img2img("x", image=t / "missing.png"), "image"),
        (lambda p, t: p("x", strength=0.5), "strength"),
        (lambda p, t: p("x", latents=np.zeros((1, 4, 4, 4), np.float32)), "latents"),
        (lambda p, t: p("x", latents=np.full((1, 4, 8, 8), np.nan, np.float32)), "latents"),
        (lambda p, t: p.inpaint("x", image=t / "init.png", mask=t / "small-mask.png"), "mask"),
        (lambda p, t: p("x", height=100_000, width=100_000 - 100_000 % 8), "height"),
        (lambda p, t: p("x", height=4096, width=4096), "size"),
        (lambda p, t: p("(x:99)"), "prompt"),
    ],
    ids=["inpaint-no-mask", "image-int", "image-missing", "strength-txt2img", "latents-shape", "latents-nan",
         "mask-size", "size-absurd", "size-no-memory", "weight-huge"],
)
def test_pipeline_calls_name_the_argument(pipe, files, call, field):
    with pytest.raises(InputError) as error:
        call(pipe, files)
    assert error.value.field == field


def test_load_names_the_problem(tmp_path):
    with pytest.raises(InputError) as error:
        Pipeline.load(tmp_path / "missing")
    assert error.value.field == "model"
    with pytest.raises(InputError) as error:
        Pipeline.load(options=RuntimeOptions(), threads=2)
    assert error.value.field == "options"
    with pytest.raises(ModelError):
        Pipeline.load(tmp_path)  # empty folder


def test_every_error_is_one_base_class():
    assert issubclass(InputError, SdonnxError) and issubclass(ModelError, SdonnxError)
    assert issubclass(InputError, ValueError)  # callers catching ValueError keep working
