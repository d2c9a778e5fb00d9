"""Shape (d): torchvision window attention (Swin, SwinV2, Swin3D / Video Swin).

Tiny random-weight models; every comparison is against the untouched torchvision module
or a hand-written reference of the paper's equations.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from torchvision.models import swin_transformer as tv_swin
from torchvision.models.video import swin_transformer as tv_swin3d

from conftest import trainable_count

import vpetl
from vpetl.errors import InjectionError
from vpetl.handlers import HANDLERS
from vpetl.handlers import window as window_handler
from vpetl.handlers.fused_qkv import FusedQkvHandler
from vpetl.handlers.window import WindowAttentionHandler
from vpetl.handlers.sites import find_attention
from vpetl.inject import branches_of

WINDOW_CLASSES = (tv_swin.ShiftedWindowAttention, tv_swin3d.ShiftedWindowAttention3d)


# ----------------------------------------------------------------------------- helpers


def _randomize(model: nn.Module) -> nn.Module:
    """Make the attention's own parameters non-trivial (torchvision inits biases to zero,
    SwinV2 zeroes the K bias): random qkv/proj biases, position tables, logit scales."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WINDOW_CLASSES):
                if m.qkv.bias is not None:
                    m.qkv.bias.normal_(0, 0.5)  # SwinV2's K third too: the forward must ignore it
                if m.proj.bias is not None:
                    m.proj.bias.normal_(0, 0.1)
                if hasattr(m, "relative_position_bias_table"):
                    m.relative_position_bias_table.normal_(0, 0.5)
                if hasattr(m, "logit_scale"):
                    m.logit_scale.uniform_(0.5, 5.5)  # 5.5 > log(100): the clamp matters
    return model


def swin2d(v2: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    extra = dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2) if v2 else {}
    model = tv_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=5,
        stochastic_depth_prob=0.0, **extra,
    )
    return _randomize(model).eval()


def swin3d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = tv_swin3d.SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 4, 4], num_classes=5,
        stochastic_depth_prob=0.0,
    )
    return _randomize(model).eval()


# Inputs: a size that fills whole windows, and one that needs padding (and unshifted axes).
MODELS = {
    "swin": (lambda: swin2d(False), [(2, 3, 32, 32), (1, 3, 40, 24)]),
    "swin_v2": (lambda: swin2d(True), [(2, 3, 32, 32), (1, 3, 40, 24)]),
    "swin3d": (swin3d, [(1, 3, 4, 32, 32), (1, 3, 6, 40, 24)]),
}


def _inputs(shapes, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, WINDOW_CLASSES)]


# --------------------------------------------------------------- single-module equivalence

MODULE_CASES = [
    # (class, window, shift, input shapes): whole windows, padding, a window larger than the map
    (tv_swin.ShiftedWindowAttention, [4, 4], [0, 0], [(2, 8, 8, 16), (1, 10, 6, 16)]),
    (tv_swin.ShiftedWindowAttention, [4, 4], [2, 2], [(2, 8, 8, 16), (1, 10, 6, 16), (1, 3, 5, 16)]),
    (tv_swin.ShiftedWindowAttentionV2, [4, 4], [0, 0], [(2, 8, 8, 16), (1, 10, 6, 16)]),
    (tv_swin.ShiftedWindowAttentionV2, [4, 4], [2, 2], [(2, 8, 8, 16), (1, 10, 6, 16), (1, 3, 5, 16)]),
    (tv_swin3d.ShiftedWindowAttention3d, [2, 4, 4], [0, 0, 0], [(1, 2, 8, 8, 16), (1, 3, 10, 6, 16)]),
    (tv_swin3d.ShiftedWindowAttention3d, [2, 4, 4], [1, 2, 2], [(1, 4, 8, 8, 16), (1, 3, 10, 6, 16), (1, 1, 3, 9, 16)]),
]


