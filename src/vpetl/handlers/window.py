"""Shape (d): torchvision's window attention (Swin, SwinV2, Swin3D = Video Swin).

torchvision's ``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2`` and
``ShiftedWindowAttention3d`` own a ``qkv`` ``nn.Linear`` but never call it: their forward
passes ``self.qkv.weight`` to a functional ``shifted_window_attention(_3d)``. Wrapping the
Linear would be bypassed silently, so this handler claims those modules (it is tried before
the fused-qkv handler) and swaps the module's class for a subclass whose forward computes
the window attention itself (:mod:`vpetl.handlers._window_math`), with the q/k/v
projection going through :func:`vpetl.projection.project` so that the branches are added
into the projection's slots (Eq. 10)::

    X         = partition(roll(pad(x), -s))                        (B*nW, N, C) window tokens
    [Q|K|V]   = X W_qkv^T + b_qkv
    K        += s_p * (tanh(X W_down^T + b_down) W_up,k^T + b_up,k)    PATT (positions "kv")
    V        += s_p * (tanh(X W_down^T + b_down) W_up,v^T + b_up,v)
    Q, V     += scale * X A_p^T B_p^T                               LoRA (positions "qv")
    y         = unpad(roll(unpartition(proj(softmax(Q K^T / sqrt(hd) + R + M) V)), +s))

PATT and LoRA read the same windowed, zero-padded tokens ``X`` as the frozen projection
(as the paper's reference code does, where the branch sits inside the window attention).

Prefix-tuning and PATT ``concat`` add keys and values along the token axis instead
(:meth:`WindowAttentionHandler.wire_extra_keys`): ``K' = [P_k | K | s K_p]`` per window, the
relative-position bias padded with 0 and the shift mask with 0 (prefix) or the source
token's column (appended keys), see :mod:`vpetl.handlers._window_math`.

The module keeps its Parameters, buffers and state-dict keys; only ``__class__`` and plain
attributes (``_vpetl_branches``, the branches in call order; ``_vpetl_extra_kv``, the
token-axis branches) change, all logged in the injection record so ``vpetl.unload`` restores
the torchvision class exactly.

Variants, each matching its torchvision original to float rounding when the branches add
nothing:

* ``swin`` (Swin v1, 2D): dot-product attention ``Q K^T / sqrt(hd)``, learned bias table ``R``;
  the window is fixed, an axis whose padded length equals the window is not shifted.
* ``swin_v2`` (SwinV2, 2D): cosine attention ``cos(Q, K) * exp(min(tau, log 100))``,
  ``R = 16 * sigmoid(cpb_mlp(coords))``; the K third of the frozen qkv bias is treated as
  zero (as torchvision does). A PATT/LoRA constant added to K is kept.
* ``swin3d`` (Video Swin, 3D): as ``swin``; an axis whose input length is at most the window
  shrinks the window to that length and is not shifted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

from .. import scripting
from ..branches import ProjectionBranch
from ..options import Kernel
from ..projection import KERNEL_ATTR
from ..derived import Derived, derived_class
from ..errors import InjectionError
from ..record import InjectionRecord
from ..tracing import raise_not_scriptable
from ._extra_keys import EXTRA_KV_ATTR
from ._window_math import QKV_LAYOUT, window_attention
from ._window_script import fit_window
from ._window_script import window_attention as scripted_window_attention
from .base import AttentionHandler, ProjectionSpec

BRANCHES_ATTR = "_vpetl_branches"
CLASS_PREFIX = "Vpetl"


@dataclass(frozen=True)
class WindowVariant:
    """How one torchvision window-attention class computes its attention."""

    name: str
    axes: int  # spatial axes: 2 (images) or 3 (video)
    cosine: bool  # SwinV2 cosine attention with logit_scale; the K third of the qkv bias is zero
    shrink_window: bool  # Swin3D: an axis no longer than the window shrinks the window to it

    def geometry(self, module: nn.Module, sizes: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """The (window, shift) torchvision uses for an input of spatial ``sizes``."""
        return fit_window(list(sizes), list(module.window_size), list(module.shift_size), self.shrink_window)


SWIN = WindowVariant("swin", axes=2, cosine=False, shrink_window=False)
SWIN_V2 = WindowVariant("swin_v2", axes=2, cosine=True, shrink_window=False)
SWIN_3D = WindowVariant("swin3d", axes=3, cosine=False, shrink_window=True)

# (torchvision module, class name) -> variant; the class's own forward must be torchvision's.
_KNOWN = {
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): SWIN,
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"): SWIN_V2,
    ("torchvision.models.video.swin_transformer", "ShiftedWindowAttention3d"): SWIN_3D,
}
_known_cache: dict[type, WindowVariant] | None = None


def _known_classes() -> dict[type, WindowVariant]:
    """torchvision's window-attention classes -> variant; empty until torchvision is imported
    (a model built from those classes has imported it, so no import is forced here)."""
    global _known_cache
    if _known_cache is not None:
        return _known_cache
    if "torchvision" not in sys.modules:
        return {}
    import importlib

    found: dict[type, WindowVariant] = {}
    for (module_name, class_name), variant in _KNOWN.items():
        try:
            found[getattr(importlib.import_module(module_name), class_name)] = variant
        except (ImportError, AttributeError):  # pragma: no cover - other torchvision versions
            continue
    _known_cache = found
    return found


def variant_of(cls: type) -> WindowVariant | None:
    """The variant whose torchvision forward ``cls`` runs, or None (not window attention,
    or a subclass that overrides forward)."""
    for known, variant in _known_classes().items():
        if issubclass(cls, known) and cls.forward is known.forward:
            return variant
    return None


class _ShrinkingWindowBias:
    """Swin3D: the relative-position bias of the window fitted to the input."""

    def _vpetl_position_bias(self, window: List[int]) -> Tensor:
        return self.get_relative_position_bias(window)


class _FixedWindowBias:
    """Swin, SwinV2: the bias of the module's own window."""

    def _vpetl_position_bias(self, window: List[int]) -> Tensor:
        return self.get_relative_position_bias()


