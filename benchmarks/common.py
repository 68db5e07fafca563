"""What the benchmark scripts share: PSNR, peak RSS, folder sizes, the machine line, cached variants.

Imports nothing outside the standard library and NumPy at module level: workers run it in the
optimum virtual environment too, where sdonnx is not installed.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "sdonnx"
SD15_PROMPT = "a photograph of an astronaut riding a horse"


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of b against a; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(peak**2 / mse) if mse > 0 else float("inf")


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def folder_mb(folder: Path, part: str = "") -> float:
    return sum(p.stat().st_size for p in (Path(folder) / part).rglob("*") if p.is_file()) / 2**20


def machine() -> str:
    """Cores, CPU model and the SIMD flags that decide ONNX Runtime's and PyTorch's kernels."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's
    flags = fields.get("flags", "").split()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f in flags]
    # The model name of a virtual CPU is often generic ("Intel(R) Xeon(R) Processor"): family and model tell hosts apart.
    return (f"{os.cpu_count()} cores, {fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}), {' '.join(simd) or 'no AVX2'}")


def command_line() -> str:
    """This script's command as it was run, for the report."""
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def write_report(out: Path, summary: dict, *, title: str, notes: str, columns: list[str], rows: list[list[str]]) -> None:
    """OUT.json (`summary`, which holds "machine") and OUT.md: the title, machine, command, notes and table."""
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *("| " + " | ".join(r) + " |" for r in rows)]
    out.with_suffix(".md").write_text(f"# {title}\n\nMachine: {summary['machine']}\n\nCommand: `{command_line()}`\n\n"
                                      f"{notes}\n\n" + "\n".join(table) + "\n")


def parse_or_work(parser, worker) -> object | None:
    """`parser`'s arguments, with --threads (default 2), --out and the hidden --worker JSON added; with
    --worker, run worker(job), print its JSON result line and return None (the script's worker process)."""
    import argparse

    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    return args


def run_worker(command: list[str], job: dict, label: str) -> dict:
    """Run `command + [json(job)]` in a fresh process; the JSON object on its last stdout line."""
    result = subprocess.run([*command, json.dumps(job)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"worker {label} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_variant(model: Path, work: Path, recipe: str, calibration_prompts: Path | None = None) -> Path:
    """work/recipe: `model` quantized with `recipe`, made once and reused while its manifest names the recipe."""
    from sdonnx.quantize import QuantizeConfig, quantize_model

    out = work / recipe
    manifest = out / "manifest.json"
    if not (manifest.is_file() and (json.loads(manifest.read_text()).get("quantization") or {}).get("recipe") == recipe):
        print(f"quantizing {model} -> {out} ({recipe})", file=sys.stderr)
        work.mkdir(parents=True, exist_ok=True)
        quantize_model(QuantizeConfig(model=str(model), out=out, recipe=recipe, overwrite=True, quiet=True,
                                      calibration_prompts=calibration_prompts))
    return out
