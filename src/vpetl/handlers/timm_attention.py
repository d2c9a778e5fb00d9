"""timm's ``Attention`` (ViT, DeiT, DeiT III, DINOv2, CLIP/SigLIP ViTs ...) with extra keys and
values along the token axis (prefix-tuning, PATT variant ``concat``).

The fused-qkv handler adapts timm's attention through its ``qkv`` Linear alone (PATT ``add``
and LoRA add into the projection's output). Extra *tokens* change the attention itself, so
for them the module's class is swapped for a subclass whose forward is timm 1.0.31's
``Attention.forward`` with the keys and values extended (:mod:`vpetl.handlers._extra_keys`)::

    [Q | K | V] = qkv(x)                          (B, N, 3*H*hd) -> each (B, H, N, hd)
    K' = [P_k | K | s K_p],  V' = [P_v | V | s V_p]               (B, H, S', hd)
    Q, K' = q_norm(Q), k_norm(K')                 (extra keys are normalised like the others)
    O = dropout(softmax(Q K'^T / sqrt(hd) + M')) V'                (B, H, N, hd)
    out = proj_drop(proj(norm(O) [* sigmoid(gate(x))]))          (B, N, dim_out)

``P`` are prefix keys (prepended, shared by the batch), ``s K_p`` PATT ``concat`` keys
(appended, one per token). ``M'`` is ``attn_mask`` (SDPA convention: a bool ``True`` may
attend, a float is added) or, with ``is_causal`` (which takes precedence, as in timm), the
causal mask over the ``N`` input keys; it is extended with "allowed" for prefix keys and a
copy of the source token's column for appended keys. The fused (SDPA) and explicit paths
of timm are both kept (``fused_attn``). ``qkv`` is called as a module, so a
:class:`~vpetl.projection.BranchedLinear` around it (PATT ``add`` / LoRA) still applies.

Only timm's own ``Attention`` class, or a subclass that keeps its forward, is swapped: a
subclass with another forward computes something vpetl cannot know, and is refused.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import scripting
from ..derived import Derived, derived_class
from ..tracing import raise_not_scriptable
from ._extra_keys import EXTRA_KV_ATTR, KeyLayout, extend_keys, extend_mask

CLASS_PREFIX = "VpetlExtraKeys"


def timm_attention_class() -> type | None:
    """timm's ``Attention`` if timm is already imported (a timm model has imported it)."""
    if "timm" not in sys.modules:
        return None
    try:
        from timm.layers.attention import Attention
    except ImportError:  # pragma: no cover - other timm layouts
        return None
    return Attention


def _causal(length: int, like: Tensor) -> Tensor:
    """``(N, N)`` bool mask, ``True`` where query ``i`` may attend key ``j <= i``."""
    return torch.ones(length, length, dtype=torch.bool, device=like.device).tril_()


def extended_mask(
    attn_mask: Tensor | None, is_causal: bool, x: Tensor, source: int, prefix: int, copies: int
) -> Tensor | None:
    """The causal mask over the ``source`` input keys if ``is_causal``, else ``attn_mask`` (SDPA
    convention), extended for the extra keys; None without either. Wrapped for ``torch.fx``:
    the traced graph calls it, so whether a mask was passed is decided when the graph runs, as
    timm's own forward leaves it to SDPA."""
    mask = _causal(source, x) if is_causal else attn_mask
    if mask is None:
        return None
    return extend_mask(mask, KeyLayout(source, prefix, copies), allowed=True if mask.dtype == torch.bool else 0.0)


def masked_scores(scores: Tensor, mask: Tensor | None) -> Tensor:
    """``scores + mask`` (a bool mask: -inf where False); ``scores`` without a mask. Wrapped
    for ``torch.fx`` like :func:`extended_mask`."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=scores.dtype).masked_fill_(~mask, float("-inf"))
    return scores + mask


torch.fx.wrap("extended_mask")
torch.fx.wrap("masked_scores")


class _ExtraKeysForward(Derived):
    """timm 1.0.31 ``Attention.forward`` with extended keys and values (module docstring)."""

    class_prefix = CLASS_PREFIX

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if torch.jit.is_scripting():
            return self._vpetl_scripted_forward(x, attn_mask, is_causal)
        return self._vpetl_eager_forward(x, attn_mask, is_causal)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script``: one prefix branch is covered (:mod:`vpetl.scripting`)."""
        branches = self.__dict__.get(EXTRA_KV_ATTR, ())
        if len(branches) != 1 or branches[0].kind != "prefix":
            raise_not_scriptable(self)
        tensors, ints = scripting.prefix_plan(branches[0])
        scripting.store_plan(self, tensors, ints)
        return self

    def _vpetl_scripted_forward(self, x: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """The forward below for one prefix branch, in TorchScript's subset."""
        B, N, C = x.shape
        gate: Optional[Tensor] = None
        if self.gate is not None:
            gate = self.gate(x).sigmoid()
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        k, v, length = scripting.prepend_prefix(k, v, self._vpetl_script_tensors, self._vpetl_script_ints)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = attn_mask
        if is_causal:
            mask = torch.ones([N, N], dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            front_shape = mask.shape[:-1] + [length]
            if mask.dtype == torch.bool:
                front = torch.ones(front_shape, dtype=torch.bool, device=mask.device)
            else:
                front = torch.zeros(front_shape, dtype=mask.dtype, device=mask.device)
            mask = torch.cat([front, mask.expand(mask.shape[:-1] + [N])], dim=-1)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                if mask.dtype == torch.bool:
                    zeros = torch.zeros(mask.shape, dtype=attn.dtype, device=attn.device)
                    mask = zeros.masked_fill(~mask, float("-inf"))
                attn = attn + mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    @torch.jit.unused
    def _vpetl_eager_forward(self, x: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        k, v, layout = extend_keys(k, v, x, x, self.__dict__.get(EXTRA_KV_ATTR, ()))
        q, k = self.q_norm(q), self.k_norm(k)

        mask = extended_mask(attn_mask, is_causal, x, layout.source, layout.prefix, layout.copies)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
            )
        else:
            q = q * self.scale
            attn = masked_scores(q @ k.transpose(-2, -1), mask)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def extra_repr(self) -> str:
        kinds = ", ".join(b.kind for b in self.__dict__.get(EXTRA_KV_ATTR, ()))
        base = super().extra_repr()
        return f"{base + ', ' if base else ''}extra_kv=[{kinds}]"


def supports(cls: type) -> bool:
    """True for timm's ``Attention`` or a subclass keeping its forward."""
    base = timm_attention_class()
    return base is not None and issubclass(cls, base) and cls.forward is base.forward


def extra_keys_class(cls: type) -> type:
    """``cls`` with the extra-keys forward (:func:`vpetl.derived.derived_class`)."""
    return derived_class(_ExtraKeysForward, cls)


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, _ExtraKeysForward)


def __getattr__(name: str) -> Any:
    """``VpetlExtraKeysAttention`` by name: whole-model pickles written by vpetl 0.1.0 name it."""
    if name == CLASS_PREFIX + "Attention":
        from timm.layers.attention import Attention

        return extra_keys_class(Attention)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
