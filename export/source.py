"""Resolve an export SOURCE (diffusers folder, hub id, single-file checkpoint) into PyTorch modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SourceModel:
    """The PyTorch side of a Stable Diffusion checkpoint, as the exporter needs it (fp32, eval mode)."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler_config: dict
    description: str  # what SOURCE was, recorded in the manifest
