"""Read an ONNX file's initializers and nodes without the `onnx` package: where each weight's bytes lie.

LoRAs and textual inversion change weights at load time; to do that the runtime reads a few base
weights and must know their names, layouts and where their bytes are (inside model.onnx or in its
external data file). The runtime does not depend on `onnx`, so this walks the protobuf wire format of
ModelProto -> GraphProto -> TensorProto / NodeProto itself: only the fields named below are decoded,
weights' bytes are skipped by length and later read with `numpy.memmap`, never parsed, so walking a
1.7 GB graph costs as much as walking its headers.

Field numbers are onnx.proto's (stable since IR version 3): ModelProto.graph = 7; GraphProto.node = 1,
initializer = 5; NodeProto.input = 1, output = 2, name = 3, op_type = 4, attribute = 5, domain = 7;
AttributeProto.name = 1, i = 3; TensorProto.dims = 1, data_type = 2, name = 8, raw_data = 9,
external_data = 13 (key = 1, value = 2), data_location = 14; float_data = 4, int32_data = 5,
int64_data = 7 (packed) for small constants.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from sdonnx.errors import ModelError

# TensorProto.DataType -> numpy dtype, for the types weights come in.
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class Tensor:
    """An initializer: its dtype, shape and where its bytes are (file, offset, length)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    typed: int | None = None  # values in a packed typed field (float_data = 4, int32_data = 5, int64_data = 7)

    def read(self) -> np.ndarray:
        """The values, copied out of the file (the file may change or close afterwards)."""
        count = int(np.prod(self.shape, dtype=np.int64))
        if self.typed is not None:
            return self._read_typed(count)
        expected = count * np.dtype(self.dtype).itemsize
        if self.nbytes != expected:
            raise ModelError(f"{self.file}: initializer {self.name!r} holds {self.nbytes} bytes, its dtype "
                             f"{self.dtype} and shape {list(self.shape)} need {expected}")
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.nbytes)
        if len(data) != self.nbytes:
            raise ModelError(f"{self.file}: initializer {self.name!r} is cut short "
                             f"({len(data)} of {self.nbytes} bytes at offset {self.offset})")
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape).copy()

    def _read_typed(self, count: int) -> np.ndarray:
        """Small constants (a quantizer's scale and zero point) keep their values in typed fields:
        float_data holds float32s, int32_data/int64_data varints (float16 as their bit patterns)."""
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.nbytes)
        if self.typed == 4:
            values = np.frombuffer(data, dtype="<f4")
        else:
            values, pos = [], 0
            while pos < len(data):
                value, pos = _varint(data, pos)
                values.append(_signed(value))
            values = np.asarray(values, dtype=np.int64)
            if self.dtype == "float16":
                values = values.astype(np.uint16).view(np.float16)
        if values.size != count:
            raise ModelError(f"{self.file}: initializer {self.name!r} holds {values.size} values, its shape "
                             f"{list(self.shape)} needs {count}")
        return values.astype(self.dtype).reshape(self.shape)


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    domain: str = ""
    ints: dict[str, int] = field(default_factory=dict)  # the integer attributes (transB, axis, ...)


@dataclass(frozen=True)
class Graph:
    path: Path
    initializers: dict[str, Tensor]
    nodes: tuple[Node, ...]


def read_graph(path: Path | str) -> Graph:
    """The initializers (with their byte locations) and nodes of the ONNX file at `path`."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            graph = next((span for number, _, span in _fields(data, 0, len(data)) if number == 7), None)
            if graph is None:
                raise ModelError(f"{path}: not an ONNX model (no graph)")
            initializers, nodes = {}, []
            for number, _, (start, end) in _fields(data, *graph):
                if number == 5:
                    tensor = _tensor(data, start, end, path)
                    initializers[tensor.name] = tensor
                elif number == 1:
                    nodes.append(_node(data, start, end))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable ONNX file: {e}") from None
    return Graph(path, initializers, tuple(nodes))


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int) -> Iterator[tuple[int, int, tuple[int, int] | int]]:
    """(field number, wire type, (start, end) of a length-delimited field or the varint's value)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError(f"field {number} runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, wire, pos
            pos += width
        else:
            raise ValueError(f"unsupported wire type {wire} at byte {pos}")


def _signed(value: int) -> int:
    """An int64 field's value (protobuf writes negative numbers as 64-bit two's complement varints)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(data, span: tuple[int, int]) -> str:
    return bytes(data[span[0]:span[1]]).decode("utf-8")


def _tensor(data, start: int, end: int, path: Path) -> Tensor:
    dims: list[int] = []
    dtype = name = None
    raw = None
    external: dict[str, str] = {}
    location = 0
    typed = None
    for number, wire, value in _fields(data, start, end):
        if number == 1 and wire == 0:
            dims.append(value)
        elif number == 1:  # packed dims
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(data, pos)
                dims.append(dim)
        elif number == 2:
            dtype = value
        elif number == 8:
            name = _text(data, value)
        elif number == 9:
            raw = value
        elif number == 13:
            entry = dict((k, _text(data, v)) for k, _, v in _fields(data, *value))
            external[entry.get(1, "")] = entry.get(2, "")
        elif number == 14:
            location = value
        elif number in (4, 5, 7) and wire == 2:
            typed = (number, value)
        elif number in (4, 5, 7):
            raise ValueError(f"tensor {name!r}: unpacked typed values are not supported")
    dims = [_signed(d) for d in dims]
    numpy_dtype = DTYPES.get(dtype, f"onnx type {dtype}")
    if location == _EXTERNAL:
        file = path.parent / external.get("location", "")
        return Tensor(name, numpy_dtype, tuple(dims), file, int(external.get("offset", 0)),
                      int(external.get("length", file.stat().st_size if file.is_file() else 0)))
    if raw is None and typed is not None:
        number, (begin, stop) = typed
        return Tensor(name, numpy_dtype, tuple(dims), path, begin, stop - begin, typed=number)
    if raw is None:  # no values at all (an empty tensor)
        return Tensor(name, numpy_dtype, tuple(dims), path, 0, 0)
    return Tensor(name, numpy_dtype, tuple(dims), path, raw[0], raw[1] - raw[0])


def _node(data, start: int, end: int) -> Node:
    inputs, outputs, name, op_type, domain, ints = [], [], "", "", "", {}
    for number, _, value in _fields(data, start, end):
        if number == 1:
            inputs.append(_text(data, value))
        elif number == 2:
            outputs.append(_text(data, value))
        elif number == 3:
            name = _text(data, value)
        elif number == 4:
            op_type = _text(data, value)
        elif number == 7:
            domain = _text(data, value)
        elif number == 5:
            attribute = {n: v for n, _, v in _fields(data, *value)}
            if 1 in attribute and 3 in attribute:
                ints[_text(data, attribute[1])] = _signed(attribute[3])
    return Node(name, op_type, tuple(inputs), tuple(outputs), domain, ints)
