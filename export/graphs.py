"""The ONNX graphs of a Stable Diffusion folder, with optimum's input/output names and axes.

SD 1.x/2.x: text_encoder, unet, vae_encoder, vae_decoder. SDXL adds text_encoder_2 and the U-Net's
text_embeds and time_ids inputs; the SDXL refiner has text_encoder_2 but no text_encoder.

Each graph wraps its PyTorch module so that it returns plain tuples, and comes with seeded example
inputs: the trace inputs the exporter runs once, and check inputs of another batch, image size and
sequence length that prove the dynamic axes (check.py compares ONNX Runtime against PyTorch on them).
"""

from __future__ import annotations

import types
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch

from sdonnx.errors import ExportError
from sdonnx.export.attention import set_attention
from sdonnx.export.source import SourceModel
from sdonnx.runtime.manifest import TensorSpec
from sdonnx.runtime.prompts import CLIP_SKIP_OUTPUT

# The U-Net last, so that it is alone in memory; text_encoder_2 (SDXL's 2.8 GB OpenCLIP bigG) before it, and the
# shallow U-Net (its own few layers) just before it.
ORDER = ("text_encoder", "vae_encoder", "vae_decoder", "text_encoder_2", "unet_shallow", "unet")
EXTERNAL_DATA_NAME = "model.onnx_data"
SEQUENCE = "sequence_length"  # the one axis a static shape leaves dynamic: long prompts are 77-token chunks
_EXTERNAL_DATA_ALIGNMENT = 1 << 16  # Windows' allocation granularity (a page multiple): ORT can mmap aligned tensors
_ALIGN_FROM_BYTES = 1 << 20
_COPY_CHUNK = 1 << 24
# Clip skip 2 (the penultimate layer) is what most fine-tunes expect; 3 and 4 are seen now and then;
# deeper layers only degrade SD images. A1111's slider goes to 12: those need a re-export with a larger value.
MAX_CLIP_SKIP = 4
# The SourceModel field each graph needs: a module is released after the last graph that uses it.
_OWNER = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet", "unet_shallow": "unet",
          "vae_encoder": "vae", "vae_decoder": "vae"}
# Feature caching (DeepCache, Ma et al. 2024): the U-Net's extra output, the features entering its last up block's
# last layer; the shallow graph takes them back and computes only that layer and the first convolution.
DEEP_FEATURE = "deep_feature"
# SDXL's encoder outputs, as optimum names them: .0 the embeddings, .N the last layer (no final layer norm).
HIDDEN_STATES_OUTPUT = "hidden_states.{}"
# ControlNet residuals: outputs of a ControlNet graph and optional inputs of every U-Net graph, as
# the existing ONNX ControlNet exports (OnnxStack, Olive) name them.
DOWN_RESIDUAL = "down_block_{}_additional_residual"
MID_RESIDUAL = "mid_block_additional_residual"


