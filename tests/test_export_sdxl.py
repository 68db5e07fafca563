"""`sdonnx export` of SDXL: optimum's layout and IO, the manifest's SDXL facts, parity, the refiner, single files.

The contract is optimum's SDXL export (../shared/fixtures/optimum-tiny-sdxl): its source/ exported by sdonnx
must give the same graphs' IO, and the same outputs. The tiny base (two text encoders of different widths
and depths, transformer_layers_per_block (1, 2), per-block heads) and refiner (text_encoder_2 only, five
time ids) come from tests/tiny_models.py; PyTorch/diffusers is the oracle for every numeric check.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdonnx.errors import ExportError, InputError
from sdonnx.export import ExportConfig, export_model
from sdonnx.export.writer import TOKENIZER_FILES
from sdonnx.runtime.manifest import Manifest

torch = pytest.importorskip("torch")
from test_single_file import COMPONENT_FILES as SD_COMPONENT_FILES  # noqa: E402 (needs torch)

BASE_GRAPHS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
REFINER_GRAPHS = ("text_encoder_2", "unet", "vae_encoder", "vae_decoder")
GRAPHS = {"sdxl": BASE_GRAPHS, "sdxl_refiner": REFINER_GRAPHS}
FP32_MAX_ABS_DIFF = 1e-4


def _io(values) -> list[tuple[str, str, int]]:
    """(name, numpy dtype name, rank) of ONNX graph inputs or outputs."""
    return [
        (v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
         len(v.type.tensor_type.shape.dim))
        for v in values
    ]


def _graph(folder: Path, component: str) -> onnx.GraphProto:
    return onnx.load(str(folder / component / "model.onnx"), load_external_data=False).graph


def _session(folder: Path, component: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / component / "model.onnx"), providers=["CPUExecutionProvider"])


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / f"{folder.name}-copy"))


@pytest.fixture(scope="module")
def optimum_source_export(optimum_sdxl_fixture, tmp_path_factory) -> Path:
    """The optimum fixture's own source pipeline, exported by sdonnx."""
    out = tmp_path_factory.mktemp("optimum-source") / "sdonnx"
    export_model(ExportConfig(source=str(optimum_sdxl_fixture / "source"), out=out, quiet=True))
    return out


# --- the contract: optimum's SDXL export -----------------------------------------------------------


def test_same_source_gives_optimums_layout_and_io(optimum_source_export, optimum_sdxl_fixture):
    ours, theirs = optimum_source_export, optimum_sdxl_fixture
    expected = _files(theirs) - {p for p in _files(theirs) if p.startswith("source/")}
    extra = _files(ours) - expected
    assert expected <= _files(ours), expected - _files(ours)
    assert all(f == "manifest.json" or f.startswith(("tokenizer/", "tokenizer_2/")) for f in extra), extra
    for component in BASE_GRAPHS:
        graph = _graph(ours, component)
        defaults = {t.name for t in graph.initializer}  # the U-Net's optional ControlNet residuals
        required = [v for v in graph.input if v.name not in defaults]
        assert _io(required) == _io(_graph(theirs, component).input), component
        assert bool(defaults & {v.name for v in graph.input}) == (component == "unet"), component
        assert _io(graph.output) == _io(_graph(theirs, component).output), component


