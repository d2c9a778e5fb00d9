"""Extra keys and values along the token axis: prefix-tuning (prepended, Eq. 5) and PATT variant
"concat" (appended, one per token), on timm ViT, nn.MultiheadAttention and torchvision
Swin / Swin3D window attention.

Every check compares against a reference written here from the equations with plain einsum
attention, ``softmax(Q [P_k | K | s K_p]^T / sqrt(hd) + bias) [P_v | V | s V_p]``, reading only
the frozen base weights and the branches' parameters.
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn
from torchvision.models import swin_transformer as tv_swin
from torchvision.models.video import swin_transformer as tv_swin3d

import vpetl
from vpetl.config import InjectConfig, LoraConfig, PattConfig, PrefixConfig
from vpetl.errors import InjectionError
from vpetl.handlers._extra_keys import EXTRA_KV_ATTR, KeyLayout, extend_bias, extend_mask

ATOL = 1e-5
E, H = 32, 4

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch's nested-tensor prototype notices


# ----------------------------------------------------------------------------- configs


def _config(kind: str):
    """(method, options) or an InjectConfig for each combination under test."""
    if kind == "prefix":
        return "prefix", {"length": 3, "d_bottle": 8}
    if kind == "concat":
        return "patt", {"variant": "concat", "d_bottle": 8}
    if kind == "bapat_concat":  # adapter beside the MLP + concat PATT
        return "bapat", {"variant": "concat", "d_bottle": 8}
    if kind == "lora_prefix":  # LoRA in the qkv projection + prefix keys
        return InjectConfig(methods=(PrefixConfig(length=3, d_bottle=8), LoraConfig(rank=4))), {}
    if kind == "prefix_concat":  # both placements in one attention
        config = InjectConfig(methods=(PrefixConfig(length=3, d_bottle=8), PattConfig(d_bottle=8, variant="concat")))
        return config, {}
    raise KeyError(kind)


def _inject(model: nn.Module, kind: str, example) -> nn.Module:
    method, options = _config(kind)
    vpetl.inject(model, method, example_input=example, **options)
    with torch.no_grad():  # zero-initialised up-projections (LoRA B, adapter) would hide a wrong wiring
        for name, p in model.named_parameters():
            if ("vpetl_lora" in name or "vpetl_adapter" in name) and ".up." in name:
                p.normal_(0, 0.2)
    return model


# ----------------------------------------------------------------------------- reference math


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(B, T, h*hd) -> (B, h, T, hd)."""
    return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def attention_ref(q, k, v, bias=None):
    """softmax(q k^T / sqrt(hd) + bias) v; q (B,H,N,hd), k/v (B,H,S,hd), bias broadcast to (B,H,N,S)."""
    logits = torch.einsum("bhnd,bhsd->bhns", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return torch.einsum("bhns,bhsd->bhnd", logits.softmax(-1), v)


def _mlp(branch, inp):
    return F.linear(torch.tanh(F.linear(inp, branch.down.weight, branch.down.bias)), branch.up.weight, branch.up.bias)


def qkv_ref(module, x, weight, bias):
    """x W^T + b, plus LoRA's scale * x A_p^T B_p^T in slot p when the module has LoRA."""
    out = F.linear(x, weight, bias)
    lora = module._modules.get("vpetl_lora")
    if lora is None:
        return out
    d = out.shape[-1] // 3
    slots = list(out.split(d, -1))
    for i, c in enumerate("qkv"):
        if c in lora.positions:
            pair = lora.pair(c)
            slots[i] = slots[i] + lora.scale * F.linear(F.linear(x, pair.down.weight), pair.up.weight)
    return torch.cat(slots, -1)


def extend_ref(module, k, v, x_key, x_value, h):
    """[P_k | K | s K_p], [P_v | V | s V_p] from the module's prefix / concat PATT branches;
    returns them and (prefix length, whether keys were appended)."""
    d = k.shape[1] * k.shape[3]
    ks, vs, length, appended = [k], [v], 0, False
    prefix = module._modules.get("vpetl_prefix")
    if prefix is not None:
        kv = _mlp(prefix, prefix.tokens)
        length = kv.shape[0]
        ks.insert(0, heads(kv[None, :, :d].expand(k.shape[0], -1, -1), h))
        vs.insert(0, heads(kv[None, :, d:].expand(k.shape[0], -1, -1), h))
    patt = module._modules.get("vpetl_patt")
    if patt is not None and patt.variant.value == "concat":
        ks.append(heads(patt.scale * _mlp(patt, x_key)[..., :d], h))
        vs.append(heads(patt.scale * _mlp(patt, x_value)[..., d:], h))
        appended = True
    return torch.cat(ks, 2), torch.cat(vs, 2), length, appended


def pad_columns(t, length, appended, copy_columns):
    """(..., S) -> [0]*length | t | (t or 0) along the last axis."""
    parts = [t.new_zeros(*t.shape[:-1], length)] if length else []
    parts.append(t)
    if appended:
        parts.append(t if copy_columns else torch.zeros_like(t))
    return torch.cat(parts, -1)


def additive(mask):
    """bool (True = masked out) -> 0 / -inf; float unchanged."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


def _capture(model, modules, *inputs):
    """(module, input, output) of every call of ``modules`` during ``model(*inputs)``."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out))) for m in modules]
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _check_structure_restored(model, base, *inputs):
    """disabled() runs the base exactly; unload restores classes, attributes, keys, outputs."""
    expected = base(*inputs)
    with vpetl.disabled(model):
        assert torch.equal(model(*inputs), expected)
    vpetl.unload(model)
    assert torch.equal(model(*inputs), expected)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert not any(EXTRA_KV_ATTR in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == list(base.state_dict())


def _check_grads(model, loss, base_names):
    loss.backward()
    for name, p in model.named_parameters():
        if "vpetl_" in name:
            assert p.grad is not None, name
            if name.endswith(("tokens", "up.weight")) and "adapter" not in name:
                assert p.grad.abs().sum() > 0, name
        elif name in base_names:
            assert p.grad is None, name


# ----------------------------------------------------------------------------- helpers


def test_extend_mask_and_bias_shapes():
    layout = KeyLayout(source=3, prefix=2, copies=1)
    mask = torch.tensor([[0.0, -1.0, -2.0]])
    assert extend_mask(mask, layout, 0.0).tolist() == [[0, 0, 0, -1, -2, 0, -1, -2]]
    assert extend_mask(torch.tensor([[True, False, True]]), layout, True).tolist() == [
        [True, True, True, False, True, True, False, True]
    ]
    assert extend_mask(torch.zeros(2, 1), layout, 0.0).shape == (2, 8)  # broadcast key axis
    assert extend_bias(torch.ones(1, 2, 3), layout).tolist() == [[[0, 0, 1, 1, 1, 0, 0, 0]] * 2]
    with pytest.raises(RuntimeError, match="last axis"):
        extend_mask(torch.zeros(2, 4), layout, 0.0)


# ----------------------------------------------------------------------------- timm ViT


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2,
        embed_dim=E, num_heads=2, qkv_bias=True,
    ).eval()


def timm_ref(attn, x, bias=None):
    """timm Attention (no q/k norm, no gate) with the extra keys, from the equation."""
    h, d = attn.num_heads, attn.attn_dim
    q, k, v = (heads(t, h) for t in qkv_ref(attn, x, attn.qkv.weight, attn.qkv.bias).split(d, -1))
    k, v, length, appended = extend_ref(attn, k, v, x, x, h)
    if bias is not None:
        bias = pad_columns(bias, length, appended, copy_columns=True)
    return F.linear(merge_heads(attention_ref(q, k, v, bias)), attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("kind", ["prefix", "concat", "bapat_concat", "lora_prefix", "prefix_concat"])
def test_timm_vit_matches_reference_disable_and_unload(kind):
    base = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    model = _inject(copy.deepcopy(base), kind, x)
    attns = [b.attn for b in model.blocks]
    assert all(type(a).__name__ == "VpetlExtraKeysAttention" for a in attns)
    with torch.no_grad():
        seen = _capture(model, attns, x)
        assert len(seen) == len(attns)
        for attn, inp, out in seen:
            torch.testing.assert_close(out, timm_ref(attn, inp), atol=ATOL, rtol=0)
        assert (model(x) - base(x)).abs().max() > 1e-4
        _check_structure_restored(model, base, x)


@pytest.mark.parametrize("fused", [True, False])
def test_timm_attention_masks_and_causal(fused):
    base = tiny_vit()
    model = _inject(copy.deepcopy(base), "prefix_concat", torch.randn(1, 3, 32, 32))
    attn = model.blocks[0].attn
    attn.fused_attn = fused
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 17, E, generator=g)
    allowed = torch.rand(2, 1, 17, 17, generator=g) > 0.3
    allowed |= torch.eye(17, dtype=torch.bool)
    float_mask = torch.randn(17, 17, generator=g)
    causal_additive = torch.full((17, 17), float("-inf")).triu(1)
    with torch.no_grad():
        cases = [
            ({}, None),
            ({"attn_mask": allowed}, additive(~allowed)),  # timm / SDPA bool: True = may attend
            ({"attn_mask": float_mask}, float_mask),
            ({"is_causal": True}, causal_additive),
        ]
        for kwargs, bias in cases:
            torch.testing.assert_close(attn(x, **kwargs), timm_ref(attn, x, bias), atol=ATOL, rtol=0)


def test_timm_gradients_reach_branches_not_base():
    base = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    model = _inject(copy.deepcopy(base), "prefix_concat", x).train()
    base_names = {n for n, _ in base.named_parameters() if not n.startswith("head.")}
    _check_grads(model, model(x).square().mean(), base_names)
    assert model.head.weight.grad is not None


def test_timm_injected_model_pickles_and_copies():
    base = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    model = _inject(copy.deepcopy(base), "prefix_concat", x)
    with torch.no_grad():
        expected = model(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            torch.testing.assert_close(clone(x), expected, atol=0, rtol=0)
            attn = clone.blocks[0].attn
            assert attn.__dict__[EXTRA_KV_ATTR][0] is attn.vpetl_prefix


class OwnForwardAttention(TimmAttention):
    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x) * 2


class OneBlock(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x)


def test_timm_subclass_with_own_forward_is_refused():
    model = OneBlock(OwnForwardAttention(E, num_heads=2, qkv_bias=True))
    with pytest.raises(InjectionError) as info:
        vpetl.inject(model, "prefix")
    message = str(info.value)
    for part in ("OwnForwardAttention", "overrides forward", "timm.layers.Attention", "nn.MultiheadAttention", "Swin"):
        assert part in message
    assert type(model.attn) is OwnForwardAttention and "vpetl_prefix" not in model.attn._modules


def test_hf_vit_separate_qkv_is_refused():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=E, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=5,
    )
    model = transformers.ViTForImageClassification(config)
    with pytest.raises(InjectionError) as info:
        vpetl.inject(model, "patt", variant="concat")
    message = str(info.value)
    for part in ("ViTAttention", "cannot take extra key/value tokens", "nn.MultiheadAttention", "timm"):
        assert part in message
    assert not any("vpetl" in n for n, _ in model.named_modules())


