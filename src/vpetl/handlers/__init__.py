"""One small handler per attention shape (DESIGN.md §3), tried in order by the walker."""

from .base import AttentionHandler, LinearProjections, ProjectionSpec
from .fused_qkv import FusedQkvHandler
from .separate_qkv import SeparateQkvHandler

HANDLERS: list[AttentionHandler] = [FusedQkvHandler(), SeparateQkvHandler()]

__all__ = ["HANDLERS", "AttentionHandler", "LinearProjections", "ProjectionSpec"]
