"""The weight map an export records in its manifest (runtime/weights.py), checked against PyTorch.

The map is read from the graph as it would be for a folder without one (node names, ops), then every
entry is compared with the PyTorch module it names: the initializer must hold exactly that module's
weight in the layout the entry says. A LoRA applied later then changes the right tensor the right
way round, and a graph whose node names stop matching the modules fails here, at export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdonnx.errors import ExportError
from sdonnx.runtime.onnx_file import read_graph
from sdonnx.runtime.weights import WeightRef, derive

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the graphs LoRAs change


def record(module: torch.nn.Module, path: Path, component: str) -> dict[str, WeightRef]:
    """The checked weight map of the graph at `path`, exported from `module`."""
    graph = read_graph(path)
    found = derive(graph)
    modules = dict(module.named_modules())
    for name, ref in found.items():
        owner = modules.get(name) or modules.get(f"text_model.{name}")
        weight = getattr(owner, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ExportError(f"{path}: {component} node names module {name!r}, which the PyTorch model lacks")
        expected = weight.detach().float().numpy()
        stored = graph.initializers[ref.initializer].read()
        if ref.layout == "in_out":
            expected = expected.T
        if stored.shape != expected.shape or not np.array_equal(stored, expected):
            raise ExportError(f"{path}: {component} initializer {ref.initializer!r} ({ref.layout}) does not hold "
                              f"module {name!r}'s weight {list(weight.shape)} (stored {list(stored.shape)})")
    return found
