"""Optimized-graph cache: ONNX Runtime optimizes each graph once per machine, not at every load.

Creating a CPU session for a large graph spends most of its time in ONNX Runtime's graph
optimizations (fusions, constant folding, the NCHWc layout). ORT can save the graph it optimized
(`SessionOptions.optimized_model_filepath`), and a later session on that file with optimizations
off skips the work. Level "all" writes layouts and kernels chosen for this CPU, so the key holds
everything the result depends on: the graph's identity (resolved path, size and mtime of the graph
and its external data), onnxruntime's version, the optimization level, and the CPU's model name and
flags. Only the CPU provider is cached; other providers compile their own kernels at load.

An entry is written into a temporary folder beside the others and renamed into place once ORT has
saved it, so an interrupted first load leaves no half entry. Graphs over 2 GB keep their weights in
one external file, as exported.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from sdonnx.runtime.providers import RuntimeOptions, resolve_provider, session_options
from sdonnx.runtime.session import Providers, Session

GRAPH = "model.onnx"
EXTERNAL_DATA = "model.onnx_data"
DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdonnx" / "optimized"


def open_session(path: Path, providers: Providers, options: RuntimeOptions, *, name: str,
                 initializers: Mapping[str, np.ndarray] | None = None) -> Session:
    """A Session for the graph at `path`, through the cache when options.graph_cache is set.

    initializers: replaced weights (LoRAs); such a session skips the cache, whose optimized graph has
    the weights as they are on disk folded and laid out for its kernels.
    """
    cached = options.graph_cache is not None and options.graph_optimization != "disable" and not initializers
    if not cached or resolve_provider(options.provider) != "cpu":
        return Session(path, providers, session_options(options), name=name, initializers=initializers)
    entry = Path(options.graph_cache) / cache_key(path, options)
    if (entry / GRAPH).is_file():
        unoptimized = session_options(replace(options, graph_optimization="disable"))
        return Session(path, providers, unoptimized, name=name, load=entry / GRAPH)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        so = session_options(options)
        so.optimized_model_filepath = str(staging / GRAPH)
        so.log_severity_level = 3  # ORT warns that the saved graph is for this machine only: the key says so
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", EXTERNAL_DATA)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session = Session(path, providers, so, name=name)
        (staging / "source.json").write_text(json.dumps({"graph": str(path.resolve())}) + "\n")
        try:
            staging.rename(entry)
        except OSError:  # another process filled the entry first; its copy is as good
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return session


def cache_key(path: Path, options: RuntimeOptions) -> str:
    """Hex digest of what the optimized graph depends on (see the module docstring)."""
    files = [path, path.with_name(EXTERNAL_DATA)]
    identity = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    facts = {
        "graph": identity,
        "onnxruntime": ort.__version__,
        "level": options.graph_optimization,
        "cpu": _cpu(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _cpu() -> list[str]:
    """The CPU's model name and feature flags (Linux); the platform's description elsewhere."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return [platform.machine(), platform.processor()]
    fields = ("model name", "flags")
    return [line.split(":", 1)[1].strip() for line in info if line.split(":", 1)[0].strip() in fields][:2]
