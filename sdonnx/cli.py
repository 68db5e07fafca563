"""The `sdonnx` command: one entry point whose subcommands come from the subpackages.

Each subpackage registers its own subcommands (`export`, `generate`, `info`, ...), so the CLI
never imports torch unless the chosen subcommand needs it. Errors users can cause (SdonnxError)
print as one clear line without a traceback and exit with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys

from sdonnx import __version__
from sdonnx.errors import SdonnxError


def build_parser() -> argparse.ArgumentParser:
    from sdonnx.export import cli as export_cli
    from sdonnx.quantize import cli as quantize_cli
    from sdonnx.runtime import cli as runtime_cli

    parser = argparse.ArgumentParser(
        prog="sdonnx", description="Stable Diffusion on ONNX Runtime: export checkpoints, generate images, inspect models."
    )
    parser.add_argument("--version", action="version", version=f"sdonnx {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export_cli.register(subparsers)
    runtime_cli.register(subparsers)
    quantize_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SdonnxError as e:
        print(f"sdonnx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdonnx {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
