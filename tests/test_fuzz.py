"""Fuzzing the public surface: random options and damaged delta files only ever raise vpetl's
own errors (with a message), never crash, never unpickle."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import vpetl
from vpetl.record import get_record

from conftest import tiny_vit

BASE = tiny_vit()

options = st.fixed_dictionaries(
    {},
    optional={
        "d_bottle": st.one_of(st.none(), st.integers(-3, 40), st.floats(allow_nan=True), st.text(max_size=3),
                              st.booleans()),
        "scale": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                           st.text(max_size=3)),
        "positions": st.one_of(st.none(), st.text(alphabet="qkvxQ ", max_size=4), st.integers()),
        "train_head": st.one_of(st.booleans(), st.integers(0, 2), st.none()),
        "zero_init": st.one_of(st.booleans(), st.integers(0, 2)),
        "kernel": st.one_of(st.sampled_from(["auto", "torch", "triton", "cuda", ""]), st.integers()),
    },
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.one_of(st.sampled_from(vpetl.METHODS), st.text(max_size=6)), kwargs=options)
def test_random_inject_options_succeed_or_raise_a_clear_config_error(method, kwargs):
    model = copy.deepcopy(BASE)
    try:
        vpetl.inject(model, method, **kwargs)
    except vpetl.ConfigError as error:
        assert len(str(error)) > 20 and get_record(model) is None
        assert all(p.requires_grad for p in model.parameters())  # nothing was half-applied
        return
    assert get_record(model) is not None


@pytest.fixture(scope="module")
def delta_bytes(tmp_path_factory) -> bytes:
    model = vpetl.inject(copy.deepcopy(BASE), "bapat", d_bottle=4)
    path = tmp_path_factory.mktemp("delta") / "good.safetensors"
    vpetl.save_delta(model, path)
    return path.read_bytes()


def _load_must_be_clean(data: bytes, tmp_path) -> None:
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(data)
    model = copy.deepcopy(BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vpetl.BaseWeightsWarning)  # a flipped value byte may only warn
        try:
            vpetl.load_delta(model, path)
        except vpetl.VpetlError as error:
            assert str(path) in str(error) or isinstance(error, vpetl.DeltaMismatchError), error
            return


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("vpetl must never unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10_000))
def test_truncated_delta_files_raise_vpetl_errors(cut, delta_bytes, tmp_path):
    data = delta_bytes[: cut % len(delta_bytes)]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data)
    with pytest.raises(vpetl.DeltaFileError, match="cut.safetensors"):
        vpetl.load_delta(copy.deepcopy(BASE), path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_delta_files_load_or_raise_vpetl_errors(edits, delta_bytes, tmp_path):
    data = bytearray(delta_bytes)
    for position, value in edits:
        data[position % len(data)] = value
    _load_must_be_clean(bytes(data), tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_delta_file_errors(data, tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    with pytest.raises(vpetl.DeltaFileError, match="random.safetensors"):
        vpetl.load_delta(copy.deepcopy(BASE), path)
