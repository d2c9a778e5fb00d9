"""Convpass: the bypass against a hand computation with F.conv2d (CLS through the centre tap),
one block against its equation, the paper's count, training on timm / torchvision / HF ViTs,
delta files, and the refusals (merge, Swin3D, non-square grids, VPT)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import logits, tiny_hf_vit, tiny_swin3d, tiny_vit, trainable_count, vit_base_on_meta
from torch import nn

import vpetl
from vpetl.methods.convpass import Convpass, ConvpassBranch
from vpetl.record import get_record


def tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits its head: no gradient would reach the blocks
    return model


BUILDERS = {"timm": tiny_vit, "hf": tiny_hf_vit, "torchvision": tv_vit}



def perturb(module: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "vpetl_convpass" in name or isinstance(module, ConvpassBranch):
                param.add_(torch.randn(param.shape, generator=gen) * std)


def quick_gelu(t: torch.Tensor) -> torch.Tensor:
    return t * torch.sigmoid(1.702 * t)


def reference_c(z: torch.Tensor, branch: ConvpassBranch, prefix: int, side: int) -> torch.Tensor:
    """C(z) by hand: every prefix token as its own 1x1 map through F.conv2d (padding 1)."""
    b, _, _ = z.shape
    a = quick_gelu(z @ branch.down.weight.T + branch.down.bias)
    w, bias = branch.conv.weight, branch.conv.bias
    grid = a[:, prefix:].reshape(b, side, side, -1).permute(0, 3, 1, 2)
    patches = F.conv2d(grid, w, bias, padding=1).permute(0, 2, 3, 1).reshape(b, side * side, -1)
    tokens = [F.conv2d(a[:, i].reshape(b, -1, 1, 1), w, bias, padding=1).reshape(b, 1, -1) for i in range(prefix)]
    h = quick_gelu(torch.cat([*tokens, patches], dim=1))
    return h @ branch.up.weight.T + branch.up.bias


@pytest.mark.parametrize("prefix, side", [(1, 3), (2, 4), (0, 2)])
def test_bypass_matches_a_hand_computation_with_conv2d(prefix, side):
    torch.manual_seed(0)
    branch = ConvpassBranch(12, Convpass(d_bottle=5), prefix).eval()
    perturb(branch, std=0.3)
    z = torch.randn(3, prefix + side * side, 12)
    with torch.no_grad():
        torch.testing.assert_close(branch(z), reference_c(z, branch, prefix, side), rtol=1e-5, atol=1e-6)


def test_one_block_matches_its_equation():
    model = tiny_vit()
    plain = copy.deepcopy(model.blocks[0]).eval()
    vpetl.inject(model, Convpass(d_bottle=4, scale=0.5))
    perturb(model)
    block = model.blocks[0].eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        z1 = plain.norm1(x)
        h = x + plain.attn(z1) + 0.5 * reference_c(z1, block.vpetl_convpass.attn, 1, 4)
        z2 = plain.norm2(h)
        expected = h + plain.mlp(z2) + 0.5 * reference_c(z2, block.vpetl_convpass.mlp, 1, 4)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_starts_as_the_base_model_and_follows_the_official_init():
    model, images = tiny_vit().eval(), torch.randn(2, 3, 32, 32)
    expected = model(images)
    vpetl.inject(model, "convpass")
    branch = model.blocks[0].vpetl_convpass.mlp
    assert branch.scale == 1.0 and branch.dropout.p == 0.1 and branch.prefix == 1 and not branch.training
    centre = torch.zeros(8, 8, 3, 3)
    centre[:, :, 1, 1] = torch.eye(8)
    assert torch.equal(branch.conv.weight, centre) and branch.conv.bias.abs().sum() == 0
    assert branch.down.weight.abs().sum() > 0 and branch.down.bias.abs().sum() == 0
    assert branch.up.weight.abs().sum() == 0 and branch.up.bias.abs().sum() == 0
    torch.testing.assert_close(model(images), expected)
    xavier = vpetl.inject(tiny_vit(), "convpass", xavier_conv=True).blocks[0].vpetl_convpass.attn.conv.weight
    assert (xavier[:, :, 0, 0] != 0).all()


def test_parameter_count_of_vit_base():
    model = vit_base_on_meta()
    vpetl.inject(model, "convpass")
    assert sum(p.numel() for p in model.blocks[0].vpetl_convpass.attn.parameters()) == 13_648
    assert vpetl.summary(model).trainable_by_kind == {"convpass": 327_552}
    assert trainable_count(model) == 327_552


@pytest.mark.parametrize("family", list(BUILDERS))
def test_forward_backward_reaches_the_bypasses_and_the_base_stays_frozen(family):
    model = vpetl.inject(BUILDERS[family]().train(), "convpass", d_bottle=4)
    perturb(model)
    logits(model, torch.randn(2, 3, 32, 32)).square().mean().backward()
    names = {n for n, p in model.named_parameters() if ".vpetl_convpass." in n}
    assert len(names) == 2 * 2 * 6  # 2 blocks x (attn, mlp) x (down, conv, up) x (weight, bias)
    for name, param in model.named_parameters():
        if name in names:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        elif name not in get_record(model).delta_names:
            assert not param.requires_grad and param.grad is None, name


def test_delta_round_trip(tmp_path):
    images = torch.randn(2, 3, 32, 32)
    trained = vpetl.inject(tiny_vit(), "convpass", d_bottle=4, scale=0.5)
    perturb(trained)
    path = vpetl.save_delta(trained, tmp_path / "convpass.safetensors")
    fresh = tiny_vit()
    vpetl.load_delta(fresh, path)
    assert get_record(fresh).config == get_record(trained).config
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), trained.eval()(images), rtol=0, atol=0)


def test_merge_raises_and_leaves_the_model_injected():
    model = vpetl.inject(tiny_vit(), "convpass")
    with pytest.raises(vpetl.MergeError, match=r"convpass: QuickGELU and the 3x3 convolution"):
        vpetl.merge(model)
    assert get_record(model) is not None and hasattr(model.blocks[0], "vpetl_convpass")


def test_inject_by_name_with_options():
    model = vpetl.inject(tiny_vit(), "convpass", d_bottle=4, scale=0.1, dropout=0.0)
    branch = model.blocks[1].vpetl_convpass.attn
    assert branch.down.weight.shape == (4, 32) and branch.conv.weight.shape == (4, 4, 3, 3)
    assert branch.up.weight.shape == (32, 4) and branch.scale == 0.1 and branch.dropout.p == 0.0
    assert get_record(model).config.methods == (Convpass(d_bottle=4, scale=0.1, dropout=0.0),)
    with pytest.raises(vpetl.ConfigError, match=r"Convpass dropout must be in \[0, 1\)"):
        vpetl.inject(tiny_vit(), "convpass", dropout=1.0)


def test_swin3d_is_refused_naming_plain_vits_and_alternatives():
    model = tiny_swin3d()
    names = set(model.state_dict())
    with pytest.raises(vpetl.InjectionError, match=r"window attention .*Convpass applies to plain ViTs.*'repadapter'"):
        vpetl.inject(model, "convpass")
    assert set(model.state_dict()) == names and get_record(model) is None


def test_a_non_square_grid_is_refused_at_inject():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=(32, 48),
                              patch_size=8, depth=2, embed_dim=32, num_heads=2)
    with pytest.raises(vpetl.InjectionError, match=r"patch_embed \(PatchEmbed\) makes a 4 x 6 grid"):
        vpetl.inject(model, "convpass")
    assert get_record(model) is None


def test_a_non_square_token_count_is_refused_at_forward():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              depth=2, embed_dim=32, num_heads=2, dynamic_img_size=True)
    vpetl.inject(model, "convpass")
    model(torch.randn(1, 3, 32, 32))  # 1 + 4 x 4 tokens
    with pytest.raises(vpetl.InjectionError, match=r"received 25 tokens; after the 1 prefix token\(s\) the 24 patch"):
        model(torch.randn(1, 3, 32, 48))


def test_vpt_cannot_be_combined():
    with pytest.raises(vpetl.ConfigError, match=r"'convpass' and 'vpt' cannot be combined: Convpass reshapes"):
        vpetl.inject(tiny_vit(), [Convpass(), vpetl.VPT()])
