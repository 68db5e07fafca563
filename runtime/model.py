"""Model folders: load the graphs of an ONNX Stable Diffusion folder and the facts to run them.

Two layouts are read. A folder written by `sdonnx export` has manifest.json, and every graph's IO
is checked against it. A folder written by optimum (or diffusers' conversion script) has none, so
the same facts are derived from its configs (model_index.json, unet/config.json,
vae_decoder/config.json, scheduler/scheduler_config.json, the tokenizer's config) and each graph's
IO from the loaded sessions themselves; what differs between exporters (the timestep's dtype and
rank, int32 or int64 input_ids, fp16 inputs) is then read from those sessions, never guessed.
Either way, the graphs must agree with the facts (channels, embedding width, sequence length).

The pipeline takes each graph for one step with `Sessions.use(component)`; the memory policy
(`memory.MemoryPolicy.release_sessions`, set by low-memory mode) says whether the graph then stays
open for the next call or is opened on first use and closed when its step ends.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime import graph_cache
from sdonnx.runtime.integrity import verify_folder
from sdonnx.runtime.manifest import (
    MANIFEST_NAME, TEXT_ENCODERS, TOKENIZERS, GraphSpec, Manifest, TrainingSchedule, family_for, text_encoders,
)
from sdonnx.runtime.memory import MemoryPolicy, return_freed_memory
from sdonnx.runtime.providers import RuntimeOptions, session_providers
from sdonnx.runtime.session import Session

GRAPH_FILE = "model.onnx"
REQUIRED = ("unet", "vae_decoder")  # and the model's text encoders (one or two)
TOKENIZER_DIR = "tokenizer"
POOLED_INPUTS = ("text_embeds", "time_ids")  # what a U-Net with pooled conditioning (SDXL) takes besides

# The inputs this runtime feeds each graph, and the output it reads (any one of the alternatives).
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text_encoder": (("input_ids",), ("last_hidden_state",)),
    "text_encoder_2": (("input_ids",), ("last_hidden_state",)),
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    # Feature caching's shallow U-Net (denoiser.py): the U-Net's inputs (the text only where its last layer
    # attends to it) and the deep_feature of a full step.
    "unet_shallow": (("sample", "timestep", "deep_feature"), ("out_sample",)),
    "vae_encoder": (("sample",), ("latent_parameters", "latent_sample")),
    "vae_decoder": (("latent_sample",), ("sample",)),
}
UPSCALER_INPUT = "class_labels"  # the x4 upscaler's noise level
LAZY = ("unet_shallow",)  # opened on first use only: most requests never run it
# transformers writes a huge sentinel (int(1e30)) when a tokenizer declares no length limit.
_NO_LIMIT = 1_000_000
_DEFAULT_MAX_LENGTH = 77


class Sessions(Mapping[str, Session]):
    """The folder's sessions by component, each opened (and checked) by `opener` on first use.

    `use(component)` lends one for a step of the pipeline; with `policy.release_sessions` it is
    closed when the step ends, so its memory goes back, and the next use opens it again.
    """

    def __init__(self, components: Sequence[str], opener: Callable[..., Session], policy: MemoryPolicy,
                 lazy: Sequence[str] = ()):
        self._components = tuple(components)
        self._lazy = tuple(lazy)  # opened on first use, not by preload
        self._open = opener  # opener(component, initializers) -> Session
        self._opened: dict[str, Session] = {}
        self._weights: dict[str, Mapping[str, np.ndarray]] = {}
        self.policy = policy

    def __getitem__(self, component: str) -> Session:
        if component not in self._components:
            raise KeyError(component)
        if component not in self._opened:
            self._opened[component] = self._open(component, self._weights.get(component))
        return self._opened[component]

    def replace_weights(self, component: str, initializers: Mapping[str, np.ndarray]) -> None:
        """Open `component` with `initializers` in place of the graph's tensors of those names from
        now on ({}: as on disk); its open session is closed first, its memory returned."""
        self.release(component)
        if initializers:
            self._weights[component] = initializers
        else:
            self._weights.pop(component, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)

    @property
    def opened(self) -> tuple[str, ...]:
        """The components whose session is in memory now."""
        return tuple(self._opened)

    @contextmanager
    def use(self, component: str) -> Iterator[Session]:
        """The session of `component` for one step; closed afterwards if the policy says so."""
        try:
            yield self[component]
        finally:
            if self.policy.release_sessions:
                self.release(component)

    def preload(self) -> None:
        """Open (and so check) every graph now unless the policy opens them on use: errors surface
        at load, not mid-run."""
        for component in self._components:
            if component in self._lazy:
                continue
            if self.policy.release_sessions:
                self.release(component)
            else:
                self[component]

    def release(self, component: str) -> None:
        """Close `component`'s session, if open, and return its memory to the OS."""
        session = self._opened.pop(component, None)
        if session is not None:
            session.close()
            return_freed_memory()


