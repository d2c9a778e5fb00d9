"""torch.compile: no graph breaks from vpetl, and compiled outputs/gradients equal eager."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.video.swin_transformer import SwinTransformer3d
from torchvision.models.vision_transformer import VisionTransformer

import vpetl

from conftest import tiny_vit


def _cases():
    torch.manual_seed(0)
    return {
        "timm-vit": (lambda: tiny_vit(), (2, 3, 32, 32)),
        "torchvision-vit": (
            lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                      mlp_dim=64, num_classes=5),
            (2, 3, 32, 32),
        ),
        "swin3d": (
            lambda: SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                      window_size=[2, 4, 4], num_classes=5),
            (1, 3, 4, 32, 32),
        ),
    }


CASES = _cases()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _injected(name: str, method: str):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = vpetl.inject(factory(), method, d_bottle=4)
    with torch.no_grad():  # non-trivial branches and head, so gradients are informative
        for pname, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)
    return model, torch.randn(shape)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", ["bapat", "lora"])
def test_no_graph_breaks(name, method):
    model, x = _injected(name, method)  # the first-forward branch check is still pending here
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _outputs_and_grads(model, x, runner=None):
    """Output of ``runner`` (the model or its compiled wrapper) and the model's gradients."""
    model.zero_grad()
    out = (model if runner is None else runner)(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_eager_aot_eager(name):
    model, x = _injected(name, "bapat")
    vpetl.verify(model, x)
    eager_out, eager_grads = _outputs_and_grads(model, x)
    compiled_out, compiled_grads = _outputs_and_grads(model, x, torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and any("vpetl_patt" in n for n in eager_grads)
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-4, atol=1e-5)


def test_compiled_matches_eager_inductor():
    """The default backend (generates C++ for the CPU): the common case, a timm ViT with BAPAT."""
    model, x = _injected("timm-vit", "bapat")
    vpetl.verify(model, x)
    eager_out, eager_grads = _outputs_and_grads(model, x)
    compiled_out, compiled_grads = _outputs_and_grads(model, x, torch.compile(model))
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-3, atol=1e-5)
