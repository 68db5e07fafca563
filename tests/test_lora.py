"""LoRAs at load time: the same images as diffusers with the LoRA merged, on the tiny models.

The oracle is `lora_files.merged`: diffusers' own conversion of the file's keys (kohya, SGM, PEFT)
and the merge W += w * alpha / rank * up @ down in torch, since diffusers' load_lora_weights needs
peft (see lora_files). Tolerance as the pipeline parity tests: max |Δpixel| <= 2/255 (8-bit
rounding alone is 0.5/255). Every LoRA here moves the image by far more than that, which each test
checks, so a LoRA that is silently not applied fails.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.runtime import Pipeline
from sdonnx.runtime.noise import noise_source

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import lora_files  # noqa: E402 (needs torch)

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

TOLERANCE = 2 / 255
MOVES = 10 / 255  # what a LoRA must change at least, somewhere in the image
PROMPT, NEGATIVE = "a red cube on a table", "blurry"
STEPS, GUIDANCE = 6, 7.5


@pytest.fixture(scope="module")
def references(tiny_sources, tiny_sdxl_sources):
    loaded = {kind: diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
              for kind, folder in tiny_sources.items()}
    loaded["sdxl"] = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_sources["sdxl"])
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def pipelines(tiny_exports, tiny_sdxl_exports):
    folders = {**tiny_exports, "sdxl": tiny_sdxl_exports["sdxl"]}
    return {kind: Pipeline.load(folder, provider="cpu", progress=False) for kind, folder in folders.items()}


def latents(pipe: Pipeline) -> np.ndarray:
    m = pipe.manifest
    return noise_source(0).standard_normal((1, m.latent_channels, m.sample_size, m.sample_size)).astype(np.float32)


def oracle_image(reference, loras, x: np.ndarray) -> np.ndarray:
    """diffusers' image [H, W, 3] in [0, 1] with `loras` merged into a copy of its modules."""
    pipe = copy.deepcopy(reference)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    lora_files.merged(pipe, loras)
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                latents=torch.from_numpy(x), output_type="np").images[0]


def ours(pipe: Pipeline, x: np.ndarray, **settings) -> np.ndarray:
    image = pipe(PROMPT, NEGATIVE, latents=x, steps=STEPS, guidance=GUIDANCE, sampler="euler", seed=0, **settings)[0]
    return np.asarray(image, dtype=np.float64) / 255


def check_parity(reference, pipe, loras, **settings) -> float:
    """Max |sdonnx - diffusers| with `loras` ([(file, weight)]); asserts both bounds."""
    x = latents(pipe)
    expected = oracle_image(reference, loras, x)
    got = ours(pipe, x, loras={str(path): weight for path, weight in loras}, **settings)
    delta = float(np.abs(got - expected).max())
    moved = float(np.abs(got - ours(pipe, x, **settings)).max())
    assert delta <= TOLERANCE, f"max |Δ| {delta * 255:.2f}/255 vs diffusers with the LoRA merged"
    assert moved >= MOVES, f"the LoRA moved the image by only {moved * 255:.2f}/255"
    return delta


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_unet_lora_matches_diffusers(references, pipelines, tmp_path, kind):
    lora = lora_files.write_kohya(tmp_path / "unet.safetensors", references[kind], text=False)
    check_parity(references[kind], pipelines[kind], [(lora, 0.8)])


def test_text_encoder_lora_matches_diffusers(references, pipelines, tmp_path):
    lora = lora_files.write_kohya(tmp_path / "te.safetensors", references["sd1"], unet=False, scale=0.5)
    check_parity(references["sd1"], pipelines["sd1"], [(lora, 1.0)])


def test_locon_convolutions_match_diffusers(references, pipelines, tmp_path):
    lora = lora_files.write_kohya(tmp_path / "locon.safetensors", references["sd1"], text=False, conv=True, scale=0.2)
    check_parity(references["sd1"], pipelines["sd1"], [(lora, 1.0)])


