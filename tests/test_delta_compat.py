"""Delta files written by vpetl 0.1.0 (tests/fixtures/delta_v0_1_0, one per method and variant)
keep loading: the rebuilt injection gives the output the 0.1.0 model gave."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import vpetl
from conftest import tiny_vit

FIXTURES = Path(__file__).parent / "fixtures" / "delta_v0_1_0"
CASES = sorted(p.stem for p in FIXTURES.glob("*.safetensors") if p.stem not in ("base", "expected"))


def test_every_method_of_0_1_0_has_a_fixture():
    assert len(CASES) == 15
    assert {"patt", "adapter", "bapat", "lora", "prefix", "vpt", "tune", "bitfit", "linear", "full"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_0_1_0_delta_loads_and_reproduces_its_output(name, tmp_path):
    model = tiny_vit(seed=123)  # other random weights: the base file must be what counts
    model.load_state_dict(safetensors.torch.load_file(FIXTURES / "base.safetensors"))
    expected = safetensors.torch.load_file(FIXTURES / "expected.safetensors")
    with torch.no_grad():
        plain = model.eval()(expected["input"])
    vpetl.load_delta(model, FIXTURES / f"{name}.safetensors")
    with torch.no_grad():
        out = model.eval()(expected["input"])
    assert not torch.allclose(plain, expected[name], atol=1e-3)  # the delta matters
    torch.testing.assert_close(out, expected[name], rtol=1e-5, atol=1e-5)
    # and it saves again, in today's format, as a file that loads to the same output
    vpetl.save_delta(model, tmp_path / "again.safetensors")
    fresh = tiny_vit(seed=5)
    fresh.load_state_dict(safetensors.torch.load_file(FIXTURES / "base.safetensors"))
    vpetl.load_delta(fresh, tmp_path / "again.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(expected["input"]), expected[name], rtol=1e-5, atol=1e-5)