@dataclass(frozen=True)
class ModelFolder:
    """A loaded model folder: its manifest (read or derived) and one Session per loaded graph."""

    root: Path
    manifest: Manifest
    sessions: Sessions
    derived: bool  # True when the facts come from optimum-style configs, not manifest.json
    options: RuntimeOptions = RuntimeOptions()

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def tokenizer_dir_of(self, text_encoder: str) -> Path:
        """The tokenizer folder feeding `text_encoder` (tokenizer/ or tokenizer_2/)."""
        return self.root / TOKENIZERS[text_encoder]

    def output_name(self, component: str) -> str:
        """The output this runtime reads from `component` (vae_encoder's name differs by exporter)."""
        names = self.sessions[component].output_names
        return next(n for n in GRAPH_IO[component][1] if n in names)

    @classmethod
    def load(
        cls,
        path: Path | str,
        options: RuntimeOptions = RuntimeOptions(),
        *,
        components: Sequence[str] | None = None,
        optional: Sequence[str] = (),
    ) -> ModelFolder:
        """Load `components` (each must exist; None: the model's text encoders, U-Net and VAE
        decoder) and the `optional` ones whose graph exists.

        Graphs open now, unless the memory policy opens them on use: then those of a manifest
        folder are not opened here, and those of a folder without one open once, as their IO is
        part of the facts, and are closed again.
        """
        root = _model_root(path)
        providers = session_providers(options)
        manifest_file = root / MANIFEST_NAME
        derived = not manifest_file.is_file()
        if derived:
            paths = {c: f"{c}/{GRAPH_FILE}" for c in GRAPH_IO}
            components = components or _required(root, paths)
            _require_graphs(root, paths, components)
            facts = _derive_facts(root)
        else:
            declared = Manifest.read(root)
            paths = {c: spec.path for c, spec in declared.graphs.items()}
            components = components or (*text_encoders(declared), *REQUIRED)
            for c in components:
                if c not in paths:
                    raise ModelError(f"{manifest_file}: graphs.{c}: missing (the {c!r} graph is required)")
            _require_graphs(root, paths, components)
        wanted = list(components) + [c for c in optional if c in paths and (root / paths[c]).is_file()]
        manifest = None if derived else declared
        verify_folder(root, manifest, verify=options.verify_integrity, components=wanted)

        def open_session(component: str, initializers: Mapping[str, np.ndarray] | None = None) -> Session:
            """Open and check one graph. A derived folder's first opens come before its manifest
            exists (their IO is part of it); those are checked below, once it does."""
            session = graph_cache.open_session(root / paths[component], providers, options, name=component,
                                               initializers=initializers)
            if not derived:
                _check_against_spec(session, manifest.graphs[component])
            if manifest is not None:
                _check_io(session, manifest)
            return session

        sessions = Sessions(wanted, open_session, options.memory, lazy=LAZY)
        if derived:
            graphs = {}
            for c in wanted:
                s = sessions[c]
                graphs[c] = GraphSpec(paths[c], s.inputs, s.outputs, precision=_precision(s), optional=s.optional)
            manifest = Manifest(**facts, graphs=graphs)
            for c in wanted:
                _check_io(sessions[c], manifest)
        sessions.preload()
        return cls(root=root, manifest=manifest, sessions=sessions, derived=derived, options=options)