def test_same_source_gives_optimums_outputs(optimum_source_export, optimum_sdxl_fixture):
    """Both exports of one pipeline compute the same thing, at a batch and size neither traced.

    (Even latent sides: optimum's U-Net, traced at one, takes no odd ones; sdonnx's does.)
    """
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 49408, (3, 20))
    ids[:, 0], ids[:, -1] = 49406, 49407
    latent = rng.standard_normal((3, 4, 6, 8), dtype=np.float32)
    feeds = {
        "text_encoder": {"input_ids": ids},
        "text_encoder_2": {"input_ids": ids},
        "unet": {"sample": latent, "timestep": np.array(301.0, dtype=np.float32),
                 "encoder_hidden_states": rng.standard_normal((3, 154, 72), dtype=np.float32),
                 "text_embeds": rng.standard_normal((3, 32), dtype=np.float32),
                 "time_ids": np.array([[512, 384, 0, 0, 512, 384]] * 3, dtype=np.float32)},
        "vae_decoder": {"latent_sample": latent},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (3, 3, 48, 64)).astype(np.float32)},
    }
    for component, feed in feeds.items():
        ours = _session(optimum_source_export, component).run(None, feed)
        theirs = _session(optimum_sdxl_fixture, component).run(None, feed)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=FP32_MAX_ABS_DIFF, err_msg=component)


def test_pipeline_files_are_optimums(optimum_source_export, optimum_sdxl_fixture):
    ours, theirs = optimum_source_export, optimum_sdxl_fixture
    ignored = {"_name_or_path", "_diffusers_version", "transformers_version"}
    index = json.loads((ours / "model_index.json").read_text())
    assert {k: v for k, v in index.items() if k not in ignored} == {
        k: v for k, v in json.loads((theirs / "model_index.json").read_text()).items() if k not in ignored
    }
    for component in ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"):
        mine = json.loads((ours / component / "config.json").read_text())
        optimum = json.loads((theirs / component / "config.json").read_text())
        assert {k: v for k, v in mine.items() if k not in ignored} == {
            k: v for k, v in optimum.items() if k not in ignored
        }, component
    for name in ("tokenizer", "tokenizer_2"):
        vocab = [json.loads((folder / name / "vocab.json").read_text()) for folder in (ours, theirs)]
        merges = [(folder / name / "merges.txt").read_text().split("\n")[1:] for folder in (ours, theirs)]
        assert vocab[0] == vocab[1] and merges[0] == merges[1], name
        pad = json.loads((theirs / name / "tokenizer_config.json").read_text())["pad_token"]
        assert json.loads((ours / name / "tokenizer_config.json").read_text())["pad_token"] == pad
    assert pad == "!"  # tokenizer_2: OpenCLIP's padding


def test_runtime_draws_the_same_image_from_both_exports(optimum_source_export, optimum_sdxl_fixture):
    """sdonnx's manifest (pooled encoder, penultimate hidden states, time ids, zeroed empty negative) drives
    the runtime as optimum's configs do: same pixels from the same seed."""
    from sdonnx.runtime import Pipeline

    images = [
        np.asarray(Pipeline.load(folder, provider="cpu", progress=False)(
            "a red cube", "", steps=3, guidance=6.0, seed=11, height=64, width=48)[0], dtype=np.int16)
        for folder in (optimum_source_export, optimum_sdxl_fixture)
    ]
    assert images[0].shape == (64, 48, 3)
    assert np.abs(images[0] - images[1]).max() <= 1


