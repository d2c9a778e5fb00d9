"""PATT's Table 6 variant ``no_input``, learnable scales, activations and the sequential adapter."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpetl
from conftest import tiny_vit
from vpetl.record import get_record

TOKENS = 17  # tiny_vit: 16 patches + CLS


def _qkv_reference(attn: nn.Module, x: torch.Tensor, kv_delta: torch.Tensor, scale: float) -> torch.Tensor:
    """The frozen qkv of timm's Attention plus ``scale * kv_delta`` on its K and V columns."""
    out = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    d = x.shape[-1]
    return torch.cat([out[..., :d], out[..., d:] + scale * kv_delta], dim=-1)


def test_no_input_adds_the_same_kp_vp_from_learned_tokens_to_every_sample():
    model = vpetl.inject(tiny_vit(), "patt", d_bottle=6, variant="no_input", tokens=TOKENS, scale=0.6)
    attn = model.blocks[1].attn
    patt = attn.vpetl_patt
    assert patt.tokens.shape == (TOKENS, 32)
    x = torch.randn(3, TOKENS, 32)
    kv_delta = torch.tanh(patt.tokens @ patt.down.weight.T + patt.down.bias) @ patt.up.weight.T + patt.up.bias
    torch.testing.assert_close(attn.qkv(x), _qkv_reference(attn, x, kv_delta, 0.6), rtol=1e-5, atol=1e-5)
    # independent of the input: two different samples get the same K_p, V_p
    other = torch.randn(3, TOKENS, 32)
    torch.testing.assert_close(attn.qkv(other) - F.linear(other, attn.qkv.weight, attn.qkv.bias),
                               attn.qkv(x) - F.linear(x, attn.qkv.weight, attn.qkv.bias), rtol=1e-5, atol=1e-5)


def test_no_input_trains_its_tokens_and_counts_tokens_times_width(images):
    plain = vpetl.summary(vpetl.inject(tiny_vit(), "patt", d_bottle=6)).trainable
    model = vpetl.inject(tiny_vit(), "patt", d_bottle=6, variant="no_input", tokens=TOKENS)
    assert vpetl.summary(model).trainable == plain + 2 * TOKENS * 32
    model(images).sum().backward()
    for block in model.blocks:
        assert block.attn.vpetl_patt.tokens.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_no_input_with_the_wrong_token_count_says_what_to_pass():
    model = vpetl.inject(tiny_vit(), "patt", variant="no_input", tokens=50)
    with pytest.raises(RuntimeError, match="built for 50 tokens per attention call .* this call has 17.*tokens=17"):
        model(torch.randn(1, 3, 32, 32))


def test_variant_options_are_validated():
    with pytest.raises(vpetl.ConfigError, match="needs tokens=<tokens per attention call>"):
        vpetl.PattConfig(variant="no_input")
    with pytest.raises(vpetl.ConfigError, match="tokens applies only to variant 'no_input'"):
        vpetl.PattConfig(tokens=10)
    with pytest.raises(vpetl.ConfigError, match="positions must be 'kv'; got 'qv'"):
        vpetl.PattConfig(variant="concat", positions="qv")
    with pytest.raises(vpetl.ConfigError, match="PATT variant must be one of 'add', 'concat', 'no_input'"):
        vpetl.PattConfig(variant="sum")
    with pytest.raises(vpetl.ConfigError, match="Adapter placement must be one of 'parallel', 'sequential'"):
        vpetl.AdapterConfig(placement="serial")
    with pytest.raises(vpetl.ConfigError, match="unknown inject option\\(s\\) \\['lenght'\\]"):
        vpetl.inject(tiny_vit(), "prefix", lenght=4)
    with pytest.raises(vpetl.ConfigError, match="option placement='sequential' does not apply to method 'patt'"):
        vpetl.inject(tiny_vit(), "patt", placement="sequential")


