"""DoRA: the equation with its detached row norm, counts, forward/backward on three model
families, delta round trip, exact merge, composition rules."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import logits, tiny_hf_vit, tiny_swin3d, tiny_vit
from torch import nn

import vpetl
from vpetl.inject import branches_of
from vpetl.methods.dora import DoRA, DoraBranch
from vpetl.record import get_record


def _perturb(model: nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".vpetl_dora." in name:
                param.add_(torch.randn_like(param) * (0.1 if name.endswith("magnitude") else 0.2))


def get_entry(model: nn.Module) -> DoRA:
    return get_record(model).config.find(DoRA)


def _hand(W, m, A, B, s, detach=True):
    V = W + s * B @ A
    n = V.norm(dim=1)
    return (m / (n.detach() if detach else n))[:, None] * V


def test_defaults_follow_the_official_code():
    entry = DoRA()
    assert (entry.rank, entry.scale, entry.targets, entry.positions, entry.dropout) == (8, 2.0, ("qkv",), "", 0.0)
    assert DoRA(positions="vq").targets == () and DoRA(positions="vq").positions == "qv"
    assert DoRA(linears="fc1,qkv").targets == ("qkv", "fc1")
    for bad, match in [({"linears": ["qkv"], "positions": "q"}, "choose one"), ({"linears": []}, "needs a target"),
                       ({"linears": ["mlp"]}, "unknown"), ({"dropout": 1.0}, r"\[0, 1\)"), ({"rank": 0}, "positive")]:
        with pytest.raises(vpetl.ConfigError, match=match):
            DoRA(**bad)


def test_one_linear_matches_the_equation_and_its_detached_gradient():
    model = vpetl.inject(tiny_vit(), "dora", scale=1.5)
    _perturb(model)
    qkv = model.blocks[0].attn.qkv
    branch = qkv.vpetl_dora
    W = qkv._parameters["weight"]
    m, A, B = branch.magnitude, branch.down.weight, branch.up.weight
    x = torch.randn(4, 32)
    torch.testing.assert_close(qkv.weight, _hand(W, m, A, B, 1.5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv(x), F.linear(x, _hand(W, m, A, B, 1.5), qkv.bias), rtol=1e-5, atol=1e-5)

    target = torch.randn(4, 96)
    grads = torch.autograd.grad((qkv(x) - target).square().sum(), (m, A, B))
    leaves = [t.detach().clone().requires_grad_() for t in (m, A, B)]
    hand = torch.autograd.grad((F.linear(x, _hand(W, *leaves, 1.5), qkv.bias) - target).square().sum(), leaves)
    for got, want in zip(grads, hand):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    full = torch.autograd.grad(
        (F.linear(x, _hand(W, *leaves, 1.5, detach=False), qkv.bias) - target).square().sum(), leaves)
    assert not torch.allclose(grads[1], full[1], rtol=1e-3)  # the norm really is detached


def test_step_zero_is_the_plain_model(images):
    plain = tiny_vit().eval()
    model = vpetl.inject(copy.deepcopy(plain), "dora", linears=["qkv", "proj", "fc1", "fc2"])
    torch.testing.assert_close(model(images), plain(images), rtol=1e-6, atol=1e-6)


def test_vit_base_count_is_322560():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vpetl.inject(model, "dora", d_bottle=8, train_head=False)
    assert 12 * (8 * (768 + 2304) + 2304) == 322_560
    assert vpetl.summary(model).trainable_by_kind == {"dora": 322_560}


def test_inject_by_name_with_d_bottle():
    model = vpetl.inject(tiny_vit(), "dora", d_bottle=4, linears=["qkv", "fc1"], train_head=False)
    entry = get_entry(model)
    assert entry.rank == 4 and entry.linears == ("qkv", "fc1")
    assert vpetl.summary(model).trainable == 2 * (4 * (32 + 96) + 96 + 4 * (32 + 128) + 128)


def test_fused_qkv_slots_leave_other_rows_frozen():
    model = vpetl.inject(tiny_vit(), "dora", positions="qv", d_bottle=2)
    _perturb(model)
    qkv = model.blocks[1].attn.qkv
    W, branch = qkv._parameters["weight"], qkv.vpetl_dora
    assert sorted(n for n, _ in branch.named_parameters()) == [
        "q.down.weight", "q.magnitude", "q.up.weight", "v.down.weight", "v.magnitude", "v.up.weight"]
    got = qkv.weight
    for i, c in enumerate("qkv"):
        rows = slice(32 * i, 32 * (i + 1))
        if c == "k":
            assert torch.equal(got[rows], W[rows])
        else:
            part = getattr(branch, c)
            want = _hand(W[rows], part.magnitude, part.down.weight, part.up.weight, 2.0)
            torch.testing.assert_close(got[rows], want, rtol=1e-6, atol=1e-6)
    assert vpetl.summary(model).trainable_by_kind["dora"] == 2 * 2 * (2 * (32 + 32) + 32)


MODELS = {
    "timm_vit": (tiny_vit, (2, 3, 32, 32)),
    "swin3d": (tiny_swin3d, (1, 3, 4, 32, 32)),
    "hf_vit": (tiny_hf_vit, (2, 3, 32, 32)),
}



@pytest.mark.parametrize("family", list(MODELS))
def test_forward_backward_and_exact_merge(family):
    factory, shape = MODELS[family]
    plain = factory().eval()
    x = torch.randn(*shape)
    model = vpetl.inject(copy.deepcopy(plain), "dora", d_bottle=2, linears=["qkv", "proj", "fc1", "fc2"],
                         example_input=x)
    dora = {n: p for n, p in model.named_parameters() if ".vpetl_dora." in n}
    per_block = 3 if family == "hf_vit" else 1  # HF: query, key and value are three Linears
    assert len(branches_of(model)) == len(dora) // 3 == (per_block + 3) * (4 if family == "swin3d" else 2)
    _perturb(model)
    logits(model, x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dora.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "vpetl" not in n and "head" not in n
               and "classifier" not in n)
    with torch.no_grad():
        expected = logits(model, x)
        # the hand-made plain model: every adapted weight replaced by W'
        ref = copy.deepcopy(plain)
        for path, branch in branches_of(model).items():
            linear = ref.get_submodule(path.rpartition(".")[0])
            linear.weight.copy_(_hand(linear.weight, branch.magnitude, branch.down.weight, branch.up.weight, 2.0))
        torch.testing.assert_close(logits(ref, x), expected, rtol=1e-5, atol=1e-5)
    vpetl.merge(model)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in plain.named_modules()}
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


def test_merge_of_slots_is_exact(images):
    model = vpetl.inject(tiny_vit(), "dora", positions="kv", d_bottle=3)
    _perturb(model)
    expected = model(images)
    vpetl.merge(model)
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path, images):
    model = vpetl.inject(tiny_vit(), "dora", d_bottle=3, linears=["qkv", "fc2"])
    _perturb(model)
    expected = model(images)
    path = vpetl.save_delta(model, tmp_path / "dora.safetensors")
    fresh = vpetl.load_delta(tiny_vit(), path)
    assert get_entry(fresh) == get_entry(model)
    torch.testing.assert_close(fresh(images), expected, rtol=1e-6, atol=1e-6)


def test_cannot_combine_with_lora():
    with pytest.raises(vpetl.ConfigError, match="'lora' and 'dora' cannot be combined: DoRA already holds"):
        vpetl.inject(tiny_vit(), [vpetl.LoRA(), DoRA()])
    with pytest.raises(vpetl.ConfigError, match="cannot be combined"):
        vpetl.InjectConfig(methods=(DoRA(linears=["fc1"]), vpetl.LoRA()))


@pytest.mark.parametrize("family", ["timm_vit", "hf_vit", "swin3d"])
def test_composes_with_patt_on_the_same_qkv(family):
    """PATT's branched projection adopts the DoRA Linear's Parameters and reads ``W'`` through
    ``_vpetl_effective``: the sum is PATT on the plain model whose q/k/v weights are ``W'``."""
    factory, shape = MODELS[family]
    plain = factory().eval()
    x = torch.randn(*shape)
    entries = [vpetl.PATT(d_bottle=4), DoRA(rank=2)]
    model = vpetl.inject(copy.deepcopy(plain), entries, example_input=x)
    assert set(vpetl.summary(model).trainable_by_kind) == {"patt", "dora", "head"}
    _perturb(model)
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for path, branch in branches_of(model).items():
            if isinstance(branch, DoraBranch):
                linear = ref.get_submodule(path.rpartition(".")[0])
                linear.weight.copy_(_hand(linear.weight, branch.magnitude, branch.down.weight, branch.up.weight, 2.0))
    patt = {n: p for n, p in model.named_parameters() if ".vpetl_patt." in n}
    vpetl.inject(ref, [vpetl.PATT(d_bottle=4)])
    ref.load_state_dict({**ref.state_dict(), **patt})
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    logits(model, x).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".vpetl_dora." in n)
    vpetl.unload(model)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in plain.named_modules()}


