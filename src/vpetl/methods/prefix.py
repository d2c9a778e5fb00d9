"""Prefix-tuning (V-PETL Eq. 5): ``L`` learned key/value tokens in every attention::

    [P_k | P_v] = act(P W_down^T + b_down) W_up^T + b_up       P: (L, d)   -> (L, d_k + d_v)
    K' = [P_k | K],  V' = [P_v | V]                              along the token axis

The same prefix for every sample and window; window attention pads its position bias and
mask with 0 for the L extra keys. Not mergeable: the base model has no such keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..branches import ACTIVATIONS
from ..errors import InjectionError
from ..options import Activation, enum_value, frozen_set, width
from ..registry import Method, register
from ..token_branches import KeyValueBranch, Placement
from ..tracing import plain_path

if TYPE_CHECKING:
    from ..inject import Injection


@register
@dataclass(frozen=True)
class Prefix(Method):
    """Prefix-tuning (Eq. 5): ``length`` learned tokens ``P (L, d)`` per attention, reparameterised
    as ``[P_k | P_v] = up(act(down(P)))`` with ``down: d -> d_bottle``, ``up: d_bottle -> 2d``, and
    prepended to K and V along the token axis (window attention: bias and mask padded with 0)."""

    name: ClassVar[str] = "prefix"
    kind: ClassVar[str] = "prefix"
    paper: ClassVar[str] = "Prefix-tuning (Li & Liang 2021); V-PETL Eq. 5"
    formula: ClassVar[str] = "per attention L*d + d*r + r + r*2d + 2d"
    why_not_mergeable: ClassVar[str] = "it adds keys and values the base model does not have"

    length: int = 10
    d_bottle: int = 128
    activation: Activation = Activation.TANH

    def __post_init__(self) -> None:
        width(self.length, "prefix length")
        width(self.d_bottle, "prefix d_bottle")
        frozen_set(self, "activation", enum_value(Activation, self.activation, "prefix activation"))


    def attach(self, injection: Injection) -> None:
        """One :class:`PrefixBranch` per attention site, as ``<attention>.vpetl_prefix``."""
        for site in injection.attention_sites():
            spec = injection.projection_spec(site, "", "prefix")
            if "k" not in spec.widths or "v" not in spec.widths:
                raise InjectionError(
                    f"{site.path} ({type(site.module).__name__}) has no key and value projections to extend with "
                    f"prefix tokens; it has {''.join(spec.widths)}."
                )
            branch = PrefixBranch(spec.d_in, spec.widths["k"], spec.widths["v"], self)
            injection.add_extra_keys(site, "vpetl_prefix", branch)


class PrefixBranch(KeyValueBranch):
    """Prefix-tuning with the reparameterisation of Li & Liang (Eq. 5).

    ``tokens``: ``(L, d)``, normal(0, 0.02) like ViT's position embeddings; ``down``:
    ``d -> r``; ``up``: ``r -> d_k + d_v`` (PyTorch's default Linear init, both with bias).
    Output ``P_k = up(act(down(P)))[:, :d_k]``, ``P_v = ...[:, d_k:]``.
    """

    kind = "prefix"
    scriptable = True
    placement: Placement = "prepend"

    def __init__(self, d_in: int, d_key: int, d_value: int, config: Prefix):
        super().__init__()
        self.activation = config.activation
        self.d_key = d_key
        self.tokens = nn.Parameter(torch.empty(config.length, d_in))
        nn.init.normal_(self.tokens, std=0.02)
        self.down = nn.Linear(d_in, config.d_bottle)
        self.up = nn.Linear(config.d_bottle, d_key + d_value)

    @property
    def length(self) -> int:
        return self.tokens.shape[0]

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._mark_called()
        kv = self.up(ACTIVATIONS[self.activation](self.down(self.tokens)))  # (L, d_k + d_v)
        if plain_path(x) or kv.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            kv = kv.to(x.dtype)
        return kv[:, : self.d_key], kv[:, self.d_key :]

    def extra_repr(self) -> str:
        return f"length={self.length}, activation={self.activation.value}"


PrefixConfig = Prefix  # the name before vpetl 0.2
