"""`sdonnx quantize MODEL OUT --recipe RECIPE`: the argparse front of quantize_model; one flag per field."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from sdonnx.config import config_from_args
from sdonnx.errors import SdonnxError
from sdonnx.quantize import INSTALL_HINT
from sdonnx.quantize.recipes import DEFAULT_BLOCK_SIZE, DEFAULT_CALIBRATION_STEPS, DEFAULT_RECIPE, RECIPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `quantize` subcommand; its func is run()."""
    recipes = "; ".join(f"{name}: " + ", ".join(f"{c} {p}" for c, p in r.items()) for name, r in RECIPES.items())
    parser = subparsers.add_parser(
        "quantize",
        help="make an fp16 / int8 / int4 variant of an exported fp32 model folder",
        description="Convert each graph of an fp32 model folder to the precision its recipe names, check it "
        "against fp32 (a graph giving NaN/inf stays fp32) and write a new folder with its manifest. "
        f"Recipes: {recipes}.",
    )
    parser.add_argument("model", metavar="MODEL", help="fp32 model folder (sdonnx export or optimum layout)")
    parser.add_argument("out", metavar="OUT", type=Path, help="folder to create")
    # No argparse `choices`: QuantizeConfig names the known recipes in its own error.
    parser.add_argument(
        "--recipe", default=DEFAULT_RECIPE, help="%(default)s by default; one of " + ", ".join(RECIPES)
    )
    parser.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
        help="int4: weights per scale along K, a power of two >= 16 (default %(default)s)",
    )
    parser.add_argument(
        "--calibration-prompts", type=Path, default=None, metavar="FILE",
        help="int8-static*: one prompt per line (default: a bundled list of 8)",
    )
    parser.add_argument(
        "--calibration-steps", type=int, default=DEFAULT_CALIBRATION_STEPS,
        help="int8-static*: sampler steps per prompt, each step's U-Net inputs recorded (default %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the QuantizeConfig from parsed arguments (each dest is a field name) and quantize."""
    for module in ("onnx", "onnx_ir"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise SdonnxError(f"sdonnx quantize needs onnx and onnx-ir ({module} is missing: {e}); "
                              f"install them with: {INSTALL_HINT}") from None
    from sdonnx.quantize.quantizer import QuantizeConfig, quantize_model

    quantize_model(config_from_args(QuantizeConfig, args))
    return 0
