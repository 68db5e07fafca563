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
from sdonnx.models.train import TrainConfig, main, parse_args, random_crops


def test_importing_the_models_package_does_not_import_torch():
    code = "import sys, sdonnx.models.train; sys.exit(bool({'torch', 'diffusers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_two_vae_steps_write_weights_loss_log_and_report(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    import torch

    folder = main(["--steps", "2", "--seed", "0", "--out", str(tmp_path), "--batch-size", "2",
                   "--vae-channels", "8,8,16,16", "--eval-images", "4", "--crop", "32"])
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
    args = ["--steps", "2", "--batch-size", "2", "--vae-channels", "8,8,16,16", "--eval-images", "2"]
    logs = []
    for run in ("a", "b"):
        main([*args, "--out", str(tmp_path / run)])
        logs.append((tmp_path / run / "vae-loss.csv").read_text())
    assert logs[0] == logs[1]


def test_flags_map_onto_config_fields_and_are_validated(tmp_path):
    config = parse_args(["--out", str(tmp_path), "--steps", "7", "--vae-channels", "16,32,64,64", "--kl-weight", "0"])
    assert config == TrainConfig(out=tmp_path, steps=7, vae_channels=(16, 32, 64, 64), kl_weight=0.0)
    with pytest.raises(InputError, match="image_size"):
        TrainConfig(out=tmp_path, image_size=60)
    with pytest.raises(InputError, match="vae_channels"):
        TrainConfig(out=tmp_path, vae_channels=(16, 32))
    with pytest.raises(InputError, match="crop"):
        TrainConfig(out=tmp_path, crop=20)


def test_random_crops_cut_each_image_inside_its_bounds():

    pixels = np.arange(4 * 3 * 64 * 64, dtype=np.float32).reshape(4, 3, 64, 64)
    crops = random_crops(pixels, 32, np.random.default_rng(0))
    assert crops.shape == (4, 3, 32, 32)
    for image, crop in zip(pixels, crops):
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 64)
        assert (image[:, top : top + 32, left : left + 32] == crop).all()
    assert random_crops(pixels, 0, np.random.default_rng(0)) is pixels