def test_two_loras_and_a_negative_weight_match_diffusers(references, pipelines, tmp_path):
    first = lora_files.write_kohya(tmp_path / "a.safetensors", references["sd2"], seed=1)
    second = lora_files.write_kohya(tmp_path / "b.safetensors", references["sd2"], text=False, seed=2)
    check_parity(references["sd2"], pipelines["sd2"], [(first, 0.7), (second, -0.5)])


def test_peft_keys_match_diffusers(references, pipelines, tmp_path):
    lora = lora_files.write_peft(tmp_path / "peft.safetensors", references["sd1"], scale=0.2)
    check_parity(references["sd1"], pipelines["sd1"], [(lora, 1.0)])


def test_sdxl_kohya_lora_in_sgm_names_matches_diffusers(references, pipelines, tmp_path):
    lora = lora_files.write_kohya(tmp_path / "xl.safetensors", references["sdxl"], sgm=True, sdxl=True, conv=True,
                                  scale=0.2)
    check_parity(references["sdxl"], pipelines["sdxl"], [(lora, 0.9)])


def test_adapters_never_stick(references, pipelines, tmp_path):
    pipe = pipelines["sd1"]
    lora = lora_files.write_kohya(tmp_path / "a.safetensors", references["sd1"])
    other = lora_files.write_kohya(tmp_path / "b.safetensors", references["sd1"], seed=3)
    x = latents(pipe)
    plain = ours(pipe, x)
    with_a = ours(pipe, x, loras={str(lora): 1.0})
    ours(pipe, x, loras={str(other): 1.0})
    assert np.array_equal(ours(pipe, x, loras={str(lora): 1.0}), with_a)
    assert np.array_equal(ours(pipe, x), plain)
    assert np.array_equal(ours(pipe, x, loras={str(lora): 0.0}), plain)  # weight 0 is off


def test_prompt_tag_is_the_loras_argument_and_leaves_the_text(references, tiny_exports, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    lora = lora_files.write_kohya(folder / "style.safetensors", references["sd1"])
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, lora_dir=folder)
    x = latents(pipe)
    by_argument = ours(pipe, x, loras={str(lora): 0.6})
    image = pipe(PROMPT + " <lora:style:0.6>", NEGATIVE, latents=x, steps=STEPS, guidance=GUIDANCE, sampler="euler",
                 seed=0)[0]
    assert np.array_equal(np.asarray(image, dtype=np.float64) / 255, by_argument)
    assert image.info["lora_hashes"] == {"style": pipe.adapters.short_hash(lora.resolve())}


@pytest.mark.parametrize("tag, weights", [("<lora:style:0.7:0.3>", (0.7, 0.3)),
                                          ("<lora:style:te=0:unet=0.8>", (0, 0.8)),
                                          ("<lora:style:unet=0>", (1.0, 0.0))])
def test_separate_text_encoder_and_unet_weights_match_diffusers(references, tiny_exports, tmp_path, tag, weights):
    """A1111's <lora:NAME:TE:UNET>: the text encoders' and the U-Net's weights apart."""
    folder = tmp_path / "loras"
    folder.mkdir()
    lora = lora_files.write_kohya(folder / "style.safetensors", references["sd1"])
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, lora_dir=folder)
    x = latents(pipe)
    expected = oracle_image(references["sd1"], [(lora, weights)], x)
    image = pipe(PROMPT + " " + tag, NEGATIVE, latents=x, steps=STEPS, guidance=GUIDANCE, sampler="euler", seed=0)[0]
    got = np.asarray(image, dtype=np.float64) / 255
    assert float(np.abs(got - expected).max()) <= TOLERANCE
    both = oracle_image(references["sd1"], [(lora, max(weights))], x)
    assert float(np.abs(got - both).max()) >= MOVES  # not the same weight for both


