"""A VAE of its own for a model (A1111's "SD VAE"): a standalone AutoencoderKL (sd-vae-ft-mse, say)
or AutoencoderTiny (TAESD: ~1 M parameters a half against the SD decoder's 49 M, so it decodes in a
fraction of the time at a small cost in detail), exported by `sdonnx export VAE_FOLDER OUT`.

    pipe = Pipeline.load("./sd15-onnx", vae="./taesd-onnx")      # CLI: --vae ./taesd-onnx

The folder holds vae_decoder/model.onnx (and vae_encoder/model.onnx for img2img) with the model's IO
names, and a manifest (`kind: vae`) with its latent channels, downsample factor, scaling and shift;
it must match the model's latent space (channels and factor), and decodes with its own scaling
(TAESD's is 1: it reads the U-Net's latents as they are).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime.manifest import (
    FORMAT_VERSION, MANIFEST_NAME, GraphSpec, Manifest, _graph, _Reader, checked_version, read_manifest_json,
    write_record,
)
from sdonnx.runtime.session import Session

KIND = "vae"
DECODER, ENCODER = "vae_decoder", "vae_encoder"


@dataclass(frozen=True)
class VaeManifest:
    """manifest.json of an exported VAE folder."""

    vae_class: str  # AutoencoderKL or AutoencoderTiny, as its config named it
    latent_channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float
    graphs: Mapping[str, GraphSpec]
    versions: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    kind: str = KIND
    format_version: int = FORMAT_VERSION

    def write(self, folder: Path) -> Path:
        return write_record(self, folder)

    @classmethod
    def read(cls, folder: Path) -> VaeManifest:
        path = Path(folder) / MANIFEST_NAME
        raw = read_manifest_json(path, "a VAE folder")
        if raw.get("kind") != KIND:
            raise InputError("vae", str(folder), f"a VAE folder from `sdonnx export VAE OUT` (its manifest's kind is "
                             f"{raw.get('kind')!r}, not {KIND!r})")
        r = _Reader(raw, str(path))
        version = checked_version(r)
        graphs = r.sub("graphs")
        specs = {name: _graph(graphs.sub(name)) for name in graphs.keys()}
        if DECODER not in specs:
            raise ModelError(f"{path}: graphs: no {DECODER}")
        return cls(
            vae_class=r.get("vae_class", str), latent_channels=r.get("latent_channels", int, positive=True),
            downsample=r.get("downsample", int, positive=True), scaling_factor=r.get("scaling_factor", float),
            shift_factor=r.get("shift_factor", float), graphs=specs, versions=r.get("versions", dict),
            files=r.get("files", dict), source=r.get("source", str), format_version=version,
        )


@dataclass(frozen=True)
class Vae:
    """An exported VAE ready for a model: its folder, manifest and session openers (encoder None
    when it has none), and the model's facts with this VAE's scaling (what decode/encode read)."""

    folder: Path
    manifest: VaeManifest
    facts: Manifest
    open: Callable[[str], Session]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def has_encoder(self) -> bool:
        return ENCODER in self.manifest.graphs


def load_vae(folder: Path | str, model: Manifest, open_graph: Callable[[Path, str], Session]) -> Vae:
    """The VAE folder checked against the model's latent space; InputError naming `vae` otherwise."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        raise InputError("vae", str(folder), "a VAE folder from `sdonnx export VAE OUT` (with manifest.json)")
    manifest = VaeManifest.read(folder)
    for fact, mine in (("latent_channels", model.latent_channels), ("downsample", model.vae_downsample)):
        if getattr(manifest, fact) != mine:
            raise InputError("vae", str(folder), f"a VAE of this model's latent space ({fact} {mine}; this one's is "
                             f"{getattr(manifest, fact)})")
    facts = replace(model, vae_scaling_factor=manifest.scaling_factor, vae_shift_factor=manifest.shift_factor)
    return Vae(folder, manifest, facts, lambda name: open_graph(folder / manifest.graphs[name].path, name))
