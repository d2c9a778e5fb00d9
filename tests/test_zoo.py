"""Every method of the zoo runs forward and backward on a small timm ViT and a small Swin3D.

Per method: the injected model's output differs from the base (where the method changes the
function at init), every trainable parameter gets a gradient, no frozen one does, and the
set of trainable parameters is exactly the recorded delta.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vpetl
from conftest import tiny_vit
from test_window import swin3d
from vpetl.record import get_record

ALL_POSITIONS = ["norm1", "attn_proj", "attn_qkv", "norm2", "mlp_fc1", "mlp_fc2"]

# (id, method, options, changes the function at init)
ZOO = [
    ("patt", "patt", {"d_bottle": 4}, True),
    ("patt-qkv-relu", "patt", {"d_bottle": 4, "positions": "qkv", "activation": "relu"}, True),
    ("patt-learnable-scale", "patt", {"d_bottle": 4, "learnable_scale": True}, True),
    ("patt-concat", "patt", {"d_bottle": 4, "variant": "concat"}, True),
    ("patt-no-input", "patt", {"d_bottle": 4, "variant": "no_input"}, True),
    ("adapter", "adapter", {"d_bottle": 4}, False),
    ("adapter-sequential", "adapter", {"d_bottle": 4, "placement": "sequential", "learnable_scale": True}, False),
    ("bapat", "bapat", {"d_bottle": 4}, True),
    ("bapat-concat", "bapat", {"d_bottle": 4, "variant": "concat"}, True),
    ("lora", "lora", {"d_bottle": 4}, False),
    ("prefix", "prefix", {"d_bottle": 4, "length": 3}, True),
    ("vpt-shallow", "vpt", {"length": 3}, True),
    ("vpt-deep", "vpt", {"length": 3, "deep": True}, True),
    ("tune", "tune", {}, False),
    ("bitfit", "bitfit", {}, False),
    ("linear", "linear", {}, False),
    ("full", "full", {}, False),
]

MODELS = {
    "vit": (tiny_vit, (2, 3, 32, 32), 17, ALL_POSITIONS),  # 17 tokens per attention call
    "swin3d": (swin3d, (1, 3, 4, 32, 32), 32, ALL_POSITIONS + ["attn_softmax", "downsample"]),  # 2x4x4 windows
}


def _options(model_name: str, method: str, options: dict) -> dict:
    _, _, tokens, positions = MODELS[model_name]
    options = dict(options)
    if options.get("variant") == "no_input":
        options["tokens"] = tokens
    if method == "tune":
        options["positions"] = positions
    return options


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("case", ZOO, ids=[c[0] for c in ZOO])
def test_method_runs_forward_and_backward(model_name, case):
    _, method, options, changes = case
    build, shape, _, _ = MODELS[model_name]
    base = build()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    options = _options(model_name, method, options)
    if method == "vpt" and model_name == "swin3d":
        with pytest.raises(vpetl.InjectionError, match="token sequence"):
            vpetl.inject(copy.deepcopy(base), method, **options)
        return
    model = vpetl.inject(copy.deepcopy(base), method, **options).train()
    out = model(x)
    with torch.no_grad():
        reference = base.train()(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    if changes:
        assert not torch.allclose(out, reference)
    else:
        torch.testing.assert_close(out, reference)
    out.square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(get_record(model).delta_names) and trainable
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
