"""``nn.MultiheadAttention`` with vpetl branches in TorchScript's subset (``torch.jit.script``).

The eager forward (:mod:`vpetl.handlers.mha`) also takes nested tensors and distinct query /
key / value tensors per projection group; under ``torch.jit.script`` the adapted module runs
:func:`multihead_attention` instead, with its branches as a plan (:mod:`vpetl.scripting`):

    Q = query W_q^T + b_q + branches_q(query)     (and K from key, V from value)
    K, V <- [P_k | K], [P_v | V]                  prefix tokens, when the plan has them
    O = softmax(Q K^T / sqrt(hd) + M) V           M: attn_mask / causal and key_padding_mask,
                                                  additive, 0 for the prefix keys
    out = O W_o^T + b_o                           in the input's layout (batch_first or not,
                                                  batched or not), weights as the stock module

The plan's ints start ``[n_q, n_k, n_v, has_prefix, prefix activation, d_k]`` (record counts
per position, then the prefix); its tensors start with one placeholder (TorchScript cannot type
an empty list), then the q, k and v records, then the prefix's five tensors.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import scripting


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bool mask (True = may not attend, the module's convention) as 0 / -inf; floats as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _front_zeros(mask: Tensor, count: int) -> Tensor:
    """``mask`` with ``count`` zero (allowed) columns in front of its key axis."""
    if count == 0:
        return mask
    return torch.cat([torch.zeros(mask.shape[:-1] + [count], dtype=mask.dtype, device=mask.device), mask], dim=-1)


def multihead_attention(
    query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor], need_weights: bool,
    attn_mask: Optional[Tensor], average_attn_weights: bool, is_causal: bool,
    in_weight: Tensor, in_bias: Optional[Tensor], out_weight: Tensor, out_bias: Optional[Tensor],
    num_heads: int, batch_first: bool, dropout: float, training: bool, tensors: List[Tensor], ints: List[int],
) -> Tuple[Tensor, Optional[Tensor]]:
    """The module docstring's attention; arguments as ``nn.MultiheadAttention.forward`` plus the
    module's weights, ``training`` and the plan."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, length, width = query.shape[0], query.shape[1], query.shape[2]
    head_dim = width // num_heads
    tensor_start, int_start = 1, 6
    projected: List[Tensor] = []
    for slot, source in enumerate([query, key, value]):
        count = ints[slot]
        bias: Optional[Tensor] = None
        if in_bias is not None:
            bias = in_bias[slot * width : (slot + 1) * width]
        out = scripting.projection_sum(
            source, in_weight[slot * width : (slot + 1) * width], bias,
            tensors[tensor_start : tensor_start + 8 * count], ints[int_start : int_start + 4 * count],
        )
        tensor_start += 8 * count
        int_start += 4 * count
        projected.append(out.view(batch, out.shape[1], num_heads, head_dim).transpose(1, 2))
    q, k, v = projected[0], projected[1], projected[2]
    prefix = 0
    if ints[3] == 1:
        k, v, prefix = scripting.prepend_prefix(k, v, tensors[tensor_start : tensor_start + 5], [ints[4], ints[5]])
    sources = k.shape[2] - prefix

    mask = _additive(attn_mask, q.dtype)
    if mask is None and is_causal:
        mask = torch.zeros([length, sources], dtype=q.dtype, device=q.device).masked_fill(
            torch.ones([length, sources], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    merged: Optional[Tensor] = None
    if mask is not None:
        mask = _front_zeros(mask, prefix)
        merged = mask.view(batch, num_heads, length, sources + prefix) if mask.dim() == 3 else mask
    padding = _additive(key_padding_mask, q.dtype)
    if padding is not None:
        padding = _front_zeros(padding, prefix).view(batch, 1, 1, sources + prefix)
        merged = padding if merged is None else merged + padding

    p = dropout if training else 0.0
    weights: Optional[Tensor] = None
    if need_weights:
        scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
        if merged is not None:
            scores = scores + merged
        probabilities = scores.softmax(dim=-1)
        weights = probabilities.mean(dim=1) if average_attn_weights else probabilities
        out = F.dropout(probabilities, p=p) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=merged, dropout_p=p)
    out = F.linear(out.transpose(1, 2).reshape(batch, length, width), out_weight, out_bias)
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    if not batch_first:
        out = out.transpose(0, 1)
    return out, weights
