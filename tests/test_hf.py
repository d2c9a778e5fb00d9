"""HF transformers backbones: ViT (q_proj/k_proj/v_proj + an ``mlp`` child in transformers 5.x)
and VideoMAE (query/key/value + the split ``intermediate``/``output`` MLP of handlers/hf_mlp.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import trainable_count

import vpetl
from vpetl.handlers.hf_mlp import LINK_ATTR, MlpInputLink
from vpetl.record import get_record

transformers = pytest.importorskip("transformers")

D, LAYERS, CLASSES, R, ADAPTER = 32, 2, 5, 8, 64


def hf_vit():
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, num_labels=CLASSES,
    )
    return transformers.ViTForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)


def hf_videomae(qv_bias: bool = True):
    config = transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=D, num_hidden_layers=LAYERS,
        num_attention_heads=2, intermediate_size=64, num_labels=CLASSES, qv_bias=qv_bias,
    )
    return transformers.VideoMAEForVideoClassification(config).eval(), torch.randn(2, 4, 3, 32, 32)


MODELS = {"vit": hf_vit, "videomae": hf_videomae}


def make(name: str):
    torch.manual_seed(0)
    return MODELS[name]()


def logits(model, x):
    return model(pixel_values=x).logits


def patt_modules(model):
    return [m for n, m in model.named_modules() if n.endswith("vpetl_patt")]


@pytest.mark.parametrize("name", MODELS)
def test_zero_init_keeps_logits(name):
    model, x = make(name)
    base = copy.deepcopy(model)
    vpetl.inject(model, "bapat", d_bottle=R, zero_init=True)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_default_init_changes_logits(name):
    model, x = make(name)
    base = copy.deepcopy(model)
    vpetl.inject(model, "bapat", d_bottle=R)
    with torch.no_grad():
        assert not torch.allclose(logits(model, x), logits(base, x), atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_adapter_reaches_logits(name):
    """The adapter is on the forward path: a non-zero up-projection changes the logits."""
    model, x = make(name)
    base = copy.deepcopy(model)
    vpetl.inject(model, "adapter")
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=1e-6)
        for n, p in model.named_parameters():
            if n.endswith("vpetl_adapter.up.weight"):
                p.normal_()
        assert not torch.allclose(logits(model, x), logits(base, x), atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_verify_and_structure(name):
    model, x = make(name)
    base_keys = set(model.state_dict())
    vpetl.inject(model, "bapat", d_bottle=R, example_input=x)
    vpetl.verify(model, x)
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert all(".vpetl_" in k for k in keys - base_keys)
    branches = get_record(model).branches
    assert sum(p.endswith("vpetl_patt") for p in branches) == LAYERS
    assert sum(p.endswith("vpetl_adapter") for p in branches) == LAYERS
    assert get_record(model).head_paths == ("classifier",)
    # the adapter is registered on the layer (the block), beside its MLP: a split
    # intermediate/output pair (VideoMAE) or an `mlp` child (transformers 5.x ViT)
    layer = "videomae.encoder.layer.0" if name == "videomae" else "vit.layers.0"
    assert f"{layer}.vpetl_adapter.down.weight" in keys


@pytest.mark.parametrize("name", MODELS)
def test_grads_reach_branches_and_head_only(name):
    model, x = make(name)
    vpetl.inject(model, "bapat", d_bottle=R)
    model.train()
    logits(model, x).square().sum().backward()
    for n, p in model.named_parameters():
        if ".vpetl_" in n or n.startswith("classifier."):
            assert p.requires_grad and p.grad is not None, n
            # adapter.down sees zero grad while adapter.up is still zero (identity init)
            if "vpetl_adapter.down" not in n:
                assert p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def _expected_trainable(d, r, layers, classes, patt_bias):
    patt = 3 * d * r + ((r + 2 * d) if patt_bias else 0)
    adapter = 2 * d * ADAPTER + ADAPTER + d
    return layers * (patt + adapter) + d * classes + classes


@pytest.mark.parametrize(
    "name, factory, patt_bias",
    [
        ("vit", hf_vit, True),  # qkv_bias=True
        ("videomae", hf_videomae, True),  # qv_bias=True: query/value biased, key not -> follows the flag
        ("videomae-nobias", lambda: hf_videomae(qv_bias=False), False),
    ],
)
def test_trainable_count(name, factory, patt_bias):
    torch.manual_seed(0)
    model, _ = factory()
    vpetl.inject(model, "bapat", d_bottle=R)
    trainable = trainable_count(model)
    assert trainable == _expected_trainable(D, R, LAYERS, CLASSES, patt_bias)
    assert all((m.down.bias is not None) == patt_bias for m in patt_modules(model))


@pytest.mark.parametrize("name", MODELS)
def test_patt_hidden_computed_once_per_block(name):
    """K and V are separate Linears: PATT's h = tanh(x W_down) is shared, not computed twice."""
    model, x = make(name)
    vpetl.inject(model, "patt", d_bottle=R)
    calls = []
    for m in patt_modules(model):
        m.down.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        logits(model, x)
        assert len(calls) == LAYERS
        logits(model, x)
    assert len(calls) == 2 * LAYERS
    assert all(m._cache is None for m in patt_modules(model))  # nothing held between forwards