# --- the tiny base and refiner ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner"])
def test_layout(tiny_sdxl_exports, kind):
    folder = tiny_sdxl_exports[kind]
    tokenizers = ("tokenizer", "tokenizer_2") if kind == "sdxl" else ("tokenizer_2",)
    expected = {"manifest.json", "model_index.json", "scheduler/scheduler_config.json"}
    expected |= {f"{c}/{name}" for c in GRAPHS[kind] for name in ("model.onnx", "config.json")}
    expected |= {f"{t}/{name}" for t in tokenizers for name in TOKENIZER_FILES}
    files = _files(folder)
    assert expected <= files, expected - files
    assert all(f in expected or f.split("/")[0] in tokenizers for f in files), files - expected
    index = json.loads((folder / "model_index.json").read_text())
    if kind == "sdxl_refiner":
        assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
        assert index["text_encoder"] == index["tokenizer"] == [None, None]
        assert index["requires_aesthetics_score"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner"])
def test_graph_io(tiny_sdxl_exports, tiny_sdxl_sources, kind):
    """hidden_states.0..N follows each encoder's depth; the U-Net's widths follow the source's configs."""
    folder, source = tiny_sdxl_exports[kind], tiny_sdxl_sources[kind]
    manifest = Manifest.read(folder)
    assert tuple(sorted(manifest.graphs)) == tuple(sorted(GRAPHS[kind]))
    depth = {name: json.loads((source / name / "config.json").read_text())["num_hidden_layers"]
             for name in ("text_encoder", "text_encoder_2") if (source / name).is_dir()}
    assert depth == ({"text_encoder": 2, "text_encoder_2": 3} if kind == "sdxl" else {"text_encoder_2": 3})
    leading = {"text_encoder": ["last_hidden_state", "pooler_output"],
               "text_encoder_2": ["text_embeds", "last_hidden_state"]}
    for name, layers in depth.items():
        spec = manifest.graphs[name]
        assert [t.name for t in spec.outputs] == leading[name] + [f"hidden_states.{i}" for i in range(layers + 1)]
        assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [
            ("input_ids", "int64", ("batch_size", "sequence_length"))]
    unet = manifest.graphs["unet"]
    width = 72 if kind == "sdxl" else 40
    assert [(t.name, t.dtype, t.shape) for t in unet.inputs] == [
        ("sample", "float32", ("batch_size", 4, "height", "width")),
        ("timestep", "float32", ()),
        ("encoder_hidden_states", "float32", ("batch_size", "sequence_length", width)),
        ("text_embeds", "float32", ("batch_size", 32)),
        ("time_ids", "float32", ("batch_size", 6 if kind == "sdxl" else 5)),
    ]
    assert manifest.graphs["text_encoder_2"].output("text_embeds").shape == ("batch_size", 32)


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner"])
def test_manifest_facts_come_from_the_source(tiny_sdxl_exports, tiny_sdxl_sources, kind):
    import diffusers

    manifest, source = Manifest.read(tiny_sdxl_exports[kind]), tiny_sdxl_sources[kind]
    index = json.loads((source / "model_index.json").read_text())
    unet = json.loads((source / "unet" / "config.json").read_text())
    vae = json.loads((source / "vae" / "config.json").read_text())
    scheduler_config = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    scheduler = diffusers.EulerDiscreteScheduler.from_config(scheduler_config)

    assert manifest.pooled_text_encoder == "text_encoder_2"
    assert manifest.text_hidden_states == "penultimate"  # the raw hidden_states.{N-1}, as diffusers' SDXL reads
    assert manifest.time_ids == (("original_size", "crops_coords_top_left", "target_size") if kind == "sdxl"
                                 else ("original_size", "crops_coords_top_left", "aesthetic_score"))
    assert manifest.force_zeros_for_empty_prompt is index["force_zeros_for_empty_prompt"] is (kind == "sdxl")
    assert manifest.vae_force_upcast is vae["force_upcast"] is True
    assert manifest.family == ("sdxl" if kind == "sdxl" else "sdxl-refiner")
    assert manifest.cross_attention_dim == unet["cross_attention_dim"]
    assert manifest.tokenizer_max_length == 77
    assert manifest.unet_attention == ExportConfig.attention
    assert manifest.vae_scaling_factor == vae["scaling_factor"] == 0.13025
    assert manifest.sample_size == unet["sample_size"] and manifest.latent_channels == vae["latent_channels"]
    assert manifest.prediction_type == "epsilon"
    assert manifest.schedule.alphas_cumprod == tuple(scheduler.alphas_cumprod.tolist())
    assert manifest.schedule.timestep_spacing == "leading" and manifest.schedule.steps_offset == 1


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner"])
def test_every_graph_passed_the_parity_check(tiny_sdxl_exports, kind):
    manifest = Manifest.read(tiny_sdxl_exports[kind])
    manifest.verify_files(tiny_sdxl_exports[kind])
    for name, graph in manifest.graphs.items():
        assert graph.check["psnr_db"] >= ExportConfig.min_psnr, name
        assert graph.check["max_abs_diff"] <= FP32_MAX_ABS_DIFF, name


def test_sdxl_fields_come_with_text_time_conditioning_only(tiny_sdxl_sources, tiny_sources):
    """SD 1.x keeps the defaults, though its diffusers VAE config says force_upcast too (only SDXL honours it)."""
    from sdonnx.export import _model_facts
    from sdonnx.export.source import load_source

    sdxl_fields = {"pooled_text_encoder", "text_hidden_states", "time_ids", "force_zeros_for_empty_prompt",
                   "vae_force_upcast"}
    assert sdxl_fields <= set(_model_facts(load_source(str(tiny_sdxl_sources["sdxl"]))))
    sd1 = load_source(str(tiny_sources["sd1"]))
    assert sd1.vae.config.force_upcast and not sdxl_fields & set(_model_facts(sd1))


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner"])
def test_onnx_unet_and_text_encoders_match_pytorch_on_fresh_inputs(tiny_sdxl_exports, tiny_sdxl_sources, kind):
    """Batch 3, a 5x7 latent, three 77-token chunks, realistic time ids: none of it traced or checked."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    source, folder = tiny_sdxl_sources[kind], tiny_sdxl_exports[kind]
    unet = UNet2DConditionModel.from_pretrained(source / "unet").eval()
    rng = np.random.default_rng(7)
    time_ids = [1024, 768, 16, 0, 1024, 768] if kind == "sdxl" else [1024, 768, 16, 0, 6.0]
    feeds = {
        "sample": rng.standard_normal((3, 4, 5, 7), dtype=np.float32),
        "timestep": np.array(617.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 3 * 77, unet.config.cross_attention_dim), dtype=np.float32),
        "text_embeds": rng.standard_normal((3, 32), dtype=np.float32),
        "time_ids": np.array([time_ids] * 3, dtype=np.float32),
    }
    (out,) = _session(folder, "unet").run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        expected = unet(t["sample"], t["timestep"], t["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample
    assert out.shape == (3, 4, 5, 7)
    np.testing.assert_allclose(out, expected.numpy(), atol=FP32_MAX_ABS_DIFF, rtol=0)

    ids = rng.integers(0, 49406, (3, 77))  # three chunks of a long prompt
    ids[:, 0], ids[:, 50] = 49406, 49407
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    for name in (n for n in classes if n in GRAPHS[kind]):
        encoder = classes[name].from_pretrained(source / name).eval()
        session = _session(folder, name)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": ids})))
        with torch.no_grad():
            reference = encoder(input_ids=torch.from_numpy(ids), output_hidden_states=True)
        for key, value in outputs.items():
            layer = key.startswith("hidden_states.")
            ref = reference.hidden_states[int(key.split(".")[1])] if layer else reference[key]
            np.testing.assert_allclose(value, ref.numpy(), atol=FP32_MAX_ABS_DIFF, rtol=0, err_msg=f"{name}.{key}")


def test_runtime_runs_the_refiner_export_on_an_image(tiny_sdxl_exports):
    """img2img through the refiner's export: text_encoder_2 alone, aesthetic-score time ids."""
    from PIL import Image

    from sdonnx.runtime import Pipeline

    pipe = Pipeline.load(tiny_sdxl_exports["sdxl_refiner"], provider="cpu", progress=False)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    (image,) = pipe.img2img("a red cube", "blurry", image=init, strength=0.5, steps=4, guidance=5.0, seed=2)
    assert image.size == (64, 48)


@pytest.mark.parametrize("attention", ["sliced", "full"])
def test_attention_modes_work_for_the_sdxl_unet(tiny_sdxl_sources, tiny_sdxl_exports, tmp_path, attention):
    """Per-block heads and two transformer layers per block: same output as the (fused) export's graph."""
    from sdonnx.export import graphs
    from sdonnx.export.check import check_graph
    from sdonnx.export.source import load_source

    source = load_source(str(tiny_sdxl_sources["sdxl"]))
    trace, probe = graphs.probes(source, None)
    graph = graphs.build_graph("unet", source, trace, probe, static=False, attention=attention)
    cases = graph.cases()
    feeds = cases[1][0]  # without ControlNet residuals
    path = tmp_path / "unet" / "model.onnx"
    graphs.export_graph(graph, path, opset=17)
    assert check_graph("unet", path, cases, min_psnr=ExportConfig.min_psnr).within(ExportConfig.min_psnr)

    ops = [node.op_type for node in _graph(tmp_path, "unet").node]
    fused = [node.op_type for node in _graph(tiny_sdxl_exports["sdxl"], "unet").node]
    assert fused.count("Softmax") == 0 and fused.count("MultiHeadAttention") == 16  # 8 self + 8 cross
    # sliced: one softmax per head of each self-attention (4 heads in the attention level), one per cross.
    assert ops.count("Softmax") == (8 * 4 + 8 if attention == "sliced" else 16)
    (ours,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    (theirs,) = _session(tiny_sdxl_exports["sdxl"], "unet").run(None, feeds)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_linear_weights_enter_the_graph_without_a_transposed_copy(tiny_sdxl_sources, tmp_path):
    """Each linear weight is traced as it is stored (no exporter-made transpose, which doubles SDXL's
    linear weights in memory until the file is written), and the module is left as it was."""
    from sdonnx.export import graphs
    from sdonnx.export.source import load_source

    source = load_source(str(tiny_sdxl_sources["sdxl"]))
    trace, probe = graphs.probes(source, None)
    graph = graphs.build_graph("text_encoder_2", source, trace, probe, static=False)
    before = {k: v.clone() for k, v in source.text_encoder_2.state_dict().items()}
    graphs.export_graph(graph, tmp_path / "text_encoder_2" / "model.onnx", opset=17)

    after = source.text_encoder_2.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all("forward" not in vars(m) for m in source.text_encoder_2.modules())
    onnx_graph = _graph(tmp_path, "text_encoder_2")
    initializers = {t.name for t in onnx_graph.initializer}
    weights = [n.input[1] for n in onnx_graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in initializers]
    assert len(weights) == 6 * 3 + 1  # q, k, v, out, fc1, fc2 per layer, and the projection
    assert all(name.endswith(".weight") for name in weights), weights


def test_static_shape_pins_the_conditioning_batch(tiny_sdxl_sources):
    from sdonnx.export import graphs
    from sdonnx.export.source import load_source

    source = load_source(str(tiny_sdxl_sources["sdxl"]))
    trace, probe = graphs.probes(source, (1, 64, 64))
    axes = graphs.build_graph("unet", source, trace, probe, static=True).dynamic_axes
    assert axes == {"encoder_hidden_states": {1: "sequence_length"}}
    for name in ("text_encoder", "text_encoder_2"):
        axes = graphs.build_graph(name, source, trace, probe, static=True).dynamic_axes
        assert set(axes) == {"input_ids", "last_hidden_state", "hidden_states.0", "hidden_states.1",
                             "hidden_states.2", *(["hidden_states.3"] if name == "text_encoder_2" else [])}


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2", "text_encoder"])
def test_sdxl_folder_missing_a_part_names_it(tiny_sdxl_sources, tmp_path, part):
    source = _copy(tiny_sdxl_sources["sdxl"], tmp_path)
    shutil.rmtree(source / part)
    with pytest.raises(InputError, match=rf"SDXL .*missing {part}\b") as error:
        export_model(ExportConfig(str(source), tmp_path / "out", quiet=True))
    assert error.value.field == "source"
    assert not (tmp_path / "out").exists()


def test_text_time_unet_needs_text_encoder_2_whatever_the_index_says(tiny_sdxl_sources, tmp_path):
    source = _copy(tiny_sdxl_sources["sdxl"], tmp_path)
    index = json.loads((source / "model_index.json").read_text())
    for name in ("text_encoder_2", "tokenizer_2"):
        del index[name]
        shutil.rmtree(source / name)
    (source / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="missing text_encoder_2, tokenizer_2"):
        export_model(ExportConfig(str(source), tmp_path / "out", quiet=True))


@pytest.mark.parametrize("recipe", ["fp16", "int8", "int8-static"])
def test_sdxl_quantizes_and_draws_close_to_fp32(tiny_sdxl_exports, tmp_path, recipe):
    """Both text encoders get the recipe's precision, the U-Net's check feeds carry text_embeds and time
    ids, calibration records them, and the runtime draws close to fp32 (measured on the optimum fixture's
    source, 4 steps: fp16 61.3 dB, int8 42.1, int8-static 34.4, int4 40.5, mixed 48.4)."""
    from sdonnx.quantize.quantizer import QuantizeConfig, quantize_model
    from sdonnx.runtime import Pipeline

    fp32 = tiny_sdxl_exports["sdxl"]
    manifest = quantize_model(QuantizeConfig(model=str(fp32), out=tmp_path / recipe, recipe=recipe, quiet=True,
                                             calibration_steps=2))
    assert {c: manifest.graphs[c].precision for c in ("text_encoder", "text_encoder_2")} == {
        "text_encoder": "fp16" if recipe == "fp16" else "int8", "text_encoder_2": "fp16" if recipe == "fp16" else "int8"}
    assert manifest.graphs["vae_decoder"].precision == "fp32"  # the SDXL VAE overflows fp16; every recipe keeps it
    assert manifest.pooled_text_encoder == "text_encoder_2" and manifest.time_ids is not None

    def draw(folder):
        pipe = Pipeline.load(folder, provider="cpu", progress=False)
        return np.asarray(pipe("a red cube", "blurry", steps=4, seed=3)[0], dtype=np.float64)

    reference, image = draw(fp32), draw(tmp_path / recipe)
    psnr = 10 * np.log10(255.0**2 / max(float(np.mean((image - reference) ** 2)), 1e-12))
    assert psnr >= (45.0 if recipe == "fp16" else 20.0), psnr


def _resave_unet(source: Path, **changes) -> None:
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(source / "unet"), **changes)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(source / "unet", safe_serialization=True)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"projection_class_embeddings_input_dim": 32 + 7 * 8}, r"projection_class_embeddings_input_dim: got 88"),
        ({"cross_attention_dim": 64}, r"cross_attention_dim: got 64, expected .*32 \+ 40 = 72"),
        ({"addition_embed_type": "text_image"}, r"addition_embed_type: got 'text_image'"),
    ],
)
def test_parts_that_do_not_fit_are_refused_before_any_export(tiny_sdxl_sources, tmp_path, change, expected):
    source = _copy(tiny_sdxl_sources["sdxl"], tmp_path)
    _resave_unet(source, **change)
    with pytest.raises(ExportError, match=expected):
        export_model(ExportConfig(str(source), tmp_path / "out", quiet=True))
    assert not (tmp_path / "out").exists()


