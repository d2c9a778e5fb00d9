"""LoRA beyond q/k/v: whole Linears (proj, fc1, fc2), per-target ranks, rsLoRA scaling, exact merge."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import logits, tiny_hf_vit, tiny_swin3d, tiny_vit
from torch import nn

import vpetl
from vpetl.inject import branches_of
from vpetl.methods.lora import LinearLoraBranch, LoraBranch
from vpetl.record import get_record

ALL = {"positions": "qkv", "linears": ["proj", "fc1", "fc2"]}


def _perturb(model: nn.Module, std: float = 0.2) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".vpetl_lora." in name:
                param.normal_(0, std)


def test_defaults_keep_the_0_1_0_config_and_keys():
    assert vpetl.LoRA() == vpetl.LoRA(rank=16, scale=1.0, positions="qv")
    assert vpetl.LoRA().to_dict() == {"name": "lora", "rank": 16, "scale": 1.0, "positions": "qv", "linears": [],
                                      "ranks": [], "rslora": False}
    assert vpetl.REGISTRY["lora"].kind == "lora"
    model = vpetl.inject(tiny_vit(), "lora")
    names = [n for n, p in model.named_parameters() if p.requires_grad and "vpetl" in n]
    assert names == [f"blocks.{i}.attn.vpetl_lora.{c}.{w}.weight" for i in range(2) for c in "qv" for w in ("down", "up")]


def test_options_are_validated_and_normalised():
    lora = vpetl.LoRA(linears="fc2, proj", ranks={"fc2": 8, "q": 4}, positions="vq")
    assert lora.linears == ("proj", "fc2") and lora.positions == "qv" and lora.ranks == (("fc2", 8), ("q", 4))
    assert vpetl.LoRA(ranks=[["q", 4]]).ranks == (("q", 4),)  # the JSON form a delta file holds
    assert vpetl.LoRA(positions="", linears=["fc1"]).positions == ""
    for bad, match in [
        ({"linears": ["fc3"]}, "unknown"),
        ({"linears": ["fc1", "fc1"]}, "repeats"),
        ({"ranks": {"fc1": 4}}, "not among the chosen targets"),
        ({"ranks": {"q": 0}}, "positive integer"),
        ({"ranks": 5}, "map targets to ranks"),
        ({"positions": ""}, "needs a target"),
        ({"positions": "qz"}, "unknown letters"),
        ({"rslora": "yes"}, "True or False"),
    ]:
        with pytest.raises(vpetl.ConfigError, match=match):
            vpetl.LoRA(**bad)


def test_linear_branch_matches_the_hand_formula():
    model = vpetl.inject(tiny_vit(), "lora", d_bottle=4, scale=0.5, positions="", linears=["fc1"])
    _perturb(model)
    fc1 = model.blocks[0].mlp.fc1
    branch = fc1.vpetl_lora
    x = torch.randn(3, 5, 32)
    W, b = fc1._parameters["weight"], fc1.bias
    A, B = branch.down.weight, branch.up.weight
    expected = x @ W.T + b + 0.5 * (x @ A.T) @ B.T
    torch.testing.assert_close(fc1(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fc1.weight, W + 0.5 * B @ A)  # what code reading .weight sees
    assert [k for k in model.state_dict() if k.startswith("blocks.0.mlp.fc1.")] == [
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc1.vpetl_lora.down.weight", "blocks.0.mlp.fc1.vpetl_lora.up.weight"]


def test_vit_base_count_matches_the_formula():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    vpetl.inject(model, "lora", d_bottle=4, positions="qv", linears=["proj", "fc1", "fc2"], train_head=False)
    d, hidden, r = 768, 3072, 4
    per_block = r * (d + d) * 2 + r * (d + d) + r * (d + hidden) + r * (hidden + d)  # q, v, proj, fc1, fc2
    assert per_block * 12 == 589_824
    assert vpetl.summary(model).trainable_by_kind == {"lora": 589_824}


def test_per_target_rank_changes_the_count_as_expected():
    d, hidden, blocks = 32, 128, 2
    base = vpetl.inject(tiny_vit(), "lora", d_bottle=4, linears=["fc1"], train_head=False)
    mixed = vpetl.inject(tiny_vit(), "lora", d_bottle=4, linears=["fc1"], ranks={"fc1": 8, "q": 2}, train_head=False)
    def count(model: nn.Module) -> int:
        return vpetl.summary(model).trainable

    assert count(base) == blocks * (4 * 2 * d * 2 + 4 * (d + hidden))
    assert count(mixed) - count(base) == blocks * ((8 - 4) * (d + hidden) + (2 - 4) * 2 * d)
    assert mixed.blocks[0].attn.vpetl_lora.q.down.weight.shape == (2, d)
    assert mixed.blocks[0].mlp.fc1.vpetl_lora.down.weight.shape == (8, d)


def test_scaling_standard_and_rslora():
    lora = vpetl.LoRA(rank=16, scale=0.5, linears=["fc1"], ranks={"fc1": 4})
    assert lora.multiplier("q") == 0.5  # the configured rank: scale itself
    assert lora.multiplier("fc1") == pytest.approx(0.5 * 16 / 4)  # alpha / r_t, alpha = scale * rank = 8
    rs = vpetl.LoRA(rank=16, scale=0.5, linears=["fc1"], ranks={"fc1": 4}, rslora=True)
    assert rs.multiplier("q") == pytest.approx(8 / math.sqrt(16))
    assert rs.multiplier("fc1") == pytest.approx(8 / math.sqrt(4))

    # numerically: the q slot and fc1 add alpha / sqrt(r) * B A x
    model = vpetl.inject(tiny_vit(), "lora", d_bottle=16, scale=0.5, positions="q", linears=["fc1"],
                         ranks={"fc1": 4}, rslora=True)
    _perturb(model)
    x = torch.randn(2, 7, 32)
    fc1 = model.blocks[1].mlp.fc1
    A, B = fc1.vpetl_lora.down.weight, fc1.vpetl_lora.up.weight
    plain = F.linear(x, fc1._parameters["weight"], fc1.bias)
    torch.testing.assert_close(fc1(x) - plain, 4.0 * (x @ A.T) @ B.T, rtol=1e-4, atol=1e-5)
    qkv, lq = model.blocks[1].attn.qkv, model.blocks[1].attn.vpetl_lora.q
    delta = qkv(x) - F.linear(x, qkv.weight, qkv.bias)
    torch.testing.assert_close(delta[..., :32], 2.0 * (x @ lq.down.weight.T) @ lq.up.weight.T, rtol=1e-4, atol=1e-5)
    assert delta[..., 32:].abs().max() == 0


def _hand_merged(plain: nn.Module, injected: nn.Module) -> nn.Module:
    """The plain model with ``s B A`` added to every adapted weight by hand."""
    ref = copy.deepcopy(plain)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for path, branch in branches_of(injected).items():
            owner = path.rpartition(".")[0]
            if isinstance(branch, LinearLoraBranch):
                params[f"{owner}.weight"] += branch.scale * branch.up.weight @ branch.down.weight
            elif isinstance(branch, LoraBranch):
                for letter in branch.positions:
                    pair = branch.pair(letter)
                    _add_slot(ref, owner, letter, branch.scales[letter] * pair.up.weight @ pair.down.weight)
    return ref


def _add_slot(ref: nn.Module, owner: str, letter: str, delta: torch.Tensor) -> None:
    attn = ref.get_submodule(owner)
    separate = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
    if hasattr(attn, "qkv"):
        i = "qkv".index(letter) * delta.shape[0]
        attn.qkv.weight[i : i + delta.shape[0]] += delta
    else:
        getattr(attn, separate[letter]).weight += delta


MODELS = {
    "timm_vit": (tiny_vit, (2, 3, 32, 32)),
    "swin3d": (tiny_swin3d, (1, 3, 4, 32, 32)),
    "hf_vit": (tiny_hf_vit, (2, 3, 32, 32)),
}



@pytest.mark.parametrize("family", list(MODELS))
def test_hand_reference_merge_and_keys(family):
    factory, shape = MODELS[family]
    plain = factory().eval()
    x = torch.randn(*shape)
    model = vpetl.inject(copy.deepcopy(plain), "lora", d_bottle=3, scale=0.7, ranks={"fc2": 5}, **ALL)
    kinds = {type(m) for m in model.modules()}
    assert any(t.__name__ == "VpetlLoraLinear" for t in kinds)
    _perturb(model)
    with torch.no_grad():
        out = logits(model, x)
        torch.testing.assert_close(out, logits(_hand_merged(plain, model).eval(), x), rtol=1e-5, atol=1e-5)
    vpetl.merge(model)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in plain.named_modules()}
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), out, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_linear_branch():
    model = vpetl.inject(tiny_vit(), "lora", d_bottle=2, **ALL)
    _perturb(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    lora = {n: p for n, p in model.named_parameters() if ".vpetl_lora." in n}
    assert len(lora) == 2 * (3 * 2 + 3 * 2)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "vpetl" not in n and "head" not in n)


def test_swin3d_proj_read_as_a_weight_by_torchvision():
    """Without q/k/v positions torchvision's own window attention runs: it reads ``attn.proj.weight``
    (never calls the module); the effective weight carries LoRA there, and the branch is called."""
    plain = tiny_swin3d().eval()
    x = torch.randn(1, 3, 4, 32, 32)
    model = vpetl.inject(copy.deepcopy(plain), "lora", positions="", linears=["proj"], d_bottle=2, example_input=x)
    assert type(model.features[0][0].attn).__name__ == "ShiftedWindowAttention3d"  # not vpetl's window forward
    _perturb(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _hand_merged(plain, model)(x), rtol=1e-5, atol=1e-5)


def test_delta_round_trip_keeps_linears_and_ranks(tmp_path, images):
    model = vpetl.inject(tiny_vit(), "lora", d_bottle=3, linears=["proj", "fc2"], ranks={"fc2": 6}, rslora=True)
    _perturb(model)
    expected = model(images)
    path = vpetl.save_delta(model, tmp_path / "lora.safetensors")
    fresh = vpetl.load_delta(tiny_vit(), path)
    assert vpetl.summary(fresh).trainable == vpetl.summary(model).trainable
    torch.testing.assert_close(fresh(images), expected, rtol=1e-6, atol=1e-6)
    assert get_record(fresh).config.find(vpetl.LoRA).ranks == (("fc2", 6),)


def test_transformer_encoder_layer_out_proj_and_linear1():
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` itself: LoRA on "proj" goes through the
    effective weight; "fc1" is the layer's ``linear1``."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)).eval()
    x = torch.randn(2, 5, 16)
    model = vpetl.inject(copy.deepcopy(plain), "lora", d_bottle=2, positions="", linears=["proj", "fc1"],
                         example_input=x)
    assert sorted(branches_of(model)) == ["0.linear1.vpetl_lora", "0.self_attn.out_proj.vpetl_lora"]
    _perturb(model)
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for path, branch in branches_of(model).items():
            ref.get_submodule(path.rpartition(".")[0]).weight += branch.scale * branch.up.weight @ branch.down.weight
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