@dataclass(frozen=True)
class Residual:
    """One ControlNet residual: its name, channels, and how many times smaller than the latent it is."""

    name: str
    channels: int
    downsample: int

    def size(self, latent: tuple[int, int]) -> tuple[int, int]:
        """Its (h, w) for a latent of (h, w): each stride-2 downsampler gives ceil(side / 2)."""
        h, w = latent
        for _ in range(self.downsample.bit_length() - 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w


def residuals(unet: torch.nn.Module) -> tuple[Residual, ...]:
    """The residuals a ControlNet adds to `unet` (a diffusers UNet2DConditionModel or ControlNetModel,
    which mirror each other), in diffusers' order: conv_in's output, each down block's resnets and
    downsampler, then the mid block's."""
    channels = unet.config.block_out_channels
    found, factor = [(channels[0], 1)], 1
    for i, block in enumerate(unet.down_blocks):
        found += [(channels[i], factor)] * len(block.resnets)
        if getattr(block, "downsamplers", None):
            factor *= 2
            found.append((channels[i], factor))
    down = tuple(Residual(DOWN_RESIDUAL.format(i), c, f) for i, (c, f) in enumerate(found))
    return (*down, Residual(MID_RESIDUAL, channels[-1], factor))


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
    # Inputs the graph may go without (the U-Net's ControlNet residuals): channels of each, whose
    # default is zeros [1, channels, 1, 1] (`add_optional_defaults`).
    optional: dict[str, int] = field(default_factory=dict)

    def cases(self) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """(ONNX feeds, PyTorch's outputs) on the check inputs, and without the optional inputs when
        there are some; computed while the module is alive."""
        feeds = {name: t.numpy() for name, t in zip(self.input_names, self.check_inputs)}
        cases = [feeds]
        if self.optional:
            cases.append({k: v for k, v in feeds.items() if k not in self.optional})
        return [(case, self._reference(case)) for case in cases]

    def _reference(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        given = dict(zip(self.input_names, self.check_inputs))
        with torch.no_grad():
            outputs = self.module(**{name: given[name] for name in feeds})
        return {name: t.numpy() for name, t in zip(self.output_names, outputs)}


class _Wrapper(torch.nn.Module):
    """One graph's module returning a tuple, with its ONNX IO names, axes and example-input recipe."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]

    def example(self, probe: Probe, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


def _token_ids(config, probe: Probe, generator: torch.Generator) -> tuple[torch.Tensor]:
    """Random token ids [B, T] framed by the encoder's start and end tokens."""
    ids = torch.randint(0, config.vocab_size, (probe.batch, probe.text_length), generator=generator)
    ids[:, 0], ids[:, -1] = config.bos_token_id, config.eos_token_id
    return (ids,)


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
        return _token_ids(self.text_encoder.config, probe, generator)

    def forward(self, input_ids):
        outputs = self.text_encoder(input_ids=input_ids, output_hidden_states=bool(self.clip_skips), return_dict=True)
        skipped = (self.final_layer_norm(outputs.hidden_states[-n]) for n in self.clip_skips)
        return outputs.last_hidden_state, outputs.pooler_output, *skipped


class _SdxlTextEncoder(_Wrapper):
    """One of SDXL's text encoders with optimum's outputs: its own first, then hidden_states.0..N raw.

    text_encoder (CLIPTextModel): last_hidden_state, pooler_output, hidden_states.0..N;
    text_encoder_2 (CLIPTextModelWithProjection): text_embeds, last_hidden_state, hidden_states.0..N.
    N is the encoder's num_hidden_layers (hidden_states.0 is the embeddings). SDXL conditions on
    hidden_states.{N - clip_skip} without the final layer norm, which the runtime picks by name, so
    no clip_skip_n outputs are added.
    """

    input_names = ("input_ids",)

    def __init__(self, source: SourceModel, attribute: str):
        super().__init__()
        self.text_encoder = getattr(source, attribute)
        self.leading = (("text_embeds", "last_hidden_state") if attribute == "text_encoder_2"
                        else ("last_hidden_state", "pooler_output"))
        self.layers = int(self.text_encoder.config.num_hidden_layers)

    @property
    def output_names(self):
        return (*self.leading, *(HIDDEN_STATES_OUTPUT.format(i) for i in range(self.layers + 1)))

    @property
    def dynamic_axes(self):
        sequence = {0: "batch_size", 1: SEQUENCE}
        pooled = {0: "batch_size"}
        return {"input_ids": sequence,
                **{name: pooled if name in ("text_embeds", "pooler_output") else sequence
                   for name in self.output_names}}

    def example(self, probe, generator):
        return _token_ids(self.text_encoder.config, probe, generator)

    def forward(self, input_ids):
        outputs = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        if len(outputs.hidden_states) != self.layers + 1:
            raise ExportError(f"text encoder returned {len(outputs.hidden_states)} hidden states, expected "
                              f"num_hidden_layers + 1 = {self.layers + 1}")
        return (*(getattr(outputs, name) for name in self.leading), *outputs.hidden_states)


class _UNet(_Wrapper):
    """SD's U-Net; the x4 upscaler's also takes class_labels int64 [B] (the low-res image's noise level);
    with SDXL's text_time conditioning also text_embeds [B, projection] and time_ids [B, 5 | 6];
    then the ControlNet residuals, optional (zeros when not fed). With deep_feature (`--feature-cache`)
    it returns, besides out_sample, the deep_feature the shallow graph (`_UNetShallow`) takes."""

    def __init__(self, source: SourceModel, controlnet: bool = True, deep_feature: bool = False):
        super().__init__()
        self.unet = source.unet
        self.deep_feature = deep_feature
        self.output_names = ("out_sample", DEEP_FEATURE) if deep_feature else ("out_sample",)
        self.num_train_timesteps = int(source.scheduler_config.get("num_train_timesteps", 1000))
        self.text_time = source.text_time
        self.max_noise_level = source.upscaler.max_noise_level if source.upscaler is not None else None
        self.residuals = residuals(self.unet) if controlnet else ()
        extra = (*(("class_labels",) if self.max_noise_level is not None else ()),
                 *(("text_embeds", "time_ids") if self.text_time is not None else ()))
        self.input_names = ("sample", "timestep", "encoder_hidden_states", *extra, *(r.name for r in self.residuals))
        # Each residual's dims are its own: its zero default [1, C, 1, 1] broadcasts where a fed one matches.
        self.dynamic_axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
                             "encoder_hidden_states": {0: "batch_size", 1: SEQUENCE},
                             **{name: {0: "batch_size"} for name in extra},
                             **{r.name: {0: f"{r.name}_batch", 2: f"{r.name}_height", 3: f"{r.name}_width"}
                                for r in self.residuals},
                             "out_sample": {0: "batch_size", 2: "height", 3: "width"},
                             **({DEEP_FEATURE: {0: "batch_size", 2: "height", 3: "width"}} if deep_feature else {})}

    @property
    def optional(self) -> dict[str, int]:
        return {r.name: r.channels for r in self.residuals}

    def example(self, probe, generator):
        config, batch = self.unet.config, 2 * probe.batch
        sample = torch.randn((batch, config.in_channels, *probe.latent_size), generator=generator)
        timestep = torch.rand((), generator=generator) * self.num_train_timesteps
        context = torch.randn((batch, probe.context_length, config.cross_attention_dim), generator=generator)
        added = ()
        if self.max_noise_level is not None:
            added = (torch.randint(0, self.max_noise_level + 1, (batch,), generator=generator),)
        if self.text_time is not None:
            text_embeds = torch.randn((batch, self.text_time.text_embeds_dim), generator=generator)
            # Sizes and crop offsets in pixels (or an aesthetic score): the sinusoidal embedding sees 0..1024.
            time_ids = torch.rand((batch, self.text_time.time_id_count), generator=generator) * 1024
            added = (*added, text_embeds, time_ids)
        residual = tuple(torch.randn((batch, r.channels, *r.size(probe.latent_size)), generator=generator)
                         for r in self.residuals)
        return sample, timestep, context, *added, *residual

    def forward(self, *inputs, **named):
        """Inputs by position (the tracer) or name (the check without residuals)."""
        given = dict(zip(self.input_names, inputs)) | named
        added = {k: given[k] for k in ("text_embeds", "time_ids")} if self.text_time is not None else None
        fed = [r.name for r in self.residuals if r.name in given]
        if fed and len(fed) != len(self.residuals):
            raise ExportError(f"unet: ControlNet residuals {fed} given without the others")
        down = tuple(given[r.name] for r in self.residuals[:-1]) if fed else None
        with deep_feature_of(self.unet) if self.deep_feature else nullcontext([]) as captured:
            out = self.unet(given["sample"], given["timestep"], given["encoder_hidden_states"],
                            class_labels=given.get("class_labels"), added_cond_kwargs=added,
                            down_block_additional_residuals=down, mid_block_additional_residual=given.get(MID_RESIDUAL),
                            return_dict=False)[0]
        return (out, captured[0]) if self.deep_feature else (out,)


@contextmanager
def deep_feature_of(unet: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While the U-Net runs, the features entering its last up block's last resnet (its input less the
    skip connection from conv_in), collected into the yielded list."""
    captured: list[torch.Tensor] = []
    skip = unet.conv_in.out_channels

    def grab(module, args):
        captured.append(args[0][:, : args[0].shape[1] - skip])

    handle = unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(grab)
    try:
        yield captured
    finally:
        handle.remove()


class _UNetShallow(_Wrapper):
    """The U-Net's shallow path for cached steps: the time (and class, SDXL) embeddings, conv_in, then the
    last up block's last layer on deep_feature || conv_in's output, and the output convolution. With the
    deep_feature of the same inputs, it is the U-Net's output exactly (tests/test_deep_cache.py)."""

    output_names = ("out_sample",)

    def __init__(self, source: SourceModel):
        super().__init__()
        self.unet = source.unet
        self.full = _UNet(source, controlnet=False)
        block = self.unet.up_blocks[-1]
        if getattr(block, "upsamplers", None) or len(block.resnets) < 2:
            raise ExportError("unet: the last up block upsamples or has one layer; the shallow graph needs neither")
        self.attention = block.attentions[-1] if getattr(block, "attentions", None) else None
        # Without attention in that layer the text is not used, and the graph does not take it.
        unused = () if self.attention is not None else ("encoder_hidden_states",)
        self.input_names = (*(n for n in self.full.input_names if n not in unused), DEEP_FEATURE)
        self.deep_channels = block.resnets[-1].in_channels - self.unet.conv_in.out_channels
        spatial = {0: "batch_size", 2: "height", 3: "width"}
        self.dynamic_axes = {**{k: v for k, v in self.full.dynamic_axes.items() if k in self.input_names},
                             DEEP_FEATURE: spatial, "out_sample": spatial}

    def example(self, probe, generator):
        inputs = dict(zip(self.full.input_names, self.full.example(probe, generator)))
        deep = torch.randn((2 * probe.batch, self.deep_channels, *probe.latent_size), generator=generator)
        return (*(inputs[n] for n in self.input_names[:-1]), deep)

    def forward(self, *inputs, **named):
        given = dict(zip(self.input_names, inputs)) | named
        unet, sample = self.unet, given["sample"]
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=given["timestep"]), None)
        class_emb = unet.get_class_embed(sample=sample, class_labels=given.get("class_labels"))
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        added = {k: given[k] for k in ("text_embeds", "time_ids") if k in given}
        context = given.get("encoder_hidden_states")
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
        emb = emb if aug is None else emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)
        block = unet.up_blocks[-1]
        hidden = block.resnets[-1](torch.cat([given[DEEP_FEATURE], unet.conv_in(sample)], dim=1), emb)
        if self.attention is not None:
            hidden = self.attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return (unet.conv_out(hidden),)


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


