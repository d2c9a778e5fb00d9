"""A sweep over timm's transformer families, each shrunk to a few thousand parameters.

For every family vpetl supports:

* ``inject("bapat")`` + ``vpetl.verify``: every branch is called in forward, PATT's hidden ``h``
  once per attention call (also where K and V are separate Linears);
* forward + backward reaches every ``vpetl_`` parameter, and no frozen one;
* ``zero_init=True`` leaves the logits unchanged;
* with PATT's up-projection randomised, every attention module's output changes (checked per
  attention module on the inputs it saw in the base model, so zero layer-scales and zero
  post-norms cannot hide a branch that does nothing);
* the K/V slots are the right columns of the projection output (layout check): a constant
  ``c`` added to V alone shifts softmax attention's output by the same vector at every token,
  exactly ``s * W_proj c`` (rows of the attention matrix sum to 1); a constant added to K alone
  is invisible after softmax. In a wrong slot (Q, or another head) either would show. Modules
  that normalise, pool or rotate K/V (channel attention, cosine attention, RoPE, MViTv2 pooling)
  skip the check that does not apply to them (sets below).

Timm zero-initialises some things that would hide every effect at random init: classifier
heads (re-drawn here) and SwinV2's residual post-norms (set to 1, as in trained weights).

Families vpetl cannot adapt correctly must raise an ``InjectionError`` naming module and class.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

import vpetl
from vpetl import InjectConfig, PattConfig
from vpetl.heads import find_head_paths
from vpetl.record import get_record

timm = pytest.importorskip("timm")

CLASSES = 5


def create(arch: str, **kwargs) -> nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=CLASSES, **kwargs)


def mvitv2() -> nn.Module:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=1)
    return MultiScaleVit(cfg, img_size=(32, 32), num_classes=CLASSES)


def maxvit(name: str, block_type: tuple[str, ...] | None = None, **transformer) -> nn.Module:
    from timm.models.maxxvit import MaxxVit, model_cfgs

    cfg = model_cfgs[name]
    cfg = replace(
        cfg, embed_dim=(16, 32), depths=(1, 1), block_type=block_type or cfg.block_type[:2], stem_width=16,
        head_hidden_size=None, transformer_cfg=replace(cfg.transformer_cfg, dim_head=8, **transformer),
    )
    return MaxxVit(cfg, img_size=64, num_classes=CLASSES)


def swinv2() -> nn.Module:
    model = create(
        "swinv2_tiny_window8_256", img_size=32, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4
    )
    with torch.no_grad():  # timm zero-inits the residual post-norms; trained weights are not zero
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.fill_(1.0)
    return model


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    size: int  # input images are (2, 3, size, size)
    logits_see_patt: bool = True  # False: zero layer-scale / post-norm hides PATT at init
    note: str = ""


VIT = dict(depth=2, embed_dim=32, num_heads=2)

FAMILIES: dict[str, Family] = {
    "vit": Family(lambda: create("vit_tiny_patch16_224", img_size=32, **VIT), 32),
    "deit": Family(lambda: create("deit_tiny_patch16_224", img_size=32, **VIT), 32),
    "deit_distilled": Family(lambda: create("deit_tiny_distilled_patch16_224", img_size=32, **VIT), 32),
    "deit3": Family(lambda: create("deit3_small_patch16_224", img_size=32, **VIT), 32, False, "layer scale 1e-6"),
    "cait": Family(
        lambda: create("cait_xxs24_224", img_size=32, depth_token_only=1, **VIT), 32, False, "layer scale 1e-5"
    ),
    "xcit": Family(lambda: create("xcit_nano_12_p16_224", img_size=32, cls_attn_layers=1, **VIT), 32),
    "swin": Family(
        lambda: create(
            "swin_tiny_patch4_window7_224", img_size=32, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4
        ),
        32,
    ),
    "swinv2": Family(swinv2, 32, note="post-norms set to 1 (timm zero-inits them)"),
    "beit": Family(lambda: create("beit_base_patch16_224", img_size=32, **VIT), 32),
    "eva02": Family(lambda: create("eva02_tiny_patch14_224", img_size=28, **VIT), 28),
    "eva02_separate_qkv": Family(lambda: create("eva02_base_patch14_224", img_size=28, **VIT), 28),
    "dinov2": Family(
        lambda: create("vit_small_patch14_dinov2", img_size=28, **VIT), 28, False, "layer scale 1e-5"
    ),
    "mvitv2": Family(mvitv2, 32),
    "hiera": Family(lambda: create("hiera_tiny_224", img_size=64, embed_dim=16, stages=(1, 1, 1, 1)), 64),
    "maxvit_tf": Family(lambda: maxvit("maxvit_tiny_tf"), 64, note="head_first=False"),
    "maxvit_rw": Family(lambda: maxvit("maxvit_rmlp_pico_rw"), 64, note="head_first=True: [H, 3, hd]"),
    "pvt_v2": Family(
        lambda: create("pvt_v2_b0", depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32), num_heads=(1, 1, 1, 2)), 32
    ),
    "twins_pcpvt": Family(
        lambda: create("twins_pcpvt_small", depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2)),
        32,
    ),
    "twins_svt": Family(
        lambda: create(
            "twins_svt_small", depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2),
            wss=(2, 2, 2, 2),
        ),
        32,
    ),
    "tiny_vit": Family(
        lambda: create(
            "tiny_vit_5m_224", embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
            window_sizes=(2, 2, 2, 2),
        ),
        64,
        note="head-interleaved qkv [H, (q, k, v)]",
    ),
    "gcvit": Family(
        lambda: timm.models.gcvit.GlobalContextVit(
            img_size=64, depths=(2, 2, 1, 1), num_heads=(1, 1, 2, 2), embed_dim=16, num_classes=CLASSES
        ),
        64,
        note="global-query blocks: fused kv Linear",
    ),
    "davit": Family(
        lambda: create("davit_tiny", depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 2, 2)),
        64,
        note="window + channel attention",
    ),
    "nest": Family(
        lambda: timm.models.nest.Nest(
            img_size=32, patch_size=4, embed_dims=(16, 32, 32), num_heads=(1, 1, 2), depths=(1, 1, 1),
            num_classes=CLASSES,
        ),
        32,
    ),
    "coat": Family(
        lambda: create(
            "coat_lite_tiny", img_size=32, embed_dims=(16, 16, 32, 32), serial_depths=(1, 1, 1, 1),
            mlp_ratios=(2, 2, 2, 2), num_heads=8,
        ),
        32,
        note="factorised attention",
    ),
    "swinv2_cr": Family(
        lambda: create(
            "swinv2_cr_tiny_224", img_size=32, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4,
            init_values=1.0,  # residual post-norm weights (timm default 0 would stop every gradient)
        ),
        32,
    ),
    "sam2_hiera": Family(
        lambda: create("sam2_hiera_tiny", embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(),
                       window_spec=(4, 4, 2, 2)),
        64,
    ),
    "samvit": Family(
        lambda: create(
            "samvit_base_patch16", img_size=64, depth=2, embed_dim=32, num_heads=2, window_size=2,
            global_attn_indexes=(1,),
        ),
        64,
        note="windowed + global attention, decomposed rel-pos",
    ),
    "vit_relpos": Family(lambda: create("vit_relpos_base_patch16_224", img_size=32, **VIT), 32, False, "layer scale"),
    "edgenext": Family(
        lambda: create("edgenext_xx_small", depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), heads=(1, 1, 2, 2)),
        64,
        False,
        "cross-covariance attention, layer scale 1e-6",
    ),
    "tnt": Family(
        lambda: create(
            "tnt_s_patch16_224", img_size=32, depth=2, embed_dim=32, inner_dim=8, num_heads_outer=2, num_heads_inner=1
        ),
        32,
        note="inner + outer attention, qk + v Linears",
    ),
    "pvt_v2_li": Family(
        lambda: create("pvt_v2_b2_li", depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32), num_heads=(1, 1, 1, 2)), 64
    ),
    "convit": Family(
        lambda: create(
            "convit_tiny", img_size=32, patch_size=8, depth=2, local_up_to_layer=1, embed_dim=8, num_heads=4
        ),
        32,
        note="GPSA: fused qk + separate v Linears",
    ),
}

# Attention classes whose K or V pass through something other than plain softmax attention.
CHANNEL_ATTENTION = {"XCA", "CrossCovarianceAttn", "ChannelAttention", "ChannelAttentionV2"}  # softmax over channels
NO_V_CHECK = CHANNEL_ATTENTION | {
    "mvitv2.MultiScaleAttention",  # pooled + normalised V
    "FactorAttnConvRelPosEnc",  # CoaT: factorised attention, convolution on V
}
V_SHIFT_NOT_EXACT = {
    "TalkingHeadAttn",  # CaiT: heads mixed after softmax, so each head's shift is rescaled
    "nest.Attention",  # NesT: output channels ordered (head_dim, heads), not (heads, head_dim)
}
NO_K_CHECK = CHANNEL_ATTENTION | {
    "mvitv2.MultiScaleAttention",  # pooled + normalised K
    "EvaAttention",  # rotary embedding on K
    "swin_transformer_v2.WindowAttention",  # cosine attention normalises K
    "WindowMultiHeadAttention",  # SwinV2-CR, cosine attention
}


def _qualname(module: nn.Module) -> set[str]:
    cls = type(module)
    return {cls.__name__, f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"}


@functools.cache
def _prototype(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FAMILIES[name].build().eval()
    with torch.no_grad():  # some heads start at (near) zero (Hiera, BEiT, EVA): logits would show nothing
        for head in find_head_paths(model):
            for p in model.get_submodule(head).parameters():
                p.normal_(std=0.1)
    return model


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    size = FAMILIES[name].size
    return copy.deepcopy(_prototype(name)), torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def attention_paths(model: nn.Module) -> list[str]:
    return [p.rsplit(".", 1)[0] for p in get_record(model).branches if p.endswith("vpetl_patt")]


def capture_calls(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """The (args, kwargs, output) of each module at ``paths`` during one forward of ``model``."""
    calls: dict[str, tuple] = {}
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def hook(mod, args, kwargs, output, path=path):
            clone = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            calls.setdefault(path, (tree_map(clone, args), tree_map(clone, kwargs), tree_map(clone, output)))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def first_tensor(output) -> torch.Tensor:
    return next(t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor))


def rerun(model: nn.Module, path: str, call: tuple) -> torch.Tensor:
    args, kwargs, _ = call
    with torch.no_grad():
        return first_tensor(model.get_submodule(path)(*args, **kwargs))


def patt_branches(model: nn.Module):
    return [b for p, b in get_record(model).branches.items() if p.endswith("vpetl_patt")]


SUPPORTED = sorted(FAMILIES)


@pytest.mark.parametrize("name", SUPPORTED)
def test_bapat_verify_and_grads(name):
    model, x = make(name)
    base_keys = set(model.state_dict())
    vpetl.inject(model, "bapat", d_bottle=8)
    calls: dict[int, int] = {}
    for branch in patt_branches(model):
        branch.down.register_forward_hook(lambda m, *a: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
    model(x)  # the first forward checks that every branch is called
    # PATT's hidden h is computed once per attention call, also where K and V are separate Linears
    assert sorted(calls.values()) == [1] * len(patt_branches(model))
    assert all(branch._cache is None for branch in patt_branches(model))  # nothing held after forward
    vpetl.verify(model, x)
    assert base_keys <= set(model.state_dict())
    heads = get_record(model).head_paths
    assert heads, "classification head not found"
    model.train()
    first_tensor(model(x)).square().mean().backward()
    for n, p in model.named_parameters():
        if ".vpetl_" in n:
            assert p.requires_grad and p.grad is not None, n
            if "vpetl_adapter.down" not in n:  # zero while adapter.up is still zero
                assert p.grad.abs().sum() > 0, n
        elif not any(n.startswith(h + ".") for h in heads):
            assert p.grad is None, n


@pytest.mark.parametrize("name", SUPPORTED)
def test_zero_init_keeps_logits(name):
    model, x = make(name)
    with torch.no_grad():
        expected = model(x)
    vpetl.inject(model, "bapat", d_bottle=8, zero_init=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SUPPORTED)
def test_random_patt_changes_every_attention(name):
    model, x = make(name)
    base = copy.deepcopy(model)
    vpetl.inject(model, "patt", d_bottle=8, zero_init=True)
    with torch.no_grad():
        for branch in patt_branches(model):
            branch.up.weight.normal_(std=0.5)
    paths = attention_paths(model)
    calls = capture_calls(base, paths, x)
    assert set(calls) == set(paths)
    for path in paths:
        before = first_tensor(calls[path][2])
        after = rerun(model, path, calls[path])
        change = (after - before).norm() / before.norm()
        assert change > 1e-2, f"{path}: PATT did not change the attention output ({change:.2e})"
    if FAMILIES[name].logits_see_patt:
        with torch.no_grad():
            assert not torch.allclose(model(x), base(x), atol=1e-4)


def _inject_constant(model: nn.Module, letter: str) -> None:
    """PATT on one position only, with a zero up-weight and a random up-bias: a constant shift."""
    config = InjectConfig(methods=(PattConfig(d_bottle=4, positions=letter, zero_init=True, bias=True),), method="patt")
    vpetl.inject(model, config)
    with torch.no_grad():
        for branch in patt_branches(model):
            branch.up.bias.normal_()


@pytest.mark.parametrize("name", SUPPORTED)
def test_layout_v_slot(name):
    """A constant c added to V moves softmax attention's output by the same vector at every
    token (rows of the attention matrix sum to 1): exactly s * W_proj c."""
    model, x = make(name)
    base = copy.deepcopy(model)
    _inject_constant(model, "v")
    paths = [p for p in attention_paths(model) if not _qualname(model.get_submodule(p)) & NO_V_CHECK]
    if not paths:
        pytest.skip("no attention module here where V passes straight through softmax attention")
    calls = capture_calls(base, paths, x)
    for path in paths:
        attn = model.get_submodule(path)
        shift = attn.vpetl_patt.bias_for("v") @ attn.proj.weight.t()
        before = first_tensor(calls[path][2])
        delta = (rerun(model, path, calls[path]) - before).reshape(-1, before.shape[-1])
        assert delta.abs().max() > 1e-4, f"{path}: V shift had no effect"
        torch.testing.assert_close(delta, delta[:1].expand_as(delta), rtol=1e-4, atol=1e-5, msg=path)
        if not _qualname(attn) & V_SHIFT_NOT_EXACT:
            torch.testing.assert_close(delta, shift.expand_as(delta), rtol=1e-4, atol=1e-5, msg=path)


@pytest.mark.parametrize("name", SUPPORTED)
def test_layout_k_slot(name):
    """A constant added to K changes nothing after softmax; in a wrong slot it would."""
    model, x = make(name)
    base = copy.deepcopy(model)
    _inject_constant(model, "k")
    paths = [p for p in attention_paths(model) if not _qualname(model.get_submodule(p)) & NO_K_CHECK]
    if not paths:
        pytest.skip("every attention module here normalises, pools or rotates K")
    calls = capture_calls(base, paths, x)
    for path in paths:
        before = first_tensor(calls[path][2])
        torch.testing.assert_close(rerun(model, path, calls[path]), before, rtol=1e-4, atol=1e-5, msg=path)


# --------------------------------------------------------------------------- not adaptable

UNSUPPORTED: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    # qkv is a Linear followed by BatchNorm (LinearNorm), heads interleaved with unequal k/v widths
    "levit": (
        lambda: create("levit_128s", img_size=32, depth=(1, 1, 1), embed_dim=(32, 48, 64), num_heads=(2, 2, 2)),
        ["stages.0.blocks.0.attn (Attention)", "stages.1.downsample.attn_downsample (AttentionDownsample)"],
    ),
    # a plain Linear, but laid out [H, (k 32, k 32, v 128)] per head: no equal-width K/V slots
    "efficientformer": (
        lambda: create("efficientformer_l1", depths=(1, 1, 1, 2), embed_dims=(16, 16, 32, 32), num_vit=1),
        ["stages.3.blocks.2.token_mixer (Attention)"],
    ),
    # channels-first attention: a 1x1 Conv2d qkv
    "maxvit_nchw": (
        lambda: maxvit("maxvit_rmlp_pico_rw", use_nchw_attn=True),
        ["stages.0.blocks.0.attn_block.attn (Attention2d)", "stages.1.blocks.0.attn_grid.attn (Attention2d)"],
    ),
    "coatnet": (lambda: maxvit("coatnet_nano_rw", block_type=("C", "T")), ["stages.1.blocks.0.attn (Attention2d)"]),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_family_raises(name):
    build, expected = UNSUPPORTED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    keys, flags = set(model.state_dict()), [p.requires_grad for p in model.parameters()]
    with pytest.raises(vpetl.InjectionError, match="cannot adapt") as info:
        vpetl.inject(model, "bapat", d_bottle=8)
    for item in expected:  # names the module path and class
        assert item in str(info.value)
    assert get_record(model) is None and set(model.state_dict()) == keys  # left as it was
    assert [p.requires_grad for p in model.parameters()] == flags
    # strict=False warns about them and adapts the rest: here nothing else is left
    with pytest.warns(UserWarning, match="cannot adapt"), pytest.raises(vpetl.InjectionError, match="no attention"):
        vpetl.inject(model, "bapat", d_bottle=8, strict=False)


def test_unsupported_reason_says_why():
    from vpetl.handlers.fused_qkv import unsupported_reason

    model = UNSUPPORTED["efficientformer"][0]()
    assert "unequal widths" in unsupported_reason(model.get_submodule("stages.3.blocks.2.token_mixer"))
    model = UNSUPPORTED["levit"][0]()
    assert "not an nn.Linear" in unsupported_reason(model.get_submodule("stages.0.blocks.0.attn"))
    assert unsupported_reason(make("tiny_vit")[0].get_submodule("stages.1.blocks.0.attn")) is None


@pytest.mark.parametrize("name", ["tiny_vit", "maxvit_rw", "gcvit", "convit"])
def test_lora_merge_in_odd_layouts(name):
    """LoRA merged into the frozen rows of head-major, kv-only and qk+v projections gives the
    same function as the unmerged branches."""
    model, x = make(name)
    vpetl.inject(model, "lora", positions="v" if name == "gcvit" else "qv")  # GCViT global blocks have no q
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".vpetl_lora." in n and ".up." in n:
                p.normal_(std=0.1)
        expected = model(x)
        vpetl.merge(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_strict_false_adapts_the_rest():
    """VOLO: outlook attention (a lone ``v`` Linear) is not adaptable; its transformer and
    class-attention blocks are. strict=False warns, adapts those and leaves the rest frozen."""
    from timm.models.volo import VOLO

    torch.manual_seed(0)
    model = VOLO(
        layers=(1, 1, 1, 1), img_size=32, num_classes=CLASSES, stem_hidden_dim=8, embed_dims=(16, 32, 32, 32),
        num_heads=(1, 2, 2, 2),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(vpetl.InjectionError, match=r"network\.0\.0\.attn \(OutlookAttention\)"):
        vpetl.inject(model, "bapat", d_bottle=8)
    with pytest.warns(UserWarning, match=r"network\.0\.0\.attn \(OutlookAttention\)"):
        vpetl.inject(model, "bapat", d_bottle=8, strict=False, example_input=x)
    paths = attention_paths(model)
    assert "network.0.0.attn" not in paths and len(paths) == 5  # 3 transformer + 2 class-attention blocks
    assert not any(p.requires_grad for p in model.network[0].parameters())


def test_crossvit_cross_attention_is_adapted_not_skipped():
    """CrossViT's fusion blocks use wq/wk/wv Linears and have no MLP: PATT reaches them, and an
    adapter method leaves them without an adapter (they have no MLP to sit beside)."""
    torch.manual_seed(0)
    model = timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=5)
    images = torch.randn(1, 3, 240, 240)
    vpetl.inject(model, "patt", d_bottle=4, example_input=images)
    assert type(model.blocks[0].fusion[0].attn.wk).__name__ == "BranchedLinear"
    bapat = vpetl.inject(timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=5), "bapat",
                         d_bottle=4, example_input=images)  # every branch is called
    assert "vpetl_patt" in bapat.blocks[0].fusion[0].attn._modules and "vpetl_adapter" not in bapat.blocks[0].fusion[0]._modules
