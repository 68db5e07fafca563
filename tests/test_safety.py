"""The safety checker: exported from a tiny random diffusers StableDiffusionSafetyChecker whose concept
embeddings are set so that chosen images are flagged; its CLIP preprocessing against transformers',
its flags against diffusers', and the pipeline blacking out what it flags."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor  # noqa: E402

from sdonnx.errors import InputError  # noqa: E402
from sdonnx.export import ExportConfig, export_model  # noqa: E402
from sdonnx.runtime.manifest import Manifest  # noqa: E402
from sdonnx.runtime.pipeline import Pipeline  # noqa: E402
from sdonnx.runtime.safety import FEATURE_EXTRACTOR, ClipPreprocess  # noqa: E402

PROMPT = "a red cube"
SIZE = 32


def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def tiny_checker(seed: int = 0) -> StableDiffusionSafetyChecker:
    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(small, vocab_size=1000),
                        vision_config=dict(small, image_size=SIZE, patch_size=8), projection_dim=16)
    return StableDiffusionSafetyChecker(config).eval()


def embed(checker, images) -> torch.Tensor:
    pixels = processor()(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        return checker.visual_projection(checker.vision_model(pixels)[1])


def flag_like(checker, image: Image.Image, threshold: float) -> None:
    """Concept 0 becomes `image`'s embedding with `threshold`; the other concepts never fire."""
    with torch.no_grad():
        checker.concept_embeds[0] = embed(checker, [image])[0]
        checker.concept_embeds_weights[:] = 2.0
        checker.concept_embeds_weights[0] = threshold
        checker.special_care_embeds_weights[:] = 2.0


def with_checker(source, out, checker) -> object:
    """A copy of the diffusers folder `source` with `checker` and its feature extractor."""
    shutil.copytree(source, out)
    checker.save_pretrained(out / "safety_checker", safe_serialization=True)
    processor().save_pretrained(out / "feature_extractor")
    index = json.loads((out / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (out / "model_index.json").write_text(json.dumps(index))
    return out


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
            Image.fromarray(np.full((40, 56, 3), 250, np.uint8)), Image.new("RGB", (56, 40), "navy")]


@pytest.fixture(scope="module")
def flagging_folder(tiny_sources, tmp_path_factory):
    """The tiny SD 1.x folder with a checker that flags the first of pictures(), exported."""
    root = tmp_path_factory.mktemp("safety")
    checker = tiny_checker()
    flag_like(checker, pictures()[0], 0.999)
    source = with_checker(tiny_sources["sd1"], root / "source", checker)
    export_model(ExportConfig(source=str(source), out=root / "onnx", quiet=True))
    return root, checker


def test_preprocessing_is_transformers_clip_processor():
    ours = ClipPreprocess(shortest_edge=SIZE, crop=(SIZE, SIZE))
    for image in [*pictures(), Image.new("RGB", (100, 30), "teal"), Image.new("RGB", (20, 20), "red")]:
        want = processor()(images=[image], return_tensors="np").pixel_values[0]
        np.testing.assert_allclose(ours.pixels(image), want, atol=1e-5)


def test_export_records_the_checker_and_its_flags_match_diffusers(flagging_folder):
    root, checker = flagging_folder
    manifest = Manifest.read(root / "onnx")
    assert manifest.safety_checker is not None and manifest.safety_checker.check["psnr_db"] >= 60
    assert ClipPreprocess.read(root / "onnx" / FEATURE_EXTRACTOR) == ClipPreprocess(SIZE, (SIZE, SIZE))
    assert manifest.safety_checker.path in manifest.files and "safety_checker" not in manifest.graphs
    pipe = Pipeline.load(root / "onnx", progress=False)
    images = pictures()
    pixels = processor()(images=images, return_tensors="pt").pixel_values
    arrays = np.stack([np.asarray(i, np.float32) / 255 for i in images])
    _, expected = checker(clip_input=pixels, images=arrays.copy())
    assert pipe.safety.check(images) == list(expected) == [True, False, False]


def test_the_pipeline_blacks_out_flagged_images(flagging_folder, tmp_path):
    root, checker = flagging_folder
    flag_like(checker, pictures()[0], -2.0)  # every image is flagged
    folder = tmp_path / "all"
    shutil.copytree(root / "source", folder)
    checker.save_pretrained(folder / "safety_checker", safe_serialization=True)
    export_model(ExportConfig(source=str(folder), out=tmp_path / "onnx", quiet=True))
    pipe = Pipeline.load(tmp_path / "onnx", progress=False)
    flagged = pipe(PROMPT, seed=0, steps=2, batch=2)
    assert [image.info["nsfw"] for image in flagged] == [True, True]
    assert all(not np.asarray(image).any() for image in flagged)
    plain = Pipeline.load(tmp_path / "onnx", progress=False, safety_checker=False)(PROMPT, seed=0, steps=2)[0]
    assert np.asarray(plain).any() and "nsfw" not in plain.info


def test_folders_without_a_checker(tiny_exports, tmp_path):
    assert Pipeline.load(tiny_exports["sd1"], progress=False).safety is None
    with pytest.raises(InputError, match="safety checker") as error:
        Pipeline.load(tiny_exports["sd1"], progress=False, safety_checker=True)
    assert error.value.field == "safety_checker"
    with pytest.raises(InputError):
        Pipeline.load(tiny_exports["sd1"], safety_checker="yes")


def test_export_can_leave_it_out(flagging_folder, tmp_path):
    root, _ = flagging_folder
    manifest = export_model(ExportConfig(source=str(root / "source"), out=tmp_path / "out", quiet=True,
                                         safety_checker=False))
    assert manifest.safety_checker is None and not (tmp_path / "out" / "safety_checker").exists()


def test_cli_says_whether_the_checker_runs(flagging_folder, tmp_path, capsys):
    from sdonnx.cli import main

    root, _ = flagging_folder
    out = tmp_path / "x.png"
    assert main(["generate", PROMPT, "-m", str(root / "onnx"), "--steps", "2", "-o", str(out)]) == 0
    assert "safety checker: on" in capsys.readouterr().err
    assert main(["generate", PROMPT, "-m", str(root / "onnx"), "--steps", "2", "--no-safety-checker",
                 "-o", str(out)]) == 0
    assert "safety checker: off" in capsys.readouterr().err


def test_quantize_keeps_the_checker_in_fp32(flagging_folder, tmp_path):
    from sdonnx.quantize import QuantizeConfig, quantize_model

    root, _ = flagging_folder
    manifest = quantize_model(QuantizeConfig(model=root / "onnx", out=tmp_path / "int8", recipe="int8"))
    assert manifest.safety_checker is not None and manifest.safety_checker.path in manifest.files
    pipe = Pipeline.load(tmp_path / "int8", progress=False)
    assert pipe.safety.check(pictures()) == [True, False, False]
