"""Feature caching (DeepCache) on full-size SD 1.5 with seeded random weights: time and cost per interval.

    python benchmarks/feature_cache.py [--size 512] [--steps 20] [--intervals 1,2,3,5] [--threads 2] \
        [--out benchmarks/results/feature-cache-sd15-512]

SD 1.5's architecture (benchmarks/sd15_random.py) is exported once with `--feature-cache` into
~/.cache/sdonnx/sd15-feature-cache. One process loads it and generates the same image (seed 0,
Euler, guidance 7.5) at each --cache-interval, after a one-step warm-up; every U-Net run is timed by
graph. Reported: seconds per image, the speed-up over interval 1, the median whole and shallow U-Net
call, and the image's PSNR against interval 1's. Random weights measure the speed and how far the
image moves, not whether it still shows the prompt: the embedded model's judge does that (docs/feature-cache.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from common import CACHE, SD15_PROMPT, machine, peak_rss_gb, psnr, write_report  # noqa: E402 (benchmarks/ is the script's folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--intervals", default="1,2,3,5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    intervals = [int(v) for v in args.intervals.split(",")]

    import sd15_random
    from sdonnx.export import ExportConfig, export_model

    model = CACHE / "sd15-feature-cache"
    if not (model / "manifest.json").is_file():
        export_model(ExportConfig(source=str(sd15_random.build()), out=model, feature_cache=True, quiet=True))

    from sdonnx.runtime import Pipeline
    from sdonnx.runtime.session import Session

    calls: dict[str, list[float]] = {}
    run = Session.run

    def timed(self, **inputs):
        started = time.perf_counter()
        try:
            return run(self, **inputs)
        finally:
            calls.setdefault(self.name, []).append(time.perf_counter() - started)

    Session.run = timed
    loaded = time.perf_counter()
    pipe = Pipeline.load(model, provider="cpu", threads=args.threads, progress=False)
    load_s = time.perf_counter() - loaded
    settings = dict(steps=args.steps, guidance=7.5, sampler="euler", seed=0, height=args.size, width=args.size)
    pipe(SD15_PROMPT, **{**settings, "steps": 1, "cache_interval": 2})  # warm-up: both U-Net graphs allocate
    results, images = {}, {}
    for interval in intervals:
        calls.clear()
        started = time.perf_counter()
        (image,) = pipe(SD15_PROMPT, **settings, cache_interval=interval)
        seconds = time.perf_counter() - started
        images[interval] = np.asarray(image)
        results[interval] = {
            "seconds": seconds,
            "unet_whole_runs": len(calls.get("unet", [])),
            "unet_shallow_runs": len(calls.get("unet_shallow", [])),
            "unet_whole_median_s": statistics.median(calls["unet"]),
            "unet_shallow_median_s": statistics.median(calls["unet_shallow"]) if calls.get("unet_shallow") else None,
        }
        print(interval, results[interval], flush=True)
    base = results[intervals[0]]["seconds"]
    for interval, result in results.items():
        result["speedup"] = base / result["seconds"]
        result["psnr_vs_first_db"] = psnr(images[intervals[0]], images[interval])
    summary = {"machine": machine(), "size": args.size, "steps": args.steps, "threads": args.threads,
               "load_s": load_s, "peak_rss_gb": peak_rss_gb(), "results": results}
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        shallow = [r["unet_shallow_median_s"] for r in results.values()]
        write_report(
            args.out, summary,
            title=f"Feature caching, full-size SD 1.5 (random weights), {args.size}x{args.size}, {args.steps} Euler "
            f"steps, guidance 7.5, {args.threads} threads",
            notes=f"One process, load {load_s:.1f} s, peak RSS {summary['peak_rss_gb']:.2f} GB; each image once after "
            "a warm-up. PSNR of the 8-bit image against interval 1's.",
            columns=["cache interval", "whole / shallow U-Net runs", "s per image", "speed-up", "whole U-Net s",
                     "shallow s", "PSNR dB"],
            rows=[[str(i), f"{r['unet_whole_runs']} / {r['unet_shallow_runs']}", f"{r['seconds']:.1f}",
                   f"{r['speedup']:.2f}x", f"{r['unet_whole_median_s']:.2f}", "-" if s is None else f"{s:.2f}",
                   f"{r['psnr_vs_first_db']:.1f}"] for (i, r), s in zip(results.items(), shallow)])


if __name__ == "__main__":
    main()
