"""ControlNet: an exported ControlNet folder, the control images it takes, and the residuals it adds.

`sdonnx export CONTROLNET OUT` writes OUT/controlnet/model.onnx and a manifest whose `kind` is
"controlnet": the cross-attention width, conditioning channels and downsample factor, and the
residuals the graph outputs (name, channels, downsample), which every U-Net export takes as optional
inputs of the same names (export/graphs.py). A request names ControlNets with `Control`s; each is
checked against the model before any graph runs, and at every step the denoiser's model adapter
(denoiser.py `UNetModel`) runs the ones whose window covers the step, on the scaled sample the
U-Net gets, and sums their residuals into the U-Net's inputs (diffusers' MultiControlNetModel).

Control images are prepared as diffusers' StableDiffusionControlNetPipeline does (`prepare_image`):
RGB, resized to the generation size with Lanczos, scaled to [0, 1]; `resize="crop"` first crops
the centre to the generation's aspect ratio (A1111's "Crop and Resize"). Images whose aspect ratio
differs from the generation's by more than ASPECT_TOLERANCE are refused under the default
`resize="stretch"` rather than silently distorted. This runtime takes already-processed control
images (edges, depth, pose drawings); `sdonnx.runtime.preprocess` makes canny edges with OpenCV
when the `control` extra is installed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
from PIL import Image

from sdonnx.config import check_real
from sdonnx.errors import InputError, ModelError
from sdonnx.runtime.manifest import (
    FORMAT_VERSION, MANIFEST_NAME, GraphSpec, TensorSpec, _graph, _Reader, checked_version, read_manifest_json,
    write_record,
)
from sdonnx.runtime.session import Session

KIND = "controlnet"
COMPONENT = "controlnet"
GRAPH_FILE = f"{COMPONENT}/model.onnx"
RESIZE_MODES = ("stretch", "crop")
CONTROLNETS_DIR = "controlnets"  # a model folder's own ControlNets, found by name
ASPECT_TOLERANCE = 0.02  # relative: 512x512 for 512x504 passes, 512x768 for 512x512 does not
MAX_SCALE = 10.0  # A1111's slider stops at 2; far beyond, the residuals swamp the U-Net
# The graph's inputs besides the SDXL ones; the U-Net's are the same names.
INPUTS = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale")
POOLED_INPUTS = ("text_embeds", "time_ids")


@dataclass(frozen=True)
class Residual:
    """One output of the ControlNet, the U-Net input of the same name: channels, and how many times
    smaller than the latent it is."""

    name: str
    channels: int
    downsample: int


@dataclass(frozen=True)
class ControlNetManifest:
    """manifest.json of an exported ControlNet folder."""

    family: str
    cross_attention_dim: int
    in_channels: int
    conditioning_channels: int
    conditioning_downsample: int  # control image pixels per latent pixel
    residuals: tuple[Residual, ...]
    graphs: Mapping[str, GraphSpec]
    # SDXL ControlNets take the U-Net's pooled conditioning too: text_embeds [B, text_embeds_dim]
    # and time_ids [B, time_id_count]; None for SD 1.x/2.x.
    text_embeds_dim: int | None = None
    time_id_count: int | None = None
    global_pool_conditions: bool = False  # the residuals are spatial means (shuffle ControlNets)
    versions: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    kind: str = KIND
    format_version: int = FORMAT_VERSION

    def write(self, folder: Path) -> Path:
        return write_record(self, folder)

    @classmethod
    def read(cls, folder: Path) -> ControlNetManifest:
        path = Path(folder) / MANIFEST_NAME
        raw = read_manifest_json(path, "a ControlNet folder")
        r = _Reader(raw, str(path))
        if raw.get("kind") != KIND:
            raise ModelError(f"{path}: kind: got {raw.get('kind')!r}, expected {KIND!r} (a ControlNet folder from "
                             "`sdonnx export CONTROLNET OUT`)")
        version = checked_version(r)
        residuals = []
        for i, item in enumerate(r.get("residuals", list)):
            t = _Reader(item, f"{path}.residuals[{i}]")
            residuals.append(Residual(t.get("name", str), t.get("channels", int, positive=True),
                                      t.get("downsample", int, positive=True)))
        graphs = r.sub("graphs")
        if COMPONENT not in graphs.keys():
            raise ModelError(f"{path}: graphs.{COMPONENT}: missing")
        return cls(
            family=r.get("family", str),
            cross_attention_dim=r.get("cross_attention_dim", int, positive=True),
            in_channels=r.get("in_channels", int, positive=True),
            conditioning_channels=r.get("conditioning_channels", int, positive=True),
            conditioning_downsample=r.get("conditioning_downsample", int, positive=True),
            residuals=tuple(residuals),
            graphs={COMPONENT: _graph(graphs.sub(COMPONENT))},
            text_embeds_dim=r.get("text_embeds_dim", int, optional=True),
            time_id_count=r.get("time_id_count", int, optional=True),
            global_pool_conditions=r.get("global_pool_conditions", bool, optional=True) or False,
            versions=r.get("versions", dict),
            files=r.get("files", dict),
            source=r.get("source", str),
            format_version=version,
        )


@dataclass(frozen=True)
class Control:
    """One ControlNet for a request, as diffusers' and A1111's options name it.

    model: an exported ControlNet folder (`sdonnx export CONTROLNET OUT`), or a name in the
    pipeline's control_dir. image: the control image (a PIL image or an image file), already
    processed (edges, depth, pose). scale: diffusers' controlnet_conditioning_scale (A1111's
    "Control Weight"). start / end: the part of the plan it acts on, as fractions (diffusers'
    control_guidance_start/end, A1111's "Starting/Ending Control Step"). guess_mode: the ControlNet
    sees the conditional batch only, and its residuals grow from 0.1x to 1x from the first to the
    last (diffusers' guess_mode, A1111's "ControlNet is more important"). resize: "stretch" (diffusers:
    resize to the generation size) or "crop" (centre-crop to its aspect ratio first).
    """

    model: str | Path
    image: object
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    resize: str = "stretch"

    def __post_init__(self):
        if not isinstance(self.model, (str, Path)) or not str(self.model):
            raise InputError("control.model", self.model, "a ControlNet folder or its name")
        if self.image is None:
            raise InputError("control.image", None, "a control image (a PIL image or an image file)")
        check_real("control.scale", self.scale, -MAX_SCALE, MAX_SCALE)
        check_real("control.start", self.start, 0, 1)
        check_real("control.end", self.end, 0, 1)
        if not self.start < self.end:
            raise InputError("control.end", self.end, f"a fraction above control.start ({self.start})")
        if not isinstance(self.guess_mode, bool):
            raise InputError("control.guess_mode", self.guess_mode, "True or False")
        if self.resize not in RESIZE_MODES:
            raise InputError("control.resize", self.resize, f"one of {', '.join(RESIZE_MODES)}")

    def active(self, step: int, steps: int) -> bool:
        """Whether it acts on step `step` of `steps` (diffusers' controlnet_keep: the step lies in the window)."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def control_folder(model: str | Path, control_dir: Path | None, model_root: Path | None = None) -> Path:
    """The ControlNet folder `model` names: a path, or a folder name in control_dir, then in the model
    folder's `controlnets/` (where the embedded model keeps its own)."""
    path = Path(model).expanduser()
    if (path / MANIFEST_NAME).is_file():
        return path
    places = [p for p in (control_dir, None if model_root is None else Path(model_root) / CONTROLNETS_DIR) if p]
    for place in places:
        if (Path(place) / str(model) / MANIFEST_NAME).is_file():
            return Path(place) / str(model)
    known = sorted({p.name for place in places if Path(place).is_dir() for p in Path(place).iterdir()
                    if (p / MANIFEST_NAME).is_file()})
    where = f"; by name: {known}" if known else " (no control_dir given)" if control_dir is None else ""
    raise InputError("control.model", str(model), f"a ControlNet folder from `sdonnx export`{where}")


def check_matches(manifest: ControlNetManifest, folder: Path, cross_attention_dim: int, vae_downsample: int,
                  unet_optional: Mapping[str, tuple]) -> None:
    """InputError unless the ControlNet fits the model: its width, its image scale and the U-Net's
    residual inputs (name and channels), named by what differs."""
    if manifest.cross_attention_dim != cross_attention_dim:
        raise InputError("control.model", str(folder), f"a ControlNet for this model's family (cross-attention width "
                         f"{cross_attention_dim}; this one's is {manifest.cross_attention_dim}, {manifest.family})")
    if manifest.conditioning_downsample != vae_downsample:
        raise InputError("control.model", str(folder), f"a ControlNet whose control image is {vae_downsample}x the "
                         f"latent, as this model's VAE (it takes {manifest.conditioning_downsample}x)")
    if not unet_optional:
        raise InputError("control.model", str(folder), "a model whose U-Net takes ControlNet residuals: this one "
                         "was exported without them (by an older sdonnx, with --static-shape, or by another "
                         "exporter); export it again with `sdonnx export`")
    for residual in manifest.residuals:
        shape = unet_optional.get(residual.name)
        if shape is None or (isinstance(shape[1], int) and shape[1] != residual.channels):
            found = "none" if shape is None else f"{shape[1]} channels"
            raise InputError("control.model", str(folder), f"a ControlNet matching the U-Net: its {residual.name!r} "
                             f"has {residual.channels} channels, the U-Net's input of that name: {found}")


def control_image(image: object, height: int, width: int, resize: str = "stretch") -> np.ndarray:
    """A control image -> [1, 3, height, width] float32 in [0, 1], as diffusers' prepare_image."""
    from sdonnx.runtime.images import open_image

    picture = open_image(image, "control.image").convert("RGB")
    w, h = picture.size
    if resize == "crop":
        target = width / height
        if w / h > target:  # wider: keep the centre columns
            keep = round(h * target)
            picture = picture.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
        else:
            keep = round(w / target)
            picture = picture.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))
    elif abs(math.log((w / h) / (width / height))) > ASPECT_TOLERANCE:
        raise InputError("control.image", f"{w}x{h}", f"an image of the generation's aspect ratio ({width}x{height}, "
                         "or a multiple), or resize='crop' (--control-resize crop) to crop it")
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(picture, dtype=np.float32) / 255.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def guess_scales(count: int) -> np.ndarray:
    """Guess mode's factor for each of `count` residuals: 0.1 to 1 on a log scale (torch.logspace(-1, 0))."""
    return np.logspace(-1, 0, count).astype(np.float32)