@pytest.mark.parametrize("method", ["patt", "adapter"])
def test_learnable_scale_is_a_trained_parameter_equal_to_the_fixed_one_at_init(method, images):
    torch.manual_seed(0)
    fixed = vpetl.inject(tiny_vit(), method, d_bottle=4, scale=0.3)
    learned = vpetl.inject(copy.deepcopy(tiny_vit()), method, d_bottle=4, scale=0.3, learnable_scale=True)
    state = {k: v for k, v in fixed.state_dict().items()}
    missing, unexpected = learned.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.endswith("learned_scale") for k in missing) and missing
    if method == "adapter":  # zero-init up: make the branch visible
        for block in (*fixed.blocks, *learned.blocks):
            nn.init.normal_(block.vpetl_adapter.up.weight)
    for a, b in zip(fixed.blocks, learned.blocks):
        b.load_state_dict(a.state_dict(), strict=False)
    torch.testing.assert_close(learned(images), fixed(images), rtol=1e-5, atol=1e-5)
    learned(images).sum().backward()
    scales = [p for n, p in learned.named_parameters() if n.endswith("learned_scale")]
    assert len(scales) == 2 and all(p.requires_grad and p.grad is not None and p.grad != 0 for p in scales)
    assert set(n for n, p in learned.named_parameters() if n.endswith("learned_scale")) <= set(
        get_record(learned).delta_names
    )


@pytest.mark.parametrize("activation,fn", [("relu", F.relu), ("gelu", F.gelu), ("tanh", torch.tanh)])
def test_patt_activation_option(activation, fn):
    model = vpetl.inject(tiny_vit(), "patt", d_bottle=5, activation=activation, scale=0.5)
    attn = model.blocks[0].attn
    patt = attn.vpetl_patt
    x = torch.randn(2, TOKENS, 32)
    kv_delta = fn(x @ patt.down.weight.T + patt.down.bias) @ patt.up.weight.T + patt.up.bias
    torch.testing.assert_close(attn.qkv(x), _qkv_reference(attn, x, kv_delta, 0.5), rtol=1e-5, atol=1e-5)


def _randomise_adapters(model: nn.Module) -> None:
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "vpetl_adapter.up" in name:
            nn.init.normal_(param, std=0.5)


def _first_block_with_adapter(placement: str):
    """(block 0, input x, the block MLP's expected output with a random-up adapter)."""
    model = vpetl.inject(tiny_vit(), "adapter", d_bottle=4, scale=0.5, placement=placement).eval()
    _randomise_adapters(model)
    block = model.blocks[0]
    adapter = block.vpetl_adapter
    x = torch.randn(2, TOKENS, 32)
    with vpetl.disabled(model):
        y = block.mlp(x)
    read = y if placement == "sequential" else x
    expected = y + 0.5 * (F.relu(read @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T
                          + adapter.up.bias)
    return block, x, expected


def test_sequential_adapter_reads_the_mlp_output():
    block, x, expected = _first_block_with_adapter("sequential")
    torch.testing.assert_close(block.mlp(x), expected, rtol=1e-5, atol=1e-5)
    parallel = vpetl.inject(tiny_vit(), "adapter", d_bottle=4, scale=0.5)
    parallel.blocks[0].vpetl_adapter.load_state_dict(block.vpetl_adapter.state_dict())
    assert not torch.allclose(parallel.blocks[0].mlp(x), expected)


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_adapter_adds_in_place_without_grad_and_matches_training_mode(placement, mode):
    block, x, expected = _first_block_with_adapter(placement)
    with_grad = block.mlp(x)
    assert with_grad.requires_grad
    with mode():
        without_grad = block.mlp(x)
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without_grad, expected, rtol=1e-5, atol=1e-5)


def test_sequential_adapter_on_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    vpetl.inject(layer, "adapter", d_bottle=4, scale=0.5, placement="sequential")
    _randomise_adapters(layer)
    x = torch.randn(2, 5, 16)
    adapter = layer.vpetl_adapter
    with vpetl.disabled(layer):
        h = x + layer.self_attn(x, x, x, need_weights=False)[0]
        h = layer.norm1(h)
        y = layer.linear2(F.relu(layer.linear1(h)))
    y = y + 0.5 * (F.relu(y @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias)
    torch.testing.assert_close(layer(x), layer.norm2(h + y), rtol=1e-5, atol=1e-5)


def test_variants_round_trip_through_a_delta_file(tmp_path, images):
    base = tiny_vit()
    fresh = copy.deepcopy(base)
    model = vpetl.inject(base, "bapat", d_bottle=4, variant="no_input", tokens=TOKENS, learnable_scale=True,
                         activation="gelu", placement="sequential")
    _randomise_adapters(model)
    path = vpetl.save_delta(model, tmp_path / "variants.safetensors")
    vpetl.load_delta(fresh, path)
    config = get_record(fresh).config
    assert config.patt.variant is vpetl.PattVariant.NO_INPUT and config.patt.tokens == TOKENS
    assert config.adapter.placement is vpetl.AdapterPlacement.SEQUENTIAL
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