@pytest.mark.parametrize("name", MODELS)
def test_shared_hidden_matches_reference(name):
    """K_p, V_p from one h equal the equation computed by hand on one attention module."""
    model, x = make(name)
    vpetl.inject(model, "patt", d_bottle=R)
    attn = next(m for n, m in model.named_modules() if hasattr(m, "vpetl_patt"))
    k_name, v_name = ("k_proj", "v_proj") if hasattr(attn, "k_proj") else ("key", "value")
    k_lin, v_lin, patt = getattr(attn, k_name), getattr(attn, v_name), attn.vpetl_patt
    tokens = torch.randn(2, 5, D)
    with torch.no_grad():
        k, v = k_lin(tokens), v_lin(tokens)
        h = torch.tanh(patt.down(tokens))
        kv = patt.up(h) * patt.scale
        torch.testing.assert_close(k, k_lin.base(tokens) + kv[..., :D])
        torch.testing.assert_close(v, v_lin.base(tokens) + kv[..., D:])


def test_split_mlp_link_is_cleared_and_guarded():
    model, x = make("videomae")
    vpetl.inject(model, "bapat", d_bottle=R)
    layer = model.videomae.encoder.layer[0]
    link = layer.output.__dict__[LINK_ATTR]
    assert isinstance(link, MlpInputLink) and link is layer.intermediate.__dict__[LINK_ATTR]
    with torch.no_grad():
        logits(model, x)
    assert link.pending is None  # consumed by `output`: no tensor outlives the forward
    h = torch.randn(2, 3, D)
    with pytest.raises(vpetl.InjectionError, match="intermediate"):
        layer.output(torch.randn(2, 3, 64), h)
    with torch.no_grad():  # the adapted pair still works after the error
        out = layer.output(layer.intermediate(h), h)
    assert out.shape == h.shape and link.pending is None


def test_split_mlp_adds_adapter_on_mlp_input():
    """out = output(intermediate(y), h) + s * adapter(y), y = layernorm_after(h)."""
    model, _ = make("videomae")
    vpetl.inject(model, "adapter")
    layer = model.videomae.encoder.layer[0]
    adapter = layer.vpetl_adapter
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
        y, h = torch.randn(2, 3, D), torch.randn(2, 3, D)
        dense_in, dense_out = layer.intermediate.dense, layer.output.dense
        plain = dense_out(layer.intermediate.intermediate_act_fn(dense_in(y))) + h
        expected = plain + adapter.scale * adapter.up(torch.relu(adapter.down(y)))
        torch.testing.assert_close(layer.output(layer.intermediate(y), h), expected)


def test_split_mlp_gradient_checkpointing():
    model, x = make("videomae")
    vpetl.inject(model, "bapat", d_bottle=R)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    runs = []
    model.videomae.encoder.layer[0].intermediate.register_forward_hook(lambda *a: runs.append(1))
    logits(model, x).sum().backward()
    assert len(runs) == 2  # the layer really re-ran in backward: intermediate/output paired again
    grads = [p.grad for n, p in model.named_parameters() if "vpetl_adapter.up.weight" in n]
    assert len(grads) == LAYERS and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(m.__dict__[LINK_ATTR].pending is None for m in model.modules() if LINK_ATTR in m.__dict__)


@pytest.mark.parametrize("name", MODELS)
def test_unload_restores_original(name):
    model, x = make(name)
    base = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    vpetl.inject(model, "bapat", d_bottle=R)
    vpetl.unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(LINK_ATTR in m.__dict__ for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)


def test_deepcopy_of_injected_videomae_is_independent():
    model, x = make("videomae")
    vpetl.inject(model, "bapat", d_bottle=R)
    clone = copy.deepcopy(model)
    layer, cloned = model.videomae.encoder.layer[0], clone.videomae.encoder.layer[0]
    link = cloned.output.__dict__[LINK_ATTR]
    assert link is not layer.output.__dict__[LINK_ATTR]
    assert link.adapter is cloned.vpetl_adapter
    with torch.no_grad():
        cloned.vpetl_adapter.up.weight.normal_()
        assert not torch.allclose(logits(clone, x), logits(model, x), atol=1e-4)


def test_delta_round_trip_videomae(tmp_path):
    """A delta of the split-MLP model loads onto a fresh copy of the same base."""
    model, x = make("videomae")
    fresh = copy.deepcopy(model)
    vpetl.inject(model, "bapat", d_bottle=R)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    path = vpetl.save_delta(model, tmp_path / "videomae.safetensors")
    vpetl.load_delta(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=1e-6)


def hf_swinv2():  # output(hidden) without the residual argument, post-norm block
    config = transformers.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=CLASSES
    )
    return transformers.Swinv2ForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)


def hf_data2vec_vision():  # BEiT-style layer scale around the split MLP
    config = transformers.Data2VecVisionConfig(
        image_size=32, patch_size=8, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, num_labels=CLASSES,
    )
    return transformers.Data2VecVisionForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)


def hf_timesformer():  # two attention modules (space, time) share one split MLP per layer
    config = transformers.TimesformerConfig(
        image_size=32, patch_size=8, num_frames=2, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, num_labels=CLASSES,
    )
    return transformers.TimesformerForVideoClassification(config).eval(), torch.randn(2, 2, 3, 32, 32)


@pytest.mark.parametrize("factory", [hf_swinv2, hf_data2vec_vision, hf_timesformer])
def test_other_split_mlp_models(factory):
    torch.manual_seed(0)
    model, x = factory()
    base = copy.deepcopy(model)
    vpetl.inject(model, "bapat", d_bottle=R, zero_init=True, example_input=x)
    record = get_record(model)
    adapters = [b for p, b in record.branches.items() if p.endswith("vpetl_adapter")]
    assert len(adapters) == LAYERS and record.head_paths == ("classifier",)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=1e-5)
        for adapter in adapters:
            adapter.up.weight.normal_()
        assert not torch.allclose(logits(model, x), logits(base, x), atol=1e-4)
