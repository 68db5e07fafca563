"""LoRA adapters for training here (the LCM-LoRA and style LoRA of the embedded model), saved in
kohya's layout so that the runtime reads them as it reads any LoRA (runtime/lora.py).

`add_adapters(unet, rank)` replaces each attention projection, ff Linear and resnet convolution of a
diffusers U-Net by itself plus a low-rank branch (up initialized to zero, so training starts from
the base model); only the branches train. `save_kohya(adapters, path, alpha)` writes
`lora_unet_<path>.lora_down/.lora_up/.alpha`: W' = W + (alpha / rank) * up @ down.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The modules adapted, by kind: those kohya's LoCon-style training targets in an SD U-Net.
TARGETS = {
    "attention": (".attn1.", ".attn2.", ".proj_in", ".proj_out"),
    "ff": (".ff.",),
    "resnets": (".resnets.",),
}


class Adapted(torch.nn.Module):
    """base(x) + scale * up(down(x)) around a frozen Linear or Conv2d."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        if isinstance(base, torch.nn.Conv2d):
            self.down = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = torch.nn.Linear(base.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x, *args, **kwargs):
        return self.base(x, *args, **kwargs) + self.scale * self.up(self.down(x))


def add_adapters(unet: torch.nn.Module, rank: int, alpha: float | None = None,
                 kinds: tuple[str, ...] = tuple(TARGETS)) -> dict[str, Adapted]:
    """Adapt the `kinds` (keys of TARGETS) of `unet` in place (its own weights frozen); the adapters by module path."""
    unet.requires_grad_(False)
    targets = [t for kind in kinds for t in TARGETS[kind]]
    chosen = [(name, m) for name, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(t in f".{name}" for t in targets)
              and not name.endswith("time_emb_proj")]
    adapters = {}
    for name, module in chosen:
        parent, _, leaf = name.rpartition(".")
        adapted = Adapted(module, rank, float(alpha if alpha is not None else rank))
        setattr(unet.get_submodule(parent) if parent else unet, leaf, adapted)
        adapters[name] = adapted
    return adapters


def save_kohya(adapters: dict[str, Adapted], path: Path, dtype=torch.float16) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    for name, a in adapters.items():
        key = "lora_unet_" + name.replace(".", "_")
        rank = a.down.weight.shape[0]
        tensors |= {f"{key}.lora_down.weight": a.down.weight.detach().to(dtype).contiguous(),
                    f"{key}.lora_up.weight": a.up.weight.detach().to(dtype).contiguous(),
                    f"{key}.alpha": torch.tensor(a.scale * rank, dtype=dtype)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return Path(path)
