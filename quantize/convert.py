"""One graph, one precision: ONNX Runtime's own converters, with the traps of SD graphs handled.

- Graphs over protobuf's 2 GB limit (the SD 1.5 U-Net is 3.4 GB, SDXL's 10.3 GB) are loaded with
  their external data and handed to the quantizers as ModelProtos: ORT then runs shape inference on
  a copy in its own temporary folder (saved with external data) instead of calling `infer_shapes` on
  the proto, which fails past 2 GB, or writing a `-inferred` file into the source folder. The result
  is saved with external data again. Dynamic int8 does without those copies, which took 11.2 GB for
  SDXL's 2.6 GB text_encoder_2 and more than 24 GB for its 10.3 GB U-Net: shape inference runs on
  the graph without its weights, and ORT's ONNXQuantizer (what `quantize_dynamic` calls) gets that
  graph, loading each weight from the external data as it quantizes it. (onnx refuses external data
  reached through symbolic or hard links, so a linked copy of the source folder is no way out.) The passes that serialize the proto themselves (shape inference before fp16
  conversion, which needs every tensor's type; the opset-21 upgrade that 16-bit activations need)
  run on the graph without its weights, which works at any size, and the weights are loaded after.
- CLIP's causal mask is a -inf constant (`Where(mask, -inf, scores)`); a calibrated range that
  includes it has a NaN zero point. Static quantization only quantizes MatMul/Conv/Gemm inputs and
  also excludes every node that reads a non-finite (or ±3e38-sized) constant.
- Dynamic int8 uses uint8 weights (activations are uint8 either way): on AVX2-without-VNNI CPUs
  u8u8 MatMulInteger was measured 2-5x faster than u8s8 (issue #6; not re-measured on VNNI).
- Static QDQ: per-channel int8 weights, uint8 activations (uint16 for int8-static-a16).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from onnxruntime.quantization import CalibrationDataReader

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA = "model.onnx_data"
# Kept fp32 in fp16 graphs: softmax overflows in fp16 (SD 2.x attention -> black images), and the
# normalizations' mean/variance lose too much range; besides ORT's default list of unsupported ops.
FP16_KEEP_FP32 = ("Softmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization", "Erf")
DYNAMIC_OPS = {"int8": ("MatMul", "Conv", "Gemm"), "int8-matmul": ("MatMul", "Gemm")}
STATIC_OPS = ("MatMul", "Conv", "Gemm")
# Activation type of each static precision. 16-bit activations need ORT's com.microsoft Q/DQ below
# opset 21; on the tiny U-Net they lift the check from 32 to 52 dB for a few more percent of file.
STATIC_ACTIVATIONS = {"int8-static": "QUInt8", "int8-static-a16": "QUInt16"}
HUGE = 1e30  # finfo(float32).min masks (transformers >= 4.3x) are as bad as -inf for calibration

Feeds = Mapping[str, np.ndarray]


def is_large(path: Path) -> bool:
    """True when the graph keeps its weights in external data or its file exceeds protobuf's limit."""
    if path.stat().st_size > PROTOBUF_LIMIT:
        return True
    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def op_types(path: Path) -> set[str]:
    """The operator types of a graph (weights are not read)."""
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def save(model: onnx.ModelProto, dst: Path, large: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True, location=EXTERNAL_DATA)


def to_fp16(src: Path, dst: Path, large: bool, **_) -> None:
    """fp16 weights and math, fp32 IO (keep_io_types): the runtime's latents and embeddings stay fp32,
    and the two boundary Casts cost nothing next to the graph."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(
        _load(src, onnx.shape_inference.infer_shapes),
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32],
        disable_shape_infer=True,
    )
    _drop_duplicate_nodes(model)
    save(model, dst, large)


def _load(src: Path, transform: Callable[[onnx.ModelProto], onnx.ModelProto]) -> onnx.ModelProto:
    """Apply an onnx pass that serializes the model (shape inference, version conversion) to the graph
    without its weights, which stays far below protobuf's 2 GB at any model size; then load the weights."""
    model = transform(onnx.load(str(src), load_external_data=False))
    load_external_data_for_model(model, str(src.parent))
    return model


