"""Adapter+ (Steitz & Roth, "Adapters Strike Back", CVPR'24; official code visinf/adapter_plus).

One bottleneck adapter per block, at position *post*: after the MLP's residual add, on the
block output ``x`` (``AdapterBlock.forward_post`` in the official ``adapter_plus/vit_adapter.py``)::

    x <- x + A(x),   A(x) = s ⊙ DropPath(W_u GELU(W_d x + b_d) + b_u)

    x: (..., D) channels last     W_d: (r, D)  b_d: (r,)  W_u: (D, r)  b_u: (D,)  s: (D,)

Defaults, from the official ``conf/adapter/adapter_plus.yaml`` over ``base_adapter.yaml``:
r = 8, no ``LN_a`` (``norm_layer: false``), GELU (the ViT's ``act_layer``), biases, channel-wise
``s`` initialised to 1 and trained (``scaling: channel``), Houlsby init (weights trunc-normal
std 0.01 cut at ±0.02, biases 0: near, not exactly, the identity), dropout 0, drop-path 0.1 on
``A`` (training only). Parameters per block ``2Dr + r + 2D``; ViT-B/16 at r = 8:
12 · (1537 · 8 + 1536) = 165,984. Registered as ``<block>.vpetl_adapter_plus``. Not mergeable.
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
class AdapterPlus(BottleneckMethod):
    """Adapter+: ``x <- x + s ⊙ (W_u GELU(W_d x + b_d) + b_u)`` on every block's output.

    Options: ``d_bottle`` (r, 8), ``activation`` (gelu), ``layer_norm`` (False: no ``LN_a``),
    ``scaling`` ("channel": trained ``s ∈ R^D``; "learned": one trained scalar; "fixed"),
    ``scale`` (1.0, the initial or fixed ``s``), ``init`` ("houlsby"; "lora" zero-initialises
    ``W_u`` so the model is unchanged at step 0; "bert"), ``bias`` (True), ``dropout`` (0.0,
    after the activation), ``drop_path`` (0.1, stochastic depth on ``A``).
    """

    name: ClassVar[str] = "adapter_plus"
    kind: ClassVar[str] = "adapter_plus"
    paper: ClassVar[str] = "Adapter+ (Steitz & Roth, CVPR 2024), position post, channel-wise scaling"
    formula: ClassVar[str] = "per block 2*d*r + r + 2*d (W_d, b_d, W_u, b_u, channel scale s)"

    d_bottle: int = 8
    layer_norm: bool = False
    scaling: AdapterScaling = AdapterScaling.CHANNEL
    scale: float = 1.0
    init: AdapterInit = AdapterInit.HOULSBY
    drop_path: float = 0.1

    def attach(self, injection: Injection) -> None:
        """One adapter per block with an MLP, as ``<block>.vpetl_adapter_plus``, added to the
        block's output."""
        attach_after_blocks(self, injection, AdapterPlusOutput)


class AdapterPlusOutput(AddsAdapter):
    """Mixin for a block: its output ``x`` becomes ``x + A(x)`` (Adapter+)."""

    class_prefix = "AdapterPlus"
    adapter_attr = "_vpetl_adapter_plus"
