"""Load an original-layout single-file SD 1.x / 2.x / SDXL checkpoint (CompVis, SGM, A1111, civitai) as modules.

Such a file holds the U-Net (`model.diffusion_model.*`), the VAE (`first_stage_model.*`) and the text
encoder (`cond_stage_model.transformer.*`: SD 1.x's CLIP ViT-L; `cond_stage_model.model.*`: SD 2.x's
OpenCLIP ViT-H) but no description of their architecture. SDXL's generative-models (SGM) layout has two
text encoders instead: `conditioner.embedders.0.transformer.*` (CLIP ViT-L) and
`conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG with its projection, diffusers' text_encoder_2); the
SDXL refiner has only the latter, as `conditioner.embedders.0.model.*`. The architecture comes from a
diffusers folder: the user's `config`, or the SD 1.5 / SD 2.1 / SDXL base 1.0 configs bundled under
models/configs/ for the family the keys reveal (the refiner has none bundled: it needs `config`).
diffusers' own converters rename the weights; nothing is fetched from the network.

Prediction type: SD 2.x-base (epsilon, 512 px) and SD 2.x 768-v (v-prediction) have the same architecture,
so the weights cannot tell them apart. The bundled SD 2.x config is SD 2.1's, v-prediction; a 2.x-base
checkpoint needs `config` pointing at a folder whose scheduler says `"prediction_type": "epsilon"`.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Collection
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sdonnx.errors import ExportError, InputError
from sdonnx.export.source import SourceModel, read_model_index
from sdonnx.models import CLIP_TOKENIZER, CONFIGS

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")
TEXT_ENCODER_2_CONFIG = "text_encoder_2/config.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """What tells an SD family's single-file checkpoint apart, and the defaults sdonnx bundles for it."""

    label: str
    text_prefix: str | None  # the text encoder's keys; None: there is none (the SDXL refiner)
    text_embedding: str | None  # its token embedding, [vocab, width]
    pad_token: str  # SD 2.x's OpenCLIP tokenizer pads with "!", SD 1.x's CLIP with end-of-text
    bundled: str | None  # what the bundled config folder is; None: none is bundled, `config` is needed
    text_prefix_2: str | None = None  # SDXL: text_encoder_2's keys (OpenCLIP ViT-bigG, projected)
    text_embedding_2: str | None = None
    pad_token_2: str = "!"  # SDXL's tokenizer_2 pads with "!"

    @property
    def text_prefixes(self) -> tuple[str, ...]:
        return tuple(prefix for prefix in (self.text_prefix, self.text_prefix_2) if prefix is not None)

    @property
    def config_files(self) -> tuple[str, ...]:
        """The config files a folder describing this family must hold."""
        files = [name for name in CONFIG_FILES if self.text_prefix is not None or not name.startswith("text_encoder/")]
        if self.text_prefix_2 is not None:
            files.insert(len(files) - 1, TEXT_ENCODER_2_CONFIG)
        return tuple(files)


FAMILIES = {
    "sd1": Family(
        label="SD 1.x",
        text_prefix="cond_stage_model.transformer.",
        text_embedding="cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        pad_token="<|endoftext|>",
        bundled="bundled SD 1.5 config",
    ),
    "sd2": Family(
        label="SD 2.x",
        text_prefix="cond_stage_model.model.",
        text_embedding="cond_stage_model.model.token_embedding.weight",
        pad_token="!",
        bundled="bundled SD 2.1 config, v-prediction assumed (weights cannot tell 2.x-base's epsilon apart)",
    ),
    "sdxl": Family(
        label="SDXL",
        text_prefix="conditioner.embedders.0.transformer.",
        text_embedding="conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        pad_token="<|endoftext|>",
        bundled="bundled SDXL base 1.0 config",
        text_prefix_2="conditioner.embedders.1.model.",
        text_embedding_2="conditioner.embedders.1.model.token_embedding.weight",
    ),
    "sdxl_refiner": Family(
        label="SDXL refiner",
        text_prefix=None,
        text_embedding=None,
        pad_token="!",
        bundled=None,
        text_prefix_2="conditioner.embedders.0.model.",
        text_embedding_2="conditioner.embedders.0.model.token_embedding.weight",
    ),
}


@dataclass(frozen=True)
class _Checkpoint:
    """A checkpoint opened for conversion: every tensor's shape up front, data one component at a time."""

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], dict[str, torch.Tensor]]  # the tensors whose names start with a prefix