def _to_opset_21(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's quantizer upgrades models below opset 21 for 16-bit activations itself, which fails past 2 GB."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    return model if opset >= 21 else onnx.version_converter.convert_version(model, 21)


def _drop_duplicate_nodes(model: onnx.ModelProto) -> None:
    """Remove exact copies of a node: float16.py inserts one fp32 Cast per blocked consumer of a
    tensor under the same name, and two producers of one tensor make the graph invalid."""
    seen: set[bytes] = set()
    kept = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def int8_dynamic(src: Path, dst: Path, large: bool, *, precision: str, **_) -> None:
    """What `quantize_dynamic(model, dst, op_types, weight_type=QUInt8)` does, holding the fp32 weights
    once, loaded as they are quantized (see the module docstring)."""
    from onnxruntime.quantization import QuantType, onnx_quantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata, update_opset_version

    # Shapes inferred on the graph without its weights; the weights stay on disk for now.
    model = update_opset_version(onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False)),
                                 QuantType.QUInt8)
    add_infer_metadata(model)  # so the quantizer's constructor does not re-save and reload the model
    # After turning Gemms into MatMuls the quantizer re-infers shapes through a deep copy that it saves
    # and reloads with all weights; inferring on the graph as it is gives the same value_info. ONNX
    # loads an external tensor, when the quantizer first reads it, relative to the working directory.
    with _replaced(onnx_quantizer, "save_and_reload_model_with_shape_infer", _infer), _working_dir(src.parent):
        quantizer = onnx_quantizer.ONNXQuantizer(
            model,
            False,  # per_channel
            False,  # reduce_range
            QuantizationMode.IntegerOps,
            False,  # static
            QuantType.QUInt8,  # weights
            QuantType.QUInt8,  # activations: dynamic quantization has only uint8
            None,  # tensors_range
            [],  # nodes_to_quantize: all
            [],  # nodes_to_exclude
            list(DYNAMIC_OPS[precision]),
            {"MatMulConstBOnly": True},
        )
        del model
        quantizer.quantize_model()
    load_external_data_for_model(quantizer.model.model, str(src.parent))  # what stays float: biases, norms
    save(quantizer.model.model, dst, large)


@contextmanager
def _replaced(module, name: str, value) -> Iterator[None]:
    """module.name = value for the block (left alone if this onnxruntime has no such name)."""
    if not hasattr(module, name):
        yield
        return
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    import os

    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    inferred = onnx.shape_inference.infer_shapes(model)
    add_infer_metadata(inferred)
    return inferred


def int8_static(src: Path, dst: Path, large: bool, *, precision: str, calibration: Sequence[Feeds], **_) -> None:
    """QDQ with per-channel int8 weights and 8- or 16-bit activations whose ranges come from `calibration`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    activations = QuantType[STATIC_ACTIVATIONS[precision]]
    wide = activations == QuantType.QUInt16
    model = _load(src, _to_opset_21) if wide else onnx.load(str(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        model,
        str(dst),
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(STATIC_OPS),
        per_channel=True,
        activation_type=activations,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=sorted(nonfinite_consumers(model)),
        use_external_data_format=large,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"UseQDQContribOps": wide},
    )


def int4_weights(src: Path, dst: Path, large: bool, *, block_size: int, **_) -> None:
    """4-bit weights, fp32 activations: MatMulNBits (ORT's n-bit quantizer) for the MatMuls, and
    the Conv weights as int4 blocks behind a DequantizeLinear.

    ORT's quantizers have no weight-only Conv path, and in a U-Net the convolutions hold most of the
    weights (73% in SD 1.5), so without them int4 would shrink the file by 1.3x. DequantizeLinear
    takes blocked int4 from opset 21 on, and ORT's CPU kernel runs it: the int4 weights stay int4 in
    memory and are expanded per run.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _load(src, _to_opset_21)
    int4_conv_weights(model, block_size)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True)
    quantizer.process()
    save(quantizer.model.model, dst, large)


