"""Shape (d): torchvision Swin / SwinV2 / Swin3D window attention. [in progress]"""

from __future__ import annotations

from torch import nn

from .base import AttentionHandler


class WindowAttentionHandler(AttentionHandler):
    name = "torchvision-window"

    def match(self, module: nn.Module) -> bool:
        return False

    def spec(self, module):  # pragma: no cover - placeholder
        raise NotImplementedError

    def wire(self, module, branches, record):  # pragma: no cover - placeholder
        raise NotImplementedError
