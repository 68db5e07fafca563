"""Quantization report: every recipe side by side with fp32, in one run (issue #6).

    python benchmarks/quantize_report.py --out benchmarks/results/quantize [--sd15 /tmp/sd15-onnx]
        [--recipes fp16,int8,int8-static,int8-static-a16,int4,mixed] [--prompts 200] [--repeats 1]

For each model (the embedded one, and with --sd15 an sdonnx export of the full-size SD 1.5
architecture) the variants are made once with `sdonnx.quantize` under --work and reused when their
manifest names the same recipe. Every measurement runs in a fresh process of this script
(`--worker`), so load time and peak RSS are the variant's own; runs are interleaved
(fp32, r1, r2, ..., fp32, r1, ...) over --repeats so fp32 shares the machine's conditions.

Measured per variant: U-Net file size, session load time, median U-Net call time (one call per step,
CFG batched), end-to-end generation time, peak RSS; quality against the fp32 variant with the same
seeds: on the embedded model, the judge's accuracy per attribute (trained and held-out prompts) and
the PSNR of each image; on SD 1.5 at --size, the PSNR of the final image and of the U-Net's output at
a few timesteps on fixed inputs. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import SD15_PROMPT, folder_mb, machine, make_variant, peak_rss_gb, psnr, run_worker

TIMESTEPS = (999, 500, 100)


# --- worker: one variant, one fresh process --------------------------------------------------------


def worker(job: dict) -> dict:
    """Load the variant, generate, time it; images and U-Net outputs go to job['dump'] as .npy."""
    import sdonnx
    from sdonnx.models.draw import evaluation_prompts

    started = time.perf_counter()
    pipe = sdonnx.Pipeline.load(job["model"], provider="cpu", progress=False, threads=job["threads"])
    load_s = time.perf_counter() - started
    unet = pipe.model.sessions["unet"]
    calls: list[float] = []
    run = unet.run

    def timed_run(**feeds):
        t0 = time.perf_counter()
        out = run(**feeds)
        calls.append(time.perf_counter() - t0)
        return out

    unet.run = timed_run
    if job["kind"] == "embedded":
        prompts = [p for p, _ in evaluation_prompts(job["prompts"])]
        size = None
    else:
        prompts, size = [SD15_PROMPT], job["size"]
    started = time.perf_counter()
    images = [np.asarray(pipe(p, seed=i, steps=job["steps"], guidance=job["guidance"], height=size, width=size)[0])
              for i, p in enumerate(prompts)]
    e2e_s = (time.perf_counter() - started) / len(prompts)
    dump = Path(job["dump"])
    dump.mkdir(parents=True, exist_ok=True)
    np.save(dump / "images.npy", np.stack(images))
    if job["kind"] == "sd15":
        np.save(dump / "unet.npy", unet_outputs(run, pipe.manifest, job["size"]))
    return {"load_s": load_s, "unet_call_s": statistics.median(calls), "e2e_s": e2e_s, "peak_rss_gb": peak_rss_gb()}


def unet_outputs(run, manifest, size: int) -> np.ndarray:
    """The U-Net's output at TIMESTEPS on fixed seeded inputs (CFG batch of 2), stacked."""
    rng = np.random.default_rng(0)
    latent = size // manifest.vae_downsample
    sample = rng.standard_normal((2, manifest.latent_channels, latent, latent), dtype=np.float32)
    states = rng.standard_normal((2, manifest.tokenizer_max_length, manifest.cross_attention_dim), dtype=np.float32)
    spec = manifest.graphs["unet"].inputs
    timestep = next(s for s in spec if s.name == "timestep")
    outs = []
    for t in TIMESTEPS:
        shape = [2] * len(timestep.shape)
        feeds = {"sample": sample, "encoder_hidden_states": states,
                 "timestep": np.full(shape, t, dtype=timestep.dtype)}
        feeds = {k: v.astype(next(s.dtype for s in spec if s.name == k)) for k, v in feeds.items()}
        outs.append(run(**feeds)["out_sample"].astype(np.float32))
    return np.stack(outs)


# --- parent: variants, interleaved runs, quality, the table ----------------------------------------


def quality(kind: str, dump: Path, reference: Path, prompts: int) -> dict:
    """Quality of a variant's dumped outputs against fp32's."""
    images, ref = np.load(dump / "images.npy"), np.load(reference / "images.npy")
    image_psnr = [psnr(r, i, 255) for r, i in zip(ref, images)]
    out = {"psnr_mean_db": float(np.mean(image_psnr)), "psnr_min_db": float(np.min(image_psnr))}
    if kind == "embedded":
        from PIL import Image

        from sdonnx.models.draw import evaluation_prompts
        from sdonnx.models.judge import accuracy, judge

        scenes = [scene for _, scene in evaluation_prompts(prompts)]
        verdicts = [judge(Image.fromarray(image)) for image in images]
        half = len(scenes) // 2
        out["trained"] = accuracy(verdicts[:half], scenes[:half])
        out["heldout"] = accuracy(verdicts[half:], scenes[half:])
    else:
        unet, ref_unet = np.load(dump / "unet.npy"), np.load(reference / "unet.npy")
        out["unet_psnr_db"] = {
            t: psnr(r, u, float(r.max() - r.min())) for t, r, u in zip(TIMESTEPS, ref_unet, unet)
        }
    return out


