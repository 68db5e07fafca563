"""Where sampling starts: pure noise (txt2img), a noised init image (img2img), or an init image
with a mask (inpainting), as diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline start.

img2img VAE-encodes the init image and noises it to the first sigma of the plan's tail that
`strength` selects (`schedules.strength_tail`). Inpainting feeds a 9-channel U-Net the mask and the
masked image's latents as extra channels (`denoiser.Conditioning.channels`) and keeps the init image
outside the mask for a 4-channel one (`KeepUnmasked`). The x4 upscaler starts from noise at the
low-res image's size and feeds the U-Net that image, noised to a noise level, as extra channels
(`upscale_start`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sdonnx.errors import InputError, ModelError
from sdonnx.runtime.images import image_pixels, mask_pixels, open_image
from sdonnx.runtime.manifest import Manifest, Upscaler
from sdonnx.runtime.noise import NoiseSource
from sdonnx.runtime.samplers import Denoise
from sdonnx.runtime.schedules import Plan

ImageInput = Image.Image | Path | str  # a PIL image or the path of an image file
IMG2IMG_STRENGTH = 0.8  # diffusers' default: keeps the composition, redraws the detail
INPAINT_STRENGTH = 1.0
Encoder = Callable[[np.ndarray], np.ndarray]  # pixels [1, 3, H, W] -> latents [B, C, h, w], one sample per image


@dataclass(frozen=True)
class InitImage:
    """img2img / inpainting input at the generation size: pixels float32 [1, 3, H, W] in [-1, 1];
    mask float32 [1, 1, H, W] of 0/1 (1 = repaint), None for img2img."""

    pixels: np.ndarray
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class Start:
    """Where the sampler starts: x [B, C, h, w] in k-space, and what inpainting adds to the run.

    channels: for a 9-channel U-Net, mask || masked-image latents [B, 1 + C, h, w].
    keep: for a 4-channel U-Net, the init latents kept outside the mask.
    """

    x: np.ndarray
    channels: np.ndarray | None = None
    keep: KeepUnmasked | None = None


def default_strength(mask: object) -> float:
    """The strength a request with an init image gets when it names none: img2img's 0.8 (strength 1
    would ignore the image), inpainting's 1.0."""
    return IMG2IMG_STRENGTH if mask is None else INPAINT_STRENGTH


def inpainting_unet(manifest: Manifest, root: Path) -> bool:
    """True for a U-Net that takes latents || mask || masked-image latents, False for a plain one."""
    m = manifest
    if m.unet_in_channels not in (m.latent_channels, 2 * m.latent_channels + 1):
        raise ModelError(
            f"{root}: the U-Net takes {m.unet_in_channels} input channels, expected "
            f"{m.latent_channels} (latents) or {2 * m.latent_channels + 1} (inpainting)"
        )
    return m.unet_in_channels != m.latent_channels


def check_mode(inpainting: bool, image: object, mask: object, unet_in_channels: int) -> None:
    """The request must suit the U-Net: a mask needs an image, and a 9-channel U-Net only inpaints."""
    if mask is not None and image is None:
        raise InputError("image", None, "an init image to go with the mask")
    if inpainting and mask is None:
        raise InputError(
            "mask", None, "an init image and a mask: this is an inpainting model (its U-Net takes "
            f"{unet_in_channels} input channels); use Pipeline.inpaint, or --init-image with --mask"
        )


def read_init(image: Image.Image, mask: ImageInput | None, height: int, width: int) -> InitImage:
    """The opened init image and the mask (opened here) at height x width, as diffusers preprocesses them."""
    pixels = image_pixels(image, height, width)
    if mask is None:
        return InitImage(pixels)
    return InitImage(pixels, mask_pixels(open_image(mask, "mask"), image, height, width))


def initial_noise(shape: tuple[int, ...], rng: NoiseSource, latents: np.ndarray | None) -> np.ndarray:
    """Unit-variance noise float32 `shape` [B, C, h, w]: drawn from `rng`, or the caller's `latents`."""
    if latents is None:
        return np.asarray(rng.standard_normal(shape), dtype=np.float32)
    if not isinstance(latents, np.ndarray) or latents.shape != shape:
        got = latents.shape if isinstance(latents, np.ndarray) else type(latents).__name__
        raise InputError("latents", got, f"a numpy array of shape {shape} (batch, channels, height/f, width/f)")
    if not np.isfinite(latents).all():
        raise InputError("latents", "an array with NaN/inf", "finite values")
    return latents.astype(np.float32)


