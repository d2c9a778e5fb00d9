"""Shifted-window multi-head self-attention, written out for any number of spatial axes.

This is the math of Swin (2D) and Video Swin (3D) window attention, with the q/k/v
projection done by :func:`vpetl.projection.project` so side branches add into K/V (or
whichever positions they cover) *before* q-scaling, the position bias and the softmax.

Shapes (``n`` spatial axes, ``n`` = 2 for images, 3 for video):

* input ``x``: ``(B, S_1, ..., S_n, C)`` channels-last tokens;
* window ``w = (w_1, ..., w_n)``, shift ``s = (s_1, ..., s_n)`` (already adjusted to the input);
* padded sizes ``P_i = ceil(S_i / w_i) * w_i``; ``nW = prod(P_i / w_i)`` windows per sample,
  ``N = prod(w_i)`` tokens per window, ``H`` heads of width ``hd = C / H``.

The computation, for the ``B * nW`` windows ``X`` of ``N`` tokens each::

    x   <- zero-pad to P, then roll by -s (cyclic shift), then partition: X (B*nW, N, C)
    Q, K, V = split(X W_qkv^T + b_qkv + branches(X))          # each (B*nW, H, N, hd)
    A   = Q K^T / sqrt(hd)                       (dot-product, Swin v1 / Video Swin)
        = cos(Q, K) * exp(min(tau, log 100))     (cosine, SwinV2; tau = logit_scale per head)
    A  <- A + R + M        R: relative-position bias (1, H, N, N); M: shift mask (nW, N, N)
    Y   = dropout(softmax(A)) V -> (B*nW, N, C) -> proj -> dropout
    y   <- reverse partition, roll by +s, crop to S

Extra keys (prefix-tuning, PATT ``concat``; :mod:`vpetl.handlers._extra_keys`) join K and V
per window after the projection: ``K' = [P_k | K | s K_p]`` ``(B*nW, H, N', hd)`` with
``keys_values(X)`` read from the window tokens ``X``; ``R`` is padded with 0 for them and ``M``
with 0 for prefix keys and the source token's column for appended keys (``(nW, N, N')``).
SwinV2's cosine attention normalises the extra keys like the others.

``M[w, i, j] = -100`` when tokens ``i`` and ``j`` of window ``w`` came from different
regions before the cyclic shift (they are not neighbours in the image), else 0. A shifted
axis of padded length ``P`` has three regions, ``[0, P-w)``, ``[P-w, P-s)`` and ``[P-s, P)``;
an axis that is not shifted has one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import ProjectionBranch
from ..options import Kernel
from ..projection import SlotLayout, project
from ._extra_keys import extend_bias, extend_keys, extend_mask
from ._window_script import pad_to_windows, partition, shift_mask, unpartition

QKV_LAYOUT = SlotLayout("qkv")


def window_attention(
    x: Tensor,
    *,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj: nn.Module,
    relative_position_bias: Tensor,
    window: list[int],
    shift: list[int],
    num_heads: int,
    branches: Sequence[ProjectionBranch] = (),
    kernel: Kernel = Kernel.AUTO,
    extra_kv: Sequence[nn.Module] = (),
    logit_scale: Tensor | None = None,
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Shifted-window attention of ``x`` ``(B, S_1..S_n, C)`` -> same shape (module docstring).

    Args:
        qkv_weight, qkv_bias: the frozen fused projection, ``(3C, C)`` and ``(3C,)``, rows in
            q, k, v order. Side ``branches`` add into its output slots (``SlotLayout("qkv")``).
        proj: the output projection, called as a module.
        relative_position_bias: ``R``, broadcastable to ``(B*nW, H, N, N)`` (usually ``(1, H, N, N)``).
        window, shift: per spatial axis, already adjusted to the input (a shift of 0 = no shift;
            :func:`vpetl.handlers._window_script.fit_window`).
        extra_kv: token-axis branches (``placement``, ``keys_values``) whose keys and values
            are concatenated to each window's K and V; ``keys_values`` reads ``X (B*nW, N, C)``.
        logit_scale: ``tau`` ``(H, 1, 1)`` for cosine attention (SwinV2); None for dot-product.
    """
    batch, sizes, channels = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
    if len(sizes) != len(window):
        raise ValueError(
            f"window attention with a {len(window)}-axis window expects input (B, {len(window)} spatial axes, C); "
            f"got shape {tuple(x.shape)}."
        )
    shifted = any(s > 0 for s in shift)
    x = pad_to_windows(x, window)
    padded = list(x.shape[1:-1])
    axes = tuple(range(1, 1 + len(window)))
    if shifted:
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=axes)
    windows = partition(x, window)  # (B*nW, N, C)
    count, tokens = windows.shape[0], windows.shape[1]
    head_dim = channels // num_heads

    qkv = project(windows, qkv_weight, qkv_bias, QKV_LAYOUT, list(branches), kernel)  # (B*nW, N, 3C)
    q, k, v = qkv.view(count, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    layout = None
    if extra_kv:
        k, v, layout = extend_keys(k, v, windows, windows, extra_kv)
        relative_position_bias = extend_bias(relative_position_bias, layout)
    keys = k.shape[-2]
    if logit_scale is None:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    else:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    attn = attn + relative_position_bias
    if shifted:
        mask = shift_mask(padded, window, shift, attn)  # (nW, N, N)
        if layout is not None:
            mask = extend_mask(mask, layout, allowed=0.0)  # (nW, N, N')
        per_sample = count // batch
        attn = (attn.view(batch, per_sample, num_heads, tokens, keys) + mask[None, :, None]).view(
            count, num_heads, tokens, keys
        )
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)

    out = (attn @ v).transpose(1, 2).reshape(count, tokens, channels)
    out = F.dropout(proj(out), p=dropout, training=training)

    out = unpartition(out, window, padded, batch)
    if shifted:
        out = torch.roll(out, shifts=tuple(shift), dims=axes)
    crop = (slice(None),) + tuple(slice(0, s) for s in sizes)
    return out[crop].contiguous()
