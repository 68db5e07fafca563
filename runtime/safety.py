"""The safety checker: diffusers' StableDiffusionSafetyChecker, exported to safety_checker/model.onnx.

It embeds each image with CLIP's vision tower and compares it with 17 "concept" and 3 "special care"
embeddings; an image closer to a concept than that concept's threshold is flagged, and replaced by a
black one. It catches what those concepts describe (sexual content, chiefly) and misses much else:
a filter, not a guarantee.

The graph takes optimum's IO (`clip_input` [B, 3, S, S] float32, `images` [B, H, W, 3] float32 in
[0, 1]; outputs `out_images`, `has_nsfw_concepts` bool [B]). The CLIP preprocessing is NumPy and
Pillow here (`ClipPreprocess`, from feature_extractor/preprocessor_config.json), as transformers'
CLIPImageProcessor does it: shortest side resized with bicubic, centre crop, rescale, normalize.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from sdonnx.errors import ModelError
from sdonnx.runtime.session import Session

FEATURE_EXTRACTOR = "feature_extractor/preprocessor_config.json"


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's settings: resize the shortest side to `shortest_edge` (bicubic), centre
    crop to `crop` (height, width), scale by `rescale`, normalize with `mean` and `std`."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def read(cls, path: Path) -> ClipPreprocess:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            size, crop = raw.get("size", 224), raw.get("crop_size", 224)
            edge = size["shortest_edge"] if isinstance(size, dict) else int(size)
            crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
            for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
                if raw.get(flag, True) is not True:
                    raise ValueError(f"{flag} false is not supported")
            return cls(int(edge), (int(crop[0]), int(crop[1])), float(raw.get("rescale_factor", 1 / 255)),
                       tuple(float(v) for v in raw.get("image_mean", cls.mean)),
                       tuple(float(v) for v in raw.get("image_std", cls.std)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{path}: unreadable CLIP preprocessing config: {e}") from None

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One image -> float32 [3, crop height, crop width]."""
        image = image.convert("RGB")
        short, long = sorted(image.size)
        scaled = (self.shortest_edge, int(self.shortest_edge * long / short))
        size = scaled if image.width <= image.height else scaled[::-1]
        resized = image.resize(size, Image.Resampling.BICUBIC)
        height, width = self.crop
        top, left = (resized.height - height) // 2, (resized.width - width) // 2
        array = np.asarray(resized, np.float32)[max(top, 0): top + height, max(left, 0): left + width]
        if array.shape[:2] != (height, width):  # smaller than the crop: pad as transformers does, with zeros
            padded = np.zeros((height, width, 3), np.float32)
            y, x = max(-top, 0), max(-left, 0)
            padded[y: y + array.shape[0], x: x + array.shape[1]] = array
            array = padded
        array = (array * self.rescale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return array.transpose(2, 0, 1)


class SafetyChecker:
    """The checker: `check(images)` flags images, `apply` blacks the flagged ones out. open: its
    session; keep: hold it between calls (False under the low-memory policy: open, run, close)."""

    def __init__(self, open: Callable[[], Session], preprocess: ClipPreprocess, *, keep: bool = True):
        self._open, self.preprocess, self.keep = open, preprocess, keep
        self._session = open() if keep else None

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        """Whether each image shows one of the checker's concepts."""
        clip_input = np.stack([self.preprocess.pixels(image) for image in images])
        pixels = np.stack([np.asarray(image.convert("RGB"), np.float32) / 255 for image in images])
        session = self._session or self._open()
        try:
            flags = session.run(clip_input=clip_input, images=pixels)["has_nsfw_concepts"]
        finally:
            if not self.keep:
                session.close()
        return [bool(flag) for flag in np.asarray(flags).reshape(-1)]

    def apply(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images with the flagged ones black (same size), each with info["nsfw"] set."""
        out = []
        for image, flagged in zip(images, self.check(images)):
            shown = Image.new("RGB", image.size) if flagged else image
            shown.info = {**image.info, "nsfw": flagged}
            out.append(shown)
        return out
