"""A user's ONNX preprocessor (runtime/preprocess.py onnx_map): the picture normalized into the model,
its map scaled min..max to 0..255 and back to the picture's size; bad models named before use."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from sdonnx.cli import main  # noqa: E402
from sdonnx.errors import InputError  # noqa: E402
from sdonnx.runtime.preprocess import onnx_map  # noqa: E402


def brightness_model(path, height="H", width="W"):
    """A stand-in depth model: the channel mean, [1, 3, H, W] -> [1, 1, H, W]."""
    node = helper.make_node("ReduceMean", ["pixel_values"], ["depth"], axes=[1], keepdims=1)
    graph = helper.make_graph(
        [node], "depth", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, height, width])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def picture() -> Image.Image:
    x = np.linspace(0, 255, 48)
    return Image.fromarray(np.stack([np.tile(x, (40, 1))] * 3, axis=-1).astype(np.uint8), "RGB")


def test_map_is_the_models_output_scaled_and_resized(tmp_path):
    model = brightness_model(tmp_path / "depth.onnx")
    image = picture()
    made = onnx_map(image, model, size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert made.size == image.size and made.mode == "RGB"
    pixels = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255
    normalized = (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    depth = normalized.mean(axis=-1)
    scaled = ((depth - depth.min()) / (depth.max() - depth.min()) * 255 + 0.5).astype(np.uint8)
    want = Image.fromarray(np.stack([scaled] * 3, axis=-1), "RGB").resize(image.size, Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(made, int) - np.asarray(want, int)).max() <= 1
    inverted = np.asarray(onnx_map(image, model, size=32, invert=True), int)
    assert inverted[:, 0].mean() > inverted[:, -1].mean()  # the dark side is now white


def test_a_static_input_size_wins(tmp_path):
    model = brightness_model(tmp_path / "static.onnx", 16, 24)
    assert onnx_map(picture(), model, size=64).size == picture().size


def test_bad_models_and_settings_are_named(tmp_path):
    with pytest.raises(InputError, match="model"):
        onnx_map(picture(), tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(InputError, match="model"):
        onnx_map(picture(), tmp_path / "junk.onnx")
    model = brightness_model(tmp_path / "depth.onnx")
    with pytest.raises(InputError, match="std"):
        onnx_map(picture(), model, std=(0.0,))
    with pytest.raises(InputError, match="mean"):
        onnx_map(picture(), model, mean=(0.5, 0.5))


def test_cli_onnx_preprocessor(tmp_path, capsys):
    model = brightness_model(tmp_path / "depth.onnx")
    picture().save(tmp_path / "in.png")
    out = tmp_path / "depth.png"
    assert main(["preprocess", "onnx", str(tmp_path / "in.png"), str(out), "--model", str(model), "--size", "32",
                 "--mean", "0.5", "--std", "0.5"]) == 0
    assert Image.open(out).size == (48, 40)
    assert main(["preprocess", "onnx", str(tmp_path / "in.png"), str(out)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["preprocess", "onnx", str(tmp_path / "in.png"), str(out), "--model", str(model),
                 "--mean", "a,b"]) == 2
