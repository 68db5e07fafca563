"""Test-only: write a diffusers SD folder as an original-layout (CompVis / A1111) single-file checkpoint.

The inverse of diffusers' single-file conversion, driven by the folder's configs so that models of any
depth (the tiny test pipelines included) convert. The original layout:
- U-Net `model.diffusion_model.*` (openaimodel.py): `input_blocks.N` counts the stem, then per level its
  resnets (`.0`, with `.1` the attention) and one downsampler slot; `output_blocks.N` per level its resnets
  and, in the level's last slot, the upsampler; resnets name their layers `in_layers`/`out_layers`.
- VAE `first_stage_model.*`: `encoder.down.N.block.M`, `decoder.up.N` numbered from the lowest resolution
  (the reverse of diffusers), mid-block attention as 1x1 convolutions `q`/`k`/`v`/`proj_out`.
- text encoder `cond_stage_model.transformer.text_model.*` (SD 1.x: Hugging Face CLIP, same names), or
  `cond_stage_model.model.*` (SD 2.x: OpenCLIP, `resblocks` with q/k/v fused into `in_proj`).

`to_sgm_state_dict` writes an SDXL folder in Stability's generative-models (SGM) layout: the same U-Net
(plus `label_emb.0.*`, the text_time embedding) and VAE keys, `conditioner.embedders.0.transformer.*`
(CLIP ViT-L, Hugging Face names) and `conditioner.embedders.1.model.*` (OpenCLIP bigG, with its
`text_projection` as [width, projection]); the refiner has only the OpenCLIP one, as `embedders.0`.
"""

from __future__ import annotations

import json
from pathlib import Path

RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_LAYERS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_LAYERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYERS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def to_ldm_state_dict(diffusers_folder: Path, family: str = "sd1") -> dict:
    """{original key: tensor} for the folder's unet, vae and text_encoder; family "sd2" writes OpenCLIP keys."""
    folder = Path(diffusers_folder)
    unet, unet_config = _read_component(folder / "unet")
    vae, vae_config = _read_component(folder / "vae")
    text, text_config = _read_component(folder / "text_encoder")
    text_to_ldm = {"sd1": _clip_to_ldm, "sd2": _open_clip_to_ldm}[family]
    return {
        **_prefixed("model.diffusion_model.", _rename(unet, _unet_blocks(unet_config))),
        **_prefixed("first_stage_model.", _vae_to_ldm(vae, vae_config)),
        **text_to_ldm(text, text_config),
    }


def to_sgm_state_dict(diffusers_folder: Path) -> dict:
    """{SGM key: tensor} of an SDXL folder (base: both text encoders; refiner: text_encoder_2 only)."""
    folder = Path(diffusers_folder)
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    return sgm_state_dict({name: _read_component(folder / name) for name in parts if (folder / name).is_dir()})


def sgm_state_dict(components: dict[str, tuple[dict, dict]]) -> dict:
    """{SGM key: tensor} from {component: (diffusers state dict, config)}; works on meta tensors too."""
    unet, unet_config = components["unet"]
    vae, vae_config = components["vae"]
    text_2, text_2_config = components["text_encoder_2"]
    state = {
        **_prefixed("model.diffusion_model.", _rename(unet, _unet_blocks(unet_config))),
        **_prefixed("first_stage_model.", _vae_to_ldm(vae, vae_config)),
    }
    if "text_encoder" in components:
        text, _ = components["text_encoder"]
        state.update(_prefixed("conditioner.embedders.0.transformer.text_model.", text))
        state.update(_prefixed("conditioner.embedders.1.model.", _open_clip_projected(text_2, text_2_config)))
    else:
        state.update(_prefixed("conditioner.embedders.0.model.", _open_clip_projected(text_2, text_2_config)))
    return state


def write_sgm_checkpoint(diffusers_folder: Path, path: Path) -> Path:
    """Save `to_sgm_state_dict` as a .safetensors file at `path`."""
    from safetensors.torch import save_file

    save_file(to_sgm_state_dict(diffusers_folder), str(path))
    return Path(path)


def _open_clip_projected(state: dict, config: dict) -> dict:
    """CLIPTextModelWithProjection's weights as OpenCLIP's (unprefixed): text_projection is x @ P, [width, proj]."""
    inner = {key.removeprefix("text_model."): t for key, t in state.items() if key != "text_projection.weight"}
    openclip = {key.removeprefix("cond_stage_model.model."): t for key, t in _open_clip_to_ldm(inner, config).items()}
    openclip["text_projection"] = state["text_projection.weight"].T.contiguous()
    return openclip


def write_ldm_checkpoint(diffusers_folder: Path, path: Path, family: str = "sd1") -> Path:
    """Save `to_ldm_state_dict` as a .safetensors file at `path`."""
    from safetensors.torch import save_file

    save_file(to_ldm_state_dict(diffusers_folder, family), str(path))
    return Path(path)


def _read_component(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    (weights,) = folder.glob("*.safetensors")
    return load_file(str(weights)), json.loads((folder / "config.json").read_text())


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + key: tensor for key, tensor in state.items()}


