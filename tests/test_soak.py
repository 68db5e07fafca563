"""Soak: many generations in one process must not grow its memory (a leaked session, array or
callback closure shows as a steady climb). Slow suite: `python -m pytest -m slow tests/test_soak.py`."""

from __future__ import annotations

import gc

import pytest

from sdonnx.runtime.memory import return_freed_memory
from sdonnx.runtime.pipeline import Pipeline

CALLS, WARMUP = 150, 20
MAX_GROWTH_MB = 16  # measured +0.7 MB over 150 calls before this test existed


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("low_memory", [False, True])
def test_repeated_generation_keeps_memory_flat(low_memory):
    pipe = Pipeline.load(progress=False, low_memory=low_memory)
    samplers = ("euler", "euler_ancestral", "dpmpp_2m", "ddim")
    for i in range(WARMUP):
        pipe("a red circle", steps=4, seed=i, sampler=samplers[i % 4])
    gc.collect()
    return_freed_memory()
    start = resident_mb()
    for i in range(CALLS):
        pipe("a blue square on a white background", steps=4, seed=i, sampler=samplers[i % 4], batch=1 + i % 2)
    gc.collect()
    return_freed_memory()
    assert resident_mb() - start < MAX_GROWTH_MB
