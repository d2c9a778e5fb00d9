"""Finding the attention modules of a model: the sites every q/k/v method attaches to."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import HANDLERS, AttentionHandler
from .fused_qkv import unsupported_reason

PROJECTION_CHILD_NAMES = frozenset(
    {"qkv", "kv", "q", "k", "v", "query", "key", "value", "q_proj", "k_proj", "v_proj", "in_proj", "wq", "wk", "wv"}
)


@dataclass(frozen=True)
class AttentionSite:
    """An attention module at ``path`` and the handler that adapts it."""

    path: str
    module: nn.Module
    handler: AttentionHandler


def find_attention(model: nn.Module) -> tuple[list[AttentionSite], list[tuple[str, nn.Module]]]:
    """Attention modules a handler adapts, and attention-like modules none can (unhandled)."""
    sites: list[AttentionSite] = []
    suspects: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(s.path == "" or path.startswith(s.path + ".") for s in sites):
            continue  # inside a site already claimed (the root itself may be one)
        handler = next((h for h in HANDLERS if h.match(module)), None)
        if handler is not None:
            sites.append(AttentionSite(path, module, handler))
        elif _looks_like_attention(module):
            suspects.append((path, module))
    site_paths = [s.path for s in sites]
    unhandled = [
        (p, m) for p, m in suspects
        if not any(s.startswith(p + ".") or p.startswith(s + ".") for s in site_paths)
    ]
    return sites, unhandled


def module_census(model: nn.Module, limit: int = 6) -> str:
    """"12 Linear, 4 LayerNorm, ..." for error messages: what the walker did find."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if module is not model:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    if not counts:
        return "no submodules"
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{n} {name}" for name, n in ranked[:limit])
    return text + (f", and {len(ranked) - limit} other types" if len(ranked) > limit else "")


def why_unhandled(module: nn.Module) -> str:
    reason = unsupported_reason(module) if "qkv" in module._modules else None
    return reason or "its q/k/v projections are not nn.Linear modules called in forward"


def _looks_like_attention(module: nn.Module) -> bool:
    return bool(PROJECTION_CHILD_NAMES & set(module._modules)) or "in_proj_weight" in module._parameters
