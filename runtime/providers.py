"""Execution providers and session options: what `--provider`, `--threads` and friends turn into.

`RuntimeOptions` is the one frozen description of how graphs run. `resolve_provider` maps a short
name (`cuda`) or an ORT name (`CUDAExecutionProvider`) onto a provider this onnxruntime build
offers; `auto` picks the best one available. Asking for one the build lacks is an `InputError`
that lists what the build offers and which pip package provides the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from sdonnx.config import check_bool, check_choice, is_int
from sdonnx.errors import InputError
from sdonnx.runtime.memory import MemoryPolicy, memory_policy

CPU = "CPUExecutionProvider"

# Short CLI name -> ORT provider name.
PROVIDERS = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

# Order `auto` tries. TensorRT is never picked automatically: its engine build takes minutes.
AUTO_ORDER = ("cuda", "dml", "coreml", "openvino", "cpu")

PIP_PACKAGES = {
    "cpu": "onnxruntime",
    "cuda": "onnxruntime-gpu",
    "dml": "onnxruntime-directml",
    "tensorrt": "onnxruntime-gpu (with TensorRT libraries installed)",
    "openvino": "onnxruntime-openvino",
    "coreml": "onnxruntime (the macOS wheels)",
}

GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Providers that take a `device_id` provider option.
_DEVICE_PROVIDERS = ("cuda", "dml", "tensorrt")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the graphs of a model folder run.

    provider: a key of PROVIDERS, an ORT provider name, or "auto".
    threads: intra-op threads per session; None lets onnxruntime choose (one per physical core).
    graph_optimization: a key of GRAPH_OPTIMIZATION.
    memory_arena: keep onnxruntime's CPU memory arena (faster; off returns memory between runs).
    device_id: which GPU, for the CUDA, DirectML and TensorRT providers.
    low_memory: trade speed for peak memory (`memory.memory_policy` says what changes; the memory
    arena is then off whatever `memory_arena` says).
    graph_cache: a folder where the CPU provider keeps each graph as ONNX Runtime optimized it, so
    later loads skip the optimization (`graph_cache`); None optimizes at every load.
    verify_integrity: check the files against the sha256 that manifest.json records (`integrity`);
    each file is hashed once per version, later loads only stat it. False loads changed files as they are.
    """

    provider: str = "auto"
    threads: int | None = None
    graph_optimization: str = "all"
    memory_arena: bool = True
    device_id: int = 0
    low_memory: bool = False
    graph_cache: Path | None = None
    verify_integrity: bool = True

    def __post_init__(self):
        if not isinstance(self.provider, str):
            raise InputError("provider", self.provider, f"'auto', one of {sorted(PROVIDERS)} or an ORT provider name")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise InputError("threads", self.threads, "a positive integer or None (onnxruntime's default)")
        check_choice("graph_optimization", self.graph_optimization, GRAPH_OPTIMIZATION)
        for name in ("memory_arena", "low_memory", "verify_integrity"):
            check_bool(name, getattr(self, name))
        if self.graph_cache is not None:
            if not isinstance(self.graph_cache, (str, Path)):
                raise InputError("graph_cache", self.graph_cache, "a folder path or None")
            object.__setattr__(self, "graph_cache", Path(self.graph_cache))
            if self.graph_cache.exists() and not self.graph_cache.is_dir():
                raise InputError("graph_cache", str(self.graph_cache), "a folder (this is a file)")
        if not is_int(self.device_id) or self.device_id < 0:
            raise InputError("device_id", self.device_id, "a non-negative integer")

    @property
    def memory(self) -> MemoryPolicy:
        """What low_memory and memory_arena mean for sessions, the U-Net batch and the VAE decode."""
        return memory_policy(self.low_memory, self.memory_arena)


def available_providers() -> list[str]:
    """The ORT provider names this onnxruntime build offers and sdonnx can run on (AzureExecutionProvider,
    which ORT lists on every build, calls a remote endpoint and is left out)."""
    known = set(PROVIDERS.values())
    return [name for name in ort.get_available_providers() if name in known]


def resolve_provider(name: str) -> str:
    """The short name (a key of PROVIDERS) of the provider `name` asks for; InputError if unavailable."""
    available = available_providers()
    if name == "auto":
        return next(short for short in AUTO_ORDER if PROVIDERS[short] in available)
    short = _short_name(name)
    if short is None:
        raise InputError("provider", name, f"'auto', one of {sorted(PROVIDERS)} or their ORT names")
    if PROVIDERS[short] not in available:
        raise InputError(
            "provider",
            name,
            f"one this onnxruntime build offers ({', '.join(available)}); "
            f"{PROVIDERS[short]} comes with the pip package {PIP_PACKAGES[short]}",
        )
    return short


def session_providers(options: RuntimeOptions) -> list[str | tuple[str, dict]]:
    """The `providers=` list for InferenceSession: the chosen provider, then CPU for unsupported ops."""
    short = resolve_provider(options.provider)
    provider_options = {"device_id": options.device_id} if short in _DEVICE_PROVIDERS else {}
    chosen: list[str | tuple[str, dict]] = [(PROVIDERS[short], provider_options)]
    if short == "tensorrt":
        # Ops TensorRT cannot take should run on the GPU too, not on the CPU.
        chosen.append((PROVIDERS["cuda"], {"device_id": options.device_id}))
    if short != "cpu":
        chosen.append(CPU)
    return chosen


def session_options(options: RuntimeOptions) -> ort.SessionOptions:
    """The ort.SessionOptions for `options`."""
    so = ort.SessionOptions()
    so.graph_optimization_level = GRAPH_OPTIMIZATION[options.graph_optimization]
    so.enable_cpu_mem_arena = options.memory.arena
    # Errors only: at every U-Net load ORT warns once per ControlNet residual input that its default
    # (an initializer of the input's name, export/graphs.py add_optional_defaults) is not a constant,
    # which is the point of it; its other load-time warnings are advisories (CUDA's "nodes not
    # assigned to the preferred execution provider" for shape ops it places on the CPU itself).
    so.log_severity_level = 3
    if options.threads is not None:
        so.intra_op_num_threads = options.threads
    if resolve_provider(options.provider) == "dml":
        # DirectML supports neither memory patterns nor parallel execution.
        so.enable_mem_pattern = False
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def _short_name(name: str) -> str | None:
    lowered = name.lower()
    if lowered in PROVIDERS:
        return lowered
    return next((short for short, full in PROVIDERS.items() if full.lower() == lowered), None)
