"""Shared fixtures: tiny random-weight models so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import pytest
import timm
import torch


def tiny_vit(num_classes: int = 10, depth: int = 2, embed_dim: int = 32, seed: int = 0) -> torch.nn.Module:
    """timm ViT with 2 blocks, width 32, 2 heads, 32x32 images in 8x8 patches (17 tokens)."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
        patch_size=8, depth=depth, embed_dim=embed_dim, num_heads=2,
    )


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


# Options a method cannot go without (``tune`` must be told what to unfreeze).
METHOD_OPTIONS = {"tune": {"positions": ["norm1", "attn_qkv"]}}


def tiny_swin3d(num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """torchvision Video Swin (Swin3D) with 2 stages of 2 blocks, width 16/32, windows 2x4x4;
    input ``(B, 3, 4, 32, 32)``."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(seed)
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                             window_size=[2, 4, 4], num_classes=num_classes, stochastic_depth_prob=0.0)


def tiny_hf_vit(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """HF transformers ViTForImageClassification, 2 layers, width 32, 32x32 images in 8x8 patches."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=num_classes)
    return transformers.ViTForImageClassification(config).eval()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as a tensor: HF models return an output object holding ``.logits``."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def perturb_trainable(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Add seeded noise to every trainable tensor, as training would move them (so a zero-initialised
    up-projection or a fresh head changes the output and a test sees whether it is used)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def run_in_interpreter(test_file: str, select: str, gpu_only_skips: bool = False) -> None:
    """Run the tests of ``test_file`` that ``-k select`` picks in a fresh process with
    ``TRITON_INTERPRET=1`` (set before Triton is first imported, which timm does in this one)
    and fail with its output unless they all pass; none may skip unless ``gpu_only_skips``
    (the file has tests that need a GPU even for Triton)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("VPETL_KERNEL", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           test_file, "-k", select]
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-3000:]
    assert gpu_only_skips or "skipped" not in done.stdout, done.stdout[-3000:]


def trainable_count(model: torch.nn.Module) -> int:
    """Parameters that require a gradient, counted directly (not through vpetl.summary)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def vit_base_on_meta() -> torch.nn.Module:
    """timm ViT-B/16 without a head on the meta device: the paper's backbone shapes for counting
    parameters, with no weights to initialise and no forward."""
    import timm

    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