def load_single_file(path: Path, *, allow_pickle: bool, config: Path | None) -> SourceModel:
    """Convert the checkpoint at `path` into fp32 modules in eval mode.

    config: a diffusers folder describing the checkpoint's architecture (unet/, vae/, text_encoder/ and
    scheduler/ configs, SDXL's text_encoder_2/ too; tokenizer/ and tokenizer_2/ optional). None picks the
    bundled SD 1.5, SD 2.1 or SDXL base folder by the key layout and checks that the weights' shapes fit it.
    """
    path = Path(path)
    checkpoint = _open_checkpoint(path, allow_pickle)
    family_name = detect_family(checkpoint.shapes, path)
    family = FAMILIES[family_name]
    if config is not None:
        folder = _check_config_folder(Path(config), family)
    elif family.bundled is None:
        raise ExportError(
            f"{path}: {family.label} checkpoint ({', '.join(p + '*' for p in family.text_prefixes)} text encoder), "
            f"for which sdonnx bundles no config: pass a config folder (a diffusers folder of this model with "
            f"{', '.join(family.config_files)})"
        )
    else:
        folder = bundled_config(family_name)
        _check_fits(checkpoint.shapes, family, folder, path)
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": family.text_prefix,
                "text_encoder_2": family.text_prefix_2}
    modules = {
        name: _convert(path, folder, name, load, checkpoint.read(prefixes[name]))
        for name, load in _LOADERS.items()
        if prefixes[name] is not None
    }
    if config is None and family_name == "sd2":
        logger.warning(
            "%s: SD 2.x checkpoint, exported as v-prediction (SD 2.1 768-v); "
            "for an SD 2.x-base (epsilon) model pass a config folder",
            path.name,
        )
    return SourceModel(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules.get("text_encoder"),
        tokenizer=_load_tokenizer(family, config) if family.text_prefix is not None else None,
        scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        description=f"{path.name} (single-file {family.label} checkpoint; architecture from "
        f"{config if config is not None else family.bundled})",
        text_encoder_2=modules.get("text_encoder_2"),
        tokenizer_2=_load_tokenizer(family, config, "tokenizer_2") if family.text_prefix_2 is not None else None,
        pipeline_config=read_model_index(folder),
    )


def detect_family(keys: Collection[str], path: Path) -> str:
    """"sd1", "sd2", "sdxl" or "sdxl_refiner" from the key layout; ExportError for any other checkpoint."""
    prefixes = (UNET_PREFIX, VAE_PREFIX, *(prefix for family in FAMILIES.values() for prefix in family.text_prefixes))
    present = {prefix for prefix in prefixes if any(key.startswith(prefix) for key in keys)}
    families = [name for name, family in FAMILIES.items() if set(family.text_prefixes) <= present]
    if {UNET_PREFIX, VAE_PREFIX} <= present and len(families) == 1:
        return families[0]
    hint = ""
    if any(key.startswith("conditioner.embedders.") for key in keys):
        hint = " Its keys look like SDXL (conditioner.embedders.*), but not every part of an SDXL checkpoint is there."
    expected = " or ".join(f"{' + '.join(p + '*' for p in f.text_prefixes)} ({f.label})" for f in FAMILIES.values())
    raise ExportError(
        f"{path}: not a Stable Diffusion 1.x/2.x checkpoint in the original layout, nor an SDXL one: expected "
        f"tensors named {UNET_PREFIX}* (U-Net), {VAE_PREFIX}* (VAE) and {expected} text encoders; found "
        f"{len(keys)} tensors such as {sorted(keys)[:3]}.{hint}"
    )


def bundled_config(family: str) -> Path:
    """The diffusers config folder sdonnx ships for a family ("sd1": SD 1.5, "sd2": SD 2.1, "sdxl": SDXL base 1.0)."""
    return CONFIGS / family


def _check_config_folder(config: Path, family: Family) -> Path:
    missing = [name for name in family.config_files if not (config / name).is_file()]
    if missing:
        raise InputError(
            "config", str(config),
            f"a diffusers folder with {', '.join(family.config_files)} (missing: {', '.join(missing)})",
        )
    return config


