"""Training script of the embedded model, reproducible from a seed.

Stage "vae" trains an AutoencoderKL with Stable Diffusion's layout (x8 downsampling, 4 latent
channels) on drawings rendered on the fly, on crops around their shapes (the VAE is fully
convolutional, and a 32x32 crop costs a quarter of a 64x64 image), measures the round trip (encode -> decode) with
the judge and PSNR, and sets the VAE's scaling_factor to 1 / std of the latents, as SD's is.

Stage "unet" encodes `drawings` training-split drawings once with that VAE, then trains a
CLIPTextModel (real CLIP BPE vocabulary) and a UNet2DConditionModel together on them: epsilon
prediction under SD's scaled-linear schedule, min-SNR loss weighting, a caption freshly worded at
every step and dropped to "" one time in ten (for classifier-free guidance). A short position stage
comes first (`position_steps`, see train_unet): without it the model never learns position words.
It writes a complete diffusers folder, OUT/source, that `sdonnx export` turns into the runtime's ONNX form.

    python -m sdonnx.models.train --out build/embedded              # both stages
    python -m sdonnx.models.train --out build/embedded --stage unet # reuses OUT/vae

Each stage writes OUT/<stage>-loss.csv (one row per step; the position stage OUT/position-loss.csv)
and OUT/<stage>-report.json. torch, diffusers and transformers are imported inside the training
functions only, so that importing sdonnx.models stays torch-free. Threads: torch's default (all cores); set OMP_NUM_THREADS to share.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from sdonnx.config import config_from_args
from sdonnx.errors import InputError
from sdonnx.files import staged_folder
from sdonnx.models import CLIP_TOKENIZER
from sdonnx.models.checkpoints import save_text_encoder
from sdonnx.models.draw import POSITIONS, SPLITS, Scene, caption, draw, place, sample_scene
from sdonnx.models.judge import accuracy, judge
from sdonnx.runtime.images import to_images

STAGES = ("vae", "unet", "all")
# SD 1.x's training schedule; the exported manifest carries it to the runtime.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CAPTION_DROPOUT = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """One training run; every field is the CLI flag of the same name."""

    out: Path
    stage: str = "all"
    seed: int = 0
    image_size: int = 64
    vae_steps: int = 7000
    vae_batch_size: int = 16
    crop: int = 32
    vae_learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    # One group per GroupNorm: with a few channels per group, a flat colour normalizes to a sign
    # pattern and the decoder can no longer tell one palette colour from another.
    vae_norm_groups: int = 1
    eval_images: int = 200
    unet_steps: int = 12000
    unet_batch_size: int = 32
    unet_learning_rate: float = 1.5e-3
    unet_channels: tuple[int, ...] = (48, 96)
    text_hidden: int = 48
    text_layers: int = 3
    drawings: int = 20000
    snr_gamma: float = 5.0
    # The eps loss weighs an x0 error by SNR, ~0.005 at t=999: the high-noise steps that decide the
    # layout (where the object goes) would barely teach. This floor on the x0 weight makes them count.
    x0_weight_floor: float = 0.05
    # Decay of an exponential moving average of the text encoder's and U-Net's weights, which are
    # what gets saved; 0 saves the last step's weights.
    ema_decay: float = 0.0
    # The position stage before the full task (see train_unet); 0 skips it.
    position_steps: int = 2000
    position_drawings: int = 2000

    def __post_init__(self):
        if self.stage not in STAGES:
            raise InputError("stage", self.stage, f"one of {', '.join(STAGES)}")
        for name in ("vae_steps", "vae_batch_size", "eval_images", "unet_steps", "unet_batch_size", "drawings",
                     "vae_norm_groups", "text_layers", "position_drawings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(name, getattr(self, name), "an int >= 1")
        if not isinstance(self.position_steps, int) or self.position_steps < 0:
            raise InputError("position_steps", self.position_steps, "an int >= 0 (0 skips the position stage)")
        if self.image_size < 16 or self.image_size % 8:
            raise InputError("image_size", self.image_size, "a multiple of 8, >= 16 (the VAE downsamples x8)")
        if len(self.vae_channels) != 4 or any(c < 8 or c % self.vae_norm_groups for c in self.vae_channels):
            expected = f"4 channel counts (SD's four levels), each >= 8 and a multiple of vae_norm_groups"
            raise InputError("vae_channels", self.vae_channels, expected)
        if not self.unet_channels or any(c < 8 or c % 8 for c in self.unet_channels):
            raise InputError("unet_channels", self.unet_channels, "channel counts per level, multiples of 8")
        if self.text_hidden < 8 or self.text_hidden % 4:
            raise InputError("text_hidden", self.text_hidden, "a multiple of 4 (4 attention heads), >= 8")
        if self.crop and (self.crop < 16 or self.crop % 8 or self.crop > self.image_size):
            raise InputError("crop", self.crop, f"0 (whole images) or a multiple of 8 in [16, {self.image_size}]")
        for name in ("vae_learning_rate", "unet_learning_rate"):
            if not getattr(self, name) > 0:
                raise InputError(name, getattr(self, name), "a number > 0")
        for name in ("kl_weight", "snr_gamma", "x0_weight_floor"):
            if not getattr(self, name) >= 0:
                raise InputError(name, getattr(self, name), "a number >= 0 (0 disables it)")
        if not 0 <= self.ema_decay < 1:
            raise InputError("ema_decay", self.ema_decay, "a number in [0, 1) (0 disables the average)")


def render_batch(
    rng: np.random.Generator, n: int, size: int = 64, split: str = "train", sample: Callable = sample_scene
) -> tuple[np.ndarray, list[Scene]]:
    """n random drawings as float32 [n, 3, size, size] in [-1, 1], and their scenes (from `sample(rng, split)`)."""
    scenes = [sample(rng, split) for _ in range(n)]
    pixels = np.stack([np.asarray(draw(scene, size), dtype=np.float32) for scene in scenes])
    return pixels.transpose(0, 3, 1, 2) / 127.5 - 1, scenes


def object_crops(pixels: np.ndarray, scenes: list[Scene], crop: int, rng: np.random.Generator) -> np.ndarray:
    """A crop x crop window of each image in [n, 3, H, W] around its shape; the whole batch when crop is 0.

    The window's centre is the shape's centroid moved by up to a quarter window each way, clipped to
    the image: every crop shows the shape's edges, which random crops often miss, and small shapes
    (two latent pixels wide) are what the VAE learns last.
    """
    if not crop:
        return pixels
    n, _, height, width = pixels.shape
    jitter = rng.uniform(-crop / 4, crop / 4, size=(n, 2))
    centres = np.array([(scene.y * height, scene.x * width) for scene in scenes]) + jitter
    corners = np.clip(np.rint(centres - crop / 2).astype(int), 0, [height - crop, width - crop])
    return np.stack([image[:, t : t + crop, l : l + crop] for image, (t, l) in zip(pixels, corners)])


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
        norm_num_groups=config.vae_norm_groups,
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


def _loss_log(path: Path, columns: list[str]):
    """A CSV writer, line-buffered so the log can be followed while training runs."""
    log = open(path, "w", newline="", buffering=1)
    writer = csv.writer(log)
    writer.writerow(columns)
    return log, writer


def _config_record(config: TrainConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


def train_vae(config: TrainConfig) -> Path:
    """Train, evaluate and save the VAE; returns OUT/vae."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.vae_learning_rate, total_steps=config.vae_steps
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log, writer = _loss_log(out / "vae-loss.csv", ["step", "loss", "reconstruction", "kl", "learning_rate"])
    with log:
        progress = tqdm(range(1, config.vae_steps + 1), desc="vae", unit="step")
        vae.train()
        for step in progress:
            batch, scenes = render_batch(rng, config.vae_batch_size, config.image_size)
            pixels = torch.from_numpy(object_crops(batch, scenes, config.crop, rng))
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
    report.update(config=_config_record(config), train_seconds=train_seconds)
    with staged_folder(out / "vae", overwrite=True) as folder:
        vae.save_pretrained(folder, safe_serialization=True)
    (out / "vae-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out / "vae"


def build_text_encoder(config: TrainConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = config.text_hidden
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet(config: TrainConfig):
    from diffusers import UNet2DConditionModel

    levels = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.image_size // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=config.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=config.text_hidden,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def encode_drawings(vae, config: TrainConfig, rng: np.random.Generator, count: int | None = None,
                    sample: Callable = sample_scene) -> tuple:
    """`count` (default: config.drawings) training-split scenes and their latent distributions (mean, std),
    [n, 4, h/8, w/8] each."""
    import torch

    count = config.drawings if count is None else count
    scenes, means, stds = [], [], []
    vae.eval()
    with torch.no_grad():
        for start in range(0, count, 256):
            pixels, batch = render_batch(rng, min(256, count - start), config.image_size, sample=sample)
            posterior = vae.encode(torch.from_numpy(pixels)).latent_dist
            scenes += batch
            means.append(posterior.mean)
            stds.append(posterior.std)
    return scenes, torch.cat(means), torch.cat(stds)


def write_source(folder: Path, text_encoder, unet, vae) -> None:
    """A diffusers Stable Diffusion folder: the three models in fp16, the CLIP tokenizer, SD's scheduler.

    fp16 halves the committed weights; `sdonnx export` loads them back as fp32.
    """
    import torch
    from diffusers import EulerDiscreteScheduler

    save_text_encoder(text_encoder.to(torch.float16), folder / "text_encoder")
    for name, module in (("unet", unet), ("vae", vae)):
        module.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
    shutil.copytree(CLIP_TOKENIZER, folder / "tokenizer")
    # "trailing" spacing starts sampling at t=999, pure noise, as the model was trained to expect.
    EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="trailing").save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def alphas_cumprod():
    """SCHEDULE's cumulative alphas, a torch float32 tensor [1000]."""
    import torch

    betas = torch.linspace(SCHEDULE["beta_start"] ** 0.5, SCHEDULE["beta_end"] ** 0.5, 1000) ** 2
    return torch.cumprod(1 - betas, 0)


