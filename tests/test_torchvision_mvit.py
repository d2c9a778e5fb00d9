"""torchvision MViT (video): fused qkv with pooling after the projection, width-changing MLPs."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.video.mvit import MSBlockConfig, MViT

import vpetl


def tiny_mvit() -> MViT:
    torch.manual_seed(0)
    blocks = [
        MSBlockConfig(1, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
        MSBlockConfig(2, 16, 32, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),  # widens: MLP 16 -> 32
    ]
    return MViT(
        spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=True,
        residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True, num_classes=5,
    )


@pytest.fixture
def clip():
    torch.manual_seed(1)
    return torch.randn(2, 3, 4, 32, 32)


def test_mvit_bapat_zero_init_parity_and_all_branches_called(clip):
    base = tiny_mvit().eval()
    model = vpetl.inject(copy.deepcopy(base), "bapat", d_bottle=4, zero_init=True, example_input=clip)
    assert {n.split(".vpetl_")[0] for n in vpetl.delta_state_dict(model) if "vpetl_" in n} == {
        "blocks.0.attn", "blocks.1.attn", "blocks.0", "blocks.1",
    }
    assert model.blocks[1].vpetl_adapter.up.out_features == 32  # reads 16 wide, writes 32 wide
    torch.testing.assert_close(model(clip), base(clip), rtol=0, atol=1e-6)


def test_mvit_default_init_changes_output_and_trains_only_the_delta(clip):
    base = tiny_mvit().eval()
    model = vpetl.inject(copy.deepcopy(base), "bapat", d_bottle=4).eval()
    with torch.no_grad():
        model.blocks[0].vpetl_adapter.up.weight.normal_()
    out = model(clip)
    assert not torch.allclose(out, base(clip))
    out.square().sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.1.weight", "head.1.bias"} <= with_grad
