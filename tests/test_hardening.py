"""Requests checked against the model before work: the model's recommended defaults, memory-bound
batches split into runs, and images whose mode Pillow would convert wrongly (16-bit, transparency)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from sdonnx.errors import InputError
from sdonnx.runtime import request as request_module
from sdonnx.runtime.images import image_pixels, mask_pixels
from sdonnx.runtime.pipeline import GenerationConfig, Pipeline
from sdonnx.runtime.request import check_request, estimate_peak


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(progress=False)


def test_recommended_settings_fill_what_the_request_leaves_open(pipe):
    recommended = pipe.manifest.recommended
    assert {"steps", "guidance"} <= set(recommended)
    resolved = pipe.check(GenerationConfig("a red circle")).config
    assert (resolved.steps, resolved.guidance) == (recommended["steps"], recommended["guidance"])
    given = pipe.check(GenerationConfig("a red circle", steps=7, guidance=9.0)).config
    assert (given.steps, given.guidance) == (7, 9.0)


def test_a_batch_too_big_for_memory_runs_in_parts_with_the_same_images(pipe, monkeypatch):
    m, root, policy = pipe.manifest, pipe.model.root, pipe.model.options.memory
    one, three = (estimate_peak(m, root, policy, n, 64, 64) for n in (1, 3))
    assert one < three
    room = (one + estimate_peak(m, root, policy, 2, 64, 64)) // 2  # one image fits, two do not
    request = check_request(m, root, policy, GenerationConfig("x", batch=3), None, None, available=room)
    assert request.runs == (1, 1, 1)
    whole = pipe("a red circle", seed=5, steps=3, batch=3)
    monkeypatch.setattr(request_module, "available_memory", lambda: room)
    parts = pipe("a red circle", seed=5, steps=3, batch=3)
    assert [i.info["seed"] for i in parts] == [5, 6, 7]
    for a, b in zip(whole, parts):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_too_big_for_one_image_suggests_low_memory(pipe):
    m, root, policy = pipe.manifest, pipe.model.root, pipe.model.options.memory
    with pytest.raises(InputError, match="--low-memory") as error:
        check_request(m, root, policy, GenerationConfig("x", height=512, width=512), None, None,
                      available=estimate_peak(m, root, policy, 1, 512, 512) // 2)
    assert error.value.field == "size"


def test_sixteen_bit_images_keep_their_range():
    gradient = Image.fromarray(np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16))
    assert gradient.mode == "I;16"
    pixels = image_pixels(gradient, 64, 64)
    assert (pixels > 0.99).mean() < 0.05 and pixels.min() == -1.0  # Pillow's convert would make it ~all white
    assert mask_pixels(gradient, gradient, 64, 64).mean() == 0.5


def test_transparency_is_composited_and_said(recwarn):
    clear_red = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    pixels = image_pixels(clear_red, 64, 64)
    np.testing.assert_array_equal(pixels, np.ones_like(pixels))  # white, not black
    assert any("composited on white" in str(w.message) for w in recwarn.list)
    mask = Image.new("LA", (64, 64), (255, 0))  # "repaint", but fully transparent
    assert mask_pixels(mask, clear_red, 64, 64).max() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_pixels(Image.new("RGBA", (8, 8), (1, 2, 3, 255)), 8, 8)  # opaque: nothing to say


def test_a_loaded_pipeline_does_not_count_its_weights_twice(pipe, monkeypatch):
    """Memory free after loading already excludes the open graphs: the need must exclude them too (a
    full-size SDXL pipeline, 13 GB of weights, was refused at 512 px on a 24 GB machine before)."""
    m, root, policy = pipe.manifest, pipe.model.root, pipe.model.options.memory
    whole = estimate_peak(m, root, policy, 1, 64, 64)
    activations = estimate_peak(m, root, policy, 1, 64, 64, loaded=set(m.graphs))
    assert activations < whole
    room = (activations + whole) // 2
    with pytest.raises(InputError, match="fits in memory"):
        check_request(m, root, policy, GenerationConfig("x", height=64, width=64), None, None, available=room)
    monkeypatch.setattr(request_module, "available_memory", lambda: room)
    assert pipe.check(GenerationConfig("x", height=64, width=64)).runs == (1,)
