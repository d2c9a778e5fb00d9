"""Frozen, validated configs for every method (the string presets live in :mod:`vpetl.presets`).

A config is the whole truth about an injection: the delta file stores it (as JSON) and
``load_delta`` rebuilds the injection from it on a fresh base model.

=====================  ==============================================================
config                 what it adds
=====================  ==============================================================
``PattConfig``         PATT beside the q/k/v projections (Eq. 9-10) and its Table 6 variants
``AdapterConfig``      AdaptFormer's adapter beside (or after) every block's MLP (Eq. 6-7)
``LoraConfig``         LoRA pairs on q/k/v
``PrefixConfig``       prefix-tuning: L learned key/value tokens per attention (Eq. 5)
``PromptConfig``       VPT: learned prompt tokens after the CLS token, shallow or deep
``InjectConfig.tune``  unfreezes base parameters by block position (Table 1)
=====================  ==============================================================
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


class PattVariant(str, Enum):
    """How PATT's ``K_p``/``V_p`` meet the attention (Table 6).

    ``ADD``: ``K = x W_k + s K_p`` (Eq. 10, the paper's PATT). ``CONCAT``: ``s K_p``/``s V_p``
    appended to K and V along the token axis (N extra keys). ``NO_INPUT``: ``K_p``/``V_p``
    computed from a learned token matrix ``P`` (``tokens x d``) instead of ``Z^{l-1}``, then added.
    """

    ADD = "add"
    CONCAT = "concat"
    NO_INPUT = "no_input"


class AdapterPlacement(str, Enum):
    """Where the adapter sits (Eq. 7): beside the MLP reading its input (``PARALLEL``), or
    after it reading its output, ``y = mlp(x) + s * adapter(mlp(x))`` (``SEQUENTIAL``)."""

    PARALLEL = "parallel"
    SEQUENTIAL = "sequential"


class TunePosition(str, Enum):
    """Base parameters of every block that method ``"tune"`` unfreezes (Table 1 rows)."""

    NORM1 = "norm1"  # LayerNorm 1, before attention
    ATTN_PROJ = "attn_proj"  # attention output projection
    ATTN_QKV = "attn_qkv"  # q/k/v projections
    ATTN_SOFTMAX = "attn_softmax"  # relative-position bias table ("Attn, SoftMax")
    NORM2 = "norm2"  # LayerNorm 2, before the MLP
    MLP_FC1 = "mlp_fc1"
    MLP_FC2 = "mlp_fc2"
    DOWNSAMPLE = "downsample"  # patch merging between stages (Swin)


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


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False; got {value!r}.")
    return value


def normalize_tune_positions(value: Any) -> tuple[TunePosition, ...]:
    """One position or an iterable of them (enums or their names) as a sorted, de-duplicated tuple."""
    items = [value] if isinstance(value, (str, TunePosition)) else value
    accepted = ", ".join(repr(p.value) for p in TunePosition)
    try:
        items = list(items)
    except TypeError:
        raise ConfigError(f"tune positions must be a position or a list of them ({accepted}); got {value!r}.") from None
    if not items:
        raise ConfigError(f"tune positions must name at least one of {accepted}; got an empty list.")
    out = {_enum(TunePosition, item, "tune position") for item in items}
    return tuple(p for p in TunePosition if p in out)


@dataclass(frozen=True)
class PattConfig:
    """Parallel attention (Eq. 9-10): ``[K_p | V_p] = act(x W_down + b_down) W_up + b_up``,
    ``K += s K_p``, ``V += s V_p``.

    ``positions`` picks the projections that receive a chunk of the up-projection, in q, k, v
    order. ``bias=None`` follows the backbone's qkv bias flag (as the reference code does).
    ``zero_init`` zero-initialises the up-projection so the model is unchanged at step 0.
    ``variant`` selects a Table 6 ablation (:class:`PattVariant`); ``NO_INPUT`` needs
    ``tokens``, the number of tokens each attention call sees (197 for ViT-B/16 at 224, 196 for
    Swin3D-B's 4x7x7 windows at 8 frames). ``learnable_scale`` makes ``s`` a trained
    parameter initialised at ``scale`` (the paper: "can be a learnable parameter").
    """

    d_bottle: int = 128
    scale: float = 0.8
    positions: str = "kv"
    activation: Activation = Activation.TANH
    zero_init: bool = False
    bias: bool | None = None
    variant: PattVariant = PattVariant.ADD
    tokens: int | None = None
    learnable_scale: bool = False

    def __post_init__(self) -> None:
        _width(self.d_bottle, "PATT d_bottle")
        _frozen_set(self, "scale", _scale(self.scale, "PATT scale"))
        _frozen_set(self, "positions", normalize_positions(self.positions, "PATT positions"))
        _frozen_set(self, "activation", _enum(Activation, self.activation, "PATT activation"))
        _flag(self.zero_init, "PATT zero_init")
        _flag(self.learnable_scale, "PATT learnable_scale")
        if self.bias is not None and not isinstance(self.bias, bool):
            raise ConfigError(f"PATT bias must be True, False or None (follow the backbone); got {self.bias!r}.")
        _frozen_set(self, "variant", _enum(PattVariant, self.variant, "PATT variant"))
        if self.variant is PattVariant.NO_INPUT:
            if self.tokens is None:
                raise ConfigError(
                    "PATT variant 'no_input' learns a token matrix P (tokens x d) in place of the input, so it "
                    "needs tokens=<tokens per attention call> (e.g. 197 for ViT-B/16 at 224 px, 196 for "
                    "Swin3D-B windows at 8 frames); got tokens=None."
                )
            _width(self.tokens, "PATT tokens")
        elif self.tokens is not None:
            raise ConfigError(
                f"PATT tokens applies only to variant 'no_input'; got tokens={self.tokens!r} with variant "
                f"{self.variant.value!r}. Leave tokens=None."
            )
        if self.variant is PattVariant.CONCAT and self.positions != "kv":
            raise ConfigError(
                "PATT variant 'concat' appends K_p and V_p as extra tokens, which needs both a key and a value: "
                f"positions must be 'kv'; got {self.positions!r}."
            )


@dataclass(frozen=True)
class AdapterConfig:
    """AdaptFormer's adapter (Eq. 6-7): parallel ``mlp(x) + s * up(act(down(x)))`` reading the
    MLP's input, or sequential ``y + s * up(act(down(y)))`` with ``y = mlp(x)``; ``up`` is
    zero-initialised, so the model is unchanged at step 0."""

    d_bottle: int = 64
    scale: float = 0.1
    activation: Activation = Activation.RELU
    placement: AdapterPlacement = AdapterPlacement.PARALLEL
    learnable_scale: bool = False

    def __post_init__(self) -> None:
        _width(self.d_bottle, "Adapter d_bottle")
        _frozen_set(self, "scale", _scale(self.scale, "Adapter scale"))
        _frozen_set(self, "activation", _enum(Activation, self.activation, "Adapter activation"))
        _frozen_set(self, "placement", _enum(AdapterPlacement, self.placement, "Adapter placement"))
        _flag(self.learnable_scale, "Adapter learnable_scale")


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
class PrefixConfig:
    """Prefix-tuning (Eq. 5): ``length`` learned tokens ``P (L, d)`` per attention, reparameterised
    as ``[P_k | P_v] = up(act(down(P)))`` with ``down: d -> d_bottle``, ``up: d_bottle -> 2d``, and
    prepended to K and V along the token axis (window attention: bias and mask padded with 0)."""

    length: int = 10
    d_bottle: int = 128
    activation: Activation = Activation.TANH

    def __post_init__(self) -> None:
        _width(self.length, "prefix length")
        _width(self.d_bottle, "prefix d_bottle")
        _frozen_set(self, "activation", _enum(Activation, self.activation, "prefix activation"))


@dataclass(frozen=True)
class PromptConfig:
    """Visual prompt tuning: ``length`` learned tokens inserted after the CLS (prefix) tokens;
    ``deep=False`` only before the first block, ``deep=True`` before every block (each block's
    prompts replace the previous ones). Prompts are removed after the last block."""

    length: int = 10
    deep: bool = False

    def __post_init__(self) -> None:
        _width(self.length, "prompt length")
        _flag(self.deep, "prompt deep")


@dataclass(frozen=True)
class InjectConfig:
    """Everything ``inject`` does: which branches, which base parameters train, which kernel."""

    method: str = "custom"
    patt: PattConfig | None = None
    adapter: AdapterConfig | None = None
    lora: LoraConfig | None = None
    prefix: PrefixConfig | None = None
    prompt: PromptConfig | None = None
    tune: tuple[TunePosition, ...] = ()
    train_head: bool = True
    train_biases: bool = False
    train_all: bool = False
    kernel: Kernel = Kernel.AUTO
    branch_dtype: BranchDtype = BranchDtype.FOLLOW

    def __post_init__(self) -> None:
        for name, cls in SUB_CONFIGS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise ConfigError(f"InjectConfig.{name} must be a {cls.__name__} or None; got {type(value).__name__}.")
        for name in ("train_head", "train_biases", "train_all"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        _frozen_set(self, "kernel", _enum(Kernel, self.kernel, "kernel"))
        _frozen_set(self, "branch_dtype", _enum(BranchDtype, self.branch_dtype, "branch_dtype"))
        if self.tune != ():
            _frozen_set(self, "tune", normalize_tune_positions(self.tune))

    @property
    def has_branches(self) -> bool:
        return any(getattr(self, name) is not None for name in SUB_CONFIGS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (enums as their values), the form stored in delta files."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "__dataclass_fields__"):
                value = {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(value).items()}
            elif isinstance(value, Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = [v.value if isinstance(v, Enum) else v for v in value]
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
        for name, sub in SUB_CONFIGS.items():
            if kwargs.get(name) is not None:
                if not isinstance(kwargs[name], dict):
                    raise ConfigError(f"injection config field {name!r} must be a mapping; got {kwargs[name]!r}.")
                kwargs[name] = sub(**kwargs[name])
        if "tune" in kwargs:
            kwargs["tune"] = normalize_tune_positions(kwargs["tune"]) if kwargs["tune"] else ()
        return cls(**kwargs)


SUB_CONFIGS: dict[str, type] = {
    "patt": PattConfig, "adapter": AdapterConfig, "lora": LoraConfig, "prefix": PrefixConfig, "prompt": PromptConfig,
}


