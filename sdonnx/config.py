"""Config plumbing shared by every subpackage: field checks for frozen configs, and the one way
from parsed command-line arguments to a config.

Each config dataclass validates its own fields in __post_init__ with these helpers, so a value is
checked once, where the user handed it in, and code below trusts it. `config_from_args` builds a
config from an argparse namespace whose dests are the config's field names.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from typing import Any, Mapping, TypeVar

import numpy as np

from sdonnx.errors import InputError

Config = TypeVar("Config")


def is_int(value: object) -> bool:
    """An integer (Python or NumPy), and not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (Python or NumPy int or float), and not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_int(field: str, value: object, low: int, high: int | None = None, *, what: str = "") -> None:
    """InputError unless `value` is an integer in [low, high] (no upper bound when high is None);
    `what` adds why to the message."""
    if not is_int(value) or value < low or (high is not None and value > high):
        expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise InputError(field, value, expected + what)


def check_real(field: str, value: object, low: float, high: float, *, what: str = "") -> None:
    """InputError unless `value` is a finite number in [low, high]; `what` adds why to the message."""
    if not is_real(value) or not math.isfinite(value) or not low <= value <= high:
        raise InputError(field, value, f"a finite number from {low:g} to {high:g}{what}")


def check_bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InputError(field, value, "True or False")


def check_choice(field: str, value: object, choices: Any) -> None:
    """InputError unless `value` is one of `choices` (any container; listed sorted in the message)."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(field, value, f"one of {sorted(choices)}")


def config_from_args(
    cls: type[Config], args: argparse.Namespace, *, defaults: Mapping[str, Any] | None = None, **values: Any
) -> Config:
    """`cls` from the namespace's attributes named as its fields.

    A flag left at None keeps the value in `defaults` (settings read from a file, say), else the
    field's own default, so a config's defaults live in one place: the dataclass, not the parser.
    `values` (flags that needed parsing first) override both.
    """
    taken = dict(defaults or {})
    for field in fields(cls):
        if getattr(args, field.name, None) is not None:
            taken[field.name] = getattr(args, field.name)
    return cls(**(taken | values))
