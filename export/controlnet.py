"""`sdonnx export CONTROLNET OUT`: a diffusers ControlNetModel folder, hub id or single-file ControlNet
to OUT/controlnet/model.onnx and a ControlNet manifest (runtime/controlnet.py), checked against PyTorch.

IO, as the existing ONNX ControlNet exports: sample [2B, C, h, w], timestep [], encoder_hidden_states
[2B, S, D], controlnet_cond [2B, 3, H, W] (pixels in [0, 1]), conditioning_scale [] (SDXL: also
text_embeds [2B, P], time_ids [2B, 6]) -> down_block_0_additional_residual ...
down_block_N_additional_residual and mid_block_additional_residual, the optional inputs of the same
names that every U-Net export takes (export/graphs.py). Guess mode's per-residual scales are applied
by the runtime (the graph is traced without guess mode; the scales multiply its outputs).

A single-file ControlNet in the original layout (`control_v11p_sd15_canny.safetensors`:
`input_blocks`, `zero_convs`, `input_hint_block`, `middle_block_out`, maybe under `control_model.`)
is converted by diffusers' own converter; its architecture comes from `config` (a folder with a
ControlNetModel config.json) or, by default, from the bundled U-Net config of the family its
cross-attention width names (SD 1.5, SD 2.1, SDXL base), with ControlNet's defaults added.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import torch

from sdonnx.errors import ExportError, InputError
from sdonnx.export.graphs import SEQUENCE, residuals

CLASS_NAME = "ControlNetModel"
HINT_KEY = "input_hint_block.0.weight"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Cross-attention key of the first attention level: SD 1.x/2.x at input_blocks.1, SDXL at input_blocks.4.
_WIDTH_KEYS = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": {768: "sd1", 1024: "sd2"},
               "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": {2048: "sdxl"}}
_PREFIX = "control_model."


def is_controlnet(source: str) -> bool:
    """Whether SOURCE is a ControlNet: a folder whose config.json names ControlNetModel, a
    safetensors file with ControlNet's hint block, or a hub repository whose config.json does."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _class_name(path / "config.json") == CLASS_NAME
    if path.is_file():
        return path.suffix == ".safetensors" and any(k.endswith(HINT_KEY) for k in _safetensors_keys(path))
    if _HUB_ID.match(source):
        from huggingface_hub import hf_hub_download

        try:
            return _class_name(Path(hf_hub_download(source, "config.json"))) == CLASS_NAME
        except Exception:  # not reachable, or no root config.json: the pipeline path reports it
            return False
    return False


def load_controlnet(source: str, *, config: Path | None = None, allow_pickle: bool = False):
    """The ControlNetModel SOURCE names, fp32 in eval mode, and a description of where it came from."""
    from diffusers import ControlNetModel

    path = Path(source).expanduser()
    if path.is_file():
        return _single_file(path, config), f"single-file ControlNet {path.resolve()}"
    if config is not None:
        raise InputError("config", str(config), "only with a single-file ControlNet SOURCE")
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]
        try:
            path = Path(snapshot_download(source, allow_patterns=patterns))
        except Exception as e:
            raise ExportError(f"source: {source!r}: cannot download the ControlNet: {e}") from e
        description = f"hub {source}"
    else:
        description = f"ControlNet folder {path.resolve()}"
    from sdonnx.export.source import _weights_kwargs

    try:
        net = ControlNetModel.from_pretrained(path, **_weights_kwargs(path, allow_pickle))
    except InputError:
        raise
    except Exception as e:
        raise ExportError(f"{path}: cannot load the ControlNet: {type(e).__name__}: {e}") from e
    return net.float().eval().requires_grad_(False), description


