"""Latent consistency distillation of the embedded model: a U-Net that draws in 2-8 steps (LCM).

Luo et al. 2023, as diffusers' train_lcm_distill_lora_sd_wds.py does it without LoRA or a guidance
embedding: the student starts as a copy of the teacher U-Net; at a random point t_n of a 50-step
DDIM grid, the teacher (with classifier-free guidance at `guidance`) takes one DDIM step from the
noised latent back to t_(n-1), and the student's consistency-parametrized prediction at t_n is
pulled (pseudo-Huber loss) towards an EMA copy's prediction at t_(n-1). The guidance is baked in:
sample the result with `--sampler lcm --guidance 1` (one U-Net call per step, no unconditional half).
The text encoder and the VAE are the teacher's, unchanged.

    python -m sdonnx.models.distill --out build/lcm             # teacher: the embedded source weights
    sdonnx export build/lcm/source build/lcm/onnx
    sdonnx generate "a red circle on a blue background" -m build/lcm/onnx --sampler lcm --steps 4 --guidance 1

Writes OUT/source (a diffusers folder), OUT/distill-loss.csv and OUT/distill-report.json. With
`--lora-rank R` the teacher stays frozen and a rank-R LoRA learns the consistency model instead
(LCM-LoRA, Luo et al. 2023b): OUT/lcm.safetensors, applied with `<lora:lcm:1>`.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from sdonnx.config import config_from_args
from sdonnx.errors import InputError
from sdonnx.files import staged_folder
from sdonnx.models import CLIP_TOKENIZER
from sdonnx.models.draw import caption
from sdonnx.models.lora import TARGETS, add_adapters, save_kohya
from sdonnx.models.train import (
    SCHEDULE, TrainConfig, _config_record, _loss_log, alphas_cumprod, encode_drawings, update_average, write_source,
)
from sdonnx.runtime.denoiser import LCM_SIGMA_DATA
from sdonnx.runtime.schedules import LCM_ORIGINAL_STEPS, LCM_TIMESTEP_SCALING

EMBEDDED_SOURCE = Path(__file__).resolve().parent / "embedded" / "source"
HUBER_C = 0.001  # the pseudo-Huber loss's c (LCM's default)


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run; every field is the CLI flag of the same name."""

    out: Path
    teacher: Path = EMBEDDED_SOURCE
    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-4
    # The teacher's classifier-free guidance scale (diffusers' convention: 1 = none), baked into the student.
    guidance: float = 5.0
    ema_decay: float = 0.95
    drawings: int = 20000
    # > 0: train a LoRA of this rank on the frozen teacher (LCM-LoRA) instead of the whole U-Net, and
    # write OUT/lcm.safetensors (kohya layout) instead of OUT/source.
    lora_rank: int = 0
    # Comma-separated kinds of layer the LoRA adapts (models/lora.py TARGETS).
    lora_targets: str = "attention,ff,resnets"

    def __post_init__(self):
        for name in ("steps", "batch_size", "drawings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(name, getattr(self, name), "an int >= 1")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise InputError("lora_rank", self.lora_rank, "an int >= 0 (0: distill the whole U-Net)")
        unknown = sorted(set(self.lora_targets.split(",")) - set(TARGETS))
        if unknown or not self.lora_targets:
            raise InputError("lora_targets", self.lora_targets, f"a comma-separated list of {', '.join(TARGETS)}")
        if not self.learning_rate > 0:
            raise InputError("learning_rate", self.learning_rate, "a number > 0")
        if not self.guidance >= 1:
            raise InputError("guidance", self.guidance, "a number >= 1 (1 distills the unguided teacher)")
        if not 0 <= self.ema_decay < 1:
            raise InputError("ema_decay", self.ema_decay, "a number in [0, 1)")
        for name in ("text_encoder", "unet", "vae"):
            if not (Path(self.teacher) / name / "config.json").is_file():
                raise InputError("teacher", str(self.teacher), f"a diffusers folder with {name}/config.json")


def boundary_scalings(t):
    """(c_skip, c_out) at integer timesteps t, as the runtime's Denoiser applies them: c_skip * x_t + c_out * x0."""
    scaled = t.float() * LCM_TIMESTEP_SCALING
    return LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2), scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5


