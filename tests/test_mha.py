"""Shape (c): nn.MultiheadAttention, torchvision ViT, nn.TransformerEncoder(Layer)/Decoder.

Every model here is tiny (width 32) and randomly initialised; the reference is always a
``copy.deepcopy`` of the model taken before ``inject``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import vpetl
from vpetl.errors import InjectionError
from vpetl.handlers.mha import VpetlMultiheadAttention, VpetlTransformerEncoderLayer
from vpetl.inject import record_calls, uncalled_branches
from vpetl.record import get_record

E, H = 32, 4
ATOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch's nested-tensor prototype notices


# ----------------------------------------------------------------------------- helpers


def _base_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if "vpetl_" not in k}


def _assert_grads_only_on_delta(model: nn.Module, loss: torch.Tensor, head_prefix: str) -> None:
    """After ``loss.backward()``: every branch and head parameter has a gradient (the PATT
    up-projection and adapter up-projection a non-zero one); no base parameter has one."""
    loss.backward()
    branch_grads = {}
    for name, p in model.named_parameters():
        if "vpetl_" in name or name.startswith(head_prefix):
            assert p.requires_grad and p.grad is not None, name
            branch_grads[name] = p.grad.abs().sum().item()
        else:
            assert not p.requires_grad and p.grad is None, name
    for kind in ("vpetl_patt.up.weight", "vpetl_adapter.up.weight"):
        names = [n for n in branch_grads if n.endswith(kind)]
        assert names and all(branch_grads[n] > 0 for n in names), (kind, branch_grads)
    assert any(branch_grads[n] > 0 for n in branch_grads if n.startswith(head_prefix))


def _called_all(model: nn.Module, *args) -> None:
    with record_calls(model) as log:
        model(*args)
    assert uncalled_branches(model, log) == []
    assert len(log) == len(get_record(model).branches)


# ----------------------------------------------------------------------------- torchvision ViT


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head: logits would hide everything
    return model


@pytest.mark.parametrize("method", ["patt", "bapat"])
def test_vit_zero_init_parity_train_and_eval(method):
    ref = _vit()
    x = torch.randn(2, 3, 32, 32)
    model = vpetl.inject(copy.deepcopy(ref), method, d_bottle=8, zero_init=True, example_input=x)
    block = model.encoder.layers.encoder_layer_0
    assert type(block.self_attention) is VpetlMultiheadAttention and hasattr(block.self_attention, "vpetl_patt")
    # the adapter lives on the block: the Sequential MLP keeps its stages (len 5)
    assert hasattr(block, "vpetl_adapter") == (method == "bapat") and len(block.mlp) == 5
    for train in (True, False):
        ref.train(train)
        model.train(train)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(model(x), ref(x), atol=ATOL, rtol=0)  # grad enabled, frozen base


def test_vit_default_init_changes_output_and_verify_passes():
    ref = _vit()
    x = torch.randn(2, 3, 32, 32)
    model = vpetl.inject(copy.deepcopy(ref), "bapat", d_bottle=8, example_input=x)
    patt_only = vpetl.inject(copy.deepcopy(ref), "patt", d_bottle=8, example_input=x)
    for m in (model, patt_only, ref):
        m.eval()
    vpetl.verify(model, x)  # eval + no_grad: the stock module would take its native fast path
    with torch.no_grad():  # PATT's default init changes the function from step 0 (DESIGN.md §1)
        assert (patt_only(x) - ref(x)).abs().max() > 1e-3
    model.train()
    vpetl.verify(model, x)
    _called_all(model, x)


def test_vit_gradients_and_keys():
    ref = _vit()
    keys_before = set(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model = vpetl.inject(copy.deepcopy(ref), "bapat", d_bottle=8, example_input=x)
    assert _base_keys(model) == keys_before
    model.train()
    _assert_grads_only_on_delta(model, model(x).square().sum(), "heads.")
    assert model.load_state_dict(ref.state_dict(), strict=False).unexpected_keys == []


# ----------------------------------------------------------------------------- nn.TransformerEncoder


class EncoderNet(nn.Module):
    def __init__(self, norm_first: bool, dropout: float = 0.1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, 64, dropout=dropout, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
        self.head = nn.Linear(E, 5)

    def forward(self, x, mask=None):
        return self.head(self.encoder(x, src_key_padding_mask=mask))


def _tokens():
    torch.manual_seed(1)
    x = torch.randn(3, 7, E)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:] = True
    mask[2, 3:] = True  # left-aligned padding: what TransformerEncoder turns into a nested tensor
    return x, mask


@pytest.mark.parametrize(("method", "norm_first"), [("bapat", False), ("bapat", True), ("adapter", False)])
def test_encoder_zero_init_parity_fast_paths_and_training(method, norm_first):
    torch.manual_seed(0)
    ref = EncoderNet(norm_first)
    x, mask = _tokens()
    options = {"zero_init": True} if method == "bapat" else {}
    model = vpetl.inject(copy.deepcopy(ref), method, d_bottle=8, example_input=(x, mask), **options)
    layer = model.encoder.layers[0]
    assert type(layer) is VpetlTransformerEncoderLayer  # swapped once, by PATT or by the adapter
    expected_names = {"encoder.layers.0.vpetl_adapter"}
    if method == "bapat":
        assert type(layer.self_attn) is VpetlMultiheadAttention
        expected_names.add("encoder.layers.0.vpetl_patt")
    else:
        assert type(layer.self_attn) is nn.MultiheadAttention  # untouched: no projection branch
    assert set(get_record(model).branches) >= expected_names
    seen_nested = []
    layer.register_forward_pre_hook(lambda m, args: seen_nested.append(args[0].is_nested))

    ref.eval()
    model.eval()
    for m in (None, mask):
        with torch.no_grad():  # the encoder-layer fast path; with a mask also the nested-tensor path
            expected = ref(x, m)
            with record_calls(model) as log:
                got = model(x, m)
        assert uncalled_branches(model, log) == []
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # post-norm encoders convert padded input to nested tensors; the adapted layer handles them
    assert seen_nested == [False, not norm_first]

    model.train()
    ref.train()  # dropout 0.1 everywhere: the same random masks are drawn in the same order
    for m in (None, mask):
        torch.manual_seed(3)
        expected = ref(x, m)
        torch.manual_seed(3)
        torch.testing.assert_close(model(x, m), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_default_init_grads_keys_and_undo(norm_first):
    torch.manual_seed(0)
    ref = EncoderNet(norm_first)
    keys_before = set(ref.state_dict())
    x, mask = _tokens()
    model = vpetl.inject(copy.deepcopy(ref), "bapat", d_bottle=8, example_input=(x, mask))
    assert _base_keys(model) == keys_before
    ref.eval()
    model.eval()
    vpetl.verify(model, (x, mask))
    with torch.no_grad():
        assert (model(x, mask) - ref(x, mask))[~mask].abs().max() > 1e-3
    # eval with grad enabled and a frozen base: the encoder still takes its nested path,
    # and gradients must flow through it to the branches
    _assert_grads_only_on_delta(model, model(x, mask)[~mask].square().sum(), "head.")
    model.zero_grad()
    model.train()
    _assert_grads_only_on_delta(model, model(x, mask).square().sum(), "head.")

    twin = copy.deepcopy(model)  # the branch references inside the attention follow the copy
    twin_attn = twin.encoder.layers[1].self_attn
    assert twin_attn._vpetl_branches == (twin.encoder.layers[1].vpetl_patt,)
    assert "branches=[patt]" in repr(twin_attn)

    vpetl.unload(model)
    layer = model.encoder.layers[0]
    assert type(layer) is nn.TransformerEncoderLayer and type(layer.self_attn) is nn.MultiheadAttention
    assert not hasattr(layer.self_attn, "_vpetl_branches") and set(model.state_dict()) == keys_before


def test_encoder_layer_masks_and_causal_parity():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=False, norm_first=False))
    x = torch.randn(6, 2, E)  # sequence-first
    model = vpetl.inject(copy.deepcopy(ref), "bapat", d_bottle=8, zero_init=True, example_input=x)
    ref, model = ref[0], model[0]
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    for kwargs in (
        {"src_mask": causal, "is_causal": True},
        {"src_mask": causal.isinf()},
        {"src_key_padding_mask": padding, "src_mask": causal},
    ):
        torch.testing.assert_close(model(x, **kwargs), ref(x, **kwargs), atol=ATOL, rtol=0)


def test_decoder_layer_bapat_parity_and_calls():
    torch.manual_seed(0)
    ref = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True), 2)
    tgt, memory = torch.randn(2, 5, E), torch.randn(2, 7, E)
    model = vpetl.inject(copy.deepcopy(ref), "bapat", d_bottle=8, zero_init=True, example_input=(tgt, memory))
    names = set(get_record(model).branches)
    assert {"layers.0.self_attn.vpetl_patt", "layers.0.multihead_attn.vpetl_patt", "layers.0.vpetl_adapter"} <= names
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tgt, memory), ref(tgt, memory), atol=ATOL, rtol=0)
    vpetl.verify(model, (tgt, memory))


# ----------------------------------------------------------------------------- bare MultiheadAttention


class AttnNet(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, **kwargs)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _bare(method="patt", **kwargs):
    torch.manual_seed(0)
    ref = AttnNet(**kwargs)
    with torch.no_grad():
        ref.attn.in_proj_bias.normal_()
        ref.attn.out_proj.bias.normal_()
    options = {"zero_init": True} if method == "patt" else {}
    model = vpetl.inject(copy.deepcopy(ref), method, d_bottle=8, example_input=torch.randn(2, 5, E), **options)
    return ref.attn, model.attn, model


def _inputs(batch_first: bool, length: int = 5, source: int = 6):
    torch.manual_seed(2)
    shape = (lambda n: (2, n, E)) if batch_first else (lambda n: (n, 2, E))
    x, mem, other = torch.randn(shape(length)), torch.randn(shape(source)), torch.randn(shape(source))
    padding = torch.tensor([[False] * source, [False] * (source - 2) + [True] * 2])
    float_mask = torch.randn(length, length)
    return x, mem, other, padding, float_mask


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_zero_init_parity_all_modes(batch_first, need_weights):
    ref, attn, _ = _bare(batch_first=batch_first)
    x, mem, other, padding, float_mask = _inputs(batch_first)
    self_padding = padding[:, :5]
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    ux, umem = (x[0], mem[0]) if batch_first else (x[:, 0], mem[:, 0])  # unbatched (L, E)
    calls = [
        ((x, x, x), {}),
        ((x, x, x), {"key_padding_mask": self_padding}),
        ((x, x, x), {"attn_mask": float_mask}),
        ((x, x, x), {"attn_mask": float_mask.gt(1.0), "key_padding_mask": self_padding}),
        ((x, x, x), {"attn_mask": float_mask.repeat(2 * H, 1, 1), "average_attn_weights": False}),
        ((x, x, x), {"attn_mask": causal, "is_causal": True}),
        ((x, mem, mem), {"key_padding_mask": padding}),  # cross-attention, key is value
        ((x, mem, other), {}),  # cross-attention, all inputs distinct
        ((ux, ux, ux), {"key_padding_mask": self_padding[1]}),
        ((ux, umem, umem), {}),
    ]
    for args, kwargs in calls:
        expected_out, expected_w = ref(*args, need_weights=need_weights, **kwargs)
        out, w = attn(*args, need_weights=need_weights, **kwargs)
        torch.testing.assert_close(out, expected_out, atol=ATOL, rtol=0)
        if need_weights:
            torch.testing.assert_close(w, expected_w, atol=ATOL, rtol=0)
        else:
            assert w is None and expected_w is None


def test_mha_eval_no_grad_and_dropout_training_parity():
    ref, attn, model = _bare(batch_first=True, dropout=0.3)
    x = _inputs(True)[0]
    ref.eval()
    attn.eval()
    with torch.no_grad():  # the stock module takes torch._native_multi_head_attention here
        torch.testing.assert_close(attn(x, x, x)[0], ref(x, x, x)[0], atol=ATOL, rtol=0)
    ref.train()
    attn.train()
    for need_weights in (False, True):
        torch.manual_seed(5)
        expected = ref(x, x, x, need_weights=need_weights)
        torch.manual_seed(5)
        got = attn(x, x, x, need_weights=need_weights)
        torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.manual_seed(5)
    assert (attn(x, x, x)[0] - ref.eval()(x, x, x)[0]).abs().max() > 1e-3  # dropout is really applied
    vpetl.verify(model, x)


def test_mha_bias_kv_and_zero_attn_parity():
    ref, attn, _ = _bare(batch_first=False, add_bias_kv=True, add_zero_attn=True)
    x, mem, _, padding, float_mask = _inputs(False)
    for args, kwargs in (((x, x, x), {"attn_mask": float_mask}), ((x, mem, mem), {"key_padding_mask": padding})):
        for need_weights in (True, False):
            expected = ref(*args, need_weights=need_weights, **kwargs)
            got = attn(*args, need_weights=need_weights, **kwargs)
            torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
            if need_weights:
                torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=0)


def test_mha_patt_equation_by_hand():
    torch.manual_seed(0)
    net = AttnNet(batch_first=True)
    with torch.no_grad():
        net.attn.in_proj_bias.normal_()
    vpetl.inject(net, "patt", d_bottle=8, scale=0.8, example_input=torch.randn(2, 5, E))
    attn, patt = net.attn, net.attn.vpetl_patt
    with torch.no_grad():
        patt.up.bias.normal_()
    x = torch.randn(2, 5, E)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    u_k, u_v = patt.up.weight.chunk(2)  # rows of W_up: K_p first, then V_p (positions "kv")
    c_k, c_v = patt.up.bias.chunk(2)
    s = 0.8
    h = torch.tanh(x @ patt.down.weight.T + patt.down.bias)
    q = x @ w_q.T + b_q
    k = x @ w_k.T + b_k + s * (h @ u_k.T + c_k)
    v = x @ w_v.T + b_v + s * (h @ u_v.T + c_v)
    heads = lambda t: t.view(2, 5, H, E // H).transpose(1, 2)  # noqa: E731
    a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(E // H), dim=-1)
    o = (a @ heads(v)).transpose(1, 2).reshape(2, 5, E)
    expected = o @ attn.out_proj.weight.T + attn.out_proj.bias
    for need_weights in (False, True):
        out, w = attn(x, x, x, need_weights=need_weights)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(w, a.mean(dim=1), atol=ATOL, rtol=0)
    assert (k - (x @ w_k.T + b_k)).abs().max() > 1e-2  # the branch really moved K


def test_mha_lora_equals_merged_weight():
    ref, attn, model = _bare("lora", batch_first=True)
    lora = attn.vpetl_lora
    with torch.no_grad():
        for letter in "qv":
            lora.pair(letter).up.weight.normal_()
    merged = copy.deepcopy(ref)
    with torch.no_grad():
        w = merged.in_proj_weight
        w[:E] += lora.scale * lora.pair("q").up.weight @ lora.pair("q").down.weight
        w[2 * E :] += lora.scale * lora.pair("v").up.weight @ lora.pair("v").down.weight
    x, mem, _, _, _ = _inputs(True)
    for args in ((x, x, x), (x, mem, mem)):
        torch.testing.assert_close(attn(*args)[0], merged(*args)[0], atol=ATOL, rtol=0)
    assert (attn(x, x, x)[0] - ref(x, x, x)[0]).abs().max() > 1e-3
    vpetl.verify(model, x)

    expected = attn(x, mem, mem)[0]
    vpetl.merge(model)  # folds scale * B A into the rows of in_proj_weight, then unloads
    assert type(model.attn) is nn.MultiheadAttention and set(model.attn.state_dict()) == set(ref.state_dict())
    torch.testing.assert_close(model.attn(x, mem, mem)[0], expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.attn.in_proj_weight, merged.in_proj_weight, atol=ATOL, rtol=0)


def test_encoder_lora_merge_and_unload():
    torch.manual_seed(0)
    x, mask = _tokens()
    ref = EncoderNet(norm_first=False, dropout=0.0).eval()
    model = vpetl.inject(copy.deepcopy(ref), "lora", d_bottle=4, example_input=(x, mask))
    assert "encoder.layers.0.vpetl_lora" in get_record(model).branches
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vpetl_lora" in name:
                p.normal_(std=0.1)  # B away from zero
        expected = model(x, mask)
        assert (expected - ref(x, mask))[~mask].abs().max() > 1e-3
        vpetl.merge(model)
        assert type(model.encoder.layers[0]) is nn.TransformerEncoderLayer
        torch.testing.assert_close(model(x, mask)[~mask], expected[~mask], atol=ATOL, rtol=0)


def test_mha_different_kdim_is_a_clear_error():
    net = AttnNet(kdim=16, vdim=16)
    with pytest.raises(InjectionError, match=r"MultiheadAttention\(embed_dim=32, kdim=16, vdim=16\).*kdim/vdim"):
        vpetl.inject(net, "patt")
    assert type(net.attn) is nn.MultiheadAttention and not hasattr(net.attn, "vpetl_patt")  # rolled back


def test_mha_nested_self_attention_input():
    _, attn, _ = _bare(batch_first=True)
    attn.eval()
    rows = [torch.randn(3, E), torch.randn(5, E)]
    with torch.no_grad():
        out, w = attn(*(torch.nested.nested_tensor(rows),) * 3, need_weights=False)
        for row, got in zip(rows, out.unbind()):
            torch.testing.assert_close(got, attn(row, row, row)[0], atol=ATOL, rtol=0)
    assert w is None