def int4_conv_weights(model: onnx.ModelProto, block_size: int) -> int:
    """Rewrite every Conv whose weight is an initializer used once as DequantizeLinear(int4) -> Conv.

    Symmetric blocks of `block_size` input channels (the last one may be partial), one fp32 scale
    per block: the same layout MatMulNBits uses along K. Returns how many convolutions changed.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, changed = [], 0
    for node in graph.node:
        weight = node.input[1] if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight in initializers and uses[weight] == 1 and initializers[weight].data_type == onnx.TensorProto.FLOAT:
            quantized, scale = _int4_blocks(weight, numpy_helper.to_array(initializers[weight]), block_size)
            graph.initializer.remove(initializers[weight])
            graph.initializer.extend([quantized, scale])
            nodes.append(onnx.helper.make_node(
                "DequantizeLinear", [quantized.name, scale.name], [weight], name=f"{node.name}/int4_weight",
                axis=1, block_size=block_size,
            ))
            changed += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return changed


def _int4_blocks(name: str, weight: np.ndarray, block_size: int) -> tuple[onnx.TensorProto, onnx.TensorProto]:
    """fp32 [O, I, ...] -> (int4 [O, I, ...], fp32 scales [O, ceil(I / block_size), ...]), symmetric."""
    out_channels, in_channels = weight.shape[:2]
    padded = np.pad(weight, [(0, 0), (0, -in_channels % block_size)] + [(0, 0)] * (weight.ndim - 2))
    blocks = padded.reshape(out_channels, -1, block_size, *weight.shape[2:])
    scale = np.abs(blocks).max(axis=2) / 7
    scale[scale == 0] = 1.0
    values = np.clip(np.round(blocks / scale[:, :, None]), -8, 7).astype(np.int8)
    values = values.reshape(padded.shape)[:, :in_channels]
    nibbles = (values.ravel() & 0x0F).astype(np.uint8)
    nibbles = np.append(nibbles, np.uint8(0)) if nibbles.size % 2 else nibbles
    packed = nibbles[0::2] | (nibbles[1::2] << 4)  # ONNX int4: the first element in the low nibble
    quantized = onnx.helper.make_tensor(f"{name}_int4", onnx.TensorProto.INT4, weight.shape, packed.tobytes(), raw=True)
    return quantized, numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")


def copy_graph(src: Path, dst: Path, large: bool, **_) -> None:
    save(onnx.load(str(src)), dst, large)


CONVERTERS: dict[str, Callable[..., None]] = {
    "fp32": copy_graph,
    "fp16": to_fp16,
    "int8": int8_dynamic,
    "int8-matmul": int8_dynamic,
    "int8-static": int8_static,
    "int8-static-a16": int8_static,
    "int4": int4_weights,
}


def convert_graph(precision: str, src: Path, dst: Path, *, block_size: int, calibration: Sequence[Feeds] = ()) -> None:
    """Write `src` converted to `precision` at `dst` (with external data beside it when large)."""
    with _quiet_ort_logging():
        CONVERTERS[precision](
            src, dst, is_large(src), precision=precision, block_size=block_size, calibration=calibration
        )


@contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """ORT's quantizers log generic advice and every skipped node (root logger, INFO) for each graph."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def nonfinite_consumers(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that read a constant holding inf, NaN or a mask-sized value (|x| > 1e30)."""
    bad = {t.name for t in model.graph.initializer if _nonfinite(t)}
    bad |= {
        out
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value" and _nonfinite(attr.t)
        for out in node.output
    }
    return {node.name for node in model.graph.node if bad.intersection(node.input)}


def _nonfinite(tensor: onnx.TensorProto) -> bool:
    if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return False
    values = numpy_helper.to_array(tensor).astype(np.float64)
    return bool(values.size) and not bool(np.all(np.isfinite(values) & (np.abs(values) < HUGE)))


class _Reader(CalibrationDataReader):
    """Recorded feeds, one per calibration run."""

    def __init__(self, feeds: Sequence[Feeds]):
        self._feeds: Iterator[Feeds] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feeds = next(self._feeds, None)
        return None if feeds is None else dict(feeds)
