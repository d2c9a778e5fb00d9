"""inject: trainable sets, identity at init, frozen base, Eq. 10, errors, never-called branches."""

from __future__ import annotations

import copy
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vpetl
from vpetl.record import get_record

from conftest import METHOD_OPTIONS, tiny_vit, trainable_count

DEPTH = 2


def _names(prefix_fmt: str, leaves: list[str]) -> set[str]:
    return {f"{prefix_fmt.format(i)}.{leaf}" for i in range(DEPTH) for leaf in leaves}


PATT_LEAVES = ["down.weight", "down.bias", "up.weight", "up.bias"]
HEAD = {"head.weight", "head.bias"}


def expected_trainable(method: str, base: set[str]) -> set[str]:
    patt = _names("blocks.{}.attn.vpetl_patt", PATT_LEAVES)
    adapter = _names("blocks.{}.vpetl_adapter", PATT_LEAVES)
    lora = _names("blocks.{}.attn.vpetl_lora", ["q.down.weight", "q.up.weight", "v.down.weight", "v.up.weight"])
    prefix = _names("blocks.{}.attn.vpetl_prefix", ["tokens", *PATT_LEAVES])
    adapter_plus = _names("blocks.{}.vpetl_adapter_plus", [*PATT_LEAVES, "scale"])
    houlsby = _names("blocks.{}.vpetl_houlsby", [f"{s}.{leaf}" for s in ("attn", "mlp") for leaf in PATT_LEAVES])
    pfeiffer = _names("blocks.{}.vpetl_pfeiffer", ["norm.weight", "norm.bias", *PATT_LEAVES])
    fact_tt = ({"vpetl_fact.u.weight", "vpetl_fact.v.weight"} | _names("blocks.{}.attn.vpetl_fact", ["t_q", "t_k", "t_v"])
               | _names("blocks.{}", ["attn.proj.vpetl_fact.t", "mlp.fc1.vpetl_fact.t", "mlp.fc2.vpetl_fact.t"]))
    repadapter = _names("blocks.{}.vpetl_repadapter", [f"{r}.{leaf}" for r in ("attn", "mlp") for leaf in PATT_LEAVES])
    convpass = _names("blocks.{}.vpetl_convpass", [f"{r}.{m}.{p}" for r in ("attn", "mlp")
                                                   for m in ("down", "conv", "up") for p in ("weight", "bias")])
    ssf = {f"{p}.vpetl_ssf.{leaf}" for p in ["patch_embed.proj", "norm", *[f"blocks.{i}.{m}" for i in range(DEPTH)
           for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]] for leaf in ("scale", "shift")}
    dora = _names("blocks.{}.attn.qkv.vpetl_dora", ["down.weight", "up.weight", "magnitude"])
    return {
        "dora": dora | HEAD,
        "ssf": ssf | HEAD,
        "repadapter": repadapter | HEAD,
        "convpass": convpass | HEAD,
        "adapter_plus": adapter_plus | HEAD,
        "houlsby": houlsby | HEAD,
        "pfeiffer": pfeiffer | HEAD,
        "fact_tt": fact_tt | HEAD,
        "fact_tk": {"vpetl_fact.u.weight", "vpetl_fact.v.weight", "vpetl_fact.c", "vpetl_fact.p"} | HEAD,
        "prefix": prefix | HEAD,
        "vpt": {"blocks.0.vpetl_prompt.tokens"} | HEAD,
        "tune": _names("blocks.{}.norm1", ["weight", "bias"]) | _names("blocks.{}.attn.qkv", ["weight", "bias"]) | HEAD,
        "patt": patt | HEAD,
        "adapter": adapter | HEAD,
        "bapat": patt | adapter | HEAD,
        "lora": lora | HEAD,
        "bitfit": {n for n in base if n.endswith("bias")} | HEAD,
        "linear": HEAD,
        "full": base,
    }[method]


