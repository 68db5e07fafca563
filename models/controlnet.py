"""A ControlNet for the embedded model: the object's silhouette decides where it is and what shape.

The control image is the scene's silhouette (the object white on black, `silhouette`). Training
(Zhang et al. 2023, as diffusers' train_controlnet.py) starts the ControlNet as a copy of the
frozen U-Net's encoder with zero convolutions (`ControlNetModel.from_unet`) and trains only it, on
the embedded model's drawings, with the U-Net's own loss (epsilon, min-SNR weights, captions
dropped one time in ten). A share of the captions (`contradict`) names another position and shape
than the drawing has, so that the control, not the prompt, decides those: the prompt keeps the
colours.

    python -m sdonnx.models.controlnet --out build/controlnet            # ~20 min on 2 cores
    sdonnx export build/controlnet/controlnet build/controlnet/onnx
    python -m sdonnx.models.controlnet --evaluate build/controlnet/onnx   # the judge's report

The evaluation draws held-out scenes, takes the silhouette of one and the caption of another (so
the caption's position and shape words mostly contradict the control), and judges position, shape
and size against the control's scene, colour and background against the caption's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image

from sdonnx.config import config_from_args
from sdonnx.errors import InputError
from sdonnx.files import staged_folder
from sdonnx.models import CLIP_TOKENIZER
from sdonnx.models.draw import POSITIONS, SHAPES, Scene, caption, draw, sample_scene
from sdonnx.models.judge import accuracy, judge

EMBEDDED_SOURCE = Path(__file__).resolve().parent / "embedded" / "source"
# The hint network's widths (x8 down to the latent): a quarter of SD's (16, 32, 96, 256) at the top, as
# a silhouette needs little, and the file has to fit the embedded folder's size budget.
HINT_CHANNELS = (16, 32, 48, 64)


def silhouette(scene: Scene, size: int = 64) -> Image.Image:
    """The control image of a scene: its object in white on black, same geometry."""
    return draw(replace(scene, colour="white", background="black"), size)


@dataclass(frozen=True)
class ControlTrainConfig:
    """One training run; every field is the CLI flag of the same name."""

    out: Path
    base: Path = EMBEDDED_SOURCE
    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 2e-4
    drawings: int = 20000
    # The share of captions whose position and shape words are another scene's (the control wins).
    contradict: float = 0.3

    def __post_init__(self):
        for name in ("steps", "batch_size", "drawings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(name, getattr(self, name), "an int >= 1")
        if not self.learning_rate > 0:
            raise InputError("learning_rate", self.learning_rate, "a number > 0")
        if not 0 <= self.contradict <= 1:
            raise InputError("contradict", self.contradict, "a share in [0, 1]")
        for name in ("text_encoder", "unet", "vae"):
            if not (Path(self.base) / name / "config.json").is_file():
                raise InputError("base", str(self.base), f"a diffusers folder with {name}/config.json")


def _contradicting(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene's colours with another shape and position (where the shape fits)."""
    from sdonnx.models.draw import place

    shape = SHAPES[(SHAPES.index(scene.shape) + rng.integers(1, len(SHAPES))) % len(SHAPES)]
    position = POSITIONS[(POSITIONS.index(scene.position) + rng.integers(1, len(POSITIONS))) % len(POSITIONS)]
    return place(shape, scene.colour, scene.background, scene.size, position, rng, scene.scale)


