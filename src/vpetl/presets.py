"""The string presets of ``vpetl.inject``: a method name and a few knobs -> an ``InjectConfig``.

Paper defaults (DESIGN.md §1):

============  ===============================================================  =========
method        what trains                                                      d_bottle
============  ===============================================================  =========
``patt``      PATT(r, s=0.8, tanh, positions "kv") + head                      128
``adapter``   Adapter(r, s=0.1, ReLU, parallel to the MLP) + head              64
``bapat``     Adapter(64, s=0.1) + PATT(r, s=0.8) + head                       128
``lora``      LoRA(r) on Q and V, separate pairs, scale 1 + head               16
``prefix``    L=10 prefix tokens through d -> r -> 2d (tanh) per attention     128
``vpt``       L=10 prompt tokens after CLS, shallow (``deep=True``: per block)  --
``tune``      the base parameters at ``positions`` (Table 1) + head            --
``bitfit``    every bias of the base + head                                    --
``linear``    head only ("tune FC", linear probe)                              --
``full``      every parameter                                                  --
============  ===============================================================  =========

Each option applies to the methods listed in ``OPTIONS``; passing it to another method is an
error rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

from .config import (
    AdapterConfig,
    InjectConfig,
    Kernel,
    LoraConfig,
    PattConfig,
    PrefixConfig,
    PromptConfig,
    normalize_tune_positions,
)
from .errors import ConfigError

METHODS = ("patt", "adapter", "bapat", "lora", "prefix", "vpt", "tune", "bitfit", "linear", "full")
_WIDTH_DEFAULTS = {"patt": 128, "bapat": 128, "adapter": 64, "lora": 16, "prefix": 128}
_LETTER_POSITIONS = {"patt": "kv", "bapat": "kv", "lora": "qv"}

# option -> the methods it applies to
OPTIONS: dict[str, tuple[str, ...]] = {
    "d_bottle": tuple(_WIDTH_DEFAULTS),
    "scale": ("patt", "bapat", "adapter", "lora"),
    "positions": ("patt", "bapat", "lora", "tune"),
    "zero_init": ("patt", "bapat"),
    "length": ("prefix", "vpt"),
    "deep": ("vpt",),
    "variant": ("patt", "bapat"),
    "tokens": ("patt", "bapat"),
    "activation": ("patt", "bapat", "adapter", "prefix"),
    "learnable_scale": ("patt", "bapat", "adapter"),
    "placement": ("adapter", "bapat"),
    "branch_dtype": ("patt", "bapat", "adapter", "lora", "prefix", "vpt"),
}


def preset(
    method: str,
    *,
    d_bottle: int | None = None,
    scale: float | None = None,
    positions: Any = None,
    train_head: bool = True,
    zero_init: bool | None = None,
    kernel: Kernel | str = Kernel.AUTO,
    length: int | None = None,
    deep: bool | None = None,
    variant: Any = None,
    tokens: int | None = None,
    activation: Any = None,
    learnable_scale: bool | None = None,
    placement: Any = None,
    branch_dtype: Any = None,
) -> InjectConfig:
    """Map a method name and its knobs onto an ``InjectConfig`` (paper defaults where ``None``).

    ``positions`` is a string of letters from "qkv" for patt/bapat/lora, and one or more
    :class:`~vpetl.TunePosition` (or their names, e.g. ``["attn_qkv", "mlp_fc1"]``) for tune.
    With bapat, ``activation``/``variant``/``learnable_scale`` shape the PATT branch and
    ``placement`` the adapter (which keeps the paper's 64 / 0.1). ``branch_dtype="float32"``
    keeps the trained parameters in fp32 when the base runs in bf16/fp16.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; accepted: {', '.join(METHODS)} (or pass an InjectConfig).")
    if zero_init is False:
        zero_init = None  # "no zero init" is every method's default
    given = {
        "d_bottle": d_bottle, "scale": scale, "positions": positions, "zero_init": zero_init, "length": length,
        "deep": deep, "variant": variant, "tokens": tokens, "activation": activation,
        "learnable_scale": learnable_scale, "placement": placement, "branch_dtype": branch_dtype,
    }
    for name, value in given.items():
        if value is not None and method not in OPTIONS[name]:
            raise ConfigError(
                f"option {name}={value!r} does not apply to method {method!r}; it applies to "
                f"{', '.join(OPTIONS[name])}. Leave it out (None)."
            )
    common = dict(method=method, train_head=train_head, kernel=kernel, **_given(given, "branch_dtype"))
    width = _WIDTH_DEFAULTS.get(method) if d_bottle is None else d_bottle
    if method in ("patt", "bapat"):
        patt = PattConfig(
            d_bottle=width, positions="kv" if positions is None else positions,
            **_given(given, "scale", "zero_init", "variant", "tokens", "activation", "learnable_scale"),
        )
        adapter = AdapterConfig(**_given(given, "placement")) if method == "bapat" else None
        return InjectConfig(patt=patt, adapter=adapter, **common)
    if method == "adapter":
        adapter = AdapterConfig(d_bottle=width, **_given(given, "scale", "activation", "learnable_scale", "placement"))
        return InjectConfig(adapter=adapter, **common)
    if method == "lora":
        return InjectConfig(lora=LoraConfig(rank=width, positions="qv" if positions is None else positions, **_given(given, "scale")), **common)
    if method == "prefix":
        return InjectConfig(prefix=PrefixConfig(d_bottle=width, **_given(given, "length", "activation")), **common)
    if method == "vpt":
        return InjectConfig(prompt=PromptConfig(**_given(given, "length", "deep")), **common)
    if method == "tune":
        if positions is None:
            raise ConfigError(
                "method 'tune' needs positions=[...] naming what to unfreeze (Table 1): "
                "norm1, attn_proj, attn_qkv, attn_softmax, norm2, mlp_fc1, mlp_fc2, downsample."
            )
        return InjectConfig(tune=normalize_tune_positions(positions), **common)
    if method == "bitfit":
        return InjectConfig(train_biases=True, **common)
    if method == "linear":
        return InjectConfig(**common)
    return InjectConfig(train_all=True, **common)  # "full"


def _given(values: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: values[name] for name in names if values[name] is not None}