@pytest.mark.parametrize("cls,window,shift,shapes", MODULE_CASES, ids=lambda v: getattr(v, "__name__", None))
def test_module_zero_branches_equal_torchvision(cls, window, shift, shapes):
    torch.manual_seed(0)
    module = _randomize(cls(16, window, shift, num_heads=2, attention_dropout=0.3, dropout=0.3)).eval()
    original = copy.deepcopy(module)
    vpetl.inject(module, "patt", d_bottle=8, zero_init=True)
    assert type(module).__name__ == "Vpetl" + cls.__name__ and isinstance(module, cls)
    for x in _inputs(shapes):
        with torch.no_grad():
            torch.testing.assert_close(module(x), original(x), atol=1e-5, rtol=1e-5)


def test_module_default_patt_changes_output_and_unload_restores():
    torch.manual_seed(0)
    module = _randomize(tv_swin.ShiftedWindowAttentionV2(16, [4, 4], [2, 2], num_heads=2)).eval()
    original = copy.deepcopy(module)
    x = torch.randn(1, 10, 6, 16)
    vpetl.inject(module, "patt", d_bottle=8)
    with torch.no_grad():
        assert (module(x) - original(x)).abs().max() > 1e-3
        vpetl.unload(module)
        assert type(module) is tv_swin.ShiftedWindowAttentionV2
        assert not hasattr(module, window_handler.BRANCHES_ATTR)
        torch.testing.assert_close(module(x), original(x), atol=0, rtol=0)


def test_handler_order_claims_window_attention_before_fused_qkv():
    """The Linear-wrapping handler would also match (qkv is a plain nn.Linear) and be bypassed."""
    model = swin3d()
    attn = _attention_modules(model)[0][1]
    assert FusedQkvHandler().match(attn)  # why the order matters
    first = [type(h) for h in HANDLERS]
    assert first.index(WindowAttentionHandler) < first.index(FusedQkvHandler)
    sites, unhandled = find_attention(model)
    assert unhandled == []
    assert [s.path for s in sites] == [p for p, _ in _attention_modules(model)]
    assert {s.handler.name for s in sites} == {"torchvision-window"}


def test_spec():
    module = tv_swin3d.ShiftedWindowAttention3d(32, [2, 4, 4], [0, 0, 0], num_heads=4, qkv_bias=False)
    spec = WindowAttentionHandler().spec(module)
    assert (spec.d_in, spec.widths, spec.bias) == (32, {"q": 32, "k": 32, "v": 32}, False)
    assert spec.dtype == torch.float32 and spec.device.type == "cpu"


# ------------------------------------------------------------------------ whole models


@pytest.mark.parametrize("name", list(MODELS))
def test_bapat_zero_init_equals_original_and_keys_unchanged(name):
    build, shapes = MODELS[name]
    model = build()
    original = copy.deepcopy(model)
    keys_before = list(model.state_dict())
    vpetl.inject(model, "bapat", d_bottle=8, zero_init=True)
    keys_after = list(model.state_dict())
    assert [k for k in keys_after if "vpetl_" not in k] == keys_before
    added = {k.split("vpetl_")[1].split(".")[0] for k in keys_after if "vpetl_" in k}
    assert added == {"patt", "adapter"}
    for x in _inputs(shapes):
        with torch.no_grad():
            torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_bapat_default_init_changes_output_and_every_branch_is_called(name):
    build, shapes = MODELS[name]
    model = build()
    original = copy.deepcopy(model)
    vpetl.inject(model, "bapat", d_bottle=8)
    attn = _attention_modules(model)
    branches = branches_of(model)
    assert len(branches) == 2 * len(attn)  # one PATT + one adapter per block
    assert {p + ".vpetl_patt" for p, _ in attn} <= set(branches)
    x = _inputs(shapes)[1]  # the padded input
    vpetl.verify(model, x)
    with torch.no_grad():
        assert (model(x) - original(x)).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_reach_branches_and_head_only(name):
    build, shapes = MODELS[name]
    model = build()
    vpetl.inject(model, "bapat", d_bottle=8)
    model.train()
    x = _inputs(shapes)[1]
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            assert "vpetl_" in pname or pname.startswith("head."), pname
        else:
            assert p.grad is None, pname
    grads = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.requires_grad}
    for pname in [p for p in grads if ".vpetl_patt." in p and p.endswith("weight")]:
        assert grads[pname] > 0, pname  # PATT's down and up weights both learn
    assert all(grads[p] > 0 for p in grads if ".vpetl_adapter.up.weight" in p)
    assert grads["head.weight"] > 0
    assert any(".vpetl_patt." in p for p in grads) and any(".vpetl_adapter." in p for p in grads)