def test_time_ids_follow_the_unet_and_must_agree_with_the_index(tiny_sdxl_sources, tmp_path):
    """Five time ids mean an aesthetic score, whatever the pipeline class; a contradicting index is refused."""
    from sdonnx.export import _model_facts
    from sdonnx.export.source import load_source

    source = _copy(tiny_sdxl_sources["sdxl"], tmp_path)
    _resave_unet(source, projection_class_embeddings_input_dim=32 + 5 * 8)
    index = json.loads((source / "model_index.json").read_text())
    index.update(force_zeros_for_empty_prompt=False)
    (source / "model_index.json").write_text(json.dumps(index))
    vae = json.loads((source / "vae" / "config.json").read_text())
    (source / "vae" / "config.json").write_text(json.dumps(dict(vae, force_upcast=False)))

    facts = _model_facts(load_source(str(source)))
    assert facts["time_ids"] == ("original_size", "crops_coords_top_left", "aesthetic_score")
    assert facts["force_zeros_for_empty_prompt"] is False and facts["vae_force_upcast"] is False

    (source / "model_index.json").write_text(json.dumps(dict(index, requires_aesthetics_score=False)))
    with pytest.raises(ExportError, match="requires_aesthetics_score is false, but the U-Net takes 5 time ids"):
        load_source(str(source))