_WRAPPERS = {"text_encoder": _TextEncoder, "text_encoder_2": _SdxlTextEncoder, "unet": _UNet,
             "unet_shallow": _UNetShallow, "vae_encoder": _VaeEncoder, "vae_decoder": _VaeDecoder}


def graph_names(source: SourceModel, *, feature_cache: bool = False) -> tuple[str, ...]:
    """The graphs this source exports, in export order: ORDER without the text encoders it lacks (and
    without unet_shallow unless feature_cache)."""
    return tuple(name for name in ORDER if getattr(source, _OWNER[name]) is not None
                 and (feature_cache or name != "unet_shallow"))


def _wrapper(name: str, source: SourceModel, static: bool, feature_cache: bool) -> _Wrapper:
    if name in ("text_encoder", "text_encoder_2") and source.sdxl:
        return _SdxlTextEncoder(source, name)
    if name == "unet":
        # A fixed-shape input cannot default to [1, C, 1, 1], and dynamic ones in a static graph would
        # leave every later shape unknown: a static U-Net takes no ControlNet residuals.
        return _UNet(source, controlnet=not static, deep_feature=feature_cache)
    return _WRAPPERS[name](source)


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
    """Tokens per prompt chunk: the smallest limit of every tokenizer and text encoder present."""
    # Tokenizers without a configured limit report a huge sentinel; the position table is the real bound.
    pairs = [(source.tokenizer, source.text_encoder), (source.tokenizer_2, source.text_encoder_2)]
    return min(min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
               for tokenizer, encoder in pairs if tokenizer is not None and encoder is not None)


