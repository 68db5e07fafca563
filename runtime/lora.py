"""LoRA files applied at load time: kohya/A1111 and diffusers/PEFT safetensors, merged in NumPy.

A LoRA holds, per module, a low-rank pair: W' = W + weight * (alpha / rank) * up @ down (LoCon's
convolutions: `down` is a [rank, in, kh, kw] conv, `up` a 1x1 one, and the product is reshaped to
the kernel). Several LoRAs add up. The merged weights replace the graph's initializers when its
ONNX Runtime session is created (`SessionOptions.add_initializer`), so no graph is rewritten or
re-exported, and a later call without the LoRA opens the graph as it is on disk.

Keys this reads (the module path as the weight map has it, see runtime/weights.py):
- kohya / A1111: `lora_unet_<path with _>`, `lora_te_`/`lora_te1_` (text_encoder) and `lora_te2_`
  (text_encoder_2), then `.lora_down.weight`, `.lora_up.weight`, `.alpha`; the U-Net's path in
  diffusers' names (SD 1.x/2.x LoRAs) or in the original SGM layout's (`input_blocks_4_1_...`, what
  kohya's SDXL LoRAs use);
- diffusers / PEFT: `unet.<path>`, `text_encoder.<path>`, `text_encoder_2.<path>`, then
  `.lora_A.weight`/`.lora_B.weight` or `.lora.down.weight`/`.lora.up.weight` (optional `.alpha`).
LoHa, LoKr, DoRA and other LyCORIS kinds are refused by name rather than half applied.

Every shape is checked before anything is merged: ONNX Runtime takes a wrong-shaped initializer
and crashes the process later.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from sdonnx.errors import InputError
from sdonnx.runtime.onnx_file import Graph
from sdonnx.runtime.weights import WeightRef, dequantize, quantize_like, torch_shape

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin")
MODEL_LORAS = "loras"  # a model folder's own LoRAs, found by name without a LoRA folder
MAX_ABS_WEIGHT = 10.0  # A1111 takes any float; past a few units every LoRA only breaks the image
# The part of a key that says what the tensor is, after the module path.
_PARTS = {
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
# What other adapter kinds put in their keys: refused with their name.
_OTHER_KINDS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lora_mid": "LoCon with a "
                "Tucker core (lora_mid)", "dora_scale": "DoRA", "oft_blocks": "OFT", "diff": "full diff"}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}


@dataclass(frozen=True)
class LoraModule:
    """One module's low-rank pair, as the file holds it."""

    key: str  # the module's key in the file, for messages
    component: str
    module: str  # its path in the weight map
    down: np.ndarray  # [rank, in] or [rank, in, kh, kw]
    up: np.ndarray  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None

    @property
    def shape(self) -> tuple[int, ...]:
        """The PyTorch shape of the change: [out, in] or [out, in, kh, kw]."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, weight: float = 1.0, *, transposed: bool = False) -> np.ndarray:
        """weight * (alpha / rank) * up @ down in float32, in PyTorch's layout ([out, in(, kh, kw)]),
        or, `transposed`, a Linear's [in, out] (what a MatMul stores), computed as such: contiguous."""
        rank = self.down.shape[0]
        scale = np.float32(weight * (1.0 if self.alpha is None else self.alpha / rank))
        up = self.up.reshape(self.up.shape[0], rank).astype(np.float32) * scale
        down = self.down.reshape(rank, -1).astype(np.float32)
        return down.T @ up.T if transposed else (up @ down).reshape(self.shape)


@dataclass(frozen=True)
class Lora:
    """A parsed LoRA file."""

    path: Path
    modules: tuple[LoraModule, ...]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def components(self) -> set[str]:
        return {m.component for m in self.modules}


