"""The four ONNX graphs of a Stable Diffusion folder, with optimum's input/output names and axes.

Each graph wraps its PyTorch module so that it returns plain tuples, and comes with seeded example
inputs: the trace inputs the exporter runs once, and check inputs of another batch, image size and
sequence length that prove the dynamic axes (check.py compares ONNX Runtime against PyTorch on them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from sdonnx.export.attention import set_attention
from sdonnx.export.source import SourceModel
from sdonnx.runtime.manifest import TensorSpec
from sdonnx.runtime.prompts import CLIP_SKIP_OUTPUT

ORDER = ("text_encoder", "vae_encoder", "vae_decoder", "unet")  # the U-Net last: alone in memory
EXTERNAL_DATA_NAME = "model.onnx_data"
SEQUENCE = "sequence_length"  # the one axis a static shape leaves dynamic: long prompts are 77-token chunks
_EXTERNAL_DATA_ALIGNMENT = 1 << 16  # Windows' allocation granularity (a page multiple): ORT can mmap aligned tensors
_ALIGN_FROM_BYTES = 1 << 20
_COPY_CHUNK = 1 << 24
# Clip skip 2 (the penultimate layer) is what most fine-tunes expect; 3 and 4 are seen now and then;
# deeper layers only degrade SD images. A1111's slider goes to 12: those need a re-export with a larger value.
MAX_CLIP_SKIP = 4
# The SourceModel field each graph needs: a module is released after the last graph that uses it.
_OWNER = {"text_encoder": "text_encoder", "unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}


@dataclass(frozen=True)
class Probe:
    """One set of example inputs: image batch and size in pixels, and the two sequence lengths."""

    batch: int
    height: int
    width: int
    text_length: int  # tokens into the text encoder
    context_length: int  # encoder_hidden_states rows into the U-Net
    downsample: int  # pixels per latent pixel

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.downsample, self.width // self.downsample


@dataclass(frozen=True)
class Graph:
    """A module ready for torch.onnx.export: its wrapper, IO names and dynamic axes, and example inputs."""

    name: str
    module: torch.nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    trace_inputs: tuple[torch.Tensor, ...]
    check_inputs: tuple[torch.Tensor, ...]

    def reference(self) -> dict[str, np.ndarray]:
        """PyTorch's outputs on the check inputs, computed while the module is alive."""
        with torch.no_grad():
            outputs = self.module(*self.check_inputs)
        return {name: t.numpy() for name, t in zip(self.output_names, outputs)}

    def feeds(self) -> dict[str, np.ndarray]:
        return {name: t.numpy() for name, t in zip(self.input_names, self.check_inputs)}


