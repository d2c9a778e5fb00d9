"""The side branches as plain modules, with no knowledge of any model.

Shapes: ``x2d`` is ``(M, d_in)`` with ``M`` = all tokens of the batch flattened; an
attention projection's output ``out2d`` is ``(M, n * w)`` holding ``n`` position slots
(q, k, v) of width ``w``. Branches *add into* those slots in place (``addmm_`` into a view),
so the projection output is never copied or concatenated.

* :class:`PattBranch` (Eq. 9-10): ``h = act(x W_down^T + b_down)``, ``(M, r)``;
  slot ``p`` += ``s * (h W_up[p]^T + b_up[p])``. One branch per attention block, shared
  by all positions (the hidden ``h`` is computed once per input). Table 6 variants:
  ``no_input`` reads a learned ``P (T, d)`` instead of ``x`` (``h`` is ``(T, r)``, broadcast
  over the batch and windows); ``concat`` returns ``s K_p``, ``s V_p`` from
  :meth:`PattBranch.keys_values` for the attention to append along the token axis.
* :class:`LoraBranch`: per position ``p`` a pair ``A_p (r, d_in)``, ``B_p (w, r)``;
  slot ``p`` += ``scale * (x A_p^T) B_p^T``. No bias; ``B`` zero-initialised.
* :class:`AdapterBranch` (Eq. 6-7): ``s * (act(x W_down^T + b_down) W_up^T + b_up)``,
  ``(M, d)``, added to the MLP's output; ``W_up`` and both biases zero-initialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, scripting
from .tracing import plain_path, raise_not_scriptable
from .config import Activation, AdapterConfig, AdapterPlacement, Kernel, LoraConfig, PattConfig, PattVariant

if TYPE_CHECKING:
    from .projection import OutputSlots, SlotLayout

ACTIVATIONS: dict[Activation, Callable[[Tensor], Tensor]] = {
    Activation.TANH: torch.tanh,
    Activation.RELU: F.relu,
    Activation.GELU: F.gelu,
}


class Branch(nn.Module):
    """Base of every side branch: knows its kind and can report that forward reached it."""

    kind: str = "branch"

    def __init__(self) -> None:
        super().__init__()
        self._call_log: set | None = None  # set by vpetl.inject.record_calls while checking
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
        if self._call_log is not None:
            self._call_log.add(id(self))

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


class PattBranch(ProjectionBranch):
    """PATT: one shared down-projection ``d_in -> r`` and up-projection ``r -> sum(widths)``.

    ``widths`` maps each position letter to the width of its slot (``d`` for ViT). The
    up-projection's rows are the positions' chunks in q, k, v order, so for "kv" the first
    ``d`` rows produce ``K_p`` and the next ``d`` rows ``V_p`` (Eq. 9).
    """

    kind = "patt"
    scriptable = True
    placement = "append"  # where the ``concat`` variant's keys go (see vpetl.token_branches)

    def __init__(self, d_in: int, widths: Mapping[str, int], config: PattConfig, bias: bool, consumers: int = 1):
        super().__init__()
        self.positions = config.positions
        self.variant = config.variant
        self.scale = config.scale
        if config.learnable_scale:
            self.learned_scale = nn.Parameter(torch.tensor(float(config.scale)))
        else:
            self.learned_scale = None
        self.activation = config.activation
        self.kernel = Kernel.AUTO  # set by inject from InjectConfig.kernel
        if config.variant is PattVariant.NO_INPUT:  # P stands in for Z^{l-1}; init like a position embedding
            self.tokens = nn.Parameter(torch.empty(config.tokens, d_in))
            nn.init.normal_(self.tokens, std=0.02)
        self.down = nn.Linear(d_in, config.d_bottle, bias=bias)
        self.up = nn.Linear(config.d_bottle, sum(widths[c] for c in self.positions), bias=bias)
        if config.zero_init:
            nn.init.zeros_(self.up.weight)
            if self.up.bias is not None:
                nn.init.zeros_(self.up.bias)
        self._rows: dict[str, slice] = {}
        start = 0
        for c in self.positions:
            self._rows[c] = slice(start, start + widths[c])
            start += widths[c]
        # Separate q/k/v Linears share one hidden h: cache it per input for `consumers` calls.
        self._consumers = consumers
        self._cache: tuple[Tensor, Tensor] | None = None
        self._calls = 0

    @property
    def fusable(self) -> bool:
        """True when the branch is Eq. 9-10 with a fixed scale, which the fused kernels cover."""
        return self.variant is PattVariant.ADD and self.learned_scale is None

    def scale_value(self) -> float | Tensor:
        return self.scale if self.learned_scale is None else self.learned_scale

    def set_consumers(self, count: int) -> None:
        """How many projections read ``h`` per forward (1 for a fused qkv, 2 for separate K, V)."""
        self._consumers = max(1, count)
        self._cache = None
        self._calls = 0

    def hidden(self, x: Tensor, x2d: Tensor) -> Tensor:
        """``h = act(x W_down^T + b_down)``, ``(M, r)``; computed once per input tensor.

        With several consumer projections, ``h`` is cached for the next consumer reading the
        same tensor; the cache is dropped once all consumers of one forward have run, so no
        activation outlives its attention call (q may read another input than k and v).
        """
        if self.variant is PattVariant.NO_INPUT:
            tokens = x.shape[-2] if x.dim() >= 2 else 1
            if tokens != self.tokens.shape[0]:
                raise RuntimeError(
                    f"PATT variant 'no_input' was built for {self.tokens.shape[0]} tokens per attention call "
                    f"(PattConfig.tokens) but this call has {tokens} (input shape {tuple(x.shape)}); inject again "
                    f"with tokens={tokens}."
                )
            return ACTIVATIONS[self.activation](self.down(self.tokens))
        if self._consumers == 1:
            return ACTIVATIONS[self.activation](self.down(self._input(x2d, self.down.weight)))
        cache = self._cache
        if cache is not None and cache[0] is x:
            h = cache[1]
        else:
            h = ACTIVATIONS[self.activation](self.down(self._input(x2d, self.down.weight)))
            self._cache = (x, h)
        self._calls += 1
        if self._calls >= self._consumers:
            self._calls, self._cache = 0, None
        return h

    def add_into_(self, x: Tensor, x2d: Tensor, out: "OutputSlots") -> None:
        self._mark_called()
        h = self.hidden(x, x2d)
        for letters in out.runs(self.positions):  # "kv" of a fused qkv: one (M, 2d) GEMM
            rows = slice(self._rows[letters[0]].start, self._rows[letters[-1]].stop)
            _add_product_(out.view(letters), h, self.up.weight[rows].t(), self.scale_value())

    def plain_delta(self, x: Tensor, layout: "SlotLayout", out_features: int) -> Tensor:
        """``s * (h U^T + c)``, ``(..., out_features)``: ``h`` ``(..., r)`` from ``x`` (or
        ``(T, r)`` from the learned tokens, broadcast over the batch), ``U``/``c`` the up rows
        and bias at this layout's slots, zeros elsewhere."""
        self._mark_called()
        source = self.tokens if self.variant is PattVariant.NO_INPUT else self._input(x, self.down.weight)
        h = ACTIVATIONS[self.activation](self.down(source))
        letters = [c for c in self.positions if c in layout.letters]
        rank = (self.down.out_features,)
        up = layout.scatter_rows({c: self.up.weight[self._rows[c]] for c in letters}, out_features, rank)
        bias = None
        if self.up.bias is not None:
            bias = layout.scatter_rows({c: self.up.bias[self._rows[c]] for c in letters}, out_features)
        return F.linear(h, up, bias) * self.scale_value()

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Variant ``concat``: ``s K_p``, ``s V_p``, each ``(..., N, w)`` from ``x (..., N, d)``,
        appended to K and V along the token axis by the attention handler."""
        self._mark_called()
        kv = self.up(ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))) * self.scale_value()
        if plain_path(x) or kv.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            kv = kv.to(x.dtype)
        return kv[..., self._rows["k"]], kv[..., self._rows["v"]]

    def bias_for(self, letter: str) -> Tensor | None:
        if self.up.bias is None or letter not in self._rows:
            return None
        return self.up.bias[self._rows[letter]] * self.scale_value()

    def extra_repr(self) -> str:
        learned = ", learnable_scale=True" if self.learned_scale is not None else ""
        return (
            f"positions={self.positions!r}, variant={self.variant.value}, scale={self.scale}{learned}, "
            f"activation={self.activation.value}"
        )


class LoraBranch(ProjectionBranch):
    """LoRA with a separate low-rank pair per position (``q`` and ``v`` in the paper).

    Children are named by letter, each with ``down`` (A, ``r x d_in``, Kaiming-uniform) and
    ``up`` (B, ``w x r``, zeros), so keys read ``...vpetl_lora.q.down.weight``.
    """

    kind = "lora"
    scriptable = True

    def __init__(self, d_in: int, widths: Mapping[str, int], config: LoraConfig):
        super().__init__()
        self.positions = config.positions
        self.scale = config.scale
        for c in self.positions:
            pair = nn.Module()
            pair.down = nn.Linear(d_in, config.rank, bias=False)
            pair.up = nn.Linear(config.rank, widths[c], bias=False)
            nn.init.kaiming_uniform_(pair.down.weight, a=math.sqrt(5))
            nn.init.zeros_(pair.up.weight)
            self.add_module(c, pair)

    def pair(self, letter: str) -> nn.Module:
        return getattr(self, letter)

    def add_into_(self, x: Tensor, x2d: Tensor, out: "OutputSlots") -> None:
        self._mark_called()
        for c in self.positions:
            if c in out.letters:
                pair = self.pair(c)
                _add_product_(out.view(c), pair.down(self._input(x2d, pair.down.weight)), pair.up.weight.t(), self.scale)

    def plain_delta(self, x: Tensor, layout: "SlotLayout", out_features: int) -> Tensor:
        """``scale * sum_p (x A_p^T) B_p^T`` with each ``B_p`` at slot ``p``'s output columns."""
        self._mark_called()
        delta = None
        for c in self.positions:
            if c in layout.letters:
                pair = self.pair(c)
                up = layout.scatter_rows({c: pair.up.weight}, out_features, (pair.down.out_features,))
                term = F.linear(pair.down(self._input(x, pair.down.weight)), up)
                delta = term if delta is None else delta + term
        return delta * self.scale

    def delta_weight(self, letter: str) -> Tensor:
        """``scale * B A``, ``(w, d_in)``: what merging adds to the frozen weight's rows."""
        pair = self.pair(letter)
        return (pair.up.weight @ pair.down.weight) * self.scale

    def extra_repr(self) -> str:
        return f"positions={self.positions!r}, scale={self.scale}"


