"""The memory policy: everything low-memory mode changes, decided once when the model loads.

`memory_policy(low_memory, memory_arena)` is the only place that reads the low-memory switch; the
pipeline, the sessions and the VAE decode read the resulting `MemoryPolicy`'s fields and never ask
whether they are in low-memory mode. Low memory trades speed for peak memory:
- each graph opens when its step of the pipeline starts and is closed, with its memory handed back
  to the OS, when the step ends (`model.Sessions.use`), so one graph is in memory at a time;
- the U-Net runs one image at a time, the classifier-free-guidance halves one after the other
  (`denoiser.GuidedDenoiser.max_batch`), which halves its activations at least;
- the VAE decodes latents larger than `decode_tile` in overlapping tiles (`images.decode`);
- the x4 upscaler, whose latent is the low-res image's size, runs its U-Net on tiles of `unet_tile`
  latent pixels blended at every step (`tiles.tiled`);
- onnxruntime's CPU memory arena is off, so memory freed between runs goes back too.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from dataclasses import dataclass

DECODE_TILE = 32  # latent pixels (256 image pixels for SD), overlapping by a quarter of that
UNET_TILE = 64  # latent pixels: SD 1.5's native latent, and half the x4 upscaler's (its sample_size is 128)


@dataclass(frozen=True)
class MemoryPolicy:
    """release_sessions: close each graph after its step. unet_max_batch: images per U-Net run
    (None: the whole CFG batch at once). decode_tile: tile size of the VAE decode in latent pixels
    (None: whole). unet_tile: the x4 upscaler's U-Net tile in latent pixels (None: whole). arena:
    onnxruntime's CPU memory arena."""

    release_sessions: bool = False
    unet_max_batch: int | None = None
    decode_tile: int | None = None
    unet_tile: int | None = None
    arena: bool = True


def memory_policy(low_memory: bool, memory_arena: bool) -> MemoryPolicy:
    """The policy for RuntimeOptions' low_memory and memory_arena fields."""
    if low_memory:
        return MemoryPolicy(release_sessions=True, unet_max_batch=1, decode_tile=DECODE_TILE,
                            unet_tile=UNET_TILE, arena=False)
    return MemoryPolicy(arena=memory_arena)


def return_freed_memory() -> None:
    """Hand memory freed by a closed session back to the OS: glibc keeps freed heap pages for reuse,
    so without malloc_trim the process's resident size never falls to the next step's needs."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass
