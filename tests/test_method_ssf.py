"""SSF (vpetl.methods.ssf): the equation, the paper's counts, training, delta files, merging."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import perturb_trainable, tiny_hf_vit, tiny_swin3d, tiny_vit, trainable_count

import vpetl
from vpetl.methods.ssf import SSF, SSFBranch

INPUTS = {
    "vit": (tiny_vit, (2, 3, 32, 32)),
    "swin3d": (tiny_swin3d, (2, 3, 4, 32, 32)),
    "hf_vit": (tiny_hf_vit, (2, 3, 32, 32)),
}


def _run(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _model_and_input(name):
    make, shape = INPUTS[name]
    torch.manual_seed(1)
    return make, make().eval(), torch.randn(*shape)


def _perturb(model, seed=3):
    """Random gamma/beta (and any other trained tensor) so that merging is tested for real."""
    perturb_trainable(model, seed)


def test_equation_on_linear_conv_and_layernorm():
    model, x = tiny_vit().eval(), torch.randn(5, 7, 32)
    keys = list(model.state_dict())
    vpetl.inject(model, "ssf")
    _perturb(model)
    assert [k for k in model.state_dict() if "vpetl_" not in k] == keys  # base keys unchanged
    qkv, norm, conv = model.blocks[0].attn.qkv, model.blocks[0].norm1, model.patch_embed.proj
    for module in (qkv, norm, conv):  # the raw Parameters stay in _parameters; reads are effective
        assert isinstance(module._parameters["weight"], torch.nn.Parameter)
        assert not isinstance(module.weight, torch.nn.Parameter)
    g, b = qkv.vpetl_ssf.scale, qkv.vpetl_ssf.shift
    want = g * F.linear(x, qkv._parameters["weight"], qkv._parameters["bias"]) + b
    torch.testing.assert_close(qkv(x), want)
    g, b = norm.vpetl_ssf.scale, norm.vpetl_ssf.shift
    plain = F.layer_norm(x, (32,), norm._parameters["weight"], norm._parameters["bias"], norm.eps)
    torch.testing.assert_close(norm(x), g * plain + b)
    img = torch.randn(2, 3, 32, 32)
    g, b = conv.vpetl_ssf.scale, conv.vpetl_ssf.shift
    plain = F.conv2d(img, conv._parameters["weight"], conv._parameters["bias"], stride=8)
    torch.testing.assert_close(conv(img), g[:, None, None] * plain + b[:, None, None])


def test_init_follows_the_official_code():
    branch = SSFBranch(200_000)
    assert abs(branch.scale.mean().item() - 1) < 1e-3 and abs(branch.scale.std().item() - 0.02) < 1e-3
    assert abs(branch.shift.mean().item()) < 1e-3 and abs(branch.shift.std().item() - 0.02) < 1e-3


@pytest.mark.parametrize("build, count", [
    # 1,536 + 12*2*(768 + 2,304 + 768 + 768 + 3,072 + 768) + 1,536 (DESIGN.md section 8)
    (lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), 205_824),
    # Swin-B, patch norm on, after PatchMerging's norm (not its reduction, as the official code)
    (lambda: timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0), 274_432),
    (lambda: __import__("torchvision.models.video", fromlist=["swin3d_b"]).swin3d_b(), 274_432),
], ids=["vit_base", "swin_base", "swin3d_b"])
def test_paper_parameter_counts(build, count):
    with torch.device("meta"):  # shapes only: no weight init, no forward
        model = build()
    vpetl.inject(model, "ssf", train_head=False)
    assert trainable_count(model) == count


@pytest.mark.parametrize("name", list(INPUTS))
def test_trains_gamma_and_beta_only(name):
    _, model, x = _model_and_input(name)
    vpetl.inject(model, "ssf", train_head=False)
    _run(model, x).square().mean().backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".vpetl_ssf." in n for n in trained)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)


@pytest.mark.parametrize("name", list(INPUTS))
def test_merge_is_exact(name):
    make, model, x = _model_and_input(name)
    plain = make()
    vpetl.inject(model, "ssf")
    _perturb(model)
    with torch.no_grad():
        want = _run(model, x)
        assert not torch.allclose(want, _run(plain.eval(), x), atol=1e-3)
        vpetl.merge(model)
        got = _run(model, x)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_module_without_bias_and_changes_nothing():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              depth=1, embed_dim=32, num_heads=2, qkv_bias=False).eval()
    x = torch.randn(2, 3, 32, 32)
    vpetl.inject(model, "ssf")
    _perturb(model)
    with torch.no_grad():
        before = model(x)
        with pytest.raises(vpetl.MergeError, match="blocks.0.attn.qkv"):
            vpetl.merge(model)
        torch.testing.assert_close(model(x), before)


def test_delta_round_trip_on_a_fresh_base(tmp_path):
    _, model, x = _model_and_input("vit")
    vpetl.inject(model, "ssf")
    _perturb(model)
    path = vpetl.save_delta(model, tmp_path / "ssf.safetensors")
    torch.manual_seed(1)
    fresh = tiny_vit().eval()
    vpetl.load_delta(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(_run(fresh, x), _run(model, x))


def test_unload_and_disabled_restore_the_plain_model():
    make, model, x = _model_and_input("swin3d")
    with torch.no_grad():
        want = _run(make().eval(), x)
        vpetl.inject(model, "ssf", train_head=False)
        _perturb(model)
        with vpetl.disabled(model):
            torch.testing.assert_close(_run(model, x), want)
        vpetl.unload(model)
        torch.testing.assert_close(_run(model, x), want)
    assert not any("vpetl" in k for k in model.state_dict())


def test_by_name_options_and_summary():
    model = tiny_vit()
    vpetl.inject(model, "ssf")
    assert model.blocks[0].attn.qkv.vpetl_ssf.scale.shape == (96,)
    assert vpetl.summary(model).trainable_by_kind["ssf"] == 2 * (64 + 2 * (32 + 96 + 32 + 32 + 128 + 32))
    with pytest.raises(vpetl.ConfigError, match="does not apply to method 'ssf'"):
        vpetl.inject(tiny_vit(), "ssf", d_bottle=8)
    assert vpetl.InjectConfig(methods=[SSF()]).methods == (SSF(),)


# ---------------------------------------------------------------- composition with q/k/v branches


def _composes() -> bool:
    """Whether vpetl's BranchedLinear reads an SSF-derived Linear's effective weight (the core
    change this method needs for PATT/LoRA on nn.Linear projections, see ssf.py's report)."""
    try:
        vpetl.inject(tiny_vit(depth=1), [SSF(), vpetl.LoRA(rank=2)])
    except TypeError as error:
        if "cannot assign" in str(error):
            return False
        raise
    return True


needs_core = pytest.mark.skipif(not _composes(), reason="needs BranchedLinear to adopt SSF's raw Parameters")


@needs_core
def test_ssf_with_patt_is_both_and_not_mergeable():
    model, x = tiny_vit().eval(), torch.randn(2, 3, 32, 32)
    vpetl.inject(model, [SSF(), vpetl.PATT(d_bottle=4, zero_init=False)])
    _perturb(model)
    qkv, patt = model.blocks[0].attn.qkv, model.blocks[0].attn.vpetl_patt
    ssf, tokens = qkv.vpetl_ssf, torch.randn(2, 5, 32)
    want = ssf.scale * F.linear(tokens, qkv.weight, qkv.bias) + ssf.shift  # qkv.weight: the raw Parameter
    want = want + patt.plain_delta(tokens, qkv.layout, qkv.out_features)
    torch.testing.assert_close(qkv(tokens), want)
    _run(model, x).square().mean().backward()
    for kind in ("vpetl_ssf", "vpetl_patt"):
        grads = [p.grad for n, p in model.named_parameters() if kind in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(vpetl.MergeError, match="patt"):
        vpetl.merge(model)


@needs_core
@pytest.mark.parametrize("name, ssf_first", [("vit", True), ("vit", False), ("swin3d", True), ("hf_vit", False)])
def test_ssf_with_lora_merges_exactly_in_either_order(name, ssf_first):
    """LoRA's ``B A`` is added outside SSF's scaling, so SSF must merge first whatever the order."""
    make, model, x = _model_and_input(name)
    entries = [SSF(), vpetl.LoRA(rank=2)]
    vpetl.inject(model, entries if ssf_first else entries[::-1])
    _perturb(model)
    with torch.no_grad():
        want = _run(model, x)
        vpetl.merge(model)
        torch.testing.assert_close(_run(model, x), want, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == list(make().state_dict())
