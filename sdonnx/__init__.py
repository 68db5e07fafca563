"""sdonnx: Stable Diffusion on ONNX Runtime, without PyTorch at run time.

`sdonnx.Pipeline` is the runtime (numpy + onnxruntime); `sdonnx.export` needs the `export`
extra (torch, diffusers). Importing `sdonnx` itself imports neither.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sdonnx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Pipeline", "GenerationConfig", "Control", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import sdonnx` (and the CLI's --help) does not load onnxruntime.
    if name in ("Pipeline", "GenerationConfig", "Control"):
        from sdonnx import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'sdonnx' has no attribute {name!r}")