def eps_weights(config: TrainConfig):
    """(SCHEDULE's cumulative alphas, the eps loss's weight per timestep), torch float32 [1000] each.

    The weights are those of the x0 error divided by SNR: min-SNR-gamma (Hang et al. 2023) caps the
    low-noise end, config.x0_weight_floor lifts the high-noise end.
    """
    cumulative = alphas_cumprod()
    snr = cumulative / (1 - cumulative)
    x0_weights = snr.clamp(max=config.snr_gamma) if config.snr_gamma else snr
    return cumulative, (x0_weights + config.x0_weight_floor) / snr


def update_average(averaged, parameters, decay: float) -> None:
    """Move the parameters of the modules `averaged` towards `parameters` (same order): an EMA step."""
    import torch

    with torch.no_grad():
        for slow, fast in zip((p for module in averaged for p in module.parameters()), parameters):
            slow.lerp_(fast, 1 - decay)


def position_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """The position stage's drawing: one large red square on blue, at a random position."""
    return place("square", "red", "blue", "large", POSITIONS[rng.integers(len(POSITIONS))], rng)


def fit(text_encoder, unet, data: tuple, words: Callable, config: TrainConfig, steps: int, scaling: float,
        rng: np.random.Generator, log: Path) -> None:
    """Train text encoder and U-Net together for `steps` on encoded drawings `data` (scenes, means, stds),
    captioning scene s as words(s, rng); one AdamW + one-cycle schedule; a loss row per step in `log`.

    Epsilon prediction under SCHEDULE, min-SNR weights with the x0-weight floor, captions dropped
    to "" one time in ten. Noise comes from torch's global generator, batches and captions from rng.
    """
    import torch
    from tqdm import tqdm

    from sdonnx.runtime.tokenizer import ClipTokenizer

    scenes, means, stds = data
    tokenizer = ClipTokenizer.from_folder(CLIP_TOKENIZER, max_length=77)
    parameters = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.unet_learning_rate, total_steps=steps, pct_start=0.05
    )
    cumulative, weights = eps_weights(config)
    averaged = (copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()) if config.ema_decay else None
    if averaged:
        for module in averaged:
            module.requires_grad_(False)

    handle, writer = _loss_log(log, ["step", "loss", "learning_rate"])
    with handle:
        progress = tqdm(range(1, steps + 1), desc=log.stem.removesuffix("-loss"), unit="step")
        text_encoder.train()
        unet.train()
        for step in progress:
            index = torch.from_numpy(rng.integers(len(scenes), size=config.unet_batch_size))
            latents = (means[index] + stds[index] * torch.randn_like(stds[index])) * scaling
            prompts = ["" if rng.random() < CAPTION_DROPOUT else words(scenes[i], rng) for i in index.tolist()]
            states = text_encoder(torch.from_numpy(tokenizer(prompts))).last_hidden_state
            t = torch.randint(0, 1000, (config.unet_batch_size,))
            noise = torch.randn_like(latents)
            a = cumulative[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            error = (unet(noisy, t, states).sample - noise).pow(2).mean(dim=(1, 2, 3))
            loss = (weights[t] * error).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            if averaged:
                update_average(averaged, parameters, config.ema_decay)
            rate = schedule.get_last_lr()[0]
            schedule.step()
            writer.writerow([step, f"{loss.item():.6g}", f"{rate:.6g}"])
            progress.set_postfix(loss=f"{loss.item():.4f}")
    if averaged:
        text_encoder.load_state_dict(averaged[0].state_dict())
        unet.load_state_dict(averaged[1].state_dict())


def train_unet(config: TrainConfig) -> Path:
    """Train the text encoder and U-Net on latents of OUT/vae; returns OUT/source (a diffusers folder).

    With position_steps, a position stage comes first: the same models learn from drawings that
    differ only in where the object is (`position_scene`), captioned by the position word alone,
    before the full task starts from those weights. Trained on the full task alone, the model ignores
    position words entirely (the object lands where the starting noise leans); after the position
    stage it keeps them.
    """
    import torch
    from diffusers import AutoencoderKL

    out = Path(config.out)
    if not (out / "vae" / "config.json").is_file():
        raise InputError("out", str(out), "a folder holding vae/ from the vae stage (run --stage vae first)")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 1)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    scaling = vae.config.scaling_factor
    started = time.monotonic()
    stages = [(encode_drawings(vae, config, rng), caption, config.unet_steps, rng, out / "unet-loss.csv")]
    if config.position_steps:
        position_rng = np.random.default_rng(config.seed + 3)
        data = encode_drawings(vae, config, position_rng, config.position_drawings, position_scene)
        stages.insert(0, (data, lambda scene, _: scene.position, config.position_steps, position_rng,
                          out / "position-loss.csv"))
    encode_seconds = round(time.monotonic() - started, 1)
    text_encoder, unet = build_text_encoder(config), build_unet(config)

    started = time.monotonic()
    for data, words, steps, stage_rng, log in stages:
        fit(text_encoder, unet, data, words, config, steps, scaling, stage_rng, log)
    report = {
        "config": _config_record(config),
        "encode_seconds": encode_seconds,
        "train_seconds": round(time.monotonic() - started, 1),
        "parameters": {
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            "unet": sum(p.numel() for p in unet.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
        },
    }
    with staged_folder(out / "source", overwrite=True) as folder:
        write_source(folder, text_encoder, unet, vae)
    (out / "unet-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out / "source"


def train_all(config: TrainConfig) -> Path:
    train_vae(config)
    return train_unet(config)


def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(","))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m sdonnx.models.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights, loss logs and reports")
    types = {int: int, float: float, str: str}
    for field in fields(TrainConfig):
        if field.name == "out":
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.name == "stage":
            parser.add_argument(flag, choices=STAGES, default=field.default)
        elif field.name.endswith("_channels"):
            parser.add_argument(flag, type=_channels, default=field.default, help="comma-separated channel counts")
        else:
            parser.add_argument(flag, type=types[type(field.default)], default=field.default)
    return config_from_args(TrainConfig, parser.parse_args(argv))


STAGE_FUNCTIONS = {"vae": train_vae, "unet": train_unet, "all": train_all}


def main(argv: list[str] | None = None) -> Path:
    config = parse_args(argv)
    return STAGE_FUNCTIONS[config.stage](config)


if __name__ == "__main__":
    main()
