"""The manifest: every fact the runtime needs about a model folder, without torch.

`sdonnx export` writes `manifest.json` beside the optimum-layout folders. The runtime reads
latent channels, the VAE scaling factor, the prediction type, the training noise schedule and
each graph's IO from here, never from version strings. Parsing validates every field and raises
`ModelError` naming the field, what it holds and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdonnx.errors import ModelError
from sdonnx.runtime.previews import LatentRGB
from sdonnx.runtime.weights import WeightRef, read_map

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "unet_shallow", "vae_encoder", "vae_decoder")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # in the order their hidden states are concatenated
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # the folder feeding each
TEXT_HIDDEN_STATES = ("final", "penultimate")
TIME_ID_FIELDS = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DTYPES = ("float32", "float16", "int64", "int32", "bool")  # bool: the safety checker's flags
# Informational label only: the runtime reads facts, never the family.
_FAMILY_BY_CROSS_ATTENTION = {768: "sd1", 1024: "sd2"}


def text_encoders(manifest: Manifest) -> tuple[str, ...]:
    """The model's text encoder components, in the order their widths are concatenated."""
    return tuple(c for c in TEXT_ENCODERS if c in manifest.graphs)


def family_for(cross_attention_dim: int) -> str:
    """"sd1" (CLIP ViT-L, 768), "sd2" (OpenCLIP ViT-H, 1024) or "custom"."""
    return _FAMILY_BY_CROSS_ATTENTION.get(int(cross_attention_dim), "custom")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: numpy dtype name and shape (int = fixed dim, str = symbolic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the folder, with the parity measured against PyTorch at export."""

    path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    check: Mapping[str, float] | None = None
    # module path -> where its weight is (runtime/weights.py), for LoRAs; None: not recorded (older
    # exports, optimum folders), derived from the graph when needed.
    weights: Mapping[str, WeightRef] | None = None
    # Inputs with a default in the graph, fed only when wanted (the U-Net's ControlNet residuals,
    # zeros [1, C, 1, 1] by default); () for graphs exported before they existed.
    optional: tuple[TensorSpec, ...] = ()

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in (*self.inputs, *self.optional) if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class TrainingSchedule:
    """The discrete noise schedule the U-Net was trained with (diffusers' scheduler config)."""

    num_train_timesteps: int
    alphas_cumprod: tuple[float, ...]
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    beta_schedule: str = "scaled_linear"
    # DDIM/PNDM's last step: to alpha 1 (True) or to alphas_cumprod[0]. diffusers' default, for configs
    # that do not say, is True; every SD 1.x/2.x/SDXL config says False, as manifests from before
    # this field was recorded assume.
    set_alpha_to_one: bool = False

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> TrainingSchedule:
        """Rebuild alphas_cumprod in NumPy exactly as diffusers' schedulers do (float32 betas)."""
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], dtype=np.float32)
        elif kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float32)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            def alpha_bar(t: float) -> float:
                return float(np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2)
            betas = np.array(
                [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                dtype=np.float32,
            )
        else:
            raise ModelError(
                f"scheduler_config.beta_schedule: got {kind!r}, expected one of "
                "'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas"
            )
        alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
        if config.get("rescale_betas_zero_snr", False):
            alphas_cumprod = _rescale_zero_terminal_snr(alphas_cumprod)
        return cls(
            num_train_timesteps=n,
            alphas_cumprod=tuple(float(a) for a in alphas_cumprod),
            timestep_spacing=str(config.get("timestep_spacing", "leading")),
            steps_offset=int(config.get("steps_offset", 0)),
            beta_schedule=str(kind),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        )


@dataclass(frozen=True)
class Upscaler:
    """SD's x4 upscaler (diffusers' StableDiffusionUpscalePipeline): its U-Net takes the latents ||
    the low-res image (image_channels, in [-1, 1]) noised to a noise level by noise_schedule (the
    low_res_scheduler's DDPM schedule), and that level as its class_labels input; levels above
    max_noise_level were never trained. The latents have the low-res image's size; the VAE makes
    it vae_downsample times larger."""

    noise_schedule: TrainingSchedule
    max_noise_level: int
    image_channels: int = 3


def _time_ids(raw: list | None, where: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not raw or any(name not in TIME_ID_FIELDS for name in raw):
        raise ModelError(f"{where}: time_ids: got {raw!r}, expected names from {list(TIME_ID_FIELDS)}")
    return tuple(raw)


def _recommended(raw: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The manifest's recommended settings, each checked: positive int steps, number guidance."""
    def check(settings: Any, path: str) -> None:
        if not isinstance(settings, dict):
            raise ModelError(f"{where}: {path}: got {settings!r}, expected an object")
        steps, guidance = settings.get("steps", 1), settings.get("guidance", 1.0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ModelError(f"{where}: {path}.steps: got {steps!r}, expected a positive integer")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
            raise ModelError(f"{where}: {path}.guidance: got {guidance!r}, expected a number >= 0")

    check(raw, "recommended")
    for name, settings in raw.get("samplers", {}).items():
        check(settings, f"recommended.samplers.{name}")
    return raw


def _rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, as diffusers' rescale_zero_terminal_snr, expressed on alphas_cumprod."""
    sqrt_ac = np.sqrt(alphas_cumprod.astype(np.float32))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    return (sqrt_ac**2).astype(np.float32)


@dataclass(frozen=True)
class Manifest:
    """What `sdonnx export` knows about a folder; written as manifest.json."""

    family: str
    prediction_type: str
    latent_channels: int
    vae_scaling_factor: float
    vae_shift_factor: float
    vae_downsample: int
    unet_in_channels: int
    cross_attention_dim: int
    sample_size: int
    tokenizer_max_length: int
    schedule: TrainingSchedule
    graphs: Mapping[str, GraphSpec]
    versions: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    quantization: Mapping[str, Any] | None = None  # `sdonnx quantize`: recipe and calibration; None for fp32 exports
    # How the U-Net's attention was exported (`sdonnx export --attention`): fused, sliced or full; None
    # when unknown (optimum folders, older exports), which memory estimates take as full.
    unet_attention: str | None = None
    # The same for the VAE's attention: "fused" is one blocked MultiHeadAttention op; the others, and None
    # (exports before it was recorded), hold its [pixels x pixels] scores.
    vae_attention: str | None = None
    # The model card's settings, used when a request names none: {"steps": int, "guidance": float,
    # "samplers": {name: {"steps", "guidance"}}} (a sampler's own entry wins).
    recommended: Mapping[str, Any] = field(default_factory=dict)
    # SDXL-style conditioning, None/False for SD 1.x/2.x. pooled_text_encoder: the text encoder whose
    # pooled output (text_embeds) the U-Net takes as its text_embeds input. time_ids: what the U-Net's
    # time_ids hold, in order (SDXL base: original_size, crops_coords_top_left, target_size, 6 values;
    # the refiner: aesthetic_score instead of target_size, 5). force_zeros_for_empty_prompt: an empty
    # negative prompt is all-zero embeddings, not the encoded "". vae_force_upcast: the VAE overflows
    # in fp16 (the SDXL VAE), so quantization keeps it fp32.
    pooled_text_encoder: str | None = None
    # Which text encoder hidden states condition the U-Net: "final" (last_hidden_state, SD 1.x/2.x)
    # or "penultimate" (the raw hidden_states.{N-1} of each encoder, SDXL); see runtime/text.py.
    text_hidden_states: str = "final"
    time_ids: tuple[str, ...] | None = None
    force_zeros_for_empty_prompt: bool = False
    vae_force_upcast: bool = False
    # Step previews (previews.py): the least-squares map from a latent pixel to its RGB; None: none fitted.
    latent_rgb: LatentRGB | None = None
    # diffusers' safety checker (runtime/safety.py), outside `graphs`: no LoRA, recipe or step touches it.
    safety_checker: GraphSpec | None = None
    upscaler: Upscaler | None = None  # SD's x4 upscaler: the image it upscales is the U-Net's input (upscale.py)
    format_version: int = FORMAT_VERSION

    @property
    def default_image_size(self) -> int:
        return self.sample_size * self.vae_downsample

    def to_json(self) -> str:
        raw = asdict(self)
        for name, graph in self.graphs.items():  # a weight map entry is a short list, not an object
            if graph.weights is not None:
                raw["graphs"][name]["weights"] = {module: ref.to_json() for module, ref in graph.weights.items()}
        return json.dumps(raw, indent=2, sort_keys=False) + "\n"

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        return cls.from_dict(read_manifest_json(path, "a folder"), where=str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST_NAME) -> Manifest:
        r = _Reader(raw, where)
        if raw.get("kind") == "controlnet":
            raise ModelError(f"{where}: a ControlNet folder, not a model: give it as "
                             "control=Control(model=..., image=...) (CLI: --control)")
        version = r.get("format_version", int)
        if version > FORMAT_VERSION:
            raise ModelError(
                f"{where}: format_version: got {version}, expected <= {FORMAT_VERSION} "
                "(written by a newer sdonnx; upgrade sdonnx)"
            )
        schedule = _schedule(r.sub("schedule"))
        graphs_reader = r.sub("graphs")
        graphs = {name: _graph(graphs_reader.sub(name)) for name in graphs_reader.keys()}
        unknown = set(graphs) - set(COMPONENTS)
        if unknown:
            raise ModelError(f"{where}: graphs: unknown component(s) {sorted(unknown)}, expected {COMPONENTS}")
        return cls(
            family=r.get("family", str),
            prediction_type=r.get("prediction_type", str, choices=PREDICTION_TYPES),
            latent_channels=r.get("latent_channels", int, positive=True),
            vae_scaling_factor=r.get("vae_scaling_factor", float, positive=True),
            vae_shift_factor=r.get("vae_shift_factor", float),
            vae_downsample=r.get("vae_downsample", int, positive=True),
            unet_in_channels=r.get("unet_in_channels", int, positive=True),
            cross_attention_dim=r.get("cross_attention_dim", int, positive=True),
            sample_size=r.get("sample_size", int, positive=True),
            tokenizer_max_length=r.get("tokenizer_max_length", int, positive=True),
            schedule=schedule,
            graphs=graphs,
            versions=r.get("versions", dict),
            files=r.get("files", dict),
            source=r.get("source", str),
            quantization=r.get("quantization", dict, optional=True),
            unet_attention=r.get("unet_attention", str, optional=True),
            vae_attention=r.get("vae_attention", str, optional=True),
            recommended=_recommended(r.get("recommended", dict, optional=True) or {}, where),
            pooled_text_encoder=r.get("pooled_text_encoder", str, optional=True, choices=COMPONENTS),
            text_hidden_states=r.get("text_hidden_states", str, optional=True, choices=TEXT_HIDDEN_STATES) or "final",
            time_ids=_time_ids(r.get("time_ids", list, optional=True), where),
            force_zeros_for_empty_prompt=r.get("force_zeros_for_empty_prompt", bool, optional=True) or False,
            vae_force_upcast=r.get("vae_force_upcast", bool, optional=True) or False,
            safety_checker=_graph(r.sub("safety_checker")) if raw.get("safety_checker") is not None else None,
            upscaler=_upscaler(r.sub("upscaler")) if raw.get("upscaler") is not None else None,
            latent_rgb=None if raw.get("latent_rgb") is None else LatentRGB.from_json(
                raw["latent_rgb"], r.get("latent_channels", int, positive=True), where),
            format_version=version,
        )

    def verify_files(self, folder: Path) -> None:
        """Raise ModelError for any file whose sha256 differs from the manifest's (slow: reads all)."""
        for rel, expected in self.files.items():
            path = Path(folder) / rel
            if not path.is_file():
                raise ModelError(f"{path}: listed in the manifest but missing")
            actual = sha256_file(path)
            if actual != expected:
                raise ModelError(f"{path}: sha256 {actual} differs from the manifest's {expected} (file changed or corrupt)")


def write_record(record: Any, folder: Path) -> Path:
    """A manifest dataclass (a ControlNet's, a VAE's) as `folder`/manifest.json."""
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    return path


def checked_version(r: _Reader) -> int:
    """A manifest's format_version; ModelError for one written by a newer sdonnx."""
    version = r.get("format_version", int)
    if version > FORMAT_VERSION:
        raise ModelError(f"{r.where}: format_version: got {version}, expected <= {FORMAT_VERSION} (upgrade sdonnx)")
    return version


def read_manifest_json(path: Path, kind: str) -> Any:
    """The JSON in a manifest file; ModelError naming it when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no manifest (expected {kind} written by `sdonnx export`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable manifest: {e}") from None


def _schedule(s: _Reader) -> TrainingSchedule:
    schedule = TrainingSchedule(
        num_train_timesteps=s.get("num_train_timesteps", int),
        alphas_cumprod=tuple(s.get("alphas_cumprod", list, item=float)),
        timestep_spacing=s.get("timestep_spacing", str, choices=TIMESTEP_SPACINGS),
        steps_offset=s.get("steps_offset", int),
        beta_schedule=s.get("beta_schedule", str),
        set_alpha_to_one=s.get("set_alpha_to_one", bool, optional=True) or False,
    )
    if len(schedule.alphas_cumprod) != schedule.num_train_timesteps:
        raise ModelError(
            f"{s.where}.alphas_cumprod: got {len(schedule.alphas_cumprod)} values, "
            f"expected num_train_timesteps={schedule.num_train_timesteps}"
        )
    return schedule


def _upscaler(r: _Reader) -> Upscaler:
    upscaler = Upscaler(_schedule(r.sub("noise_schedule")), r.get("max_noise_level", int),
                        r.get("image_channels", int, positive=True))
    if not 0 <= upscaler.max_noise_level < upscaler.noise_schedule.num_train_timesteps:
        raise ModelError(f"{r.where}.max_noise_level: got {upscaler.max_noise_level}, expected 0 to "
                         f"{upscaler.noise_schedule.num_train_timesteps - 1} (a step of noise_schedule)")
    return upscaler


def _graph(r: _Reader) -> GraphSpec:
    def tensors(key: str, optional: bool = False) -> tuple[TensorSpec, ...]:
        out = []
        for i, item in enumerate(r.get(key, list, optional=optional) or []):
            t = _Reader(item, f"{r.where}.{key}[{i}]")
            shape = t.get("shape", list)
            if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
                raise ModelError(f"{t.where}.shape: got {shape!r}, expected ints and dim names")
            out.append(TensorSpec(t.get("name", str), t.get("dtype", str, choices=DTYPES), tuple(shape)))
        return tuple(out)

    return GraphSpec(
        path=r.get("path", str),
        inputs=tensors("inputs"),
        outputs=tensors("outputs"),
        precision=r.get("precision", str),
        check=r.get("check", dict, optional=True),
        weights=None if r.get("weights", dict, optional=True) is None else read_map(r.raw["weights"], f"{r.where}.weights"),
        optional=tensors("optional", optional=True),
    )


class _Reader:
    """Typed access to one JSON object, with errors that name the full field path."""

    def __init__(self, raw: Any, where: str):
        if not isinstance(raw, dict):
            raise ModelError(f"{where}: got {type(raw).__name__}, expected a JSON object")
        self.raw, self.where = raw, where

    def keys(self) -> list[str]:
        return list(self.raw)

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), f"{self.where}.{key}")

    def get(self, key: str, kind: type, *, choices=None, positive=False, optional=False, item=None):
        path = f"{self.where}.{key}"
        if key not in self.raw or self.raw[key] is None:
            if optional:
                return None
            raise ModelError(f"{path}: missing (expected {kind.__name__})")
        value = self.raw[key]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ModelError(f"{path}: got {value!r}, expected {kind.__name__}")
        if choices is not None and value not in choices:
            raise ModelError(f"{path}: got {value!r}, expected one of {list(choices)}")
        if positive and value <= 0:
            raise ModelError(f"{path}: got {value!r}, expected a positive number")
        if item is not None:
            bad = [v for v in value if not isinstance(v, (int, float)) or isinstance(v, bool)]
            if bad:
                raise ModelError(f"{path}: got non-numeric item {bad[0]!r}, expected {item.__name__}s")
            value = [item(v) for v in value]
        return value


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
