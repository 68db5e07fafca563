"""VAE decoding: latents -> pixels -> PIL images, refusing non-finite values on the way.

A fp16 VAE decoder overflows on some latents and returns NaN or inf, which would otherwise turn
into a silently black (or noise) image; that is reported as a `ModelError` naming the graph.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdonnx.errors import ModelError
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.session import Session

DECODER_INPUT = "latent_sample"
DECODER_OUTPUT = "sample"


def decode(vae_decoder: Session, latents: np.ndarray, manifest: Manifest) -> list[Image.Image]:
    """latents float [B, C, h, w] (diffusion space) -> B RGB images of h*f x w*f (f = VAE downsample).

    Decodes one image at a time, as the decoder's activations are the largest of the pipeline, or
    as many as a graph exported with a fixed batch takes.
    """
    spec = vae_decoder.input(DECODER_INPUT)
    chunk = spec.shape[0] if isinstance(spec.shape[0], int) else 1
    vae_latents = (latents / manifest.vae_scaling_factor + manifest.vae_shift_factor).astype(spec.dtype)
    images = []
    for start in range(0, len(vae_latents), chunk):
        pixels = vae_decoder.run(**{DECODER_INPUT: vae_latents[start : start + chunk]})[DECODER_OUTPUT]
        check_finite(pixels, vae_decoder, DECODER_OUTPUT, hint=_FP32_VAE_HINT)
        images.extend(to_images(pixels))
    return images


def to_images(pixels: np.ndarray) -> list[Image.Image]:
    """pixels float [B, 3, H, W] in [-1, 1] -> B RGB images, rounded as diffusers rounds them."""
    unit = np.clip(pixels.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    rgb = (unit.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(image) for image in rgb]


def check_finite(array: np.ndarray, session: Session, tensor: str, *, hint: str = "") -> None:
    """Raise ModelError if `array` (the `tensor` output of `session`) holds NaN or inf."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise ModelError(
            f"{session.path}: graph {session.name!r} produced {bad} non-finite (NaN/inf) values "
            f"of {array.size} in {tensor!r}{hint}"
        )


_FP32_VAE_HINT = "; fp16 VAE decoders overflow on some latents: use a VAE decoder exported in fp32"
