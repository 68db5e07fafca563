"""The models a server may run, by name, and the one it has loaded.

`-m PATH` is a model folder (served alone, named after its folder) or a folder of model folders
(each listed by /sdapi/v1/sd-models); no `-m`: the embedded model, named "embedded". Requests name
models by those names (or A1111's "name [hash]" titles) only, never by path.

Facts (`read_facts`) are read without loading graphs, for checking requests on the HTTP threads;
`pipeline(name)` loads a model and keeps one loaded at a time, and only the worker thread calls it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from sdonnx.errors import InputError, SdonnxError
from sdonnx.models import EMBEDDED_MODEL
from sdonnx.runtime import lora
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.metadata import recorded_hash
from sdonnx.runtime.model import MANIFEST_NAME, read_facts
from sdonnx.runtime.controlnet import CONTROLNETS_DIR
from sdonnx.runtime.lora import Adapters
from sdonnx.runtime.pipeline import GenerationConfig, Pipeline, check_before_load
from sdonnx.runtime.request import Request, folder_tokenizers
from sdonnx.runtime.vae import KIND as VAE_KIND
from sdonnx.runtime.vae import load_vae
from sdonnx.runtime.providers import RuntimeOptions

MODEL_MARKERS = (MANIFEST_NAME, "model_index.json")  # sdonnx's and optimum's exports


class Catalog:
    """Model names -> folders; the loaded Pipeline (one at a time); the LoRA and ControlNet folders."""

    def __init__(self, path: Path | str | None, options: RuntimeOptions, *, lora_dir: Path | None = None,
                 control_dir: Path | None = None, embeddings_dir: Path | None = None, vae_dir: Path | None = None):
        self.options, self.lora_dir = options, lora_dir
        self.control_dir, self.embeddings_dir, self.vae_dir = control_dir, embeddings_dir, vae_dir
        self.path = path
        self.folders = _model_folders(path)
        self._facts: dict[str, tuple[Path, Manifest]] = {}
        self._lock, self._facts_lock = threading.Lock(), threading.Lock()
        self._loaded: tuple[tuple[str, str | None], Pipeline] | None = None  # ((model, vae), pipeline)
        self._checkers: dict[str, tuple] = {}  # name -> (tokenizers, Adapters) for checking requests
        for name in self.folders:  # a folder that is no model fails at start, not at its first request
            self.facts(name)

    def refresh(self) -> None:
        """Look for model folders again (A1111's refresh-checkpoints); the loaded model stays loaded."""
        folders = _model_folders(self.path)
        facts = {name: read_facts(folder) for name, folder in folders.items()}  # all read before any is listed
        with self._facts_lock:
            self.folders, self._facts = folders, facts

    @property
    def default(self) -> str:
        return next(iter(self.folders))

    def name_of(self, given: object, field: str) -> str:
        """A listed model's name from its name or its title ("name [hash]"); InputError otherwise."""
        for name in self.folders:
            if given in (name, self.title(name)):
                return name
        raise InputError(field, given, f"one of the served models {sorted(self.folders)} (GET /sdapi/v1/sd-models)")

    def facts(self, name: str) -> tuple[Path, Manifest]:
        with self._facts_lock:
            if name not in self._facts:
                self._facts[name] = read_facts(self.folders[name])
            return self._facts[name]

    def title(self, name: str) -> str:
        """A1111's checkpoint title, "name [hash]", the hash being the PNG parameters' Model hash."""
        digest = recorded_hash(self.facts(name)[1])
        return f"{name} [{digest}]" if digest else name

    def loras(self, name: str) -> dict[str, Path]:
        """LoRA name -> file: the LoRA folder's, then the model's own (as prompts resolve them)."""
        root = self.facts(name)[0]
        return {**lora.available(root / lora.MODEL_LORAS), **lora.available(self.lora_dir)}

    def check(self, name: str, config: GenerationConfig, image=None, mask=None) -> Request:
        """`config` checked against model `name` before it queues (`check_before_load`), with the
        model's tokenizers and LoRA maps read once, not per request."""
        root, facts = self.facts(name)
        with self._lock:
            if name not in self._checkers:
                self._checkers[name] = (folder_tokenizers(root, facts), Adapters(root, facts))
            tokenizers, adapters = self._checkers[name]
            return check_before_load(root, facts, self.options.memory, config, image, mask, lora_dir=self.lora_dir,
                                     control_dir=self.control_dir, tokenizers=tokenizers, adapters=adapters)

    def controlnets(self, name: str) -> dict[str, Path]:
        """ControlNet name -> folder for model `name`: the ControlNet folder's, then the model's own
        `controlnets/` (as Control(model=NAME) resolves them); requests name them, never give paths."""
        root = self.facts(name)[0]
        found: dict[str, Path] = {}
        for place in (root / CONTROLNETS_DIR, self.control_dir):
            if place is not None and Path(place).is_dir():
                found |= {p.name: p for p in sorted(Path(place).iterdir()) if (p / MANIFEST_NAME).is_file()}
        return found

    def vaes(self) -> dict[str, Path]:
        """VAE name -> exported VAE folder (runtime/vae.py) in the VAE folder, for A1111's sd_vae."""
        if self.vae_dir is None or not Path(self.vae_dir).is_dir():
            return {}
        return {p.name: p for p in sorted(Path(self.vae_dir).iterdir())
                if (p / MANIFEST_NAME).is_file() and _kind(p) == VAE_KIND}

    def vae_of(self, given: object, model: str, field: str) -> str | None:
        """A1111's sd_vae value as a listed VAE's name (None: the model's own), checked against the model."""
        if given in (None, "Automatic", "None", ""):
            return None
        found = self.vaes()
        if given not in found:
            raise InputError(field, given, f'"Automatic", or one of the served VAEs {sorted(found)} '
                             "(GET /sdapi/v1/sd-vae)")
        try:
            load_vae(found[given], self.facts(model)[1], lambda graph, name: None)  # its latent space fits the model
        except InputError as e:
            raise InputError(field, given, e.expected) from None
        return str(given)

    def pipeline(self, name: str, vae: str | None = None) -> Pipeline:
        """The loaded pipeline of model `name` (with VAE `vae`), loading it (and releasing the other) if needed."""
        if self._loaded is None or self._loaded[0] != (name, vae):
            self._loaded = None  # release the old model's sessions before loading the next
            pipe = Pipeline.load(self.folders[name], self.options, progress=False, lora_dir=self.lora_dir,
                                 embeddings_dir=self.embeddings_dir, control_dir=self.control_dir,
                                 vae=None if vae is None else self.vaes()[vae])
            self._loaded = ((name, vae), pipe)
        return self._loaded[1]


def _kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _model_folders(path: Path | str | None) -> dict[str, Path]:
    if path is None:
        return {"embedded": EMBEDDED_MODEL}
    root = Path(path)
    if not root.is_dir():
        raise InputError("model", str(path), "a model folder, or a folder of model folders")
    if any((root / marker).is_file() for marker in MODEL_MARKERS):
        return {root.name: root}
    folders = {p.name: p for p in sorted(root.iterdir())
               if p.is_dir() and any((p / m).is_file() for m in MODEL_MARKERS)}
    if not folders:
        raise SdonnxError(f"{root}: neither a model folder nor a folder of model folders (none holds "
                          f"{' or '.join(MODEL_MARKERS)})")
    return folders
