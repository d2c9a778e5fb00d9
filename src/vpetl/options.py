"""Option types shared by every method config, and the validators their ``__post_init__`` use.

Each validator returns the normalised value or raises :class:`~vpetl.ConfigError` saying what
was expected and what was found.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from .errors import ConfigError

POSITION_LETTERS = "qkv"


class Activation(str, Enum):
    """Nonlinearity between a branch's down- and up-projection."""

    TANH = "tanh"
    RELU = "relu"
    GELU = "gelu"


class BranchDtype(str, Enum):
    """The dtype of the trained parameters. ``FOLLOW``: the base's (they are created in it and
    ``model.to(dtype)`` converts them too). ``FLOAT32``: fp32 master weights that
    ``model.to(torch.bfloat16)`` / ``.half()`` leave in fp32; branch inputs are cast to fp32
    and results back to the activation dtype."""

    FOLLOW = "follow"
    FLOAT32 = "float32"


class Kernel(str, Enum):
    """Which implementation runs the PATT branch fused with the frozen projection."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


def enum_value(enum_cls: type[Enum], value: Any, name: str) -> Enum:
    """``value`` as a member of ``enum_cls`` (a member or its value)."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{name} must be one of {accepted}; got {value!r}.") from None


def width(value: Any, name: str) -> int:
    """A positive int (a bottleneck width, a rank, a token count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{name} must be a positive integer (the bottleneck width / rank, e.g. 64); got {value!r}."
        )
    return value


def number(value: Any, name: str) -> float:
    """A finite real number, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (e.g. 0.8); got {value!r}.")
    return float(value)


def probability(value: Any, name: str) -> float:
    """A dropout rate in ``[0, 1)``."""
    rate = number(value, name)
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"{name} must be in [0, 1) (a dropout rate, e.g. 0.1); got {value!r}.")
    return rate


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False; got {value!r}.")
    return value


def normalize_positions(value: Any, name: str = "positions") -> str:
    """Validate a string of letters from "qkv" and return it in q, k, v order ("vk" -> "kv")."""
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{name} must be a non-empty string of letters from 'qkv' (e.g. 'kv', 'qv', 'qkv'); got {value!r}."
        )
    bad = sorted(set(value) - set(POSITION_LETTERS))
    if bad or len(set(value)) != len(value):
        why = f"unknown letters {bad}" if bad else "a letter repeats"
        raise ConfigError(
            f"{name} must be letters from 'qkv', each at most once (e.g. 'kv', 'qv', 'qkv'); "
            f"got {value!r} ({why})."
        )
    return "".join(c for c in POSITION_LETTERS if c in value)


def frozen_set(obj: Any, name: str, value: Any) -> None:
    """Store a normalised value on a frozen dataclass from its ``__post_init__``."""
    object.__setattr__(obj, name, value)
