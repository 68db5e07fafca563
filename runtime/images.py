"""Images in and out of latent space: the VAE decoder and encoder, and init image / mask preprocessing.

A fp16 VAE decoder overflows on some latents and returns NaN or inf, which would otherwise turn
into a silently black (or noise) image; that is reported as a `ModelError` naming the graph.

In low-memory mode the decoder runs on overlapping tiles of the latent, blended with linear ramps
across the overlaps: its activations (at 512 x 512, ~130 MB per 128-channel map) shrink with the
tile. The decoder's GroupNorm statistics and mid-block attention then see one tile rather than the
whole image, so tiles are large and overlap by a quarter of their size.

Init images and masks are prepared as diffusers' VaeImageProcessor prepares them: any mode in (the
image converted to RGB, the mask to grayscale), resized with Lanczos when their size is not the one
asked for (with a warning: sdonnx resizes rather than refuses, as diffusers does), then the image
scaled to [-1, 1] and the mask binarized at 0.5 (1 = repaint). Two modes are read with care rather
than as Pillow converts them: 16- and 32-bit grayscale (I;16, I) are scaled from their full range
(Pillow's convert clips them at 255, so a 16-bit gradient turns almost all white), and transparency
(RGBA, LA, P with a transparent colour) is composited: an init image on white, a mask on black (a
transparent part of a mask is kept, not repainted), with a warning saying so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime.manifest import Manifest
from sdonnx.runtime.noise import NoiseSource, gaussian_like
from sdonnx.runtime.session import Session
from sdonnx.runtime.tiles import windows

DECODER_INPUT = "latent_sample"
DECODER_OUTPUT = "sample"
ENCODER_INPUT = "sample"
# The encoder's distribution parameters (mean || logvar, optimum's output), or, from older exports,
# an already drawn sample; diffusers' DiagonalGaussianDistribution clamps logvar to this range.
ENCODER_PARAMETERS, ENCODER_SAMPLE = "latent_parameters", "latent_sample"
LOGVAR_RANGE = (-30.0, 20.0)
MASK_THRESHOLD = 0.5
DECODE_TILE = 32  # latent pixels (256 image pixels for SD), overlapping by a quarter of that


def decode(
    vae_decoder: Session, latents: np.ndarray, manifest: Manifest, *, tile: int | None = None
) -> list[Image.Image]:
    """latents float [B, C, h, w] (diffusion space) -> B RGB images of h*f x w*f (f = VAE downsample).

    Decodes one image at a time, as the decoder's activations are the largest of the pipeline, or
    as many as a graph exported with a fixed batch takes. tile: decode latents larger than
    tile x tile in overlapping tiles of that size (`decode_tiled`); None decodes them whole.
    """
    spec = vae_decoder.input(DECODER_INPUT)
    chunk = spec.shape[0] if isinstance(spec.shape[0], int) else 1
    vae_latents = (latents / manifest.vae_scaling_factor + manifest.vae_shift_factor).astype(spec.dtype)
    tiled = tile is not None and max(latents.shape[2:]) > tile and not any(isinstance(d, int) for d in spec.shape[2:])
    images = []
    for start in range(0, len(vae_latents), chunk):
        part = vae_latents[start : start + chunk]
        if tiled:
            pixels = decode_tiled(vae_decoder, part, tile, manifest.vae_downsample)
        else:
            pixels = _run_decoder(vae_decoder, part)
        images.extend(to_images(pixels))
    return images


def decode_tiled(vae_decoder: Session, vae_latents: np.ndarray, tile: int, factor: int) -> np.ndarray:
    """VAE-space latents [B, C, h, w] -> pixels float32 [B, 3, h*f, w*f], decoded tile by tile.

    Tiles of tile x tile latent pixels (fewer at an image smaller than that) overlap by tile // 4 and
    are blended with ramps across the overlaps (tiles.py).
    """
    height, width = vae_latents.shape[2:]
    pixels = weights = None
    for rows, cols, ramp in windows(height, width, tile, factor):
        part = _run_decoder(vae_decoder, vae_latents[:, :, rows, cols])
        if pixels is None:
            pixels = np.zeros((*part.shape[:2], height * factor, width * factor), dtype=np.float32)
            weights = np.zeros((height * factor, width * factor), dtype=np.float32)
        y, x = slice(rows.start * factor, rows.stop * factor), slice(cols.start * factor, cols.stop * factor)
        pixels[:, :, y, x] += part.astype(np.float32) * ramp
        weights[y, x] += ramp
    return pixels / weights


def _run_decoder(vae_decoder: Session, vae_latents: np.ndarray) -> np.ndarray:
    pixels = vae_decoder.run(**{DECODER_INPUT: vae_latents})[DECODER_OUTPUT]
    check_finite(pixels, vae_decoder, DECODER_OUTPUT, hint=_FP32_VAE_HINT)
    return pixels


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


def encode(
    vae_encoder: Session, pixels: np.ndarray, manifest: Manifest, rng: NoiseSource, batch: int
) -> np.ndarray:
    """pixels float32 [1 or batch, 3, H, W] in [-1, 1] -> `batch` latents [batch, C, H/f, W/f] (diffusion
    space): one image for the whole batch (img2img), or one per image (the hires fix's Lanczos pass).

    One encoder run per picture; each image of the batch then draws its own sample from the encoder's Gaussian
    (one draw of [batch, C, h, w] from `rng`, where diffusers' retrieve_latents draws), so that
    image k of a batch is the image a run with seed S+k alone gives.
    """
    output = next(name for name in (ENCODER_PARAMETERS, ENCODER_SAMPLE) if name in vae_encoder.output_names)
    spec = vae_encoder.input(ENCODER_INPUT)
    moments = np.concatenate([vae_encoder.run(**{ENCODER_INPUT: picture[None].astype(spec.dtype)})[output]
                              for picture in pixels]).astype(np.float32)
    check_finite(moments, vae_encoder, output)
    if len(moments) != batch:  # one init image for the whole batch
        moments = np.repeat(moments, batch, axis=0)
    if output == ENCODER_PARAMETERS:
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, *LOGVAR_RANGE))
        moments = mean + std * gaussian_like(rng, mean)
    return (moments - manifest.vae_shift_factor) * manifest.vae_scaling_factor


def resize_latents(latents: np.ndarray, height: int, width: int, *, nearest: bool = False) -> np.ndarray:
    """latents [B, C, h, w] -> [B, C, height, width], as torch's interpolate does: bilinear with
    align_corners=False and no antialias (A1111's "Latent" upscaler), or nearest ("Latent (nearest)")."""
    def taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if nearest:
            index = np.minimum((np.arange(size_out) * size_in / size_out).astype(int), size_in - 1)
            return index, index, np.zeros(size_out, np.float32)
        source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, None)
        low = np.minimum(source.astype(int), size_in - 1)
        return low, np.minimum(low + 1, size_in - 1), (source - low).astype(np.float32)

    y0, y1, fy = taps(latents.shape[2], height)
    x0, x1, fx = taps(latents.shape[3], width)
    rows = latents[:, :, y0] * (1 - fy)[:, None] + latents[:, :, y1] * fy[:, None]
    return (rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx).astype(latents.dtype)


def open_image(image: object, field: str) -> Image.Image:
    """A PIL image, or the image file at a path, loaded; InputError naming `field` otherwise."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise InputError(field, type(image).__name__, "a PIL image or the path of an image file")
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(field, str(image), f"a readable image file ({e})") from None


def default_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """(height, width): the image's, rounded down to `multiple` as diffusers' VaeImageProcessor does."""
    height, width = image.height - image.height % multiple, image.width - image.width % multiple
    if not height or not width:
        raise InputError("image", f"{image.width}x{image.height}", f"an image at least {multiple}x{multiple} pixels")
    return height, width


def image_pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Any-mode image -> float32 [1, 3, height, width] in [-1, 1] (resized with Lanczos if needed)."""
    rgb = np.asarray(_resized(as_8bit(image, "RGB", "image"), height, width, "image"), dtype=np.float32) / 255
    return (2 * rgb - 1).transpose(2, 0, 1)[None]


def mask_pixels(mask: Image.Image, image: Image.Image, height: int, width: int) -> np.ndarray:
    """Any-mode mask the size of `image` -> float32 [1, 1, height, width], 1 (white) = repaint."""
    if mask.size != image.size:
        raise InputError("mask", f"{mask.width}x{mask.height}", f"the init image's size, {image.width}x{image.height}")
    gray = np.asarray(_resized(as_8bit(mask, "L", "mask"), height, width, "mask"), dtype=np.float32) / 255
    return (gray >= MASK_THRESHOLD).astype(np.float32)[None, None]


WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
BACKGROUND = {"image": 255, "mask": 0}  # what transparency shows: white under an image, "keep" under a mask


def as_8bit(image: Image.Image, mode: str, field: str) -> Image.Image:
    """`image` in 8-bit `mode` ("RGB" or "L"), wide grayscale scaled and transparency composited."""
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and values.max() <= 255:  # an 8-bit image stored as 32-bit ints
            scale = 255
        else:
            scale = WIDE_MODES[image.mode]
        gray = Image.fromarray((np.clip(values / scale, 0, 1) * 255).round().astype(np.uint8), "L")
        return gray.convert(mode)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            shade = BACKGROUND[field]
            warnings.warn(
                f"{field}: transparent pixels composited on {'white' if shade else 'black'}"
                + (" (kept, not repainted)" if field == "mask" else ""),
                stacklevel=4,
            )
            background = Image.new("RGBA", rgba.size, (shade, shade, shade, 255))
            return Image.alpha_composite(background, rgba).convert(mode)
        return rgba.convert(mode)
    return image.convert(mode)


def _resized(image: Image.Image, height: int, width: int, field: str) -> Image.Image:
    if image.size == (width, height):
        return image
    warnings.warn(f"{field}: resized from {image.width}x{image.height} to {width}x{height} (Lanczos)", stacklevel=3)
    return image.resize((width, height), Image.Resampling.LANCZOS)