def read_facts(path: Path | str) -> tuple[Path, Manifest]:
    """The folder and its facts without opening a graph (seconds faster than load for SD 1.5), for
    checks before loading. A folder without manifest.json gets derived facts whose graphs list
    their paths but not their IO, which only the loaded sessions tell."""
    root = _model_root(path)
    if (root / MANIFEST_NAME).is_file():
        return root, Manifest.read(root)
    paths = {c: f"{c}/{GRAPH_FILE}" for c in GRAPH_IO}
    _require_graphs(root, paths, _required(root, paths))
    graphs = {c: GraphSpec(p, (), ()) for c, p in paths.items() if (root / p).is_file()}
    return root, Manifest(**_derive_facts(root), graphs=graphs)


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """A JSON object from `path`; {} if it is absent and not required. ModelError otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ModelError(f"{path}: missing") from None
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: got {type(data).__name__}, expected a JSON object")
    return data


def _model_root(path: Path | str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise InputError("model", str(path), "an existing model folder")
    if not any(root.iterdir()):
        raise ModelError(
            f"{root}: empty folder (expected manifest.json from `sdonnx export`, or an optimum export "
            "with model_index.json and text_encoder/, unet/, vae_decoder/)"
        )
    return root


def _required(root: Path, paths: Mapping[str, str]) -> tuple[str, ...]:
    """A folder without a manifest: its text encoders (those it has; text_encoder when none) and REQUIRED."""
    encoders = tuple(c for c in TEXT_ENCODERS if (root / paths[c]).is_file()) or ("text_encoder",)
    return (*encoders, *REQUIRED)


def _require_graphs(root: Path, paths: Mapping[str, str], components: Sequence[str]) -> None:
    """Name every missing graph file before loading any (a U-Net can take a minute to load)."""
    missing = [c for c in components if not (root / paths[c]).is_file()]
    if missing:
        no_graphs = not any((root / p).is_file() for p in paths.values())
        hint = "; a diffusers PyTorch folder needs `sdonnx export` first" if no_graphs else ""
        raise ModelError(f"{root}: missing ONNX graph(s) {', '.join(paths[c] for c in missing)}{hint}")


def _derive_facts(root: Path) -> dict[str, Any]:
    """Everything a Manifest holds except the graphs, from an optimum/diffusers-script folder."""
    unet = read_json(root / "unet" / "config.json")
    vae = read_json(root / "vae_decoder" / "config.json")
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    index = read_json(root / "model_index.json", required=False)
    first_encoder = next((c for c in TEXT_ENCODERS if (root / c / "config.json").is_file()), "text_encoder")
    text_encoder = read_json(root / first_encoder / "config.json", required=False)
    unet_path, vae_path = root / "unet" / "config.json", root / "vae_decoder" / "config.json"
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise ModelError(f"{vae_path}: block_out_channels: got {blocks!r}, expected a non-empty list")
    cross_attention_dim = _number(unet, "cross_attention_dim", unet_path)
    prediction_type = scheduler.get("prediction_type", "epsilon")
    try:
        schedule = TrainingSchedule.from_scheduler_config(scheduler)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{root / 'scheduler/scheduler_config.json'}: {e}") from None
    # diffusers' UNet2DConditionModel takes text_embeds and time_ids when addition_embed_type is text_time.
    pooled = unet.get("addition_embed_type") == "text_time"
    aesthetics = bool(index.get("requires_aesthetics_score", False))
    time_ids = ("original_size", "crops_coords_top_left", "aesthetic_score" if aesthetics else "target_size")
    return dict(
        family=family_for(cross_attention_dim),
        prediction_type=prediction_type,
        latent_channels=_number(vae, "latent_channels", vae_path),
        vae_scaling_factor=_number(vae, "scaling_factor", vae_path, float, default=0.18215),
        vae_shift_factor=_number(vae, "shift_factor", vae_path, float, default=0.0),
        vae_downsample=2 ** (len(blocks) - 1),
        unet_in_channels=_number(unet, "in_channels", unet_path),
        cross_attention_dim=cross_attention_dim,
        sample_size=_number(unet, "sample_size", unet_path),
        tokenizer_max_length=_max_length(root / TOKENIZERS[first_encoder], text_encoder),
        schedule=schedule,
        versions={},
        source=f"derived from the configs of {root}",
        pooled_text_encoder="text_encoder_2" if pooled else None,
        text_hidden_states="penultimate" if pooled else "final",
        time_ids=time_ids if pooled else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        # diffusers honours force_upcast in its SDXL pipelines only (its VAE class defaults it to true).
        vae_force_upcast=bool(vae.get("force_upcast", False)) if pooled else False,
    )


def _number(config: Mapping[str, Any], key: str, path: Path, kind: type = int, *, default: Any = None) -> Any:
    """config[key] as `kind`; `default` when absent or null (diffusers writes null for "unset")."""
    value = config.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ModelError(f"{path}: {key}: got {value!r}, expected {kind.__name__}")
    return kind(value)


def _max_length(tokenizer_dir: Path, text_encoder: Mapping[str, Any]) -> int:
    declared = read_json(tokenizer_dir / "tokenizer_config.json", required=False).get("model_max_length")
    if isinstance(declared, (int, float)) and not isinstance(declared, bool) and 0 < declared < _NO_LIMIT:
        return int(declared)
    positions = text_encoder.get("max_position_embeddings")
    return int(positions) if isinstance(positions, int) and positions > 0 else _DEFAULT_MAX_LENGTH


def _precision(session: Session) -> str:
    """fp16 when any tensor crosses the graph boundary in float16 (a fp16 export keeps fp32 timesteps)."""
    return "fp16" if any(s.dtype == "float16" for s in (*session.inputs, *session.outputs)) else "fp32"


def _check_against_spec(session: Session, spec: GraphSpec) -> None:
    """The graph's IO must be what the manifest recorded: names, dtypes, ranks and fixed dims."""
    pairs = (("input", session.inputs, spec.inputs), ("output", session.outputs, spec.outputs),
             ("optional input", session.optional, spec.optional))
    for kind, found, expected in pairs:
        found_by_name = {t.name: t for t in found}
        if set(found_by_name) != {t.name for t in expected}:
            raise ModelError(
                f"{session.path}: {kind}s of {session.name!r}: manifest says {[t.name for t in expected]}, "
                f"graph has {[t.name for t in found]}"
            )
        for want in expected:
            got = found_by_name[want.name]
            if got.dtype != want.dtype or not _same_dims(got.shape, want.shape):
                raise ModelError(
                    f"{session.path}: {kind} {want.name!r} of {session.name!r}: manifest says "
                    f"{want.dtype} {list(want.shape)}, graph has {got.dtype} {list(got.shape)}"
                )


