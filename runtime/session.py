"""A validated onnxruntime session: inputs are checked against the graph before they reach ORT.

ORT's own messages for a wrong input ("Unexpected input data type", a shape error deep inside a
kernel) do not say which graph or which of our tensors is at fault. `Session.run` checks names,
dtypes, ranks, fixed dims and the consistency of named dims first, and raises `InputError` naming
the graph, the input and what differs. Loading wraps ORT's errors with the file's path.

With the CUDA provider, `run` goes through IO binding: read-only input arrays (such as the text
embeddings, the same for every denoising step) are copied to the device once and reused for as
long as the same array object is passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime.manifest import TensorSpec

# ORT element type -> numpy dtype name.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
UNKNOWN_DIM = "?"  # ORT reports dims without a name or size as None

Providers = Sequence[str | tuple[str, dict]]


class Session:
    """One ONNX graph loaded into onnxruntime, with its declared IO as TensorSpecs.

    name: the component ("unet"), used in every error message.
    io_binding: route runs through ORT IO binding; None turns it on for the CUDA provider.
    load: the file onnxruntime reads, when it is not `path` itself (an already optimized copy of it,
    `graph_cache`); `path` stays the graph's name in messages.
    initializers: tensors that replace the graph's initializers of the same names (merged LoRA
    weights); each must have the dtype and shape of the one it replaces (checked here: ONNX Runtime
    would crash later). The fast way is `SessionOptions.add_initializer`, which ORT reads without a
    copy (the session keeps the arrays), but ORT applies those after its graph optimizations, and
    two of them read weights from the file (measured on ORT 1.32, tiny SD 1.x):
    - the CPU NCHWc transform (level "all") lays out convolution weights: a replaced Conv weight was
      ignored (U-Net output max|Δ| 0.67), so such a session runs without that one transform;
    - constant folding turns fp16 weights into the fp32 ones CPU kernels need: a fp16 graph's
      replacements were all ignored (image unchanged by the LoRA), so float16 replacements are put
      into the model before optimization instead: overwritten in a copy of the file's bytes (same
      size) when the graph holds them, handed over with `add_external_initializers` when external
      data does (which ORT copies into the graph; slow: 14.6 s for the full-size SD 1.5 U-Net
      where add_initializer took 1.6 s, 2-core Xeon, AVX-512).
    """

    def __init__(
        self,
        path: Path | str,
        providers: Providers,
        options: ort.SessionOptions | None = None,
        *,
        name: str | None = None,
        io_binding: bool | None = None,
        load: Path | None = None,
        initializers: Mapping[str, np.ndarray] | None = None,
    ):
        self.path = Path(path)
        self.name = name or self.path.parent.name
        if not self.path.is_file():
            raise ModelError(f"{self.path}: missing ONNX graph for {self.name!r}")
        self._initializers = []
        model, disabled = str(load or self.path), []
        if initializers:
            options = options or ort.SessionOptions()
            model, disabled = self._replace(Path(model), initializers, options)
        try:
            self._session = ort.InferenceSession(model, sess_options=options, providers=list(providers),
                                                 disabled_optimizers=disabled)
        except Exception as e:  # ORT raises its own pybind types (Fail, InvalidProtobuf, ...), not exported
            raise ModelError(f"{self.path}: onnxruntime cannot load the {self.name!r} graph: {e}") from e
        self.inputs = tuple(_spec(arg) for arg in self._session.get_inputs())
        # Inputs with a default in the graph (an initializer of the same name), fed only when wanted:
        # the U-Net's ControlNet residuals.
        self.optional = tuple(_spec(arg) for arg in self._session.get_overridable_initializers())
        self.outputs = tuple(_spec(arg) for arg in self._session.get_outputs())
        self.providers = tuple(self._session.get_providers())
        if io_binding is None:
            io_binding = self.providers[0] == "CUDAExecutionProvider"
        self._binding = _Binding(self._session) if io_binding else None

    def _replace(self, path: Path, initializers: Mapping[str, np.ndarray], options: ort.SessionOptions
                 ) -> tuple[str | bytes, list[str]]:
        """(what ORT should load, optimizers to leave out) for `path` with `initializers` replaced,
        after checking each against the graph (see the class docstring)."""
        from sdonnx.runtime.onnx_file import read_graph

        graph = read_graph(path)
        patched, external, late = None, {}, set()
        for name, value in initializers.items():
            tensor = graph.initializers.get(name)
            if tensor is None:
                raise ModelError(f"{self.path}: no initializer {name!r} in the {self.name!r} graph to replace")
            if str(value.dtype) != tensor.dtype or tuple(value.shape) != tuple(tensor.shape):
                raise ModelError(f"{self.path}: replacement for {name!r} is {value.dtype} {list(value.shape)}, the "
                                 f"graph's is {tensor.dtype} {list(tensor.shape)}")
            value = np.ascontiguousarray(value)
            if value.dtype != np.float16 or tensor.typed is not None:
                self._keep(options.add_initializer, name, value)
                late.add(name)
            elif tensor.file != graph.path:
                external[name] = value
            else:
                patched = bytearray(path.read_bytes()) if patched is None else patched
                patched[tensor.offset:tensor.offset + tensor.nbytes] = value.tobytes()
        if external:
            values = [ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]
            self._initializers += [*external.values(), *values]
            options.add_external_initializers(list(external), values)
        convolutions = ("Conv", "ConvInteger", "FusedConv")
        conv = any(node.op_type in convolutions and set(node.inputs) & late for node in graph.nodes)
        disabled = ["NchwcTransformer"] if conv else []
        if patched is None:
            return str(path), disabled
        # A model read from bytes finds its external data through this folder, not the file's location.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        return bytes(patched), disabled

    def _keep(self, add, name: str, value: np.ndarray) -> None:
        """ORT reads an added initializer from `value` without copying: it lives as long as the session."""
        ort_value = ort.OrtValue.ortvalue_from_numpy(value)
        self._initializers += [value, ort_value]
        add(name, ort_value)

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return self._find("input", (*self.inputs, *self.optional), name)

    def output(self, name: str) -> TensorSpec:
        return self._find("output", self.outputs, name)

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on `inputs` (one array per declared input, and any optional ones); return every
        output by name."""
        self.check_inputs(inputs)
        if self._session is None:
            raise ModelError(f"{self.path}: the {self.name!r} session was closed (its step of the pipeline is over)")
        if self._binding is not None:
            values = self._binding.run(inputs, self.output_names)
        else:
            values = self._session.run(self.output_names, inputs)
        return dict(zip(self.output_names, values))

    def close(self) -> None:
        """Free the onnxruntime session now, whoever still holds this wrapper; `run` then raises."""
        self._session = self._binding = None
        self._initializers = []

    def check_inputs(self, inputs: dict[str, object]) -> None:
        """Raise InputError unless `inputs` match the declared inputs (all of them, and any of the
        optional ones) in name, dtype, rank and dims."""
        declared = [spec.name for spec in self.inputs]
        optional = {spec.name: spec for spec in self.optional}
        missing = [n for n in declared if n not in inputs]
        unexpected = [n for n in inputs if n not in declared and n not in optional]
        if missing or unexpected:
            problems = [f"{what} {names}" for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
            also = f" and any of {list(optional)}" if optional else ""
            raise InputError(f"{self.name} inputs", sorted(inputs), f"exactly {declared}{also} ({'; '.join(problems)})")
        bound: dict[str, tuple[int, str]] = {}  # dim name -> (size, input that fixed it)
        for spec in (*self.inputs, *(optional[n] for n in inputs if n in optional)):
            value = inputs[spec.name]
            field = f"{self.name}.{spec.name}"
            if not isinstance(value, np.ndarray):
                raise InputError(field, type(value).__name__, f"a numpy array of {spec.dtype}")
            if str(value.dtype) != spec.dtype:
                raise InputError(f"{field}.dtype", str(value.dtype), spec.dtype)
            if value.ndim != spec.rank:
                raise InputError(f"{field}.shape", value.shape, f"rank {spec.rank} {_shape_text(spec.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
                if isinstance(want, int) and want != got:
                    expected = f"{want} (declared shape {_shape_text(spec.shape)})"
                    raise InputError(f"{field}.shape[{axis}]", got, expected)
                if isinstance(want, str) and want != UNKNOWN_DIM:
                    size, source = bound.setdefault(want, (got, spec.name))
                    if size != got:
                        raise InputError(
                            f"{field}.shape[{axis}]", got, f"{size}, the size of {want!r} in {source!r}"
                        )

    def _find(self, kind: str, specs: tuple[TensorSpec, ...], name: str) -> TensorSpec:
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:
            names = [s.name for s in specs]
            raise ModelError(f"{self.path}: graph {self.name!r} has no {kind} {name!r} (it has {names})")
        return spec


class _Binding:
    """IO binding for device providers: inputs bound per run, read-only ones kept on the device."""

    def __init__(self, session: ort.InferenceSession):
        self._session = session
        self._binding = session.io_binding()
        provider = session.get_providers()[0]
        options = session.get_provider_options().get(provider, {})
        self._device = ("cuda", int(options.get("device_id", 0))) if provider == "CUDAExecutionProvider" else ("cpu", 0)
        self._resident: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in inputs.items():
            if value.flags.writeable:
                self._resident.pop(name, None)
                binding.bind_cpu_input(name, _contiguous(value))
            else:
                binding.bind_ortvalue_input(name, self._on_device(name, value))
        for name in output_names:
            binding.bind_output(name)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _on_device(self, name: str, value: np.ndarray) -> ort.OrtValue:
        # A read-only array cannot change through this reference, so the same object means the same
        # data: the copy made for an earlier step is still valid.
        kept = self._resident.get(name)
        if kept is None or kept[0] is not value:
            device, device_id = self._device
            kept = (value, ort.OrtValue.ortvalue_from_numpy(_contiguous(value), device, device_id))
            self._resident[name] = kept
        return kept[1]


def _contiguous(value: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns a 0-d array (the scalar timestep) into shape (1,).
    return np.require(value, requirements="C")


def _spec(arg) -> TensorSpec:
    dtype = ORT_DTYPES.get(arg.type, arg.type)
    shape = tuple(UNKNOWN_DIM if d is None else d for d in arg.shape)
    return TensorSpec(arg.name, dtype, shape)


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
