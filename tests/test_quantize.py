"""sdonnx quantize: every recipe on the tiny sd1 export (each quantized once), images vs fp32, bad input.

Image floors (PSNR of the 64x64 image vs the fp32 folder's, same seed, 8 Euler steps), measured on
the tiny random-weight models with ~10 dB margin: fp16 60 dB -> floor 45; int8 dynamic 44.6, int4
47.4, mixed 53.4 -> floor 34; int8-static 30.0 -> floor 22 (uint8 activations calibrated on 8 prompts
x 4 steps of a model whose activations have no structure to learn), with 16-bit activations 53.6 ->
floor 40. A wrong scale, a dropped graph or a dtype mix-up lands below 15 dB.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from sdonnx.cli import main
from sdonnx.errors import InputError
from sdonnx.quantize import QuantizeConfig, quantize_model
import sdonnx.quantize.convert as convert_module
from sdonnx.quantize.calibration import DEFAULT_PROMPTS, read_prompts
from sdonnx.quantize.convert import nonfinite_consumers, op_types
from sdonnx.quantize.recipes import RECIPES
from sdonnx.runtime.manifest import COMPONENTS, Manifest

IMAGE_FLOOR_DB = {
    "fp16": 45.0, "int8": 34.0, "int4": 34.0, "mixed": 34.0, "int8-static": 22.0, "int8-static-a16": 40.0
}
# Largest U-Net weight bytes as a share of fp32's, a margin above the tiny model's: fp16 0.50, int8
# 0.26, int8-static(-a16) 0.27, int4 0.26 (its 32-channel tensors pad to the 128-wide blocks and
# carry a scale per block), mixed 0.80 (the convolutions, fp32 there, hold most of the weights).
UNET_SIZE_SHARE = {"fp16": 0.55, "int8": 0.3, "mixed": 0.85, "int8-static": 0.3, "int8-static-a16": 0.3, "int4": 0.3}
# Ops that show each precision was really applied to the U-Net.
UNET_OPS = {
    "fp16": ({"Cast"}, {"MatMulInteger"}),
    "int8": ({"MatMulInteger", "ConvInteger"}, set()),
    "mixed": ({"MatMulInteger"}, {"ConvInteger"}),
    "int8-static": ({"QuantizeLinear", "DequantizeLinear"}, {"MatMulInteger"}),
    "int8-static-a16": ({"QuantizeLinear", "DequantizeLinear"}, {"MatMulInteger"}),
    "int4": ({"MatMulNBits", "DequantizeLinear"}, {"MatMulInteger", "ConvInteger"}),
}


@pytest.fixture(scope="module")
def quantized(tiny_exports, tmp_path_factory) -> dict[str, Path]:
    """{recipe: folder}: the tiny sd1 export quantized with every recipe."""
    root = tmp_path_factory.mktemp("quantized")
    for recipe in RECIPES:
        quantize_model(QuantizeConfig(model=str(tiny_exports["sd1"]), out=root / recipe, recipe=recipe, quiet=True))
    return {recipe: root / recipe for recipe in RECIPES}


def _image(folder: Path) -> np.ndarray:
    import sdonnx

    pipe = sdonnx.Pipeline.load(folder, provider="cpu", progress=False)
    return np.asarray(pipe("a red cube on a table", steps=8, seed=1)[0], dtype=np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _graph_bytes(folder: Path, component: str) -> int:
    return sum(p.stat().st_size for p in (folder / component).iterdir() if p.suffix != ".json")


def _weight_bytes(folder: Path, component: str) -> int:
    """Bytes of the graph's initializers as stored (int4 packed two per byte): what a recipe shrinks.
    File sizes would also count the graph's structure, which is a large share of a tiny U-Net's file
    (one node chain per attention head) and does not shrink."""
    model = onnx.load(str(folder / component / "model.onnx"))
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def test_recipes_cover_every_component_with_known_precisions():
    for name, recipe in RECIPES.items():
        assert set(recipe) == set(COMPONENTS), name  # text_encoder_2 (SDXL) included
        assert recipe["text_encoder_2"] == recipe["text_encoder"], name
        assert set(recipe.values()) <= set(convert_module.CONVERTERS), name


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_manifest_records_recipe_precision_checks_and_hashes(quantized, tiny_exports, recipe):
    folder = quantized[recipe]
    manifest = Manifest.read(folder)
    manifest.verify_files(folder)
    source = Manifest.read(tiny_exports["sd1"])
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["quantization"]["recipe"] == recipe
    assert manifest.quantization == raw["quantization"]
    for component, spec in manifest.graphs.items():
        assert spec.precision == RECIPES[recipe][component]
        assert spec.inputs == source.graphs[component].inputs  # fp32 IO kept: the runtime feeds fp32
        assert np.isfinite(spec.check["psnr_db"]) and spec.check["psnr_db"] > 20
    vocab = Path("tokenizer") / "vocab.json"
    assert (folder / vocab).read_bytes() == (tiny_exports["sd1"] / vocab).read_bytes()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_unet_carries_the_recipes_operators_and_shrinks(quantized, tiny_exports, recipe):
    present, absent = UNET_OPS[recipe]
    ops = op_types(quantized[recipe] / "unet" / "model.onnx")
    assert present <= ops and not (absent & ops), sorted(ops)
    share = _weight_bytes(quantized[recipe], "unet") / _weight_bytes(tiny_exports["sd1"], "unet")
    assert share < UNET_SIZE_SHARE[recipe], share
    # The VAE is fp32 in every recipe: copied unchanged.
    assert _graph_bytes(quantized[recipe], "vae_decoder") == _graph_bytes(tiny_exports["sd1"], "vae_decoder")


def test_fp16_keeps_softmax_and_normalization_fp32(quantized):
    model = onnx.load(str(quantized["fp16"] / "unet" / "model.onnx"))
    fp16_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights
    produced_by = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization", "InstanceNormalization"):
            feeder = produced_by.get(node.input[0])
            assert feeder is not None and not (feeder.op_type == "Cast" and feeder.attribute[0].i == 10), node.name


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_runtime_generates_close_to_fp32(quantized, tiny_exports, recipe):
    reference = _image(tiny_exports["sd1"])
    image = _image(quantized[recipe])
    assert np.isfinite(image).all()
    assert _psnr(image, reference) >= IMAGE_FLOOR_DB[recipe]


def test_fp16_on_sd2_v_prediction(tiny_exports, tmp_path):
    out = tmp_path / "sd2-fp16"
    quantize_model(QuantizeConfig(model=str(tiny_exports["sd2"]), out=out, recipe="fp16", quiet=True))
    assert _psnr(_image(out), _image(tiny_exports["sd2"])) >= IMAGE_FLOOR_DB["fp16"]


def test_graph_giving_nan_falls_back_to_fp32(tiny_exports, tmp_path, monkeypatch, capsys):
    def poisoned(src, dst, large, **_):
        model = onnx.load(str(src))
        weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims)
        weight.CopyFrom(onnx.numpy_helper.from_array(np.full(tuple(weight.dims), np.nan, np.float32), weight.name))
        convert_module.save(model, dst, large)

    monkeypatch.setitem(convert_module.CONVERTERS, "int4", poisoned)
    out = tmp_path / "out"
    manifest = quantize_model(QuantizeConfig(model=str(tiny_exports["sd1"]), out=out, recipe="int4"))
    assert "NaN/inf" in capsys.readouterr().out
    assert manifest.graphs["unet"].precision == "fp32" and manifest.graphs["text_encoder"].precision == "fp32"
    assert Manifest.read(out).graphs["unet"].check["psnr_db"] >= 150
    assert np.isfinite(_image(out)).all()


def test_causal_mask_nodes_are_excluded_from_static_quantization(tiny_exports):
    model = onnx.load(str(tiny_exports["sd1"] / "text_encoder" / "model.onnx"))
    excluded = nonfinite_consumers(model)
    by_name = {node.name: node for node in model.graph.node}
    assert excluded and all(by_name[name].op_type in ("Where", "Add", "Mul") for name in excluded)
    assert not nonfinite_consumers(onnx.load(str(tiny_exports["sd1"] / "unet" / "model.onnx")))


def test_optimum_folder_is_derived_and_quantized(optimum_fixture, tmp_path):
    config = QuantizeConfig(model=str(optimum_fixture), out=tmp_path / "q", recipe="mixed", quiet=True)
    manifest = quantize_model(config)
    assert manifest.graphs["unet"].precision == "int8-matmul"
    assert _image(tmp_path / "q").shape[-1] == 3


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"recipe": "int3"}, "recipe"),
        ({"block_size": 48}, "block_size"),
        ({"block_size": 8}, "block_size"),
        ({"calibration_steps": 0}, "calibration_steps"),
    ],
)
def test_bad_settings_are_refused(tmp_path, changes, field):
    with pytest.raises(InputError) as error:
        QuantizeConfig(model="m", out=tmp_path / "out", **changes)
    assert error.value.field == field
    if field == "recipe":
        assert all(name in str(error.value) for name in RECIPES)


def test_already_quantized_folder_is_refused(quantized, tmp_path):
    for recipe in ("int8", "fp16"):
        with pytest.raises(InputError, match="already quantized"):
            quantize_model(QuantizeConfig(model=str(quantized[recipe]), out=tmp_path / "again", quiet=True))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", ["", "\n  \n", None])
def test_unusable_calibration_prompts_write_nothing(tiny_exports, tmp_path, content):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    out = tmp_path / "out"
    config = QuantizeConfig(model=str(tiny_exports["sd1"]), out=out, recipe="int8-static", calibration_prompts=prompts)
    with pytest.raises(InputError) as error:
        quantize_model(config)
    assert error.value.field == "calibration_prompts"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["prompts.txt"] if content is not None else [])


def test_calibration_prompts_file_is_read_line_by_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(prompts) == ("a cat", "a dog")
    assert read_prompts(None) == DEFAULT_PROMPTS


def test_cli_quantizes_and_reports_bad_recipe(tiny_exports, tmp_path, capsys):
    assert main(["quantize", str(tiny_exports["sd1"]), str(tmp_path / "bad"), "--recipe", "int3"]) == 2
    assert "int8-static" in capsys.readouterr().err
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_exports["sd1"]), str(out), "--recipe", "int4", "--block-size", "16", "--quiet"]
    assert main(argv) == 0
    assert Manifest.read(out).graphs["unet"].precision == "int4"
    assert not (tmp_path / "bad").exists()


def test_existing_out_is_kept_on_failure(quantized, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(quantized["int8"], out)
    with pytest.raises(InputError):
        quantize_model(QuantizeConfig(model=str(quantized["int8"]), out=out, overwrite=True, quiet=True))
    assert Manifest.read(out).graphs["unet"].precision == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_dtype_shortcut_writes_only_the_quantized_folder(tiny_sources, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(tiny_sources["sd1"]), str(out), "--dtype", "int8", "--quiet"]) == 0
    manifest = Manifest.read(out)
    manifest.verify_files(out)
    assert manifest.graphs["unet"].precision == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no fp32 or staging folder left behind
    assert np.isfinite(_image(out)).all()


def test_a16_recipe_quantizes_activations_to_16_bits(quantized):
    def contrib_quantizers(recipe: str) -> int:
        graph = onnx.load(str(quantized[recipe] / "unet" / "model.onnx"), load_external_data=False).graph
        return sum(n.op_type == "QuantizeLinear" and n.domain == "com.microsoft" for n in graph.node)

    # Below opset 21 only ORT's com.microsoft Q/DQ take uint16; the 8-bit recipe uses the standard ones.
    assert contrib_quantizers("int8-static-a16") > 0 and contrib_quantizers("int8-static") == 0