@pytest.mark.parametrize("grad", [False, True])
def test_multihead_attention_in_proj_weight(grad):
    """``nn.MultiheadAttention`` holds q/k/v in ``in_proj_weight``: DoRA adapts that Parameter
    (torchvision ViT); in eval without grad the layer's native fast path reads it too."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)).eval()
    x = torch.randn(2, 5, 16)
    model = vpetl.inject(copy.deepcopy(plain), "dora", d_bottle=2, linears=["qkv", "fc1"], example_input=x)
    assert sorted(branches_of(model)) == ["0.linear1.vpetl_dora", "0.self_attn.vpetl_dora"]
    _perturb(model)
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for path, branch in branches_of(model).items():
            owner = ref.get_submodule(path.rpartition(".")[0])
            W = owner.in_proj_weight if hasattr(owner, "in_proj_weight") else owner.weight
            W.copy_(_hand(W, branch.magnitude, branch.down.weight, branch.up.weight, 2.0))
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    vpetl.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(vpetl.InjectionError, match="in_proj_weight. Use dropout=0"):
        vpetl.inject(copy.deepcopy(plain), "dora", dropout=0.1)


def test_dropout_follows_the_official_forward():
    model = vpetl.inject(tiny_vit(), "dora", dropout=0.5, linears=["fc1"])
    _perturb(model)
    fc1 = model.blocks[0].mlp.fc1
    x = torch.randn(6, 32)
    W, b = fc1._parameters["weight"], fc1.bias
    adapted = fc1.weight
    fc1.eval()
    torch.testing.assert_close(fc1(x), F.linear(x, adapted, b))
    fc1.train()
    torch.manual_seed(0)
    got = fc1(x)
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got, F.linear(x, W, b) + F.linear(dropped, adapted - W), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)  # the hook is a bound method of the branch: the copy's own
    assert twin.blocks[0].mlp.fc1._forward_hooks and not model.blocks[1].attn.qkv._forward_hooks
    torch.testing.assert_close(twin.eval()(torch.ones(1, 3, 32, 32)), model.eval()(torch.ones(1, 3, 32, 32)))
    # PATT on the same fused qkv still wraps it (the Linear keeps nn.Linear's forward)
    vpetl.inject(tiny_vit(), [vpetl.PATT(d_bottle=4), DoRA(dropout=0.1)], example_input=torch.ones(1, 3, 32, 32))


def test_branch_tensors_follow_branch_dtype():
    model = tiny_vit().to(torch.bfloat16)
    vpetl.inject(model, "dora", branch_dtype="float32")
    branch = model.blocks[0].attn.qkv.vpetl_dora
    assert isinstance(branch, DoraBranch) and branch.magnitude.dtype == torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    out = model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert branch.magnitude.grad is not None


def test_starts_from_an_earlier_methods_effective_weight(images):
    """SSF then DoRA on the same Linears: DoRA's ``W`` is SSF's ``gamma * W`` (m initialised from
    it), so at step 0 the pair computes what SSF alone computes; DoRA's branch is then live."""
    ssf = vpetl.REGISTRY["ssf"]
    alone = vpetl.inject(tiny_vit().eval(), [ssf()])
    both = vpetl.inject(tiny_vit().eval(), [ssf(), DoRA(linears=["qkv", "fc1"])], example_input=images)
    ssf_params = {n: p for n, p in alone.named_parameters() if ".vpetl_ssf." in n}
    assert all(torch.equal(p, both.get_parameter(n)) for n, p in ssf_params.items())  # same seed, same gamma/beta
    with torch.no_grad():
        torch.testing.assert_close(both(images), alone(images), rtol=1e-5, atol=1e-5)
        _perturb(both)
        assert not torch.allclose(both(images), alone(images), atol=1e-3)
