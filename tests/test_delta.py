"""Delta files: exact round trips for every method, the on-disk format, mismatch and file errors,
the base-weights warning, and atomic saving."""

from __future__ import annotations

import copy
import json
import os
import random
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings, strategies as st

import vpetl
from conftest import METHOD_OPTIONS, tiny_vit
from vpetl.presets import METHODS, preset
from vpetl.delta import (
    FORMAT_NAME, METADATA_KEYS, base_checksum, delta_state_dict, different_weights, load_delta, save_delta,
)
from vpetl.errors import BaseWeightsWarning, DeltaFileError, DeltaMismatchError, InjectionError
from vpetl.record import get_record

WIDTH = {"patt": 8, "bapat": 8, "adapter": 8, "lora": 4}


def inject(model, method, **kwargs):
    return vpetl.inject(model, method, d_bottle=WIDTH.get(method), **kwargs)


def train_a_little(model, images, steps=2):
    """A couple of optimizer steps, so every delta tensor moves away from its initial value."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.arange(images.shape[0]) % 10
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), target).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def saved_bapat(tmp_path_factory):
    """(path, trained model) of a small BAPAT delta; the trained model has base seed 0."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    model = train_a_little(inject(tiny_vit(), "bapat"), images)
    path = save_delta(model, tmp_path_factory.mktemp("delta") / "bapat.safetensors")
    return path, model


def read_raw_header(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_reproduces_the_trained_model(method, tmp_path, images):
    base = tiny_vit()
    fresh = copy.deepcopy(base).eval()
    trained = train_a_little(inject(base, method, **METHOD_OPTIONS.get(method, {})), images)
    before = fresh(images)
    path = save_delta(trained, tmp_path / f"{method}.safetensors")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same base weights: no BaseWeightsWarning
        assert load_delta(fresh, path) is fresh

    assert get_record(fresh).config == get_record(trained).config
    with torch.no_grad():
        expected = trained(images)
        assert not torch.allclose(before, expected)  # the delta is not trivial
        assert torch.equal(fresh.eval()(images), expected)
    assert set(n for n, p in fresh.named_parameters() if p.requires_grad) == set(get_record(trained).delta_names)


def test_load_into_a_model_injected_with_the_same_config(saved_bapat, images):
    path, trained = saved_bapat
    model = inject(tiny_vit(), "bapat", kernel="torch")  # another kernel: same parameters, accepted
    load_delta(model, path)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), trained(images))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_values_follow_the_models_dtype(saved_bapat, dtype):
    """Loading converts each tensor to the dtype of the model's parameter it lands in."""
    path, trained = saved_bapat
    model = tiny_vit().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseWeightsWarning)  # a cast of the same base is the same base
        load_delta(model, path)
    for name, value in delta_state_dict(trained).items():
        param = dict(model.named_parameters())[name]
        assert param.dtype == dtype
        assert torch.equal(param, value.to(dtype))


@settings(max_examples=8, deadline=None)
@given(method=st.sampled_from(["patt", "adapter", "bapat", "lora"]), d_bottle=st.integers(1, 12))
def test_round_trip_is_exact_for_any_width(method, d_bottle):
    model = vpetl.inject(tiny_vit(depth=1), method, d_bottle=d_bottle)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_delta(model, Path(tmp) / "d.safetensors")
        fresh = load_delta(tiny_vit(depth=1), path)
    assert get_record(fresh).config == preset(method, d_bottle=d_bottle)
    got, want = delta_state_dict(fresh), delta_state_dict(model)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


# --------------------------------------------------------------------------- the file itself


def test_file_holds_exactly_the_delta_and_the_metadata(saved_bapat):
    path, trained = saved_bapat
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header, raw bytes
    header = json.loads(raw[8 : 8 + n])
    assert 8 + n + sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__") == len(raw)
    meta = header.pop("__metadata__")
    record = get_record(trained)
    assert set(header) == set(record.delta_names)
    assert set(METADATA_KEYS) <= set(meta)
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == "2"
    assert meta["vpetl_version"] == vpetl.__version__
    assert json.loads(meta["config"]) == record.config.to_dict()
    assert meta["tensor_count"] == str(len(record.delta_names))
    shapes = json.loads(meta["base_shapes"])
    assert shapes["head.weight"] == [10, 32] and not any("vpetl_" in k for k in shapes)
    assert set(shapes) == {k for k in tiny_vit().state_dict() if k in dict(tiny_vit().named_parameters())}
    tensors = safetensors.torch.load_file(path)
    for name, value in delta_state_dict(trained).items():
        assert torch.equal(tensors[name], value)


