"""`sdonnx export`: a diffusers folder, hub id or single-file checkpoint to a checked ONNX folder
(a ControlNet SOURCE to a ControlNet folder: export/controlnet.py).

The folder has optimum's layout (text_encoder/, unet/, vae_encoder/, vae_decoder/ with model.onnx and
config.json; tokenizer/, scheduler/, model_index.json; SDXL adds text_encoder_2/ and tokenizer_2/, and
its refiner has no text_encoder/ or tokenizer/) plus manifest.json. Every graph is compared with its
PyTorch module before anything appears at OUT.

Importing this module does not import torch: `sdonnx --help` stays fast, and a missing torch is
reported with the install command when an export actually starts.
"""

from __future__ import annotations

import gc
import importlib
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sdonnx.config import check_int, check_real
from sdonnx.errors import InputError, SdonnxError
from sdonnx.export.check import PSNR_CAP_DB
from sdonnx.files import check_destination, scratch_folder, staged_files, staged_folder

if TYPE_CHECKING:
    from sdonnx.export.source import SourceModel
    from sdonnx.runtime.manifest import Manifest

__all__ = ["ExportConfig", "export_model"]

INSTALL_HINT = 'pip install "sdonnx[export]"'
# Opset 17 has LayerNormalization as one operator (CLIP's text encoder) and runs on every ONNX Runtime
# from 1.12, DirectML and mobile builds included; 14 is the floor for the attention export, 20 the
# TorchScript exporter's ceiling.
OPSETS = range(14, 21)
# --dtype: fp32 is the export itself; the others are `sdonnx quantize` recipes of the same name.
DTYPES = ("fp32", "fp16", "int8")
ATTENTION = ("sliced", "full", "fused")


