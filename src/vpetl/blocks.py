"""The transformer blocks of a model and the roles of their modules, for methods that attach
to more than the q/k/v projections (SSF, FacT, RepAdapter, Convpass, the adapter family, ...).

A block is the ancestor of an attention site that sits in an ``nn.ModuleList`` /
``nn.Sequential`` (timm ``blocks.N``, torchvision ``features.S.N``, HF ``encoder.layer.N``).
Roles are found the way :mod:`vpetl.methods.tune` finds Table 1's positions:

==============  =====================================================================
role            module (path in the model)
==============  =====================================================================
``norm1``       the norm feeding attention (``norm1`` / ``ln_1`` / ``layernorm_before``)
``norm2``       the norm feeding the MLP (``norm2`` / ``ln_2`` / ``layernorm_after``)
``attention``   the block's child holding the attention site (HF: ``attention``)
``attn_proj``   the attention's output Linear (``proj`` / ``out_proj`` / ``output.dense``)
``mlp``         the MLP site (:class:`vpetl.handlers.mlp.MlpSite`), if any
``fc1``/``fc2`` the MLP's first and last Linear
==============  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .handlers.mlp import MlpSite, locate_mlp
from .handlers.sites import AttentionSite
from .methods import tune as roles


@dataclass(frozen=True)
class Block:
    """One transformer block and the paths of its modules by role (None where absent)."""

    path: str
    module: nn.Module
    site: AttentionSite
    attention_path: str
    norm1: str | None
    norm2: str | None
    attn_proj: str | None
    mlp: MlpSite | None
    fc1: str | None
    fc2: str | None
    extra: dict = field(default_factory=dict)


def find_blocks(model: nn.Module, sites: list[AttentionSite]) -> list[Block]:
    """One :class:`Block` per block holding an attention site, in model order."""
    out = []
    by_path = {s.path: s for s in sites}
    for block in roles._blocks(model, [(s.path, s.module) for s in sites]):
        norm1, norm2 = _norm_path(block, 0), _norm_path(block, 1)
        proj = [n for n, _ in roles._attn_proj(model, block)]
        linears = [path for path, _ in roles._mlp_linears(model, block)]
        out.append(Block(
            path=block.path, module=block.module, site=by_path[block.site_path], attention_path=block.attention_path,
            norm1=norm1, norm2=norm2, attn_proj=_module_of(proj), mlp=locate_mlp(model, block.site_path),
            fc1=linears[0] if len(linears) >= 2 else None, fc2=linears[-1] if len(linears) >= 2 else None,
        ))
    return out


def _norm_path(block, which: int) -> str | None:
    params = roles._block_norm(block, which)
    return _module_of([n for n, _ in params])


def _module_of(param_names: list[str]) -> str | None:
    """The module path of the first parameter name (``a.b.weight`` -> ``a.b``)."""
    return param_names[0].rpartition(".")[0] if param_names else None