def test_base_checksum_ignores_the_delta_but_sees_the_frozen_weights():
    a, b = inject(tiny_vit(), "bitfit"), inject(tiny_vit(), "bitfit")
    with torch.no_grad():
        b.blocks[0].attn.qkv.bias.add_(1.0)  # trainable in bitfit: part of the delta, not the checksum
    with tempfile.TemporaryDirectory() as tmp:
        ca = json.loads(read_raw_header(save_delta(a, Path(tmp) / "a"))["__metadata__"]["base_checksum"])
        cb = json.loads(read_raw_header(save_delta(b, Path(tmp) / "b"))["__metadata__"]["base_checksum"])
        with torch.no_grad():
            b.blocks[0].attn.qkv.weight[-1, -1] += 1.0  # frozen, and the last value is always sampled
        cc = json.loads(read_raw_header(save_delta(b, Path(tmp) / "c"))["__metadata__"]["base_checksum"])
    assert "blocks.0.attn.qkv.bias" not in ca
    assert different_weights(ca, cb) == []
    assert different_weights(ca, cc) == ["blocks.0.attn.qkv.weight"]
    assert len(different_weights(ca, base_checksum(tiny_vit(seed=7)))) > 10  # another init: nearly all differ


def test_delta_of_a_plain_model_is_an_error(tmp_path):
    with pytest.raises(InjectionError, match="not injected"):
        delta_state_dict(tiny_vit())
    with pytest.raises(InjectionError, match="not injected"):
        save_delta(tiny_vit(), tmp_path / "d.safetensors")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- mismatches


def test_other_head_is_reported_with_both_shapes(saved_bapat):
    path, _ = saved_bapat
    model = tiny_vit(num_classes=5)
    keys_before = list(model.state_dict())
    with pytest.raises(DeltaMismatchError) as info:
        load_delta(model, path)
    message = str(info.value)
    assert "head.weight: delta has (10, 32), model has (5, 32)" in message
    assert "head.bias: delta has (10,), model has (5,)" in message
    assert str(path) in message
    assert get_record(model) is None and list(model.state_dict()) == keys_before


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"depth": 3}, ["blocks.2.attn.qkv.weight", "parameters the delta's base lacks"]),
        ({"depth": 1}, ["blocks.1.attn.qkv.weight", "parameters the model lacks"]),
        ({"embed_dim": 48}, ["blocks.0.attn.qkv.weight: delta has (96, 32), model has (144, 48)"]),
    ],
)
def test_other_architecture_is_reported_and_the_model_left_alone(saved_bapat, kwargs, expected):
    path, _ = saved_bapat
    model = tiny_vit(**kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeltaMismatchError) as info:
        load_delta(model, path)
    for text in expected:
        assert text in str(info.value)
    assert get_record(model) is None
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_other_base_weights_warn_and_still_load(saved_bapat):
    path, trained = saved_bapat
    model = tiny_vit(seed=7)
    with pytest.warns(BaseWeightsWarning, match="other base weights"):
        load_delta(model, path)
    got, want = delta_state_dict(model), delta_state_dict(trained)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method, d_bottle", [("lora", 4), ("bapat", 16), ("patt", 8)])
def test_model_injected_with_another_config_is_refused(saved_bapat, method, d_bottle):
    path, _ = saved_bapat
    model = vpetl.inject(tiny_vit(), method, d_bottle=d_bottle)
    with pytest.raises(DeltaMismatchError, match="injection config") as info:
        load_delta(model, path)
    assert '"method": "bapat"' in str(info.value) and f'"method": "{method}"' in str(info.value)
    assert get_record(model).config == preset(method, d_bottle=d_bottle)


def test_key_mismatch_after_injecting_undoes_the_injection(saved_bapat, tmp_path):
    path, _ = saved_bapat
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "head.bias"}
    meta["tensor_count"] = str(len(tensors))
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(tensors, broken, metadata=meta)
    model = tiny_vit()
    keys_before = list(model.state_dict())
    with pytest.raises(DeltaMismatchError, match="tensors the delta lacks: head.bias"):
        load_delta(model, broken)
    assert get_record(model) is None and list(model.state_dict()) == keys_before


def test_strict_false_loads_the_branches_onto_another_head(saved_bapat):
    path, trained = saved_bapat
    model = tiny_vit(num_classes=5)
    head = model.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="head.weight"):
        load_delta(model, path, strict=False)
    assert torch.equal(model.head.weight, head)
    want = delta_state_dict(trained)
    for name, value in delta_state_dict(model).items():
        if not name.startswith("head."):
            assert torch.equal(value, want[name])


# --------------------------------------------------------------------------- unreadable files


def _no_metadata(p):
    safetensors.torch.save_file({"w": torch.zeros(3)}, p)


def _other_metadata(p):
    safetensors.torch.save_file({"w": torch.zeros(3)}, p, metadata={"format": "pt"})


