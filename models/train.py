"""Training script of the embedded model, stage by stage, reproducible from a seed.

Stage "vae" trains an AutoencoderKL with Stable Diffusion's layout (x8 downsampling, 4 latent
channels) on drawings rendered on the fly (optionally on random crops of them: the VAE is fully
convolutional, and a 32x32 crop costs a quarter of a 64x64 image), then measures the round trip
(encode -> decode) with the judge and PSNR, and sets the VAE's scaling_factor to 1 / std of the
latents, as SD's is.

    python -m sdonnx.models.train --stage vae --steps 3000 --seed 0 --out build/embedded

writes OUT/vae/ (diffusers format, safetensors), OUT/vae-loss.csv (one row per step) and
OUT/vae-report.json. torch and diffusers are imported inside the training functions only, so that
importing sdonnx.models stays torch-free.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from sdonnx.errors import InputError
from sdonnx.models.draw import SPLITS, Scene, draw, sample_scene
from sdonnx.models.judge import accuracy, judge
from sdonnx.runtime.images import to_images

STAGES = ("vae",)


@dataclass(frozen=True)
class TrainConfig:
    """One training run; every field is the CLI flag of the same name."""

    out: Path
    stage: str = "vae"
    steps: int = 3000
    seed: int = 0
    batch_size: int = 16
    image_size: int = 64
    crop: int = 0
    learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)
    eval_images: int = 200

    def __post_init__(self):
        if self.stage not in STAGES:
            raise InputError("stage", self.stage, f"one of {', '.join(STAGES)}")
        for name in ("steps", "batch_size", "eval_images"):
            if getattr(self, name) < 1:
                raise InputError(name, getattr(self, name), "an int >= 1")
        if self.image_size < 16 or self.image_size % 8:
            raise InputError("image_size", self.image_size, "a multiple of 8, >= 16 (the VAE downsamples x8)")
        if len(self.vae_channels) != 4 or any(c < 8 or c % 8 for c in self.vae_channels):
            raise InputError("vae_channels", self.vae_channels, "4 channel counts, multiples of 8 (SD's four levels)")
        if self.crop and (self.crop < 16 or self.crop % 8 or self.crop > self.image_size):
            raise InputError("crop", self.crop, f"0 (whole images) or a multiple of 8 in [16, {self.image_size}]")
        if not self.learning_rate > 0 or not self.kl_weight >= 0:
            raise InputError("learning_rate, kl_weight", (self.learning_rate, self.kl_weight), "lr > 0, kl_weight >= 0")


def render_batch(
    rng: np.random.Generator, n: int, size: int = 64, split: str = "train"
) -> tuple[np.ndarray, list[Scene]]:
    """n random drawings as float32 [n, 3, size, size] in [-1, 1], and their scenes."""
    scenes = [sample_scene(rng, split) for _ in range(n)]
    pixels = np.stack([np.asarray(draw(scene, size), dtype=np.float32) for scene in scenes])
    return pixels.transpose(0, 3, 1, 2) / 127.5 - 1, scenes


def random_crops(pixels: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop x crop window of each image in [n, 3, H, W]; the whole batch when crop is 0."""
    if not crop:
        return pixels
    n, _, height, width = pixels.shape
    tops, lefts = rng.integers(0, height - crop + 1, n), rng.integers(0, width - crop + 1, n)
    return np.stack([image[:, t : t + crop, l : l + crop] for image, t, l in zip(pixels, tops, lefts)])


def build_vae(config: TrainConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=config.image_size,
    )


def evaluate_vae(vae, config: TrainConfig) -> dict:
    """Round trip of eval_images held-apart drawings (both splits): judge accuracy, PSNR, latent std."""
    import torch

    rng = np.random.default_rng(config.seed + 1_000_003)
    half = math.ceil(config.eval_images / 2)
    batches = [render_batch(rng, half, config.image_size, split) for split in SPLITS]
    pixels = np.concatenate([b[0] for b in batches])[: config.eval_images]
    scenes = [s for b in batches for s in b[1]][: config.eval_images]
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(pixels)).latent_dist.mode()
        decoded = vae.decode(latents).sample.clamp(-1, 1).numpy()
    mse = float(np.mean((decoded - pixels) ** 2))
    return {
        # Pixels span 2 in [-1, 1], so the peak signal is 2.
        "psnr_db": 10 * math.log10(4 / mse) if mse > 0 else math.inf,
        "judge_accuracy": accuracy([judge(image) for image in to_images(decoded)], scenes),
        "latent_std": float(latents.std()),
        "images": len(scenes),
    }


def train_vae(config: TrainConfig) -> Path:
    """Train, evaluate and save the VAE; returns OUT/vae. Nothing lands at OUT/vae until it is complete."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=config.steps)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Line-buffered, so the log can be followed while training runs.
    with open(out / "vae-loss.csv", "w", newline="", buffering=1) as log:
        writer = csv.writer(log)
        writer.writerow(["step", "loss", "reconstruction", "kl", "learning_rate"])
        progress = tqdm(range(1, config.steps + 1), desc="vae", unit="step")
        vae.train()
        for step in progress:
            batch = render_batch(rng, config.batch_size, config.image_size)[0]
            pixels = torch.from_numpy(random_crops(batch, config.crop, rng))
            posterior = vae.encode(pixels).latent_dist
            reconstruction = torch.nn.functional.mse_loss(vae.decode(posterior.sample()).sample, pixels)
            # KL per pixel value, so that kl_weight means the same at any crop or image size.
            kl = posterior.kl().mean() / pixels[0].numel()
            loss = reconstruction + config.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rate = schedule.get_last_lr()[0]
            schedule.step()
            writer.writerow([step, *(f"{v:.6g}" for v in (loss.item(), reconstruction.item(), kl.item(), rate))])
            progress.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = round(time.monotonic() - started, 1)
    report = evaluate_vae(vae, config)
    vae.register_to_config(scaling_factor=1 / report["latent_std"])
    report.update(config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
                  train_seconds=train_seconds)
    partial = out / "vae.partial"
    shutil.rmtree(partial, ignore_errors=True)
    vae.save_pretrained(partial, safe_serialization=True)
    shutil.rmtree(out / "vae", ignore_errors=True)
    partial.rename(out / "vae")
    (out / "vae-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out / "vae"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name != "out"}
    parser = argparse.ArgumentParser(prog="python -m sdonnx.models.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights, loss log and report")
    parser.add_argument("--stage", choices=STAGES, default=defaults["stage"])
    parser.add_argument("--steps", type=int, default=defaults["steps"])
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--image-size", type=int, default=defaults["image_size"])
    parser.add_argument("--crop", type=int, default=defaults["crop"], help="random crops of this side; 0: whole images")
    parser.add_argument("--learning-rate", type=float, default=defaults["learning_rate"], help="one-cycle peak")
    parser.add_argument("--kl-weight", type=float, default=defaults["kl_weight"])
    parser.add_argument("--vae-channels", type=lambda s: tuple(int(c) for c in s.split(",")),
                        default=defaults["vae_channels"], help="four comma-separated channel counts")
    parser.add_argument("--eval-images", type=int, default=defaults["eval_images"])
    return TrainConfig(**vars(parser.parse_args(argv)))


STAGE_FUNCTIONS = {"vae": train_vae}


def main(argv: list[str] | None = None) -> Path:
    config = parse_args(argv)
    return STAGE_FUNCTIONS[config.stage](config)


if __name__ == "__main__":
    main()