def _rename(state: dict, blocks: list[tuple[str, str, dict]]) -> dict:
    """Rename each key by the first block whose diffusers prefix it starts with, then its layer name."""
    renamed = {}
    for key, tensor in state.items():
        for prefix, ldm_prefix, layers in blocks:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                for name, ldm_name in layers.items():
                    if rest.startswith(name + "."):
                        rest = ldm_name + rest[len(name) :]
                        break
                key = ldm_prefix + rest
                break
        renamed[key] = tensor
    return renamed


def _unet_blocks(config: dict) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, original prefix, layer renames) for every U-Net block."""
    resnets = config["layers_per_block"]
    slots = resnets + 1  # per level: the resnets, then a downsampler (encoder) or one more resnet (decoder)
    blocks = [
        ("conv_in.", "input_blocks.0.0.", {}),
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("add_embedding.linear_1.", "label_emb.0.0.", {}),  # SDXL's text_time embedding
        ("add_embedding.linear_2.", "label_emb.0.2.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", RESNET_LAYERS),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", RESNET_LAYERS),
    ]
    for level, up_type in enumerate(config["up_block_types"]):
        for j in range(resnets):
            index = 1 + level * slots + j
            blocks.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{index}.0.", RESNET_LAYERS))
            blocks.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{index}.1.", {}))
        # The last level has no down/upsampler: those prefixes then match no key.
        blocks.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{(level + 1) * slots}.0.op.", {}))
        for j in range(slots):
            index = level * slots + j
            blocks.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{index}.0.", RESNET_LAYERS))
            blocks.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{index}.1.", {}))
        upsampler_slot = 2 if "CrossAttn" in up_type else 1  # after the last resnet and its attention
        last = level * slots + resnets
        blocks.append((f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{last}.{upsampler_slot}.", {}))
    return blocks


def _vae_to_ldm(state: dict, config: dict) -> dict:
    levels = len(config["block_out_channels"])
    resnets = config["layers_per_block"]
    blocks = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", {}),
        ("decoder.conv_norm_out.", "decoder.norm_out.", {}),
    ]
    for part in ("encoder", "decoder"):
        blocks.append((f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET_LAYERS))
        blocks.append((f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET_LAYERS))
        blocks.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION_LAYERS))
    for level in range(levels):
        for j in range(resnets):
            blocks.append((f"encoder.down_blocks.{level}.resnets.{j}.", f"encoder.down.{level}.block.{j}.", VAE_RESNET_LAYERS))
        blocks.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.", {}))
        ldm_level = levels - 1 - level
        for j in range(resnets + 1):
            blocks.append((f"decoder.up_blocks.{level}.resnets.{j}.", f"decoder.up.{ldm_level}.block.{j}.", VAE_RESNET_LAYERS))
        blocks.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{ldm_level}.upsample.", {}))
    renamed = _rename(state, blocks)
    # The original attention projections are 1x1 convolutions: [C, C] -> [C, C, 1, 1].
    return {
        key: tensor[:, :, None, None] if ".mid.attn_1." in key and tensor.ndim == 2 else tensor
        for key, tensor in renamed.items()
    }


def _clip_to_ldm(state: dict, config: dict) -> dict:
    # transformers 4 saves CLIPTextModel's keys under text_model., 5 without: the checkpoint has it once.
    state = {key.removeprefix("text_model."): tensor for key, tensor in state.items()}
    return _prefixed("cond_stage_model.transformer.text_model.", state)


def _open_clip_to_ldm(state: dict, config: dict) -> dict:
    import torch

    blocks = [
        ("embeddings.token_embedding.", "token_embedding.", {}),
        ("embeddings.position_embedding.weight", "positional_embedding", {}),
        ("final_layer_norm.", "ln_final.", {}),
    ]
    blocks += [
        (f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", OPEN_CLIP_LAYERS)
        for i in range(config["num_hidden_layers"])
    ]
    renamed = _rename(state, blocks)
    # OpenCLIP's attention keeps q, k and v as one [3 * width, width] input projection.
    for key in [key for key in renamed if ".self_attn.q_proj." in key]:
        block, kind = key.split(".self_attn.q_proj.")
        projections = [renamed.pop(f"{block}.self_attn.{p}_proj.{kind}") for p in "qkv"]
        renamed[f"{block}.attn.in_proj_{kind}"] = torch.cat(projections)
    return _prefixed("cond_stage_model.model.", renamed)


def write_controlnet_checkpoint(diffusers_folder: Path, path: Path, prefix: str = "control_model.") -> Path:
    """A diffusers ControlNetModel folder as lllyasviel's original single file (`control_sd15_*`): the
    U-Net encoder's names, `zero_convs.N.0` (controlnet_down_blocks), `middle_block_out.0`, and the
    hint network as `input_hint_block.0, 2, ..., 14` (conv_in, the blocks, conv_out), under `prefix`."""
    from safetensors.torch import save_file

    state, config = _read_component(Path(diffusers_folder))
    hint = len(config["conditioning_embedding_out_channels"] or (16, 32, 96, 256))
    blocks = [
        *(((f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", {}) for i in range(64))),
        ("controlnet_mid_block.", "middle_block_out.0.", {}),
        ("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", {}),
        *((f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * (j + 1)}.", {})
          for j in range(2 * (hint - 1))),
        ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (2 * (hint - 1) + 1)}.", {}),
        *_unet_blocks({**config, "up_block_types": config["down_block_types"]}),
    ]
    save_file(_prefixed(prefix, _rename(state, blocks)), str(path))
    return Path(path)
