"""Tiny Stable Diffusion pipelines with seeded random weights in the real diffusers/transformers classes.

Two shapes cover what differs between SD families:
- "sd1": epsilon prediction, PNDM scheduler, head dim 8, cross-attention 32, `<|endoftext|>` padding;
- "sd2": v-prediction, DDIM scheduler, linear projections, per-block head counts, cross-attention 48,
  `!` padding (as SD 2.x's OpenCLIP tokenizer).
Both use SD's x8 VAE (four levels) and the real CLIP BPE vocabulary, saved as safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "configs" / "clip-tokenizer"
KINDS = ("sd1", "sd2")


def build_tiny_pipeline(kind: str, out: Path, seed: int = 0) -> Path:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in KINDS:
        raise ValueError(f"kind: got {kind!r}, expected one of {KINDS}")
    sd2 = kind == "sd2"
    out = Path(out)
    torch.manual_seed(seed)
    hidden = 48 if sd2 else 32
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            projection_dim=hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if sd2 else 49407,
        )
    )
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if sd2:
        scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, **common)
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)

    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    _write_tokenizer(out / "tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return out


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(CLIP_TOKENIZER / name, folder / name)
    config = json.loads((CLIP_TOKENIZER / "tokenizer_config.json").read_text())
    config["pad_token"] = pad_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = json.loads((folder / "special_tokens_map.json").read_text())
    special["pad_token"] = pad_token
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random-weight SD pipeline (diffusers folder).")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_pipeline(args.kind, args.out, args.seed))
