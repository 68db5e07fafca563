"""Smoke test of the LCM distillation script: two steps on a two-step tiny teacher; CI never distills for real."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.models.distill import DistillConfig, parse_args
from sdonnx.models.distill import main as distill

from test_train_smoke import TINY


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    pytest.importorskip("diffusers")
    from sdonnx.models.train import main as train

    return train([*TINY, "--seed", "0", "--out", str(tmp_path_factory.mktemp("teacher"))])


def test_two_distillation_steps_change_the_unet_and_make_a_folder_that_samples_with_lcm(teacher, tmp_path):
    from safetensors.numpy import load_file

    from sdonnx.export import ExportConfig, export_model
    from sdonnx.runtime.pipeline import Pipeline

    source = distill(["--teacher", str(teacher), "--out", str(tmp_path), "--steps", "2", "--batch-size", "2",
                      "--drawings", "4", "--learning-rate", "0.01"])
    assert source == tmp_path / "source" and not (tmp_path / "source.partial").exists()
    with open(tmp_path / "distill-loss.csv") as log:
        rows = list(csv.DictReader(log))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert json.loads((tmp_path / "distill-report.json").read_text())["config"]["steps"] == 2

    before = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(source / "unet" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before), "the student equals its teacher"
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        old, new = load_file(str(teacher / part)), load_file(str(source / part))
        assert all(np.array_equal(old[k], new[k]) for k in old), f"{part} changed"

    export_model(ExportConfig(source=str(source), out=tmp_path / "onnx", quiet=True))
    pipe = Pipeline.load(tmp_path / "onnx", progress=False)
    image = pipe("a red circle on a blue background", sampler="lcm", steps=2, guidance=1.0, seed=0)[0]
    assert image.size == (64, 64)


def test_flags_map_onto_config_fields_and_are_validated(teacher, tmp_path):
    config = parse_args(["--out", str(tmp_path), "--teacher", str(teacher), "--steps", "7", "--guidance", "3.5"])
    assert config == DistillConfig(out=tmp_path, teacher=teacher, steps=7, guidance=3.5)
    with pytest.raises(InputError, match="guidance"):
        DistillConfig(out=tmp_path, teacher=teacher, guidance=0.5)
    with pytest.raises(InputError, match="ema_decay"):
        DistillConfig(out=tmp_path, teacher=teacher, ema_decay=1.0)
    with pytest.raises(InputError, match="steps"):
        DistillConfig(out=tmp_path, teacher=teacher, steps=0)
    with pytest.raises(InputError, match="teacher.*a diffusers folder"):
        DistillConfig(out=tmp_path, teacher=tmp_path)