@dataclass(frozen=True)
class ControlNetGraph:
    """A loaded ControlNet graph: `residuals(sample, t, inputs, image, scale)` -> its outputs, in order.

    run(**feeds) -> outputs by name: the session's run. timestep: the declared timestep input
    (dtype, rank). dtypes: each input's declared dtype. names: the residual outputs, in diffusers'
    order (down blocks, then the mid block).
    """

    run: Callable[..., Mapping[str, np.ndarray]]
    timestep: TensorSpec
    dtypes: Mapping[str, str]
    names: tuple[str, ...]

    @classmethod
    def for_session(cls, session: Session, manifest: ControlNetManifest) -> ControlNetGraph:
        return cls(session.run, session.input("timestep"), {s.name: s.dtype for s in session.inputs},
                   tuple(r.name for r in manifest.residuals))

    def residuals(self, sample: np.ndarray, t: float, inputs: Mapping[str, np.ndarray], image: np.ndarray,
                  scale: float) -> list[np.ndarray]:
        """sample [B, C, h, w] (scaled, as the U-Net sees it) at timestep t, the U-Net's conditioning
        inputs [B, ...] and the control image [B, 3, H, W] -> the residuals [B, C_i, h_i, w_i] float32."""
        from sdonnx.runtime.denoiser import timestep_input

        feeds = {name: inputs[name].astype(self.dtypes[name], copy=False)
                 for name in ("encoder_hidden_states", *POOLED_INPUTS) if name in self.dtypes}
        feeds |= {
            "sample": sample.astype(self.dtypes["sample"], copy=False),
            "timestep": timestep_input(self.timestep, t, len(sample)),
            "controlnet_cond": image.astype(self.dtypes["controlnet_cond"], copy=False),
            "conditioning_scale": np.asarray(scale, dtype=self.dtypes["conditioning_scale"]),
        }
        outputs = self.run(**feeds)
        return [np.asarray(outputs[name], dtype=np.float32) for name in self.names]


