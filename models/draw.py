"""Procedural captioned drawings: the embedded model's training data and its evaluation prompts.

A `Scene` is one flat-coloured shape on a flat background. `draw` renders it, `caption` words it
in varied ways, `sample_scene` draws random scenes from the training or the held-out split, and
`evaluation_prompts` is the fixed prompt set the model is judged on. Everything is deterministic
given a `numpy.random.Generator`.

Held-out combinations: the (colour, shape, background) triple with palette indices c, b and shape
index s is held out exactly when (c + 3*s + b) % 10 == 0 (26 of the 270 triples, 10%). Every
colour, shape and background, every colour-shape pair and every colour-background pair still
occurs in training, so the held-out set measures composition, not vocabulary.

Geometry: x and y are the shape's area centroid in [0, 1] (x right, y down). The position word
cuts each axis in thirds; sampled centroids stay `POSITION_GAP` away from the cuts so the word is
never ambiguous. The size word fixes the shape's width (`EXTENTS`) up to `SCALE_JITTER`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

from sdonnx.errors import InputError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 20, 30),
    "orange": (245, 130, 0),
    "yellow": (250, 230, 40),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "purple": (130, 30, 160),
    "pink": (240, 130, 190),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "grey": (140, 140, 140),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Width of the shape as a fraction of the image side; the sampled scale jitters it.
EXTENTS = {"small": 0.20, "large": 0.40}
SCALE_JITTER = 0.08
# Kept free around the shape (over a pixel at 64x64) so the border shows only background.
MARGIN = 0.02
POSITION_GAP = 0.05
HORIZONTAL = ("left", "centre", "right")
VERTICAL = ("top", "centre", "bottom")
POSITIONS = tuple(
    "centre" if v == h == "centre" else " ".join(w for w in (v, h) if w != "centre")
    for v, h in product(VERTICAL, HORIZONTAL)
)
SPLITS = ("train", "heldout")
SUPERSAMPLE = 4
# An equilateral triangle, apex up: height over width.
TRIANGLE_HEIGHT = math.sqrt(3) / 2


def is_heldout(colour: str, shape: str, background: str) -> bool:
    """Whether training never sees this (colour, shape, background) combination."""
    return (COLOURS.index(colour) + 3 * SHAPES.index(shape) + COLOURS.index(background)) % 10 == 0


COMBINATIONS = tuple((c, s, b) for c, s, b in product(COLOURS, SHAPES, COLOURS) if c != b)
HELDOUT = tuple(combo for combo in COMBINATIONS if is_heldout(*combo))
TRAIN = tuple(combo for combo in COMBINATIONS if not is_heldout(*combo))


def position_word(x: float, y: float) -> str:
    """The position word of a centroid: "top left", "top", ..., "centre", ..., "bottom right"."""
    return POSITIONS[min(int(y * 3), 2) * 3 + min(int(x * 3), 2)]


def _one_of(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(field, value, f"one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Scene:
    """One shape of one colour on a background; x, y: its centroid in [0, 1], y downwards."""

    shape: str
    colour: str
    background: str
    size: str
    x: float
    y: float
    scale: float = 1.0

    def __post_init__(self):
        _one_of("shape", self.shape, SHAPES)
        _one_of("colour", self.colour, COLOURS)
        _one_of("background", self.background, COLOURS)
        _one_of("size", self.size, SIZES)
        if self.background == self.colour:
            raise InputError("background", self.background, f"a colour other than the object's ({self.colour})")
        if not 1 - SCALE_JITTER <= self.scale <= 1 + SCALE_JITTER:
            raise InputError("scale", self.scale, f"within 1 ± {SCALE_JITTER}")
        (left, right), (top, bottom) = self.box()
        if min(left, top) < 0 or max(right, bottom) > 1:
            expected = f"a centroid that keeps the {self.size} {self.shape} inside the image"
            raise InputError("x, y", (self.x, self.y), expected)

    @property
    def extent(self) -> float:
        """The shape's width as a fraction of the image side."""
        return EXTENTS[self.size] * self.scale

    @property
    def position(self) -> str:
        return position_word(self.x, self.y)

    @property
    def heldout(self) -> bool:
        return is_heldout(self.colour, self.shape, self.background)

    def box(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((left, right), (top, bottom)) of the shape in [0, 1] image coordinates."""
        half = self.extent / 2
        if self.shape == "triangle":
            # The centroid of an apex-up triangle lies two thirds of its height below the apex.
            height = self.extent * TRIANGLE_HEIGHT
            return (self.x - half, self.x + half), (self.y - 2 * height / 3, self.y + height / 3)
        return (self.x - half, self.x + half), (self.y - half, self.y + half)


def draw(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of size x size pixels, edges anti-aliased by supersampling."""
    if not isinstance(size, int) or size < 16:
        raise InputError("size", size, "an int >= 16 (pixels)")
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    pen = ImageDraw.Draw(image)
    (left, right), (top, bottom) = (tuple(v * side for v in axis) for axis in scene.box())
    fill = PALETTE[scene.colour]
    if scene.shape == "circle":
        pen.ellipse((left, top, right, bottom), fill=fill)
    elif scene.shape == "square":
        pen.rectangle((left, top, right, bottom), fill=fill)
    else:
        pen.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image.reduce(SUPERSAMPLE)


def _centroid_range(before: float, after: float, word_index: int) -> tuple[float, float]:
    """Centroid interval on one axis for a third (0, 1, 2) of it, given the shape's reach before/after the centroid."""
    low = max(word_index / 3 + POSITION_GAP if word_index else 0.0, before + MARGIN)
    high = min((word_index + 1) / 3 - POSITION_GAP if word_index < 2 else 1.0, 1 - after - MARGIN)
    return low, high


def place(shape: str, colour: str, background: str, size: str, position: str, rng: np.random.Generator,
          scale: float = 1.0) -> Scene:
    """The scene with its centroid drawn uniformly from where `position`'s word stays unambiguous."""
    _one_of("position", position, POSITIONS)
    # Measure the shape's reach around its centroid from a centred copy of the scene.
    (left, right), (top, bottom) = Scene(shape, colour, background, size, 0.5, 0.5, scale).box()
    v, h = divmod(POSITIONS.index(position), 3)
    x = rng.uniform(*_centroid_range(0.5 - left, right - 0.5, h))
    y = rng.uniform(*_centroid_range(0.5 - top, bottom - 0.5, v))
    return Scene(shape, colour, background, size, float(x), float(y), scale)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """A random scene whose (colour, shape, background) belongs to `split` ("train" or "heldout")."""
    _one_of("split", split, SPLITS)
    combos = TRAIN if split == "train" else HELDOUT
    colour, shape, background = combos[rng.integers(len(combos))]
    size = SIZES[rng.integers(len(SIZES))]
    scale = float(rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER))
    position = POSITIONS[rng.integers(len(POSITIONS))]
    return place(shape, colour, background, size, position, rng, scale)