@pytest.mark.parametrize("method", vpetl.METHODS)
def test_exact_trainable_keys_per_method(method):
    model = tiny_vit()
    base_names = set(dict(model.named_parameters()))
    vpetl.inject(model, method, **METHOD_OPTIONS.get(method, {}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(method, base_names)
    assert set(get_record(model).delta_names) == trainable


def test_train_head_false_freezes_the_head():
    model = vpetl.inject(tiny_vit(), "patt", train_head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _names("blocks.{}.attn.vpetl_patt", PATT_LEAVES)


def test_paper_parameter_count_vit_tiny_bapat16():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    vpetl.inject(model, "bapat", d_bottle=16)
    assert trainable_count(model) == 415_306
    assert vpetl.summary(model).trainable_by_kind == {"patt": 12 * 9_616, "adapter": 12 * 24_832, "head": 1_930}


def test_base_state_dict_keys_unchanged_and_base_checkpoint_loads(vit):
    before = copy.deepcopy(vit.state_dict())
    vpetl.inject(vit, "bapat", d_bottle=8)
    after = vit.state_dict()
    assert {k for k in after if "vpetl_" not in k} == set(before)
    missing, unexpected = vit.load_state_dict(before, strict=False)
    assert unexpected == [] and all("vpetl_" in k for k in missing)


@pytest.mark.parametrize("method", ["patt", "bapat", "adapter", "lora"])
def test_zero_init_is_identity_at_init(method, images):
    base = tiny_vit()
    model = vpetl.inject(copy.deepcopy(base), method, zero_init=method in ("patt", "bapat"))
    for mode in (True, False):
        base.train(mode), model.train(mode)
        assert torch.equal(model(images), base(images))


def test_patt_default_init_changes_the_function(images):
    base = tiny_vit()
    model = vpetl.inject(copy.deepcopy(base), "patt")
    assert not torch.allclose(model(images), base(images))


def test_base_weights_bit_exact_after_optimizer_steps(images):
    model = vpetl.inject(tiny_vit(), "bapat", d_bottle=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # as users write it
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        opt.zero_grad()
        model(images).logsumexp(-1).mean().backward()
        opt.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None, name
            assert torch.equal(param, frozen[name]), name
        else:
            assert not torch.equal(param, trained_before[name]), f"{name} did not train"


def reference_patt_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eq. 10 written out by hand for timm's Attention: the branch added to the projections."""
    patt = attn.vpetl_patt
    B, N, C = x.shape
    H = attn.num_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(C, dim=-1)
    proj = {"q": q, "k": k, "v": v}
    hidden = torch.tanh(x @ patt.down.weight.T + patt.down.bias)
    delta = hidden @ patt.up.weight.T + patt.up.bias
    for i, letter in enumerate(patt.positions):
        proj[letter] = proj[letter] + patt.scale * delta[..., i * C : (i + 1) * C]
    q, k, v = (proj[c].view(B, N, H, C // H).transpose(1, 2) for c in "qkv")
    weights = torch.softmax(q @ k.transpose(-2, -1) / (C // H) ** 0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


@pytest.mark.parametrize("positions", ["kv", "qv", "qk", "qkv", "v"])
def test_patt_matches_hand_written_eq10(positions):
    model = vpetl.inject(tiny_vit(), "patt", d_bottle=5, positions=positions, scale=0.7)
    attn = model.blocks[0].attn
    x = torch.randn(3, 17, 32)
    torch.testing.assert_close(attn(x), reference_patt_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_patt_gradients_match_reference():
    model = vpetl.inject(tiny_vit(), "patt", d_bottle=4, positions="qkv")
    attn = model.blocks[1].attn
    x = torch.randn(2, 17, 32, requires_grad=True)
    grads = torch.autograd.grad(attn(x).square().sum(), [x, *attn.vpetl_patt.parameters()])
    ref = torch.autograd.grad(reference_patt_attention(attn, x).square().sum(), [x, *attn.vpetl_patt.parameters()])
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_branch_output_is_added_in_place_without_copies():
    """PATT-kv on a fused qkv is one addmm_ into the (M, 2d) K/V block of the output."""
    model = vpetl.inject(tiny_vit(), "patt", d_bottle=4)
    qkv = model.blocks[0].attn.qkv
    calls = []
    original = torch.Tensor.addmm_

    def spy(self, *args, **kwargs):
        calls.append((self.shape, self.stride()))
        return original(self, *args, **kwargs)

    torch.Tensor.addmm_ = spy
    try:
        qkv(torch.randn(2, 17, 32))
    finally:
        torch.Tensor.addmm_ = original
    assert calls == [((34, 64), (96, 1))]


def test_inject_twice_raises(vit):
    vpetl.inject(vit, "patt")
    with pytest.raises(vpetl.InjectionError, match="already injected \\(method 'patt'\\).*vpetl.unload"):
        vpetl.inject(vit, "lora")


def test_inject_rejects_bad_arguments(vit, monkeypatch):
    with pytest.raises(ValueError, match="unknown method 'patt2'"):
        vpetl.inject(vit, "patt2")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vpetl.inject("vit", "patt")
    with pytest.raises(vpetl.ConfigError, match="either an InjectConfig or keyword options"):
        vpetl.inject(vit, vpetl.preset("patt"), d_bottle=3)
    # where the kernels cannot run (no CUDA device here; on a GPU machine: as if Triton were missing)
    monkeypatch.setattr(sys.modules["vpetl.inject"], "triton_available", lambda: False)
    with pytest.raises(vpetl.ConfigError, match="kernel=.triton. needs the Triton kernels"):
        vpetl.inject(vit, "patt", kernel="triton")
    assert get_record(vit) is None and all(p.requires_grad for p in vit.parameters())


class ConvQkvAttention(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)

    def forward(self, x):
        return self.qkv(x)[:, :8]


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = tiny_vit()
        self.conv_attn = ConvQkvAttention()


def test_unadaptable_attention_raises_with_path_and_class():
    with pytest.raises(vpetl.InjectionError, match=r"conv_attn \(ConvQkvAttention\).*strict=False"):
        vpetl.inject(Mixed(), "patt")


def test_strict_false_warns_and_adapts_the_rest():
    model = Mixed()
    with pytest.warns(UserWarning, match="conv_attn"):
        vpetl.inject(model, "patt", strict=False)
    assert isinstance(model.vit.blocks[0].attn.vpetl_patt, nn.Module)


def test_model_without_attention_raises():
    with pytest.raises(vpetl.InjectionError, match=r"found no attention module in Sequential \(it contains 1 Linear\).*method .linear., .bitfit. or .full."):
        vpetl.inject(nn.Sequential(nn.Linear(4, 4)), "bapat")
    # methods without branches need no attention
    assert vpetl.inject(nn.Sequential(nn.Linear(4, 4)), "bitfit")


class WeightReadingAttention(nn.Module):
    """Reads ``qkv.weight`` itself, bypassing any wrapper of the Linear (DESIGN.md §3 pitfall)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


def test_branch_never_called_raises_on_first_forward():
    model = vpetl.inject(nn.Sequential(WeightReadingAttention()), "patt", d_bottle=2)
    with pytest.raises(vpetl.InjectionError, match=r"never called in forward.*0\.vpetl_patt"):
        model(torch.randn(1, 4, 8))


def test_branch_never_called_raises_at_inject_with_example_input():
    with pytest.raises(vpetl.InjectionError, match="never called"):
        vpetl.inject(nn.Sequential(WeightReadingAttention()), "patt", example_input=torch.randn(1, 4, 8))


def test_first_forward_check_runs_once_and_passes(vit, images):
    vpetl.inject(vit, "bapat", d_bottle=4)
    assert len(vit._forward_hooks) == 1
    vit(images)
    assert len(vit._forward_hooks) == 0 and not get_record(vit).hooks
    vpetl.verify(vit, images)


def test_deepcopy_of_injected_model_is_independent(vit, images):
    vpetl.inject(vit, "bapat", d_bottle=4)
    clone = copy.deepcopy(vit)
    torch.testing.assert_close(clone(images), vit(images))
    vpetl.unload(clone)
    assert get_record(vit) is not None
    assert type(vit.blocks[0].attn.qkv).__name__ == "BranchedLinear"
    assert type(clone.blocks[0].attn.qkv) is nn.Linear


def test_autocast_bfloat16_forward_and_backward(images):
    model = vpetl.inject(tiny_vit(), "bapat", d_bottle=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    out.float().sum().backward()
    assert model.blocks[0].attn.vpetl_patt.down.weight.grad is not None


class ClassAttention(nn.Module):
    """CaiT-style: q reads the class token only, k and v read every token (separate Linears)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        q = self.q(x[:, :1])
        return F.scaled_dot_product_attention(q, self.k(x), self.v(x))


def test_patt_hidden_is_shared_by_k_and_v_and_not_kept_after_forward():
    model = vpetl.inject(nn.Sequential(ClassAttention()), "patt", d_bottle=3, positions="qkv")
    patt = model[0].vpetl_patt
    calls = []
    patt.down.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 5, 8)
    out = model(x)
    assert len(calls) == 2  # once for q's input, once shared by k and v
    assert patt._cache is None  # no activation (nor its graph) outlives the call
    h = lambda t: torch.tanh(patt.down(t))  # noqa: E731
    up = lambda t, rows: F.linear(h(t), patt.up.weight[rows], patt.up.bias[rows])  # noqa: E731
    base = {c: (getattr(model[0], c).weight, getattr(model[0], c).bias) for c in "qkv"}
    q = F.linear(x[:, :1], *base["q"]) + patt.scale * up(x[:, :1], slice(0, 8))
    k = F.linear(x, *base["k"]) + patt.scale * up(x, slice(8, 16))
    v = F.linear(x, *base["v"]) + patt.scale * up(x, slice(16, 24))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
