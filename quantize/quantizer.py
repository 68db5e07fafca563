"""`sdonnx quantize`: an fp32 model folder to an fp16 / int8 / int4 variant, through ONNX Runtime's tooling.

Each graph gets the precision its recipe names (`recipes.RECIPES`), is checked against its fp32
source on seeded inputs (`check`), and falls back to fp32 with a message if its outputs hold NaN or
inf. The folder is built beside OUT and renamed into place only when complete
(`sdonnx.files.staged_folder`); OUT may not be MODEL, lie inside it or hold it, and --overwrite
replaces only a previous model folder (`sdonnx.files.check_destination`). The new manifest.json
records each graph's precision, IO (read from the new graph), its parity with fp32 and the sha256
of every file, plus a `quantization` section naming the recipe.

Input is a folder written by `sdonnx export` or an optimum export: for the latter the facts are
derived from its configs exactly as the runtime does (`ModelFolder.load`), so nothing is guessed
and the user need not re-export a model they already have.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import onnx

from sdonnx.errors import InputError
from sdonnx.files import check_destination, staged_files, staged_folder
from sdonnx.quantize import check
from sdonnx.quantize.calibration import read_prompts, record_feeds
from sdonnx.quantize.convert import STATIC_ACTIVATIONS, convert_graph, op_types
from sdonnx.quantize.recipes import DEFAULT_BLOCK_SIZE, DEFAULT_CALIBRATION_STEPS, DEFAULT_RECIPE, RECIPES
from sdonnx.runtime.manifest import MANIFEST_NAME, GraphSpec, Manifest, sha256_file

WEIGHTED = ("unet", "text_encoder", "text_encoder_2")  # the graphs whose weight maps LoRAs read
from sdonnx.runtime.model import ModelFolder
from sdonnx.runtime.providers import RuntimeOptions


# Ops that only a quantized graph contains: quantizing one again would quantize quantization.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "QLinearMatMul", "QLinearConv", "MatMulNBits",
})
CPU_FP16_NOTE = (
    "note: fp16 graphs run no faster than fp32 on the CPU provider (ONNX Runtime inserts Casts around "
    "ops without fp16 CPU kernels); fp16 halves the files and is for GPU providers (CUDA, DirectML)"
)


@dataclass(frozen=True)
class QuantizeConfig:
    """What to quantize, how and where; the `sdonnx quantize` flags map one to one onto these fields.

    block_size: int4 only, the MatMulNBits block along K (a power of two >= 16).
    calibration_prompts: static recipes only (int8-static*), one prompt per line (default: a bundled list).
    calibration_steps: sampler steps per calibration prompt; every step's U-Net inputs are recorded.
    """

    model: str
    out: Path
    recipe: str = DEFAULT_RECIPE
    block_size: int = DEFAULT_BLOCK_SIZE
    calibration_prompts: Path | None = None
    calibration_steps: int = DEFAULT_CALIBRATION_STEPS
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise InputError("recipe", self.recipe, f"one of {', '.join(RECIPES)}")
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size & (size - 1):
            raise InputError("block_size", size, "a power of two >= 16 (16, 32, 64, 128, ...)")
        steps = self.calibration_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise InputError("calibration_steps", steps, "an integer from 1 to 1000")


def quantize_model(config: QuantizeConfig) -> Manifest:
    """Write the quantized folder at config.out and return its manifest; nothing is written on failure."""
    root, out = Path(config.model), Path(config.out)
    # Before MODEL is read: OUT must be neither MODEL (the fp32 graphs are the check's reference) nor
    # in or around it, and --overwrite replaces only a previous model folder.
    check_destination(out, sources={"MODEL": root}, overwrite=config.overwrite)
    source = _fp32_manifest(root)
    recipe = RECIPES[config.recipe]
    unknown = [c for c in source.graphs if c not in recipe]
    if unknown:
        raise InputError("MODEL", str(root), f"a folder whose graphs the recipes cover ({sorted(recipe)}); it has "
                         f"{unknown}")
    static = [c for c in source.graphs if recipe[c] in STATIC_ACTIVATIONS]
    prompts = read_prompts(config.calibration_prompts) if static or config.calibration_prompts else ()
    say = (lambda *_: None) if config.quiet else print
    if "fp16" in {recipe[c] for c in source.graphs}:
        say(CPU_FP16_NOTE)
    with staged_folder(out, overwrite=config.overwrite) as stage:
        calibration = record_feeds(root, static, prompts, steps=config.calibration_steps) if static else {}
        _copy_other_files(root, stage, source)
        feeds = check.check_feeds(root, source)
        graphs = {}
        for component, spec in source.graphs.items():
            graphs[component] = _quantize_graph(
                root, stage, component, spec, recipe[component], feeds[component],
                block_size=config.block_size, calibration=calibration.get(component, ()), say=say,
            )
        files = {p.relative_to(stage).as_posix(): sha256_file(p) for p in staged_files(stage)}
        quantization = {
            "recipe": config.recipe,
            "block_size": config.block_size,
            "calibration_prompts": len(prompts) if static else 0,
            "calibration_steps": config.calibration_steps if static else 0,
            "check": f"graphs.*.check: parity with the fp32 graphs of {root} on seeded inputs",
        }
        manifest = replace(source, graphs=graphs, files=files, quantization=quantization)
        manifest.write(stage)
    say(f"wrote {out} (recipe {config.recipe})")
    return manifest


def _fp32_manifest(root: Path) -> Manifest:
    """The folder's manifest (read, or derived for optimum folders); ModelError/InputError if not fp32."""
    if (root / MANIFEST_NAME).is_file():
        manifest = Manifest.read(root)
    else:
        manifest = ModelFolder.load(root, RuntimeOptions(provider="cpu"), optional=("vae_encoder",)).manifest
    for component, spec in manifest.graphs.items():
        found = op_types(root / spec.path) & QUANTIZED_OPS
        if spec.precision != "fp32" or found or _has_fp16_weights(root / spec.path):
            what = f"ops {sorted(found)}" if found else f"precision {spec.precision!r}"
            raise InputError(
                "model", str(root), f"an fp32 folder, but graph {component!r} is already quantized ({what}); "
                "quantize the fp32 export instead"
            )
    return manifest