def upscale_start(
    pixels: np.ndarray, upscaler: Upscaler, noise_level: int, *, shape: tuple[int, ...], plan: Plan,
    rng: NoiseSource, latents: np.ndarray | None,
) -> Start:
    """The x4 upscaler's start: x [B, C, h, w] (`shape`, the low-res image's own size) from unit noise,
    and the low-res image pixels [1, 3, h, w] in [-1, 1] noised to noise_level by the upscaler's
    schedule as the U-Net's appended channels [B, 3, h, w] (diffusers' low_res_scheduler.add_noise,
    in float32). Draws from `rng` in diffusers' order: each image's low-res noise, then its latents."""
    alpha = np.float32(upscaler.noise_schedule.alphas_cumprod[noise_level])
    noise = np.asarray(rng.standard_normal((shape[0], *pixels.shape[1:])), dtype=np.float32)
    image = np.sqrt(alpha) * pixels.astype(np.float32) + np.sqrt(np.float32(1) - alpha) * noise
    return Start(initial_noise(shape, rng, latents) * plan.noise_scale, channels=image)


def start_latents(
    init: InitImage | None,
    strength: float,
    *,
    shape: tuple[int, ...],
    plan: Plan,
    rng: NoiseSource,
    latents: np.ndarray | None,
    encode: Encoder,
    inpainting: bool,
    factor: int,
) -> Start:
    """Starting x [B, C, h, w] (`shape`, k-space) and the inpainting inputs.

    encode: the VAE encoder, one sample per image of the batch; factor: its downsample factor.
    Draws from `rng` in diffusers' order: the init image's encoder sample (when it is used), the
    unit noise (or the caller's `latents`), the masked image's encoder sample (inpainting). img2img
    always starts from the image noised to plan.sigmas[0]; inpainting at strength 1 from pure noise,
    as diffusers' pipelines do.
    """
    if init is None:
        return Start(initial_noise(shape, rng, latents) * plan.noise_scale)
    full_strength = init.mask is not None and strength == 1
    image_latents = encode(init.pixels) if init.mask is None or not inpainting or not full_strength else None
    noise = initial_noise(shape, rng, latents)
    x = noise * plan.noise_scale if full_strength else image_latents + float(plan.sigmas[0]) * noise
    if init.mask is None:
        return Start(x)
    mask = np.repeat(init.mask[:, :, ::factor, ::factor], shape[0], axis=0)  # torch's "nearest" interpolate
    if inpainting:
        masked_latents = encode(init.pixels * (1 - init.mask))
        return Start(x, channels=np.concatenate([mask, masked_latents], axis=1))
    # diffusers samples the masked image's latents for a 4-channel U-Net too, which ignores them:
    # the draw is made (and not used) so that the samplers' later draws stay in step with its.
    rng.standard_normal(shape)
    return Start(x, keep=KeepUnmasked(image_latents, noise, mask, plan.sigmas))


@dataclass(frozen=True)
class KeepUnmasked:
    """4-channel inpainting: the init image, noised to the current sigma, outside the mask.

    diffusers' StableDiffusionInpaintPipeline (4-channel U-Net) blends after every scheduler step:
    x = (1 - mask) * (latents + sigma_next * noise) + mask * x, and with the clean latents after the
    last. `wrap` blends the U-Net's input instead, which gives the same image without touching the
    samplers: every sampler combines x, denoised and fresh noise element by element and the mask is
    0 or 1, so where mask = 1 each trajectory is diffusers'; the only thing that mixes pixels is the
    U-Net, which sees the blended x; where mask = 0 the trajectory differs, but `final` replaces it
    with the clean latents. At the plan's first sigma nothing is blended: the first step sees the
    starting x (pure noise at strength 1, as in diffusers). Between plan sigmas (DPM-2's and DPM++
    SDE's midpoints) diffusers blends with the image noised to the next plan sigma, and so does this.
    Step callbacks see the unblended x.

    latents, noise: [B, C, h, w], the clean init latents and the unit noise that started the run;
    mask: [B, 1, h, w] of 0/1, 1 = repaint; sigmas: the plan's, descending.
    """

    latents: np.ndarray
    noise: np.ndarray
    mask: np.ndarray
    sigmas: np.ndarray

    def wrap(self, denoise: Denoise) -> Denoise:
        """denoise(x, sigma) whose U-Net input is blended below the plan's first sigma."""
        return partial(self._denoise, denoise)

    def final(self, latent: np.ndarray) -> np.ndarray:
        """The sampled latent [B, C, h, w] with the clean init latents outside the mask."""
        return self._blend(latent, self.latents)

    def _denoise(self, denoise: Denoise, x: np.ndarray, sigma: float) -> np.ndarray:
        if sigma < self.sigmas[0]:
            level = float(self.sigmas[np.searchsorted(-self.sigmas, -sigma)])  # the plan sigma at or below
            x = self._blend(x, self.latents + level * self.noise)
        return denoise(x, sigma)

    def _blend(self, x: np.ndarray, known: np.ndarray) -> np.ndarray:
        return (1 - self.mask) * known + self.mask * x
