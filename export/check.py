"""Parity of an exported graph with its PyTorch module: ONNX Runtime (CPU) on the same seeded inputs.

Two floors, both must hold for every output:
- PSNR >= min_psnr (60 dB by default), with the reference's own dynamic range as the peak. fp32 exports
  land above 120 dB; a wrong weight, layout or operator lands below 30 dB; 60 dB (RMS error 0.1% of the
  range) leaves fp32 a wide margin while catching any real divergence.
- max|Δ| <= 1e-3 of that range. PSNR averages over the whole tensor, so a handful of wrong elements
  (a broken edge row, one bad channel) could hide in it; the maximum cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from sdonnx.errors import ExportError

MAX_ABS_DIFF_OF_RANGE = 1e-3
# fp32 resolves 2**-24 of a value (~144 dB); beyond 200 dB the outputs are identical, and a finite cap
# keeps manifest.json strict JSON (no Infinity).
PSNR_CAP_DB = 200.0


@dataclass(frozen=True)
class Parity:
    """Worst case over a graph's outputs: largest max|Δ| (absolute and as a share of the range), lowest PSNR."""

    max_abs_diff: float
    max_abs_diff_of_range: float
    psnr_db: float

    def within(self, min_psnr: float) -> bool:
        return self.psnr_db >= min_psnr and self.max_abs_diff_of_range <= MAX_ABS_DIFF_OF_RANGE

    def as_dict(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "psnr_db": self.psnr_db}


def compare(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> Parity:
    """Parity of actual against reference, output by output (peak = the reference's max - min)."""
    max_abs, of_range, psnr = 0.0, 0.0, PSNR_CAP_DB
    for name, ref in reference.items():
        out = actual[name]
        if out.shape != ref.shape:
            raise ExportError(f"{name}: ONNX output shape {out.shape} differs from PyTorch's {ref.shape}")
        ref64 = ref.astype(np.float64)
        diff = np.abs(out.astype(np.float64) - ref64)
        peak, largest = float(ref64.max() - ref64.min()), float(diff.max())
        rmse = float(np.sqrt(np.mean(diff**2)))
        max_abs = max(max_abs, largest)
        if largest > 0:
            of_range = max(of_range, largest / peak if peak > 0 else math.inf)
        if rmse > 0:
            psnr = min(psnr, 20 * math.log10(peak / rmse) if peak > 0 else -math.inf)
    return Parity(max_abs, of_range, psnr)


def run_onnx(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the graph once on ONNX Runtime's CPU provider; outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False  # one run: an arena would only raise peak memory
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def check_graph(
    name: str, path: Path, cases: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]], *, min_psnr: float
) -> Parity:
    """Compare the ONNX graph at path with PyTorch on each (feeds, reference outputs) case; the worst
    parity, ExportError below either floor."""
    parities = [compare(reference, run_onnx(path, feeds)) for feeds, reference in cases]
    parity = Parity(max(p.max_abs_diff for p in parities), max(p.max_abs_diff_of_range for p in parities),
                    min(p.psnr_db for p in parities))
    if not parity.within(min_psnr):
        raise ExportError(
            f"{name}: the ONNX graph differs from PyTorch: max|Δ| {parity.max_abs_diff:.3g} = "
            f"{parity.max_abs_diff_of_range:.3g} of the output range (floor {MAX_ABS_DIFF_OF_RANGE:g}), "
            f"PSNR {parity.psnr_db:.1f} dB (floor {min_psnr:g} dB); nothing was written"
        )
    return parity
