"""PATT, the paper's parallel attention (Eq. 9-10), and its Table 6 variants.

One branch per attention block, shared by the positions it adapts::

    h = act(x W_down^T + b_down)                   x: (M, d)   h: (M, r)
    [K_p | V_p] = h W_up^T + b_up                  W_up: (2d, r) for positions "kv"
    K = x W_k^T + b_k + s K_p,  V = x W_v^T + b_v + s V_p

added into the K/V slots of the attention's own projection (a fused qkv, separate k/v, or
``nn.MultiheadAttention``'s in-projection) before the attention runs. Variants: ``concat``
appends ``s K_p``/``s V_p`` as extra tokens; ``no_input`` reads a learned ``P (T, d)`` instead
of ``x``. Not mergeable: ``tanh`` makes it nonlinear in ``x``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import ACTIVATIONS, ProjectionBranch, _add_product_
from ..errors import ConfigError
from ..options import Activation, enum_value, flag, frozen_set, normalize_positions, number, width
from ..registry import Method, register
from ..tracing import plain_path

if TYPE_CHECKING:
    from ..inject import Injection
    from ..projection import OutputSlots, SlotLayout


class PattVariant(str, Enum):
    """How PATT's ``K_p``/``V_p`` meet the attention (Table 6).

    ``ADD``: ``K = x W_k + s K_p`` (Eq. 10, the paper's PATT). ``CONCAT``: ``s K_p``/``s V_p``
    appended to K and V along the token axis (N extra keys). ``NO_INPUT``: ``K_p``/``V_p``
    computed from a learned token matrix ``P`` (``tokens x d``) instead of ``Z^{l-1}``, then added.
    """

    ADD = "add"
    CONCAT = "concat"
    NO_INPUT = "no_input"


@register
@dataclass(frozen=True)
class PATT(Method):
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

    name: ClassVar[str] = "patt"
    kind: ClassVar[str] = "patt"
    paper: ClassVar[str] = "V-PETL (Yu et al. 2022), Eq. 9-10"
    formula: ClassVar[str] = "per attention 3*d*r + r + 2*d (positions kv, with biases)"
    why_not_mergeable: ClassVar[str] = "tanh(x W_down) W_up is not linear in x, so no weight matrix reproduces it"

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
        width(self.d_bottle, "PATT d_bottle")
        frozen_set(self, "scale", number(self.scale, "PATT scale"))
        frozen_set(self, "positions", normalize_positions(self.positions, "PATT positions"))
        frozen_set(self, "activation", enum_value(Activation, self.activation, "PATT activation"))
        flag(self.zero_init, "PATT zero_init")
        flag(self.learnable_scale, "PATT learnable_scale")
        if self.bias is not None and not isinstance(self.bias, bool):
            raise ConfigError(f"PATT bias must be True, False or None (follow the backbone); got {self.bias!r}.")
        frozen_set(self, "variant", enum_value(PattVariant, self.variant, "PATT variant"))
        if self.variant is PattVariant.NO_INPUT:
            if self.tokens is None:
                raise ConfigError(
                    "PATT variant 'no_input' learns a token matrix P (tokens x d) in place of the input, so it "
                    "needs tokens=<tokens per attention call> (e.g. 197 for ViT-B/16 at 224 px, 196 for "
                    "Swin3D-B windows at 8 frames); got tokens=None."
                )
            width(self.tokens, "PATT tokens")
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

    def attach(self, injection: Injection) -> None:
        """One :class:`PattBranch` per attention site, as ``<attention>.vpetl_patt``."""
        for site in injection.attention_sites():
            spec = injection.projection_spec(site, self.positions, "PATT")
            widths = {c: spec.widths[c] for c in self.positions}
            bias = spec.bias if self.bias is None else self.bias
            branch = PattBranch(spec.d_in, widths, self, bias=bias, consumers=spec.consumers(self.positions))
            if self.variant is PattVariant.CONCAT:
                injection.add_extra_keys(site, "vpetl_patt", branch)
            else:
                injection.add_projection_branch(site, "vpetl_patt", branch)


class PattBranch(ProjectionBranch):
    """PATT: one shared down-projection ``d_in -> r`` and up-projection ``r -> sum(widths)``.

    ``widths`` maps each position letter to the width of its slot (``d`` for ViT). The
    up-projection's rows are the positions' chunks in q, k, v order, so for "kv" the first
    ``d`` rows produce ``K_p`` and the next ``d`` rows ``V_p`` (Eq. 9).
    """

    kind = "patt"
    scriptable = True
    placement = "append"  # where the ``concat`` variant's keys go (see vpetl.token_branches)

    def __init__(self, d_in: int, widths: Mapping[str, int], config: PATT, bias: bool, consumers: int = 1):
        super().__init__()
        self.positions = config.positions
        self.variant = config.variant
        self.scale = config.scale
        if config.learnable_scale:
            self.learned_scale = nn.Parameter(torch.tensor(float(config.scale)))
        else:
            self.learned_scale = None
        self.activation = config.activation
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
        self._consumers = max(1, consumers)
        self._cache: tuple[Tensor, Tensor] | None = None
        self._calls = 0

    @property
    def fusable(self) -> bool:
        """True when the branch is Eq. 9-10 with a fixed scale, which the fused kernels cover."""
        return self.variant is PattVariant.ADD and self.learned_scale is None

    def scale_value(self) -> float | Tensor:
        return self.scale if self.learned_scale is None else self.learned_scale

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
                    f"(PATT.tokens) but this call has {tokens} (input shape {tuple(x.shape)}); inject again "
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

    def add_into_(self, x: Tensor, x2d: Tensor, out: OutputSlots) -> None:
        self._mark_called()
        h = self.hidden(x, x2d)
        for letters in out.runs(self.positions):  # "kv" of a fused qkv: one (M, 2d) GEMM
            rows = slice(self._rows[letters[0]].start, self._rows[letters[-1]].stop)
            _add_product_(out.view(letters), h, self.up.weight[rows].t(), self.scale_value())

    def plain_delta(self, x: Tensor, layout: SlotLayout, out_features: int) -> Tensor:
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


PattConfig = PATT  # the name before vpetl 0.2
