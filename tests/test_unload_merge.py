"""unload restores the model exactly; merge folds LoRA exactly and refuses nonlinear branches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vpetl
from vpetl.record import get_record

from conftest import METHOD_OPTIONS, tiny_vit


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize("method", vpetl.METHODS)
def test_unload_restores_keys_values_types_and_flags(method, images):
    model = tiny_vit()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # a flag the user had set
    state, types, flags = _snapshot(model)
    expected = model(images)
    vpetl.inject(model, method, **({"zero_init": True} if method in ("patt", "bapat") else METHOD_OPTIONS.get(method, {})))
    model(images)
    assert vpetl.unload(model) is model
    new_state, new_types, new_flags = _snapshot(model)
    assert new_types == types and new_flags == flags
    assert new_state.keys() == state.keys()
    assert all(torch.equal(new_state[k], state[k]) for k in state)
    assert get_record(model) is None and not model._forward_hooks and not model._forward_pre_hooks
    assert torch.equal(model(images), expected)
    vpetl.inject(model, "lora")  # injectable again


def test_unload_of_a_plain_model_raises():
    with pytest.raises(vpetl.InjectionError, match="not injected; call vpetl.inject"):
        vpetl.unload(tiny_vit())


@pytest.mark.parametrize("positions", ["qv", "qkv", "k"])
def test_merge_folds_lora_exactly(positions, images):
    model = vpetl.inject(tiny_vit(), "lora", d_bottle=4, positions=positions, scale=0.5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vpetl_lora" in name:
                param.normal_(0, 0.2)
    expected = model(images)
    merged = vpetl.merge(model)
    assert merged is model and get_record(model) is None
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    assert not any("vpetl" in k for k in model.state_dict())
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_merge_touches_only_the_adapted_rows():
    model = vpetl.inject(tiny_vit(), "lora", d_bottle=2, positions="v")
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    with torch.no_grad():
        model.blocks[0].attn.vpetl_lora.v.up.weight.fill_(1.0)
    vpetl.merge(model)
    after = model.blocks[0].attn.qkv.weight
    assert torch.equal(after[:64], before[:64]) and not torch.equal(after[64:], before[64:])


@pytest.mark.parametrize("method", ["patt", "adapter", "bapat"])
def test_merge_refuses_nonlinear_branches_and_leaves_model_injected(method):
    model = vpetl.inject(tiny_vit(), method)
    with pytest.raises(vpetl.MergeError, match="not linear in x.*vpetl.unload"):
        vpetl.merge(model)
    assert get_record(model) is not None


@pytest.mark.parametrize("method", ["prefix", "vpt"])
def test_merge_refuses_token_methods_and_leaves_model_injected(method):
    model = vpetl.inject(tiny_vit(), method, length=3)
    with pytest.raises(vpetl.MergeError, match=f"cannot merge method '{method}': {method}: it adds (keys|tokens)"):
        vpetl.merge(model)
    assert get_record(model) is not None


def test_summary_counts_prefix_and_prompt_tokens_as_branches():
    model = vpetl.inject(tiny_vit(), "prefix", length=3, d_bottle=4)
    info = vpetl.summary(model)
    # per block: tokens 3x32, down 32x4+4, up 4x64+64; head 32x10+10
    assert info.trainable_by_kind == {"prefix": 2 * (3 * 32 + 32 * 4 + 4 + 4 * 64 + 64), "head": 330}
    assert info.base_total == vpetl.summary(tiny_vit()).total
    deep = vpetl.summary(vpetl.inject(tiny_vit(), "vpt", length=3, deep=True))
    assert deep.trainable_by_kind == {"prompt": 2 * 3 * 32, "head": 330}


def test_merge_without_branches_just_unloads():
    model = vpetl.inject(tiny_vit(), "bitfit")
    vpetl.merge(model)
    assert get_record(model) is None and all(p.requires_grad for p in model.parameters())


def test_summary_counts_by_kind_and_prints():
    model = tiny_vit()
    plain = vpetl.summary(model)
    assert plain.method is None and plain.trainable == plain.total == plain.base_total
    vpetl.inject(model, "bapat", d_bottle=4)
    s = vpetl.summary(model)
    d, r = 32, 4
    assert s.trainable_by_kind == {
        "patt": 2 * (3 * d * r + r + 2 * d),
        "adapter": 2 * (2 * d * 64 + 64 + d),
        "head": d * 10 + 10,
    }
    assert s.base_total == plain.total and s.total == plain.total + s.trainable - (d * 10 + 10)
    text = str(s)
    assert "method 'bapat'" in text and f"{s.trainable:,}" in text and "patt" in text
