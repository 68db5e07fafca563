"""What the U-Net's optional ControlNet residual inputs cost when no ControlNet runs, and what one
ControlNet adds per step: U-Net CFG calls timed side by side, alternating, in one process.

    python benchmarks/controlnet_inputs.py WITHOUT WITH [--controlnet FOLDER] [--size 512] [--repeats 7]

WITHOUT: a model folder whose U-Net was exported without residual inputs (an older export); WITH:
the same weights exported now (every U-Net takes them, defaulting to zeros). Each round runs one
CFG call (batch 2) of each graph on the same inputs; the medians and their ratio are printed, with
the largest output difference (the residual defaults add zeros, so it should be 0). With
--controlnet, a third timing runs WITH's U-Net fed by that ControlNet (ControlNet + U-Net per call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from common import machine  # noqa: E402 (benchmarks/ is the script's folder)
from sdonnx.runtime.controlnet import ControlNetGraph, ControlNetManifest
from sdonnx.runtime.providers import RuntimeOptions, session_options
from sdonnx.runtime.session import Session


def _unet(folder: Path, threads: int) -> Session:
    options = session_options(RuntimeOptions(provider="cpu", threads=threads))
    return Session(folder / "unet" / "model.onnx", ["CPUExecutionProvider"], options, name="unet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("without", type=Path)
    parser.add_argument("with_inputs", type=Path, metavar="with")
    parser.add_argument("--controlnet", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    latent = args.size // 8
    feeds = {
        "sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
        "timestep": np.asarray(500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32),
    }
    sessions = {"without": _unet(args.without, args.threads), "with": _unet(args.with_inputs, args.threads)}
    if not sessions["with"].optional or sessions["without"].optional:
        raise SystemExit("WITHOUT must lack the residual inputs and WITH have them")
    control = None
    if args.controlnet is not None:
        manifest = ControlNetManifest.read(args.controlnet)
        options = session_options(RuntimeOptions(provider="cpu", threads=args.threads))
        session = Session(args.controlnet / "controlnet" / "model.onnx", ["CPUExecutionProvider"], options,
                          name="controlnet")
        control = ControlNetGraph.for_session(session, manifest)
        image = rng.random((2, 3, args.size, args.size), dtype=np.float32)

    def with_control() -> np.ndarray:
        residuals = control.residuals(feeds["sample"], 500.0, feeds, image, 1.0)
        return sessions["with"].run(**feeds, **dict(zip(control.names, residuals)))["out_sample"]

    runs = {name: (lambda s=s: s.run(**feeds)["out_sample"]) for name, s in sessions.items()}
    if control is not None:
        runs["with + ControlNet"] = with_control
    outputs = {name: run() for name, run in runs.items()}  # warm-up: ORT allocates its buffers
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(t) for name, t in times.items()}
    diff = float(np.abs(outputs["with"] - outputs["without"]).max())
    lines = [
        f"- {machine()}; {args.threads} threads; U-Net CFG call (batch 2) at {args.size}x{args.size}, "
        f"{args.repeats} alternating rounds after a warm-up",
        f"- command: `python benchmarks/controlnet_inputs.py {args.without} {args.with_inputs}"
        + (f" --controlnet {args.controlnet}" if args.controlnet else "") + f" --size {args.size} "
        f"--repeats {args.repeats}`",
        "",
        "| graph | median s | min s | max s | vs without |",
        "|---|---|---|---|---|",
        *(f"| {name} | {medians[name]:.3f} | {min(t):.3f} | {max(t):.3f} | {medians[name] / medians['without']:.3f}x |"
          for name, t in times.items()),
        "",
        f"max |out_sample with - without| = {diff:.3g} (same weights, residual defaults are zeros)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"times": times, "max_abs_diff": diff}, indent=2) + "\n")


if __name__ == "__main__":
    main()