def short_hash(path: Path) -> str:
    """A1111's "Lora hashes" value: the first 12 hex digits of the sha256 of a safetensors file's
    tensor bytes (the header excluded, as kohya's "addnet" hash), or of a whole other file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() in SAFE_SUFFIXES:
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:12]


def read_tensors(path: Path, *, field: str = "lora") -> dict[str, np.ndarray]:
    """The tensors of a safetensors file; InputError naming the file for anything else."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(field, str(path), "a .safetensors file (pickled LoRAs can run code when loaded; "
                                           "convert it to safetensors first)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(field, str(path), f"a readable LoRA safetensors file (corrupt or not safetensors: {e})") \
            from None


def parse(path: Path, tensors: Mapping[str, np.ndarray], maps: Mapping[str, Mapping[str, WeightRef]],
          *, field: str = "lora") -> Lora:
    """The modules of a LoRA file, each resolved to a module of this model's weight maps."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in _PARTS if key.endswith(s)), None)
        if suffix is None:
            other = next((kind for marker, kind in _OTHER_KINDS.items() if f".{marker}" in key), None)
            if other:
                raise InputError(field, str(path), f"a LoRA or LoCon file; it is {other} ({key!r}), which sdonnx "
                                                   "does not apply")
            continue  # metadata-like extras (e.g. kohya's text_projection scale) carry no weights
        groups.setdefault(key[: -len(suffix)], {})[_PARTS[suffix]] = tensor
    resolvers = {component: _aliases(component, modules) for component, modules in maps.items()}
    modules, unknown = [], []
    for key, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise InputError(field, str(path), f"both down and up weights for {key!r}; it has only "
                                               f"{sorted(parts)}")
        component, module = _resolve(key, resolvers)
        if module is None:
            unknown.append((key, component))
            continue
        alpha = parts.get("alpha")
        down, up = parts["down"], parts["up"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise InputError(field, str(path), f"a low-rank pair at {key!r}: up {list(up.shape)} @ down "
                                               f"{list(down.shape)} does not multiply")
        modules.append(LoraModule(key, component, module, down, up,
                                  None if alpha is None else float(np.asarray(alpha, dtype=np.float32).reshape(-1)[0])))
    if unknown:
        key, component = unknown[0]
        where = (f"this model's {component}" if component in maps
                 else f"this model (it has no {component or 'such part'})")
        raise InputError(field, str(path), f"a LoRA for this model; {len(unknown)} of its {len(groups)} modules are "
                                           f"not in {where}, the first {key!r} (a LoRA for another model family?)")
    if not modules:
        raise InputError(field, str(path), "a LoRA file (kohya `lora_unet_*.lora_down.weight` or diffusers "
                                           "`unet.*.lora_A.weight` keys); it has none")
    return Lora(path, tuple(modules))


def check_shapes(lora: Lora, graphs: Mapping[str, Graph], maps: Mapping[str, Mapping[str, WeightRef]],
                 *, field: str = "lora") -> None:
    """Every module's change must have its weight's shape: InputError naming the first that does not."""
    for m in lora.modules:
        ref = maps[m.component][m.module]
        check_shape(lora.path, m, torch_shape(graphs[m.component].initializers[ref.initializer].shape, ref.layout),
                    field=field)


def check_shape(path: Path, m: LoraModule, weight: tuple[int, ...], *, field: str = "lora") -> None:
    """InputError unless `m`'s change fits a weight of PyTorch shape `weight` (a Linear-shaped change
    fits a 1x1 convolution, SD 1.x's proj_in/proj_out, and the reverse)."""
    strip = lambda s: tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)  # noqa: E731
    if tuple(m.shape) != tuple(weight) and strip(m.shape) != strip(weight):
        raise InputError(field, str(path), f"a LoRA for this model: module {m.key!r} changes a {list(m.shape)} "
                                           f"weight, this model's {m.component}.{m.module} is {list(weight)} "
                                           "(a LoRA for another model family or size?)")