def test_img2img_with_a_lora_matches_diffusers(references, pipelines, tmp_path):
    from PIL import Image

    reference, pipe = references["sd1"], pipelines["sd1"]
    lora = lora_files.write_kohya(tmp_path / "a.safetensors", reference)
    init = Image.fromarray((np.random.default_rng(4).random((64, 64, 3)) * 255).astype(np.uint8))
    oracle = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(copy.deepcopy(reference))
    oracle.scheduler = diffusers.EulerDiscreteScheduler.from_config(oracle.scheduler.config)
    lora_files.merged(oracle, [(lora, 1.0)])
    expected = oracle(PROMPT, image=init, strength=0.75, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    got = pipe.img2img(PROMPT, NEGATIVE, image=init, strength=0.75, steps=STEPS, guidance=GUIDANCE, sampler="euler",
                       seed=0, loras={str(lora): 1.0})[0]
    assert np.abs(np.asarray(got, dtype=np.float64) / 255 - expected).max() <= TOLERANCE


@pytest.mark.parametrize("recipe", ["int8", "fp16"])
def test_quantized_graphs_with_a_lora_stay_close_to_diffusers(references, tiny_exports, tmp_path, recipe):
    """Merged into the quantized U-Net and text encoder (int8: dequantized, changed, requantized in the
    graph's own scheme). Floors measured on the tiny sd1: QUANTIZED_FLOOR_DB."""
    from sdonnx.quantize import QuantizeConfig, quantize_model

    out = tmp_path / recipe
    quantize_model(QuantizeConfig(model=str(tiny_exports["sd1"]), out=out, recipe=recipe, quiet=True))
    pipe = Pipeline.load(out, provider="cpu", progress=False)
    assert pipe.manifest.graphs["unet"].weights, "quantize records the converted graph's weight map"
    lora = lora_files.write_kohya(tmp_path / "a.safetensors", references["sd1"], conv=True, scale=0.2)
    x = latents(pipe)
    expected = oracle_image(references["sd1"], [(lora, 1.0)], x)
    with_lora, plain = ours(pipe, x, loras={str(lora): 1.0}), ours(pipe, x)
    psnr = 10 * np.log10(1 / np.mean((with_lora - expected) ** 2))
    without = 10 * np.log10(1 / np.mean((plain - expected) ** 2))
    assert psnr >= QUANTIZED_FLOOR_DB[recipe], f"{psnr:.1f} dB"
    assert psnr >= without + 10, f"the LoRA brought the image only from {without:.1f} to {psnr:.1f} dB"


# Measured: int8 44.0 dB with the LoRA (24.9 without), fp16 58.6 dB (25.2 without).
QUANTIZED_FLOOR_DB = {"int8": 40.0, "fp16": 50.0}


def test_static_int8_graphs_refuse_loras_with_a_way_out(references, tiny_exports, tmp_path):
    """QDQ graphs are refused: ORT's QDQ transforms read weights while optimizing, where a late
    replacement would not reach them."""
    from sdonnx.quantize import QuantizeConfig, quantize_model

    out = tmp_path / "static"
    quantize_model(QuantizeConfig(model=str(tiny_exports["sd1"]), out=out, recipe="int8-static", quiet=True))
    lora = lora_files.write_kohya(tmp_path / "a.safetensors", references["sd1"], text=False)
    with pytest.raises(InputError, match="sdonnx export --lora"):
        Pipeline.load(out, provider="cpu", progress=False)("x", loras={str(lora): 1.0}, steps=1)


def test_export_records_the_weight_map_the_graph_implies(tiny_exports):
    from sdonnx.runtime.manifest import Manifest
    from sdonnx.runtime.onnx_file import read_graph
    from sdonnx.runtime.weights import derive

    manifest = Manifest.read(tiny_exports["sd1"])
    for component in ("unet", "text_encoder"):
        recorded = manifest.graphs[component].weights
        assert recorded and recorded == derive(read_graph(tiny_exports["sd1"] / component / "model.onnx"))
    assert manifest.graphs["vae_decoder"].weights is None


def test_optimum_folder_without_a_map_derives_one(optimum_fixture, tmp_path):
    reference = diffusers.StableDiffusionPipeline.from_pretrained(optimum_fixture / "source", safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.load(optimum_fixture, provider="cpu", progress=False)
    lora = lora_files.write_kohya(tmp_path / "a.safetensors", reference)
    check_parity(reference, pipe, [(lora, 1.0)])


def test_lora_for_another_family_names_the_first_mismatching_module(references, pipelines, tmp_path):
    sd2_lora = lora_files.write_kohya(tmp_path / "sd2.safetensors", references["sd2"], text=False)
    with pytest.raises(InputError, match=r"module 'lora_unet_.*' changes a \[\d+, \d+\] weight.*another model family"):
        pipelines["sd1"]("x", loras={str(sd2_lora): 1.0}, steps=1)
    xl_lora = lora_files.write_kohya(tmp_path / "xl.safetensors", references["sdxl"], sgm=True, sdxl=True)
    with pytest.raises(InputError, match="not in this model"):
        pipelines["sd1"]("x", loras={str(xl_lora): 1.0}, steps=1)


def test_bad_lora_inputs_get_clear_errors(references, tiny_exports, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    lora_files.write_kohya(folder / "style.safetensors", references["sd1"])
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (folder / "old.pt").write_bytes(b"\x80\x04")
    from safetensors.numpy import save_file

    save_file({"lora_unet_conv_in.hada_w1_a": np.zeros((2, 2), np.float32)}, str(folder / "loha.safetensors"))
    pipe = Pipeline.load(tiny_exports["sd1"], provider="cpu", progress=False, lora_dir=folder)
    with pytest.raises(InputError, match=r"prompt.*missing.*it holds broken, loha, old, style"):
        pipe("a cat <lora:missing:1>", steps=1)
    with pytest.raises(InputError, match="corrupt or not safetensors"):
        pipe("a cat <lora:broken:1>", steps=1)
    with pytest.raises(InputError, match="pickled LoRAs"):
        pipe("a cat <lora:old:1>", steps=1)
    with pytest.raises(InputError, match="LoHa"):
        pipe("a cat <lora:loha:1>", steps=1)
    for tag in ("<lora:style:strong>", "<lora:style:1:2:3>", "<lora:style:dyn=4>", "<lora:style:0.5:te=1>"):
        with pytest.raises(InputError, match="<lora:NAME:WEIGHT>"):
            pipe(f"a cat {tag}", steps=1)
    with pytest.raises(InputError, match="LoRA weight in"):
        pipe("a cat <lora:style:1:50>", steps=1)  # the U-Net's weight is checked too
    with pytest.raises(InputError, match="LoRA weight in"):
        pipe("a cat", loras={"style": 50}, steps=1)
    with pytest.raises(InputError, match="lora_dir"):
        Pipeline.load(tiny_exports["sd1"], lora_dir=tmp_path / "nowhere")
    assert sorted(p.name for p in folder.iterdir()) == ["broken.safetensors", "loha.safetensors", "old.pt",
                                                        "style.safetensors"]  # nothing touched


def test_cli_tag_writes_lora_hashes_and_from_png_reapplies_them(references, tiny_exports, tmp_path):
    from PIL import Image

    from sdonnx.cli import main
    from sdonnx.runtime.lora import short_hash

    folder = tmp_path / "loras"
    folder.mkdir()
    lora = lora_files.write_kohya(folder / "style.safetensors", references["sd1"])
    first, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    common = ["-m", str(tiny_exports["sd1"]), "--steps", "2", "--seed", "3", "-q", "--lora-dir", str(folder)]
    assert main(["generate", "a cube <lora:style:0.7>", *common, "-o", str(first)]) == 0
    parameters = Image.open(first).info["parameters"]
    assert parameters.startswith("a cube <lora:style:0.7>")
    assert f'Lora hashes: "style: {short_hash(lora)}"' in parameters
    assert main(["generate", "--from-png", str(first), *common, "-o", str(again)]) == 0
    assert main(["generate", "a cube", *common, "-o", str(plain)]) == 0
    pixels = [np.asarray(Image.open(p)) for p in (first, again, plain)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    assert main(["generate", "a cube", *common, "--lora", f"{lora}:0.7", "-o", str(plain)]) == 0
    assert np.array_equal(np.asarray(Image.open(plain)), pixels[0])


def test_export_bakes_a_lora_into_the_graphs(references, tiny_sources, pipelines, tmp_path):
    from sdonnx.cli import main
    from sdonnx.runtime.manifest import Manifest

    lora = lora_files.write_kohya(tmp_path / "a.safetensors", references["sd1"], conv=True, scale=0.2)
    out = tmp_path / "baked"
    assert main(["export", str(tiny_sources["sd1"]), str(out), "--quiet", "--lora", f"{lora}:0.6"]) == 0
    assert "a.safetensors:0.6" in Manifest.read(out).source
    baked = Pipeline.load(out, provider="cpu", progress=False)
    x = latents(baked)
    at_load = ours(pipelines["sd1"], x, loras={str(lora): 0.6})
    assert np.abs(ours(baked, x) - at_load).max() <= TOLERANCE
    assert np.abs(ours(baked, x) - oracle_image(references["sd1"], [(lora, 0.6)], x)).max() <= TOLERANCE


def test_export_refuses_a_missing_or_mismatched_lora_before_writing(references, tiny_sources, tmp_path):
    from sdonnx.export import ExportConfig, export_model

    with pytest.raises(InputError, match="lora"):
        export_model(ExportConfig(tiny_sources["sd1"], tmp_path / "a", quiet=True,
                                  loras=((str(tmp_path / "none.safetensors"), 1.0),)))
    sd2_lora = lora_files.write_kohya(tmp_path / "sd2.safetensors", references["sd2"], text=False)
    with pytest.raises(InputError, match="another model family"):
        export_model(ExportConfig(tiny_sources["sd1"], tmp_path / "b", quiet=True, loras=((str(sd2_lora), 1.0),)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_trained_adapters_are_saved_as_the_runtime_reads_them(references, pipelines, tmp_path):
    """models/lora.py (what the embedded LCM-LoRA is trained with): the adapted torch U-Net and the
    runtime with the saved file draw the same image."""
    from sdonnx.models.lora import add_adapters, save_kohya

    reference = copy.deepcopy(references["sd1"])
    adapters = add_adapters(reference.unet, rank=4, alpha=2.0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for adapted in adapters.values():
            adapted.up.weight.normal_(0, 0.2, generator=generator)
    path = save_kohya(adapters, tmp_path / "trained.safetensors", dtype=torch.float32)
    pipe = pipelines["sd1"]
    x = latents(pipe)
    oracle = copy.deepcopy(reference)
    oracle.scheduler = diffusers.EulerDiscreteScheduler.from_config(oracle.scheduler.config)
    expected = oracle(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=torch.from_numpy(x), output_type="np").images[0]
    got = ours(pipe, x, loras={str(path): 1.0})
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(got - ours(pipe, x)).max() >= MOVES


def test_a_model_folders_own_loras_are_found_by_name(references, tiny_exports, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_exports["sd1"], folder)
    lora = lora_files.write_kohya(tmp_path / "own.safetensors", references["sd1"])
    (folder / "loras").mkdir()
    shutil.copy(lora, folder / "loras" / "own.safetensors")
    pipe = Pipeline.load(folder, provider="cpu", progress=False)
    x = latents(pipe)
    by_name = np.asarray(pipe("a cube <lora:own:0.5>", latents=x, steps=2, seed=0)[0])
    by_path = np.asarray(pipe("a cube", latents=x, steps=2, seed=0, loras={str(lora): 0.5})[0])
    assert np.array_equal(by_name, by_path)
