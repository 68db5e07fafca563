"""Inpainting only the masked area (runtime/masked.py, A1111's "Only masked" / inpaint_full_res): the
region it repaints, that it is inpainting of the cut-out region pasted back, and its checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdonnx.errors import InputError
from sdonnx.runtime.masked import crop_region, cut, paste
from sdonnx.runtime.metadata import format_parameters, parse_parameters
from sdonnx.runtime.pipeline import GenerationConfig, Pipeline

PROMPT = "a red circle on a white background"


def box_mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)  # box inclusive: pixels box[0]..box[2]
    return mask


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(progress=False)


@pytest.fixture(scope="module")
def picture(pipe):
    return pipe("a blue square on a white background", seed=1, steps=6)[0].resize((192, 128), Image.Resampling.LANCZOS)


def test_region_is_the_padded_box_grown_to_the_aspect_ratio():
    mask = box_mask((192, 128), (120, 40, 149, 79))  # 30 x 40
    assert crop_region(mask, padding=0, aspect=(64, 64)) == (115, 40, 155, 80)  # widened to 40 x 40 about its centre
    assert crop_region(mask, padding=8, aspect=(64, 64)) == (107, 32, 163, 88)  # 46 x 56, widened to 56
    wide = crop_region(mask, padding=0, aspect=(120, 40))
    assert (wide[2] - wide[0]) * 40 == (wide[3] - wide[1]) * 120 and wide[2] <= 192  # 3:1, inside the picture
    corner = crop_region(box_mask((192, 128), (0, 0, 9, 9)), padding=20, aspect=(64, 32))
    assert corner[:2] == (0, 0) and (corner[2] - corner[0]) == 2 * (corner[3] - corner[1])  # shifted, not cut
    with pytest.raises(InputError, match="white part"):
        crop_region(Image.new("L", (64, 64)), padding=0, aspect=(64, 64))


def test_only_masked_is_the_cut_out_region_inpainted_and_pasted_back(pipe, picture):
    mask = box_mask(picture.size, (120, 40, 149, 79))
    got = pipe.inpaint(PROMPT, image=picture, mask=mask, seed=2, steps=6, only_masked=True, only_masked_padding=8,
                       height=64, width=64)[0]
    assert got.size == picture.size and got.info["generation_size"] == (64, 64)
    region = got.info["inpaint_region"]
    part, part_mask = cut(picture, mask, region, 64, 64)
    repainted = pipe.inpaint(PROMPT, image=part, mask=part_mask, seed=2, steps=6)[0]
    assert np.array_equal(np.asarray(got), np.asarray(paste(picture, repainted, mask, region)))
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(got)[outside], np.asarray(picture.convert("RGB"))[outside])  # untouched
    assert np.abs(np.asarray(got, int) - np.asarray(picture, int))[~outside].mean() > 10  # repainted


def test_only_masked_is_checked_before_any_work(pipe, picture):
    with pytest.raises(InputError) as error:
        pipe.img2img(PROMPT, image=picture, only_masked=True)
    assert error.value.field == "only_masked"
    with pytest.raises(InputError, match="white part") as error:
        pipe.inpaint(PROMPT, image=picture, mask=Image.new("L", picture.size), only_masked=True)
    with pytest.raises(InputError) as error:
        GenerationConfig(PROMPT, only_masked=True, only_masked_padding=-1)
    assert error.value.field == "only_masked_padding"


def test_parameters_record_it_as_a1111_does():
    config = GenerationConfig(PROMPT, steps=6, seed=1, strength=1.0, only_masked=True, only_masked_padding=8)
    text = format_parameters(config, seed=1, size=(64, 64))
    assert "Inpaint area: Only masked, Masked area padding: 8" in text
    back = parse_parameters(text)
    assert back["only_masked"] is True and back["only_masked_padding"] == 8


def test_cli_only_masked(tmp_path, picture):
    from sdonnx import cli
    from sdonnx.runtime.metadata import read_parameters

    picture.save(tmp_path / "in.png")
    box_mask(picture.size, (120, 40, 149, 79)).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert cli.main(["generate", PROMPT, "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                     "--only-masked", "--only-masked-padding", "4", "--size", "64x64", "--steps", "4", "-q",
                     "-o", str(out)]) == 0
    assert Image.open(out).size == picture.size
    assert "Size: 64x64" in read_parameters(out) and "Inpaint area: Only masked" in read_parameters(out)