@dataclass(frozen=True)
class ControlHint:
    """One ControlNet acting on a batch of B images: its graph, the control image [B, 3, H, W], the
    rows [B] bool it acts on (guess mode leaves out the unconditional half, whose residuals are zero)
    and the request's Control (scale, window, guess mode). The arrays are made read-only once.
    """

    graph: ControlNetGraph
    image: np.ndarray
    rows: np.ndarray
    control: Control

    def __post_init__(self) -> None:
        if len(self.image) != len(self.rows):
            raise InputError("control", f"{len(self.image)} images for {len(self.rows)} rows", "one per row")
        self.image.flags.writeable = False
        self.rows.flags.writeable = False

    def after(self, first: ControlHint) -> ControlHint:
        """first || self on the batch axis."""
        return ControlHint(self.graph, np.concatenate([first.image, self.image]),
                           np.concatenate([first.rows, self.rows]), self.control)

    def part(self, start: int, stop: int) -> ControlHint:
        return ControlHint(self.graph, self.image[start:stop], self.rows[start:stop], self.control)

    def residuals(self, sample: np.ndarray, t: float, inputs: Mapping[str, np.ndarray], step: int, steps: int
                  ) -> list[np.ndarray] | None:
        """Its residuals for the U-Net run on `sample` [B, C, h, w] at step `step` of `steps`; None
        when the step lies outside its window or it acts on no row (the U-Net's defaults are zeros)."""
        if not self.control.active(step, steps) or not self.rows.any():
            return None
        every = bool(self.rows.all())
        rows = slice(None) if every else self.rows
        found = self.graph.residuals(sample[rows], t, {k: v[rows] for k, v in inputs.items()}, self.image[rows],
                                     self.control.scale)
        if self.control.guess_mode:
            found = [r * s for r, s in zip(found, guess_scales(len(found)))]
        if every:
            return found
        full = []
        for r in found:
            padded = np.zeros((len(self.rows), *r.shape[1:]), np.float32)
            padded[self.rows] = r
            full.append(padded)
        return full


