"""The adapter family (Adapter+, Houlsby, Pfeiffer): block equations by hand, the ViT-B counts,
the three tiny model families, init, deltas, merge refusal, options and composition."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_hf_vit, tiny_swin3d, tiny_vit, trainable_count, vit_base_on_meta

import vpetl
from vpetl.methods._bottleneck import AdapterInit, AdapterScaling, BottleneckAdapter
from vpetl.methods.adapter_plus import AdapterPlus
from vpetl.methods.houlsby import Houlsby
from vpetl.methods.pfeiffer import Pfeiffer

METHODS = ["adapter_plus", "houlsby", "pfeiffer"]
ENTRIES = {"adapter_plus": AdapterPlus, "houlsby": Houlsby, "pfeiffer": Pfeiffer}


def _randomise(model, std=0.1, seed=3):
    """Move every adapter parameter away from its init (so zero-init parts matter too)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".vpetl_" in name:
                param.add_(torch.randn_like(param) * std)


def _adapter(x, a, layer_norm):
    """A(x) by hand from the branch's parameters."""
    if layer_norm:
        x = F.layer_norm(x, x.shape[-1:], a.norm.weight, a.norm.bias, a.norm.eps)
    h = F.linear(F.gelu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    return h if a.scale is None else h * a.scale


# ---------------------------------------------------------------------------- equations


@pytest.mark.parametrize("method", METHODS)
def test_block_equation_by_hand(method):
    model = vpetl.inject(tiny_vit(), method)
    _randomise(model)
    model.eval()
    block = model.blocks[0]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        out = block(x)
        with vpetl.disabled(model):  # the plain block's own modules
            if method == "houlsby":
                pair = block.vpetl_houlsby
                a = block.attn(block.norm1(x))
                x1 = x + a + _adapter(a, pair.attn, False)
                m = block.mlp(block.norm2(x1))
                expected = x1 + m + _adapter(m, pair.mlp, False)
            else:
                h = x + block.attn(block.norm1(x))
                h = h + block.mlp(block.norm2(h))
                branch = getattr(block, f"vpetl_{method}")
                expected = h + _adapter(h, branch, method == "pfeiffer")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_official_structure_of_each_default():
    plus, houlsby, pfeiffer = AdapterPlus(), Houlsby(), Pfeiffer()
    assert (plus.scaling, plus.layer_norm, plus.init) == (AdapterScaling.CHANNEL, False, AdapterInit.HOULSBY)
    assert (houlsby.scaling, houlsby.layer_norm, houlsby.init) == (AdapterScaling.FIXED, False, AdapterInit.HOULSBY)
    assert (pfeiffer.scaling, pfeiffer.layer_norm, pfeiffer.init) == (AdapterScaling.FIXED, True, AdapterInit.BERT)
    for entry in (plus, houlsby, pfeiffer):
        assert entry.d_bottle == 8 and entry.drop_path == 0.1 and entry.dropout == 0.0 and entry.bias
    model = vpetl.inject(tiny_vit(), "adapter_plus")
    branch = model.blocks[0].vpetl_adapter_plus
    assert torch.equal(branch.scale, torch.ones(32)) and branch.norm is None
    assert branch.down.weight.abs().max() <= 0.02 and branch.up.weight.abs().max() <= 0.02
    assert not branch.down.bias.any() and not branch.up.bias.any()


def test_counts_on_vit_base():
    model = vit_base_on_meta()
    for method, count in {"adapter_plus": 165_984, "houlsby": 313_536, "pfeiffer": 175_200}.items():
        vpetl.inject(model, method)
        assert trainable_count(model) == count, method
        assert vpetl.summary(model).trainable_by_kind == {method: count}
        vpetl.unload(model)
    assert 12 * (1537 * 8 + 1536) == 165_984


# ---------------------------------------------------------------------------- model families


FAMILIES = {
    "timm_vit": (tiny_vit, (2, 3, 32, 32)),
    "swin3d": (tiny_swin3d, (2, 3, 4, 32, 32)),
    "hf_vit": (tiny_hf_vit, (2, 3, 32, 32)),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_reaches_the_adapters_base_frozen(method, family):
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = vpetl.inject(build(), method, example_input=torch.randn(*shape))
    model.train()
    _logits(model(torch.randn(*shape))).square().sum().backward()
    adapters = {n: p for n, p in model.named_parameters() if f".vpetl_{method}." in n}
    n_blocks = {"timm_vit": 2, "swin3d": 4, "hf_vit": 2}[family] * (2 if method == "houlsby" else 1)
    assert len(model.__dict__["_vpetl"].branches) == n_blocks
    for name, param in model.named_parameters():
        if name in adapters:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        elif param.requires_grad:
            assert "head" in name or "classifier" in name, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_only_with_zero_up_projection(method, images):
    base = tiny_vit().eval()
    with torch.no_grad():
        expected = base(images)
        lora = vpetl.inject(copy.deepcopy(base), ENTRIES[method](init="lora")).eval()
        torch.testing.assert_close(lora(images), expected, rtol=0, atol=0)
        official = vpetl.inject(copy.deepcopy(base), method).eval()  # houlsby / bert init: near identity
        diff = (official(images) - expected).abs().max()
    assert 0 < diff < 0.1


def test_drop_path_drops_whole_samples_in_training_only():
    branch = BottleneckAdapter(16, AdapterPlus(drop_path=0.5, init="bert"))
    x = torch.randn(64, 5, 16)
    full = branch.eval()(x)
    torch.manual_seed(0)
    out = branch.train()(x)
    dropped = (out == 0).flatten(1).all(1)
    kept = torch.isclose(out, 2 * full, atol=1e-6).flatten(1).all(1)
    assert torch.all(dropped ^ kept) and 10 < int(dropped.sum()) < 54


# ---------------------------------------------------------------------------- delta, merge, options


@pytest.mark.parametrize("method", METHODS)
def test_delta_round_trip_on_a_fresh_base(method, images, tmp_path):
    model = vpetl.inject(tiny_vit(), method, d_bottle=4)
    _randomise(model)
    with torch.no_grad():
        expected = model.eval()(images)
    path = vpetl.save_delta(model, tmp_path / f"{method}.safetensors")
    fresh = tiny_vit()
    vpetl.load_delta(fresh, path)
    assert fresh.__dict__["_vpetl"].config == model.__dict__["_vpetl"].config
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), expected)