@dataclass(frozen=True)
class ExportConfig:
    """What to export and where; the `sdonnx export` flags map one to one onto these fields.

    static_shape (batch, height, width in pixels) pins the image batch B and size in every graph; the
    U-Net's batch is 2B because classifier-free guidance runs uncond||cond in one call. Sequence
    lengths stay dynamic (long prompts concatenate 77-token chunks).
    """

    source: str  # diffusers folder | hub id | single-file .safetensors (pickles only with allow_pickle)
    out: Path
    opset: int = 17
    static_shape: tuple[int, int, int] | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    quiet: bool = False
    min_psnr: float = 60.0  # per graph, dB against PyTorch; check.py explains the choice and its twin floor
    config: Path | None = None  # single-file only: the diffusers config folder to build the modules from
    dtype: str = "fp32"  # fp16 | int8: export fp32, then quantize with the recipe of that name
    # How the U-Net's attention is traced (export/attention.py). "fused": ONNX Runtime's blocked
    # MultiHeadAttention op; SD 1.5, one CFG call at 512 px on 2 cores: 3.97 s / 3.73 GB peak, against
    # 4.41 s / 4.06 GB "sliced" (standard ONNX ops, one head at a time) and 5.34 s / 7.70 GB "full"
    # (diffusers' processor as traced); benchmarks/results/ort-optimizer-512.md.
    attention: str = "fused"
    # The model card's settings, recorded as the manifest's `recommended` and used when a request names
    # none (SDXL-Turbo: 1-4 steps, guidance 0). No config fact says a model is distilled (the embedded
    # model uses trailing spacing and is not), so the user who knows the model says so.
    recommended_steps: int | None = None
    recommended_guidance: float | None = None
    # LoRAs merged into the weights before tracing (export/lora.py): ((file, weight), ...).
    loras: tuple[tuple[str, float], ...] = ()
    # Export the source's safety checker when it has one (runtime/safety.py); False leaves it out.
    safety_checker: bool = True
    # Feature caching (runtime/denoiser.py): the U-Net's deep_feature output and the shallow graph
    # unet_shallow/. Off by default, so that the folder keeps optimum's layout and IO exactly.
    feature_cache: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", str(self.source))
        object.__setattr__(self, "out", Path(self.out))
        if self.config is not None:
            object.__setattr__(self, "config", Path(self.config))
        if not isinstance(self.opset, int) or self.opset not in OPSETS:
            raise InputError("opset", self.opset, f"an integer from {OPSETS.start} to {OPSETS.stop - 1}")
        if self.static_shape is not None:
            shape = tuple(self.static_shape)
            if len(shape) != 3 or any(not isinstance(d, int) or d <= 0 for d in shape):
                raise InputError("static_shape", self.static_shape, "(batch, height, width): three positive integers")
            object.__setattr__(self, "static_shape", shape)
        # PSNR_CAP_DB stands for bit-identical outputs: a higher floor could never pass.
        if not isinstance(self.min_psnr, (int, float)) or not 0 < self.min_psnr <= PSNR_CAP_DB:
            raise InputError("min_psnr", self.min_psnr, f"a PSNR in dB above 0 and at most {PSNR_CAP_DB:g}")
        if self.dtype not in DTYPES:
            raise InputError("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION:
            raise InputError("attention", self.attention, f"one of {', '.join(ATTENTION)}")
        if self.recommended_steps is not None:
            check_int("recommended_steps", self.recommended_steps, 1, 1000)
        if self.recommended_guidance is not None:
            check_real("recommended_guidance", self.recommended_guidance, 0, 50)
        object.__setattr__(self, "loras", tuple((str(name), weight) for name, weight in self.loras))

    @property
    def recommended(self) -> dict[str, float]:
        """The manifest's recommended settings: those the user gave."""
        given = {"steps": self.recommended_steps, "guidance": self.recommended_guidance}
        return {k: v for k, v in given.items() if v is not None}


def export_model(config: ExportConfig) -> Manifest:
    """Export, check and atomically write config.source to config.out; returns the manifest written.

    Raises InputError for bad arguments or destinations, ExportError when loading, exporting or the
    parity check fails (OUT is then left as it was), SdonnxError when the export extras are missing.
    OUT is checked first, before anything is imported or loaded: it may not be SOURCE (or --config),
    lie inside it or hold it, and --overwrite replaces only a previous model folder (`check_destination`).
    """
    check_destination(
        config.out, sources={"SOURCE": config.source, "CONFIG": config.config}, overwrite=config.overwrite
    )
    _require_export_extras()
    from sdonnx.export import controlnet, lora

    if controlnet.is_controlnet(config.source):
        return controlnet.export_controlnet(config)
    from sdonnx.export.vae import export_vae, vae_class

    if vae_class(config.source):
        return export_vae(config)

    loras = lora.check_files(config.loras)  # missing files and bad weights fail before anything loads
    if config.dtype != "fp32":
        return _export_quantized(config)
    from sdonnx.export import graphs
    from sdonnx.export.source import load_source
    from sdonnx.export.writer import write_pipeline_files

    say = _Progress(config.quiet)
    with staged_folder(config.out, overwrite=config.overwrite) as folder:
        say.line(f"loading {config.source}")
        with _libraries_quiet(config.quiet):
            source = load_source(config.source, allow_pickle=config.allow_pickle, config=config.config)
        _check_static_shape(config.static_shape, graphs.vae_downsample(source.vae))
        if loras:
            baked = lora.bake(source, loras)
            say.line(f"merged LoRAs {baked}")
            source.description += f" + LoRAs {baked}"
        facts = _model_facts(source)
        write_pipeline_files(folder, source)
        safety = _export_safety_checker(source, folder, config, say)
        checks, weights = _export_and_check(source, folder, config, say)
        manifest = _manifest(folder, facts, checks, weights, config, safety)
        manifest.write(folder)
    say.line(f"wrote {config.out}")
    return manifest


def _export_quantized(config: ExportConfig) -> Manifest:
    """Export fp32 into a hidden folder, then quantize it into OUT's staging folder, published as OUT.

    OUT is checked before the export starts, and nothing appears there unless both steps complete.
    The fp32 export lives in a marked scratch folder beside OUT, which staging cleans if a kill leaves it.
    """
    from sdonnx.quantize import QuantizeConfig, quantize_model

    with staged_folder(config.out, overwrite=config.overwrite) as stage:
        with scratch_folder(config.out) as tmp:
            fp32 = tmp / "fp32"
            export_model(replace(config, out=fp32, dtype="fp32", overwrite=False))
            # quantize_model stages beside `stage` as well and replaces the (empty) stage with its result.
            recipe = QuantizeConfig(
                model=str(fp32), out=stage, recipe=config.dtype, overwrite=True, quiet=config.quiet
            )
            return quantize_model(recipe)


def _export_and_check(
    source: SourceModel, folder: Path, config: ExportConfig, say: _Progress
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Export each graph into folder/<name>/model.onnx and check it; the parity numbers by graph, and
    the checked weight maps of the graphs LoRAs change (`weight_map`).

    PyTorch's reference outputs are computed first and the module released before ONNX Runtime loads
    the graph, so a full-size U-Net is in memory once, not twice. Modules are released as they are done.
    """
    from sdonnx.export import graphs, weight_map
    from sdonnx.export.check import check_graph

    trace, probe = graphs.probes(source, config.static_shape)
    checks, weights = {}, {}
    names = graphs.graph_names(source, feature_cache=config.feature_cache)
    for i, name in enumerate(names):
        started = time.perf_counter()
        say.part(f"{name}: exporting…")
        graph = graphs.build_graph(name, source, trace, probe, static=config.static_shape is not None,
                                   attention=config.attention, feature_cache=config.feature_cache)
        cases = graph.cases()
        path = folder / name / "model.onnx"
        graphs.export_graph(graph, path, opset=config.opset)
        del graph
        if name in weight_map.COMPONENTS:
            weights[name] = weight_map.record(getattr(source, name), path, name)
        graphs.release(source, name, names[i + 1:])
        gc.collect()
        say.part(" checking…")
        parity = check_graph(name, path, cases, min_psnr=config.min_psnr)
        checks[name] = parity.as_dict()
        seconds = time.perf_counter() - started
        say.line(f" max|Δ| {parity.max_abs_diff:.1e} PSNR {parity.psnr_db:.0f} dB ({seconds:.1f} s)")
    return checks, weights


def _export_safety_checker(source, folder: Path, config: ExportConfig, say) -> dict | None:
    """The source's safety checker as safety_checker/model.onnx (first, then released: SD's weighs
    1.2 GB); its parity, None when there is none or config.safety_checker is off."""
    from sdonnx.export.safety import export_safety_checker

    checker, source.safety_checker = source.safety_checker, None
    if checker is None or not config.safety_checker:
        return None
    say.part("safety_checker: exporting… checking…")
    parity = export_safety_checker(checker, source.feature_extractor, folder, opset=config.opset,
                                   min_psnr=config.min_psnr)
    say.line(f" max|Δ| {parity['max_abs_diff']:.1e} PSNR {parity['psnr_db']:.0f} dB")
    del checker
    gc.collect()
    return parity


def _require_export_extras() -> None:
    for module in ("torch", "diffusers", "transformers", "onnx", "accelerate"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise SdonnxError(
                f"sdonnx export needs PyTorch, diffusers, transformers, onnx and accelerate ({module} is missing: {e}); "
                f"install them with: {INSTALL_HINT}"
            ) from None


def _check_static_shape(static_shape: tuple[int, int, int] | None, vae_downsample: int) -> None:
    if static_shape is not None and any(side % vae_downsample for side in static_shape[1:]):
        raise InputError(
            "static_shape", static_shape, f"height and width multiples of {vae_downsample} (one latent pixel)"
        )


def _model_facts(source: SourceModel) -> dict:
    """The manifest fields that come from the PyTorch modules, read before the modules are released."""
    from sdonnx.export.graphs import text_max_length, vae_downsample
    from sdonnx.export.source import scheduler_facts

    unet, vae = source.unet.config, source.vae.config
    schedule, prediction_type = scheduler_facts(source.scheduler_config)
    cross_attention_dim = int(unet.cross_attention_dim)
    return dict(
        family=_family(source, cross_attention_dim),
        prediction_type=prediction_type,
        latent_channels=int(vae.latent_channels),
        vae_scaling_factor=float(vae.scaling_factor),
        vae_shift_factor=float(getattr(vae, "shift_factor", None) or 0.0),
        vae_downsample=vae_downsample(source.vae),
        unet_in_channels=int(unet.in_channels),
        cross_attention_dim=cross_attention_dim,
        sample_size=int(unet.sample_size),
        tokenizer_max_length=text_max_length(source),
        schedule=schedule,
        source=source.description,
        latent_rgb=_latent_rgb(source.vae),
        upscaler=_upscaler_facts(source),
        **_text_time_facts(source),
    )


def _upscaler_facts(source: SourceModel):
    """The x4 upscaler's manifest field (the low-res image's noise schedule and top level); None otherwise."""
    from sdonnx.export.source import scheduler_facts
    from sdonnx.runtime.manifest import Upscaler

    if source.upscaler is None:
        return None
    schedule, _ = scheduler_facts(source.upscaler.low_res_scheduler_config)
    return Upscaler(schedule, source.upscaler.max_noise_level, int(source.unet.config.in_channels)
                    - int(source.vae.config.latent_channels))


def _latent_rgb(vae):
    """The step-preview map (runtime/previews.py) fitted against this VAE's encoder means."""
    import torch

    from sdonnx.export.graphs import vae_downsample
    from sdonnx.runtime.previews import fit_latent_rgb

    scale, shift = float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(pixels):
        with torch.no_grad():
            mean = vae.encode(torch.from_numpy(pixels).to(vae.dtype)).latent_dist.mean
        return (mean.float().numpy() - shift) * scale

    return fit_latent_rgb(encode, vae_downsample(vae))


