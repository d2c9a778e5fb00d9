"""The Houlsby adapter (Houlsby et al., ICML'19), as the Adapter+ paper evaluates it
(Steitz & Roth, CVPR'24; official code visinf/adapter_plus).

Two sequential bottleneck adapters per block, each on a sub-layer's output before its
residual add (the official ``AdapterBlock.forward_houlsby``)::

    a = attn(norm1(x))                  x <- x + a + A_attn(a)
    m = mlp(norm2(x))                   x <- x + m + A_mlp(m)
    A(y) = W_u GELU(W_d y + b_d) + b_u       y: (..., D)  W_d: (r, D)  W_u: (D, r)

(after LayerScale, where the block has one). Defaults, from the official ablation config
``conf/experiment/ablations/other_configs/houlsby_dim8.yaml``: r = 8, ``attn_adapter: true``,
``scaling: 1.0`` (fixed, no trained scale), ``norm_layer: false``, ``init: houlsby`` (weights
trunc-normal std 0.01 cut at ±0.02, biases 0), GELU, biases, dropout 0, drop-path 0.1
(``base_adapter.yaml``). That config also trains every LayerNorm of the ViT
(``train.train_ln: true``): ``train_norms=True`` does so; it is off by default so the count is
the adapters' alone. Parameters per block ``2 (2Dr + r + D)``; ViT-B/16 at r = 8:
12 · 26,128 = 313,536. Registered as ``<block>.vpetl_houlsby.attn`` and ``.mlp``. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from ..branches import Branch
from ..options import flag
from ..registry import register
from ._bottleneck import (
    AdapterInit,
    AdapterScaling,
    AddsAdapter,
    BottleneckMethod,
    adapted_blocks,
    layer_scale_path,
    mlp_child_path,
    norm_eps,
    reference_tensor,
)

if TYPE_CHECKING:
    from ..inject import Injection


@register
@dataclass(frozen=True)
class Houlsby(BottleneckMethod):
    """Houlsby adapters: ``a + A(a)`` on each block's attention output and ``m + A(m)`` on its
    MLP output, before the residual adds.

    Options as :class:`~vpetl.methods.adapter_plus.AdapterPlus` (defaults: ``scaling="fixed"``,
    ``scale=1.0``, ``init="houlsby"``, no ``LN_a``), and ``train_norms`` (False): also train every
    LayerNorm of the base model, as the official Houlsby run does.
    """

    name: ClassVar[str] = "houlsby"
    kind: ClassVar[str] = "houlsby"
    paper: ClassVar[str] = "Houlsby adapter (Houlsby et al., ICML 2019) as in Adapter+ (Steitz & Roth, CVPR 2024)"
    formula: ClassVar[str] = "per block 2*(2*d*r + r + d) (after attention and after the MLP)"

    d_bottle: int = 8
    layer_norm: bool = False
    scaling: AdapterScaling = AdapterScaling.FIXED
    scale: float = 1.0
    init: AdapterInit = AdapterInit.HOULSBY
    drop_path: float = 0.1
    train_norms: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        flag(self.train_norms, "Houlsby train_norms")

    def attach(self, injection: Injection) -> None:
        """Per block with an MLP: ``<block>.vpetl_houlsby.attn`` on the attention output (or
        ``ls1``'s) and ``<block>.vpetl_houlsby.mlp`` on the MLP output (or ``ls2``'s)."""
        model = injection.model
        norms = [m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and "vpetl_" not in n]
        for block in adapted_blocks(injection, "houlsby"):
            mlp_path = layer_scale_path(block, "ls2") or mlp_child_path(block, "houlsby")
            attn_path = layer_scale_path(block, "ls1") or block.attention_path
            eps = norm_eps(model, block.norm2)
            pair = HoulsbyAdapters(self.make_adapter(_out_width(model, block), eps),
                                   self.make_adapter(block.mlp.d_out, eps))
            ref = reference_tensor(block.module)
            injection.place(pair.attn, ref)
            injection.place(pair.mlp, ref)
            injection.record.add_module(block.module, "vpetl_houlsby", pair)
            prefix = f"{block.path}.vpetl_houlsby" if block.path else "vpetl_houlsby"
            injection.adopt(f"{prefix}.attn", pair.attn)
            injection.adopt(f"{prefix}.mlp", pair.mlp)
            injection.derive(attn_path, HoulsbyAttentionOutput, "_vpetl_houlsby_attn", pair.attn)
            injection.derive(mlp_path, HoulsbyMlpOutput, "_vpetl_houlsby_mlp", pair.mlp)
        if self.train_norms:
            injection.train(p for m in norms for p in m.parameters())


def _out_width(model: nn.Module, block) -> int:
    """The attention output's width: its output projection's, else the residual width."""
    proj = model.get_submodule(block.attn_proj) if block.attn_proj else None
    for attr in ("out_features", "embed_dim"):
        if isinstance(getattr(proj, attr, None), int):
            return getattr(proj, attr)
    return block.mlp.d_out


class HoulsbyAdapters(nn.Module):
    """The two adapters of one block, under one name so their keys read
    ``<block>.vpetl_houlsby.{attn,mlp}.*``."""

    def __init__(self, attn: Branch, mlp: Branch) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp


class HoulsbyAttentionOutput(AddsAdapter):
    """Mixin for the attention (or ``ls1``): its output ``a`` becomes ``a + A_attn(a)``; for a
    tuple output (HF) its first element."""

    class_prefix = "HoulsbyAttn"
    adapter_attr = "_vpetl_houlsby_attn"


class HoulsbyMlpOutput(AddsAdapter):
    """Mixin for the MLP (or ``ls2``): its output ``m`` becomes ``m + A_mlp(m)``."""

    class_prefix = "HoulsbyMlp"
    adapter_attr = "_vpetl_houlsby_mlp"