@pytest.mark.parametrize("method", METHODS)
def test_merge_is_refused(method):
    model = vpetl.inject(tiny_vit(), method)
    with pytest.raises(vpetl.MergeError, match=f"{method}: W_u act"):
        vpetl.merge(model)
    assert model.__dict__.get("_vpetl") is not None  # still injected


def test_inject_by_name_with_options():
    model = vpetl.inject(tiny_vit(), "pfeiffer", d_bottle=4, scaling="learned", scale=0.5, drop_path=0.0)
    branch = model.blocks[1].vpetl_pfeiffer
    assert branch.down.weight.shape == (4, 32) and branch.up.weight.shape == (32, 4)
    assert branch.scale.shape == (1,) and branch.scale.item() == 0.5 and branch.drop_path == 0.0
    model = vpetl.inject(tiny_vit(), "houlsby", d_bottle=3, train_norms=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.norm1.weight", "blocks.1.norm2.bias", "norm.weight"} <= trainable
    assert model.blocks[0].vpetl_houlsby.mlp.down.weight.shape == (3, 32)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"d_bottle": 0}, "d_bottle must be a positive integer"),
        ({"init": "xavier"}, "init must be one of 'houlsby', 'bert', 'lora'"),
        ({"scaling": "vector"}, "scaling must be one of 'fixed', 'learned', 'channel'"),
        ({"drop_path": 1.0}, r"drop_path must be in \[0, 1\)"),
        ({"layer_norm": 1}, "layer_norm must be True or False"),
    ],
)
def test_bad_options_are_refused(options, message):
    for entry in ENTRIES.values():
        with pytest.raises(vpetl.ConfigError, match=message):
            entry(**options)


def test_houlsby_adapts_after_layer_scale_and_refuses_a_residual_mlp():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              depth=1, embed_dim=32, num_heads=2, init_values=1e-5)
    vpetl.inject(model, "houlsby")
    block = model.blocks[0]
    assert type(block.ls1).__name__ == "HoulsbyAttnLayerScale" and type(block.ls2).__name__ == "HoulsbyMlpLayerScale"
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)
    encoder = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    with pytest.raises(vpetl.InjectionError, match="Use adapter_plus or pfeiffer"):
        vpetl.inject(encoder, "houlsby")


# ---------------------------------------------------------------------------- composition


@pytest.mark.parametrize("method", METHODS)
def test_composes_with_patt(method, images):
    model = vpetl.inject(tiny_vit(), [ENTRIES[method](), vpetl.PATT(d_bottle=8)])
    assert set(vpetl.summary(model).trainable_by_kind) == {method, "patt", "head"}
    model(images).sum().backward()
    assert model.blocks[0].attn.vpetl_patt.up.weight.grad is not None
    vpetl.unload(model)
    assert not any("vpetl" in k for k in model.state_dict())


def test_the_family_stacks_on_one_model_and_deep_copies(images):
    model = vpetl.inject(tiny_vit(), [AdapterPlus(), Houlsby(), Pfeiffer()]).eval()
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(copy.deepcopy(model)(images), out)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(images), out)
