"""Error types shared by export, runtime and the CLI.

Every error a user can cause names the field, what was received and what was expected, so the
CLI can print it as is (no traceback) and the Python API can catch one base class.
"""

from __future__ import annotations


class SdonnxError(Exception):
    """Base class of every error sdonnx raises on bad input or a bad model folder."""


class InputError(SdonnxError, ValueError):
    """A user-supplied value is out of its allowed range or of the wrong kind."""

    def __init__(self, field: str, received: object, expected: str):
        self.field, self.received, self.expected = field, received, expected
        super().__init__(f"{field}: got {received!r}, expected {expected}")


class ModelError(SdonnxError):
    """A model folder, manifest or graph is missing, corrupt or contradicts itself."""


class ExportError(SdonnxError):
    """Export could not produce a checked model folder; nothing was written at the destination."""