class _CosineScores:
    """SwinV2: cosine attention with ``logit_scale``; the K third of the qkv bias is zero."""

    def _vpetl_logit_scale(self) -> Optional[Tensor]:
        return self.logit_scale

    def _vpetl_qkv_bias(self) -> Optional[Tensor]:
        bias = self.qkv.bias
        if bias is None:
            return None
        third = bias.shape[0] // 3
        return torch.cat((bias[:third], torch.zeros_like(bias[third : 2 * third]), bias[2 * third :]))


class _DotScores:
    """Swin, Swin3D: scaled dot-product attention."""

    def _vpetl_logit_scale(self) -> Optional[Tensor]:
        return None

    def _vpetl_qkv_bias(self) -> Optional[Tensor]:
        return self.qkv.bias


class _WindowForward(Derived):
    """Mixin: the window attention computed by :func:`window_forward` (one node for
    ``torch.fx``); under ``torch.jit.script``, by :mod:`vpetl.handlers._window_script`."""

    class_prefix = CLASS_PREFIX

    @classmethod
    def derived_namespace(cls, base: type) -> dict[str, Any]:
        variant = variant_of(base)
        if variant is None:  # pragma: no cover - callers check first
            raise InjectionError(f"{base.__name__} is not a torchvision window attention vpetl can adapt.")
        bias = _ShrinkingWindowBias if variant.shrink_window else _FixedWindowBias
        scores = _CosineScores if variant.cosine else _DotScores
        return {
            "_vpetl_variant": variant,
            "_vpetl_position_bias": bias._vpetl_position_bias,
            "_vpetl_logit_scale": scores._vpetl_logit_scale,
            "_vpetl_qkv_bias": scores._vpetl_qkv_bias,
        }

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._vpetl_scripted_forward(x)
        return self._vpetl_eager_forward(x)

    @torch.jit.unused
    def _vpetl_eager_forward(self, x: Tensor) -> Tensor:
        return window_forward(self, x)

    def _vpetl_scripted_forward(self, x: Tensor) -> Tensor:
        """Window and shift fitted to the input as torchvision does, then the scripted attention."""
        ints: List[int] = self._vpetl_script_ints
        sizes: List[int] = []
        for i in range(len(self.window_size)):
            sizes.append(x.shape[1 + i])
        window, shift = fit_window(sizes, self.window_size, self.shift_size, ints[0] == 1)
        return scripted_window_attention(
            x, self.qkv.weight, self._vpetl_qkv_bias(), self.proj.weight, self.proj.bias,
            self._vpetl_position_bias(window), window, shift, self.num_heads, self._vpetl_logit_scale(),
            self.attention_dropout, self.dropout, self.training, self._vpetl_script_tensors, ints,
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script``: the branches as the plan the scripted attention reads."""
        extra_kv = self.__dict__.get(EXTRA_KV_ATTR, ())
        if len(extra_kv) > 1 or any(b.kind != "prefix" for b in extra_kv):
            raise_not_scriptable(self)
        branches = self.__dict__.get(BRANCHES_ATTR, ())
        tensors, ints = scripting.projection_plan(branches, QKV_LAYOUT, self.qkv.out_features)
        head = [int(type(self)._vpetl_variant.shrink_window), 0, 0, 0]
        tensors = [self.qkv.weight.new_zeros(0), *tensors]
        if extra_kv:
            prefix_tensors, prefix_ints = scripting.prefix_plan(extra_kv[0])
            tensors += prefix_tensors
            head[1:] = [1, *prefix_ints]
        scripting.store_plan(self, tensors, head + ints)
        return self


def window_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Window attention with the injected branches added into Q/K/V (see the module docstring).

    Args:
        x: ``(B, H, W, C)`` for Swin/SwinV2, ``(B, T, H, W, C)`` for Swin3D.
    Returns:
        a tensor of the same shape.
    """
    variant: WindowVariant = type(self)._vpetl_variant
    if x.dim() != variant.axes + 2:
        raise ValueError(
            f"{type(self).__name__} expects a channels-last input with {variant.axes} spatial axes "
            f"({'(B, H, W, C)' if variant.axes == 2 else '(B, T, H, W, C)'}); got shape {tuple(x.shape)}."
        )
    window, shift = variant.geometry(self, tuple(x.shape[1:-1]))
    if variant.shrink_window:
        relative_position_bias = self.get_relative_position_bias(window)
    else:
        relative_position_bias = self.get_relative_position_bias()
    qkv_bias = self.qkv.bias
    if variant.cosine and qkv_bias is not None:
        third = qkv_bias.numel() // 3
        qkv_bias = torch.cat((qkv_bias[:third], qkv_bias.new_zeros(third), qkv_bias[2 * third :]))
    return window_attention(
        x,
        qkv_weight=self.qkv.weight,
        qkv_bias=qkv_bias,
        proj=self.proj,
        relative_position_bias=relative_position_bias,
        window=window,
        shift=shift,
        num_heads=self.num_heads,
        branches=self.__dict__.get(BRANCHES_ATTR, ()),
        kernel=self.__dict__.get(KERNEL_ATTR, Kernel.AUTO),
        extra_kv=self.__dict__.get(EXTRA_KV_ATTR, ()),
        logit_scale=self.logit_scale if variant.cosine else None,
        attention_dropout=self.attention_dropout,
        dropout=self.dropout,
        training=self.training,
    )


# torch.fx records a call to this function instead of tracing into it (as torchvision wraps
# its own window-attention functions): padding and shifts branch on the input's size.
torch.fx.wrap("window_forward")


def branched_class(cls: type) -> type:
    """``cls`` with :class:`_WindowForward` (:func:`vpetl.derived.derived_class`), named
    ``Vpetl<cls name>`` in this module."""
    return derived_class(_WindowForward, cls)


def __getattr__(name: str) -> Any:
    """``Vpetl<torchvision class>`` by name: whole-model pickles written by vpetl 0.1.0 name it."""
    if name.startswith(CLASS_PREFIX):
        import importlib

        for (module_name, class_name), _ in _KNOWN.items():
            if CLASS_PREFIX + class_name == name:
                return branched_class(getattr(importlib.import_module(module_name), class_name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class WindowAttentionHandler(AttentionHandler):
    """torchvision ``ShiftedWindowAttention`` (Swin), ``ShiftedWindowAttentionV2`` (SwinV2)
    and ``ShiftedWindowAttention3d`` (Swin3D / Video Swin), and subclasses that keep their
    forward. One fused ``qkv`` (``C -> 3C``, rows q, k, v) whose slots all have width ``C``."""

    name = "torchvision-window"

    def match(self, module: nn.Module) -> bool:
        known = _known_classes()
        return bool(known) and isinstance(module, tuple(known))

    def _check(self, module: nn.Module) -> WindowVariant:
        """The module's variant; ``InjectionError`` for anything this handler cannot reproduce."""
        cls = type(module)
        if issubclass(cls, _WindowForward):
            raise InjectionError(
                f"{cls.__name__} is already injected by vpetl; call vpetl.unload(model) before injecting again."
            )
        variant = variant_of(cls)
        if variant is None:
            raise InjectionError(
                f"{cls.__name__} subclasses torchvision window attention but overrides forward, so vpetl "
                "cannot know how it uses its qkv weight (torchvision's forward reads qkv.weight itself; "
                "a wrapped Linear would never be called). Keep torchvision's forward in the subclass, or "
                "open an issue with the class so a handler can be added."
            )
        qkv = module._modules.get("qkv")
        if not isinstance(qkv, nn.Linear) or not isinstance(qkv.weight, Tensor):
            raise InjectionError(
                f"{cls.__name__}.qkv should be an nn.Linear (dim -> 3*dim); found {type(qkv).__name__}. "
                "vpetl adapts torchvision's window attention as built by torchvision."
            )
        if qkv.out_features != 3 * qkv.in_features:
            raise InjectionError(
                f"{cls.__name__}.qkv maps {qkv.in_features} -> {qkv.out_features} features; torchvision window "
                f"attention needs {qkv.in_features} -> {3 * qkv.in_features} (q, k, v of the input width)."
            )
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int) or heads < 1 or qkv.in_features % heads:
            raise InjectionError(
                f"{cls.__name__}.num_heads is {heads!r}; it must be a positive integer dividing the width "
                f"{qkv.in_features}."
            )
        for attr in ("window_size", "shift_size"):
            value = getattr(module, attr, None)
            if value is None or len(value) != variant.axes:
                raise InjectionError(
                    f"{cls.__name__}.{attr} is {value!r}; {variant.name} window attention needs "
                    f"{variant.axes} values (one per spatial axis)."
                )
        if not isinstance(module._modules.get("proj"), nn.Module):
            raise InjectionError(f"{cls.__name__} has no output projection module 'proj'.")
        return variant

    def spec(self, module: nn.Module) -> ProjectionSpec:
        """``d_in = C``, ``widths = {q: C, k: C, v: C}``, bias = the qkv Linear has one."""
        self._check(module)
        qkv = module.qkv
        width = qkv.out_features // 3
        return ProjectionSpec(
            d_in=qkv.in_features,
            widths={c: width for c in "qkv"},
            bias=qkv.bias is not None,
            device=qkv.weight.device,
            dtype=qkv.weight.dtype,
        )

    def wire(self, module: nn.Module, branches: list[ProjectionBranch], record: InjectionRecord) -> None:
        """Swap ``module``'s class for its ``Vpetl...`` subclass and hand it ``branches``
        (each called once per forward on the windowed tokens; PATT computes ``h`` once)."""
        self._check(module)
        record.set_attr(module, BRANCHES_ATTR, tuple(branches))
        record.set_attr(module, KERNEL_ATTR, record.config.kernel)
        record.swap_class(module, branched_class(type(module)))

    def wire_extra_keys(self, module: nn.Module, branches: list, record: InjectionRecord) -> None:
        """Prefix / PATT ``concat`` keys joined to every window's K and V (bias and shift mask
        padded, see :mod:`vpetl.handlers._window_math`); the class is swapped unless
        :meth:`wire` already did, the branches go in the plain attribute ``_vpetl_extra_kv``."""
        if not isinstance(module, _WindowForward):
            self._check(module)
            record.swap_class(module, branched_class(type(module)))
        record.set_attr(module, EXTRA_KV_ATTR, tuple(branches))

    def weight_rows(self, module: nn.Module, letter: str) -> Tensor:
        """Rows of ``qkv.weight`` producing ``letter`` (``(C, C)`` view), for ``vpetl.merge``."""
        return QKV_LAYOUT.rows(module.qkv.weight, letter)
