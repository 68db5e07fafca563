"""SD's x4 upscaler at full size with seeded random weights: sdonnx against diffusers, side by side.

    python benchmarks/upscale_x4.py [--size 128] [--steps 4] [--threads 2] [--tile 64] \
        [--out benchmarks/results/upscale-x4-128]

stabilityai/stable-diffusion-x4-upscaler's architecture (its published U-Net and VAE configs, written
below; SD 2's OpenCLIP ViT-H text encoder from models/configs/sd2) is built with seeded random weights
in ~/.cache/sdonnx/x4-random and exported once. Then, each in a fresh process: diffusers'
StableDiffusionUpscalePipeline (fp32, CPU), sdonnx, and sdonnx with --low-memory, whose U-Net runs in
tiles of --tile low-res pixels, all upscaling the same SIZE x SIZE image 4x with the same seed, DDIM,
guidance 9, noise level 20. Reported: the upscale's time (load excluded), the load, peak RSS, and each
image's PSNR against diffusers'. Random weights say nothing about quality; they make the speed,
memory and parity of the real architecture measurable offline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from common import CACHE, machine, parse_or_work, peak_rss_gb, psnr, run_worker, write_report  # noqa: E402 (benchmarks/ is the script's folder)

UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[256, 512, 512, 1024], center_input_sample=False,
    cross_attention_dim=1024, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=7, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, num_class_embeds=1000,
    only_cross_attention=[True, True, True, False], out_channels=4, sample_size=128,
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512], down_block_types=["DownEncoderBlock2D"] * 3,
           in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
           sample_size=256, scaling_factor=0.08333, up_block_types=["UpDecoderBlock2D"] * 3)
SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)
PROMPT, SEED, GUIDANCE, NOISE_LEVEL = "a white cat sitting on a red sofa", 0, 9.0, 20
SOURCE = CACHE / "x4-random"


def build(out: Path = SOURCE, seed: int = 0) -> Path:
    """The x4 upscaler's diffusers folder with seeded random weights (~1.9 GB fp32); reused if complete."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdonnx.models import CLIP_TOKENIZER, CONFIGS
    from sdonnx.models.checkpoints import save_text_encoder

    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET).save_pretrained(tmp / "unet", safe_serialization=True)
    AutoencoderKL(**VAE).save_pretrained(tmp / "vae", safe_serialization=True)
    text = json.loads((CONFIGS / "sd2" / "text_encoder" / "config.json").read_text())
    save_text_encoder(CLIPTextModel(CLIPTextConfig.from_dict(text)), tmp / "text_encoder")
    DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  **SCHEDULE).save_pretrained(tmp / "scheduler")
    DDPMScheduler(clip_sample=False, variance_type="fixed_small", **SCHEDULE).save_pretrained(tmp / "low_res_scheduler")
    shutil.copytree(CLIP_TOKENIZER, tmp / "tokenizer")
    index = {"_class_name": "StableDiffusionUpscalePipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "low_res_scheduler": ["diffusers", "DDPMScheduler"],
             "max_noise_level": 350, "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "watermarker": [None, None]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(out)
    return out


def low_res_image(size: int):
    """A smooth test picture (random weights do not care what it shows)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(4 * y) * 0.5 + 0.5, x * y], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def worker(job: dict) -> dict:
    """One system's upscale in this (fresh) process; the image is saved as job["image"]."""
    import os

    started = time.perf_counter()
    image = low_res_image(job["size"])
    if job["system"] == "diffusers":
        import torch
        from diffusers import StableDiffusionUpscalePipeline

        torch.set_num_threads(job["threads"])
        pipe = StableDiffusionUpscalePipeline.from_pretrained(job["source"])
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter()
        with torch.no_grad():
            out = pipe(PROMPT, image=image, num_inference_steps=job["steps"], guidance_scale=GUIDANCE,
                       noise_level=NOISE_LEVEL, generator=torch.manual_seed(SEED)).images[0]
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
        from sdonnx.runtime import Pipeline

        low = job["system"] == "sdonnx-lowmem"
        pipe = Pipeline.load(job["model"], provider="cpu", threads=job["threads"], progress=False, low_memory=low)
        loaded = time.perf_counter()
        (out,) = pipe.upscale(PROMPT, image=image, steps=job["steps"], guidance=GUIDANCE, noise_level=NOISE_LEVEL,
                              seed=SEED, sampler="ddim", tile=job["tile"] if low else None)
    done = time.perf_counter()
    out.save(job["image"])
    return {"load_s": loaded - started, "run_s": done - loaded, "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="low-res side in pixels (out: 4x)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tile", type=int, default=64, help="the low-memory run's U-Net tile")
    args = parse_or_work(parser, worker)
    if args is None:
        return

    from sdonnx.export import ExportConfig, export_model

    source = build()
    model = CACHE / "x4-random-onnx"
    if not (model / "manifest.json").is_file():
        export_model(ExportConfig(source=str(source), out=model))
    scratch = CACHE / "x4-bench"
    scratch.mkdir(parents=True, exist_ok=True)
    results = {}
    for system in ("diffusers", "sdonnx", "sdonnx-lowmem"):
        job = {"system": system, "source": str(source), "model": str(model), "size": args.size, "steps": args.steps,
               "threads": args.threads, "tile": args.tile, "image": str(scratch / f"{system}.png")}
        results[system] = run_worker([sys.executable, __file__, "--worker"], job, system)
        print(system, results[system], flush=True)
    from PIL import Image

    reference = np.asarray(Image.open(scratch / "diffusers.png"))
    for system, result in results.items():
        result["psnr_vs_diffusers_db"] = psnr(reference, np.asarray(Image.open(scratch / f"{system}.png")))
    summary = {"machine": machine(), "size": args.size, "out_size": 4 * args.size, "steps": args.steps,
               "threads": args.threads, "tile": args.tile, "results": results}
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        base = results["diffusers"]["run_s"]
        write_report(
            args.out, summary,
            title=f"SD x4 upscaler, {args.size}x{args.size} -> {4 * args.size}x{4 * args.size}, {args.steps} DDIM "
            f"steps, guidance {GUIDANCE:g}, {args.threads} threads",
            notes="Random weights in the real architecture; each system in a fresh process; run = the upscale, load "
            "excluded; PSNR of the 8-bit image against diffusers' (inf: identical).",
            columns=["system", "run s", "s/step (incl. decode)", "vs diffusers", "load s", "peak RSS GB", "PSNR dB"],
            rows=[[system, f"{r['run_s']:.1f}", f"{r['run_s'] / args.steps:.1f}", f"{base / r['run_s']:.2f}x",
                   f"{r['load_s']:.1f}", f"{r['peak_rss_gb']:.2f}", f"{r['psnr_vs_diffusers_db']:.1f}"]
                  for system, r in results.items()])


if __name__ == "__main__":
    main()