def control_residuals(hints: tuple[ControlHint, ...], sample: np.ndarray, t: float, inputs: Mapping[str, np.ndarray],
                      step: int, steps: int) -> dict[str, np.ndarray]:
    """The U-Net's residual inputs: the sum over `hints` acting at this step, by name ({}: none acts)."""
    total: dict[str, np.ndarray] = {}
    for hint in hints:
        found = hint.residuals(sample, t, inputs, step, steps)
        if found is None:
            continue
        for name, residual in zip(hint.graph.names, found):
            total[name] = residual if name not in total else total[name] + residual
    return total


@dataclass(frozen=True)
class ControlRequest:
    """A request's Control checked against the model: its folder, manifest and prepared image
    [1, 3, H, W] float32 in [0, 1]."""

    control: Control
    folder: Path
    manifest: ControlNetManifest
    image: np.ndarray


class ControlNets:
    """The ControlNet graphs a pipeline has opened, by folder. `use(requests)` lends them for one
    denoising loop; under a memory policy that releases sessions they close when it ends, with the U-Net.

    open(path) -> Session: how the pipeline opens a graph (its providers and options). verify: check
    each folder's files against the sha256s its manifest recorded before opening (integrity.py).
    """

    def __init__(self, opener: Callable[[Path], Session] | None, policy, *, verify: bool = True):
        self._open = opener
        self.verify = verify
        self._opened: dict[Path, Session] = {}
        self._manifests: dict[Path, ControlNetManifest] = {}
        self.policy = policy

    def manifest(self, folder: Path) -> ControlNetManifest:
        key = Path(folder).resolve()
        if key not in self._manifests:
            self._manifests[key] = ControlNetManifest.read(key)
        return self._manifests[key]

    @contextmanager
    def use(self, requests: tuple[ControlRequest, ...]) -> Iterator[list[ControlNetGraph]]:
        """The graph of each request, in order."""
        try:
            yield [ControlNetGraph.for_session(self._session(r.folder, r.manifest), r.manifest) for r in requests]
        finally:
            if self.policy.release_sessions:
                self.release()

    def _session(self, folder: Path, manifest: ControlNetManifest) -> Session:
        from sdonnx.runtime.integrity import verify_folder

        key = Path(folder).resolve()
        if key not in self._opened:
            verify_folder(key, manifest, verify=self.verify)
            session = self._open(key / manifest.graphs[COMPONENT].path)
            declared = {s.name for s in session.inputs}
            expected = set(INPUTS) | (set(POOLED_INPUTS) if manifest.text_embeds_dim else set())
            outputs = set(session.output_names)
            if declared != expected or not {r.name for r in manifest.residuals} <= outputs:
                raise ModelError(f"{key}: the ControlNet graph takes {sorted(declared)} and gives {sorted(outputs)}, "
                                 f"expected inputs {sorted(expected)} and the manifest's residuals")
            self._opened[key] = session
        return self._opened[key]

    def release(self) -> None:
        from sdonnx.runtime.memory import return_freed_memory

        for session in self._opened.values():
            session.close()
        if self._opened:
            return_freed_memory()
        self._opened.clear()


def check_controls(controls: tuple[Control, ...], nets: ControlNets, control_dir: Path | None, manifest,
                   height: int, width: int, model_root: Path | None = None) -> tuple[ControlRequest, ...]:
    """Each Control resolved and checked against the model `manifest` (a Manifest) and the
    generation size, its image prepared; before any graph opens."""
    unet = manifest.graphs.get("unet")
    optional = {spec.name: spec.shape for spec in (unet.optional if unet is not None else ())}
    found = []
    for control in controls:
        folder = control_folder(control.model, control_dir, model_root)
        net = nets.manifest(folder)
        check_matches(net, folder, manifest.cross_attention_dim, manifest.vae_downsample, optional)
        # Two values per size or crop, one for an aesthetic score.
        time_ids = sum(1 if f == "aesthetic_score" else 2 for f in manifest.time_ids) if manifest.time_ids else None
        if net.time_id_count != time_ids:
            raise InputError("control.model", str(folder), f"a ControlNet for this model's family ({manifest.family}; "
                             f"this one is for {net.family})")
        found.append(ControlRequest(control, folder, net, control_image(control.image, height, width, control.resize)))
    return tuple(found)
