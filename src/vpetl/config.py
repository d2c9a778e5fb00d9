"""Frozen, validated configs for every method, and the string presets of ``vpetl.inject``.

A config is the whole truth about an injection: the delta file stores it (as JSON) and
``load_delta`` rebuilds the injection from it on a fresh base model.

Presets (paper defaults, DESIGN.md §1):

============  ==========================================================  =========
method        branches                                                    d_bottle
============  ==========================================================  =========
``patt``      PATT(r, s=0.8, tanh, positions "kv") + head                 128
``adapter``   Adapter(r, s=0.1, ReLU, parallel to the MLP) + head         64
``bapat``     Adapter(64, s=0.1) + PATT(r, s=0.8) + head                  128
``lora``      LoRA(r) on Q and V, separate pairs, scale 1 + head          16
``bitfit``    every bias of the base + head                               --
``linear``    head only ("tune FC", linear probe)                         --
``full``      every parameter                                             --
============  ==========================================================  =========
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from .errors import ConfigError

POSITION_LETTERS = "qkv"


class Activation(str, Enum):
    """Nonlinearity between a branch's down- and up-projection."""

    TANH = "tanh"
    RELU = "relu"
    GELU = "gelu"


class Kernel(str, Enum):
    """Which implementation runs the PATT branch fused with the frozen projection."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


def _enum(enum_cls: type[Enum], value: Any, name: str) -> Enum:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{name} must be one of {accepted}; got {value!r}.") from None


def _width(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{name} must be a positive integer (the bottleneck width / rank, e.g. 64); got {value!r}."
        )
    return value


def _scale(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (e.g. 0.8); got {value!r}.")
    return float(value)


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


def _frozen_set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class PattConfig:
    """Parallel attention (Eq. 9-10): ``[K_p | V_p] = act(x W_down + b_down) W_up + b_up``,
    ``K += s K_p``, ``V += s V_p``.

    ``positions`` picks the projections that receive a chunk of the up-projection, in q, k, v
    order. ``bias=None`` follows the backbone's qkv bias flag (as the reference code does).
    ``zero_init`` zero-initialises the up-projection so the model is unchanged at step 0.
    """

    d_bottle: int = 128
    scale: float = 0.8
    positions: str = "kv"
    activation: Activation = Activation.TANH
    zero_init: bool = False
    bias: bool | None = None

    def __post_init__(self) -> None:
        _width(self.d_bottle, "PATT d_bottle")
        _frozen_set(self, "scale", _scale(self.scale, "PATT scale"))
        _frozen_set(self, "positions", normalize_positions(self.positions, "PATT positions"))
        _frozen_set(self, "activation", _enum(Activation, self.activation, "PATT activation"))
        if not isinstance(self.zero_init, bool):
            raise ConfigError(f"PATT zero_init must be True or False; got {self.zero_init!r}.")
        if self.bias is not None and not isinstance(self.bias, bool):
            raise ConfigError(f"PATT bias must be True, False or None (follow the backbone); got {self.bias!r}.")


@dataclass(frozen=True)
class AdapterConfig:
    """AdaptFormer's parallel adapter (Eq. 6-7): ``mlp(x) + s * up(act(down(x)))``, reading the
    MLP's input; ``up`` is zero-initialised, so the model is unchanged at step 0."""

    d_bottle: int = 64
    scale: float = 0.1
    activation: Activation = Activation.RELU

    def __post_init__(self) -> None:
        _width(self.d_bottle, "Adapter d_bottle")
        _frozen_set(self, "scale", _scale(self.scale, "Adapter scale"))
        _frozen_set(self, "activation", _enum(Activation, self.activation, "Adapter activation"))


@dataclass(frozen=True)
class LoraConfig:
    """LoRA (paper layout): a separate pair per position, ``W_p x + scale * B_p A_p x``, no bias,
    ``A`` Kaiming-uniform, ``B`` zero. ``scale`` is LoRA's alpha / rank."""

    rank: int = 16
    scale: float = 1.0
    positions: str = "qv"

    def __post_init__(self) -> None:
        _width(self.rank, "LoRA rank (d_bottle)")
        _frozen_set(self, "scale", _scale(self.scale, "LoRA scale"))
        _frozen_set(self, "positions", normalize_positions(self.positions, "LoRA positions"))


