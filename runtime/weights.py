"""Weight maps: which ONNX initializer holds each PyTorch module's weight, and in which layout.

LoRAs name modules as diffusers and transformers do ("down_blocks.0.attentions.0.transformer_blocks.0.
attn1.to_q", "encoder.layers.0.self_attn.q_proj"); ONNX graphs name initializers as the exporter chose
("onnx::MatMul_2923", or the parameter's name holding its transpose). `sdonnx export` records the map
in the manifest after checking every entry against the PyTorch weights; for folders without one
(older exports, optimum's) `derive` reads it from the graph: the exporter names each node after its
module (`/unet/down_blocks.0/.../to_q/MatMul`), and the node's op says the layout.

Layouts (of the stored tensor, relative to PyTorch's weight):
- "in_out": a Linear's weight transposed, [in, out] (MatMul's B; Gemm's B without transB);
- "out_in": as PyTorch, [out, in] (Gemm with transB=1);
- "conv": as PyTorch, [out, in, kh, kw];
- "rows": an embedding table as PyTorch, [vocabulary, width] (Gather's data; textual inversion).
A quantized weight (ONNX Runtime's quantizers) is an integer tensor with a scale and zero point:
value = (q - zero_point) * scale, per tensor or per channel along `axis`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sdonnx.errors import ModelError
from sdonnx.runtime.onnx_file import Graph

LAYOUTS = ("in_out", "out_in", "conv", "rows")
# Our export traces each model inside a wrapper whose attribute is one of these; optimum's has none.
_WRAPPERS = ("unet", "text_encoder", "text_encoder_2")
_TEXT_MODEL = "text_model."  # transformers' CLIPTextModel(WithProjection) keeps its transformer here
_FLOAT = ("float32", "float16")


@dataclass(frozen=True)
class WeightRef:
    """Where one module's weight is: the initializer, its layout, and how it is quantized, if it is."""

    initializer: str
    layout: str
    scale: str | None = None
    zero_point: str | None = None
    axis: int | None = None  # per-channel quantization axis of the stored tensor; None: per tensor

    def to_json(self) -> list[Any]:
        head = [self.initializer, self.layout]
        return head if self.scale is None else [*head, self.scale, self.zero_point, self.axis]

    @classmethod
    def from_json(cls, value: Any, where: str) -> WeightRef:
        ok = (isinstance(value, list) and len(value) in (2, 5) and all(isinstance(v, str) for v in value[:4])
              and value[1] in LAYOUTS and (len(value) == 2 or value[4] is None or isinstance(value[4], int)))
        if not ok:
            raise ModelError(f"{where}: got {value!r}, expected [initializer, layout] or "
                             f"[initializer, layout, scale, zero_point, axis] with layout in {list(LAYOUTS)}")
        return cls(*value)


WeightMap = Mapping[str, WeightRef]


def read_map(raw: Any, where: str) -> dict[str, WeightRef]:
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: got {type(raw).__name__}, expected a JSON object of module -> weight")
    return {module: WeightRef.from_json(value, f"{where}.{module}") for module, value in raw.items()}


def module_path(node_name: str) -> str | None:
    """'/unet/down_blocks.0/attentions.0/proj_in/Conv' -> 'down_blocks.0.attentions.0.proj_in' (the
    wrapper and transformers' `text_model.` dropped); None for a node not named after a module."""
    parts = node_name.strip("/").split("/")[:-1]
    if parts and parts[0] in _WRAPPERS:
        parts = parts[1:]
    path = ".".join(parts)
    return path.removeprefix(_TEXT_MODEL) or None


def derive(graph: Graph) -> dict[str, WeightRef]:
    """The weight map of a graph, from its node names and ops (see the module docstring). Reads
    float weights and ONNX Runtime's quantized ones: QDQ (a DequantizeLinear feeding the op names the
    scale and zero point) and dynamic (MatMulInteger/ConvInteger on `X_quantized`, whose scale and
    zero point the quantizer names `X_scale`, `X_zero_point`). A module read through two different
    initializers is left out: which one a LoRA means cannot be told."""
    dequantized = {node.outputs[0]: node for node in graph.nodes if node.op_type == "DequantizeLinear"}
    found: dict[str, WeightRef | None] = {}
    for node in graph.nodes:
        path = module_path(node.name)
        if node.op_type not in _READERS or len(node.inputs) < 2 or path is None:
            continue
        ref = _table(graph, node) if node.op_type == "Gather" else _weight(graph, node, dequantized)
        if ref is None:
            continue
        found[path] = None if path in found and found[path] != ref else ref
    return {path: ref for path, ref in found.items() if ref is not None}


