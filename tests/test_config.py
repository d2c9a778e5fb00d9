"""Configs: paper defaults of every preset, validation errors, JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st

import vpetl
from vpetl.config import AdapterConfig, InjectConfig, LoraConfig, PattConfig
from vpetl.presets import preset


def test_presets_use_paper_defaults():
    bapat = preset("bapat")
    assert bapat.patt == PattConfig(d_bottle=128, scale=0.8, positions="kv", activation="tanh", zero_init=False)
    assert bapat.adapter == AdapterConfig(d_bottle=64, scale=0.1, activation="relu")
    assert bapat.lora is None and bapat.train_head
    assert preset("patt").patt.d_bottle == 128 and preset("patt").adapter is None
    assert preset("adapter").adapter == AdapterConfig(64, 0.1)
    assert preset("lora").lora == LoraConfig(rank=16, scale=1.0, positions="qv")
    assert preset("bitfit").train_biases and not preset("bitfit").has_branches
    assert preset("linear") == InjectConfig(method="linear")
    assert preset("full").train_all


def test_d_bottle_is_the_one_width_knob():
    assert preset("bapat", d_bottle=32).patt.d_bottle == 32
    assert preset("bapat", d_bottle=32).adapter.d_bottle == 64  # the paper keeps the adapter at 64
    assert preset("adapter", d_bottle=8).adapter.d_bottle == 8
    assert preset("lora", d_bottle=4).lora.rank == 4
    assert preset("patt", scale=0.5).patt.scale == 0.5
    assert preset("bapat", scale=0.5).adapter.scale == 0.1


def test_positions_are_normalised_to_qkv_order():
    assert preset("patt", positions="vk").patt.positions == "kv"
    assert preset("patt", positions="vqk").patt.positions == "qkv"


def test_unknown_method_lists_accepted_names():
    with pytest.raises(ValueError, match="unknown method 'prefixx'; accepted: patt, adapter, bapat, lora"):
        preset("prefixx")


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "64"])
def test_bad_width_is_rejected(bad):
    with pytest.raises(vpetl.ConfigError, match="d_bottle must be a positive integer"):
        preset("patt", d_bottle=bad)


@pytest.mark.parametrize("bad,why", [("", "non-empty"), ("kx", "unknown letters"), ("kk", "repeats"), (3, "string")])
def test_bad_positions_are_rejected(bad, why):
    with pytest.raises(vpetl.ConfigError, match=why):
        preset("patt", positions=bad)


def test_options_a_method_does_not_have_are_rejected():
    with pytest.raises(vpetl.ConfigError, match="d_bottle=8 does not apply to method 'linear'; it applies to patt"):
        preset("linear", d_bottle=8)
    with pytest.raises(vpetl.ConfigError, match="scale=0.5 does not apply to method 'bitfit'"):
        preset("bitfit", scale=0.5)
    with pytest.raises(vpetl.ConfigError, match="positions='kv' does not apply to method 'adapter'; it applies to patt, bapat, lora, tune"):
        preset("adapter", positions="kv")
    with pytest.raises(vpetl.ConfigError, match="deep=True does not apply to method 'prefix'; it applies to vpt"):
        preset("prefix", deep=True)


def test_bad_enum_and_scale_values():
    with pytest.raises(vpetl.ConfigError, match="PATT activation must be one of 'tanh', 'relu', 'gelu'"):
        PattConfig(activation="swish")
    with pytest.raises(vpetl.ConfigError, match="kernel must be one of 'auto', 'torch', 'triton'"):
        preset("patt", kernel="cuda")
    with pytest.raises(vpetl.ConfigError, match="finite number"):
        PattConfig(scale=float("nan"))


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PattConfig().d_bottle = 3


@given(
    method=st.sampled_from(["patt", "adapter", "bapat", "lora"]),
    width=st.integers(1, 512),
    scale=st.floats(-4, 4, allow_nan=False),
    train_head=st.booleans(),
)
def test_to_dict_round_trip(method, width, scale, train_head):
    config = preset(method, d_bottle=width, scale=scale, train_head=train_head)
    assert InjectConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_fields():
    data = preset("patt").to_dict() | {"future_option": 1}
    with pytest.raises(vpetl.ConfigError, match="unknown fields \\['future_option'\\].*newer vpetl"):
        InjectConfig.from_dict(data)


def test_zero_init_must_be_a_bool_and_applies_to_patt_only():
    with pytest.raises(vpetl.ConfigError, match="zero_init must be True or False; got 2"):
        preset("patt", zero_init=2)
    with pytest.raises(vpetl.ConfigError, match="zero_init=True does not apply to method 'adapter'"):
        preset("adapter", zero_init=True)