# --- single-file SDXL checkpoints (SGM layout) --------------------------------------------------


COMPONENT_FILES = {**SD_COMPONENT_FILES, "text_encoder_2": "text_encoder_2/model.safetensors"}


@pytest.fixture(scope="module")
def sgm_files(tiny_sdxl_sources, tmp_path_factory) -> dict[str, Path]:
    from ldm_checkpoint import write_sgm_checkpoint

    root = tmp_path_factory.mktemp("sgm")
    return {kind: write_sgm_checkpoint(folder, root / f"{kind}.safetensors")
            for kind, folder in tiny_sdxl_sources.items()}


@pytest.mark.parametrize("kind", ["sdxl", "sdxl_refiner"])
def test_sgm_checkpoint_round_trip_gives_back_every_weight(tiny_sdxl_sources, sgm_files, kind):
    from safetensors.torch import load_file

    from sdonnx.export.single_file import load_single_file

    folder = tiny_sdxl_sources[kind]
    source = load_single_file(sgm_files[kind], allow_pickle=False, config=folder)
    for name, file in COMPONENT_FILES.items():
        if not (folder / file).is_file():
            assert getattr(source, name) is None, name
            continue
        expected, got = load_file(str(folder / file)), getattr(source, name).state_dict()
        assert set(got) == set(expected), name
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), key
    assert source.tokenizer_2.pad_token == "!"
    assert (source.tokenizer.pad_token if kind == "sdxl" else source.tokenizer) == (
        "<|endoftext|>" if kind == "sdxl" else None)
    assert source.text_time.time_id_count == (6 if kind == "sdxl" else 5)
    assert source.pipeline_config == json.loads((folder / "model_index.json").read_text())


