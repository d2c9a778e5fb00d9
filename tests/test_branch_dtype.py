"""``branch_dtype``: trained parameters follow the base's dtype, or stay fp32 on a half-precision base."""

from __future__ import annotations

import copy

import pytest
import torch

import vpetl
from conftest import tiny_vit
from vpetl.record import get_record

METHODS = ["patt", "bapat", "lora", "adapter"]


def _branch_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "vpetl_" in n}


def _base_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "vpetl_" not in n}


@pytest.mark.parametrize("method", METHODS)
def test_float32_branches_on_a_bfloat16_base_train(method, images):
    model = vpetl.inject(tiny_vit().to(torch.bfloat16), method, d_bottle=4, branch_dtype="float32")
    assert {p.dtype for p in _branch_params(model).values()} == {torch.float32}
    assert {p.dtype for p in _base_params(model).values()} == {torch.bfloat16}
    out = model(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in _branch_params(model).items()}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("method", METHODS)
def test_converting_the_model_leaves_float32_branches_in_float32(method, images):
    reference = vpetl.inject(tiny_vit(), method, d_bottle=4, branch_dtype="float32")
    for name, param in _branch_params(reference).items():
        if "up" in name:  # zero-init up-projections would hide the branches
            torch.nn.init.normal_(param, std=0.2)
    model = copy.deepcopy(reference).to(torch.bfloat16)
    assert {p.dtype for p in _branch_params(model).values()} == {torch.float32}
    assert {p.dtype for p in _base_params(model).values()} == {torch.bfloat16}
    with torch.no_grad():
        expected = reference(images)
        got = model(images.to(torch.bfloat16)).float()
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    model.half()
    assert {p.dtype for p in _branch_params(model).values()} == {torch.float32}
    model.double()  # an upcast is the user's explicit choice and is kept
    assert {p.dtype for p in _branch_params(model).values()} == {torch.float64}


def test_follow_is_the_default_and_converts_with_the_model(images):
    model = vpetl.inject(tiny_vit(), "bapat", d_bottle=4)
    assert get_record(model).config.branch_dtype is vpetl.BranchDtype.FOLLOW
    model.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(images.to(torch.bfloat16)).dtype == torch.bfloat16


def test_float32_branches_under_bfloat16_autocast(images):
    model = vpetl.inject(tiny_vit(), "bapat", d_bottle=4, branch_dtype="float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    out.float().sum().backward()
    assert model.blocks[0].attn.vpetl_patt.down.weight.grad.dtype == torch.float32


def test_delta_of_float32_branches_loads_onto_a_half_precision_base(tmp_path, images):
    base = tiny_vit()
    fresh = copy.deepcopy(base).to(torch.bfloat16)
    model = vpetl.inject(base, "bapat", d_bottle=4, branch_dtype="float32")
    path = vpetl.save_delta(model, tmp_path / "fp32.safetensors", dtype=torch.bfloat16)
    vpetl.load_delta(fresh, path)
    # the stored config rebuilds fp32 branches; the bf16 file contents are upcast into them
    assert {p.dtype for p in _branch_params(fresh).values()} == {torch.float32}
    stored = {n: p.detach().to(torch.bfloat16).float() for n, p in _branch_params(model).items()}
    assert all(torch.equal(p, stored[n]) for n, p in _branch_params(fresh).items())


def test_bad_branch_dtype_is_rejected():
    with pytest.raises(vpetl.ConfigError, match="branch_dtype must be one of 'follow', 'float32'; got 'fp8'"):
        vpetl.inject(tiny_vit(), "bapat", branch_dtype="fp8")
    with pytest.raises(vpetl.ConfigError, match="branch_dtype='float32' does not apply to method 'linear'"):
        vpetl.inject(tiny_vit(), "linear", branch_dtype="float32")


@pytest.mark.parametrize("branch_dtype", ["follow", "float32"])
def test_float16_autocast_and_a_half_model(branch_dtype, images):
    model = vpetl.inject(tiny_vit(), "bapat", d_bottle=4, branch_dtype=branch_dtype)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(images)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert model.blocks[0].attn.vpetl_patt.down.weight.grad.dtype == torch.float32
    half = vpetl.inject(tiny_vit().half(), "bapat", d_bottle=4, branch_dtype=branch_dtype)
    expected = torch.float16 if branch_dtype == "follow" else torch.float32
    assert half.blocks[0].attn.vpetl_patt.down.weight.dtype == expected
    out = half(images.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert half.blocks[0].vpetl_adapter.up.weight.grad.dtype == expected
