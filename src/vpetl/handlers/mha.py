"""Shape (c): nn.MultiheadAttention (torchvision ViT, nn.TransformerEncoderLayer). [in progress]"""

from __future__ import annotations

from torch import nn

from .base import AttentionHandler


class MultiheadAttentionHandler(AttentionHandler):
    name = "multihead-attention"

    def match(self, module: nn.Module) -> bool:
        return False

    def spec(self, module):  # pragma: no cover - placeholder
        raise NotImplementedError

    def wire(self, module, branches, record):  # pragma: no cover - placeholder
        raise NotImplementedError
