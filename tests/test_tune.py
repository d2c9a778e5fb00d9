"""Method "tune": unfreeze base parameters by block position (Table 1 of the paper)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn
from torchvision.models.video import swin3d_b
from torchvision.models.video.swin_transformer import SwinTransformer3d
from torchvision.models.vision_transformer import VisionTransformer

import vpetl
from vpetl.config import TunePosition
from vpetl.record import get_record

from conftest import tiny_vit

HEAD = {"head.weight", "head.bias"}
WB = ["weight", "bias"]


def per_block(fmt: str, blocks, leaves=WB) -> set[str]:
    return {f"{fmt.format(b)}.{leaf}" for b in blocks for leaf in leaves}


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


VIT_BLOCKS = range(2)
VIT_EXPECTED = {
    "norm1": per_block("blocks.{}.norm1", VIT_BLOCKS),
    "attn_proj": per_block("blocks.{}.attn.proj", VIT_BLOCKS),
    "attn_qkv": per_block("blocks.{}.attn.qkv", VIT_BLOCKS),
    "norm2": per_block("blocks.{}.norm2", VIT_BLOCKS),
    "mlp_fc1": per_block("blocks.{}.mlp.fc1", VIT_BLOCKS),
    "mlp_fc2": per_block("blocks.{}.mlp.fc2", VIT_BLOCKS),
}


def tiny_swin3d() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                             window_size=[2, 4, 4], num_classes=5, stochastic_depth_prob=0.0)


SWIN_BLOCKS = ["0.0", "0.1", "2.0", "2.1"]
SWIN_EXPECTED = {
    "norm1": per_block("features.{}.norm1", SWIN_BLOCKS),
    "attn_proj": per_block("features.{}.attn.proj", SWIN_BLOCKS),
    "attn_qkv": per_block("features.{}.attn.qkv", SWIN_BLOCKS),
    "attn_softmax": per_block("features.{}.attn", SWIN_BLOCKS, ["relative_position_bias_table"]),
    "norm2": per_block("features.{}.norm2", SWIN_BLOCKS),
    "mlp_fc1": per_block("features.{}.mlp.0", SWIN_BLOCKS),
    "mlp_fc2": per_block("features.{}.mlp.3", SWIN_BLOCKS),
    "downsample": {"features.1.reduction.weight", "features.1.norm.weight", "features.1.norm.bias"},
}


@pytest.mark.parametrize("position", VIT_EXPECTED)
def test_exact_trainable_keys_per_position_on_vit(position):
    model = vpetl.inject(tiny_vit(), "tune", positions=[position])
    assert trainable(model) == VIT_EXPECTED[position] | HEAD
    assert set(get_record(model).delta_names) == VIT_EXPECTED[position] | HEAD


@pytest.mark.parametrize("position", SWIN_EXPECTED)
def test_exact_trainable_keys_per_position_on_swin3d(position):
    model = vpetl.inject(tiny_swin3d(), "tune", positions=position, train_head=False)
    assert trainable(model) == SWIN_EXPECTED[position]


def test_positions_combine_and_gradients_reach_only_them(images):
    model = vpetl.inject(tiny_vit(), "tune", positions=["attn_qkv", "norm2"])
    assert trainable(model) == VIT_EXPECTED["attn_qkv"] | VIT_EXPECTED["norm2"] | HEAD
    model(images).logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable(model)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)


def test_swin3d_forward_backward_grads_only_on_the_tuned_positions():
    model = vpetl.inject(tiny_swin3d(), "tune", positions=["attn_softmax", "downsample"], train_head=False)
    model(torch.randn(1, 3, 4, 32, 32)).square().mean().backward()
    expected = SWIN_EXPECTED["attn_softmax"] | SWIN_EXPECTED["downsample"]
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected


def test_other_families_find_the_same_roles():
    torch.manual_seed(0)
    tv = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                           num_classes=5)
    vpetl.inject(tv, "tune", positions=["norm1", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2"], train_head=False)
    layer = "encoder.layers.encoder_layer_{}"
    assert trainable(tv) == (
        per_block(layer + ".ln_1", VIT_BLOCKS)
        | per_block(layer + ".self_attention", VIT_BLOCKS, ["in_proj_weight", "in_proj_bias"])
        | per_block(layer + ".self_attention.out_proj", VIT_BLOCKS)
        | per_block(layer + ".mlp.0", VIT_BLOCKS)
        | per_block(layer + ".mlp.3", VIT_BLOCKS)
    )


class _Block(nn.Module):
    """A block whose norms have names vpetl does not know: found by registration order."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.pre = nn.LayerNorm(d)
        self.attn = Attention(d, num_heads=2, qkv_bias=True)
        self.post = nn.LayerNorm(d)
        self.mlp = Mlp(d, 2 * d)

    def forward(self, x):
        x = x + self.attn(self.pre(x))
        return x + self.mlp(self.post(x))


