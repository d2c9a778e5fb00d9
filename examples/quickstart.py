"""Inject BAPAT into a timm ViT, train a few steps on synthetic data, save and reload the delta.

Run: python examples/quickstart.py   (CPU is fine; random weights, so the numbers mean nothing)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import timm
import torch

import vpetl


def main() -> None:
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = vpetl.inject(base, "bapat", d_bottle=32)
    print(vpetl.summary(model))

    images, labels = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(5):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bapat32.safetensors"
        vpetl.save_delta(model, path)
        print(f"delta: {path.stat().st_size / 1e6:.2f} MB vs full checkpoint "
              f"{sum(v.numel() * v.element_size() for v in base_state.values()) / 1e6:.2f} MB")
        fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
        fresh.load_state_dict(base_state)
        vpetl.load_delta(fresh, path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        same = torch.allclose(model(images), fresh(images))
    print(f"reloaded model matches: {same}")


if __name__ == "__main__":
    main()
