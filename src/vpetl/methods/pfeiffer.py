"""The Pfeiffer adapter (Pfeiffer et al., AdapterFusion, EACL'21), as the Adapter+ paper
evaluates it (Steitz & Roth, CVPR'24; official code visinf/adapter_plus).

One bottleneck adapter per block, after the MLP, with its own LayerNorm ``LN_a``. The official
``AdapterBlock.forward_pfeiffer`` computes, with ``y`` the residual stream after attention and
``m`` the MLP output::

    x = y + m,   out = A(x) + m + y = x + A(x),   A(x) = W_u GELU(W_d LN_a(x) + b_d) + b_u

    x: (..., D) channels last     LN_a: (D,) weight and bias     W_d: (r, D)  W_u: (D, r)

so it reads the block output (after the MLP's residual add) and adds to it, like Adapter+ but
with ``LN_a`` and ``s = 1`` fixed. Defaults, from the official ablation config
``conf/experiment/ablations/other_configs/pfeiffer.yaml`` (the paper's Pfeiffer row): r = 8,
``norm_layer: true`` (``LN_a``, eps of the block's own LayerNorm), ``scaling: 1.0`` (fixed),
``init: bert`` (weights N(0, 0.02²), biases 0; ``conf/adapter/pfeiffer.yaml`` alone would
inherit ``houlsby``), GELU, biases, dropout 0, drop-path 0.1 (``base_adapter.yaml``). Parameters
per block ``2Dr + r + 3D``; ViT-B/16 at r = 8: 12 · 14,600 = 175,200. Registered as
``<block>.vpetl_pfeiffer``. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..registry import register
from ._bottleneck import AdapterInit, AdapterScaling, AddsAdapter, BottleneckMethod, attach_after_blocks

if TYPE_CHECKING:
    from ..inject import Injection


@register
@dataclass(frozen=True)
class Pfeiffer(BottleneckMethod):
    """Pfeiffer adapter: ``x <- x + W_u GELU(W_d LN_a(x) + b_d) + b_u`` on every block's output.

    Options as :class:`~vpetl.methods.adapter_plus.AdapterPlus`; the defaults differ:
    ``layer_norm=True``, ``scaling="fixed"`` with ``scale=1.0``, ``init="bert"``.
    """

    name: ClassVar[str] = "pfeiffer"
    kind: ClassVar[str] = "pfeiffer"
    paper: ClassVar[str] = "Pfeiffer adapter (Pfeiffer et al., EACL 2021) as in Adapter+ (Steitz & Roth, CVPR 2024)"
    formula: ClassVar[str] = "per block 2*d*r + r + 3*d (LN_a, W_d, b_d, W_u, b_u)"

    d_bottle: int = 8
    layer_norm: bool = True
    scaling: AdapterScaling = AdapterScaling.FIXED
    scale: float = 1.0
    init: AdapterInit = AdapterInit.BERT
    drop_path: float = 0.1

    def attach(self, injection: Injection) -> None:
        """One adapter per block with an MLP, as ``<block>.vpetl_pfeiffer``, added to the block's output."""
        attach_after_blocks(self, injection, PfeifferOutput)


class PfeifferOutput(AddsAdapter):
    """Mixin for a block: its output ``x`` becomes ``x + A(x)`` (Pfeiffer)."""

    class_prefix = "Pfeiffer"
    adapter_attr = "_vpetl_pfeiffer"