# ----------------------------------------------------------------------------- nn.MultiheadAttention


class AttnNet(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def mha_ref(attn, query, key, value, key_padding_mask=None, attn_mask=None, is_causal=False, holder=None):
    """nn.MultiheadAttention with extra keys, from the equation; returns (out, head-averaged weights).
    ``is_causal`` is a hint: the causal pattern comes with ``attn_mask``, as nn.MultiheadAttention wants.
    ``holder``: the module the branches are registered on (the attention itself by default)."""
    major = (lambda t: t) if attn.batch_first else (lambda t: t.transpose(0, 1))
    xq, xk, xv = major(query), major(key), major(value)
    w, b = attn.in_proj_weight.split(E), attn.in_proj_bias.split(E)
    q, k, v = (heads(F.linear(t, wi, bi), H) for t, wi, bi in zip((xq, xk, xv), w, b))
    k, v, length, appended = extend_ref(holder or attn, k, v, xk, xv, H)
    bias = torch.zeros(xq.shape[0], 1, xq.shape[1], xk.shape[1])
    if attn_mask is not None:
        bias = bias + additive(attn_mask)
    if key_padding_mask is not None:
        bias = bias + additive(key_padding_mask)[:, None, None, :]
    bias = pad_columns(bias, length, appended, copy_columns=True)
    logits = torch.einsum("bhnd,bhsd->bhns", q, k) / math.sqrt(q.shape[-1]) + bias
    out = F.linear(merge_heads(attention_ref(q, k, v, bias)), attn.out_proj.weight, attn.out_proj.bias)
    return major(out), logits.softmax(-1).mean(1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["prefix", "concat", "prefix_concat"])
def test_mha_matches_reference_with_masks(batch_first, kind):
    torch.manual_seed(0)
    base = AttnNet(batch_first).eval()
    with torch.no_grad():
        base.attn.in_proj_bias.normal_()
    g = torch.Generator().manual_seed(2)
    shape = (lambda n: (2, n, E)) if batch_first else (lambda n: (n, 2, E))
    x, mem, other = (torch.randn(shape(n), generator=g) for n in (5, 6, 6))
    model = _inject(copy.deepcopy(base), kind, x)
    attn = model.attn
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    float_mask = torch.randn(5, 5, generator=g)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    calls = [
        ((x, x, x), {"key_padding_mask": padding[:, :5]}),
        ((x, x, x), {"attn_mask": float_mask, "key_padding_mask": padding[:, :5]}),
        ((x, x, x), {"attn_mask": causal, "is_causal": True}),
        ((x, mem, mem), {"key_padding_mask": padding}),  # cross-attention
        ((x, mem, other), {}),  # K and V from different inputs
    ]
    with torch.no_grad():
        for args, kwargs in calls:
            expected, expected_w = mha_ref(attn, *args, **kwargs)
            out, _ = attn(*args, need_weights=False, **kwargs)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
            out, weights = attn(*args, need_weights=True, **kwargs)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(weights, expected_w, atol=ATOL, rtol=0)  # (N, L, S') over all keys
        # unbatched (L, E) input: the second sample of the batched call, its padding row included
        pick = (lambda t: t[1]) if batch_first else (lambda t: t[:, 1])
        expected, expected_w = mha_ref(attn, x, x, x, key_padding_mask=padding[:, :5])
        out, weights = attn(pick(x), pick(x), pick(x), key_padding_mask=padding[1, :5])
        torch.testing.assert_close(out, pick(expected), atol=ATOL, rtol=0)
        torch.testing.assert_close(weights, expected_w[1], atol=ATOL, rtol=0)
        _check_structure_restored(model, base, x)


def test_mha_gradients_reach_branches_not_base():
    torch.manual_seed(0)
    base = AttnNet(batch_first=True)
    x = torch.randn(2, 5, E)
    model = _inject(copy.deepcopy(base), "prefix_concat", x).train()
    _check_grads(model, model(x).square().mean(), {n for n, _ in base.named_parameters()})


def test_encoder_layer_prefix_concat_with_padding_fast_path():
    """nn.TransformerEncoder in eval with a padding mask hands its layer a nested tensor."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    base = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=True).eval()
    x = torch.randn(2, 6, E)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    model = _inject(copy.deepcopy(base), "bapat_concat", x)
    block = model.layers[0]
    nested = []
    hook = block.register_forward_pre_hook(lambda mod, args: nested.append(args[0].is_nested))
    with torch.no_grad():
        out = model(x, src_key_padding_mask=padding)
        hook.remove()
        assert nested == [True]
        # post-norm: y = norm1(x + sa(x)); out = norm2(y + ff(y) + s * adapter(y))
        y = block.norm1(x + mha_ref(block.self_attn, x, x, x, key_padding_mask=padding, holder=block)[0])
        adapter = block.vpetl_adapter
        expected = block.norm2(y + block.linear2(F.relu(block.linear1(y))) + adapter.scale * _mlp_relu(adapter, y))
        keep = ~padding
        torch.testing.assert_close(out[keep], expected[keep], atol=ATOL, rtol=0)
        _check_structure_restored(model, base, x)


def _mlp_relu(branch, inp):
    return F.linear(F.relu(F.linear(inp, branch.down.weight, branch.down.bias)), branch.up.weight, branch.up.bias)


# ----------------------------------------------------------------------------- torchvision window attention


WINDOW_CLASSES = (tv_swin.ShiftedWindowAttention, tv_swin.ShiftedWindowAttentionV2, tv_swin3d.ShiftedWindowAttention3d)


def _randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WINDOW_CLASSES):
                m.qkv.bias.normal_(0, 0.5)
                m.proj.bias.normal_(0, 0.1)
                if hasattr(m, "relative_position_bias_table"):
                    m.relative_position_bias_table.normal_(0, 0.5)
    return model.eval()


def swin2d(v2: bool = False):
    torch.manual_seed(0)
    extra = dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2) if v2 else {}
    return _randomize(tv_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=5,
        stochastic_depth_prob=0.0, **extra,
    ))


def swin3d():
    torch.manual_seed(0)
    return _randomize(tv_swin3d.SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 4, 4], num_classes=5,
        stochastic_depth_prob=0.0,
    ))


def partition(x, window):
    """(B, P_1..P_n, C) -> (B*nW, prod(window), C), windows and tokens in raster order."""
    n, b, c = len(window), x.shape[0], x.shape[-1]
    split = [b] + [s for p, w in zip(x.shape[1:-1], window) for s in (p // w, w)]
    x = x.reshape(*split, c).permute(0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1)
    return x.reshape(-1, math.prod(window), c)


def unpartition(x, window, sizes, b):
    n = len(window)
    grid = [p // w for p, w in zip(sizes, window)]
    x = x.reshape(b, *grid, *window, x.shape[-1])
    order = [0] + [i for a in range(n) for i in (1 + a, 1 + n + a)] + [2 * n + 1]
    return x.permute(order).reshape(b, *sizes, x.shape[-1])


def swin_shift_mask(sizes, window, shift):
    """The Swin papers' mask: label the regions of the rolled map by slices, -100 across regions."""
    labels, count = torch.zeros(sizes), 0
    ranges = [((0, -w), (-w, -s), (-s, None)) if s else ((0, None),) for w, s in zip(window, shift)]
    for combo in itertools.product(*ranges):
        labels[tuple(slice(a, b) for a, b in combo)] = count
        count += 1
    per_window = partition(labels[None, ..., None], window).squeeze(-1)  # (nW, N)
    differ = per_window[:, None, :] != per_window[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, -100.0)


def window_ref(attn, x):
    """Swin / Swin3D window attention with extra keys, for inputs that fill whole windows."""
    sizes, c, b, h = tuple(x.shape[1:-1]), x.shape[-1], x.shape[0], attn.num_heads
    window, shift = list(attn.window_size), list(attn.shift_size)
    for i, size in enumerate(sizes):  # torchvision's rules: no shift where one window spans the axis
        if isinstance(attn, tv_swin3d.ShiftedWindowAttention3d) and size <= window[i]:
            window[i], shift[i] = size, 0
        elif window[i] >= size:
            shift[i] = 0
    dims = tuple(range(1, len(sizes) + 1))
    windows = partition(torch.roll(x, [-s for s in shift], dims), window)
    q, k, v = (heads(t, h) for t in qkv_ref(attn, windows, attn.qkv.weight, attn.qkv.bias).split(c, -1))
    k, v, length, appended = extend_ref(attn, k, v, windows, windows, h)
    if isinstance(attn, tv_swin3d.ShiftedWindowAttention3d):
        rel = attn.get_relative_position_bias(window)
    else:
        rel = attn.get_relative_position_bias()
    rel = pad_columns(rel, length, appended, copy_columns=False)  # (1, H, N, S')
    mask = pad_columns(swin_shift_mask(sizes, window, shift), length, appended, copy_columns=True)  # (nW, N, S')
    bias = (rel[None] + mask[None, :, None]).reshape(-1, h, *mask.shape[1:])
    bias = bias.repeat(b, 1, 1, 1) if bias.shape[0] != windows.shape[0] else bias
    out = F.linear(merge_heads(attention_ref(q, k, v, bias)), attn.proj.weight, attn.proj.bias)
    return torch.roll(unpartition(out, window, sizes, b), shift, dims), any(shift)


@pytest.mark.parametrize(
    "factory, shape, kind",
    [
        (swin2d, (2, 3, 32, 32), "prefix"),
        (swin2d, (2, 3, 32, 32), "concat"),
        (swin2d, (1, 3, 32, 32), "bapat_concat"),
        (swin3d, (1, 3, 8, 32, 32), "prefix_concat"),
        (swin3d, (1, 3, 8, 32, 32), "lora_prefix"),
    ],
)
def test_window_matches_reference_disable_and_unload(factory, shape, kind):
    base = factory()
    x = torch.randn(*shape)
    model = _inject(copy.deepcopy(base), kind, x)
    attns = [m for m in model.modules() if isinstance(m, WINDOW_CLASSES)]
    shifted = 0
    with torch.no_grad():
        for attn, inp, out in _capture(model, attns, x):
            expected, was_shifted = window_ref(attn, inp)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
            shifted += was_shifted
        assert shifted >= 1  # the shifted-window mask path was exercised
        assert (model(x) - base(x)).abs().max() > 1e-4
        _check_structure_restored(model, base, x)


def test_swin_v2_extra_keys_run_and_unload():
    base = swin2d(v2=True)
    x = torch.randn(1, 3, 40, 24)  # padded windows
    model = _inject(copy.deepcopy(base), "prefix_concat", x)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() > 1e-5
        _check_structure_restored(model, base, x)


def test_window_gradients_reach_branches_not_base():
    base = swin3d()
    x = torch.randn(1, 3, 8, 32, 32)
    model = _inject(copy.deepcopy(base), "prefix_concat", x).train()
    base_names = {n for n, _ in base.named_parameters() if not n.startswith("head.")}
    _check_grads(model, model(x).square().mean(), base_names)