def _family(source: SourceModel, cross_attention_dim: int) -> str:
    """The informational label: sd1, sd2, sdxl, sdxl-refiner, x4-upscaler or custom (the runtime reads facts only)."""
    from sdonnx.runtime.manifest import family_for

    if source.upscaler is not None:
        return "x4-upscaler"
    if source.sdxl:
        return "sdxl-refiner" if source.requires_aesthetics_score else "sdxl"
    return family_for(cross_attention_dim)


def _text_time_facts(source: SourceModel) -> dict:
    """SDXL's manifest fields, all from the source: none for SD 1.x/2.x (the manifest's defaults).

    pooled_text_encoder: the graph whose text_embeds output feeds the U-Net's text_embeds input;
    text_hidden_states: "penultimate", SDXL's raw hidden_states.{N-1} of each encoder (diffusers'
    hidden_states[-2]), which the graphs output by name;
    time_ids: derived from the U-Net's add_embedding sizes (source.text_time_conditioning);
    force_zeros_for_empty_prompt: model_index.json's (diffusers' SDXL default, true, when absent);
    vae_force_upcast: the VAE config's force_upcast, which diffusers honours in SDXL pipelines only.
    """
    if not source.sdxl:
        return {}
    return dict(
        pooled_text_encoder="text_encoder_2",
        text_hidden_states="penultimate",
        time_ids=source.text_time.time_ids,
        force_zeros_for_empty_prompt=bool(source.pipeline_config.get("force_zeros_for_empty_prompt", True)),
        vae_force_upcast=bool(getattr(source.vae.config, "force_upcast", False)),
    )


