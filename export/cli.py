"""`sdonnx export SOURCE OUT`: the argparse front of export_model; each flag is one ExportConfig field."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

from sdonnx.config import config_from_args
from sdonnx.errors import InputError
from sdonnx.export import ATTENTION, DTYPES, OPSETS, ExportConfig, export_model

_DEFAULTS = {f.name: f.default for f in fields(ExportConfig)}
_STATIC_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand; its func is run()."""
    parser = subparsers.add_parser(
        "export",
        help="export a Stable Diffusion model to a checked ONNX folder",
        description="Export a diffusers folder, hub id or single-file checkpoint to ONNX (optimum's layout plus "
        "manifest.json). Every graph is checked against PyTorch; nothing is written at OUT unless all pass.",
    )
    parser.add_argument("source", metavar="SOURCE", help="diffusers folder, hub id (org/name) or .safetensors file")
    parser.add_argument("out", metavar="OUT", type=Path, help="folder to create")
    parser.add_argument(
        "--opset", type=int, default=_DEFAULTS["opset"],
        help=f"ONNX opset, {OPSETS.start}-{OPSETS.stop - 1} (default %(default)s)",
    )
    parser.add_argument(
        "--static-shape", metavar="BxHxW",
        help="pin the image batch B, height and width in pixels, e.g. 1x512x512; the U-Net gets batch 2B "
        "(uncond||cond). Prompt lengths stay dynamic (default: all dynamic)",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="load .ckpt/.pt/.pth/.bin weights (pickles can run code: only for files you trust)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument(
        "--min-psnr", type=float, default=_DEFAULTS["min_psnr"],
        help="per-graph parity floor against PyTorch, dB (default %(default)s)",
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help="single-file SOURCE only: diffusers config folder describing the checkpoint",
    )
    parser.add_argument(
        "--dtype", default=_DEFAULTS["dtype"], choices=DTYPES,
        help="fp16 | int8: quantize the checked fp32 export with the `sdonnx quantize` recipe of that name "
        "(SD 1.x/2.x; SDXL exports fp32 only for now) (default %(default)s)",
    )
    parser.add_argument(
        "--attention", default=_DEFAULTS["attention"], choices=ATTENTION,
        help="sliced: U-Net self-attention one head at a time in standard ONNX ops (about half the peak memory "
        "of full at 512 px, same speed); fused: every attention, the VAE's too, one ONNX Runtime MultiHeadAttention "
        "op (blocked kernels on CPU and CUDA); full: diffusers' attention as traced (default %(default)s)",
    )
    parser.add_argument("--lora", action="append", dest="lora_specs", metavar="FILE:WEIGHT",
                        help="merge this LoRA into the weights at WEIGHT (default 1) before export; repeatable")
    parser.add_argument("--recommended-steps", type=int, metavar="N",
                        help="record the model card's steps in the manifest, the default for requests naming none")
    parser.add_argument("--recommended-guidance", type=float, metavar="G",
                        help="the same for guidance (SDXL-Turbo: --recommended-steps 4 --recommended-guidance 0)")
    parser.add_argument("--no-safety-checker", dest="safety_checker", action="store_false", default=None,
                        help="leave out the source's safety checker (exported when the source has one)")
    parser.add_argument("--feature-cache", action="store_true", default=None,
                        help="also write unet_shallow/ and the U-Net's deep_feature output, so that generate "
                        "--cache-interval N can skip the deep U-Net on N-1 of every N steps (DeepCache)"),
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the ExportConfig from parsed arguments and export; returns the exit status."""
    from sdonnx.runtime.cli import parse_lora

    loras = tuple(parse_lora(spec) for spec in args.lora_specs or ())
    export_model(config_from_args(ExportConfig, args, static_shape=parse_static_shape(args.static_shape), loras=loras))
    return 0


def parse_static_shape(text: str | None) -> tuple[int, int, int] | None:
    """'1x512x512' -> (1, 512, 512); None stays None (dynamic shapes)."""
    if text is None:
        return None
    match = _STATIC_SHAPE.match(text.strip().lower())
    if not match:
        raise InputError("static_shape", text, "BxHxW in pixels, e.g. 1x512x512")
    batch, height, width = (int(g) for g in match.groups())
    return batch, height, width