POSITION_PHRASES = {
    "centre": ("in the centre", "in the middle", "in the center"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
}
CORNER_PHRASES = ("at the {}", "in the {} corner", "in the {}")


def _position_phrase(word: str, rng: np.random.Generator) -> str:
    if word in POSITION_PHRASES:
        phrases = POSITION_PHRASES[word]
        return phrases[rng.integers(len(phrases))]
    return CORNER_PHRASES[rng.integers(len(CORNER_PHRASES))].format(word)


# {obj}: "a small red circle"; {bg}: "blue"; {a_bg}: "a blue"; {where}: "at the top left"; {word}: ", top left".
TEMPLATES = (
    "{obj} on {a_bg} background{where}",
    "{obj}{where} on {a_bg} background",
    "{obj}, {bg} background{word}",
    "{bg} background with {obj}{where}",
    "{obj}{where}, {bg} background",
    "{obj} against {a_bg} background{where}",
)


def _with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def caption(scene: Scene, rng: np.random.Generator, *, complete: bool = False) -> str:
    """A caption of the scene in one of several wordings.

    Colour, shape and background are always named. Size and position are each left out one time in
    five unless `complete`, so the model also learns prompts such as "a red circle on a blue background".
    """
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    named_size = complete or rng.random() >= 0.2
    named_position = complete or rng.random() >= 0.2
    words = [scene.size] if named_size else []
    noun = " ".join([*words, scene.colour, scene.shape])
    obj = noun if template.startswith("{obj},") and rng.random() < 0.5 else _with_article(noun)
    where = " " + _position_phrase(scene.position, rng) if named_position else ""
    word = ", " + scene.position if named_position else ""
    return template.format(obj=obj, bg=scene.background, a_bg=_with_article(scene.background), where=where, word=word)


def evaluation_prompts(n: int = 200, seed: int = 0) -> list[tuple[str, Scene]]:
    """n (caption, scene) pairs, complete captions, the first half trained combinations, the rest held out."""
    if not isinstance(n, int) or n < 2 or n % 2:
        raise InputError("n", n, "an even int >= 2")
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split) for split in ("train", "heldout") for _ in range(n // 2)]
    return [(caption(scene, rng, complete=True), scene) for scene in scenes]
