"""The README's picture of the embedded model: a grid of images the runtime made, prompt under each.

    python -m sdonnx.models.grid docs/embedded-grid.png

Prompts are the first of each half of `evaluation_prompts` (trained, then held-out combinations),
seed i for image i, the runtime's default sampler and steps.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdonnx.models.draw import evaluation_prompts
from sdonnx.runtime.pipeline import Pipeline

SCALE = 3
CAPTION_LINES = 4
CAPTION_WIDTH = 30  # characters per line
LINE_HEIGHT = 12


def prompts(count: int) -> list[tuple[str, bool]]:
    """count prompts, (text, held_out): half from trained combinations, half held out."""
    pairs = evaluation_prompts(200)
    picked = pairs[: count - count // 2] + pairs[100 : 100 + count // 2]
    return [(text, scene.heldout) for text, scene in picked]


def make_grid(pipe: Pipeline, count: int = 12, columns: int = 6) -> Image.Image:
    """count images in rows of `columns`, each enlarged SCALE times, its prompt printed under it."""
    font = ImageFont.load_default()
    cells = []
    for seed, (text, held_out) in enumerate(prompts(count)):
        image = pipe(text, seed=seed)[0]
        side = image.width * SCALE
        cell = Image.new("RGB", (side, side + CAPTION_LINES * LINE_HEIGHT + 4), "white")
        cell.paste(image.resize((side, side), Image.NEAREST))
        lines = textwrap.wrap(text + (" [held out]" if held_out else ""), CAPTION_WIDTH)[:CAPTION_LINES]
        pen = ImageDraw.Draw(cell)
        for row, line in enumerate(lines):
            pen.text((2, side + 2 + row * LINE_HEIGHT), line, fill="black", font=font)
        cells.append(cell)
    width, height = cells[0].size
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, cell in enumerate(cells):
        grid.paste(cell, ((index % columns) * width, (index // columns) * height))
    return grid


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m sdonnx.models.grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--model", type=Path, default=None, help="exported folder (default: the embedded model)")
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args(argv)
    make_grid(Pipeline.load(args.model, progress=False), args.count).save(args.out)
    return args.out


if __name__ == "__main__":
    main()
