"""`sdonnx export`: layout, IO contract, parity, manifest, dynamic/static shapes, atomicity and errors.

The two tiny pipelines are exported once per session (conftest's tiny_exports); PyTorch/diffusers is
the oracle for every numeric check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import sdonnx.export
from sdonnx.errors import ExportError, InputError, ModelError, SdonnxError
from sdonnx.export import ExportConfig, export_model
from sdonnx.export.writer import TOKENIZER_FILES
from sdonnx.runtime.manifest import COMPONENTS, Manifest

KINDS = ("sd1", "sd2")
# SD 1.x/2.x exports have one text encoder; text_encoder_2 is SDXL's (tests/test_export_sdxl.py).
SD_COMPONENTS = tuple(c for c in COMPONENTS if c not in ("text_encoder_2", "unet_shallow"))  # optimum's four
FP32_MAX_ABS_DIFF = 1e-4


def _session(folder: Path, component: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / component / "model.onnx"), providers=["CPUExecutionProvider"])


def _copy_source(tiny_sources, tmp_path: Path, kind: str = "sd1") -> Path:
    return Path(shutil.copytree(tiny_sources[kind], tmp_path / f"{kind}-copy"))


def _io(values) -> list[tuple[str, str, int]]:
    """(name, numpy dtype name, rank) of ONNX graph inputs or outputs."""
    return [
        (v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
         len(v.type.tensor_type.shape.dim))
        for v in values
    ]


# --- the exported folder -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_layout_is_optimums_plus_manifest(tiny_exports, kind):
    folder = tiny_exports[kind]
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    expected = {"manifest.json", "model_index.json", "scheduler/scheduler_config.json"}
    expected |= {f"{c}/{name}" for c in SD_COMPONENTS for name in ("model.onnx", "config.json")}
    expected |= {f"tokenizer/{n}" for n in TOKENIZER_FILES}
    assert expected <= files
    assert all(f in expected or f.startswith("tokenizer/") for f in files), files - expected
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temp folders left beside OUT"


def test_io_contract_matches_optimum(tiny_exports, optimum_fixture):
    for kind in KINDS:
        for component in SD_COMPONENTS:
            ours = onnx.load(str(tiny_exports[kind] / component / "model.onnx"), load_external_data=False).graph
            theirs = onnx.load(str(optimum_fixture / component / "model.onnx"), load_external_data=False).graph
            # The U-Net's ControlNet residuals are optional (initializer defaults): what optimum feeds suffices.
            defaults = {t.name for t in ours.initializer}
            required = [v for v in ours.input if v.name not in defaults]
            assert _io(required) == _io(theirs.input), (kind, component)
            optional = [name for name, _, _ in _io(ours.input) if name in defaults]
            assert bool(optional) == (component == "unet"), (kind, component)
            assert all(name.endswith("_additional_residual") for name in optional), (kind, component)
            # optimum's outputs first; the text encoder adds clip_skip_n after them (export/graphs.py).
            extra = _io(ours.output)[len(theirs.output):]
            assert _io(ours.output)[: len(theirs.output)] == _io(theirs.output), (kind, component)
            assert all(name.startswith("clip_skip_") for name, _, _ in extra), (kind, component)
            assert bool(extra) == (component == "text_encoder"), (kind, component)


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_records_parity_under_the_floor(tiny_exports, kind):
    manifest = Manifest.read(tiny_exports[kind])
    assert set(manifest.graphs) == set(SD_COMPONENTS)
    for name, graph in manifest.graphs.items():
        assert graph.precision == "fp32"
        assert graph.check["psnr_db"] >= ExportConfig.min_psnr, name
        assert graph.check["max_abs_diff"] <= FP32_MAX_ABS_DIFF, name


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_facts_come_from_the_source(tiny_exports, tiny_sources, kind):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    manifest = Manifest.read(tiny_exports[kind])
    scheduler_config = json.loads((tiny_sources[kind] / "scheduler" / "scheduler_config.json").read_text())
    unet = UNet2DConditionModel.load_config(tiny_sources[kind] / "unet")
    vae = AutoencoderKL.load_config(tiny_sources[kind] / "vae")
    scheduler = getattr(__import__("diffusers"), scheduler_config["_class_name"]).from_config(scheduler_config)

    assert manifest.prediction_type == scheduler.config.prediction_type
    assert manifest.schedule.alphas_cumprod == tuple(scheduler.alphas_cumprod.tolist())
    assert manifest.schedule.timestep_spacing == scheduler.config.timestep_spacing
    assert manifest.schedule.steps_offset == scheduler.config.steps_offset
    assert manifest.latent_channels == vae["latent_channels"]
    assert manifest.vae_scaling_factor == vae["scaling_factor"]
    assert manifest.vae_downsample == 2 ** (len(vae["block_out_channels"]) - 1)
    assert manifest.unet_in_channels == unet["in_channels"]
    assert manifest.cross_attention_dim == unet["cross_attention_dim"]
    assert manifest.sample_size == unet["sample_size"]
    assert manifest.tokenizer_max_length == 77
    assert manifest.versions["opset"] == str(ExportConfig.opset)
    assert {"torch", "diffusers", "transformers", "onnx", "onnxruntime", "sdonnx"} <= set(manifest.versions)
    assert str(tiny_sources[kind].resolve()) in manifest.source


def test_manifest_hashes_verify_and_catch_tampering(tiny_exports, tmp_path):
    folder = Path(shutil.copytree(tiny_exports["sd1"], tmp_path / "copy"))
    manifest = Manifest.read(folder)
    listed = set(manifest.files)
    assert listed == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    manifest.verify_files(folder)
    with open(folder / "unet" / "model.onnx", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ModelError, match="unet"):
        manifest.verify_files(folder)


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_axes_match_diffusers_at_other_shapes(tiny_exports, tiny_sources, kind):
    """Batch 3, a 5x7 latent (odd sides) and three 77-token prompt chunks: none of them traced."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source, folder = tiny_sources[kind], tiny_exports[kind]
    unet = UNet2DConditionModel.from_pretrained(source / "unet").eval()
    vae = AutoencoderKL.from_pretrained(source / "vae").eval()
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((3, 4, 5, 7), dtype=np.float32)
    context = rng.standard_normal((3, 3 * 77, unet.config.cross_attention_dim), dtype=np.float32)
    timestep = np.array(412.5, dtype=np.float32)

    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
    (out,) = _session(folder, "unet").run(None, feeds)
    (image,) = _session(folder, "vae_decoder").run(None, {"latent_sample": sample})
    with torch.no_grad():
        expected = unet(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context)).sample
        expected_image = vae.decode(torch.from_numpy(sample)).sample
    assert out.shape == (3, 4, 5, 7) and image.shape == (3, 3, 40, 56)
    np.testing.assert_allclose(out, expected.numpy(), atol=FP32_MAX_ABS_DIFF, rtol=0)
    np.testing.assert_allclose(image, expected_image.numpy(), atol=FP32_MAX_ABS_DIFF, rtol=0)