def test_sgm_checkpoint_gives_the_folders_facts_and_files(tiny_sdxl_sources, tiny_sdxl_exports, sgm_files, tmp_path):
    """`sdonnx export model.safetensors --config FOLDER` gets the manifest facts and pipeline files of the folder."""
    from sdonnx.export import _model_facts
    from sdonnx.export.source import load_source
    from sdonnx.export.writer import write_pipeline_files

    source = load_source(str(sgm_files["sdxl"]), config=tiny_sdxl_sources["sdxl"])
    facts = _model_facts(source)
    assert "single-file SDXL checkpoint" in facts.pop("source")
    folder_manifest = Manifest.read(tiny_sdxl_exports["sdxl"])
    assert facts == {key: getattr(folder_manifest, key) for key in facts}
    write_pipeline_files(tmp_path, source)
    for name in ("model_index.json", "text_encoder/config.json", "text_encoder_2/config.json", "unet/config.json",
                 "vae_decoder/config.json", "tokenizer/tokenizer_config.json", "tokenizer_2/tokenizer_config.json"):
        written, exported = (json.loads((root / name).read_text()) for root in (tmp_path, tiny_sdxl_exports["sdxl"]))
        exported.pop("_name_or_path", None)  # where the folder's modules were loaded from
        assert written == exported, name