# ------------------------------------------------------------------- Eq. 10, by hand


def test_patt_matches_eq10_reference_on_one_window():
    torch.manual_seed(0)
    dim, heads, window = 16, 2, (2, 4, 4)
    module = _randomize(tv_swin3d.ShiftedWindowAttention3d(dim, list(window), [0, 0, 0], num_heads=heads)).eval()
    original = copy.deepcopy(module)
    vpetl.inject(module, "patt", d_bottle=8)  # default init: W_up != 0
    patt = module.vpetl_patt
    with torch.no_grad():
        patt.up.bias.normal_(0, 0.3)
    batch, tokens, hd = 2, math.prod(window), dim // heads
    x = torch.randn(batch, *window, dim)  # exactly one window: no padding, no shift

    # Eq. 9-10 written out: [K_p | V_p] = tanh(x W_down + b_down) W_up + b_up,
    # K = x W_k + b_k + s K_p, V = x W_v + b_v + s V_p.
    z = x.reshape(batch, tokens, dim)
    w, b = module.qkv.weight, module.qkv.bias
    q = z @ w[:dim].T + b[:dim]
    k = z @ w[dim : 2 * dim].T + b[dim : 2 * dim]
    v = z @ w[2 * dim :].T + b[2 * dim :]
    hidden = torch.tanh(z @ patt.down.weight.T + patt.down.bias)
    k = k + patt.scale * (hidden @ patt.up.weight[:dim].T + patt.up.bias[:dim])
    v = v + patt.scale * (hidden @ patt.up.weight[dim:].T + patt.up.bias[dim:])
    q, k, v = (t.view(batch, tokens, heads, hd).transpose(1, 2) for t in (q, k, v))
    # relative position bias, indexed from the token coordinates
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in window], indexing="ij")).flatten(1).T  # (N, 3)
    rel = grid[:, None, :] - grid[None, :, :] + torch.tensor(window) - 1  # (N, N, 3), each in [0, 2w-2]
    spans = [2 * n - 1 for n in window]
    index = (rel[..., 0] * spans[1] + rel[..., 1]) * spans[2] + rel[..., 2]
    bias = module.relative_position_bias_table[index].permute(2, 0, 1)  # (H, N, N)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd) + bias, dim=-1)
    expected = module.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim)).view_as(x)

    with torch.no_grad():
        got = module(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (got - original(x)).abs().max() > 1e-3  # PATT is really in there


# ------------------------------------------------------------------------------- LoRA


def test_lora_swin3d_train_step_and_merge_equivalence():
    model = swin3d()
    reference = copy.deepcopy(model)
    vpetl.inject(model, "lora")
    x = _inputs(MODELS["swin3d"][1])[1]

    model.train()
    out = model(x)
    out.square().mean().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if ".vpetl_lora." in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)  # B gets a gradient (A's is zero while B = 0)
    model.zero_grad()
    model.eval()

    # Random B; merge by hand into the reference: qkv rows of q and v get scale * B @ A.
    torch.manual_seed(3)
    with torch.no_grad():
        for path, attn in _attention_modules(model):
            lora, dim = attn.vpetl_lora, attn.qkv.in_features
            ref_weight = reference.get_submodule(path).qkv.weight
            for letter, rows in (("q", slice(0, dim)), ("v", slice(2 * dim, 3 * dim))):
                pair = getattr(lora, letter)
                pair.up.weight.normal_(0, 0.2)
                ref_weight[rows] += lora.scale * pair.up.weight @ pair.down.weight
        got, expected = model(x), reference(x)
        assert (expected - swin3d()(x)).abs().max() > 1e-3  # the merged delta matters
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

        vpetl.merge(model)  # the library's merge agrees with the hand merge
        assert all(type(m) is tv_swin3d.ShiftedWindowAttention3d for _, m in _attention_modules(model))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- errors and pickling