_READERS = ("MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger", "Gather")


def _table(graph: Graph, node) -> WeightRef | None:
    """An embedding module's table: a float initializer Gather reads rows of (axis 0)."""
    tensor = graph.initializers.get(node.inputs[0])
    if tensor is None or tensor.dtype not in _FLOAT or len(tensor.shape) != 2 or node.ints.get("axis", 0) != 0:
        return None
    return WeightRef(tensor.name, "rows")


def _weight(graph: Graph, node, dequantized) -> WeightRef | None:
    if node.op_type == "Gemm" and node.ints.get("transA", 0):
        return None
    layout = ("conv" if node.op_type in ("Conv", "ConvInteger")
              else "out_in" if node.op_type == "Gemm" and node.ints.get("transB", 0) else "in_out")
    name = node.inputs[1]
    tensors = graph.initializers
    if name in tensors and tensors[name].dtype in _FLOAT and node.op_type in ("MatMul", "Gemm", "Conv"):
        ref = WeightRef(name, layout)
    elif name in dequantized and node.op_type in ("MatMul", "Gemm", "Conv"):  # QDQ
        dq = dequantized[name]
        if len(dq.inputs) < 3 or not all(i in tensors for i in dq.inputs[:3]):
            return None
        ref = WeightRef(dq.inputs[0], layout, dq.inputs[1], dq.inputs[2],
                        dq.ints.get("axis", 1) if tensors[dq.inputs[1]].shape not in ((), (1,)) else None)
    elif node.op_type in ("MatMulInteger", "ConvInteger") and name.endswith("_quantized"):  # dynamic
        base = name.removesuffix("_quantized")
        scale, zero_point = f"{base}_scale", f"{base}_zero_point"
        if not all(n in tensors for n in (name, scale, zero_point)) or tensors[scale].shape not in ((), (1,)):
            return None
        ref = WeightRef(name, layout, scale, zero_point, None)
    else:
        return None
    stored = tensors[ref.initializer]
    if ref.scale is not None and stored.dtype not in ("uint8", "int8"):  # int4 blocks: not a weight LoRAs can change
        return None
    return ref if len(stored.shape) in (2, 4) else None


def torch_shape(stored: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The PyTorch weight's shape for a stored tensor of `stored` shape."""
    return (stored[1], stored[0]) if layout == "in_out" else tuple(stored)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """(q - zero_point) * scale in float32, per tensor or per channel along `axis`."""
    shape = [1] * q.ndim
    if axis is not None and scale.size > 1:
        shape[axis] = -1
    zero_point, scale = zero_point.astype(np.float32).reshape(shape), scale.astype(np.float32).reshape(shape)
    return (q.astype(np.float32) - zero_point) * scale


def quantize_like(values: np.ndarray, q_dtype: np.dtype, scale_dtype: np.dtype, axis: int | None,
                  per_channel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero_point) for `values` in the scheme of the tensor it replaces, as ONNX Runtime's
    quantizers compute them: uint8 asymmetric over [min(v, 0), max(v, 0)]; int8 symmetric over
    [-max|v|, max|v|]; per tensor, or per channel along `axis`."""
    reduce = tuple(i for i in range(values.ndim) if i != axis) if per_channel else None
    lo = np.minimum(values.min(axis=reduce, keepdims=per_channel), 0).astype(np.float32)
    hi = np.maximum(values.max(axis=reduce, keepdims=per_channel), 0).astype(np.float32)
    if np.dtype(q_dtype) == np.uint8:
        qmin, qmax = 0, 255
        scale = (hi - lo) / (qmax - qmin)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        zero_point = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    else:
        qmin, qmax = -127, 127
        scale = (np.maximum(np.abs(lo), np.abs(hi)) * 2 / (qmax - qmin)).astype(np.float32)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        zero_point = np.zeros_like(scale)
    q = np.clip(np.round(values / scale) + zero_point, qmin, qmax).astype(q_dtype)
    flat = (lambda a: a.reshape(-1)) if per_channel else (lambda a: a.reshape(()))
    return q, flat(scale).astype(scale_dtype), flat(zero_point).astype(q_dtype)
