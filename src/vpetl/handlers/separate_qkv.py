"""Shape (b): separate q/k/v projection Linears (HF ViT/DeiT/Dinov2/CLIP ``q_proj``/
``k_proj``/``v_proj``, HF VideoMAE ``query``/``key``/``value``, timm CrossViT ``wq``/``wk``/
``wv``, timm EVA with unfused projections ``q_proj``..., timm CaiT/XCiT class attention
``q``/``k``/``v``), the ``q`` + fused ``kv`` pair (timm PVTv2, Twins, attention pooling) and
the fused ``qk`` + ``v`` pair (timm ConViT gated positional self-attention). Fused pairs are
position-major (``[2, H, hd]``), as their timm forwards reshape them.

PATT computes its hidden ``h`` once per input and shares it between the K and V Linears.
"""

from __future__ import annotations

from torch import nn

from ..projection import SlotLayout, adoptable
from .base import LinearProjections

NAME_TRIPLES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("wq", "wk", "wv"))


class SeparateQkvHandler(LinearProjections):
    name = "separate-qkv"

    def _names(self, module: nn.Module) -> list[tuple[str, SlotLayout]] | None:
        children = module._modules
        for triple in NAME_TRIPLES:
            if all(adoptable(children.get(n)) for n in triple):
                return [(n, SlotLayout(c)) for n, c in zip(triple, "qkv")]
        q, kv = children.get("q"), children.get("kv")
        if adoptable(q) and adoptable(kv) and kv.out_features == 2 * q.out_features:
            return [("q", SlotLayout("q")), ("kv", SlotLayout("kv"))]
        qk, v = children.get("qk"), children.get("v")
        if adoptable(qk) and adoptable(v) and qk.out_features == 2 * v.out_features:
            return [("qk", SlotLayout("qk")), ("v", SlotLayout("v"))]
        return None

    def match(self, module: nn.Module) -> bool:
        return self._names(module) is not None

    def linears(self, module: nn.Module) -> list[tuple[str, SlotLayout]]:
        names = self._names(module)
        if names is None:  # pragma: no cover - match() guards this
            raise ValueError(f"{type(module).__name__} has no separate q/k/v projections")
        return names
