"""What `sdonnx serve` runs, as one frozen config, checked before any port opens or model loads."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from sdonnx.config import check_int
from sdonnx.errors import InputError
from sdonnx.runtime.providers import RuntimeOptions

MAX_BODY_BYTES = 32 * 2**20  # a few init images and a mask as base64
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a shared server, beyond what the model and memory allow: steps,
    images (batch_size x n_iter) and the longer side in pixels. Requests over them get 422."""

    max_steps: int = 150  # A1111's UI slider ends here
    max_images: int = 16
    max_side: int = 2048

    def __post_init__(self):
        check_int("max_steps", self.max_steps, 1, 1000)
        check_int("max_images", self.max_images, 1, 4096)
        check_int("max_side", self.max_side, 8, 8192)


@dataclass(frozen=True)
class ServeConfig:
    """What `sdonnx serve` runs: the model(s), the bind address, the limits and the credentials.

    api_auth: ((user, password), ...); a host other than loopback needs it, or insecure_no_auth.
    """

    model: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    max_queue: int = 8
    api_auth: tuple[tuple[str, str], ...] = ()
    insecure_no_auth: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    lora_dir: Path | None = None
    control_dir: Path | None = None
    embeddings_dir: Path | None = None
    vae_dir: Path | None = None  # exported VAE folders (runtime/vae.py) requests may name as sd_vae
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        check_int("port", self.port, 0, 65535)
        check_int("max_queue", self.max_queue, 0, 10_000)
        check_int("max_body_bytes", self.max_body_bytes, 1024)
        for name in ("lora_dir", "control_dir", "embeddings_dir", "vae_dir"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise InputError(name, str(folder), "an existing folder")
        if not is_loopback(self.host) and not self.api_auth and not self.insecure_no_auth:
            raise InputError("host", self.host, "a loopback address (127.0.0.1, ::1, localhost), or --api-auth "
                             "USER:PASS to serve other machines (--insecure-no-auth to do it without a password)")


def parse_auth(text: str) -> tuple[tuple[str, str], ...]:
    """A1111's --api-auth "user:pass,user2:pass2" -> ((user, pass), ...)."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise InputError("api_auth", item, "USER:PASSWORD, several joined by commas")
        pairs.append((user, password))
    return tuple(pairs)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
