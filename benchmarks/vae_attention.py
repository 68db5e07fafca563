"""The VAE decode with its mid-block attention unfused (`--attention sliced`, diffusers' processor as traced)
against fused (`--attention fused`, one MultiHeadAttention op), each in a fresh process.

    python benchmarks/vae_attention.py [--latent 128] [--repeats 2] [--threads 2] [--out benchmarks/results/vae-attention-128]

SD's AutoencoderKL architecture (also SDXL's) with seeded random weights; a 128x128 latent is a 1024x1024
SDXL image, whose mid-block attention runs over 16384 tokens. Reported: decode time per run and the
process's peak RSS, and the largest difference between the two decodes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine, parse_or_work, peak_rss_gb, run_worker, write_report  # noqa: E402 (benchmarks/ is the script's folder)
from vae_decode import SD_VAE  # noqa: E402

MODES = ("sliced", "fused")


def worker(job: dict) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    options.log_severity_level = 3
    session = ort.InferenceSession(job["graph"], options, providers=["CPUExecutionProvider"])
    latent = np.random.default_rng(0).standard_normal((1, 4, job["latent"], job["latent"])).astype(np.float32)
    times = []
    for _ in range(job["repeats"]):
        started = time.perf_counter()
        pixels = session.run(None, {"latent_sample": latent})[0]
        times.append(time.perf_counter() - started)
    np.save(job["pixels"], pixels)
    return {"decode_s": times, "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parse_or_work(parser, worker)
    if args is None:
        return

    import torch
    from diffusers import AutoencoderKL

    from sdonnx.export import ExportConfig, export_model

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE).save_pretrained(root / "vae", safe_serialization=True)
        results = {}
        for mode in MODES:
            export_model(ExportConfig(source=str(root / "vae"), out=root / mode, attention=mode, quiet=True))
            job = {"graph": str(root / mode / "vae_decoder" / "model.onnx"), "latent": args.latent,
                   "repeats": args.repeats, "threads": args.threads, "pixels": str(root / f"{mode}.npy")}
            results[mode] = run_worker([sys.executable, __file__, "--worker"], job, mode)
            print(mode, results[mode], flush=True)
        difference = float(np.abs(np.load(root / "sliced.npy") - np.load(root / "fused.npy")).max())
    summary = {"machine": machine(), "latent": args.latent, "threads": args.threads, "repeats": args.repeats,
               "results": results, "max_abs_difference": difference}
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        write_report(
            args.out, summary,
            title=f"VAE decode of a {args.latent}x{args.latent} latent ({8 * args.latent} px), mid-block attention "
            f"unfused vs fused, {args.threads} threads",
            notes=f"SD's AutoencoderKL (random weights), each export in a fresh process; max |difference| between the "
            f"two decodes {difference:.1e}.",
            columns=["VAE attention", "decode s (each run)", "peak RSS GB"],
            rows=[[mode, " / ".join(f"{t:.2f}" for t in r["decode_s"]), f"{r['peak_rss_gb']:.2f}"]
                  for mode, r in results.items()])


if __name__ == "__main__":
    main()