def build_graph(name: str, source: SourceModel, trace: Probe, check: Probe, *, static: bool, seed: int = 0,
                attention: str = "full", feature_cache: bool = False) -> Graph:
    """The named graph's wrapper and seeded example inputs. Shapes (B = image batch, L = latent side):

    text_encoder  input_ids int64 [B, T] -> last_hidden_state [B, T, D], pooler_output [B, D]
                  (+ clip_skip_n [B, T, D], n = 2..4; SDXL: hidden_states.0..N [B, T, D] instead)
    text_encoder_2  (SDXL) input_ids int64 [B, T] -> text_embeds [B, P], last_hidden_state [B, T, D2],
                  hidden_states.0..N2 [B, T, D2]
    unet          sample [2B, C, Lh, Lw], timestep float32 [], encoder_hidden_states [2B, S, D]
                  (x4 upscaler: + class_labels int64 [2B], C = latent_channels + 3)
                  (SDXL: + text_embeds [2B, P], time_ids [2B, 6 | 5]; D = D1 + D2)
                  -> out_sample [2B, 4, Lh, Lw]   (2B: classifier-free guidance batches uncond||cond)
    vae_encoder   sample [B, 3, H, W] -> latent_parameters [B, 2*latent_channels, Lh, Lw]
    vae_decoder   latent_sample [B, latent_channels, Lh, Lw] -> sample [B, 3, H, W]

    attention: how the U-Net's attention is traced, "full" | "sliced" | "fused" (export/attention.py).
    """
    if name not in _WRAPPERS:
        raise ValueError(f"graph: got {name!r}, expected one of {ORDER}")
    module = _wrapper(name, source, static, feature_cache).eval()
    if name in ("unet", "unet_shallow"):
        set_attention(module.unet, attention)
    elif name in ("vae_encoder", "vae_decoder"):
        set_attention(module.vae, attention)
    axes = module.dynamic_axes
    optional = getattr(module, "optional", {})
    if static:
        axes = {k: {i: n for i, n in dims.items() if n == SEQUENCE} for k, dims in axes.items()}
        axes = {k: dims for k, dims in axes.items() if dims}
    generator = torch.Generator().manual_seed(seed)
    trace_inputs, check_inputs = module.example(trace, generator), module.example(check, generator)
    return Graph(name, module, module.input_names, module.output_names, axes, trace_inputs, check_inputs,
                 optional=optional)


