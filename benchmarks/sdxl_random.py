"""Build the full-size SDXL base 1.0 architecture with seeded random weights, offline.

As benchmarks/sd15_random.py does for SD 1.5: no real weights can be downloaded here, so export, runtime
and benchmark measurements of SDXL at full size use this: the SDXL base configs bundled under
models/configs/sdxl, weights from a seed. The folder is a cache outside the repository (weights are
never committed). Sizes in fp32: U-Net 2.57 B parameters (10.3 GB), text_encoder_2 (OpenCLIP ViT-bigG,
projected) 695 M (2.8 GB), text_encoder (CLIP ViT-L) 123 M (0.5 GB), VAE 84 M (0.3 GB): ~13.9 GB on disk.

    python benchmarks/sdxl_random.py [--out ~/.cache/sdonnx/sdxl-random] [--seed 0] [--config FOLDER]
    sdonnx export ~/.cache/sdonnx/sdxl-random ./sdxl-onnx      # the export to measure

Memory: one component is built, saved and released at a time, in 2 GB shards (safetensors serializes a
shard's bytes before writing it), so the build peaks near the U-Net's 10.3 GB plus one shard.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
from pathlib import Path

from sdonnx.models import CLIP_TOKENIZER, CONFIGS
from sdonnx.models.checkpoints import save_text_encoder

DEFAULT_OUT = Path.home() / ".cache" / "sdonnx" / "sdxl-random"
SHARD = "2GB"
# SDXL's two tokenizers are CLIP's BPE; the second (OpenCLIP's) pads with "!" (token 0).
PAD_TOKENS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


def build(out: Path = DEFAULT_OUT, seed: int = 0, config: Path = CONFIGS / "sdxl") -> Path:
    """Write a diffusers folder of SDXL base 1.0's architecture (~13.9 GB fp32); reuse it if complete.

    config: the diffusers config folder to build (SDXL base by default; a smaller one for a quick check).
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config = Path(config)
    torch.manual_seed(seed)
    for name, build_module in (
        ("unet", lambda c: UNet2DConditionModel.from_config(c)),
        ("vae", lambda c: AutoencoderKL.from_config(c)),
        ("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c))),
        ("text_encoder_2", lambda c: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(c))),
    ):
        module = build_module(json.loads((config / name / "config.json").read_text())).eval()
        if name == "text_encoder":
            save_text_encoder(module, tmp / name)  # `text_model.`-prefixed: loadable by transformers 4.x (optimum)
        else:  # text_encoder_2 (CLIPTextModelWithProjection) keeps the prefix by itself
            module.save_pretrained(tmp / name, safe_serialization=True, max_shard_size=SHARD)
        del module
        gc.collect()
    EulerDiscreteScheduler.from_pretrained(config / "scheduler").save_pretrained(tmp / "scheduler")
    for name, pad_token in PAD_TOKENS.items():
        _write_tokenizer(tmp / name, pad_token)
    shutil.copy(config / "model_index.json", tmp / "model_index.json")
    tmp.rename(out)
    return out


def _write_tokenizer(folder: Path, pad_token: str) -> None:
    """The bundled CLIP tokenizer files (vocab.json, merges.txt: what every reader takes), with this pad token."""
    shutil.copytree(CLIP_TOKENIZER, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = json.loads((folder / name).read_text())
        settings["pad_token"] = pad_token
        (folder / name).write_text(json.dumps(settings, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=CONFIGS / "sdxl",
                        help="diffusers config folder to build (default: the bundled SDXL base 1.0)")
    args = parser.parse_args()
    print(build(args.out, args.seed, args.config))


if __name__ == "__main__":
    main()
