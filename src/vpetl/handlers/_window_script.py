"""Window geometry and shifted-window attention in TorchScript's subset (``torch.jit.script``).

The geometry (:func:`fit_window`, :func:`pad_to_windows`, :func:`partition`,
:func:`unpartition`, :func:`shift_mask`) is written with ``List[int]`` so that both the eager
:func:`vpetl.handlers._window_math.window_attention` (read its module docstring for the shapes
and the shift mask) and :func:`window_attention` here use it. :func:`window_attention` is the
eager one with the branches as a plan (:mod:`vpetl.scripting`), so that ``torch.jit.script`` of
an injected Swin, SwinV2 or Video Swin model compiles; the eager forward keeps the fast
projection paths and any extra-key branch, here the prefix is the one extra-key branch covered.

Plan ints: ``[shrink window, has_prefix, prefix activation, d_k]`` then the qkv records;
tensors: one placeholder (TorchScript cannot type an empty list), the qkv records, then the
prefix's five tensors.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import scripting


def _product(values: List[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def fit_window(sizes: List[int], window: List[int], shift: List[int], shrink: bool) -> Tuple[List[int], List[int]]:
    """The (window, shift) torchvision uses for an input of spatial ``sizes``: with ``shrink``
    (Swin3D) an axis no longer than the window shrinks the window to it, unshifted; otherwise
    (Swin, SwinV2) an axis whose padded length one window spans is not shifted."""
    fitted: List[int] = []
    shifts: List[int] = []
    for i in range(len(window)):
        w, s = window[i], shift[i]
        if shrink:
            if sizes[i] <= w:
                w, s = sizes[i], 0
        elif w >= (sizes[i] + w - 1) // w * w:
            s = 0
        fitted.append(w)
        shifts.append(s)
    return fitted, shifts


def pad_to_windows(x: Tensor, window: List[int]) -> Tensor:
    """Zero-pad the spatial axes of ``x`` ``(B, S_1..S_n, C)`` at the end up to multiples of ``window``."""
    pads: List[int] = [0, 0]  # F.pad lists pairs from the last axis backwards; channels unpadded
    needed = False
    for i in range(len(window) - 1, -1, -1):
        extra = (window[i] - x.shape[1 + i] % window[i]) % window[i]
        pads += [0, extra]
        needed = needed or extra > 0
    return F.pad(x, pads) if needed else x


def partition(x: Tensor, window: List[int]) -> Tensor:
    """``(B, P_1..P_n, C)`` -> ``(B * nW, N, C)``; windows in raster order, tokens in raster
    order within each window (the order the relative-position index assumes)."""
    n, batch, channels = len(window), x.shape[0], x.shape[-1]
    grid: List[int] = []
    split: List[int] = [batch]
    for i in range(n):
        grid.append(x.shape[1 + i] // window[i])
        split += [grid[i], window[i]]
    split.append(channels)
    order: List[int] = [0]  # (B, g1, w1, g2, w2, ..., C) -> (B, g1, g2, ..., w1, w2, ..., C)
    for i in range(n):
        order.append(1 + 2 * i)
    for i in range(n):
        order.append(2 + 2 * i)
    order.append(1 + 2 * n)
    return x.reshape(split).permute(order).reshape([batch * _product(grid), _product(window), channels])


def unpartition(windows: Tensor, window: List[int], padded: List[int], batch: int) -> Tensor:
    """Inverse of :func:`partition`: ``(B * nW, N, C)`` -> ``(B, P_1..P_n, C)``."""
    n, channels = len(window), windows.shape[-1]
    shape: List[int] = [batch]
    for i in range(n):
        shape.append(padded[i] // window[i])
    shape += window
    shape.append(channels)
    order: List[int] = [0]  # (B, g1, g2, ..., w1, w2, ..., C) -> (B, g1, w1, g2, w2, ..., C)
    for i in range(n):
        order += [1 + i, 1 + n + i]
    order.append(1 + 2 * n)
    out_shape: List[int] = [batch] + padded
    out_shape.append(channels)
    return windows.reshape(shape).permute(order).reshape(out_shape)


def shift_mask(padded: List[int], window: List[int], shift: List[int], like: Tensor) -> Tensor:
    """The additive mask ``M`` ``(nW, N, N)`` (dtype/device of ``like``): -100 (the Swin papers'
    finite "minus infinity") between tokens that came from different regions of the unshifted
    map, 0 within one. Regions per shifted axis of padded length ``P``: ``[0, P-w)``,
    ``[P-w, P-s)``, ``[P-s, P)``; an axis that is not shifted has one."""
    labels = torch.zeros(padded, dtype=torch.long, device=like.device)
    for i in range(len(padded)):
        p, w, s = padded[i], window[i], shift[i]
        pos = torch.arange(p, device=like.device)
        axis = torch.zeros_like(pos)
        if s > 0:  # later regions win
            axis = torch.where(pos >= p - s, 2, torch.where(pos >= p - w, 1, 0))
        shape = [1] * len(padded)
        shape[i] = p
        labels = labels * 3 + axis.view(shape)
    labels = partition(labels.unsqueeze(0).unsqueeze(-1), window).squeeze(-1)  # (nW, N)
    different = labels.unsqueeze(2) != labels.unsqueeze(1)
    zeros = torch.zeros(different.shape, dtype=like.dtype, device=like.device)
    return zeros.masked_fill(different, -100.0)


def window_attention(
    x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], proj_weight: Tensor, proj_bias: Optional[Tensor],
    position_bias: Tensor, window: List[int], shift: List[int], num_heads: int, logit_scale: Optional[Tensor],
    attention_dropout: float, dropout: float, training: bool, tensors: List[Tensor], ints: List[int],
) -> Tensor:
    """``x`` ``(B, S_1..S_n, C)`` -> same shape; ``window``/``shift`` already fit to the input."""
    n = len(window)
    batch, channels = x.shape[0], x.shape[-1]
    sizes: List[int] = []
    for i in range(n):
        sizes.append(x.shape[1 + i])
    x = pad_to_windows(x, window)
    padded: List[int] = []
    axes: List[int] = []
    back: List[int] = []
    shifted = False
    for i in range(n):
        padded.append(x.shape[1 + i])
        axes.append(1 + i)
        back.append(-shift[i])
        shifted = shifted or shift[i] > 0
    if shifted:
        x = torch.roll(x, shifts=back, dims=axes)
    windows = partition(x, window)
    count, tokens = windows.shape[0], windows.shape[1]
    head_dim = channels // num_heads

    records = ints[4:]
    qkv = scripting.projection_sum(windows, qkv_weight, qkv_bias, tensors[1 : 1 + 2 * len(records)], records)
    qkv = qkv.view(count, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    prefix = 0
    if ints[1] == 1:
        start = 1 + 2 * len(records)
        k, v, prefix = scripting.prepend_prefix(k, v, tensors[start : start + 5], [ints[2], ints[3]])
        position_bias = torch.cat(
            [torch.zeros(position_bias.shape[:-1] + [prefix], dtype=position_bias.dtype, device=position_bias.device),
             position_bias], dim=-1)
    keys = k.shape[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=4.605170185988092).exp()  # log(100)
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + position_bias
    if shifted:
        mask = shift_mask(padded, window, shift, attn)
        if prefix > 0:
            mask = torch.cat([torch.zeros(mask.shape[:-1] + [prefix], dtype=mask.dtype, device=mask.device), mask], -1)
        per_sample = count // batch
        attn = (attn.view(batch, per_sample, num_heads, tokens, keys) + mask.unsqueeze(0).unsqueeze(2)).view(
            count, num_heads, tokens, keys)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(count, tokens, channels)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    out = unpartition(out, window, padded, batch)
    if shifted:
        out = torch.roll(out, shifts=shift, dims=axes)
    for i in range(n):
        out = out.narrow(1 + i, 0, sizes[i])
    return out.contiguous()
