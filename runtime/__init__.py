"""The sdonnx runtime: Stable Diffusion from ONNX graphs with numpy and onnxruntime, never torch.

`Pipeline.load(folder)` then `pipe(prompt)` -> PIL images. Attributes load lazily so that
`sdonnx.runtime.manifest` (which the exporter writes) does not pull in onnxruntime.
"""

from __future__ import annotations

__all__ = ["Pipeline", "GenerationConfig", "GenerationCancelled", "Control"]


def __getattr__(name: str):
    if name in __all__:
        from sdonnx.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdonnx.runtime' has no attribute {name!r}")
