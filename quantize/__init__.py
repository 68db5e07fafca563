"""`sdonnx quantize`: an fp32 model folder to an fp16 / int8 / int4 variant, through ONNX Runtime's tooling.

The work is in `quantizer` (QuantizeConfig, quantize_model), `convert`, `check` and `calibration`;
`recipes` names what each recipe does per component. They need onnx and onnx-ir (the `quantize`
extra), which the lean runtime does not install, so this package imports them only on first use:
`sdonnx --help` and `sdonnx generate` work without them.
"""

from __future__ import annotations

__all__ = ["QuantizeConfig", "quantize_model"]

INSTALL_HINT = 'pip install "sdonnx[quantize]"'


def __getattr__(name: str):
    if name in __all__:
        from sdonnx.quantize import quantizer

        return getattr(quantizer, name)
    raise AttributeError(f"module 'sdonnx.quantize' has no attribute {name!r}")
