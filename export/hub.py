"""Fetch a diffusers pipeline from the Hugging Face Hub: only the files `sdonnx export` reads.

That is model_index.json, the unet / vae / text_encoder (SDXL: and text_encoder_2) configs and safetensors
weights, the scheduler config and the tokenizer(s). Never pickled .bin weights (loading them runs code), nor
the safety checker. Full-precision weights are preferred; a component published only as an fp16 variant is
fetched as that. A text encoder the repository does not have (SD 1.x/2.x: text_encoder_2; the SDXL refiner:
text_encoder) is simply not there: its config was not fetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sdonnx.errors import ExportError

WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
REQUIRED_COMPONENTS = ("unet", "vae")  # every model has these; the text encoders depend on the family
CONFIG_PATTERNS = (
    "model_index.json",
    *(f"{component}/config.json" for component in WEIGHTED_COMPONENTS),
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "tokenizer_2/*",
)
FALLBACK_VARIANT = "fp16"


def download(repo_id: str, *, revision: str | None = None) -> Path:
    """Download (or reuse from the Hub cache) what export needs from `repo_id`; the local snapshot folder."""
    folder = _snapshot(repo_id, revision, [*CONFIG_PATTERNS, *weight_patterns(None, WEIGHTED_COMPONENTS)])
    missing = _components_without_weights(folder)
    if missing:
        folder = _snapshot(repo_id, revision, weight_patterns(FALLBACK_VARIANT, missing))
        missing = _components_without_weights(folder)
    if missing:
        raise ExportError(
            f"{repo_id}: no safetensors weights for {', '.join(missing)} (neither full precision nor "
            f"{FALLBACK_VARIANT}); sdonnx does not download pickled .bin weights. Convert the model to "
            f"safetensors and give its local folder instead."
        )
    return folder


def weight_patterns(variant: str | None, components: Sequence[str]) -> list[str]:
    """Hub file patterns of the components' safetensors weights, single or sharded, of one variant."""
    tag = f".{variant}" if variant else ""
    names = []
    for stem in ("diffusion_pytorch_model", "model"):
        names += [f"{stem}{tag}.safetensors", f"{stem}{tag}-*-of-*.safetensors", f"{stem}.safetensors.index{tag}.json"]
    return [f"{component}/{name}" for component in components for name in names]


def _components_without_weights(folder: Path) -> list[str]:
    """The repository's weighted components (the required ones, and those whose config came) lacking safetensors."""
    present = [c for c in WEIGHTED_COMPONENTS if c in REQUIRED_COMPONENTS or (folder / c / "config.json").is_file()]
    return [component for component in present if not any((folder / component).glob("*.safetensors"))]


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    alternative = "A local diffusers folder or a single-file checkpoint works as SOURCE too."
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError as error:
        raise ExportError(
            f"{repo_id}: the Hub repository is gated: accept its licence on huggingface.co and log in "
            f"(`hf auth login` or HF_TOKEN). {alternative}"
        ) from error
    except RepositoryNotFoundError as error:
        raise ExportError(
            f"{repo_id}: no such Hub repository, or it is private (log in with `hf auth login` or HF_TOKEN). "
            f"{alternative}"
        ) from error
    except RevisionNotFoundError as error:
        raise ExportError(f"{repo_id}: the Hub repository has no revision {revision!r}") from error
    except HFValidationError as error:
        raise ExportError(f"{repo_id!r} is neither an existing path nor a valid Hub repository id: {error}") from error
    except LocalEntryNotFoundError as error:
        raise ExportError(
            f"{repo_id}: not in the local Hub cache, and the Hub cannot be reached (offline, no network, or "
            f"HF_HUB_OFFLINE=1 is set). Connect once to download it, or unset HF_HUB_OFFLINE. {alternative}"
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise ExportError(f"{repo_id}: download from the Hub failed: {error}. {alternative}") from error
