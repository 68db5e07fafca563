"""LoRA files for tests, made from a diffusers pipeline's own modules, and the oracle that merges them.

`write_kohya(path, pipe, ...)` writes random low-rank pairs in kohya/A1111's layout for the chosen
modules (U-Net names in diffusers' layout, or in the original SGM one with `sgm=True`, as kohya's
SDXL LoRAs have); `write_peft` the same pairs as diffusers/PEFT keys. `merged(pipe, loras)` is the
oracle: diffusers' own key conversion (`lora_state_dict`, which turns kohya and SGM names into
diffusers modules) and W += weight * alpha / rank * up @ down in torch. It stands in for diffusers'
`load_lora_weights` + `fuse_lora`, which need peft: peft <= 0.21.2 is all the registry has here and
transformers 5.24 asks for >= 0.22.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_ENCODERS = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def targets(pipe, *, unet=True, text=True, conv=False) -> dict[str, dict[str, torch.nn.Module]]:
    """component -> {module path: module}: attention/ff Linears (and resnet convs with `conv`)."""
    chosen = {}
    if unet:
        chosen["unet"] = {
            name: m for name, m in pipe.unet.named_modules()
            if (isinstance(m, torch.nn.Linear) and ".attentions." in name)
            or (conv and isinstance(m, torch.nn.Conv2d) and ".resnets." in name)
        }
    if text:
        for component in TEXT_ENCODERS:
            encoder = getattr(pipe, component, None)
            if encoder is not None:
                chosen[component] = {name: m for name, m in encoder.named_modules()
                                     if isinstance(m, torch.nn.Linear) and ".layers." in name}
    return chosen


def pairs(chosen, *, rank=4, alpha=2.0, seed=0, scale=0.3) -> dict[tuple[str, str], tuple]:
    """(component, module path) -> (down, up, alpha), seeded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, modules in chosen.items():
        for name, m in modules.items():
            w = m.weight
            down_shape = (rank, w.shape[1], *w.shape[2:])
            up_shape = (w.shape[0], rank, *((1, 1) if w.ndim == 4 else ()))
            out[(component, name)] = (torch.randn(down_shape, generator=g) * scale,
                                      torch.randn(up_shape, generator=g) * scale, alpha)
    return out


def write_kohya(path: Path, pipe, *, sgm: bool = False, sdxl: bool = False, **kwargs) -> Path:
    from safetensors.torch import save_file

    from sdonnx.runtime.lora import sgm_names

    chosen = targets(pipe, **{k: kwargs.pop(k) for k in ("unet", "text", "conv") if k in kwargs})
    rename = sgm_names(list(dict(pipe.unet.named_modules()))) if sgm else {}
    tensors = {}
    for (component, name), (down, up, alpha) in pairs(chosen, **kwargs).items():
        if component == "unet":
            key = "lora_unet_" + rename.get(name, name).replace(".", "_")
        else:
            # kohya's keys come from transformers 4, whose CLIP text models keep their layers under text_model.
            name = name if name.startswith("text_model.") else f"text_model.{name}"
            key = (TEXT_ENCODERS[component] if sdxl else "lora_te_") + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(path))
    return path


def write_peft(path: Path, pipe, **kwargs) -> Path:
    """diffusers/PEFT keys (`unet.<module>.lora_A.weight`), alpha = rank (scale 1) as PEFT files have none."""
    from safetensors.torch import save_file

    chosen = targets(pipe, **{k: kwargs.pop(k) for k in ("unet", "text", "conv") if k in kwargs})
    tensors = {}
    for (component, name), (down, up, _) in pairs(chosen, **kwargs).items():
        tensors |= {f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up}
    save_file(tensors, str(path))
    return path


_UNET_ATTENTION = {"processor.to_q_lora": "to_q", "processor.to_k_lora": "to_k", "processor.to_v_lora": "to_v",
                   "processor.to_out_lora": "to_out.0"}
_TEXT_ATTENTION = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


@torch.no_grad()
def merged(pipe, loras) -> None:
    """Merge [(file, weight), ...] into `pipe`'s modules in place, through diffusers' key conversion;
    a weight may be (text encoder weight, U-Net weight)."""
    for path, weights in loras:
        te_weight, unet_weight = weights if isinstance(weights, tuple) else (weights, weights)
        state, alphas = type(pipe).lora_state_dict(str(path), unet_config=pipe.unet.config)
        alphas = alphas or {}
        for key, down in state.items():
            part = next((p for p in ("lora.down.weight", "lora_linear_layer.down.weight", "lora_A.weight",
                                     "down.weight") if key.endswith("." + p)), None)
            if part is None:
                continue
            up = state[key[: -len(part)] + part.replace("down", "up").replace("lora_A", "lora_B")]
            module_path = key[: -len(part) - 1]
            component, _, name = module_path.partition(".")
            for old, new in (_UNET_ATTENTION if component == "unet" else _TEXT_ATTENTION).items():
                name = name.replace(old, new)
            name = name.removesuffix(".lora_linear_layer").removesuffix(".lora")
            root = getattr(pipe, component)
            if component != "unet":  # transformers 5's CLIP text models have no text_model level
                root = getattr(root, "text_model", root)
                name = name.removeprefix("text_model.")
            module = root.get_submodule(name)
            alpha = alphas.get(key + ".alpha", alphas.get(module_path + ".alpha"))
            rank = down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            weight = unet_weight if component == "unet" else te_weight
            module.weight += weight * (1.0 if alpha is None else alpha / rank) * delta