def test_full_size_sgm_keys_pick_sdxl_and_fit_the_bundled_config():
    """SDXL base's own architecture (meta tensors: no memory), written in the SGM layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from ldm_checkpoint import sgm_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdonnx.export.single_file import FAMILIES, _check_fits, bundled_config, detect_family

    folder = bundled_config("sdxl")

    def config(name: str) -> dict:
        return json.loads((folder / name / "config.json").read_text())

    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(config("unet")),
            "vae": AutoencoderKL.from_config(config("vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2"))),
        }
    assert sum(p.numel() for p in modules["unet"].parameters()) == 2_567_463_684
    state = sgm_state_dict({name: (module.state_dict(), config(name)) for name, module in modules.items()})
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    assert infer_diffusers_model_type(state) == "xl_base"  # diffusers' own reading of these keys
    assert detect_family(shapes, Path("sdxl.safetensors")) == "sdxl"
    _check_fits(shapes, FAMILIES["sdxl"], folder, Path("sdxl.safetensors"))  # raises if it did not fit
    assert json.loads((folder / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True


def test_sgm_checkpoint_without_config(sgm_files):
    from sdonnx.export.single_file import load_single_file

    with pytest.raises(ExportError, match=r"SDXL key layout.*bundled SDXL base 1\.0 config.*text_encoder_2") as e:
        load_single_file(sgm_files["sdxl"], allow_pickle=False, config=None)
    assert "label_emb.0.0.weight has shape (128, 80), expected (1280, 2816)" in str(e.value)
    with pytest.raises(ExportError, match=r"SDXL refiner checkpoint .*bundles no config.*text_encoder_2/config\.json"):
        load_single_file(sgm_files["sdxl_refiner"], allow_pickle=False, config=None)


def test_sgm_config_folder_needs_text_encoder_2(sgm_files, tiny_sdxl_sources, tmp_path):
    from sdonnx.export.single_file import load_single_file

    config = _copy(tiny_sdxl_sources["sdxl"], tmp_path)
    shutil.rmtree(config / "text_encoder_2")
    with pytest.raises(InputError, match=r"missing: text_encoder_2/config\.json") as error:
        load_single_file(sgm_files["sdxl"], allow_pickle=False, config=config)
    assert error.value.field == "config"


def test_incomplete_sgm_checkpoint_names_sdxl(sgm_files, tmp_path):
    from safetensors.torch import load_file, save_file

    from sdonnx.export.single_file import load_single_file

    state = {k: v for k, v in load_file(str(sgm_files["sdxl"])).items() if not k.startswith("conditioner.embedders.1.")}
    path = tmp_path / "no-openclip.safetensors"
    save_file(state, str(path))
    with pytest.raises(ExportError, match=r"conditioner\.embedders\.1\.model\.\*.*look like SDXL"):
        load_single_file(path, allow_pickle=False, config=None)


# --- hub and benchmark -----------------------------------------------------------------------------


def test_hub_download_fetches_the_sdxl_parts(tiny_sdxl_sources, tmp_path, monkeypatch):
    import huggingface_hub
    from test_single_file import _fake_hub

    from sdonnx.export import hub

    remote = Path(shutil.copytree(tiny_sdxl_sources["sdxl_refiner"], tmp_path / "remote"))
    needed = _files(remote)
    for name in ("text_encoder_2/pytorch_model.bin", "text_encoder_2/model.fp16.safetensors", "sd_xl_refiner.ckpt"):
        (remote / name).write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(remote, tmp_path / "snapshot"))
    assert _files(hub.download("org/tiny-refiner")) == needed  # no text_encoder/: the refiner has none


def test_sdxl_random_benchmark_builds_a_loadable_folder(tiny_sdxl_sources, tmp_path, monkeypatch):
    """benchmarks/sdxl_random.py, pointed at the tiny configs (its default is the full-size SDXL base)."""
    from sdonnx.export.source import load_source

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("sdxl_random", None)
    import sdxl_random

    folder = sdxl_random.build(tmp_path / "random", seed=1, config=tiny_sdxl_sources["sdxl"])
    source = load_source(str(folder))
    assert source.text_time.time_ids == ("original_size", "crops_coords_top_left", "target_size")
    assert (source.tokenizer.pad_token, source.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert sdxl_random.build.__defaults__[-1] == sdxl_random.CONFIGS / "sdxl"