def test_unknown_norm_names_fall_back_to_registration_order():
    model = nn.Sequential(_Block(), _Block())
    vpetl.inject(model, "tune", positions=["norm1"])
    assert trainable(model) == per_block("{}.pre", range(2))
    vpetl.unload(model)
    vpetl.inject(model, "tune", positions=["norm2"])
    assert trainable(model) == per_block("{}.post", range(2))


def test_position_the_model_lacks_is_a_clear_error_and_leaves_the_model_untouched():
    model = tiny_vit()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(vpetl.InjectionError) as info:
        vpetl.inject(model, "tune", positions=["attn_qkv", "attn_softmax"])
    message = str(info.value)
    assert "'attn_softmax'" in message and "relative-position bias table" in message
    assert "Positions this model has: norm1, attn_proj, attn_qkv, norm2, mlp_fc1, mlp_fc2" in message
    assert "drop 'attn_softmax' from positions" in message
    assert get_record(model) is None and [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(vpetl.InjectionError, match="'downsample'.*patch-merging"):
        vpetl.inject(model, "tune", positions="downsample")


def test_unknown_position_name_lists_the_accepted_ones():
    with pytest.raises(vpetl.ConfigError, match="tune position must be one of 'norm1'.*'downsample'; got 'mlp_fc3'"):
        vpetl.inject(tiny_vit(), "tune", positions=["mlp_fc3"])
    with pytest.raises(vpetl.ConfigError, match="needs positions"):
        vpetl.inject(tiny_vit(), "tune")


def test_unload_restores_requires_grad(images):
    model = tiny_vit()
    vpetl.inject(model, "tune", positions=["mlp_fc1"])
    vpetl.unload(model)
    assert all(p.requires_grad for p in model.parameters())


# Table 1 of the paper (Video Swin-B, SSv2 head), head excluded. The model is built once, on the
# meta device (shapes only: counting needs no values, and building takes 0.5 s instead of 2-10 s).
TABLE_1 = {
    "norm1": 24_064,
    "attn_proj": 6_991_616,
    "attn_qkv": 20_974_848,
    "attn_softmax": 953_160,
    "norm2": 24_064,
    "mlp_fc1": 27_966_464,
    "mlp_fc2": 27_930_368,
    "downsample": 2_759_680,
}


@pytest.fixture(scope="module")
def video_swin_b():
    with torch.device("meta"):
        return swin3d_b(num_classes=174)


@pytest.mark.parametrize("position", TABLE_1)
def test_table_1_parameter_counts_on_video_swin_b(video_swin_b, position):
    vpetl.inject(video_swin_b, "tune", positions=[position], train_head=False)
    try:
        assert sum(p.numel() for p in video_swin_b.parameters() if p.requires_grad) == TABLE_1[position]
    finally:
        vpetl.unload(video_swin_b)


def test_table_1_positions_are_disjoint_on_video_swin_b(video_swin_b):
    vpetl.inject(video_swin_b, "tune", positions=list(TunePosition), train_head=True)
    try:
        head = 1024 * 174 + 174
        assert sum(p.numel() for p in video_swin_b.parameters() if p.requires_grad) == sum(TABLE_1.values()) + head
    finally:
        vpetl.unload(video_swin_b)