def export_graph(graph: Graph, path: Path, *, opset: int) -> None:
    """Write graph to path (model.onnx, plus model.onnx_data when the weights pass protobuf's 2 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), linear_weights_transposed(graph.module):
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
    if graph.optional:
        add_optional_defaults(path, graph.optional)


def add_optional_defaults(path: Path, optional: dict[str, int]) -> None:
    """Give each of the graph's `optional` inputs a zero default [1, channels, 1, 1]: an initializer of
    the input's name, which ONNX Runtime uses when the input is not fed (an overridable initializer).

    A U-Net without a ControlNet then runs as if exported without residual inputs (x + 0 = x) and
    takes the three inputs optimum's pipelines feed; the broadcast adds cost nothing measurable
    (benchmarks/results/controlnet-inputs.md). Only the graph is rewritten, not its external data.
    """
    model = onnx.load(str(path), load_external_data=False)
    declared = {v.name for v in model.graph.input}
    missing = sorted(set(optional) - declared)
    if missing:
        raise ExportError(f"{path}: optional inputs {missing} are not inputs of the graph")
    for name, channels in optional.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, channels, 1, 1), np.float32), name))
    path.write_bytes(model.SerializeToString())


@contextmanager
def linear_weights_transposed(module: torch.nn.Module) -> Iterator[None]:
    """While tracing, hold each nn.Linear's weight transposed, [in, out], and compute x @ W^T + b with it.

    The TorchScript exporter writes linear as MatMul(x, Transpose(W)), and for CLIP's text encoders its
    graph passes materialize those transposes as new tensors, held until the file is written: SDXL's
    text_encoder_2 (2.6 GiB of weights) peaked at 5.15 GiB RSS, and at 3.56 GiB with the weights stored
    transposed, since each then enters the graph as it is, in the same MatMul (Gemm for 2-D inputs)
    nodes. The U-Net is not affected either way (an SDXL U-Net of 1.32 B parameters: 6.2 GiB with or
    without). Weights are transposed one at a time (the peak grows by one weight) and back afterwards.
    Subclasses of nn.Linear (LoRA layers) keep their own forward.
    """
    linears, seen = [], set()
    for layer in module.modules():
        if type(layer) is torch.nn.Linear and id(layer.weight) not in seen:
            seen.add(id(layer.weight))
            linears.append(layer)
    try:
        for layer in linears:
            layer.weight.data = layer.weight.data.t().contiguous()
            layer.forward = types.MethodType(_transposed_linear, layer)
        yield
    finally:
        for layer in linears:
            if "forward" in vars(layer):
                del layer.forward
                layer.weight.data = layer.weight.data.t().contiguous()


def _transposed_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and self.bias is not None:
        return torch.addmm(self.bias, x, self.weight)
    y = torch.matmul(x, self.weight)
    return y if self.bias is None else y + self.bias


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


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs, optional inputs) of an ONNX file as the manifest writes them, without loading
    its weights; optional inputs are those with a default (an initializer of their name)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
        return TensorSpec(value.name, dtype, shape)

    initializers = {t.name for t in graph.initializer}
    inputs = tuple(spec(v) for v in graph.input if v.name not in initializers)
    optional = tuple(spec(v) for v in graph.input if v.name in initializers)
    return inputs, tuple(spec(v) for v in graph.output), optional


def release(source: SourceModel, name: str, remaining: tuple[str, ...]) -> None:
    """Drop the PyTorch module behind graph `name` unless a graph still to come needs it."""
    attribute = _OWNER[name]
    if all(_OWNER[later] != attribute for later in remaining):
        setattr(source, attribute, None)
