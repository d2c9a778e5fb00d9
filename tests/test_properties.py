"""Property tests: PATT and LoRA equal their equations for any width, positions, scale, shape."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings, strategies as st
from timm.models.vision_transformer import Attention

import vpetl

from test_inject import reference_patt_attention

POSITIONS = ["".join(c) for n in (1, 2, 3) for c in itertools.combinations("qkv", n)]


def _attention_model(dim: int, heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(Attention(dim, num_heads=heads, qkv_bias=True))


@settings(max_examples=25, deadline=None)
@given(
    d_bottle=st.integers(1, 24),
    positions=st.sampled_from(POSITIONS),
    scale=st.floats(-2, 2, allow_nan=False, allow_subnormal=False),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 11),
    heads=st.sampled_from([1, 2, 4]),
)
def test_patt_equals_eq10(d_bottle, positions, scale, batch, tokens, heads):
    model = vpetl.inject(_attention_model(16, heads), "patt", d_bottle=d_bottle, positions=positions, scale=scale)
    attn = model[0]
    x = torch.randn(batch, tokens, 16)
    torch.testing.assert_close(attn(x), reference_patt_attention(attn, x), rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    rank=st.integers(1, 8),
    positions=st.sampled_from(POSITIONS),
    scale=st.floats(-2, 2, allow_nan=False, allow_subnormal=False),
    tokens=st.integers(1, 9),
)
def test_lora_equals_weight_update(rank, positions, scale, tokens):
    model = vpetl.inject(_attention_model(16, 2), "lora", d_bottle=rank, positions=positions, scale=scale)
    qkv = model[0].qkv
    lora = model[0].vpetl_lora
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    x = torch.randn(2, tokens, 16)
    weight = qkv.weight.detach().clone()
    for i, c in enumerate("qkv"):
        if c in positions:
            weight[i * 16 : (i + 1) * 16] += scale * lora.pair(c).up.weight @ lora.pair(c).down.weight
    torch.testing.assert_close(qkv(x), torch.nn.functional.linear(x, weight, qkv.bias), rtol=1e-4, atol=1e-4)