def export_controlnet(config) -> object:
    """Export, check and atomically write the ControlNet config.source to config.out (an ExportConfig);
    returns the ControlNetManifest written."""
    from sdonnx.export import _Progress, _libraries_quiet, _versions
    from sdonnx.export.attention import set_attention
    from sdonnx.export.check import check_graph
    from sdonnx.export.graphs import Graph, export_graph, io_specs
    from sdonnx.files import staged_files, staged_folder
    from sdonnx.runtime.controlnet import COMPONENT, GRAPH_FILE, ControlNetManifest, Residual
    from sdonnx.runtime.manifest import MANIFEST_NAME, GraphSpec, family_for, sha256_file

    if config.dtype != "fp32" or config.static_shape is not None or config.loras:
        raise InputError("dtype" if config.dtype != "fp32" else "static_shape" if config.static_shape else "lora",
                         "given with a ControlNet SOURCE", "a plain fp32 export (ControlNets take no --dtype, "
                         "--static-shape or --lora yet)")
    say = _Progress(config.quiet)
    with staged_folder(config.out, overwrite=config.overwrite) as folder:
        say.line(f"loading {config.source}")
        with _libraries_quiet(config.quiet):
            net, description = load_controlnet(config.source, config=config.config, allow_pickle=config.allow_pickle)
        set_attention(net, config.attention)
        wrapper = _ControlNetGraph(net).eval()
        trace, check = wrapper.example(1, 1), wrapper.example(2, 2)
        graph = Graph(COMPONENT, wrapper, wrapper.input_names, wrapper.output_names, wrapper.dynamic_axes, trace,
                      check)
        started = time.perf_counter()
        say.part(f"{COMPONENT}: exporting…")
        cases = graph.cases()
        path = folder / GRAPH_FILE
        with torch.no_grad():
            export_graph(graph, path, opset=config.opset)
        say.part(" checking…")
        parity = check_graph(COMPONENT, path, cases, min_psnr=config.min_psnr)
        seconds = time.perf_counter() - started
        say.line(f" max|Δ| {parity.max_abs_diff:.1e} PSNR {parity.psnr_db:.0f} dB ({seconds:.1f} s)")
        net.save_config(folder / COMPONENT)
        inputs, outputs, _ = io_specs(path)
        files = {p.relative_to(folder).as_posix(): sha256_file(p)
                 for p in staged_files(folder) if p.name != MANIFEST_NAME}
        c = net.config
        text_time = wrapper.text_time
        manifest = ControlNetManifest(
            family="sdxl" if text_time else family_for(c.cross_attention_dim),
            cross_attention_dim=int(c.cross_attention_dim),
            in_channels=int(c.in_channels),
            conditioning_channels=int(c.conditioning_channels),
            conditioning_downsample=wrapper.downsample,
            residuals=tuple(Residual(r.name, r.channels, r.downsample) for r in residuals(net)),
            graphs={COMPONENT: GraphSpec(GRAPH_FILE, inputs, outputs, check=parity.as_dict())},
            text_embeds_dim=text_time[0] if text_time else None,
            time_id_count=text_time[1] if text_time else None,
            global_pool_conditions=bool(c.global_pool_conditions),
            versions=_versions(config.opset),
            files=files,
            source=description,
        )
        manifest.write(folder)
    say.line(f"wrote {config.out}")
    return manifest


