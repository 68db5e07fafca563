"""LoRAs baked into an export (`sdonnx export SRC OUT --lora FILE:WEIGHT`): merged into the PyTorch
weights before tracing, for users who want one fixed graph (or an int4 one, which cannot take LoRAs
at load time).

The file is read and resolved exactly as at load time (runtime/lora.py: the same keys, the same
refusals, the same shape check naming the first mismatching module), against the source's own
Linear and Conv modules; W += weight * alpha / rank * up @ down in float32.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdonnx.runtime.lora import LoraChoice, check_shape, parse, read_tensors, short_hash
from sdonnx.runtime.weights import WeightRef

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def check_files(loras: Sequence[tuple[str, float]]) -> tuple[LoraChoice, ...]:
    """The --lora files, before anything loads: they must exist; weights as at load time."""
    from sdonnx.runtime.lora import choose

    return choose([(name, weight, "lora") for name, weight in loras], None)


@torch.no_grad()
def bake(source, choices: Sequence[LoraChoice]) -> str:
    """Merge `choices` into source's modules in place; a line for the manifest's `source` naming them."""
    modules = {c: _modules(getattr(source, c)) for c in COMPONENTS if getattr(source, c, None) is not None}
    maps = {c: {name: WeightRef(name, "out_in") for name in found} for c, found in modules.items()}
    for choice in choices:
        lora = parse(choice.path, read_tensors(choice.path, field="lora"), maps, field="lora")
        for m in lora.modules:
            check_shape(choice.path, m, tuple(modules[m.component][m.module].weight.shape))
        for m in lora.modules:
            weight = modules[m.component][m.module].weight
            weight += torch.from_numpy(m.delta(choice.weight).reshape(tuple(weight.shape))).to(weight.dtype)
    return ", ".join(f"{c.path.name}:{c.weight:g} [{short_hash(c.path)}]" for c in choices)


def _modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear and Conv modules by the path the weight maps use (transformers' `text_model.` dropped)."""
    return {name.removeprefix("text_model."): m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