def training_captions(path: Path, n: int = 32, seed: int = 0) -> Path:
    """n captions of training-split drawings, one per line: the embedded model's calibration prompts."""
    from sdonnx.models.draw import caption, sample_scene

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(caption(sample_scene(rng), rng) for _ in range(n)) + "\n")
    return path


def measure(kind: str, model: Path, args: argparse.Namespace) -> list[dict]:
    work = args.work / kind
    # Static recipes calibrate on prompts like the model's own: its training captions for the
    # embedded model (never the evaluation prompts), sdonnx's default photo prompts for SD 1.5.
    prompts = training_captions(work / "calibration.txt") if kind == "embedded" else None
    variants = {"fp32": model} | {r: make_variant(model, work, r, prompts) for r in args.recipes}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, folder in variants.items():
            job = {"model": str(folder), "kind": kind, "variant": name, "threads": args.threads,
                   "prompts": args.prompts, "steps": args.steps if kind == "embedded" else args.sd15_steps,
                   "guidance": args.guidance,
                   "size": args.size,
                   "dump": str(work / "dumps" / name)}
            runs[name].append(run_worker([sys.executable, __file__, "--worker"], job, f"{kind} {name}"))
            print(f"{kind} {name} #{repeat + 1}: {runs[name][-1]}", file=sys.stderr)
    rows = []
    for name, folder in variants.items():
        row = {"model": kind, "variant": name, "unet_mb": folder_mb(folder, "unet"), "folder_mb": folder_mb(folder)}
        row |= {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}
        row |= quality(kind, work / "dumps" / name, work / "dumps" / "fp32", args.prompts)
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: list[str]) -> str:
    fp32 = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    lines = header + ["", "| model | variant | U-Net MB | vs fp32 | load s | U-Net call s | e2e s | peak RSS GB "
                      "| image PSNR mean / min dB | quality |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["model"] == "embedded":
            acc = " ".join(f"{k[:3]} {100 * v:.0f}" for k, v in r["heldout"].items())
            trained = " ".join(f"{k[:3]} {100 * v:.0f}" for k, v in r["trained"].items())
            detail = f"judge % trained: {trained}; held-out: {acc}"
        else:
            detail = "U-Net PSNR dB " + ", ".join(f"t={t}: {v:.1f}" for t, v in r["unet_psnr_db"].items())
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['unet_mb']:.1f} | {fp32[r['model']]['unet_mb'] / r['unet_mb']:.2f}x "
            f"| {r['load_s']:.2f} | {r['unet_call_s']:.3f} | {r['e2e_s']:.2f} | {r['peak_rss_gb']:.2f} "
            f"| {r['psnr_mean_db']:.1f} / {r['psnr_min_db']:.1f} | {detail} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from sdonnx.errors import InputError
    from sdonnx.models import EMBEDDED_MODEL
    from sdonnx.quantize.recipes import RECIPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="report path without suffix (.md and .json)")
    parser.add_argument("--embedded", type=Path, default=EMBEDDED_MODEL, help="'none' to leave it out")
    parser.add_argument("--sd15", type=Path, default=None, help="sdonnx export of SD 1.5 (random weights)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--prompts", type=int, default=200, help="embedded model: evaluation prompts")
    parser.add_argument("--steps", type=int, default=30, help="embedded model: sampler steps")
    parser.add_argument("--sd15-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5, help="as the committed reports ran (default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="SD 1.5 image side")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "sdonnx" / "quantize-report")
    args = parser.parse_args(argv)
    args.recipes = args.recipes.split(",")
    for recipe in args.recipes:
        if recipe not in RECIPES:
            raise InputError("recipes", recipe, f"one of {', '.join(RECIPES)}")
    rows = [] if str(args.embedded) == "none" else measure("embedded", args.embedded, args)
    if args.sd15:
        rows += measure("sd15", args.sd15, args)
    command = "python benchmarks/quantize_report.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    import onnxruntime

    header = [
        "# Quantization report", "", f"- command: `{command}`",
        f"- date: {datetime.date.today()}, machine: {machine()}, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}",
        f"- embedded: {args.prompts} evaluation prompts, {args.steps} steps; SD 1.5: {args.size}² one image, "
        f"{args.sd15_steps} steps; medians of {args.repeats} interleaved run(s), {args.threads} threads",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, header))
    print(markdown(rows, header))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
