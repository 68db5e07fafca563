"""Reproducible outputs: the A1111-style `parameters` text and `sdonnx generate --from-png`.

The format is checked both ways (every GenerationConfig field that the text carries survives a
round trip; every sampler and schedule maps to A1111's display name and back) and against handmade
samples of A1111's own infotext (both sampler-name eras, quoted values with commas, fields sdonnx
does not know, multi-line prompts, no negative prompt). The CLI test regenerates a PNG from its own
metadata and compares pixels.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from sdonnx.cli import main
from sdonnx.errors import InputError
from sdonnx.runtime import GenerationConfig
from sdonnx.runtime.metadata import format_parameters, model_hash, parse_parameters
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.sampling import SAMPLERS

CARRIED = ("prompt", "negative_prompt", "steps", "guidance", "sampler", "schedule", "seed", "height", "width",
           "guidance_rescale", "guidance_interval", "strength", "clip_skip", "rng")

A1111_V19 = """masterpiece, (best quality:1.2), a cat
wearing a hat
Negative prompt: lowres, bad anatomy
worst quality
Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.6, Clip skip: 2, RNG: CPU, \
Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54, more: 0123456789ab", \
TI hashes: "easynegative: c74b4e810b03", Version: v1.9.4"""

A1111_V15 = """a lighthouse at dusk, "oil painting"
Steps: 20, Sampler: DPM++ 2M SDE Exponential, CFG scale: 7, Seed: 1, Face restoration: CodeFormer, \
Size: 640x448, Model hash: 0123456789, Model: sd-v1-5, ENSD: 31337, Version: v1.5.1"""


def test_round_trip_keeps_every_carried_field():
    config = GenerationConfig(
        "a red cube:\non a table, \"quoted\"", "blurry, ugly\nsecond line", steps=13, guidance=6.25, sampler="dpm_2",
        schedule="exponential", seed=2**40 + 3, height=64, width=96, guidance_rescale=0.7, strength=0.35,
        clip_skip=2, rng="numpy", batch=3, guidance_interval=(0.5, 7.25),
    )
    fields = parse_parameters(format_parameters(config, seed=config.seed, size=(96, 64)))
    assert fields == {name: getattr(config, name) for name in CARRIED}
    default = GenerationConfig("x", seed=5, height=64, width=64)
    assert parse_parameters(format_parameters(default, seed=5, size=(64, 64))) == {
        "prompt": "x", "negative_prompt": "", "steps": 30, "guidance": 7.5, "sampler": "euler",
        "seed": 5, "width": 64, "height": 64, "rng": "torch",
    }


@pytest.mark.parametrize(
    ("sampler", "schedule"), [(name, kind) for name in sorted(SAMPLERS) for kind in SAMPLERS[name].schedules]
)
def test_every_sampler_and_schedule_has_a_display_name(sampler, schedule):
    text = format_parameters(GenerationConfig("x", sampler=sampler, schedule=schedule), seed=1, size=(8, 8))
    name = SAMPLERS[sampler].a1111_name
    assert f"Sampler: {name}," in text
    fields = parse_parameters(text)
    assert SAMPLERS[fields["sampler"]].function is SAMPLERS[sampler].function  # "PLMS" reads back as plms
    assert fields.get("schedule", "default") == schedule
    legacy = text.replace(f"Sampler: {name}, Schedule type: Karras", f"Sampler: {name} Karras")  # A1111 before 1.9
    assert parse_parameters(legacy).get("schedule", "default") == schedule


def test_reads_a1111_files():
    fields = parse_parameters(A1111_V19)
    assert fields == {
        "prompt": "masterpiece, (best quality:1.2), a cat\nwearing a hat",
        "negative_prompt": "lowres, bad anatomy\nworst quality",
        "steps": 25, "sampler": "dpmpp_2m", "schedule": "karras", "guidance": 6.5, "seed": 3141592653,
        "width": 512, "height": 768, "clip_skip": 2, "rng": "torch",
        # a hires-fix file: its denoising strength is the hires pass's
        "hires_scale": 2.0, "hires_strength": 0.6, "hires_upscaler": "latent",
    }
    GenerationConfig(**fields)  # every value is valid as it comes
    fields = parse_parameters(A1111_V15)
    assert fields["prompt"] == 'a lighthouse at dusk, "oil painting"' and fields["negative_prompt"] == ""
    assert (fields["sampler"], fields["schedule"]) == ("dpmpp_2m_sde", "exponential")
    assert (fields["width"], fields["height"]) == (640, 448)
    prompt_only = "just a prompt\nover two lines"
    assert parse_parameters(prompt_only) == {"prompt": prompt_only, "negative_prompt": ""}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("x\nSteps: 20, Sampler: DPM++ 3M SDE, CFG scale: 7, Seed: 1", "Sampler"),
        ("x\nSteps: 20, Sampler: Euler, Schedule type: Align Your Steps, Seed: 1", "Schedule type"),
        ("x\nSteps: 20, Sampler: Euler, RNG: NV, Seed: 1", "RNG"),
        ("x\nSteps: twenty, Sampler: Euler, Seed: 1", "Steps"),
        ("x\nSteps: 20, Sampler: Euler, Size: 512, Seed: 1", "Size"),
    ],
)
def test_values_sdonnx_cannot_honour_are_named(text, field):
    with pytest.raises(InputError, match=field) as e:
        parse_parameters(text)
    assert e.value.field == f"parameters: {field}"