# --- export variants ------------------------------------------------------------------------------


def test_static_shape_pins_dims_and_overwrite_replaces_out(tiny_sources, tmp_path):
    out = tmp_path / "static"
    out.mkdir()  # an earlier export: --overwrite replaces only a folder with a manifest (or optimum's layout)
    (out / "manifest.json").write_text("{}")
    (out / "stale.txt").write_text("from an earlier export")
    manifest = export_model(
        ExportConfig(str(tiny_sources["sd1"]), out, static_shape=(1, 32, 48), overwrite=True, quiet=True)
    )
    graphs = manifest.graphs
    assert graphs["unet"].input("sample").shape == (2, 4, 4, 6)  # guidance doubles the U-Net batch
    assert graphs["unet"].input("encoder_hidden_states").shape == (2, "sequence_length", 32)
    assert graphs["unet"].output("out_sample").shape == (2, 4, 4, 6)
    assert graphs["text_encoder"].input("input_ids").shape == (1, "sequence_length")
    assert graphs["vae_encoder"].input("sample").shape == (1, 3, 32, 48)
    assert graphs["vae_decoder"].input("latent_sample").shape == (1, 4, 4, 6)
    assert graphs["vae_decoder"].output("sample").shape == (1, 3, 32, 48)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["static"]


def test_inpainting_unet_exports_with_nine_channels(tiny_sources, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    source = _copy_source(tiny_sources, tmp_path)
    config = dict(UNet2DConditionModel.load_config(source / "unet"), in_channels=9)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(source / "unet", safe_serialization=True)

    manifest = export_model(ExportConfig(str(source), tmp_path / "inpaint", quiet=True))
    assert manifest.unet_in_channels == 9
    assert manifest.graphs["unet"].input("sample").shape == ("batch_size", 9, "height", "width")
    assert manifest.graphs["unet"].output("out_sample").shape == ("batch_size", 4, "height", "width")
    assert manifest.graphs["unet"].check["psnr_db"] >= ExportConfig.min_psnr
    model_index = json.loads((tmp_path / "inpaint" / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionInpaintPipeline"


# --- nothing half-written -------------------------------------------------------------------------


@pytest.mark.parametrize(("failure", "existing"), [(RuntimeError, False), (KeyboardInterrupt, True)])
def test_failure_mid_export_leaves_out_as_it_was(tiny_sources, tmp_path, monkeypatch, failure, existing):
    """The second graph fails: the first one and the pipeline files are already in the temp folder."""
    from sdonnx.export import graphs

    real_export = graphs.export_graph

    def fail_at_second_graph(graph, path, **kwargs):
        if graph.name == graphs.ORDER[1]:
            raise failure("injected")
        real_export(graph, path, **kwargs)

    monkeypatch.setattr(graphs, "export_graph", fail_at_second_graph)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "manifest.json").write_text("{}")
        (out / "keep.txt").write_text("previous export")
    with pytest.raises(failure, match="injected"):
        export_model(ExportConfig(str(tiny_sources["sd1"]), out, overwrite=existing, quiet=True))
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "manifest.json"]


def test_parity_below_the_floor_fails_and_writes_nothing(tiny_sources, tmp_path, monkeypatch):
    from sdonnx.export import check

    real_run = check.run_onnx

    def run_with_error(path, feeds):
        rng = np.random.default_rng(0)
        return {k: v + 0.05 * v.std() * rng.standard_normal(v.shape, dtype=np.float32)
                for k, v in real_run(path, feeds).items()}

    monkeypatch.setattr(check, "run_onnx", run_with_error)
    with pytest.raises(ExportError, match=r"text_encoder: .*max\|Δ\|.*PSNR") as e:
        export_model(ExportConfig(str(tiny_sources["sd1"]), tmp_path / "out", quiet=True))
    assert "nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []


# --- errors ----------------------------------------------------------------------------------------


def _export(source, out: Path, **kwargs) -> None:
    export_model(ExportConfig(str(source), out, quiet=True, **kwargs))


def test_missing_source(tmp_path):
    with pytest.raises(InputError) as e:
        _export(tmp_path / "nowhere", tmp_path / "out")
    assert e.value.field == "source" and not (tmp_path / "out").exists()


def test_folder_without_unet_names_it(tiny_sources, tmp_path):
    source = _copy_source(tiny_sources, tmp_path)
    shutil.rmtree(source / "unet")
    with pytest.raises(InputError, match="missing unet") as e:
        _export(source, tmp_path / "out")
    assert e.value.field == "source"


def test_corrupt_weights_name_the_file(tiny_sources, tmp_path):
    source = _copy_source(tiny_sources, tmp_path)
    (source / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(ExportError, match=str(source / "unet" / "diffusion_pytorch_model.safetensors")):
        _export(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_weights_need_allow_pickle(tiny_sources, tmp_path):
    from diffusers import UNet2DConditionModel

    from sdonnx.export.source import load_source

    source = _copy_source(tiny_sources, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    (source / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(source / "unet", safe_serialization=False)
    with pytest.raises(InputError, match="allow-pickle"):
        _export(source, tmp_path / "out")
    assert load_source(str(source), allow_pickle=True).unet.config.in_channels == 4


def test_pickle_file_needs_allow_pickle(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\x80\x04pickle")
    with pytest.raises(SdonnxError, match="allow-pickle"):
        _export(checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_config_only_with_a_single_file(tiny_sources, tmp_path):
    with pytest.raises(InputError) as e:
        _export(tiny_sources["sd1"], tmp_path / "out", config=tiny_sources["sd1"])
    assert e.value.field == "config"


def test_hub_id_is_downloaded_then_loaded(tiny_sources, monkeypatch):
    from sdonnx.export.source import load_source

    requested = []

    def download(repo_id, revision=None):
        requested.append(repo_id)
        return tiny_sources["sd2"]

    fake_hub = types.SimpleNamespace(download=download)
    monkeypatch.setitem(sys.modules, "sdonnx.export.hub", fake_hub)
    monkeypatch.setattr(sdonnx.export, "hub", fake_hub, raising=False)
    source = load_source("tiny-org/tiny-sd2")
    assert requested == ["tiny-org/tiny-sd2"]
    assert source.description == "hub tiny-org/tiny-sd2"


def test_non_empty_out_needs_overwrite(tiny_sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="--overwrite") as e:
        _export(tiny_sources["sd1"], out)
    assert e.value.field == "out" and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unwritable_out_parent_fails_first(tiny_sources, tmp_path, monkeypatch):
    """A regular file as the parent: unwritable even for root, for whom chmod changes nothing."""
    from sdonnx.export import source as source_module

    monkeypatch.setattr(source_module, "load_source", lambda *a, **k: pytest.fail("loaded before checking OUT"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError) as e:
        _export(tiny_sources["sd1"], blocker / "out")
    assert e.value.field == "out"


@pytest.mark.parametrize(
    ("field", "value"),
    [("opset", 9), ("opset", 21), ("min_psnr", 0.0), ("min_psnr", 250.0), ("static_shape", (1, 0, 64)),
     ("static_shape", (1, 64))],
)
def test_config_validation(tmp_path, field, value):
    with pytest.raises(InputError) as e:
        replace(ExportConfig("src", tmp_path / "out"), **{field: value})
    assert e.value.field == field


def test_static_shape_must_be_whole_latents(tiny_sources, tmp_path):
    with pytest.raises(InputError, match="multiples of 8") as e:
        _export(tiny_sources["sd1"], tmp_path / "out", static_shape=(1, 36, 48))
    assert e.value.field == "static_shape" and list(tmp_path.iterdir()) == []


# --- CLI and imports ------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    from sdonnx.export.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["export", *argv])


def test_cli_flags_map_onto_config_fields(monkeypatch, tmp_path):
    from sdonnx.export import cli

    seen = []
    monkeypatch.setattr(cli, "export_model", seen.append)
    args = _parse("org/model", str(tmp_path / "out"), "--opset", "18", "--static-shape", "2x512x768",
                  "--allow-pickle", "--overwrite", "--quiet", "--min-psnr", "70", "--config", str(tmp_path))
    assert args.func(args) == 0
    assert seen == [ExportConfig("org/model", tmp_path / "out", opset=18, static_shape=(2, 512, 768),
                                 allow_pickle=True, overwrite=True, quiet=True, min_psnr=70.0, config=tmp_path)]
    defaults = _parse("src", "out")
    assert (defaults.opset, defaults.static_shape, defaults.min_psnr) == (17, None, 60.0)


@pytest.mark.parametrize("text", ["512x512", "1x512x", "ax512x512", "1*512*512"])
def test_cli_rejects_bad_static_shape(text):
    args = _parse("src", "out", "--static-shape", text)
    with pytest.raises(InputError) as e:
        args.func(args)
    assert e.value.field == "static_shape"


def test_missing_torch_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SdonnxError, match=r'pip install "sdonnx\[export\]"'):
        _export("src", tmp_path / "out")


def test_importing_export_does_not_import_torch():
    code = "import sys, sdonnx.export, sdonnx.export.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- external data ----------------------------------------------------------------------------------


def test_per_tensor_external_data_is_consolidated_into_one_file(tmp_path):
    """As the TorchScript exporter leaves a >2 GB model: one file per tensor. Built small here."""
    from onnx import TensorProto, helper, numpy_helper

    from sdonnx.export.graphs import EXTERNAL_DATA_NAME, consolidate_external_data

    rng = np.random.default_rng(0)
    weights = {"big": rng.standard_normal((512, 512), dtype=np.float32),  # 1 MiB: aligned
               "small": rng.standard_normal((512, 3), dtype=np.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("MatMul", ["h", "small"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 3

    consolidate_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", EXTERNAL_DATA_NAME])
    offsets = {t.name: dict((e.key, e.value) for e in t.external_data)["offset"]
               for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert int(offsets["big"]) % 65536 == 0
    x = rng.standard_normal((2, 512), dtype=np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weights["big"] @ weights["small"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["sliced", "fused"])
def test_attention_processors_match_diffusers(tiny_sources, mode):
    """The sliced and fused processors compute what diffusers' own processor computes."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdonnx.export.attention import set_attention

    unet = UNet2DConditionModel.from_pretrained(tiny_sources["sd1"] / "unet").eval()
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = unet(x, 500, context).sample
        set_attention(unet, mode)
        replaced = unet(x, 500, context).sample
    assert {type(p).__name__ for p in unet.attn_processors.values()} != {"AttnProcessor2_0"}
    torch.testing.assert_close(replaced, full, rtol=1e-5, atol=1e-5)


def test_fused_vae_attention_matches_diffusers(tiny_sources):
    """The VAE's mid-block attention (group norm, [B, C, H, W] in, residual) through the fused processor."""
    import torch
    from diffusers import AutoencoderKL

    from sdonnx.export.attention import set_attention

    vae = AutoencoderKL.from_pretrained(tiny_sources["sd1"] / "vae").eval()
    latents = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(latents).sample
        set_attention(vae, "fused")
        fused = vae.decode(latents).sample
    assert {type(p).__name__ for p in vae.attn_processors.values()} == {"FusedAttention"}
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_attention_modes_change_the_graph_not_the_output(tiny_sources, tmp_path):
    """sliced: one softmax per head; fused: every attention one MultiHeadAttention node; same U-Net output."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = None
    ops, outputs = {}, {}
    for attention in ("full", "sliced", "fused"):
        out = tmp_path / attention
        export_model(ExportConfig(source=str(tiny_sources["sd1"]), out=out, quiet=True, attention=attention))
        path = out / "unet" / "model.onnx"
        ops[attention] = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        if feeds is None:
            shapes = {i.name: [2 if isinstance(d, str) else d for d in i.shape] for i in session.get_inputs()}
            shapes["encoder_hidden_states"][1] = 77
            shapes["sample"][2:] = [16, 16]
            feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        outputs[attention] = session.run(None, feeds)[0]
    assert ops["sliced"].count("Softmax") > ops["full"].count("Softmax") > 0
    assert ops["fused"].count("Softmax") == 0 and ops["fused"].count("MultiHeadAttention") > 0
    for attention, expected in (("full", 0), ("sliced", 0), ("fused", 1)):  # the VAE's one mid-block attention
        path = tmp_path / attention / "vae_decoder" / "model.onnx"
        vae_ops = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
        assert vae_ops.count("MultiHeadAttention") == expected, attention
        assert Manifest.read(tmp_path / attention).vae_attention == attention
    for attention in ("sliced", "fused"):
        np.testing.assert_allclose(outputs[attention], outputs["full"], rtol=1e-4, atol=1e-5)


def test_unknown_attention_is_refused(tmp_path):
    with pytest.raises(InputError, match="attention"):
        ExportConfig(source="x", out=tmp_path / "o", attention="flash")


def test_recommended_settings_are_recorded_and_become_the_defaults(tiny_sources, tmp_path):
    from sdonnx.runtime.pipeline import GenerationConfig, Pipeline

    out = tmp_path / "turbo-like"
    export_model(ExportConfig(str(tiny_sources["sd1"]), out, quiet=True, recommended_steps=3, recommended_guidance=0.0))
    assert Manifest.read(out).recommended == {"steps": 3, "guidance": 0.0}
    resolved = Pipeline.load(out, provider="cpu", progress=False).check(GenerationConfig("a cat")).config
    assert (resolved.steps, resolved.guidance) == (3, 0.0)