def _manifest(folder: Path, facts: dict, checks: dict[str, dict], weights: dict[str, dict],
              config: ExportConfig, safety: dict | None = None) -> Manifest:
    """The manifest of the finished folder: IO read back from the ONNX files, hashes of every file."""
    from sdonnx.export.graphs import io_specs
    from sdonnx.runtime.manifest import COMPONENTS, MANIFEST_NAME, GraphSpec, Manifest, sha256_file

    graphs = {}
    for name in (c for c in COMPONENTS if (folder / c / "model.onnx").is_file()):
        inputs, outputs, optional = io_specs(folder / name / "model.onnx")
        graphs[name] = GraphSpec(f"{name}/model.onnx", inputs, outputs, precision="fp32", check=checks[name],
                                 weights=weights.get(name), optional=optional)
    files = {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in staged_files(folder)
        if path.name != MANIFEST_NAME
    }
    safety_checker = None
    if safety is not None:
        from sdonnx.export.safety import GRAPH

        inputs, outputs, _ = io_specs(folder / GRAPH)
        safety_checker = GraphSpec(GRAPH, inputs, outputs, precision="fp32", check=safety)
    return Manifest(
        graphs=graphs, versions=_versions(config.opset), files=files, unet_attention=config.attention,
        vae_attention=config.attention,
        recommended=config.recommended, safety_checker=safety_checker, **facts,
    )


def _versions(opset: int) -> dict[str, str]:
    versions = {}
    for package in ("sdonnx", "torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    versions["opset"] = str(opset)
    return versions


@contextmanager
def _libraries_quiet(quiet: bool) -> Iterator[None]:
    """With quiet, silence diffusers' and transformers' loading bars and notices; restored afterwards."""
    if not quiet:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


class _Progress:
    """Stage lines on stderr ("unet: exporting… checking… max|Δ| 3e-07 PSNR 134 dB"); silent when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def part(self, text: str) -> None:
        if not self.quiet:
            print(text, end="", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)