def test_subclass_overriding_forward_is_refused():
    class Custom(tv_swin3d.ShiftedWindowAttention3d):
        def forward(self, x):
            return super().forward(x)

    block = nn.Module()
    block.attn = Custom(16, [2, 4, 4], [0, 0, 0], num_heads=2)
    with pytest.raises(InjectionError, match="overrides forward"):
        vpetl.inject(block, "patt")
    assert type(block.attn) is Custom and "vpetl_patt" not in block.attn._modules  # rolled back


def test_unsupported_qkv_is_refused():
    attn = tv_swin.ShiftedWindowAttention(16, [4, 4], [0, 0], num_heads=2)
    attn.qkv = nn.Linear(16, 40)
    with pytest.raises(InjectionError, match="qkv maps 16 -> 40"):
        vpetl.inject(attn, "patt")


def test_wrong_input_rank_is_a_clear_error():
    attn = tv_swin.ShiftedWindowAttention(16, [4, 4], [0, 0], num_heads=2)
    vpetl.inject(attn, "patt", d_bottle=4)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        attn(torch.randn(1, 2, 4, 4, 16))


def test_injected_module_pickles():
    torch.manual_seed(0)
    attn = _randomize(tv_swin.ShiftedWindowAttentionV2(16, [4, 4], [2, 2], num_heads=2)).eval()
    vpetl.inject(attn, "patt", d_bottle=4)
    clone = pickle.loads(pickle.dumps(attn))
    assert type(clone) is type(attn)
    assert getattr(window_handler, type(attn).__name__) is type(attn)
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), attn(x), atol=0, rtol=0)


# ------------------------------------------------------- paper parameter counts (Table 3/4)

VIDEO_SWIN_B_WIDTHS = [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2  # 24 blocks, sum 12,032
HEAD = 1024 * 174 + 174  # 178,350


@pytest.fixture(scope="module")
def swin3d_b():
    torch.manual_seed(0)
    return tv_swin3d.swin3d_b(num_classes=174)  # random weights; no forward is run


@pytest.mark.parametrize(
    "method,d_bottle,expected",
    [
        ("linear", None, 178_350),
        ("adapter", None, 1_732_014),
        ("bapat", 32, 2_911_918),
        ("bapat", 64, 4_067_758),
        ("bapat", 128, 6_379_438),
        ("bapat", 256, 11_002_798),
        ("lora", None, 948_398),
        ("patt", 32, 1_358_254),
    ],
)
def test_paper_parameter_counts_video_swin_b(swin3d_b, method, d_bottle, expected):
    assert sum(VIDEO_SWIN_B_WIDTHS) == 12_032
    if method == "patt":  # per block 3*d*r + r + 2*d (down d->r, up r->2d, both with bias) + head
        assert expected == sum(3 * d * d_bottle + d_bottle + 2 * d for d in VIDEO_SWIN_B_WIDTHS) + HEAD
    vpetl.inject(swin3d_b, method, d_bottle=d_bottle)
    try:
        assert trainable_count(swin3d_b) == expected
    finally:
        vpetl.unload(swin3d_b)
    assert trainable_count(swin3d_b) == sum(p.numel() for p in swin3d_b.parameters())