class _ControlNetGraph(torch.nn.Module):
    """The ControlNet returning its residuals as a flat tuple, with IO names, axes and examples."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.residuals = residuals(net)
        c = net.config
        self.downsample = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
        self.text_time = None
        if c.addition_embed_type == "text_time":
            # SDXL base ControlNets: 6 time ids (sizes and crops), each addition_time_embed_dim wide.
            count = 6
            self.text_time = (int(c.projection_class_embeddings_input_dim) - count * int(c.addition_time_embed_dim),
                              count)
        extra = ("text_embeds", "time_ids") if self.text_time else ()
        self.input_names = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                            "conditioning_scale", *extra)
        self.output_names = tuple(r.name for r in self.residuals)
        self.dynamic_axes = {
            "sample": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: SEQUENCE},
            "controlnet_cond": {0: "batch_size", 2: "image_height", 3: "image_width"},
            **{name: {0: "batch_size"} for name in extra},
            **{r.name: {0: "batch_size", 2: f"{r.name}_height", 3: f"{r.name}_width"} for r in self.residuals},
        }

    def example(self, batch: int, seed: int) -> tuple:
        """Inputs for `batch` images: a latent side the downsamplers cannot halve evenly (as the
        U-Net's trace) for batch 1, 8x6 latents otherwise."""
        c = self.net.config
        generator = torch.Generator().manual_seed(seed)
        odd = 2 ** (len(c.block_out_channels) - 1) + 1
        h, w = (odd, odd) if batch == 1 else (8, 6)
        n = 2 * batch
        context = 77 if batch == 1 else 154
        inputs = (
            torch.randn((n, c.in_channels, h, w), generator=generator),
            torch.rand((), generator=generator) * 1000,
            torch.randn((n, context, c.cross_attention_dim), generator=generator),
            torch.rand((n, c.conditioning_channels, h * self.downsample, w * self.downsample), generator=generator),
            torch.tensor(0.5 + torch.rand((), generator=generator).item()),
        )
        if self.text_time:
            inputs += (torch.randn((n, self.text_time[0]), generator=generator),
                       torch.rand((n, self.text_time[1]), generator=generator) * 1024)
        return inputs

    def forward(self, *inputs, **named):
        given = dict(zip(self.input_names, inputs)) | named
        added = {k: given[k] for k in ("text_embeds", "time_ids")} if self.text_time else None
        down, mid = self.net(given["sample"], given["timestep"], given["encoder_hidden_states"],
                             given["controlnet_cond"], given["conditioning_scale"], added_cond_kwargs=added,
                             return_dict=False)
        return (*down, mid)


def _single_file(path: Path, config: Path | None):
    """A ControlNetModel from an original-layout safetensors file (pickles are refused: ControlNet
    files are published as safetensors)."""
    from diffusers import ControlNetModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ExportError(f"{path}: a single-file ControlNet must be .safetensors")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: cannot read it as a safetensors file: {e}") from e
    if config is None:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "config.json").write_text(json.dumps(_bundled_config(tensors, path)))
            return _convert(ControlNetModel, tensors, Path(folder), path)
    if not (Path(config) / "config.json").is_file():
        raise InputError("config", str(config), "a folder with a ControlNetModel config.json")
    return _convert(ControlNetModel, tensors, Path(config), path)


def _convert(cls, tensors: dict, folder: Path, path: Path):
    try:
        net = cls.from_single_file(tensors, config=str(folder), local_files_only=True)
    except Exception as e:
        raise ExportError(f"{path}: its weights do not fit the ControlNet config {folder / 'config.json'}: "
                          f"{type(e).__name__}: {e}") from e
    on_meta = [k for k, t in net.named_parameters() if t.is_meta]
    if on_meta:
        raise ExportError(f"{path}: the file lacks ControlNet weights its config describes, such as {on_meta[:3]}")
    return net.float().eval().requires_grad_(False)


def _bundled_config(tensors: dict, path: Path) -> dict:
    """A ControlNetModel config for the family the file's cross-attention width names, from the
    bundled U-Net config (the layers a ControlNet copies), with ControlNet's own defaults."""
    import inspect

    from diffusers import ControlNetModel

    from sdonnx.export.single_file import bundled_config

    family = None
    for key, families in _WIDTH_KEYS.items():
        for name in (key, _PREFIX + key):
            if name in tensors:
                family = families.get(int(tensors[name].shape[1]))
    if family is None:
        raise ExportError(f"{path}: no SD 1.x, 2.x or SDXL cross-attention layout found; pass --config with a "
                          "folder holding this ControlNet's config.json")
    unet = json.loads((bundled_config(family) / "unet" / "config.json").read_text())
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet.items() if k in accepted}
    hint = next(t for k, t in tensors.items() if k.endswith(HINT_KEY))
    return {"_class_name": CLASS_NAME, **config, "conditioning_channels": int(hint.shape[1])}


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError):
        return []
