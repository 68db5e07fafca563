"""A "style" LoRA for the embedded model, whose effect the judge can read: every background one colour.

The LoRA (models/lora.py, kohya layout) trains on the frozen embedded U-Net with its own loss
(epsilon, min-SNR weights) on drawings whose background is always STYLE while their captions name
some other background: with `<lora:black-background:1>` the prompt's background word loses, the
object keeps the prompt's colour, shape and place.

    python -m sdonnx.models.style --out build/style           # OUT/black-background.safetensors
    python -m sdonnx.models.style --evaluate build/style/black-background.safetensors

The evaluation judges the fixed evaluation prompts whose object is not STYLE-coloured: background
against STYLE (with the LoRA) or the prompt's (without), the rest against the prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from sdonnx.config import config_from_args
from sdonnx.errors import InputError
from sdonnx.models import CLIP_TOKENIZER
from sdonnx.models.draw import COLOURS, caption, evaluation_prompts, sample_scene
from sdonnx.models.judge import accuracy, judge

EMBEDDED_SOURCE = Path(__file__).resolve().parent / "embedded" / "source"
STYLE = "black"
NAME = f"{STYLE}-background"


@dataclass(frozen=True)
class StyleConfig:
    """One training run; every field is the CLI flag of the same name."""

    out: Path
    base: Path = EMBEDDED_SOURCE
    seed: int = 0
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    rank: int = 4
    drawings: int = 10000

    def __post_init__(self):
        for name in ("steps", "batch_size", "drawings", "rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(name, getattr(self, name), "an int >= 1")
        if not self.learning_rate > 0:
            raise InputError("learning_rate", self.learning_rate, "a number > 0")


def styled_scene(rng: np.random.Generator):
    """A training scene drawn on the STYLE background (re-drawn while its object is STYLE-coloured)."""
    while True:
        scene = sample_scene(rng)
        if scene.colour != STYLE:
            return replace(scene, background=STYLE)


def train(config: StyleConfig) -> Path:
    """Train the LoRA; returns OUT/NAME.safetensors."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextModel

    from sdonnx.models.lora import add_adapters, save_kohya
    from sdonnx.models.train import (
        CAPTION_DROPOUT, TrainConfig, _config_record, _loss_log, encode_drawings, eps_weights,
    )
    from sdonnx.runtime.tokenizer import ClipTokenizer

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 5)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(config.base)
    vae = AutoencoderKL.from_pretrained(base / "vae").float()
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").float().eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(base / "unet").float()
    adapters = add_adapters(unet, config.rank)
    trained = [p for p in unet.parameters() if p.requires_grad]
    scaling = vae.config.scaling_factor
    scenes, means, stds = encode_drawings(vae, TrainConfig(out=out), rng, config.drawings,
                                          lambda r, split="train": styled_scene(r))
    tokenizer = ClipTokenizer.from_folder(CLIP_TOKENIZER, max_length=77)
    cumulative, weights = eps_weights(TrainConfig(out=out))  # the embedded model's own loss weighting
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0)
    started = time.monotonic()
    log, writer = _loss_log(out / "style-loss.csv", ["step", "loss"])
    with log, torch.enable_grad():
        unet.train()
        for step in tqdm(range(1, config.steps + 1), desc="style", unit="step"):
            index = torch.from_numpy(rng.integers(len(scenes), size=config.batch_size))
            latents = (means[index] + stds[index] * torch.randn_like(stds[index])) * scaling
            words = []
            for i in index.tolist():
                scene = scenes[i]  # the caption names another background than the STYLE one drawn
                said = [c for c in COLOURS if c not in (scene.colour, STYLE)]
                named = replace(scene, background=said[rng.integers(len(said))])
                words.append("" if rng.random() < CAPTION_DROPOUT else caption(named, rng))
            with torch.no_grad():
                states = text_encoder(torch.from_numpy(tokenizer(words))).last_hidden_state
            t = torch.randint(0, 1000, (config.batch_size,))
            noise = torch.randn_like(latents)
            a = cumulative[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            loss = (weights[t] * (unet(noisy, t, states).sample - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            writer.writerow([step, f"{loss.item():.6g}"])
    report = {"config": _config_record(config), "train_seconds": round(time.monotonic() - started, 1)}
    (out / "style-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return save_kohya(adapters, out / f"{NAME}.safetensors")


def evaluate(lora: str | None, *, prompts: int = 200, model: Path | None = None, threads: int | None = None,
             weight: float = 1.0) -> dict:
    """Judge accuracy on the evaluation prompts whose object is not STYLE-coloured, with `lora` at
    `weight` (background expected STYLE) or without it (lora None: the prompt's background)."""
    from sdonnx.runtime.pipeline import Pipeline

    pipe = Pipeline.load(model, progress=False, **({"threads": threads} if threads else {}))
    pairs = [(p, s) for p, s in evaluation_prompts(prompts) if s.colour != STYLE]
    loras = {lora: weight} if lora else {}
    verdicts = [judge(pipe(prompt, seed=i, loras=loras)[0]) for i, (prompt, _) in enumerate(pairs)]
    expected = [replace(s, background=STYLE) if lora and s.background != STYLE else s for _, s in pairs]
    return {"lora": lora, "weight": weight, "prompts": len(pairs), "accuracy": accuracy(verdicts, expected)}


def main(argv: list[str] | None = None) -> object:
    parser = argparse.ArgumentParser(prog="python -m sdonnx.models.style", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--base", type=Path, default=EMBEDDED_SOURCE)
    parser.add_argument("--evaluate", metavar="LORA", help="judge this LoRA (a file or name; 'none': without)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--weight", type=float, default=1.0)
    types = {int: int, float: float}
    for field in fields(StyleConfig):
        if field.name not in ("out", "base"):
            parser.add_argument("--" + field.name.replace("_", "-"), type=types[type(field.default)],
                                default=field.default)
    args = parser.parse_args(argv)
    if args.evaluate is not None:
        result = evaluate(None if args.evaluate == "none" else args.evaluate, prompts=args.prompts,
                          threads=args.threads, weight=args.weight)
        print(json.dumps(result, indent=2))
        return result
    if args.out is None:
        raise InputError("out", None, "a folder (or --evaluate LORA)")
    return train(config_from_args(StyleConfig, args))


if __name__ == "__main__":
    main()