class _Wrapper(torch.nn.Module):
    """One graph's module returning a tuple, with its ONNX IO names, axes and example-input recipe."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]

    def example(self, probe: Probe, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class _TextEncoder(_Wrapper):
    """optimum's two outputs, then `clip_skip_n` = final_layer_norm(hidden_states[-n]) for n = 2..MAX_CLIP_SKIP.

    Each extra output costs a LayerNorm and one [B, T, D] tensor per run (no weights: the norm is
    shared), and lets the runtime apply clip skip without torch; n stops where the model's layers do.
    """

    input_names = ("input_ids",)

    def __init__(self, source: SourceModel):
        super().__init__()
        self.text_encoder = source.text_encoder
        transformer = getattr(self.text_encoder, "text_model", self.text_encoder)  # nested before transformers 5
        self.final_layer_norm = getattr(transformer, "final_layer_norm", None)
        layers = int(self.text_encoder.config.num_hidden_layers)
        reachable = range(2, min(MAX_CLIP_SKIP, layers + 1) + 1)  # hidden_states has layers + 1 entries
        self.clip_skips = tuple(reachable) if self.final_layer_norm is not None else ()

    @property
    def output_names(self):
        return ("last_hidden_state", "pooler_output", *(CLIP_SKIP_OUTPUT.format(n) for n in self.clip_skips))

    @property
    def dynamic_axes(self):
        sequence = {0: "batch_size", 1: SEQUENCE}
        return {"input_ids": sequence, "last_hidden_state": sequence, "pooler_output": {0: "batch_size"},
                **{CLIP_SKIP_OUTPUT.format(n): sequence for n in self.clip_skips}}

    def example(self, probe, generator):
        config = self.text_encoder.config
        ids = torch.randint(0, config.vocab_size, (probe.batch, probe.text_length), generator=generator)
        ids[:, 0], ids[:, -1] = config.bos_token_id, config.eos_token_id
        return (ids,)

    def forward(self, input_ids):
        outputs = self.text_encoder(input_ids=input_ids, output_hidden_states=bool(self.clip_skips), return_dict=True)
        skipped = (self.final_layer_norm(outputs.hidden_states[-n]) for n in self.clip_skips)
        return outputs.last_hidden_state, outputs.pooler_output, *skipped


class _UNet(_Wrapper):
    input_names = ("sample", "timestep", "encoder_hidden_states")
    output_names = ("out_sample",)
    dynamic_axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
                    "encoder_hidden_states": {0: "batch_size", 1: SEQUENCE},
                    "out_sample": {0: "batch_size", 2: "height", 3: "width"}}

    def __init__(self, source: SourceModel):
        super().__init__()
        self.unet = source.unet
        self.num_train_timesteps = int(source.scheduler_config.get("num_train_timesteps", 1000))

    def example(self, probe, generator):
        config, batch = self.unet.config, 2 * probe.batch
        sample = torch.randn((batch, config.in_channels, *probe.latent_size), generator=generator)
        timestep = torch.rand((), generator=generator) * self.num_train_timesteps
        context = torch.randn((batch, probe.context_length, config.cross_attention_dim), generator=generator)
        return sample, timestep, context

    def forward(self, sample, timestep, encoder_hidden_states):
        return (self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0],)


class _Vae(_Wrapper):
    def __init__(self, source: SourceModel):
        super().__init__()
        self.vae = source.vae
        self.down = vae_downsample(source.vae)


class _VaeEncoder(_Vae):
    input_names = ("sample",)
    output_names = ("latent_parameters",)

    @property
    def dynamic_axes(self):
        return {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
                "latent_parameters": {0: "batch_size", 2: f"sample_height / {self.down}",
                                      3: f"sample_width / {self.down}"}}

    def example(self, probe, generator):
        shape = (probe.batch, self.vae.config.in_channels, probe.height, probe.width)
        return (torch.rand(shape, generator=generator) * 2 - 1,)

    def forward(self, sample):
        return (self.vae.encode(sample).latent_dist.parameters,)


class _VaeDecoder(_Vae):
    input_names = ("latent_sample",)
    output_names = ("sample",)

    @property
    def dynamic_axes(self):
        return {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                "sample": {0: "batch_size", 2: f"latent_height * {self.down}", 3: f"latent_width * {self.down}"}}

    def example(self, probe, generator):
        shape = (probe.batch, self.vae.config.latent_channels, *probe.latent_size)
        return (torch.randn(shape, generator=generator),)

    def forward(self, latent_sample):
        return (self.vae.decode(latent_sample, return_dict=False)[0],)


_WRAPPERS = {"text_encoder": _TextEncoder, "unet": _UNet, "vae_encoder": _VaeEncoder, "vae_decoder": _VaeDecoder}


def vae_downsample(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def probes(source: SourceModel, static_shape: tuple[int, int, int] | None) -> tuple[Probe, Probe]:
    """(trace, check) probes. Dynamic: trace batch 1 at a latent side that the U-Net's upsamplers cannot
    halve evenly, check batch 2 at 8x6 latents, so that no traced size can pass the check by accident."""
    max_length = text_max_length(source)
    down = vae_downsample(source.vae)
    if static_shape is not None:
        batch, height, width = static_shape
        trace = Probe(batch, height, width, max_length, max_length, down)
        return trace, Probe(batch, height, width, max_length // 2, 2 * max_length, down)
    # diffusers' U-Net passes explicit upsample sizes only when a latent side is not a multiple of
    # 2**num_upsamplers; tracing that path makes the graph follow the skip connections' sizes, so it
    # accepts every latent size instead of multiples of 8 latents (64 pixels) only.
    odd_side = down * (2 ** (len(source.unet.config.block_out_channels) - 1) + 1)
    trace = Probe(1, odd_side, odd_side, max_length, max_length, down)
    return trace, Probe(2, 8 * down, 6 * down, max_length // 2, 2 * max_length, down)


def text_max_length(source: SourceModel) -> int:
    # Tokenizers without a configured limit report a huge sentinel; the position table is the real bound.
    return min(int(source.tokenizer.model_max_length), int(source.text_encoder.config.max_position_embeddings))


def build_graph(name: str, source: SourceModel, trace: Probe, check: Probe, *, static: bool, seed: int = 0,
                attention: str = "full") -> Graph:
    """The named graph's wrapper and seeded example inputs. Shapes (B = image batch, L = latent side):

    text_encoder  input_ids int64 [B, T] -> last_hidden_state [B, T, D], pooler_output [B, D]
                  (+ clip_skip_n [B, T, D], n = 2..4)
    unet          sample [2B, C, Lh, Lw], timestep float32 [], encoder_hidden_states [2B, S, D]
                  -> out_sample [2B, 4, Lh, Lw]   (2B: classifier-free guidance batches uncond||cond)
    vae_encoder   sample [B, 3, H, W] -> latent_parameters [B, 2*latent_channels, Lh, Lw]
    vae_decoder   latent_sample [B, latent_channels, Lh, Lw] -> sample [B, 3, H, W]

    attention: how the U-Net's attention is traced, "full" | "sliced" | "fused" (export/attention.py).
    """
    if name not in _WRAPPERS:
        raise ValueError(f"graph: got {name!r}, expected one of {ORDER}")
    module = _WRAPPERS[name](source).eval()
    if name == "unet":
        set_attention(module.unet, attention)
    axes = module.dynamic_axes
    if static:
        axes = {k: {i: n for i, n in dims.items() if n == SEQUENCE} for k, dims in axes.items()}
        axes = {k: dims for k, dims in axes.items() if dims}
    generator = torch.Generator().manual_seed(seed)
    trace_inputs, check_inputs = module.example(trace, generator), module.example(check, generator)
    return Graph(name, module, module.input_names, module.output_names, axes, trace_inputs, check_inputs)


def export_graph(graph: Graph, path: Path, *, opset: int) -> None:
    """Write graph to path (model.onnx, plus model.onnx_data when the weights pass protobuf's 2 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every shape-dependent Python branch (chosen by the trace probe on
        # purpose), constant folding and its own deprecation; the parity check at other shapes is
        # what tells a good graph from a bad one, so these would only bury the progress lines.
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter's graphs go through ONNX Runtime's quantization and
        # transformer-optimizer tooling; dynamo graphs break quantize_dynamic's shape inference and
        # the fp16 conversion that `sdonnx quantize` relies on.
        torch.onnx.export(
            graph.module,
            graph.trace_inputs,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            dynamic_axes=graph.dynamic_axes,
            do_constant_folding=True,
        )
    consolidate_external_data(path)


def consolidate_external_data(model_path: Path) -> None:
    """Move every external tensor into one model.onnx_data beside model_path, streaming.

    The TorchScript exporter writes one file per tensor when a model passes 2 GB. Each is copied in
    chunks into the single data file (large tensors 64 KiB-aligned so ONNX Runtime can map them) and
    its location/offset/length entries rewritten; at no time are the weights held in memory.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    tensors = [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not tensors:
        return
    folder = model_path.parent
    target = folder / EXTERNAL_DATA_NAME
    staging = folder / (EXTERNAL_DATA_NAME + ".partial")
    sources: set[Path] = set()
    with open(staging, "wb") as out:
        for tensor in tensors:
            entries = {e.key: e.value for e in tensor.external_data}
            source = folder / entries["location"]
            sources.add(source)
            length = int(entries["length"]) if "length" in entries else source.stat().st_size
            if length >= _ALIGN_FROM_BYTES:
                out.write(b"\0" * (-out.tell() % _EXTERNAL_DATA_ALIGNMENT))
            offset = out.tell()
            with open(source, "rb") as f:
                f.seek(int(entries.get("offset", 0)))
                _copy(f, out, length)
            del tensor.external_data[:]
            for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
    for source in sources:
        source.unlink()
    staging.replace(target)
    model_path.write_bytes(model.SerializeToString())


def _copy(src, dst, length: int) -> None:
    remaining = length
    while remaining:
        block = src.read(min(remaining, _COPY_CHUNK))
        if not block:
            raise OSError(f"{src.name}: ends {remaining} bytes short of the tensor's {length}")
        dst.write(block)
        remaining -= len(block)


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and Constant/attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of an ONNX file as the manifest writes them, without loading its weights."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
        return TensorSpec(value.name, dtype, shape)

    initializers = {t.name for t in graph.initializer}
    inputs = tuple(spec(v) for v in graph.input if v.name not in initializers)
    return inputs, tuple(spec(v) for v in graph.output)


def release(source: SourceModel, name: str, remaining: tuple[str, ...]) -> None:
    """Drop the PyTorch module behind graph `name` unless a graph still to come needs it."""
    attribute = _OWNER[name]
    if all(_OWNER[later] != attribute for later in remaining):
        setattr(source, attribute, None)
