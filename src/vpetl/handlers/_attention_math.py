"""Multi-head attention on already projected q, k, v, with ``nn.MultiheadAttention``'s mask rules.

Shapes (``B`` batch, ``H`` heads, ``L`` queries, ``S`` keys, ``hd`` head width):

* ``q``: ``(B, H, L, hd)``; ``k``, ``v``: ``(B, H, S, hd)``.
* ``key_padding_mask``: ``(B, S)``; ``attn_mask``: ``(L, S)`` or ``(B*H, L, S)``. A bool mask
  marks with ``True`` what may *not* be attended; a float mask is added to the logits.
  Both are turned into one additive float mask ``(1|B, 1|H, L, S)``:
  ``M = attn_mask + key_padding_mask``, ``True -> -inf``, ``False -> 0``.

The attention itself (Vaswani et al.):

    A = softmax(q k^T / sqrt(hd) + M)            (B, H, L, S)
    o = dropout(A) v                              (B, H, L, hd)

computed by ``F.scaled_dot_product_attention`` when the weights ``A`` are not wanted, and
explicitly (the same sequence of operations as ``F.multi_head_attention_forward``) when they are.

Also the two helpers that let a layer run its padded path on a nested-tensor input
(``TransformerEncoder``'s fast path hands its layers nested tensors): :func:`unnest` and
:func:`renest`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (``True`` = masked out) as floats: ``0`` where allowed, ``-inf`` where masked;
    a float mask unchanged (cast to ``dtype``)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"attention masks must be bool or floating point; got dtype {mask.dtype}.")
    return mask.to(dtype)


def causal_mask(length: int, source_length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(L, S)`` additive mask: query ``i`` may attend keys ``j <= i`` (top-left aligned)."""
    allowed = torch.ones(length, source_length, dtype=torch.bool, device=device).tril_()
    return additive_mask(~allowed, dtype)


def merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    length: int,
    source_length: int,
) -> Tensor | None:
    """One additive mask ``(1|B, 1|H, L, S)`` from additive ``attn_mask`` and ``key_padding_mask``."""
    merged = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (length, source_length):
                raise RuntimeError(
                    f"the 2D attn_mask has shape {tuple(attn_mask.shape)}; expected (L, S) = "
                    f"{(length, source_length)}."
                )
            merged = attn_mask.view(1, 1, length, source_length)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (batch * heads, length, source_length):
                raise RuntimeError(
                    f"the 3D attn_mask has shape {tuple(attn_mask.shape)}; expected (N*num_heads, L, S) = "
                    f"{(batch * heads, length, source_length)}."
                )
            merged = attn_mask.view(batch, heads, length, source_length)
        else:
            raise RuntimeError(f"attn_mask must be 2D (L, S) or 3D (N*num_heads, L, S); got {attn_mask.dim()}D.")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, source_length):
            raise RuntimeError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (N, S) = "
                f"{(batch, source_length)}."
            )
        padding = key_padding_mask.view(batch, 1, 1, source_length)
        merged = padding if merged is None else merged + padding
    return merged


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    is_causal: bool,
    need_weights: bool,
    average_attn_weights: bool,
    dropout_p: float,
) -> tuple[Tensor, Tensor | None]:
    """``o = dropout(softmax(q k^T / sqrt(hd) + M)) v``; returns ``o`` ``(B, H, L, hd)`` and, if
    ``need_weights``, ``A`` averaged over heads ``(B, L, S)`` or per head ``(B, H, L, S)``.

    ``mask`` is additive (see :func:`merge_masks`). ``is_causal`` with no ``mask`` lets SDPA
    apply the causal pattern itself; otherwise the causal pattern must already be in ``mask``.
    """
    if not need_weights:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal and mask is None
        )
        return out, None
    if is_causal and mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.dtype, q.device).view(1, 1, q.shape[-2], k.shape[-2])
    logits = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    weights = torch.softmax(logits, dim=-1)
    attended = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    out = attended @ v
    return out, (weights.mean(dim=1) if average_attn_weights else weights)


def unnest(x: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """A nested ``(B, L_i, E)`` tensor as ``(padded (B, max L_i, E), key_padding_mask (B, max L_i),
    lengths)``; the mask is ``True`` at padding."""
    lengths = [int(t.shape[0]) for t in x.unbind()]
    padded = torch.nested.to_padded_tensor(x, 0.0)
    positions = torch.arange(padded.shape[1], device=padded.device)
    padding = positions.unsqueeze(0) >= torch.tensor(lengths, device=padded.device).unsqueeze(1)
    return padded, padding, lengths


def renest(x: Tensor, lengths: list[int]) -> Tensor:
    """Inverse of :func:`unnest`: keep the first ``lengths[i]`` rows of ``x[i]`` (autograd kept)."""
    with warnings.catch_warnings():  # strided nested tensors are "prototype": torch warns once
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.as_nested_tensor([x[i, :n] for i, n in enumerate(lengths)])
