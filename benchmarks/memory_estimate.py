"""Measured peak memory of one generation beside sdonnx's estimate (runtime/request.py).

Each case runs in a fresh process: load, one warm-up image at the native size, then one step at the
case's size; the figure is the peak resident size above the warmed-up process's.

    python benchmarks/memory_estimate.py [MODEL] --sizes 256,512,768 --batches 1,4
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

WORKER = r"""
import json, resource, sys
import sdonnx
from sdonnx.runtime.request import estimate_peak
model, size, batch, low = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
pipe = sdonnx.Pipeline.load(model, provider="cpu", threads=1, progress=False, low_memory=low)
native = pipe.manifest.default_image_size
pipe("a red circle", steps=1, seed=0, height=native, width=native)
ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pipe("a red circle", steps=1, seed=0, batch=batch, height=size, width=size)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
policy = pipe.model.options.memory
print(json.dumps({"ready": ready, "peak": peak,
                  "estimate": estimate_peak(pipe.manifest, pipe.model.root, policy, batch, size, size)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="", help="model folder (default: the embedded model)")
    parser.add_argument("--sizes", default="256,512,768")
    parser.add_argument("--batches", default="1,4")
    args = parser.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}; model: {args.model or 'embedded'}")
    print("| size | batch | mode | measured above ready | estimate (incl. weights, x1.15) |")
    print("|---|---|---|---|---|")
    for low in (False, True):
        for batch in (int(b) for b in args.batches.split(",")):
            for size in (int(s) for s in args.sizes.split(",")):
                out = subprocess.run([sys.executable, "-W", "ignore", "-c", WORKER, args.model, str(size), str(batch),
                                      "1" if low else "0"], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {size} | {batch} | {'low memory' if low else 'normal'} | "
                      f"{(r['peak'] - r['ready']) / 2**30:.2f} GB | {r['estimate'] / 2**30:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