def distill(config: DistillConfig) -> Path:
    """Distill the teacher's U-Net; returns OUT/source."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextModel

    from sdonnx.runtime.tokenizer import ClipTokenizer

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 2)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_path = Path(config.teacher)
    vae = AutoencoderKL.from_pretrained(teacher_path / "vae").float()
    text_encoder = CLIPTextModel.from_pretrained(teacher_path / "text_encoder").float().eval()
    teacher = UNet2DConditionModel.from_pretrained(teacher_path / "unet").float().eval()
    student = copy.deepcopy(teacher).train()
    kinds = tuple(config.lora_targets.split(","))
    adapters = add_adapters(student, config.lora_rank, kinds=kinds) if config.lora_rank else None
    target = copy.deepcopy(student).eval()
    for module in (vae, text_encoder, teacher, target):
        module.requires_grad_(False)
    trained = [p for p in student.parameters() if p.requires_grad]
    scaling = vae.config.scaling_factor

    started = time.monotonic()
    drawing_config = TrainConfig(out=out, drawings=config.drawings)
    scenes, means, stds = encode_drawings(vae, drawing_config, rng)
    encode_seconds = round(time.monotonic() - started, 1)
    tokenizer = ClipTokenizer.from_folder(CLIP_TOKENIZER, max_length=77)
    with torch.no_grad():
        empty = text_encoder(torch.from_numpy(tokenizer([""]))).last_hidden_state

    cumulative = alphas_cumprod()
    stride = SCHEDULE["num_train_timesteps"] // LCM_ORIGINAL_STEPS
    grid = torch.arange(1, LCM_ORIGINAL_STEPS + 1) * stride - 1  # LCMScheduler's 50 original timesteps

    def x0_from_eps(x, eps, a):
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0)
    started = time.monotonic()
    log, writer = _loss_log(out / "distill-loss.csv", ["step", "loss"])
    with log:
        progress = tqdm(range(1, config.steps + 1), desc="distill", unit="step")
        for step in progress:
            n = config.batch_size
            index = torch.from_numpy(rng.integers(len(scenes), size=n))
            latents = (means[index] + stds[index] * torch.randn_like(stds[index])) * scaling
            with torch.no_grad():
                states = text_encoder(
                    torch.from_numpy(tokenizer([caption(scenes[i], rng) for i in index.tolist()]))
                ).last_hidden_state
            t = grid[torch.from_numpy(rng.integers(LCM_ORIGINAL_STEPS, size=n))]
            t_prev = (t - stride).clamp(min=0)
            a = cumulative[t].view(-1, 1, 1, 1)
            a_prev = cumulative[t_prev].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * torch.randn_like(latents)

            skip, out_scale = (s.view(-1, 1, 1, 1) for s in boundary_scalings(t))
            prediction = skip * noisy + out_scale * x0_from_eps(noisy, student(noisy, t, states).sample, a)

            with torch.no_grad():
                eps_uncond, eps_cond = teacher(
                    torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([empty.expand(n, -1, -1), states])
                ).sample.chunk(2)
                eps = eps_uncond + config.guidance * (eps_cond - eps_uncond)
                # One DDIM step of the guided teacher, t -> t_prev.
                previous = a_prev.sqrt() * x0_from_eps(noisy, eps, a) + (1 - a_prev).sqrt() * eps
                skip, out_scale = (s.view(-1, 1, 1, 1) for s in boundary_scalings(t_prev))
                goal = skip * previous + out_scale * x0_from_eps(previous, target(previous, t_prev, states).sample,
                                                                 a_prev)
            loss = (((prediction - goal) ** 2 + HUBER_C**2).sqrt() - HUBER_C).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            update_average([target], list(student.parameters()), config.ema_decay)
            writer.writerow([step, f"{loss.item():.6g}"])
            progress.set_postfix(loss=f"{loss.item():.4f}")
    report = {
        "config": _config_record(config),
        "encode_seconds": encode_seconds,
        "train_seconds": round(time.monotonic() - started, 1),
    }
    (out / "distill-report.json").write_text(json.dumps(report, indent=2) + "\n")
    # The EMA copy is the consistency model LCM ships (the student's noisier weights are discarded).
    if adapters is not None:
        ema = {name: target.get_submodule(name) for name in adapters}
        return save_kohya(ema, out / "lcm.safetensors")
    with staged_folder(out / "source", overwrite=True) as folder:
        write_source(folder, text_encoder, target, vae)
    return out / "source"


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    parser = argparse.ArgumentParser(prog="python -m sdonnx.models.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights, loss log and report")
    parser.add_argument("--teacher", type=Path, default=EMBEDDED_SOURCE, help="diffusers folder (default: embedded)")
    types = {int: int, float: float, str: str}
    for field in fields(DistillConfig):
        if field.name not in ("out", "teacher"):
            parser.add_argument("--" + field.name.replace("_", "-"), type=types[type(field.default)],
                                default=field.default)
    return config_from_args(DistillConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> Path:
    return distill(parse_args(argv))


if __name__ == "__main__":
    main()