def test_model_hash_names_the_unet_weights(tiny_exports, optimum_fixture):
    hashes = {}
    for kind, folder in tiny_exports.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        lines = sorted(f"{path} {digest}" for path, digest in manifest["files"].items() if path.startswith("unet/"))
        hashes[kind] = model_hash(ModelFolder.load(folder))
        assert hashes[kind] == hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]
    assert hashes["sd1"] != hashes["sd2"]
    assert model_hash(ModelFolder.load(optimum_fixture)) is None


# --- CLI -----------------------------------------------------------------------------------------


def generate(*argv) -> int:
    return main(["generate", *map(str, argv), "-q"])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def parameters(path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def test_from_png_reproduces_the_image(tiny_exports, tmp_path):
    model = tiny_exports["sd1"]
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    settings = ["--steps", "3", "--sampler", "euler_ancestral", "--schedule", "karras", "--guidance", "5.5",
                "--guidance-rescale", "0.3", "--rng", "numpy", "--batch", "2"]
    assert generate("a red cube, on a table", "-n", "blurry: ugly", "-m", model, *settings, "--seed", 7, "-o", a) == 0
    second = tmp_path / "a-2.png"
    text = parameters(second)
    assert "Seed: 8," in text and "Sampler: Euler a, Schedule type: Karras" in text and "RNG: NumPy" in text
    assert generate("--from-png", second, "-m", model, "-o", b) == 0
    np.testing.assert_array_equal(pixels(b), pixels(second))
    assert parameters(b) == text
    assert generate("--from-png", second, "-m", model, "--seed", 9, "-o", c) == 0  # flags override the file
    assert "Seed: 9," in parameters(c) and np.abs(pixels(c).astype(int) - pixels(b)).max() > 10


def test_from_png_needs_parameters(tmp_path, capsys):
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    assert generate("--from-png", bare, "-m", tmp_path, "-o", tmp_path / "out.png") == 2
    assert f"--from-png: got '{bare}'" in capsys.readouterr().err
    assert generate("-m", tmp_path, "-o", tmp_path / "out.png") == 2
    assert "prompt" in capsys.readouterr().err


def test_init_image_and_mask_are_checked_before_loading(tmp_path, capsys):
    nowhere = tmp_path / "no-such-model"  # loading it would fail with a different error
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a PNG")
    image = tmp_path / "init.png"
    Image.new("L", (8, 8)).save(image)
    cases = [
        (["--init-image", tmp_path / "missing.png"], "init_image"),
        (["--init-image", not_an_image], "init_image"),
        (["--init-image", image, "--mask", not_an_image], "mask"),
        (["--mask", image], "--init-image too"),
        (["--init-image", image, "--strength", "1.5"], "strength"),
    ]
    for flags, message in cases:
        assert generate("a cat", "-m", nowhere, *flags, "-o", tmp_path / "out.png") == 2
        err = capsys.readouterr().err
        assert message in err and "no-such-model" not in err, (flags, err)
    assert not (tmp_path / "out.png").exists()


def test_init_image_runs_img2img_and_mask_inpainting(tiny_exports, tmp_path):
    model = tiny_exports["sd1"]
    init, mask, out, again = (tmp_path / f"{name}.png" for name in ("init", "mask", "out", "again"))
    assert generate("a red cube", "-m", model, "--steps", "2", "--seed", 3, "-o", init) == 0
    assert generate("a blue cube", "-m", model, "--steps", "4", "--seed", 3, "--init-image", init,
                    "--strength", "0.5", "-o", out) == 0
    assert "Denoising strength: 0.5," in parameters(out)
    assert generate("--from-png", out, "--init-image", init, "-m", model, "-o", again) == 0
    np.testing.assert_array_equal(pixels(again), pixels(out))

    size = pixels(init).shape[1::-1]  # (width, height)
    white_left = Image.new("L", size)
    white_left.paste(255, (0, 0, size[0] // 2, size[1]))
    white_left.save(mask)
    assert generate("a blue cube", "-m", model, "--steps", "4", "--seed", 3, "--init-image", init,
                    "--mask", mask, "-o", out) == 0
    kept = np.abs(pixels(out).astype(int) - pixels(init))[:, size[0] // 2 + 8:]
    assert kept.mean() < np.abs(pixels(out).astype(int) - pixels(init))[:, : size[0] // 2].mean()


def test_init_image_without_strength_uses_img2img_default(tiny_exports, tmp_path):
    """Strength 1 would ignore the init image; the CLI uses Pipeline.img2img's default instead."""
    from sdonnx.runtime.starts import IMG2IMG_STRENGTH

    model = tiny_exports["sd1"]
    init, out = tmp_path / "init.png", tmp_path / "out.png"
    assert generate("a red cube", "-m", model, "--steps", "2", "--seed", 3, "-o", init) == 0
    assert generate("a blue cube", "-m", model, "--steps", "4", "--seed", 3, "--init-image", init, "-o", out) == 0
    assert IMG2IMG_STRENGTH < 1
    assert f"Denoising strength: {IMG2IMG_STRENGTH:g}," in parameters(out)
