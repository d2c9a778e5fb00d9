"""FacT-TT / FacT-TK (vpetl.methods.fact): the equations against a hand-written reference of the
official code, the paper's parameter counts on ViT-B/16, training, errors, delta files, merge."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import tiny_hf_vit, tiny_swin3d, tiny_vit
from torch import nn

import vpetl
from vpetl.methods.fact import FactTK, FactTT


def perturb(model: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Random FacT parameters (V is zero at init, which would hide every other factor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vpetl_fact" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def hf_images():
    torch.manual_seed(2)
    return torch.randn(2, 3, 32, 32)


# --------------------------------------------------------------------------- the equations


def _base(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ linear.weight.t() + linear.bias


def test_tt_equations_match_a_hand_written_reference():
    s, r = 0.7, 4
    model = perturb(vpetl.inject(tiny_vit(), "fact_tt", d_bottle=r, scale=s)).eval()
    U, V = model.vpetl_fact.u.weight, model.vpetl_fact.v.weight  # (r, D), (D, r)
    blk = model.blocks[1]
    T = {c: getattr(blk.attn.vpetl_fact, f"t_{c}") for c in "qkv"}
    T["o"], T1, T2 = blk.attn.proj.vpetl_fact.t, blk.mlp.fc1.vpetl_fact.t, blk.mlp.fc2.vpetl_fact.t
    assert T["q"].shape == (r, r) and T1.shape == (4 * r, r) and T2.shape == (r, 4 * r)
    x, h = torch.randn(2, 5, 32), torch.randn(2, 5, 128)

    def lin(z, w):  # nn.Linear without bias, as the official q_FacTs / fc1_FacTs
        return z @ w.t()

    with torch.no_grad():
        u = lin(x, U)
        expected_qkv = _base(blk.attn.qkv, x) + s * torch.cat([lin(lin(u, T[c]), V) for c in "qkv"], -1)
        torch.testing.assert_close(blk.attn.qkv(x), expected_qkv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(blk.attn.proj(x), _base(blk.attn.proj, x) + s * lin(lin(u, T["o"]), V))
        fc1 = lin(lin(u, T1).reshape(2, 5, 4, r), V).reshape(2, 5, 128)
        torch.testing.assert_close(blk.mlp.fc1(x), _base(blk.mlp.fc1, x) + s * fc1)
        fc2 = lin(lin(lin(h.reshape(2, 5, 4, 32), U).reshape(2, 5, 4 * r), T2), V)
        torch.testing.assert_close(blk.mlp.fc2(h), _base(blk.mlp.fc2, h) + s * fc2)


def test_tk_equations_match_a_hand_written_reference():
    """Official fact_tk.py: ``K = C @ P[:, idx:idx+n]``, ``q = V(U(x) @ K[:, :, 0])``, fc1/fc2 from
    ``K[:, :, :4].reshape(r, 4r)`` / ``K[:, :, 4:].reshape(r, 4r)``; block 1 starts at slice 12."""
    s, r = 2.0, 4
    model = perturb(vpetl.inject(tiny_vit(), "fact_tk", d_bottle=r, scale=s), std=0.5).eval()
    shared = model.vpetl_fact
    U, V, C, P = shared.u.weight, shared.v.weight, shared.c, shared.p
    assert C.shape == (r, r, r) and P.shape == (r, 24)
    blk, idx = model.blocks[1], 12
    x, h = torch.randn(2, 5, 32), torch.randn(2, 5, 128)
    with torch.no_grad():
        u = x @ U.t()
        attn = C @ P[:, idx:idx + 4]
        expected_qkv = _base(blk.attn.qkv, x) + s * torch.cat([(u @ attn[:, :, j]) @ V.t() for j in range(3)], -1)
        torch.testing.assert_close(blk.attn.qkv(x), expected_qkv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(blk.attn.proj(x), _base(blk.attn.proj, x) + s * (u @ attn[:, :, 3]) @ V.t())
        mlp = C @ P[:, idx + 4:idx + 12]
        fc1_core, fc2_core = mlp[:, :, :4].reshape(r, 4 * r), mlp[:, :, 4:].reshape(r, 4 * r)
        fc1 = ((u @ fc1_core).reshape(2, 5, 4, r) @ V.t()).reshape(2, 5, 128)
        torch.testing.assert_close(blk.mlp.fc1(x), _base(blk.mlp.fc1, x) + s * fc1, rtol=1e-5, atol=1e-5)
        fc2 = ((h.reshape(2, 5, 4, 32) @ U.t()).reshape(2, 5, 4 * r) @ fc2_core.t()) @ V.t()
        torch.testing.assert_close(blk.mlp.fc2(h), _base(blk.mlp.fc2, h) + s * fc2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_identity_at_init_and_dropout_only_in_training(method, images):
    base = tiny_vit()
    model = vpetl.inject(copy.deepcopy(base), method, d_bottle=4)
    for mode in (True, False):  # V = 0: the model is unchanged at step 0, dropout or not
        assert torch.equal(model.train(mode)(images), base.train(mode)(images))
    perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model.train()(images), model.eval()(images))  # dropout 0.1 on the cores
    quiet = perturb(vpetl.inject(copy.deepcopy(base), method, d_bottle=4, dropout=0.0))
    with torch.no_grad():
        assert torch.equal(quiet.train()(images), quiet.eval()(images))


def test_official_inits():
    model = vpetl.inject(tiny_vit(), "fact_tt", d_bottle=4)
    assert torch.count_nonzero(model.vpetl_fact.v.weight) == 0  # V zero
    assert torch.count_nonzero(model.vpetl_fact.u.weight) > 0  # U nn.Linear default
    core = model.blocks[0].mlp.fc2.vpetl_fact.t  # nn.Linear(4r, r) default: U(+-1/sqrt(4r))
    assert 0 < core.abs().max() <= 1 / (4 * 4) ** 0.5
    tk = vpetl.inject(tiny_vit(), "fact_tk", d_bottle=4).vpetl_fact
    assert 0 < tk.c.abs().max() <= (6 / 32) ** 0.5 and 0 < tk.p.abs().max() <= (6 / 28) ** 0.5  # xavier


# --------------------------------------------------------------------------- counts and options


def test_paper_parameter_counts_on_vit_b16():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    for method, rank, count in [("fact_tt", 8, 21_504), ("fact_tt", 16, 61_440),
                                ("fact_tk", 16, 30_976), ("fact_tk", 32, 86_528)]:
        vpetl.inject(model, method, d_bottle=rank)
        assert vpetl.summary(model).trainable_by_kind == {"fact": count}, (method, rank)
        vpetl.unload(model)
    vpetl.inject(model, "fact_tk")  # default rank 32
    assert vpetl.summary(model).trainable_by_kind == {"fact": 86_528}


def test_defaults_and_options_by_name():
    assert (FactTT().rank, FactTT().scale, FactTT().dropout) == (8, 1.0, 0.1)
    assert (FactTK().rank, FactTK().scale, FactTK().dropout) == (32, 1.0, 0.1)
    config = vpetl.preset("fact_tk", d_bottle=6, scale=10, dropout=0.0)
    assert config.methods == (FactTK(rank=6, scale=10.0, dropout=0.0),)
    with pytest.raises(vpetl.ConfigError, match="fact_tt rank"):
        FactTT(rank=0)
    with pytest.raises(vpetl.ConfigError, match="dropout"):
        vpetl.inject(tiny_vit(), "fact_tt", dropout=1.0)
    with pytest.raises(vpetl.ConfigError, match="both add 'fact' parameters"):
        vpetl.inject(tiny_vit(), [FactTT(), FactTK()])


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
@pytest.mark.parametrize("build", [tiny_vit, tiny_hf_vit], ids=["timm", "hf"])
def test_forward_backward_trains_only_fact_and_head(method, build):
    model = perturb(vpetl.inject(build(), method, d_bottle=4))
    out = model(hf_images())
    (out.logits if hasattr(out, "logits") else out).square().mean().backward()
    fact = {n: p for n, p in model.named_parameters() if "vpetl_fact" in n}
    leaves = {n.rsplit("vpetl_fact.", 1)[1] for n in fact}
    assert leaves == ({"u.weight", "v.weight", "c", "p"} if method == "fact_tk" else
                      {"u.weight", "v.weight", "t", "t_q", "t_k", "t_v"})
    for name, param in fact.items():
        assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in model.named_parameters():
        if "vpetl_fact" not in name and not param.requires_grad:
            assert param.grad is None, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all("vpetl" not in n for n in frozen)


def test_hf_vit_keys():
    model = vpetl.inject(tiny_hf_vit(), "fact_tt", d_bottle=4)
    names = {n for n, p in model.named_parameters() if "vpetl_fact" in n}
    assert "vit.layers.0.attention.vpetl_fact.t_q" in names
    assert {"vit.layers.1.attention.o_proj.vpetl_fact.t", "vit.layers.1.mlp.fc2.vpetl_fact.t"} <= names
    assert model.vit.layers[0].mlp.fc1.vpetl_fact.t.shape == (8, 4)  # MLP ratio 2 here: 2 slices


def test_swin3d_is_refused_clearly():
    with pytest.raises(vpetl.InjectionError, match=r"constant-width ViTs.*widths 16 .*32 .*use lora, patt"):
        vpetl.inject(tiny_swin3d(), "fact_tt")


def test_torchscript_is_refused_and_trace_reproduces(images):
    model = perturb(vpetl.inject(tiny_vit(), "fact_tk", d_bottle=4)).eval()
    with pytest.raises(vpetl.ExportError):
        torch.jit.script(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, images)
        torch.testing.assert_close(traced(images), model(images), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- delta files and merge


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_delta_round_trip(method, tmp_path, images):
    trained = perturb(vpetl.inject(tiny_vit(), method, d_bottle=4, scale=0.5)).eval()
    path = vpetl.save_delta(trained, tmp_path / f"{method}.safetensors")
    fresh = vpetl.load_delta(tiny_vit(), path)
    assert fresh.__dict__["_vpetl"].config == trained.__dict__["_vpetl"].config
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), trained(images))


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
@pytest.mark.parametrize("build", [tiny_vit, tiny_hf_vit], ids=["timm", "hf"])
def test_merge_is_exact_and_leaves_the_plain_model(method, build):
    x = hf_images()
    plain = build()
    keys, types = set(plain.state_dict()), {n: type(m) for n, m in plain.named_modules()}
    model = perturb(vpetl.inject(plain, method, d_bottle=4, scale=0.5)).eval()

    def run(m):
        out = m(x)
        return out.logits if hasattr(out, "logits") else out

    with torch.no_grad():
        expected = run(model)
        assert vpetl.merge(model) is model
        assert set(model.state_dict()) == keys and {n: type(m) for n, m in model.named_modules()} == types
        torch.testing.assert_close(run(model.eval()), expected, rtol=1e-5, atol=1e-5)