def _has_fp16_weights(path: Path) -> bool:
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


def _copy_other_files(root: Path, stage: Path, manifest: Manifest) -> None:
    """Tokenizer, scheduler and config files as they are; the graphs and their weights are rewritten."""
    graph_dirs = {(root / spec.path).parent.resolve() for spec in manifest.graphs.values()}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        skip = path.name == MANIFEST_NAME or (path.parent.resolve() in graph_dirs and path.suffix != ".json")
        if path.is_file() and not skip and not rel.parts[0].startswith("."):
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, stage / rel)


def _quantize_graph(
    root: Path, stage: Path, component: str, spec: GraphSpec, precision: str, feeds: list[check.Feeds],
    *, block_size: int, calibration: Sequence[check.Feeds], say: Callable[[str], None],
) -> GraphSpec:
    """Convert one graph, check it against fp32; on NaN/inf write the fp32 graph instead."""
    src, dst = root / spec.path, stage / spec.path
    reference = check.run_all(check.load(src, component), feeds)
    convert_graph(precision, src, dst, block_size=block_size, calibration=calibration)
    session = check.load(dst, component)
    outputs = check.run_all(session, feeds)
    if precision != "fp32" and not check.finite(outputs):
        say(f"{component}: {precision} gives NaN/inf on the check inputs; keeping it fp32")
        _remove_graph(dst)
        precision = "fp32"
        convert_graph(precision, src, dst, block_size=block_size)
        session = check.load(dst, component)
        outputs = check.run_all(session, feeds)
    parity = check.worst(reference, outputs)
    say(f"{component}: {precision}, {_size_mb(dst):.1f} MB, {parity.psnr_db:.1f} dB vs fp32")
    weights = check.weight_map(src, dst, spec.weights) if component in WEIGHTED else None
    return GraphSpec(spec.path, session.inputs, session.outputs, precision=precision, check=parity.as_dict(),
                     weights=weights, optional=session.optional)


def _remove_graph(dst: Path) -> None:
    for path in dst.parent.iterdir():
        if path.suffix != ".json":
            path.unlink()


def _size_mb(dst: Path) -> float:
    return sum(p.stat().st_size for p in dst.parent.iterdir() if p.suffix != ".json") / 2**20