def _check_io(session: Session, manifest: Manifest) -> None:
    """The graph must take exactly the inputs this runtime feeds and agree with the manifest's facts."""
    inputs, outputs = GRAPH_IO[session.name]
    unet = session.name in ("unet", "unet_shallow")
    if unet and manifest.pooled_text_encoder is not None:
        inputs = (*inputs, *POOLED_INPUTS)
    if unet and manifest.upscaler is not None:
        inputs = (*inputs, UPSCALER_INPUT)
    names = [t.name for t in session.inputs]
    if session.name == "unet_shallow" and "encoder_hidden_states" in names:
        inputs = (*inputs, "encoder_hidden_states")
    if sorted(names) != sorted(inputs):
        raise ModelError(f"{session.path}: inputs of {session.name!r}: expected {list(inputs)}, graph has {names}")
    if not any(o in session.output_names for o in outputs):
        raise ModelError(
            f"{session.path}: outputs of {session.name!r}: expected one of {list(outputs)}, "
            f"graph has {session.output_names}"
        )
    for tensor, axis, fact, value in _expected_dims(session.name, manifest):
        spec = session.input(tensor) if tensor in names else session.output(tensor)
        if not -len(spec.shape) <= axis < len(spec.shape):
            raise ModelError(
                f"{session.path}: {tensor!r} of {session.name!r} has shape {list(spec.shape)}, "
                f"expected a dim {axis} holding the model's {fact}"
            )
        dim = spec.shape[axis]
        if isinstance(dim, int) and dim != value:
            raise ModelError(
                f"{session.path}: {tensor!r} of {session.name!r}: dim {axis} is {dim}, "
                f"but the model's {fact} is {value}"
            )


def _expected_dims(component: str, m: Manifest) -> list[tuple[str, int, str, int]]:
    """(tensor, axis, fact name, value) that a graph's fixed dims must equal."""
    return {
        # Two text encoders' widths add up to cross_attention_dim; one's alone must equal it.
        "text_encoder": [
            ("input_ids", 1, "tokenizer_max_length", m.tokenizer_max_length),
            *([("last_hidden_state", -1, "cross_attention_dim", m.cross_attention_dim)]
              if len(text_encoders(m)) == 1 else []),
        ],
        "text_encoder_2": [("input_ids", 1, "tokenizer_max_length", m.tokenizer_max_length)],
        "unet": [
            ("sample", 1, "unet_in_channels", m.unet_in_channels),
            ("encoder_hidden_states", -1, "cross_attention_dim", m.cross_attention_dim),
        ],
        "unet_shallow": [("sample", 1, "unet_in_channels", m.unet_in_channels)],
        "vae_decoder": [("latent_sample", 1, "latent_channels", m.latent_channels)],
        "vae_encoder": [],
    }[component]


def _same_dims(found: tuple[int | str, ...], declared: tuple[int | str, ...]) -> bool:
    """Same rank, and equal wherever both fix a size (dim names differ between exporters)."""
    return len(found) == len(declared) and all(
        not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(found, declared)
    )
