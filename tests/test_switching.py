"""vpetl.disabled runs the exact base model; deltas can be swapped on one base."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.video.swin_transformer import SwinTransformer3d
from torchvision.models.vision_transformer import VisionTransformer

import vpetl

from conftest import tiny_vit


def _randomise_branches(model: torch.nn.Module, seed: int) -> None:
    """New values for the branch parameters only (the head stays the base's)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vpetl_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _models_and_inputs():
    torch.manual_seed(0)
    tv_vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                               num_classes=5)
    torch.nn.init.normal_(tv_vit.heads.head.weight)  # torchvision zero-inits its head: logits would all be 0
    swin3d = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                               window_size=[2, 4, 4], num_classes=5)
    return [
        ("timm-vit", tiny_vit(), torch.randn(2, 3, 32, 32)),
        ("torchvision-vit", tv_vit, torch.randn(2, 3, 32, 32)),
        ("swin3d", swin3d, torch.randn(1, 3, 4, 32, 32)),
    ]


@pytest.mark.parametrize("index", range(3), ids=["timm-vit", "torchvision-vit", "swin3d"])
@pytest.mark.parametrize("method", ["bapat", "lora"])
def test_disabled_runs_the_exact_base_model(index, method):
    # no_grad: nn.MultiheadAttention then takes the same native fast path in both models
    _, base, x = _models_and_inputs()[index]
    base.eval()
    model = vpetl.inject(copy.deepcopy(base), method, d_bottle=4).eval()
    _randomise_branches(model, seed=1)
    with torch.no_grad():
        expected = base(x)
        injected = model(x)
        assert not torch.allclose(injected, expected)
        with vpetl.disabled(model) as same:
            assert same is model
            assert torch.equal(model(x), expected)
            assert all("Vpetl" not in type(m).__name__ and "Branched" not in type(m).__name__ for m in model.modules())
        assert torch.equal(model(x), injected)


def test_disabled_restores_after_an_exception_and_refuses_nesting(images):
    model = vpetl.inject(tiny_vit(), "patt")
    qkv_type = type(model.blocks[0].attn.qkv)
    with pytest.raises(RuntimeError, match="boom"), vpetl.disabled(model):
        with pytest.raises(vpetl.InjectionError, match="already active"), vpetl.disabled(model):
            pass
        raise RuntimeError("boom")
    assert type(model.blocks[0].attn.qkv) is qkv_type
    vpetl.verify(model, images)


def test_first_forward_inside_disabled_defers_the_branch_check(images):
    model = vpetl.inject(tiny_vit(), "bapat", d_bottle=4)
    with vpetl.disabled(model):
        model(images)  # no branch is called here, by design: no error
    model(images)  # the check runs on this one and passes


def test_disabled_gradients_reach_no_branch(images):
    model = vpetl.inject(tiny_vit(), "bapat", d_bottle=4)
    with vpetl.disabled(model):
        model(images).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"head.weight", "head.bias"}


def test_swapping_three_deltas_on_one_base(tmp_path, images):
    base = tiny_vit().eval()
    base_state = copy.deepcopy(base.state_dict())
    expected = {}
    for i, (method, width) in enumerate([("bapat", 4), ("lora", 2), ("patt", 8)]):
        model = vpetl.inject(copy.deepcopy(base), method, d_bottle=width)
        _randomise_branches(model, seed=10 + i)
        model.eval()
        expected[i] = model(images)
        vpetl.save_delta(model, tmp_path / f"delta{i}.safetensors")

    live = tiny_vit().eval()
    live.load_state_dict(base_state)
    for i in (0, 1, 2, 0):
        if vpetl.record.get_record(live) is not None:
            vpetl.unload(live)
        vpetl.load_delta(live, tmp_path / f"delta{i}.safetensors")
        live.eval()
        assert torch.equal(live(images), expected[i]), f"delta {i}"
    vpetl.unload(live)
    assert torch.equal(live(images), base(images))
