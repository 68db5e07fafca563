"""Time one sdonnx generation: session load, median U-Net step (with CFG) and end to end.

    python benchmarks/step_time.py MODEL [--size 256] [--steps 4] [--threads N]

The first step is reported apart: ONNX Runtime allocates its buffers then.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import sdonnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    pipe = sdonnx.Pipeline.load(args.model, provider="cpu", progress=False, threads=args.threads)
    load = time.perf_counter() - started

    stamps: list[float] = []
    started = time.perf_counter()
    pipe("a photo of a cat", steps=args.steps, seed=0, height=args.size, width=args.size,
         callback=lambda step, sigma, latents: stamps.append(time.perf_counter()))
    total = time.perf_counter() - started
    steps = np.diff([started, *stamps])
    later = statistics.median(steps[1:]) if len(steps) > 1 else float("nan")
    print(f"{args.model} {args.size}px: session load {load:.1f} s, step median {later:.3f} s "
          f"(first {steps[0]:.3f} s), end to end {total:.1f} s for {args.steps} steps")


if __name__ == "__main__":
    main()
