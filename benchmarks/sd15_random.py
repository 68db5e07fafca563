"""Build the full-size Stable Diffusion 1.5 architecture with seeded random weights, offline.

No real weights can be downloaded here, so export, runtime and benchmark measurements at full
size use this: the real SD 1.5 configs bundled under models/configs/sd1, weights from a seed.
The folder is a cache outside the repository (weights are never committed).

    python benchmarks/sd15_random.py [--out ~/.cache/sdonnx/sd15-random] [--seed 0]
    python benchmarks/sd15_random.py --controlnet [--out ~/.cache/sdonnx/sd15-controlnet-random]

--controlnet writes a ControlNetModel folder of SD 1.5's ControlNet architecture (lllyasviel's
sd-controlnet-*: the U-Net's encoder, 3-channel hint, zero convolutions) with random weights,
the zero-initialized convolutions included, so its residuals are not all zero.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
from pathlib import Path

from sdonnx.models import CLIP_TOKENIZER, CONFIGS
from sdonnx.models.checkpoints import save_text_encoder

DEFAULT_OUT = Path.home() / ".cache" / "sdonnx" / "sd15-random"
DEFAULT_CONTROLNET_OUT = Path.home() / ".cache" / "sdonnx" / "sd15-controlnet-random"


def _fresh_partial(out: Path) -> Path:
    """An empty OUT.partial beside `out` (a killed earlier build's removed), renamed to `out` when complete."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def build(out: Path = DEFAULT_OUT, seed: int = 0) -> Path:
    """Write a diffusers folder of SD 1.5's architecture (~4.3 GB fp32); reuse it if complete."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    tmp = _fresh_partial(out)
    config = CONFIGS / "sd1"
    torch.manual_seed(seed)
    # One component at a time, so peak memory stays at the U-Net's 3.4 GB.
    for name, build_module in (
        ("unet", lambda c: UNet2DConditionModel.from_config(c)),
        ("vae", lambda c: AutoencoderKL.from_config(c)),
        ("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c))),
    ):
        module = build_module(json.loads((config / name / "config.json").read_text()))
        if name == "text_encoder":
            save_text_encoder(module, tmp / name)  # loadable by transformers 4.x (optimum) too
        else:
            module.save_pretrained(tmp / name, safe_serialization=True)
        del module
        gc.collect()
    PNDMScheduler.from_pretrained(config / "scheduler").save_pretrained(tmp / "scheduler")
    shutil.copytree(CLIP_TOKENIZER, tmp / "tokenizer")
    shutil.copy(config / "model_index.json", tmp / "model_index.json")
    tmp.rename(out)
    return out


def build_controlnet(out: Path = DEFAULT_CONTROLNET_OUT, seed: int = 0) -> Path:
    """Write a diffusers ControlNetModel folder of SD 1.5's ControlNet (~1.4 GB fp32); reuse it if complete."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    tmp = _fresh_partial(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd1" / "unet" / "config.json").read_text()))
    net = ControlNetModel.from_unet(unet)
    del unet
    with torch.no_grad():  # from_unet zero-initializes the residual convolutions
        for module in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            torch.nn.init.normal_(module.weight, std=0.02)
    net.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--controlnet", action="store_true", help="build the ControlNet instead")
    args = parser.parse_args()
    if args.controlnet:
        print(build_controlnet(args.out or DEFAULT_CONTROLNET_OUT, args.seed))
    else:
        print(build(args.out or DEFAULT_OUT, args.seed))


if __name__ == "__main__":
    main()