def train(config: ControlTrainConfig) -> Path:
    """Train the ControlNet on the frozen base; returns OUT/controlnet (a ControlNetModel folder)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextModel

    from sdonnx.models.train import (
        CAPTION_DROPOUT, TrainConfig, _config_record, _loss_log, encode_drawings, eps_weights,
    )
    from sdonnx.runtime.tokenizer import ClipTokenizer

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 4)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(config.base)
    vae = AutoencoderKL.from_pretrained(base / "vae").float()
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").float().eval()
    unet = UNet2DConditionModel.from_pretrained(base / "unet").float().eval()
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS).train()
    scaling = vae.config.scaling_factor

    started = time.monotonic()
    drawing_config = TrainConfig(out=out, drawings=config.drawings)
    scenes, means, stds = encode_drawings(vae, drawing_config, rng)
    hints = torch.from_numpy(np.stack([np.asarray(silhouette(s).convert("L")) for s in scenes])[:, None])  # uint8
    encode_seconds = round(time.monotonic() - started, 1)
    tokenizer = ClipTokenizer.from_folder(CLIP_TOKENIZER, max_length=77)
    cumulative, weights = eps_weights(TrainConfig(out=out))  # the embedded model's own loss weighting

    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=0.0)
    started = time.monotonic()
    log, writer = _loss_log(out / "controlnet-loss.csv", ["step", "loss"])
    with log:
        progress = tqdm(range(1, config.steps + 1), desc="controlnet", unit="step")
        for step in progress:
            index = torch.from_numpy(rng.integers(len(scenes), size=config.batch_size))
            latents = (means[index] + stds[index] * torch.randn_like(stds[index])) * scaling
            words = []
            for i in index.tolist():
                scene = _contradicting(scenes[i], rng) if rng.random() < config.contradict else scenes[i]
                words.append("" if rng.random() < CAPTION_DROPOUT else caption(scene, rng))
            with torch.no_grad():
                states = text_encoder(torch.from_numpy(tokenizer(words))).last_hidden_state
            hint = (hints[index].float() / 255).expand(-1, 3, -1, -1)
            t = torch.randint(0, 1000, (config.batch_size,))
            noise = torch.randn_like(latents)
            a = cumulative[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            down, mid = net(noisy, t, states, hint, return_dict=False)
            predicted = unet(noisy, t, states, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample
            loss = (weights[t] * (predicted - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            writer.writerow([step, f"{loss.item():.6g}"])
            progress.set_postfix(loss=f"{loss.item():.4f}")
    report = {"config": _config_record(config), "encode_seconds": encode_seconds,
              "train_seconds": round(time.monotonic() - started, 1),
              "parameters": sum(p.numel() for p in net.parameters())}
    (out / "controlnet-report.json").write_text(json.dumps(report, indent=2) + "\n")
    with staged_folder(out / "controlnet", overwrite=True) as folder:
        net.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return out / "controlnet"


def control_prompts(n: int = 100, seed: int = 0) -> list[tuple[str, Image.Image, Scene]]:
    """n (caption, control image, expected scene) triples from held-out scenes: the caption of one
    scene, the silhouette of another; expected: the silhouette's geometry in the caption's colours."""
    rng = np.random.default_rng(seed)
    found = []
    while len(found) < n:
        words, geometry = sample_scene(rng, "heldout"), sample_scene(rng, "heldout")
        expected = replace(geometry, colour=words.colour, background=words.background)
        found.append((caption(words, rng, complete=True), silhouette(geometry), expected))
    return found


def evaluate(model: Path | None, control: str | Path, *, n: int = 100, steps: int | None = None,
             guidance: float | None = None, scale: float = 1.0, seed: int = 0, threads: int | None = None) -> dict:
    """The judge's accuracy per attribute on `control_prompts(n)`; also the share of captions whose
    position word contradicts the control."""
    from sdonnx.runtime.controlnet import Control
    from sdonnx.runtime.pipeline import Pipeline

    pipe = Pipeline.load(model, progress=False, **({"threads": threads} if threads else {}))
    triples = control_prompts(n, seed)
    started = time.monotonic()
    verdicts = [judge(pipe(prompt, steps=steps, guidance=guidance, seed=seed + i,
                           control=Control(control, image, scale=scale))[0])
                for i, (prompt, image, _) in enumerate(triples)]
    scores = accuracy(verdicts, [scene for _, _, scene in triples])
    contradicted = float(np.mean([scene.position not in prompt for prompt, _, scene in triples]))
    return {"accuracy": scores, "prompts": n, "contradicting_position": contradicted, "scale": scale,
            "seconds": round(time.monotonic() - started, 1)}


def parse_args(argv: list[str] | None = None) -> tuple[ControlTrainConfig | None, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m sdonnx.models.controlnet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the ControlNet, loss log and report")
    parser.add_argument("--base", type=Path, default=EMBEDDED_SOURCE, help="diffusers folder (default: embedded)")
    parser.add_argument("--evaluate", type=Path, metavar="CONTROLNET", help="judge this exported ControlNet instead")
    parser.add_argument("--model", type=Path, help="with --evaluate: the model folder (default: embedded)")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int)
    types = {int: int, float: float}
    for field in fields(ControlTrainConfig):
        if field.name not in ("out", "base"):
            parser.add_argument("--" + field.name.replace("_", "-"), type=types[type(field.default)],
                                default=field.default)
    args = parser.parse_args(argv)
    if args.evaluate is not None:
        return None, args
    if args.out is None:
        raise InputError("out", None, "a folder (or --evaluate CONTROLNET)")
    return config_from_args(ControlTrainConfig, args), args


def main(argv: list[str] | None = None) -> object:
    config, args = parse_args(argv)
    if config is not None:
        return train(config)
    result = evaluate(args.model, args.evaluate, n=args.prompts, scale=args.scale, seed=args.seed,
                      threads=args.threads)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
