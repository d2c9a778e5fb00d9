"""Whole injected models pickle: ``torch.save(model)``, ``torch.load(..., weights_only=False)`` in a
fresh process, ``copy.deepcopy`` and DataLoader workers started with ``spawn``.

Every handler is covered (fused qkv, separate q/k/v + HF split MLP, ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``, torchvision window attention, timm attention with extra keys) with
every method that applies. The loaded model must still be injected: same output, ``save_delta``
writes the same tensors, ``vpetl.unload`` restores the plain classes.
"""

from __future__ import annotations

import abc
import copy
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import vpetl

from conftest import METHOD_OPTIONS
from test_compile import CASES

transformers = pytest.importorskip("transformers")

BRANCHED = ["patt", "adapter", "lora", "bapat"]
EVERY = BRANCHED + ["tune", "bitfit", "linear", "full"]


def _hf_vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(config)


def _encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


MODELS = {
    "timm-vit": (CASES["timm-vit"][0], (2, 3, 32, 32), EVERY + ["prefix", "vpt"]),
    "torchvision-vit": (CASES["torchvision-vit"][0], (2, 3, 32, 32), EVERY + ["prefix", "vpt"]),
    "swin3d": (CASES["swin3d"][0], (1, 3, 4, 32, 32), EVERY + ["prefix"]),
    "hf-vit": (_hf_vit, (2, 3, 32, 32), BRANCHED + ["linear"]),
    "encoder": (_encoder, (2, 5, 16), BRANCHED + ["prefix"]),
}
PAIRS = [(name, method) for name, (_, _, methods) in MODELS.items() for method in methods]


def _output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _injected(name: str, method: str):
    factory, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    width = {"d_bottle": 4} if method in ("patt", "adapter", "lora", "bapat", "prefix") else {}
    vpetl.inject(model, method, **width, **METHOD_OPTIONS.get(method, {}))
    with torch.no_grad():
        for param in vpetl.delta_state_dict(model).values():
            param.add_(torch.randn_like(param) * 0.1)
    return model, torch.randn(shape)


_LOADER = textwrap.dedent(
    """
    import json, sys, tempfile, torch, vpetl
    from safetensors.torch import load_file
    results = {}
    for case in json.loads(sys.argv[1]):
        model = torch.load(case["model"], weights_only=False)
        x, expected = torch.load(case["io"])
        with torch.no_grad():
            out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        delta = tempfile.mktemp(suffix=".safetensors")
        vpetl.save_delta(model, delta)
        saved = load_file(delta)
        same_delta = saved.keys() == vpetl.delta_state_dict(model).keys() and all(
            torch.equal(saved[k], v) for k, v in vpetl.delta_state_dict(model).items())
        classes_before = {type(m).__name__ for m in model.modules()}
        vpetl.unload(model)
        results[case["id"]] = dict(
            equal=torch.equal(out, expected), same_delta=bool(same_delta),
            vpetl_classes_after_unload=sorted(
                type(m).__name__ for m in model.modules() if type(m).__module__.startswith("vpetl")),
            classes_before=sorted(classes_before),
        )
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def fresh_process_results(tmp_path_factory):
    """Pickle every (model, method) here, load them all in one new interpreter."""
    folder = tmp_path_factory.mktemp("pickles")
    cases = []
    for name, method in PAIRS:
        model, x = _injected(name, method)
        with torch.no_grad():
            expected = _output(model, x)
        ident = f"{name}-{method}"
        torch.save(model, folder / f"{ident}.pt")
        torch.save((x, expected), folder / f"{ident}.io.pt")
        cases.append({"id": ident, "model": str(folder / f"{ident}.pt"), "io": str(folder / f"{ident}.io.pt")})
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(cases)], capture_output=True, text=True,
                          cwd=tests, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, method", PAIRS, ids=[f"{n}-{m}" for n, m in PAIRS])
def test_torch_save_then_load_in_a_fresh_process(fresh_process_results, name, method):
    result = fresh_process_results[f"{name}-{method}"]
    assert result["equal"], "the loaded model computes something else"
    assert result["same_delta"], "save_delta of the loaded model wrote other tensors"
    assert result["vpetl_classes_after_unload"] == [], "vpetl.unload left vpetl classes in the loaded model"


@pytest.mark.parametrize("name, method", [("timm-vit", "bapat"), ("torchvision-vit", "bapat"), ("swin3d", "bapat"),
                                          ("hf-vit", "bapat"), ("encoder", "bapat"), ("timm-vit", "prefix")])
def test_deepcopy_is_an_independent_injected_model(name, method):
    model, x = _injected(name, method)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(_output(clone, x), _output(model, x))
        for param in vpetl.delta_state_dict(clone).values():
            param.add_(1.0)
        assert not torch.equal(_output(clone, x), _output(model, x))
    assert type(vpetl.unload(clone)) is type(vpetl.unload(model))
    assert not any(type(m).__module__.startswith("vpetl") for m in clone.modules())


class _ModelOutputs(torch.utils.data.Dataset):
    """Each item is the carried model's output on a fixed input: the model crosses into the worker."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.x)[index]


def test_dataloader_spawn_worker_carries_an_injected_model():
    model, x = _injected("timm-vit", "bapat")
    with torch.no_grad():
        expected = model(x)
    loader = torch.utils.data.DataLoader(_ModelOutputs(model, x), batch_size=2, num_workers=1,
                                         multiprocessing_context="spawn")
    (batch,) = list(loader)
    assert torch.equal(batch, expected)


def test_derived_classes_are_made_once_and_keep_the_model_class_name():
    from vpetl.derived import derived_class
    from vpetl.handlers.mlp import AdaptedForward

    model, _ = _injected("timm-vit", "adapter")
    mlp_class = type(model.blocks[0].mlp)
    from timm.layers import Mlp

    assert mlp_class is derived_class(AdaptedForward, Mlp)
    assert mlp_class.__name__ == "AdaptedMlp"
    with pytest.raises(TypeError, match="Derived mixin"):
        derived_class(nn.Module, nn.Linear)


class _AbstractMlp(nn.Module, abc.ABC):
    """An MLP whose class has a metaclass of its own (``abc.ABCMeta``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_derived_class_of_a_base_with_its_own_metaclass_pickles():
    from vpetl.derived import derived_class
    from vpetl.handlers.mlp import AdaptedForward

    cls = derived_class(AdaptedForward, _AbstractMlp)
    assert isinstance(cls, abc.ABCMeta) and cls is derived_class(AdaptedForward, _AbstractMlp)
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert pickle.loads(pickle.dumps(AdaptedForward)) is AdaptedForward
