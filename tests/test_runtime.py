"""Runtime plumbing: model folders, validated sessions, providers, tokenizer, pipeline and CLI.

The optimum fixture (a real optimum export, no manifest.json) exercises the derived facts; the tiny
sdonnx exports exercise manifest.json. Exporter variants (int64 [B] timestep, int32 input_ids, fp16
IO) are made from the fixture's graphs with onnx.helper, as are the broken graphs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime import GenerationCancelled, GenerationConfig, Pipeline
from sdonnx.runtime.cli import register
from sdonnx.runtime.images import check_finite
from sdonnx.runtime.manifest import GraphSpec, Manifest, TensorSpec
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.noise import noise_source
from sdonnx.runtime.providers import (
    PIP_PACKAGES,
    PROVIDERS,
    RuntimeOptions,
    available_providers,
    resolve_provider,
    session_options,
    session_providers,
)
from sdonnx.runtime.sampling import SAMPLERS
from sdonnx.runtime.schedules import SCHEDULES
from sdonnx.runtime.session import Session
from sdonnx.runtime.tokenizer import ClipTokenizer
from tiny_models import CLIP_TOKENIZER, _write_tokenizer

CPU = ["CPUExecutionProvider"]


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(optimum_fixture) -> Pipeline:
    return Pipeline.load(optimum_fixture, progress=False)


def clone(folder: Path, dst: Path) -> Path:
    """A writable copy of a model folder made of symlinks (the fixture itself is read-only)."""
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] != "source":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).symlink_to(path)
    return dst


def replace_file(path: Path, content: bytes | onnx.ModelProto | dict) -> None:
    path.unlink()
    if isinstance(content, onnx.ModelProto):
        onnx.save(content, str(path))
    elif isinstance(content, dict):
        path.write_text(json.dumps(content))
    else:
        path.write_bytes(content)


def retype_input(model: onnx.ModelProto, name: str, elem_type: int, shape: list, *, to_scalar: bool = False):
    """Give graph input `name` a new dtype/shape, cast (and take element 0) back to what the graph used."""
    graph = model.graph
    original = next(i for i in graph.input if i.name == name)
    inner = f"{name}__inner"
    for node in graph.node:
        node.input[:] = [inner if x == name else x for x in node.input]
    cast_out = f"{inner}__vector" if to_scalar else inner
    nodes = [helper.make_node("Cast", [name], [cast_out], to=original.type.tensor_type.elem_type)]
    if to_scalar:
        graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64), f"{inner}__zero"))
        nodes.append(helper.make_node("Gather", [cast_out, f"{inner}__zero"], [inner], axis=0))
    _prepend(graph, nodes)
    graph.input.remove(original)
    graph.input.append(helper.make_tensor_value_info(name, elem_type, shape))
    return model


def retype_output(model: onnx.ModelProto, name: str, elem_type: int):
    graph = model.graph
    original = next(o for o in graph.output if o.name == name)
    inner = f"{name}__inner"
    for node in graph.node:
        node.output[:] = [inner if x == name else x for x in node.output]
    graph.node.append(helper.make_node("Cast", [inner], [name], to=elem_type))
    shape = [d.dim_value or d.dim_param for d in original.type.tensor_type.shape.dim]
    graph.output.remove(original)
    graph.output.append(helper.make_tensor_value_info(name, elem_type, shape))
    return model


def _prepend(graph: onnx.GraphProto, nodes: list) -> None:
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)


def nan_decoder() -> onnx.ModelProto:
    """A vae_decoder with the right IO whose every output value is NaN: sqrt(-1 - |x|), upsampled x8."""
    nodes = [
        helper.make_node("Abs", ["latent_sample"], ["a"]),
        helper.make_node("Sub", ["minus_one", "a"], ["b"]),
        helper.make_node("Sqrt", ["b"], ["c"]),
        helper.make_node("Slice", ["c", "zero", "three", "one"], ["d"]),
        helper.make_node("Resize", ["d", "", "scales"], ["sample"], mode="nearest"),
    ]
    graph = helper.make_graph(
        nodes,
        "nan_decoder",
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 3, "H", "W"])],
        [
            numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([3], np.int64), "three"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([1, 1, 8, 8], np.float32), "scales"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sdonnx")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


# --- model folders -------------------------------------------------------------------------------


def test_optimum_folder_facts_are_derived_from_its_configs(optimum_fixture):
    model = ModelFolder.load(optimum_fixture, optional=("vae_encoder",))
    m = model.manifest
    unet = json.loads((optimum_fixture / "unet/config.json").read_text())
    vae = json.loads((optimum_fixture / "vae_decoder/config.json").read_text())
    scheduler = json.loads((optimum_fixture / "scheduler/scheduler_config.json").read_text())
    assert model.derived
    assert (m.latent_channels, m.vae_scaling_factor, m.vae_shift_factor) == (
        vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"] or 0.0,
    )
    assert m.vae_downsample == 2 ** (len(vae["block_out_channels"]) - 1)
    assert (m.unet_in_channels, m.cross_attention_dim, m.sample_size) == (
        unet["in_channels"], unet["cross_attention_dim"], unet["sample_size"],
    )
    assert m.prediction_type == scheduler["prediction_type"]
    assert m.schedule.steps_offset == scheduler["steps_offset"]
    assert m.tokenizer_max_length == 77
    # IO comes from the graphs: optimum >= 1.24 exports a float scalar timestep.
    assert m.graphs["unet"].input("timestep") == TensorSpec("timestep", "float32", ())
    assert m.graphs["text_encoder"].input("input_ids").dtype == "int64"
    assert model.output_name("vae_encoder") == "latent_parameters"
    assert set(model.sessions) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}


def test_manifest_round_trip_loads_the_same_facts(optimum_fixture, tmp_path, pipe):
    derived = pipe.manifest
    folder = clone(optimum_fixture, tmp_path / "m")
    derived.write(folder)
    loaded = ModelFolder.load(folder)
    assert not loaded.derived
    assert loaded.manifest == derived


def test_graph_contradicting_the_manifest_names_graph_and_both_specs(optimum_fixture, tmp_path, pipe):
    derived = pipe.manifest
    unet = derived.graphs["unet"]
    wrong = tuple(TensorSpec(t.name, "int64", ("batch",)) if t.name == "timestep" else t for t in unet.inputs)
    graphs = {**derived.graphs, "unet": GraphSpec(unet.path, wrong, unet.outputs)}
    folder = clone(optimum_fixture, tmp_path / "m")
    Manifest(**{**derived.__dict__, "graphs": graphs}).write(folder)
    with pytest.raises(ModelError, match=r"unet.*timestep.*int64 \['batch'\].*float32 \[\]"):
        ModelFolder.load(folder)


def test_manifest_without_a_required_graph(optimum_fixture, tmp_path, pipe):
    derived = pipe.manifest
    folder = clone(optimum_fixture, tmp_path / "m")
    graphs = {k: v for k, v in derived.graphs.items() if k != "vae_decoder"}
    Manifest(**{**derived.__dict__, "graphs": graphs}).write(folder)
    with pytest.raises(ModelError, match=r"graphs\.vae_decoder: missing"):
        ModelFolder.load(folder)


def test_config_contradicting_a_graph(optimum_fixture, tmp_path):
    folder = clone(optimum_fixture, tmp_path / "m")
    config = json.loads((folder / "unet/config.json").read_text())
    replace_file(folder / "unet/config.json", {**config, "cross_attention_dim": config["cross_attention_dim"] * 2})
    with pytest.raises(ModelError, match=r"cross_attention_dim is 64") as e:
        ModelFolder.load(folder)
    assert "text_encoder" in str(e.value)


def test_folder_errors(optimum_fixture, tmp_path):
    with pytest.raises(InputError, match="model"):
        ModelFolder.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty folder"):
        ModelFolder.load(tmp_path / "empty")

    with pytest.raises(ModelError, match="needs `sdonnx export` first"):
        ModelFolder.load(optimum_fixture / "source")  # the PyTorch pipeline the fixture was exported from

    missing = clone(optimum_fixture, tmp_path / "missing")
    (missing / "unet/model.onnx").unlink()
    with pytest.raises(ModelError, match=r"missing ONNX graph\(s\) unet/model.onnx$"):
        ModelFolder.load(missing)

    corrupt = clone(optimum_fixture, tmp_path / "corrupt")
    replace_file(corrupt / "vae_decoder/model.onnx", b"not a protobuf")
    with pytest.raises(ModelError) as e:
        ModelFolder.load(corrupt)
    assert str(corrupt / "vae_decoder/model.onnx") in str(e.value) and "INVALID_PROTOBUF" in str(e.value)


def test_sdonnx_export_folders_load_from_their_manifest(tiny_exports):
    for kind, folder in tiny_exports.items():
        pipe = Pipeline.load(folder, progress=False)
        assert not pipe.model.derived
        assert pipe.manifest == Manifest.read(folder)
        size = pipe.manifest.default_image_size
        assert pipe("a cat", steps=2, seed=0)[0].size == (size, size), kind


# --- exporter variants ---------------------------------------------------------------------------


def test_older_optimum_io_int64_batched_timestep_and_int32_input_ids(optimum_fixture, tmp_path, pipe):
    folder = clone(optimum_fixture, tmp_path / "old")
    unet = onnx.load(optimum_fixture / "unet/model.onnx")
    retype_input(unet, "timestep", TensorProto.INT64, ["batch_size"], to_scalar=True)
    replace_file(folder / "unet/model.onnx", unet)
    text = onnx.load(optimum_fixture / "text_encoder/model.onnx")
    retype_input(text, "input_ids", TensorProto.INT32, ["batch_size", "sequence_length"])
    replace_file(folder / "text_encoder/model.onnx", text)
    old = Pipeline.load(folder, progress=False)
    assert old.manifest.graphs["unet"].input("timestep") == TensorSpec("timestep", "int64", ("batch_size",))
    assert old.manifest.graphs["text_encoder"].input("input_ids").dtype == "int32"
    # Integer timesteps round the fractional ones, so the images differ slightly, not wholesale.
    new_images, old_images = pipe("a red cube", steps=3, seed=5), old("a red cube", steps=3, seed=5)
    assert old_images[0].size == new_images[0].size
    assert np.abs(pixels(old_images).astype(int) - pixels(new_images)).mean() < 20


def test_fp16_io_graphs(optimum_fixture, tmp_path, pipe):
    folder = clone(optimum_fixture, tmp_path / "fp16")
    unet = onnx.load(optimum_fixture / "unet/model.onnx")
    retype_input(unet, "sample", TensorProto.FLOAT16, ["batch_size", 4, "height", "width"])
    retype_input(unet, "encoder_hidden_states", TensorProto.FLOAT16, ["batch_size", "sequence_length", 32])
    replace_file(folder / "unet/model.onnx", retype_output(unet, "out_sample", TensorProto.FLOAT16))
    decoder = onnx.load(optimum_fixture / "vae_decoder/model.onnx")
    retype_input(decoder, "latent_sample", TensorProto.FLOAT16, ["batch_size", 4, "latent_height", "latent_width"])
    replace_file(folder / "vae_decoder/model.onnx", decoder)
    half = Pipeline.load(folder, progress=False)
    assert half.manifest.graphs["unet"].precision == "fp16"
    a, b = pixels(half("a red cube", steps=3, seed=5)), pixels(pipe("a red cube", steps=3, seed=5))
    assert np.abs(a.astype(int) - b).mean() < 3


# --- sessions ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_session(optimum_fixture) -> Session:
    return Session(optimum_fixture / "unet/model.onnx", CPU, name="unet")


def unet_inputs(batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, 4, 8, 8), dtype=np.float32),
        "timestep": np.array(500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
    }


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda x: x.pop("timestep"), r"missing \['timestep'\]"),
        (lambda x: x.update(time=x.pop("timestep")), r"missing \['timestep'\]; unexpected \['time'\]"),
        (lambda x: x.update(extra=np.zeros(1)), r"unexpected \['extra'\]"),
        (lambda x: x.update(sample=x["sample"].astype(np.float64)), r"unet\.sample\.dtype: got 'float64', expected float32"),
        (lambda x: x.update(timestep=np.array([500.0], np.float32)), r"unet\.timestep\.shape: got \(1,\), expected rank 0"),
        (lambda x: x.update(sample=x["sample"][:, :3]), r"unet\.sample\.shape\[1\]: got 3, expected 4"),
        (
            lambda x: x.update(sample=x["sample"][:1]),
            r"encoder_hidden_states\.shape\[0\]: got 2, expected 1, the size of 'batch_size' in 'sample'",
        ),
        (lambda x: x.update(sample=x["sample"].tolist()), r"unet\.sample: got 'list', expected a numpy array"),
    ],
)
def test_session_rejects_inputs_that_differ_from_the_graph(unet_session, change, pattern):
    inputs = unet_inputs()
    change(inputs)
    with pytest.raises(InputError, match=pattern):
        unet_session.run(**inputs)


def test_session_io_binding_path_matches_plain_run(optimum_fixture, unet_session):
    bound = Session(optimum_fixture / "unet/model.onnx", CPU, name="unet", io_binding=True)
    inputs = unet_inputs()
    inputs["encoder_hidden_states"].flags.writeable = False  # kept on the device between runs
    expected = unet_session.run(**inputs)["out_sample"]
    np.testing.assert_array_equal(bound.run(**inputs)["out_sample"], expected)
    np.testing.assert_array_equal(bound.run(**inputs)["out_sample"], expected)
    changed = {**inputs, "encoder_hidden_states": np.zeros_like(inputs["encoder_hidden_states"])}
    np.testing.assert_array_equal(bound.run(**changed)["out_sample"], unet_session.run(**changed)["out_sample"])


# --- providers -----------------------------------------------------------------------------------


def test_provider_auto_and_names():
    assert PROVIDERS[resolve_provider("auto")] in available_providers()
    assert resolve_provider("cpu") == resolve_provider("CPUExecutionProvider") == "cpu"


@pytest.mark.parametrize(
    ("available", "chosen"),
    [
        (["CPUExecutionProvider", "DmlExecutionProvider", "CUDAExecutionProvider"], "cuda"),
        (["CPUExecutionProvider", "OpenVINOExecutionProvider", "DmlExecutionProvider"], "dml"),
        (["OpenVINOExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"], "coreml"),
        (["TensorrtExecutionProvider", "CPUExecutionProvider"], "cpu"),  # never picked by auto: slow engine builds
    ],
)
def test_auto_prefers_gpu_providers(monkeypatch, available, chosen):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    assert resolve_provider("auto") == chosen


def test_provider_list_and_session_options(monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(PROVIDERS.values()))
    options = RuntimeOptions(provider="tensorrt", device_id=1, threads=3, graph_optimization="basic", memory_arena=False)
    assert session_providers(options) == [
        ("TensorrtExecutionProvider", {"device_id": 1}), ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider",
    ]
    so = session_options(options)
    assert (so.intra_op_num_threads, so.enable_cpu_mem_arena) == (3, False)
    assert so.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert session_options(RuntimeOptions(provider="dml")).enable_mem_pattern is False
    assert session_providers(RuntimeOptions(provider="cpu")) == [("CPUExecutionProvider", {})]


def test_unavailable_provider_names_the_pip_package():
    missing = next(short for short, name in PROVIDERS.items() if name not in available_providers())
    with pytest.raises(InputError) as e:
        resolve_provider(missing)
    assert PIP_PACKAGES[missing] in str(e.value)
    assert all(name in str(e.value) for name in available_providers())


def test_unknown_provider_and_bad_options():
    with pytest.raises(InputError, match="provider"):
        resolve_provider("tpu")
    for field, value in (("threads", 0), ("graph_optimization", "max"), ("device_id", -1), ("memory_arena", "no")):
        with pytest.raises(InputError) as e:
            RuntimeOptions(**{field: value})
        assert e.value.field == field


# --- tokenizer -----------------------------------------------------------------------------------


def _prompts() -> list[str]:
    rng = random.Random(0)
    alphabet = "abcXYZ !?.,'-éü東🔥\t\n0123"
    fixed = [
        "", " ", "a photo of a cat", "A PHOTO OF A CAT!!", "hello!! world!", "naïve café Ünïcödé", "e\u0301",
        "東京の夜景、ネオン", "🔥🔥 emoji 😍 party 🎉", "tabs\tand\nnewlines\r\n  spaces", "it's they're we've I'm you'll",
        "(masterpiece:1.2), [best quality], {ultra-detailed}", "a <|endoftext|> b", "x<|startoftext|>y",
        "<|ENDOFTEXT|>", "don't!!! ??? ... --- ___", "12345 3.14159 1e10", "word " * 100,
        "supercalifragilisticexpialidocious" * 5, "Ελληνικά русский العربية हिन्दी", "\u200b zero\u00a0width", "!" * 80,
    ]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(100)]


@pytest.mark.parametrize("style", ["endoftext-pad", "exclamation-pad", "tokenizer.json"])
def test_tokenizer_matches_transformers(style, tmp_path, optimum_fixture):
    transformers = pytest.importorskip("transformers")
    if style == "tokenizer.json":
        folder = optimum_fixture / "source/tokenizer"
        assert (folder / "tokenizer.json").is_file()
    else:
        folder = tmp_path / style
        _write_tokenizer(folder, pad_token="!" if style == "exclamation-pad" else "<|endoftext|>")
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ours = ClipTokenizer.from_folder(folder, 77)
    prompts = _prompts()
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ours(prompts), expected)


def test_tokenizer_frames_and_truncates(tmp_path):
    _write_tokenizer(tmp_path, pad_token="!")
    tokenizer = ClipTokenizer.from_folder(tmp_path, 77)
    vocab = json.loads((CLIP_TOKENIZER / "vocab.json").read_text())
    short, long_ = tokenizer(["cat", "cat " * 200])
    assert short.tolist() == [vocab["<|startoftext|>"], vocab["cat</w>"], vocab["<|endoftext|>"]] + [vocab["!"]] * 74
    assert long_.shape == (77,) and long_[-1] == vocab["<|endoftext|>"] and (long_[1:-1] == vocab["cat</w>"]).all()


def test_tokenizer_with_unknown_pad_token(tmp_path):
    _write_tokenizer(tmp_path, pad_token="<pad>")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<pad>", "special": False}}))
    tokenizer = ClipTokenizer.from_folder(tmp_path, 77)  # an added token: appended to the vocabulary
    assert tokenizer.pad_id == len(json.loads((CLIP_TOKENIZER / "vocab.json").read_text()))


# --- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0), ("steps", 1001), ("steps", 2.5), ("guidance", float("nan")), ("guidance", "7"),
        ("guidance_rescale", 1.5), ("height", 100), ("width", -8), ("batch", 0), ("seed", -1),
        ("seed", 2**64), ("sampler", "nope"), ("schedule", "nope"), ("prompt", None), ("negative_prompt", 3),
    ],
)
def test_generation_config_rejects(field, value):
    settings = {"prompt": "a cat", field: value}
    with pytest.raises(InputError) as e:
        GenerationConfig(**settings)
    assert e.value.field == field and e.value.received is value


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(InputError) as e:
        GenerationConfig("a cat", sampler="nope")
    assert all(name in e.value.expected for name in SAMPLERS)
    with pytest.raises(InputError) as e:
        GenerationConfig("a cat", schedule="nope")
    assert all(name in e.value.expected for name in SCHEDULES)


def test_generate_is_seeded_and_records_the_seed(pipe):
    first = pipe("a red cube", steps=3, seed=7, batch=2)
    m = pipe.manifest
    assert [image.size for image in first] == [(m.default_image_size, m.default_image_size)] * 2
    assert [image.info for image in first] == [{"seed": 7, "batch_index": 0}, {"seed": 8, "batch_index": 1}]
    np.testing.assert_array_equal(pixels(pipe("a red cube", steps=3, seed=7, batch=2)), pixels(first))
    assert not np.array_equal(pixels(first)[0], pixels(first)[1])
    assert not np.array_equal(pixels(pipe("a red cube", steps=3, seed=8)), pixels(first)[:1])

    unseeded = pipe("a red cube", steps=3)
    again = pipe("a red cube", steps=3, seed=unseeded[0].info["seed"])
    np.testing.assert_array_equal(pixels(again), pixels(unseeded))


def test_latents_are_unit_noise_like_diffusers(pipe):
    m = pipe.manifest
    shape = (1, m.latent_channels, m.sample_size, m.sample_size)
    noise = noise_source(3).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(pixels(pipe("x", steps=2, seed=3)), pixels(pipe("x", steps=2, latents=noise)))
    with pytest.raises(InputError, match="latents"):
        pipe("x", steps=2, latents=noise[:, :2])


def test_size_must_fit_the_vae(pipe):
    images = pipe("x", steps=1, height=32, width=48, seed=0)
    assert images[0].size == (48, 32)
    with pytest.raises(InputError, match="height"):
        pipe("x", steps=1, height=36)


def test_callback_sees_every_step_and_can_cancel(pipe):
    seen = []
    pipe("x", steps=4, seed=0, callback=lambda step, sigma, latents: seen.append((step, sigma, latents.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert all(a[1] > b[1] for a, b in zip(seen, seen[1:]))
    with pytest.raises(GenerationCancelled, match="step 2 of 4"):
        pipe("x", steps=4, seed=0, callback=lambda step, sigma, latents: step < 1)


def test_nan_from_the_vae_decoder_is_reported(optimum_fixture, tmp_path):
    folder = clone(optimum_fixture, tmp_path / "nan")
    replace_file(folder / "vae_decoder/model.onnx", nan_decoder())
    with pytest.raises(ModelError, match=r"'vae_decoder' produced \d+ non-finite.*fp32"):
        Pipeline.load(folder, progress=False)("x", steps=1, seed=0)


def test_check_finite_counts_bad_values(unet_session):
    values = np.zeros((2, 3), np.float32)
    check_finite(values, unet_session, "out_sample")
    values[0, 1], values[1, 2] = np.inf, np.nan
    with pytest.raises(ModelError, match=r"'unet' produced 2 non-finite .* of 6 in 'out_sample'"):
        check_finite(values, unet_session, "out_sample")


@pytest.mark.parametrize(("case", "sampler"), [("optimum", "euler"), ("sd1", "euler"), ("sd2", "ddim")])
def test_matches_diffusers(case, sampler, request):
    """The whole flow (tokens, embeddings, noise scale, sampler, VAE scaling, rounding) against diffusers.

    sd1/sd2 are `sdonnx export` folders (manifest.json; sd2: v-prediction and "!" padding).
    """
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    if case == "optimum":
        folder = request.getfixturevalue("optimum_fixture")
        source = folder / "source"
    else:
        folder, source = request.getfixturevalue("tiny_exports")[case], request.getfixturevalue("tiny_sources")[case]
    reference = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    scheduler = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler}[sampler]
    reference.scheduler = scheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.load(folder, progress=False)
    m = pipe.manifest
    noise = noise_source(11).standard_normal((1, m.latent_channels, m.sample_size, m.sample_size)).astype(np.float32)
    expected = reference(
        "a red cube!!", negative_prompt="blurry, ugly!", num_inference_steps=6, guidance_scale=5.0,
        latents=torch.from_numpy(noise), output_type="np",
    ).images
    ours = pipe("a red cube!!", "blurry, ugly!", steps=6, guidance=5.0, sampler=sampler, latents=noise)
    diff = np.abs(pixels(ours).astype(int) - np.round(expected * 255).astype(int))
    assert diff.max() <= 1, (case, diff.max(), diff.mean())


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_generate_writes_pngs(optimum_fixture, tmp_path, capsys):
    out = tmp_path / "cat.png"
    model = str(optimum_fixture)
    assert run_cli("generate", "a cat", "-m", model, "--steps", "2", "--size", "48x32", "-o", str(out), "-q") == 0
    seed = int(capsys.readouterr().out.split("seed: ")[1].split()[0])
    with Image.open(out) as image:
        assert image.size == (48, 32)
        assert f"Seed: {seed}," in image.text["parameters"]
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]  # no temporary file left

    run_cli("generate", "a cat", "-m", model, "--steps", "1", "--batch", "2", "--seed", "4", "-o", str(out), "-q")
    assert "seed:" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-1.png", "cat-2.png", "cat.png"]


def test_cli_generate_refuses_bad_output_before_loading(tmp_path):
    nowhere = str(tmp_path / "no-such-model")  # loading it would fail with a different error
    with pytest.raises(InputError, match="does not exist") as e:
        run_cli("generate", "a cat", "-m", nowhere, "-o", str(tmp_path / "missing" / "x.png"))
    assert e.value.field == "output"
    with pytest.raises(InputError, match="size"):
        run_cli("generate", "a cat", "-m", nowhere, "--size", "512", "-o", str(tmp_path / "x.png"))
    with pytest.raises(InputError, match="steps"):
        run_cli("generate", "a cat", "-m", nowhere, "--steps", "0", "-o", str(tmp_path / "x.png"))


def test_cli_info(optimum_fixture, capsys):
    assert run_cli("info", str(optimum_fixture)) == 0
    out = capsys.readouterr().out
    assert "derived" in out and "vae_encoder" in out
    assert "timestep: float32 []" in out and "input_ids: int64 [batch_size, sequence_length]" in out
    assert all(p in out for p in available_providers())
