"""Smoke test of the training script: two steps of each stage, in seconds; CI never trains for real."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.models.judge import ATTRIBUTES
from sdonnx.models.train import TrainConfig, main, object_crops, parse_args, render_batch

# The smallest model each stage accepts, two steps each.
TINY = ["--vae-steps", "2", "--vae-batch-size", "2", "--vae-channels", "8,8,16,16", "--unet-steps", "2",
        "--unet-batch-size", "2", "--unet-channels", "16,32", "--text-hidden", "16", "--text-layers", "1",
        "--drawings", "4", "--position-steps", "2", "--position-drawings", "4"]


def test_importing_the_models_package_does_not_import_torch():
    code = "import sys, sdonnx.models.train; sys.exit(bool({'torch', 'diffusers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_two_vae_steps_write_weights_loss_log_and_report(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    import torch

    folder = main(["--stage", "vae", "--vae-steps", "2", "--seed", "0", "--out", str(tmp_path),
                   "--vae-batch-size", "2", "--vae-channels", "8,8,16,16", "--eval-images", "4", "--crop", "32"])
    assert folder == tmp_path / "vae" and not (tmp_path / "vae.partial").exists()
    with open(tmp_path / "vae-loss.csv") as log:
        rows = list(csv.DictReader(log))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    report = json.loads((tmp_path / "vae-report.json").read_text())
    assert report["images"] == 4 and set(report["judge_accuracy"]) == set(ATTRIBUTES)

    vae = AutoencoderKL.from_pretrained(folder)
    assert vae.config.scaling_factor == pytest.approx(1 / report["latent_std"])
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 8, 8)


def test_training_is_reproducible_from_its_seed(tmp_path):
    pytest.importorskip("diffusers")
    args = [*TINY, "--eval-images", "2"]
    logs = []
    for run in ("a", "b"):
        main([*args, "--out", str(tmp_path / run)])
        logs.append([(tmp_path / run / f"{stage}-loss.csv").read_text() for stage in ("vae", "unet")])
    assert logs[0] == logs[1]


def test_flags_map_onto_config_fields_and_are_validated(tmp_path):
    config = parse_args(["--out", str(tmp_path), "--vae-steps", "7", "--vae-channels", "16,32,64,128",
                         "--kl-weight", "0", "--unet-channels", "32,64,64", "--stage", "unet"])
    assert config == TrainConfig(out=tmp_path, vae_steps=7, vae_channels=(16, 32, 64, 128), kl_weight=0.0,
                                 unet_channels=(32, 64, 64), stage="unet")
    with pytest.raises(InputError, match="image_size"):
        TrainConfig(out=tmp_path, image_size=60)
    with pytest.raises(InputError, match="vae_channels"):
        TrainConfig(out=tmp_path, vae_channels=(16, 32))
    with pytest.raises(InputError, match="crop"):
        TrainConfig(out=tmp_path, crop=20)
    with pytest.raises(InputError, match="vae_channels"):
        TrainConfig(out=tmp_path, vae_channels=(16, 32, 64, 64), vae_norm_groups=3)
    with pytest.raises(InputError, match="unet_steps"):
        TrainConfig(out=tmp_path, unet_steps=0)
    with pytest.raises(InputError, match="stage"):
        TrainConfig(out=tmp_path, stage="everything")


def test_the_unet_stage_needs_the_vae_stage_first(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(InputError, match="--stage vae first"):
        main(["--stage", "unet", "--out", str(tmp_path)])
    assert not (tmp_path / "source").exists()


def test_two_steps_of_both_stages_make_a_diffusers_folder_that_exports_and_generates(tmp_path):
    pytest.importorskip("diffusers")
    from sdonnx.export import ExportConfig, export_model
    from sdonnx.runtime.pipeline import Pipeline

    source = main([*TINY, "--seed", "0", "--out", str(tmp_path / "train")])
    assert source == tmp_path / "train" / "source" and not (tmp_path / "train" / "source.partial").exists()
    for stage in ("position", "unet"):
        with open(tmp_path / "train" / f"{stage}-loss.csv") as log:
            rows = list(csv.DictReader(log))
        assert [int(r["step"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["loss"])) for r in rows)
    report = json.loads((tmp_path / "train" / "unet-report.json").read_text())
    assert set(report["parameters"]) == {"text_encoder", "unet", "vae"}
    from safetensors import safe_open

    with safe_open(str(source / "text_encoder" / "model.safetensors"), "np") as weights:
        # The hub's layout, which transformers 4.x (optimum) needs to find the weights at all.
        assert all(key.startswith("text_model.") for key in weights.keys())
    export_model(ExportConfig(source=str(source), out=tmp_path / "onnx", quiet=True))
    image = Pipeline.load(tmp_path / "onnx", progress=False)("a red circle on a blue background", steps=2, seed=0)[0]
    assert image.size == (64, 64)


def test_object_crops_cut_inside_the_image_around_the_shape():
    rng = np.random.default_rng(0)
    pixels, scenes = render_batch(rng, 16, 64)
    crops = object_crops(pixels, scenes, 32, rng)
    assert crops.shape == (16, 3, 32, 32)
    for image, crop, scene in zip(pixels, crops, scenes):
        matches = [(t, l) for t in range(33) for l in range(33) if (image[:, t : t + 32, l : l + 32] == crop).all()]
        assert matches, "the crop is no window of its image"
        assert any(t <= scene.y * 64 < t + 32 and l <= scene.x * 64 < l + 32 for t, l in matches)
    assert object_crops(pixels, scenes, 0, rng) is pixels


def test_the_weight_average_is_what_gets_saved(tmp_path):
    pytest.importorskip("diffusers")
    from safetensors.numpy import load_file

    vae = main([*TINY, "--stage", "vae", "--eval-images", "2", "--out", str(tmp_path / "plain")])
    (tmp_path / "ema").mkdir()
    import shutil

    shutil.copytree(vae, tmp_path / "ema" / "vae")
    weights = {}
    for run, extra in (("plain", []), ("ema", ["--ema-decay", "0.5"])):
        source = main([*TINY, "--stage", "unet", "--position-steps", "0", *extra, "--out", str(tmp_path / run)])
        weights[run] = load_file(str(source / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights["plain"].keys() == weights["ema"].keys()
    assert any(not np.array_equal(weights["plain"][k], weights["ema"][k]) for k in weights["plain"])
    # Averaging only reads the weights: the training itself is step for step the same.
    assert (tmp_path / "plain" / "unet-loss.csv").read_text() == (tmp_path / "ema" / "unet-loss.csv").read_text()
    with pytest.raises(InputError, match="ema_decay"):
        TrainConfig(out=tmp_path, ema_decay=1.0)


def test_the_position_stage_draws_one_object_everywhere():
    from sdonnx.models.draw import POSITIONS
    from sdonnx.models.train import position_scene

    rng = np.random.default_rng(0)
    scenes = [position_scene(rng) for _ in range(300)]
    assert {(s.shape, s.colour, s.background, s.size) for s in scenes} == {("square", "red", "blue", "large")}
    assert {s.position for s in scenes} == set(POSITIONS)
