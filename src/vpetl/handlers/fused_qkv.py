"""Shape (a): one fused ``qkv`` Linear called as a module (timm ViT/DeiT/DINOv2/CLIP/Swin/
CaiT/XCiT/MViTv2/Hiera/MaxViT/TinyViT/GCViT..., torchvision MViT) and shape (d) modules of timm
that read ``qkv.weight`` themselves unless ``qkv_bias_separate`` is set (BEiT, EVA, SwinV2).

The output layout is read from the module's attributes (timm's conventions); a module without
any is taken as position-major, which tests/test_timm_families.py checks family by family:

=====================================  ==========================  ===============================
module says                            layout of ``qkv(x)``        families
=====================================  ==========================  ===============================
nothing special                        ``[3, H, hd]``              most (ViT, Swin, Hiera, ...)
``head_first=True``                    ``[H, 3, hd]``              timm maxxvit (rw configs)
``key_dim == val_dim`` (per head)      ``[H, 3, hd]``              TinyViT
``key_dim != val_dim`` (per head)      ``[H, (kd, kd, vd)]``       EfficientFormer: refused
``use_global=True``, width 2d          ``[2, H, hd]`` (k, v)       GCViT global-query blocks
=====================================  ==========================  ===============================

A refused module is not matched, so the walker reports it (path and class) as an attention
module vpetl cannot adapt; :func:`unsupported_reason` says why.

Extra key/value tokens (prefix-tuning, PATT ``concat``) need the attention math, not just the
projection: :meth:`FusedQkvHandler.wire_extra_keys` swaps timm's own ``Attention`` for the
subclass of :mod:`vpetl.handlers.timm_attention` and refuses every other class here.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..errors import InjectionError
from ..projection import SlotLayout, adoptable
from ..record import InjectionRecord
from . import timm_attention
from ._extra_keys import EXTRA_KV_ATTR
from .base import LinearProjections, ProjectionSpec


def _int_attr(module: nn.Module, name: str) -> int | None:
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _per_head_dims(module: nn.Module, out_features: int) -> tuple[int, int, int] | None:
    """(heads, key width, value width) of a LeViT-style head-interleaved qkv ``[H, (kd, kd, vd)]``
    (the module has ``key_dim`` and ``val_dim`` per head and splits each head's columns)."""
    heads, kd, vd = _int_attr(module, "num_heads"), _int_attr(module, "key_dim"), _int_attr(module, "val_dim")
    if heads and kd and vd and out_features == heads * (2 * kd + vd):
        return heads, kd, vd
    return None


def qkv_layout(module: nn.Module) -> SlotLayout | str:
    """The layout of ``module.qkv``'s output, or the reason vpetl cannot place K/V slots in it."""
    qkv = module._modules.get("qkv")
    if not adoptable(qkv):
        return "its qkv projection is not an nn.Linear called as a module"
    out = qkv.out_features
    if getattr(module, "use_global", False) is True and out == 2 * qkv.in_features:
        return SlotLayout("kv")  # GCViT global-query block: q comes from the global query tokens
    per_head = _per_head_dims(module, out)
    if per_head is not None:
        heads, kd, vd = per_head
        if kd == vd:
            return SlotLayout("qkv", heads)
        return (
            f"its qkv Linear interleaves heads with unequal widths [H={heads}, (q {kd}, k {kd}, v {vd})] "
            "(LeViT/EfficientFormer layout); vpetl places PATT/LoRA only in equal-width q/k/v slots"
        )
    if getattr(module, "head_first", False) is True:
        heads = _int_attr(module, "num_heads")
        if heads and out % (3 * heads) == 0:
            return SlotLayout("qkv", heads)
        return f"it says head_first but its width {out} is not 3 x num_heads ({heads}) x head_dim"
    if out % 3:
        return f"its qkv width {out} is not divisible by 3"
    return SlotLayout("qkv")


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module with a ``qkv`` child is not adapted, or None if it is."""
    layout = qkv_layout(module)
    return layout if isinstance(layout, str) else None


class FusedQkvHandler(LinearProjections):
    name = "fused-qkv"

    def match(self, module: nn.Module) -> bool:
        return "qkv" in module._modules and isinstance(qkv_layout(module), SlotLayout)

    def linears(self, module: nn.Module) -> list[tuple[str, SlotLayout]]:
        layout = qkv_layout(module)
        if isinstance(layout, str):  # pragma: no cover - match() guards this
            raise ValueError(f"{type(module).__name__}: {layout}")
        return [("qkv", layout)]

    def spec(self, module: nn.Module) -> ProjectionSpec:
        spec = super().spec(module)
        return replace(spec, bias=spec.bias or getattr(module, "q_bias", None) is not None)

    def wire(self, module, branches, record: InjectionRecord) -> None:
        # timm BEiT/EVA/SwinV2 with q/v biases call F.linear(x, self.qkv.weight) and would
        # silently bypass the wrapper; with qkv_bias_separate they call self.qkv(x) instead.
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate"):
            record.set_attr(module, "qkv_bias_separate", True)
        super().wire(module, branches, record)

    def wire_extra_keys(self, module, branches, record: InjectionRecord) -> None:
        """Prefix / PATT ``concat`` keys: only timm's ``Attention`` (whose forward vpetl
        reproduces, :mod:`vpetl.handlers.timm_attention`) gets its class swapped; the branches
        are kept in the plain attribute ``_vpetl_extra_kv``."""
        cls = type(module)
        if timm_attention.is_adapted(module):
            raise InjectionError(
                f"{cls.__name__} already has extra key/value tokens from vpetl; call vpetl.unload(model) first."
            )
        if not timm_attention.supports(cls):
            base = timm_attention.timm_attention_class()
            why = (
                "it subclasses timm's Attention but overrides forward, so vpetl cannot know where its keys are"
                if base is not None and issubclass(cls, base)
                else "vpetl only sees its qkv Linear, not the attention math where extra keys must join"
            )
            raise InjectionError(
                f"{cls.__name__} (from {cls.__module__}) cannot take extra key/value tokens, which prefix-tuning "
                f"and PATT variant 'concat' need: {why}. Supported: timm.layers.Attention (timm ViT, DeiT, DINOv2, "
                "CLIP/SigLIP ViTs) and subclasses keeping its forward, nn.MultiheadAttention / "
                "nn.TransformerEncoderLayer (torchvision ViT), torchvision Swin/SwinV2/Swin3D window attention. "
                "On this model use PATT (variant 'add'), LoRA or the adapter."
            )
        record.set_attr(module, EXTRA_KV_ATTR, tuple(branches))
        record.swap_class(module, timm_attention.extra_keys_class(cls))
