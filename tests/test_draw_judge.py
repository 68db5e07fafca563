"""The drawing module (scenes, captions, splits, evaluation prompts) and the judge that reads drawings.

The judge is validated on the drawing module's ground truth: ≥ 98% per attribute on clean drawings
and ≥ 95% on drawings degraded the way a VAE round trip degrades them (blur, noise, colour shift).
"""

from __future__ import annotations

import re
from itertools import product

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdonnx.errors import InputError
from sdonnx.models.draw import (
    COLOURS,
    HELDOUT,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN,
    Scene,
    caption,
    draw,
    evaluation_prompts,
    sample_scene,
)
from sdonnx.models.judge import ATTRIBUTES, Verdict, accuracy, grade, judge

JUDGED_SCENES = 1000


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(1234)
    return [sample_scene(rng, split) for split in ("train", "heldout") for _ in range(JUDGED_SCENES // 2)]


def vae_like(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur (radius 1), a colour shift of up to 10 per channel and ±10 pixel noise."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    shifted = blurred + rng.uniform(-10, 10, size=3) + rng.uniform(-10, 10, size=blurred.shape)
    return Image.fromarray(np.clip(np.rint(shifted), 0, 255).astype(np.uint8))


def judged_accuracy(scenes, degrade=None) -> dict[str, float]:
    rng = np.random.default_rng(0)
    images = (draw(scene) for scene in scenes)
    verdicts = [judge(degrade(image, rng) if degrade else image) for image in images]
    return accuracy(verdicts, scenes)


def test_judge_reads_clean_drawings(scenes):
    measured = judged_accuracy(scenes)
    print(f"judge on {len(scenes)} clean drawings:", measured)
    assert all(measured[a] >= 0.98 for a in ATTRIBUTES), measured


def test_judge_reads_vae_like_degraded_drawings(scenes):
    measured = judged_accuracy(scenes, vae_like)
    print(f"judge on {len(scenes)} blurred, shifted, noisy drawings:", measured)
    assert all(measured[a] >= 0.95 for a in ATTRIBUTES), measured


def test_judge_reads_larger_drawings(scenes):
    subset = scenes[::10]
    verdicts = [judge(draw(scene, size=128)) for scene in subset]
    assert all(all(grade(v, s).values()) for v, s in zip(verdicts, subset))


def test_judge_reports_no_object_on_a_blank_image():
    verdict = judge(Image.new("RGB", (64, 64), PALETTE["blue"]))
    assert verdict == Verdict("blue")
    assert grade(verdict, Scene("circle", "red", "blue", "small", 0.5, 0.5)) == {
        "colour": False, "background": True, "shape": False, "size": False, "position": False,
    }


def test_judge_rejects_non_images_and_tiny_images():
    with pytest.raises(InputError, match="image"):
        judge(np.zeros((64, 64, 3)))
    with pytest.raises(InputError, match="image"):
        judge(Image.new("RGB", (8, 8)))


def test_accuracy_needs_one_verdict_per_scene():
    with pytest.raises(InputError, match="verdicts"):
        accuracy([Verdict("red")], [])


def test_sampling_and_drawing_are_deterministic():
    def render(seed):
        rng = np.random.default_rng(seed)
        scenes = [sample_scene(rng) for _ in range(20)]
        return scenes, [caption(s, rng) for s in scenes], [draw(s).tobytes() for s in scenes]

    assert render(7) == render(7)
    assert render(7)[0] != render(8)[0]


def test_drawings_are_flat_colours_inside_a_clean_border():
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = sample_scene(rng)
        pixels = np.asarray(draw(scene))
        assert pixels.shape == (64, 64, 3)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (border == PALETTE[scene.background]).all(), scene
        # Only edge pixels blend: most of the object is its exact palette colour.
        exact = (pixels == PALETTE[scene.colour]).all(axis=-1).sum()
        assert exact >= 0.4 * (scene.extent * 64) ** 2 / 2, (scene, exact)


def test_heldout_combinations_are_about_a_tenth_and_compose_from_trained_parts():
    assert not set(HELDOUT) & set(TRAIN)
    assert len(HELDOUT) + len(TRAIN) == len(COLOURS) * len(SHAPES) * (len(COLOURS) - 1)
    assert 0.08 <= len(HELDOUT) / (len(HELDOUT) + len(TRAIN)) <= 0.12
    trained_pairs = {(c, s) for c, s, _ in TRAIN} | {(c, b) for c, _, b in TRAIN} | {(s, b) for _, s, b in TRAIN}
    for colour, shape, background in HELDOUT:
        assert {(colour, shape), (colour, background), (shape, background)} <= trained_pairs
    assert {s for _, s, _ in HELDOUT} == set(SHAPES)


@pytest.mark.parametrize("split, combos", [("train", TRAIN), ("heldout", HELDOUT)])
def test_sample_scene_stays_in_its_split_and_covers_every_word(split, combos):
    rng = np.random.default_rng(11)
    scenes = [sample_scene(rng, split) for _ in range(600)]
    assert all((s.colour, s.shape, s.background) in combos for s in scenes)
    assert {s.position for s in scenes} == set(POSITIONS)
    assert {s.size for s in scenes} == set(SIZES)
    assert all(s.heldout == (split == "heldout") for s in scenes)


def test_captions_name_the_scene_in_varied_words():
    scene = Scene("triangle", "orange", "green", "small", 0.2, 0.2)
    rng = np.random.default_rng(3)
    captions = [caption(scene, rng) for _ in range(200)]
    assert len(set(captions)) >= 20
    assert all(re.search(r"\borange triangle\b", c) and "green background" in c for c in captions)
    assert any("small" not in c for c in captions) and any("top left" not in c for c in captions)
    assert any("an orange" in c for c in captions) and not any("a orange" in c for c in captions)
    complete = [caption(scene, rng, complete=True) for _ in range(50)]
    assert all("small orange triangle" in c and "top left" in c for c in complete)


def test_evaluation_prompts_are_fixed_complete_and_half_heldout():
    prompts = evaluation_prompts()
    assert prompts == evaluation_prompts() and prompts != evaluation_prompts(seed=1)
    assert len(prompts) == 200
    heldout = [scene.heldout for _, scene in prompts]
    assert heldout == [False] * 100 + [True] * 100
    for text, scene in prompts:
        assert f"{scene.size} {scene.colour} {scene.shape}" in text, text
        position = {"centre": ("centre", "middle", "center")}.get(scene.position, (scene.position,))
        assert any(word in text for word in position), text
    with pytest.raises(InputError, match="n"):
        evaluation_prompts(n=5)


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(shape="hexagon"), "shape"),
        (dict(colour="teal"), "colour"),
        (dict(background="red"), "background"),
        (dict(size="huge"), "size"),
        (dict(scale=1.5), "scale"),
        (dict(x=0.05), "x, y"),
        (dict(size="large", y=0.9), "x, y"),
    ],
)
def test_scene_rejects_impossible_values(fields, field):
    base = dict(shape="circle", colour="red", background="blue", size="small", x=0.5, y=0.5)
    with pytest.raises(InputError) as error:
        Scene(**{**base, **fields})
    assert error.value.field == field


def test_every_combination_of_words_can_be_drawn_and_judged():
    rng = np.random.default_rng(2)
    for shape, size, position in product(SHAPES, SIZES, POSITIONS):
        while True:
            scene = sample_scene(rng)
            if (scene.shape, scene.size, scene.position) == (shape, size, position):
                break
        verdict = judge(draw(scene))
        assert all(grade(verdict, scene).values()), (scene, verdict)


def test_judge_gives_a_verdict_on_noise():
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    verdict = judge(Image.fromarray(noise))
    assert verdict.background in COLOURS and verdict.colour in (*COLOURS, None)