def _future_version(src):
    def write(p):
        with safetensors.safe_open(src, "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        safetensors.torch.save_file(tensors, p, metadata={**meta, "format_version": "3"})

    return write


@pytest.mark.parametrize(
    "make, reason",
    [
        (None, "file does not exist"),
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: p.write_bytes(b"\x01\x02\x03"), "not a safetensors file"),
        (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "not a safetensors file (header is unreadable)"),
        (lambda p: p.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}"), "header is unreadable"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(200)), "not a safetensors file"),  # a torch.save zip
        (_no_metadata, "not a vpetl delta (no vpetl metadata)"),
        (_other_metadata, "not a vpetl delta (no vpetl metadata)"),
    ],
)
def test_unreadable_files_raise_delta_file_error(tmp_path, make, reason):
    path = tmp_path / "bad.safetensors"
    if make is not None:
        make(path)
    model = tiny_vit()
    with pytest.raises(DeltaFileError) as info:
        load_delta(model, path)
    assert str(path) in str(info.value) and reason in str(info.value)
    assert get_record(model) is None


@pytest.mark.parametrize("cut", ["half", "inside_header"])
def test_truncated_file_says_how_much_is_missing(saved_bapat, tmp_path, cut):
    path, _ = saved_bapat
    raw = path.read_bytes()
    keep = len(raw) // 2 if cut == "half" else 8 + 100
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(raw[:keep])
    with pytest.raises(DeltaFileError, match=rf"truncated: header says \d+ bytes, file has {keep}") as info:
        load_delta(tiny_vit(), truncated)
    assert str(truncated) in str(info.value)


def test_future_format_version_is_refused(saved_bapat, tmp_path):
    path = tmp_path / "v2.safetensors"
    _future_version(saved_bapat[0])(path)
    with pytest.raises(DeltaFileError, match="unsupported delta format version '3'.*upgrade vpetl"):
        load_delta(tiny_vit(), path)


def test_directory_instead_of_a_file(tmp_path):
    with pytest.raises(DeltaFileError, match="is a directory"):
        load_delta(tiny_vit(), tmp_path)


# --------------------------------------------------------------------------- atomic save


@pytest.mark.parametrize(
    "error,raised", [(OSError(28, "No space left on device"), DeltaFileError), (KeyboardInterrupt(), KeyboardInterrupt)]
)
def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(saved_bapat, tmp_path, monkeypatch, error, raised):
    path, trained = saved_bapat
    target = tmp_path / "delta.safetensors"
    good = save_delta(trained, target).read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(raised, match="No space left on device.*previous file, if any, is unchanged" if raised is
                       DeltaFileError else None):
        save_delta(trained, target)
    assert target.read_bytes() == good
    assert os.listdir(tmp_path) == ["delta.safetensors"]
    with pytest.raises(raised):
        save_delta(trained, tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["delta.safetensors"]


def test_save_to_a_read_only_location_says_so(saved_bapat, tmp_path, monkeypatch):
    _, trained = saved_bapat

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", read_only)  # root ignores chmod, so simulate the refusal
    with pytest.raises(DeltaFileError, match="cannot create a file in .*Permission denied.*writable location"):
        save_delta(trained, tmp_path / "delta.safetensors")


def test_save_overwrites_atomically_and_returns_the_path(saved_bapat, tmp_path):
    _, trained = saved_bapat
    target = tmp_path / "delta.safetensors"
    target.write_bytes(b"old")
    assert save_delta(trained, str(target)) == target
    assert os.listdir(tmp_path) == ["delta.safetensors"]
    assert read_raw_header(target)["__metadata__"]["format"] == FORMAT_NAME


def test_save_to_a_bad_path_says_why(saved_bapat, tmp_path):
    _, trained = saved_bapat
    missing = tmp_path / "no" / "such" / "dir" / "d.safetensors"
    with pytest.raises(DeltaFileError, match="does not exist") as info:
        save_delta(trained, missing)
    assert str(missing.parent) in str(info.value)
    with pytest.raises(DeltaFileError, match="is a directory"):
        save_delta(trained, tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_save_in_half_precision_halves_the_file_and_loads_into_fp32(saved_bapat, tmp_path, dtype):
    path, trained = saved_bapat
    small = save_delta(trained, tmp_path / "half.safetensors", dtype=dtype)
    assert small.stat().st_size < 0.6 * path.stat().st_size
    model = load_delta(tiny_vit(), small)
    for name, value in delta_state_dict(trained).items():
        param = dict(model.named_parameters())[name]
        assert param.dtype == torch.float32 and torch.equal(param, value.to(dtype).float())


def test_save_rejects_a_non_float_dtype(saved_bapat, tmp_path):
    _, trained = saved_bapat
    with pytest.raises(DeltaFileError, match="dtype must be None or one of torch.float32"):
        save_delta(trained, tmp_path / "x.safetensors", dtype=torch.int8)
