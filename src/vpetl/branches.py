"""The branch protocol shared by every method's side branches (:mod:`vpetl.methods`).

Shapes: ``x2d`` is ``(M, d_in)`` with ``M`` = all tokens of the batch flattened; an
attention projection's output ``out2d`` is ``(M, n * w)`` holding ``n`` position slots
(q, k, v) of width ``w``. A :class:`ProjectionBranch` *adds into* those slots in place
(``addmm_`` into a view), so the projection output is never copied or concatenated.

A branch knows only its own parameters and inputs; where it sits in a model is its method's
business (``Method.attach``), and whether forward reached it is the injection's
(:func:`mark_called`, read by ``vpetl.verify`` and the first-forward check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import scripting
from .options import Activation, Kernel
from .tracing import plain_path, raise_not_scriptable

if TYPE_CHECKING:
    from .projection import OutputSlots, SlotLayout

ACTIVATIONS: dict[Activation, Callable[[Tensor], Tensor]] = {
    Activation.TANH: torch.tanh,
    Activation.RELU: F.relu,
    Activation.GELU: F.gelu,
}


# While an injection checks that forward reaches every branch, the ids of the branches called
# (vpetl.inject.record_calls sets it for one forward; None otherwise).
_CALL_LOG: list[set[int] | None] = [None]


def mark_called(branch: nn.Module) -> None:
    """Log that forward reached ``branch`` (a no-op unless a check is running)."""
    log = _CALL_LOG[0]
    if log is not None:
        log.add(id(branch))


class Branch(nn.Module):
    """Base of every side branch: knows its kind and can report that forward reached it."""

    kind: str = "branch"

    def __init__(self) -> None:
        super().__init__()
        self.keep_float32 = False  # InjectConfig.branch_dtype == "float32"

    scriptable = False  # whether the modules consuming this kind can compile it (vpetl.scripting)

    def __prepare_scriptable__(self) -> "Branch":
        """``torch.jit.script`` calls this on every submodule before compiling: refuse clearly
        where :mod:`vpetl.scripting` does not cover this kind."""
        if not self.scriptable:
            raise_not_scriptable(self)
        scripting.check_ready(self)
        return self

    def _mark_called(self) -> None:
        mark_called(self)

    def place(self, device: torch.device, dtype: torch.dtype, keep_float32: bool) -> "Branch":
        """Move to ``device``; parameters in ``dtype`` (the base's), or fp32 for good with
        ``keep_float32`` (later ``.half()`` / ``.to(torch.bfloat16)`` calls leave them fp32)."""
        self.keep_float32 = keep_float32
        return self.to(device=device, dtype=torch.float32 if keep_float32 else dtype)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        if not self.keep_float32:
            return super()._apply(fn, recurse)

        def stay_float32(t: Tensor) -> Tensor:
            out = fn(t)
            return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

        return super()._apply(stay_float32, recurse)

    def _input(self, x: Tensor, like: Tensor) -> Tensor:
        """``x`` in the dtype of parameter ``like`` (fp32 branches on a half-precision base);
        autocast casts by itself."""
        if plain_path(x):  # traced or meta: dtype known only at run time; a no-op cast if equal
            return x.to(like.dtype)
        if x.dtype == like.dtype or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(like.dtype)


class ProjectionBranch(Branch):
    """A branch that adds into position slots of attention projections (PATT, LoRA).

    Subclasses set ``self.positions``, the letters of "qkv" they cover, on construction (not
    annotated here: ``torch.jit.script`` would read a string annotation as a type it cannot resolve).
    """

    def add_into_(self, x: Tensor, x2d: Tensor, out: "OutputSlots") -> None:
        """Add this branch's matmul part into the slots of ``out`` (a projection output) for
        every position it covers; biases are separate (:meth:`bias_for`) so the caller can
        fold them into the frozen projection's bias."""
        raise NotImplementedError

    def bias_for(self, letter: str) -> Tensor | None:
        """The constant this branch adds to slot ``letter`` (already scaled), or None."""
        return None

    def fused_projection(self, x2d: Tensor, weight: Tensor, bias: Tensor | None, layout: "SlotLayout",
                         kernel: Kernel) -> Tensor | None:
        """The whole projection ``x W^T + b`` with this branch added, ``(M, N)``, computed as one
        fused op; None (the default) when this branch does not do that here, and the caller adds
        it with :meth:`add_into_`. Asked of the first branch of a projection."""
        return None

    def plain_delta(self, x: Tensor, layout: "SlotLayout", out_features: int) -> Tensor:
        """What :meth:`add_into_` and :meth:`bias_for` add, as a new ``(..., out_features)``
        tensor built out of place with plain ops (zeros outside this branch's slots), for
        :mod:`vpetl.tracing`'s plain path."""
        raise NotImplementedError


def _add_product_(slot: Tensor, h: Tensor, weight_t: Tensor, alpha: float | Tensor) -> None:
    """``slot += alpha * h @ weight_t`` in place; ``slot`` is ``(M, w)`` or ``(M, H, hd)``.

    ``h`` may have fewer rows ``T`` than ``slot`` (``M = B' * T``): then its product is
    broadcast over the ``B'`` groups of ``T`` rows (PATT ``no_input``). ``alpha`` may be a
    0-dim tensor (a learnable scale), which autograd differentiates.
    """
    if h.dtype != slot.dtype:  # autocast runs the frozen projection in half precision
        h, weight_t = h.to(slot.dtype), weight_t.to(slot.dtype)
    elif weight_t.dtype != slot.dtype:
        weight_t = weight_t.to(slot.dtype)
    if h.shape[0] != slot.shape[0]:
        term = (h @ weight_t) * alpha
        slot.view(-1, h.shape[0], *slot.shape[1:]).add_(term.view(h.shape[0], *slot.shape[1:]))
    elif isinstance(alpha, Tensor):
        slot.add_((h @ weight_t).view(slot.shape) * alpha.to(slot.dtype))
    elif slot.dim() == 2:
        slot.addmm_(h, weight_t, alpha=alpha)
    else:
        slot.add_((h @ weight_t).view(slot.shape), alpha=alpha)


