"""The `sdonnx` command (also `python -m sdonnx`): one entry point whose subcommands come from the
subpackages.

Each subpackage registers its own subcommands (`export`, `generate`, `info`, ...), so the CLI
never imports torch unless the chosen subcommand needs it. Errors users can cause (SdonnxError)
print as one clear line without a traceback and exit with status 2, naming the flag as typed
(`--init-image`, not the API's `image`); warnings print once each, as one line; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from sdonnx import __version__
from sdonnx.errors import InputError, SdonnxError

# API field names that the CLI spells otherwise (the rest are their flag with dashes).
FLAG_FOR_FIELD = {
    "image": "--init-image", "init_image": "--init-image", "height": "--size", "width": "--size",
    "from_png": "--from-png", "model": "--model", "out": "OUT", "source": "SOURCE", "prompt": "PROMPT",
    "crops_coords_top_left": "--crop-top-left", "loras": "--lora",
    "control.model": "--control", "control.image": "--control-image", "control.scale": "--control-scale",
    "control.start": "--control-start", "control.end": "--control-end", "control.resize": "--control-resize",
    "control.guess_mode": "--control-guess-mode",
}


def build_parser() -> argparse.ArgumentParser:
    from sdonnx.export import cli as export_cli
    from sdonnx.quantize import cli as quantize_cli
    from sdonnx.runtime import cli as runtime_cli
    from sdonnx.serve import cli as serve_cli

    parser = argparse.ArgumentParser(
        prog="sdonnx", description="Stable Diffusion on ONNX Runtime: export checkpoints, generate images, inspect models."
    )
    parser.add_argument("--version", action="version", version=f"sdonnx {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export_cli.register(subparsers)
    runtime_cli.register(subparsers)
    quantize_cli.register(subparsers)
    serve_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_joined_dash_values(parser, sys.argv[1:] if argv is None else argv))
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if str(message) not in shown:
            shown.add(str(message))
            print(f"sdonnx {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return int(args.func(args) or 0)
    except InputError as e:
        print(f"sdonnx {args.command}: error: {_as_typed(e)}", file=sys.stderr)
        return 2
    except SdonnxError as e:
        print(f"sdonnx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdonnx {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _as_typed(error: InputError) -> str:
    """The error with its field named as the flag the user typed."""
    field = error.field
    if field.startswith("parameters:"):  # a value read from a --from-png file: say where it came from
        return f"--from-png {field}: got {error.received!r}, expected {error.expected}"
    typed_as_is = not field.isidentifier() or field.isupper()  # "MODEL", "OUT": positional arguments
    flag = FLAG_FOR_FIELD.get(field, field if typed_as_is else "--" + field.replace("_", "-"))
    return f"{flag}: got {error.received!r}, expected {error.expected}"


def _joined_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """["--size", "-64x64"] -> ["--size=-64x64"]: argparse reads a value that starts with '-' as a flag
    and says "expected one argument", which hides the real mistake; joined, the value gets its own error."""
    flags = {option for action in _all_actions(parser) if action.nargs is None and action.option_strings
             for option in action.option_strings}
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in flags and arg.startswith("-") and not arg.startswith("--") and arg not in flags:
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += _all_actions(sub)
    return actions


if __name__ == "__main__":
    sys.exit(main())