@dataclass(frozen=True)
class InjectConfig:
    """Everything ``inject`` does: which branches, which base parameters train, which kernel."""

    method: str = "custom"
    patt: PattConfig | None = None
    adapter: AdapterConfig | None = None
    lora: LoraConfig | None = None
    train_head: bool = True
    train_biases: bool = False
    train_all: bool = False
    kernel: Kernel = Kernel.AUTO

    def __post_init__(self) -> None:
        for name, cls in (("patt", PattConfig), ("adapter", AdapterConfig), ("lora", LoraConfig)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise ConfigError(f"InjectConfig.{name} must be a {cls.__name__} or None; got {type(value).__name__}.")
        for name in ("train_head", "train_biases", "train_all"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        _frozen_set(self, "kernel", _enum(Kernel, self.kernel, "kernel"))

    @property
    def has_branches(self) -> bool:
        return any(c is not None for c in (self.patt, self.adapter, self.lora))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (enums as their values), the form stored in delta files."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "__dataclass_fields__"):
                value = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(value).items()}
            elif isinstance(value, Enum):
                value = value.value
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InjectConfig":
        """Inverse of ``to_dict``; unknown keys are an error (a newer vpetl wrote the file)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"injection config has unknown fields {unknown}; it was written by a newer vpetl. Upgrade vpetl."
            )
        kwargs = dict(data)
        for name, sub in (("patt", PattConfig), ("adapter", AdapterConfig), ("lora", LoraConfig)):
            if kwargs.get(name) is not None:
                kwargs[name] = sub(**kwargs[name])
        return cls(**kwargs)


METHODS = ("patt", "adapter", "bapat", "lora", "bitfit", "linear", "full")
_WIDTH_DEFAULTS = {"patt": 128, "bapat": 128, "adapter": 64, "lora": 16}
_POSITION_METHODS = {"patt": "kv", "bapat": "kv", "lora": "qv"}


def preset(
    method: str,
    *,
    d_bottle: int | None = None,
    scale: float | None = None,
    positions: str | None = None,
    train_head: bool = True,
    zero_init: bool = False,
    kernel: Kernel | str = Kernel.AUTO,
) -> InjectConfig:
    """Map a method name and the one width knob onto an ``InjectConfig`` (paper defaults)."""
    if not isinstance(zero_init, bool):
        raise ConfigError(f"zero_init must be True or False; got {zero_init!r}.")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; accepted: {', '.join(METHODS)} (or pass an InjectConfig).")
    if d_bottle is not None and method not in _WIDTH_DEFAULTS:
        raise ConfigError(f"method {method!r} has no width; leave d_bottle=None (got {d_bottle!r}).")
    if scale is not None and method not in _WIDTH_DEFAULTS:
        raise ConfigError(f"method {method!r} has no branch scale; leave scale=None (got {scale!r}).")
    if positions is not None and method not in _POSITION_METHODS:
        raise ConfigError(
            f"positions apply to {', '.join(_POSITION_METHODS)}; method {method!r} has none "
            f"(leave positions=None, got {positions!r})."
        )
    width = _WIDTH_DEFAULTS.get(method) if d_bottle is None else d_bottle
    pos = _POSITION_METHODS.get(method) if positions is None else positions
    common = dict(method=method, train_head=train_head, kernel=kernel)
    if method == "patt":
        return InjectConfig(patt=_patt(width, scale, pos, zero_init), **common)
    if method == "bapat":
        return InjectConfig(patt=_patt(width, scale, pos, zero_init), adapter=AdapterConfig(), **common)
    if method == "adapter":
        return InjectConfig(adapter=AdapterConfig(d_bottle=width, **_maybe(scale=scale)), **common)
    if method == "lora":
        return InjectConfig(lora=LoraConfig(rank=width, positions=pos, **_maybe(scale=scale)), **common)
    if method == "bitfit":
        return InjectConfig(train_biases=True, **common)
    if method == "linear":
        return InjectConfig(**common)
    return InjectConfig(train_all=True, **common)  # "full"


def _patt(width: int, scale: float | None, positions: str, zero_init: bool) -> PattConfig:
    return PattConfig(d_bottle=width, positions=positions, zero_init=zero_init, **_maybe(scale=scale))


def _maybe(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}
