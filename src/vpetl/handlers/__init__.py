"""One small handler per attention shape (fused qkv, separate q/k/v, MHA, window), tried in order by the walker.

Order matters: modules that read their projection weights themselves (window attention,
nn.MultiheadAttention) must be claimed before the generic fused/separate Linear handlers.
"""

from .base import AttentionHandler, LinearProjections, ProjectionSpec
from . import hf_mlp  # noqa: F401  (registers its MLP locator)
from .fused_qkv import FusedQkvHandler
from .mha import MultiheadAttentionHandler
from .separate_qkv import SeparateQkvHandler
from .window import WindowAttentionHandler

HANDLERS: list[AttentionHandler] = [
    MultiheadAttentionHandler(),
    WindowAttentionHandler(),
    FusedQkvHandler(),
    SeparateQkvHandler(),
]

__all__ = ["HANDLERS", "AttentionHandler", "LinearProjections", "ProjectionSpec"]