def merge(loras: Sequence[tuple[Lora, LoraChoice | float]], graphs: Mapping[str, Graph],
          maps: Mapping[str, Mapping[str, WeightRef]]) -> dict[str, dict[str, np.ndarray]]:
    """component -> {initializer: merged tensor} for the weights the LoRAs change, in the stored
    dtype and layout (quantized weights get new integer values, scale and zero point). Each LoRA
    comes with its weight, or its LoraChoice (whose weight may differ for the U-Net)."""
    changes: dict[tuple[str, str], np.ndarray] = {}  # in the stored tensor's layout
    for lora, chosen in loras:
        for m in lora.modules:
            weight = chosen.weight_of(m.component) if isinstance(chosen, LoraChoice) else chosen
            if weight == 0:
                continue
            ref = maps[m.component][m.module]
            shape = graphs[m.component].initializers[ref.initializer].shape
            change = m.delta(weight, transposed=ref.layout == "in_out").reshape(shape)
            key = (m.component, m.module)
            if key in changes:
                changes[key] += change
            else:
                changes[key] = change
    merged: dict[str, dict[str, np.ndarray]] = {}
    for (component, module), change in changes.items():
        ref = maps[component][module]
        tensors = graphs[component].initializers
        stored = tensors[ref.initializer]
        out = merged.setdefault(component, {})
        if ref.scale is None:
            if stored.dtype == "float32":
                out[ref.initializer] = np.add(stored.read(), change, out=change)
            else:
                out[ref.initializer] = (stored.read().astype(np.float32) + change).astype(stored.dtype)
            continue
        scale, zero_point = tensors[ref.scale].read(), tensors[ref.zero_point].read()
        values = dequantize(stored.read(), scale, zero_point, ref.axis) + change
        q, new_scale, new_zero = quantize_like(values, np.dtype(stored.dtype), scale.dtype, ref.axis,
                                               per_channel=scale.size > 1)
        out[ref.initializer], out[ref.scale], out[ref.zero_point] = q, new_scale, new_zero.reshape(zero_point.shape)
    return merged


def _aliases(component: str, modules: Iterable[str]) -> dict[str, str]:
    """Every spelling of each module a LoRA key may use -> the module path."""
    modules = list(modules)
    names: dict[str, str | None] = {}

    def add(alias: str, module: str) -> None:
        names[alias] = module if names.get(alias, module) == module else None  # ambiguous: neither

    sgm = sgm_names(modules) if component == "unet" else {}
    for module in modules:
        for spelling in (module, f"text_model.{module}" if component != "unet" else None, sgm.get(module)):
            if spelling:
                add(spelling, module)
                add(spelling.replace(".", "_"), module)
    return {alias: module for alias, module in names.items() if module is not None}


def _resolve(key: str, resolvers: Mapping[str, Mapping[str, str]]) -> tuple[str | None, str | None]:
    """(component, module path) of a LoRA key; module None when the model has no such module."""
    key = key.removeprefix("base_model.model.")
    key = re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", key)
    key = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", key)
    for prefixes in (_KOHYA_PREFIXES, _DIFFUSERS_PREFIXES):
        # the longest prefix first: "text_encoder_2." before "text_encoder."
        for prefix in sorted(prefixes, key=len, reverse=True):
            if key.startswith(prefix):
                component = prefixes[prefix]
                return component, resolvers.get(component, {}).get(key[len(prefix):])
    return None, None


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2":
        "time_embed.2", "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0", "conv_out": "out.2"}


def sgm_names(modules: Sequence[str]) -> dict[str, str]:
    """diffusers U-Net module path -> the original (LDM/SGM) layout's, for the modules that have one.

    The layout numbers blocks flat: input_blocks 0 is conv_in, then each down block's resnets (with
    their attention at index 1) and its downsampler; output_blocks the same for the up blocks, their
    upsampler after the last resnet (and its attention). Layers per block come from the modules.
    """
    layers = len({m.split(".")[3] for m in modules if m.startswith("down_blocks.0.resnets.")})
    has_attention = {m.split(".")[1] for m in modules if m.startswith("up_blocks.") and ".attentions." in m}
    names = {}
    for module in modules:
        parts = module.split(".")
        name = _TOP.get(module)
        if name is None and len(parts) >= 4 and parts[0] in ("down_blocks", "up_blocks", "mid_block"):
            name = _block_name(parts, layers, has_attention)
        if name is not None:
            names[module] = name
    return names


def _block_name(parts: list[str], layers: int, has_attention: set[str]) -> str | None:
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = {"resnets": 2 * index, "attentions": 1}.get(kind)
        return None if slot is None else _inner(f"middle_block.{slot}", kind, rest)
    kind, block, index, rest = parts[2], int(parts[1]), int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op" if rest == ["conv"] else None
        slot = {"resnets": 0, "attentions": 1}.get(kind)
        return None if slot is None else _inner(f"input_blocks.{1 + block * (layers + 1) + index}.{slot}", kind, rest)
    if kind == "upsamplers":
        position = 2 if parts[1] in has_attention else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{position}.conv" if rest == ["conv"] else None
    slot = {"resnets": 0, "attentions": 1}.get(kind)
    return None if slot is None else _inner(f"output_blocks.{block * (layers + 1) + index}.{slot}", kind, rest)