class AdapterBranch(Branch):
    """AdaptFormer adapter: ``s * up(act(down(x)))``; identity at init (zero ``up``, zero biases)."""

    kind = "adapter"
    scriptable = True

    def __init__(self, d_in: int, config: AdapterConfig, d_out: int | None = None):
        super().__init__()
        self.scale = config.scale
        self.placement = config.placement
        self.learned_scale = nn.Parameter(torch.tensor(float(config.scale))) if config.learnable_scale else None
        self.activation = config.activation
        self.down = nn.Linear(d_in, config.d_bottle)
        self.up = nn.Linear(config.d_bottle, d_in if d_out is None else d_out)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.kernel = Kernel.AUTO  # "triton" runs the fused Triton adapter; "auto" keeps torch for now

    def scale_value(self) -> float | Tensor:
        return self.scale if self.learned_scale is None else self.learned_scale

    @torch.jit.unused
    def forward(self, x: Tensor) -> Tensor:
        self._mark_called()
        return self.up(ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))) * self.scale_value()

    def add_to(self, out: Tensor, x: Tensor) -> Tensor:
        """``out + s * up(act(down(x)))`` with the scale and sum fused into one ``addmm``.

        ``x`` is the MLP's input; with sequential placement the adapter reads ``out``, the
        MLP's output, instead (Eq. 7, second line)."""
        self._mark_called()
        if self.placement is AdapterPlacement.SEQUENTIAL:
            x = out
        if plain_path(out):  # traced or meta (vpetl.tracing): out of place, plain ops
            h = ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))
            return out + (self.up(h) * self.scale_value()).to(out.dtype)
        if self.learned_scale is not None:
            h = ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))
            return out + (self.up(h) * self.learned_scale).to(out.dtype)
        fused = self._fused_add(out, x)
        if fused is not None:
            return fused
        h = ACTIVATIONS[self.activation](self.down(self._input(x, self.down.weight)))
        flat = out.reshape(-1, out.shape[-1])
        h2d = h.reshape(-1, h.shape[-1])
        if h2d.dtype != flat.dtype:
            h2d = h2d.to(flat.dtype)
        up_w, up_b = self.up.weight.t().to(flat.dtype), self.up.bias.to(flat.dtype)
        if torch.is_grad_enabled():  # out-of-place: the MLP's last op may have saved ``out``
            summed = torch.addmm(flat, h2d, up_w, alpha=self.scale)
        else:  # inference: ``out`` is the MLP's fresh output, nothing else holds it
            summed = flat.addmm_(h2d, up_w, alpha=self.scale)
        return summed.add_(up_b, alpha=self.scale).view(out.shape)

    def _fused_add(self, out: Tensor, x: Tensor) -> Tensor | None:
        """The Triton adapter (:func:`vpetl.kernels.patt_triton.adapter_add`) when the kernel
        asks for it explicitly and covers the call; None: the torch path."""
        device_type = out.device.type
        if not kernels.use_triton(self.kernel, device_type, auto=False) or out.numel() == 0:
            return None
        if kernels.hooked(self.down, self.up):
            return None  # module hooks on down/up must fire: the fused op does not call them
        params = (self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = out.dtype
            if any(t.dtype != dtype for t in (x, *params)):
                return None
        ops = kernels.triton_ops()
        if dtype not in ops.SUPPORTED_DTYPES or self.down.weight.shape[0] > ops.MAX_RANK:
            return None
        flat = [out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])]
        with torch.autocast(device_type, enabled=False):
            summed = ops.adapter_add(*[t.to(dtype) for t in (*flat, *params)], float(self.scale), self.activation.value)
        return summed.view(out.shape)

    def extra_repr(self) -> str:
        learned = ", learnable_scale=True" if self.learned_scale is not None else ""
        return f"scale={self.scale}{learned}, activation={self.activation.value}, placement={self.placement.value}"
