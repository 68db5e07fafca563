"""Tiny Stable Diffusion pipelines with seeded random weights in the real diffusers/transformers classes.

Two shapes cover what differs between SD families:
- "sd1": epsilon prediction, PNDM scheduler, head dim 8, cross-attention 32, `<|endoftext|>` padding;
- "sd2": v-prediction, DDIM scheduler, linear projections, per-block head counts, cross-attention 48,
  `!` padding (as SD 2.x's OpenCLIP tokenizer).
Both use SD's x8 VAE (four levels) and the real CLIP BPE vocabulary, saved as safetensors.

`build_tiny_sdxl` writes the two SDXL layouts (SDXL_KINDS), with the SDXL VAE's force_upcast and scaling 0.13025:
- "sdxl": StableDiffusionXLPipeline: CLIPTextModel (32 wide, 2 layers) + CLIPTextModelWithProjection (40 wide,
  3 layers, projection 32), U-Net with text_time conditioning (6 time ids x 8), cross-attention 72 = 32 + 40,
  per-block heads (2, 4) and transformer_layers_per_block (1, 2), so the mid block has two transformer layers;
- "sdxl_refiner": StableDiffusionXLImg2ImgPipeline: text_encoder_2 and tokenizer_2 only, cross-attention 40,
  5 time ids (aesthetic score), two transformer layers in every attention block.

`build_tiny_upscaler` writes SD's x4 upscaler layout (StableDiffusionUpscalePipeline): a 7-channel U-Net
(latents || the noised low-res image) with 1000 noise-level class embeddings and cross-attention only
(no self-attention) above its lowest level, an x4 VAE (three levels,
scaling 0.08333), a v-prediction DDIM scheduler and the DDPM low_res_scheduler, max_noise_level 350,
as stabilityai/stable-diffusion-x4-upscaler's configs have them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "configs" / "clip-tokenizer"
KINDS = ("sd1", "sd2")
SDXL_KINDS = ("sdxl", "sdxl_refiner")



def tiny_vae(**extra):
    """The tiny AutoencoderKL of every tiny model (x8, 4 latent channels); extra: SDXL's scaling and upcast."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    )

def build_tiny_pipeline(kind: str, out: Path, seed: int = 0) -> Path:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
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
    vae = tiny_vae()
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


def build_tiny_sdxl(kind: str, out: Path, seed: int = 0) -> Path:
    """Write an SDXL-layout diffusers folder ("sdxl": base, "sdxl_refiner": the img2img refiner)."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in SDXL_KINDS:
        raise ValueError(f"kind: got {kind!r}, expected one of {SDXL_KINDS}")
    refiner = kind == "sdxl_refiner"
    out = Path(out)
    torch.manual_seed(seed)
    width, width_2, projection, time_dim = 32, 40, 32, 8
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2 if refiner else (1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=width_2 if refiner else width + width_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=projection + time_ids * time_dim,
        norm_num_groups=16,
    )
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)
    clip = dict(vocab_size=49408, num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=width_2, intermediate_size=2 * width_2, num_hidden_layers=3, hidden_act="gelu",
                       projection_dim=projection, pad_token_id=0, **clip)
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear",
    )
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    text_encoder_2.save_pretrained(out / "text_encoder_2", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    _write_tokenizer(out / "tokenizer_2", pad_token="!")
    if not refiner:
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                           hidden_act="quick_gelu", projection_dim=width, pad_token_id=49407, **clip)
        )
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        _write_tokenizer(out / "tokenizer", pad_token="<|endoftext|>")
    model_index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": not refiner,
        "image_encoder": [None, None],
        **({"requires_aesthetics_score": True} if refiner else {}),
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return out


def build_tiny_upscaler(out: Path, seed: int = 0) -> Path:
    """Write a StableDiffusionUpscalePipeline folder (adds low_res_scheduler/ to SD's parts)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    torch.manual_seed(seed)
    hidden = 32
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=7,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),  # as the x4's: no self-attention but at the lowest level
        num_class_embeds=1000,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=hidden,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    )
    common = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, **common)
    low_res_scheduler = DDPMScheduler(clip_sample=False, variance_type="fixed_small", **common)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    low_res_scheduler.save_pretrained(out / "low_res_scheduler")
    _write_tokenizer(out / "tokenizer", pad_token="!")
    model_index = {
        "_class_name": "StableDiffusionUpscalePipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "low_res_scheduler": ["diffusers", "DDPMScheduler"],
        "max_noise_level": 350,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "watermarker": [None, None],
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
    parser.add_argument("kind", choices=(*KINDS, *SDXL_KINDS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build = build_tiny_sdxl if args.kind in SDXL_KINDS else build_tiny_pipeline
    print(build(args.kind, args.out, args.seed))
