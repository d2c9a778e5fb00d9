"""The method registry: presets derived from it, composition of entries, their errors, and
blocks without an MLP (CrossViT fusion)."""

from __future__ import annotations

import pytest
import timm
import torch

import vpetl
from conftest import tiny_vit
from vpetl.config import InjectConfig
from vpetl.presets import OPTIONS, PRESETS
from vpetl.registry import REGISTRY, Method


def test_every_registered_method_is_a_preset_and_a_cli_choice():
    from vpetl.cli import build_parser

    assert set(REGISTRY) <= set(vpetl.METHODS) and {"bapat", "linear"} <= set(vpetl.METHODS)
    help_text = build_parser().format_help() + build_parser()._subparsers._group_actions[0].choices["params"].format_help()
    for name in REGISTRY:
        assert name in help_text


def test_every_entry_says_where_it_comes_from():
    for cls in REGISTRY.values():
        assert cls.paper and cls.formula and cls.kind, cls.__name__
        assert cls.mergeable or cls.why_not_mergeable, cls.__name__


def test_options_apply_to_the_presets_whose_entries_have_the_field():
    assert set(OPTIONS["placement"]) == {"adapter", "bapat"} | {
        n for n, p in PRESETS.items() if any("placement" in e.option_names() for e in p.entries)}
    with pytest.raises(vpetl.ConfigError, match=r"option deep=True does not apply to method 'patt'; it applies to vpt"):
        vpetl.preset("patt", deep=True)


def test_a_list_of_entries_composes_and_their_branches_sum_on_one_projection(images):
    torch.manual_seed(0)
    both = vpetl.inject(tiny_vit(), [vpetl.PATT(d_bottle=4), vpetl.LoRA(rank=2, positions="qkv")])
    summary = vpetl.summary(both)
    assert summary.method == "patt+lora" and set(summary.trainable_by_kind) == {"patt", "lora", "head"}
    record = both.__dict__["_vpetl"]
    assert [e.name for e in record.config.methods] == ["patt", "lora"]
    qkv = both.blocks[0].attn.qkv
    assert [b.kind for b in qkv._branches] == ["patt", "lora"]
    # branches sum: the composed projection = base + PATT alone + LoRA alone
    lora_up = both.blocks[0].attn.vpetl_lora.k.up.weight
    with torch.no_grad():
        lora_up.normal_()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        full = qkv(x)
        base = torch.nn.functional.linear(x, qkv.weight, qkv.bias)
        patt = both.blocks[0].attn.vpetl_patt
        h = torch.tanh(patt.down(x))
        patt_delta = torch.cat([torch.zeros(3, 5, 32), 0.8 * patt.up(h)], -1)
        lora = both.blocks[0].attn.vpetl_lora
        lora_delta = torch.cat([lora.pair(c).up(lora.pair(c).down(x)) for c in "qkv"], -1)
    torch.testing.assert_close(full, base + patt_delta + lora_delta, rtol=1e-5, atol=1e-5)
    both(images).sum().backward()


def test_an_injectconfig_of_entries_round_trips_through_a_delta(tmp_path, images):
    config = InjectConfig(methods=(vpetl.PATT(d_bottle=4), vpetl.Adapter(d_bottle=3)), method="mine")
    model = vpetl.inject(tiny_vit(), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        expected = model.eval()(images)
    vpetl.save_delta(model, tmp_path / "d.safetensors")
    fresh = tiny_vit()
    vpetl.load_delta(fresh, tmp_path / "d.safetensors")
    assert fresh.__dict__["_vpetl"].config == config
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), expected)


@pytest.mark.parametrize(
    "entries, message",
    [
        ([vpetl.PATT(), vpetl.PATT(d_bottle=8)], r"both add 'patt' parameters"),
        ([vpetl.PATT(), "lora"], r"must hold method entries such as vpetl.PATT"),
        ([vpetl.Tune(positions=["norm1"]), 3], r"got 3 \(int\)"),
    ],
)
def test_bad_compositions_are_refused_naming_both(entries, message):
    with pytest.raises(vpetl.ConfigError, match=message):
        vpetl.inject(tiny_vit(), entries)


def test_options_with_entries_are_refused():
    with pytest.raises(vpetl.ConfigError, match="go into the method entries themselves"):
        vpetl.inject(tiny_vit(), [vpetl.PATT()], d_bottle=8)


def test_format_1_configs_still_read():
    legacy = {"method": "bapat", "patt": {"d_bottle": 8, "scale": 0.8, "positions": "kv"},
              "adapter": {"d_bottle": 64}, "lora": None, "prefix": None, "prompt": None, "tune": [],
              "train_head": True, "train_biases": False, "train_all": False, "kernel": "auto", "branch_dtype": "follow"}
    config = InjectConfig.from_dict(legacy)
    assert [e.name for e in config.methods] == ["patt", "adapter"] and config.patt.d_bottle == 8
    assert config == vpetl.preset("bapat", d_bottle=8)
    with pytest.raises(vpetl.ConfigError, match=r"unknown fields \['future'\]"):
        InjectConfig.from_dict({**legacy, "future": 1})


def test_entry_to_dict_round_trip_for_every_registered_default():
    from vpetl.registry import entry_from_dict

    for name, cls in REGISTRY.items():
        if name == "tune":
            entry = cls(positions=["norm1", "mlp_fc2"])
        else:
            entry = cls()
        assert entry_from_dict(entry.to_dict()) == entry
        assert isinstance(entry, Method) and entry.describe().startswith(name + "(")


def test_crossvit_fusion_blocks_get_no_adapter_but_patt_reaches_them():
    model = timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=5)
    vpetl.inject(model, "bapat", d_bottle=4)
    names = [n for n, _ in model.named_parameters()]
    patt_sites = {n.split(".vpetl_patt.")[0] for n in names if ".vpetl_patt." in n}
    adapter_blocks = {n.split(".vpetl_adapter.")[0] for n in names if ".vpetl_adapter." in n}
    assert any(".fusion." in p for p in patt_sites) and not any(".fusion." in p for p in adapter_blocks)
    assert len(patt_sites) == 21 and len(adapter_blocks) == 15
    model(torch.randn(1, 3, 240, 240)).sum().backward()
