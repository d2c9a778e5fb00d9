"""LoRA (Hu et al. 2022) on the attention's q/k/v projections, one low-rank pair per position::

    Q = x W_q^T + b_q + scale * (x A_q^T) B_q^T        A_q: (r, d_in)  B_q: (w, r)

``A`` Kaiming-uniform, ``B`` zero, no bias. Merges exactly: ``W_q += scale * B_q A_q``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import ProjectionBranch, _add_product_
from ..options import frozen_set, normalize_positions, number, width
from ..registry import Method, register

if TYPE_CHECKING:
    from ..inject import Injection
    from ..projection import OutputSlots, SlotLayout
    from ..record import InjectionRecord


@register
@dataclass(frozen=True)
class LoRA(Method):
    """LoRA (paper layout): a separate pair per position, ``W_p x + scale * B_p A_p x``, no bias,
    ``A`` Kaiming-uniform, ``B`` zero. ``scale`` is LoRA's alpha / rank."""

    name: ClassVar[str] = "lora"
    kind: ClassVar[str] = "lora"
    paper: ClassVar[str] = "LoRA (Hu et al. 2022); V-PETL Table 3 layout (q and v)"
    formula: ClassVar[str] = "per attention sum over positions r*(d_in + w)"
    width_field: ClassVar[str] = "rank"
    mergeable: ClassVar[bool] = True

    rank: int = 16
    scale: float = 1.0
    positions: str = "qv"

    def __post_init__(self) -> None:
        width(self.rank, "LoRA rank (d_bottle)")
        frozen_set(self, "scale", number(self.scale, "LoRA scale"))
        frozen_set(self, "positions", normalize_positions(self.positions, "LoRA positions"))


    def attach(self, injection: "Injection") -> None:
        """One :class:`LoraBranch` per attention site, as ``<attention>.vpetl_lora``."""
        for site in injection.attention_sites():
            spec = injection.projection_spec(site, self.positions, "LoRA")
            branch = LoraBranch(spec.d_in, {c: spec.widths[c] for c in self.positions}, self)
            injection.add_projection_branch(site, "vpetl_lora", branch)

    def merge(self, record: "InjectionRecord") -> None:
        """``W_p += scale * B_p A_p`` in the frozen rows of every adapted position."""
        for site in record.sites:
            lora = site.module._modules.get("vpetl_lora")
            if isinstance(lora, LoraBranch):
                for letter in lora.positions:
                    rows = site.handler.weight_rows(site.module, letter)
                    rows.add_(lora.delta_weight(letter).to(rows.dtype).view(rows.shape))


class LoraBranch(ProjectionBranch):
    """LoRA with a separate low-rank pair per position (``q`` and ``v`` in the paper).

    Children are named by letter, each with ``down`` (A, ``r x d_in``, Kaiming-uniform) and
    ``up`` (B, ``w x r``, zeros), so keys read ``...vpetl_lora.q.down.weight``.
    """

    kind = "lora"
    scriptable = True

    def __init__(self, d_in: int, widths: Mapping[str, int], config: LoRA):
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


LoraConfig = LoRA  # the name before vpetl 0.2
