"""LoRA switch cost on a loaded pipeline: time to apply and to switch, peak RSS while switching, and
the U-Net's step time with and without the LoRA.

    python benchmarks/lora_switch.py MODEL [--rank 64] [--size 512] [--out results/lora-switch-sd15]

MODEL is an sdonnx folder (e.g. the harness's full-size SD 1.5 export, fp32 or int8). Two random
kohya LoRAs (seeds 1 and 2) of rank --rank are written for every attention (to_q/k/v/out), ff and
resnet convolution of its U-Net, shaped from the folder's weight map (no torch needed). Timed in
one process, after loading:
- apply: `loras={A: 1}` made ready: parse, check, merge, and the U-Net session re-created;
- switch: A -> B, the same work for the other file;
- off: back to the weights on disk;
- step: one CFG U-Net call (batch 2) at --size, median of 3, base and with the LoRA.
Peak RSS is the process's VmHWM reset before each switch (/proc/self/clear_refs), so it is the peak
of the switch alone, the loaded pipeline included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, peak_rss_gb  # noqa: E402

TARGETS = (".attn1.to_", ".attn2.to_", ".ff.net.", ".resnets.")


def write_lora(path: Path, pipe, rank: int, seed: int) -> Path:
    from safetensors.numpy import save_file

    from sdonnx.runtime.weights import torch_shape

    adapters = pipe.adapters
    graph, weights = adapters.graph("unet"), adapters.weight_map("unet")
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, ref in weights.items():
        if not any(t in f".{module}" for t in TARGETS) or module.endswith("time_emb_proj"):
            continue
        shape = torch_shape(graph.initializers[ref.initializer].shape, ref.layout)
        key = "lora_unet_" + module.replace(".", "_")
        down = (rng.standard_normal((rank, *shape[1:])) * 0.01).astype(np.float16)
        up = (rng.standard_normal((shape[0], rank, *((1, 1) if len(shape) == 4 else ()))) * 0.01).astype(np.float16)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": np.array(rank, dtype=np.float16)}
    save_file(tensors, str(path))
    return path


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def timed_switch(pipe, choices) -> tuple[float, float]:
    """(seconds, peak RSS GB) to make `choices` the applied LoRAs and re-open the U-Net."""
    reset_peak()
    started = time.perf_counter()
    pipe.adapters.apply(pipe.model.sessions, choices)
    pipe.model.sessions["unet"]
    return time.perf_counter() - started, peak_rss_gb()


def step_time(pipe, size: int) -> float:
    from sdonnx.runtime.denoiser import timestep_input

    unet = pipe.model.sessions["unet"]
    m = pipe.manifest
    feeds = {"sample": np.zeros((2, m.latent_channels, size // 8, size // 8), np.float32),
             "timestep": timestep_input(unet.input("timestep"), 500.0, 2),
             "encoder_hidden_states": np.zeros((2, 77, m.cross_attention_dim), np.float32)}
    times = []
    for _ in range(3):
        started = time.perf_counter()
        unet.run(**feeds)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    import sdonnx
    from sdonnx.runtime.lora import LoraChoice

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "sdonnx" / "lora-switch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = sdonnx.Pipeline.load(args.model, provider="cpu", threads=args.threads, progress=False)
    loaded = time.perf_counter() - started
    files = [args.work / f"{args.model.name}-rank{args.rank}-{seed}.safetensors" for seed in (1, 2)]
    for seed, path in zip((1, 2), files):
        if not path.is_file():
            write_lora(path, pipe, args.rank, seed)
    a, b = (LoraChoice(p.stem, p.resolve(), 1.0) for p in files)
    base_step = step_time(pipe, args.size)
    row = {"model": str(args.model), "precision": pipe.manifest.graphs["unet"].precision, "rank": args.rank,
           "lora_mb": round(files[0].stat().st_size / 2**20, 1), "load_s": loaded, "base_step_s": base_step}
    row["apply_s"], row["apply_peak_gb"] = timed_switch(pipe, [a])
    row["lora_step_s"] = step_time(pipe, args.size)
    row["switch_s"], row["switch_peak_gb"] = timed_switch(pipe, [b])
    row["off_s"], row["off_peak_gb"] = timed_switch(pipe, [])
    row["machine"] = machine()
    print(json.dumps(row))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