def _inner(prefix: str, kind: str, rest: list[str]) -> str | None:
    if kind == "resnets":
        name = _RESNET.get(".".join(rest))
        return None if name is None else f"{prefix}.{name}"
    return f"{prefix}.{'.'.join(rest)}"


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA a request asks for: the name as the user wrote it, the file it names, its weight (the
    text encoders', and the U-Net's unless unet_weight says otherwise: A1111's <lora:NAME:TE:UNET>),
    and the field it came from (for messages)."""

    name: str
    path: Path
    weight: float
    field: str = "loras"
    unet_weight: float | None = None

    def weight_of(self, component: str) -> float:
        return self.unet_weight if component == "unet" and self.unet_weight is not None else self.weight


def available(lora_dir: Path | None) -> dict[str, Path]:
    """name (file stem) -> file for every LoRA under `lora_dir`, subfolders included."""
    if lora_dir is None or not Path(lora_dir).is_dir():
        return {}
    files = sorted(p for p in Path(lora_dir).rglob("*") if p.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES)
    return {p.stem: p for p in reversed(files)}  # the first in sorted order wins a duplicate stem


def check_weight(name: str, weight: object, field: str = "loras") -> None:
    """InputError unless `weight` is a number in [-MAX_ABS_WEIGHT, MAX_ABS_WEIGHT] (NaN included)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not abs(weight) <= MAX_ABS_WEIGHT:
        raise InputError(f"{field}: {name}", weight, f"a LoRA weight in [-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}]")


def choose(requested: Iterable[tuple], lora_dir: Path | None,
           model_root: Path | None = None) -> tuple[LoraChoice, ...]:
    """(name or path, weight, field[, unet weight]) -> the LoRAs to apply. A name resolves against
    `lora_dir` (by file stem, subfolders included), then the model folder's own `loras/` (the embedded
    model ships its LCM-LoRA there); a path (with a suffix or a folder) against `lora_dir`, then as
    given. Weight 0 switches a LoRA off; one file asked for twice gets the sum of its weights."""
    own = None if model_root is None else Path(model_root) / MODEL_LORAS
    found = None
    chosen: dict[Path, LoraChoice] = {}
    for name, weight, field, *rest in requested:
        unet_weight = rest[0] if rest and rest[0] != weight else None
        check_weight(name, weight, field)
        if unet_weight is not None:
            check_weight(name, unet_weight, field)
        as_path = Path(name)
        if as_path.suffix or len(as_path.parts) > 1:
            inside = lora_dir is not None and not as_path.is_absolute()
            candidates = ([Path(lora_dir) / as_path] if inside else []) + [as_path]
            path = next((p for p in candidates if p.is_file()), None)
        else:
            found = {**available(own), **available(lora_dir)} if found is None else found
            path = found.get(name)
        if path is None:
            names = sorted({**available(own), **available(lora_dir)})
            where = (f"--lora-dir {lora_dir} (it holds {', '.join(names[:20]) or 'no LoRA files'}"
                     f"{', ...' if len(names) > 20 else ''})" if lora_dir is not None else "no --lora-dir given")
            raise InputError(field, name, f"a LoRA file, or the name of one in the LoRA folder; {where}")
        path = path.resolve()
        choice = LoraChoice(name, path, float(weight), field, None if unet_weight is None else float(unet_weight))
        if path in chosen:
            before = chosen[path]
            unet = before.weight_of("unet") + choice.weight_of("unet")
            total = before.weight + choice.weight
            choice = LoraChoice(name, path, total, field, None if unet == total else unet)
        chosen[path] = choice
    return tuple(c for c in chosen.values() if c.weight != 0 or c.weight_of("unet") != 0)


class Adapters:
    """The LoRAs of one model folder: the weight maps and graph headers they need (read once), the
    check of a request's LoRAs before any graph runs, and their merge into the sessions."""

    COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

    def __init__(self, root: Path, manifest):
        self.root, self.manifest = Path(root), manifest
        self._graphs: dict[str, Graph] = {}
        self._maps: dict[str, dict[str, WeightRef]] = {}
        self._parsed: dict[tuple, Lora] = {}
        self._hashes: dict[tuple, str] = {}
        self._active: tuple = ()
        self._touched: set[str] = set()

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in self.COMPONENTS if c in self.manifest.graphs)

    def short_hash(self, path: Path) -> str:
        """`short_hash(path)`, computed once per file version."""
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = short_hash(path)
        return self._hashes[key]

    def graph(self, component: str) -> Graph:
        if component not in self._graphs:
            from sdonnx.runtime.onnx_file import read_graph

            self._graphs[component] = read_graph(self.root / self.manifest.graphs[component].path)
        return self._graphs[component]

    def weight_map(self, component: str) -> Mapping[str, WeightRef]:
        """The manifest's map, or (folders without one) the map derived from the graph."""
        if component not in self._maps:
            from sdonnx.runtime.weights import derive

            recorded = self.manifest.graphs[component].weights
            self._maps[component] = dict(recorded) if recorded is not None else derive(self.graph(component))
        return self._maps[component]

    def prepare(self, choices: Sequence[LoraChoice]) -> list[tuple[Lora, LoraChoice]]:
        """Each chosen file parsed and checked against this model (shapes included), no graph opened."""
        if not choices:
            return []
        maps = {c: self.weight_map(c) for c in self.components}
        parsed, out = {}, []
        for choice in choices:
            stat = choice.path.stat()
            key = (choice.path, stat.st_mtime_ns, stat.st_size)
            lora = self._parsed.get(key) or parse(choice.path, read_tensors(choice.path, field=choice.field), maps,
                                                  field=choice.field)
            for component in sorted(lora.components):
                precision = self.manifest.graphs[component].precision
                if precision not in ("fp32", "fp16", "int8"):
                    raise InputError(choice.field, choice.name, f"a model whose {component} is fp32, fp16 or int8 "
                                     f"(this one's is {precision}: bake the LoRA in with `sdonnx export --lora` "
                                     "and quantize that)")
            check_shapes(lora, {c: self.graph(c) for c in lora.components}, maps, field=choice.field)
            parsed[key] = lora
            out.append((lora, choice))
        self._parsed = parsed
        return out

    def token_table(self, component: str) -> tuple[WeightRef, tuple[int, ...]]:
        """The text encoder's token table (textual inversion): its weight and [vocabulary, width]."""
        from sdonnx.errors import ModelError
        from sdonnx.runtime.embeddings import TABLE

        ref = self.weight_map(component).get(TABLE)
        if ref is None:
            raise ModelError(f"{self.root}: the {component} graph has no token table this runtime can find "
                             "(textual inversion needs one; re-export the model with `sdonnx export`)")
        return ref, self.graph(component).initializers[ref.initializer].shape

    def apply(self, sessions, choices: Sequence[LoraChoice], rows: Mapping[str, Mapping[int, np.ndarray]] | None = None
              ) -> None:
        """Make `sessions` run with exactly `choices` merged in and, per text encoder, the token table
        rows in `rows` replaced (textual inversion); none: the weights on disk. Only the graphs whose
        weights change are closed (before the merge, so two copies never coexist) and re-opened on
        their next use."""
        rows = {c: r for c, r in (rows or {}).items() if r}
        key = (tuple((c.path, c.path.stat().st_mtime_ns, c.weight, c.unet_weight) for c in choices),
               tuple((c, tuple((i, v.tobytes()) for i, v in sorted(r.items()))) for c, r in sorted(rows.items())))
        if key == self._active:
            return
        loras = self.prepare(choices)
        touching = {m.component for lora, chosen in loras for m in lora.modules if chosen.weight_of(m.component)}
        touching |= set(rows)
        for component in self._touched | touching:
            sessions.replace_weights(component, {})
        maps = {c: self.weight_map(c) for c in touching}
        merged = merge(loras, {c: self.graph(c) for c in touching}, maps)
        if "unet" in merged and "unet_shallow" in self.manifest.graphs:
            # Feature caching's shallow graph holds a few of the U-Net's weights, under the same initializer
            # names in float folders (request.check_cache_interval refuses the others): they get the same merge.
            own = self.graph("unet_shallow").initializers
            merged["unet_shallow"] = {name: tensor for name, tensor in merged["unet"].items() if name in own}
        for component, replaced in rows.items():
            ref, _ = self.token_table(component)
            table = self.graph(component).initializers[ref.initializer].read()
            for row, vector in replaced.items():
                table[row] = vector.astype(table.dtype)
            merged.setdefault(component, {})[ref.initializer] = table
        for component, tensors in merged.items():
            sessions.replace_weights(component, tensors)
        self._touched, self._active = set(merged), key
