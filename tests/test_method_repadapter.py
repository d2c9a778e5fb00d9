"""RepAdapter: the equation against a hand-written block, the paper's count, training on timm /
torchvision Swin3D / HF ViTs, delta files, exact merging and the refusals."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import logits, tiny_hf_vit, tiny_swin3d, tiny_vit, trainable_count, vit_base_on_meta
from torch import nn

import vpetl
from vpetl.methods.repadapter import RepAdapter, RepAdapterBranch
from vpetl.record import get_record

IMAGES = {"timm": (2, 3, 32, 32), "swin3d": (2, 3, 4, 32, 32), "hf": (2, 3, 32, 32)}
BUILDERS = {"timm": tiny_vit, "swin3d": tiny_swin3d, "hf": tiny_hf_vit}



def perturb(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter parameter (W_B and the biases start at zero) a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".vpetl_repadapter." in name:
                param.add_(torch.randn(param.shape, generator=gen) * std)


def reference_ra(y: torch.Tensor, adapter: RepAdapterBranch, groups: int, scale: float) -> torch.Tensor:
    """``y + s * (W_B (W_A y + b_A) + b_B)`` with the grouped W_B written out group by group."""
    h = y @ adapter.down.weight.T + adapter.down.bias
    w_b = adapter.up.weight  # (D, r / groups)
    d, per_group = w_b.shape
    rows = d // groups
    out = torch.cat([h[..., g * per_group:(g + 1) * per_group] @ w_b[g * rows:(g + 1) * rows].T
                     for g in range(groups)], dim=-1)
    return y + scale * (out + adapter.up.bias)


def test_one_block_matches_the_hand_written_equation():
    model = tiny_vit()
    plain = copy.deepcopy(model.blocks[0]).eval()
    vpetl.inject(model, RepAdapter(d_bottle=4, scale=0.5, groups=2))
    perturb(model)
    block = model.blocks[0].eval()
    pair = block.vpetl_repadapter
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        h = x + plain.attn(reference_ra(plain.norm1(x), pair.attn, 2, 0.5))
        expected = h + plain.mlp(reference_ra(plain.norm2(h), pair.mlp, 2, 0.5))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_grouped_up_projection_is_block_diagonal():
    adapter = tiny_vit()
    vpetl.inject(adapter, RepAdapter(d_bottle=8, groups=2))
    up = adapter.blocks[0].vpetl_repadapter.attn.up
    with torch.no_grad():
        up.weight.normal_()
    dense = up.dense()
    assert dense.shape == (32, 8) and up.weight.shape == (32, 4)
    assert torch.all(dense[:16, 4:] == 0) and torch.all(dense[16:, :4] == 0)
    h = torch.randn(5, 8)
    torch.testing.assert_close(up(h), h @ dense.T + up.bias)


def test_starts_as_the_base_model_and_follows_the_official_init():
    model, images = tiny_vit().eval(), torch.randn(*IMAGES["timm"])
    expected = model(images)
    vpetl.inject(model, "repadapter")
    adapter = model.blocks[1].vpetl_repadapter.mlp
    assert adapter.scale == 1.0 and adapter.dropout.p == 0.1 and adapter.down.out_features == 8
    assert adapter.down.weight.abs().sum() > 0 and adapter.down.bias.abs().sum() == 0
    assert adapter.up.weight.abs().sum() == 0 and adapter.up.bias.abs().sum() == 0
    assert not adapter.training  # injected into a model in eval mode: dropout off
    torch.testing.assert_close(model(images), expected)


def test_parameter_count_of_vit_base():
    model = vit_base_on_meta()
    vpetl.inject(model, "repadapter")
    assert sum(p.numel() for p in model.blocks[0].vpetl_repadapter.attn.parameters()) == 9_992
    assert vpetl.summary(model).trainable_by_kind == {"repadapter": 239_808}
    assert trainable_count(model) == 239_808


@pytest.mark.parametrize("family", list(BUILDERS))
def test_forward_backward_reaches_the_adapters_and_the_base_stays_frozen(family):
    model = vpetl.inject(BUILDERS[family]().train(), "repadapter", d_bottle=4)
    perturb(model)
    logits(model, torch.randn(*IMAGES[family])).square().mean().backward()
    names = {n for n, p in model.named_parameters() if ".vpetl_repadapter." in n}
    assert names and all(".attn." in n or ".mlp." in n for n in names)
    for name, param in model.named_parameters():
        if name in names:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        elif name not in get_record(model).delta_names:
            assert not param.requires_grad and param.grad is None, name


def test_delta_round_trip(tmp_path):
    images = torch.randn(*IMAGES["timm"])
    trained = vpetl.inject(tiny_vit(), "repadapter", d_bottle=4, scale=0.5)
    perturb(trained)
    path = vpetl.save_delta(trained, tmp_path / "repadapter.safetensors")
    fresh = tiny_vit()
    vpetl.load_delta(fresh, path)
    assert get_record(fresh).config == get_record(trained).config
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), trained.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_merge_is_exact_and_leaves_the_plain_model(family):
    model = BUILDERS[family]()
    keys = set(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    vpetl.inject(model, "repadapter")
    perturb(model, std=0.2)
    images = torch.randn(*IMAGES[family])
    with torch.no_grad():
        expected = logits(model.eval(), images)
        assert not torch.allclose(expected, logits(vpetl.unload(copy.deepcopy(model)), images), atol=1e-3)
        vpetl.merge(model)
        merged = logits(model.eval(), images)
    assert get_record(model) is None
    assert set(model.state_dict()) == keys
    assert {n: type(m) for n, m in model.named_modules()} == types
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_merge_of_a_deep_copy_changes_only_the_copy():
    model = vpetl.inject(tiny_vit(), "repadapter")
    perturb(model)
    copied = copy.deepcopy(model)
    before = model.blocks[0].attn.qkv.weight.clone()
    images = torch.randn(*IMAGES["timm"])
    with torch.no_grad():
        expected = copied.eval()(images)
        vpetl.merge(copied)
        torch.testing.assert_close(copied(images), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.blocks[0].attn.qkv.weight, before)


def test_merge_refuses_a_projection_without_bias_and_changes_nothing():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              depth=2, embed_dim=32, num_heads=2, qkv_bias=False)
    vpetl.inject(model, "repadapter")
    perturb(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vpetl.MergeError, match=r"blocks\.0\.attn\.qkv\), which has no bias"):
        vpetl.merge(model)
    assert get_record(model) is not None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_composes_with_lora_when_listed_first_and_merges_exactly():
    model = vpetl.inject(tiny_vit(), [RepAdapter(d_bottle=4), vpetl.LoRA(rank=2)])
    perturb(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".vpetl_lora." in name:
                param.normal_(0, 0.1)
        images = torch.randn(*IMAGES["timm"])
        expected = model.eval()(images)
        vpetl.merge(model)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(vpetl.ConfigError, match=r"put RepAdapter before lora"):
        vpetl.inject(tiny_vit(), [vpetl.LoRA(rank=2), RepAdapter()])


def test_inject_by_name_with_options():
    model = vpetl.inject(tiny_vit(), "repadapter", d_bottle=4, scale=0.5, groups=4, dropout=0.0)
    adapter = model.blocks[0].vpetl_repadapter.attn
    assert adapter.down.weight.shape == (4, 32) and adapter.up.weight.shape == (32, 1)
    assert adapter.scale == 0.5 and adapter.dropout.p == 0.0
    assert get_record(model).config.methods == (RepAdapter(d_bottle=4, scale=0.5, groups=4, dropout=0.0),)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"d_bottle": 3}, r"d_bottle \(3\) must be a multiple of groups \(2\)"),
        ({"groups": 0}, r"groups must be a positive integer"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"scale": float("nan")}, r"scale must be a finite number"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(vpetl.ConfigError, match=message):
        vpetl.inject(tiny_vit(), "repadapter", **options)


def test_groups_must_divide_the_width():
    with pytest.raises(vpetl.InjectionError, match=r"groups=3 must divide the token width 32"):
        vpetl.inject(tiny_vit(), "repadapter", d_bottle=6, groups=3)


def test_post_norm_blocks_are_refused():
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                            block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2, num_classes=3)
    names = set(model.state_dict())
    with pytest.raises(vpetl.InjectionError, match=r"is a post-norm block"):
        vpetl.inject(model, "repadapter")
    assert set(model.state_dict()) == names and get_record(model) is None