def _open_checkpoint(path: Path, allow_pickle: bool) -> _Checkpoint:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise ExportError(f"{path}: cannot read it as a safetensors file: {error}") from error

        def read(prefix: str) -> dict[str, torch.Tensor]:
            # Tensors map the file; a handle per component lets the pages of an upcast (fp16) component
            # go with its tensors, so peak memory stays near the fp32 model's size.
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in shapes if key.startswith(prefix)}

        return _Checkpoint(shapes, read)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ExportError(
                f"{path}: refusing to load a {suffix} file: it is a Python pickle, and unpickling runs code stored "
                f"in the file, so a malicious checkpoint can take over this machine. Convert it to .safetensors, "
                f"or pass --allow-pickle if you trust where it came from."
            )
        tensors = _load_pickle(path)
        return _Checkpoint(
            {key: tuple(tensor.shape) for key, tensor in tensors.items()},
            lambda prefix: {key: tensor for key, tensor in tensors.items() if key.startswith(prefix)},
        )
    raise ExportError(
        f"{path}: unsupported checkpoint suffix {suffix!r}, expected {SAFETENSORS_SUFFIX} "
        f"(or, with --allow-pickle, one of {', '.join(PICKLE_SUFFIXES)})"
    )


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, unwrapped from the training run's {"state_dict": ...}."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:
            # Training checkpoints also pickle Lightning callbacks, which the restricted unpickler rejects;
            # --allow-pickle is the user's consent to the full one.
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ImportError, AttributeError, ValueError) as error:
        raise ExportError(f"{path}: cannot read it as a PyTorch checkpoint: {error}") from error
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ExportError(f"{path}: expected a dict of tensors, found a pickled {type(loaded).__name__}")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _check_fits(shapes: dict[str, tuple[int, ...]], family: Family, folder: Path, path: Path) -> None:
    """Compare a few telling shapes with the bundled config before converting (inpainting, custom sizes)."""
    unet, vae = (json.loads((folder / name).read_text()) for name in CONFIG_FILES[:2])
    width = unet["block_out_channels"][0]
    # The first level with attention: SD 1.x/2.x's first, SDXL's second (its first is a plain DownBlock2D).
    level = next(i for i, kind in enumerate(unet["down_block_types"]) if "CrossAttn" in kind)
    attention = f"input_blocks.{1 + level * (unet['layers_per_block'] + 1)}.1.transformer_blocks.0.attn2.to_k.weight"
    expected = {
        f"{UNET_PREFIX}input_blocks.0.0.weight": (width, unet["in_channels"], 3, 3),
        UNET_PREFIX + attention: (unet["block_out_channels"][level], unet["cross_attention_dim"]),
        f"{VAE_PREFIX}encoder.conv_in.weight": (vae["block_out_channels"][0], vae["in_channels"], 3, 3),
    }
    for embedding, part in ((family.text_embedding, "text_encoder"), (family.text_embedding_2, "text_encoder_2")):
        if embedding is not None:
            text = json.loads((folder / part / "config.json").read_text())
            expected[embedding] = (text["vocab_size"], text["hidden_size"])
    if unet.get("addition_embed_type") == "text_time":  # SDXL's add_embedding: text_embeds || time ids
        expected[f"{UNET_PREFIX}label_emb.0.0.weight"] = (4 * width, unet["projection_class_embeddings_input_dim"])
    wrong = [
        f"{key} has shape {shapes.get(key)}, expected {shape}"
        for key, shape in expected.items()
        if shapes.get(key) != shape
    ]
    if wrong:
        raise ExportError(
            f"{path}: {family.label} key layout, but not the architecture of the {family.bundled} "
            f"({'; '.join(wrong)}). Pass a config folder (a diffusers pipeline folder with this model's "
            f"{'/'.join(name.split('/')[0] for name in family.config_files)} configs) that describes it."
        )


def _load_unet(tensors: dict, folder: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_single_file(tensors, config=str(folder), subfolder="unet", local_files_only=True)


def _load_vae(tensors: dict, folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_single_file(tensors, config=str(folder), subfolder="vae", local_files_only=True)


def _load_text_encoder(tensors: dict, folder: Path):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    return create_diffusers_clip_model_from_ldm(
        CLIPTextModel, tensors, subfolder="text_encoder", config=str(folder), local_files_only=True
    )


def _load_text_encoder_2(tensors: dict, folder: Path):
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    return create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, tensors, subfolder="text_encoder_2", config=str(folder), local_files_only=True
    )


_LOADERS = {"unet": _load_unet, "vae": _load_vae, "text_encoder": _load_text_encoder,
            "text_encoder_2": _load_text_encoder_2}


def _convert(path: Path, folder: Path, name: str, load: Callable, tensors: dict[str, torch.Tensor]):
    """One component through diffusers' converter; ExportError unless every parameter got a weight.

    Weights take the dtype of the module diffusers builds from the config (fp32), so fp16 checkpoints upcast.
    """
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    config_file = folder / name / "config.json"
    missing = f"{path}: the checkpoint lacks {name} weights that {config_file} describes"
    hint = "the checkpoint is incomplete or the config describes another architecture"
    try:
        module = load(tensors, folder)
    except NotImplementedError as error:
        # diffusers builds modules on the meta device and fills in what the checkpoint has; moving one
        # to the CPU afterwards fails on the parameters that got nothing.
        raise ExportError(f"{missing}; {hint}") from error
    except (ValueError, KeyError, IndexError, RuntimeError, SingleFileComponentError) as error:
        raise ExportError(f"{path}: its {name} weights do not fit {config_file}: {error}") from error
    left_on_meta = [key for key, tensor in chain(module.named_parameters(), module.named_buffers()) if tensor.is_meta]
    if left_on_meta:
        raise ExportError(f"{missing}, such as {left_on_meta[:3]} ({len(left_on_meta)} in all); {hint}")
    return module.eval().requires_grad_(False)


def _load_tokenizer(family: Family, config: Path | None, part: str = "tokenizer"):
    """The config folder's tokenizer (or tokenizer_2), else the bundled CLIP BPE with the family's padding."""
    from transformers import CLIPTokenizer

    if config is not None and (config / part).is_dir():
        return CLIPTokenizer.from_pretrained(config / part)
    pad_token = family.pad_token if part == "tokenizer" else family.pad_token_2
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER, pad_token=pad_token)
