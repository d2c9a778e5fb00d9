"""The transformer blocks of a model and the roles of their modules, for methods that attach
to more than the q/k/v projections (SSF, FacT, RepAdapter, Convpass, the adapter family, ...).

A block is the ancestor of an attention site that sits in an ``nn.ModuleList`` /
``nn.Sequential`` (timm ``blocks.N``, torchvision ``features.S.N``, HF ``encoder.layer.N``).
Table 1's positions (:mod:`vpetl.methods.tune`) are found through the same lookups:

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

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .handlers.mlp import MlpSite, locate_mlp
from .handlers.sites import AttentionSite
from .registry import BRANCH_MARKER

Params = list[tuple[str, nn.Parameter]]


NORM1_NAMES = ("norm1", "ln_1", "ln1", "norm_1", "layernorm_before", "input_layernorm", "attention_norm", "norm_attn")
NORM2_NAMES = ("norm2", "ln_2", "ln2", "norm_2", "layernorm_after", "post_attention_layernorm", "ffn_norm", "norm_mlp")
PROJ_NAMES = frozenset({"proj", "out_proj", "o_proj", "wo", "c_proj"})  # + HF "output.dense"
def block_path_of(model: nn.Module, attention_path: str) -> str | None:
    """Path of the block holding the attention at ``attention_path``: the attention itself or
    its nearest ancestor whose parent is an ``nn.ModuleList`` / ``nn.Sequential``; None if
    no ancestor sits in one."""
    parts = attention_path.split(".") if attention_path else []
    for end in range(len(parts), 0, -1):
        parent = model.get_submodule(".".join(parts[: end - 1]))
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[:end])
    return None


@dataclass
class BlockParts:
    """One transformer block: ``attention`` is its child that holds the attention site
    (HF: ``attention`` with ``attention.output.dense`` inside), ``site_path`` the site."""

    path: str
    module: nn.Module
    attention_path: str
    attention: nn.Module
    site_path: str


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def block_parts(model: nn.Module, sites: list[tuple[str, nn.Module]]) -> list[BlockParts]:
    out: dict[str, BlockParts] = {}
    for site_path, site in sites:
        block_path = block_path_of(model, site_path)
        if block_path is None:  # no list of blocks: the attention's parent is the block
            block_path = site_path.rpartition(".")[0]
        block = model.get_submodule(block_path)
        if block_path == site_path:  # the site is the whole layer (nn.TransformerEncoderLayer)
            name = "self_attn" if isinstance(block._modules.get("self_attn"), nn.Module) else ""
        else:
            name = site_path[len(block_path) + 1 :].split(".")[0] if block_path else site_path.split(".")[0]
        attention_path = join(block_path, name)
        if block_path not in out:
            out[block_path] = BlockParts(block_path, block, attention_path, model.get_submodule(attention_path), site_path)
    return list(out.values())


def named_params(path: str, module: nn.Module, recurse: bool = True) -> Params:
    return [
        (join(path, name), p) for name, p in module.named_parameters(recurse=recurse) if BRANCH_MARKER not in name
    ]


def is_norm(module: nn.Module) -> bool:
    has_params = any(True for _ in module.parameters())
    return has_params and (isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower())


def norm_params(block: BlockParts, which: int) -> Params:
    """The norm feeding attention (``which=0``) or the MLP (``which=1``)."""
    names = NORM1_NAMES if which == 0 else NORM2_NAMES
    for name in names:
        child = block.module._modules.get(name)
        if child is not None and is_norm(child):
            return named_params(join(block.path, name), child)
    norms = [(n, m) for n, m in block.module.named_children() if m is not block.attention and is_norm(m)]
    if len(norms) == 2:  # unknown names: registration order
        name, child = norms[which]
        return named_params(join(block.path, name), child)
    return []


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def attention_linear_params(block: BlockParts, keep: Callable[[str], bool]) -> Params:
    """The parameters of the Linears inside the block's attention whose path ``keep`` accepts."""
    out: Params = []
    for name, module in block.attention.named_modules():
        if BRANCH_MARKER in name or not isinstance(module, nn.Linear) or not name:
            continue
        if keep(name):
            out += named_params(join(block.attention_path, name), module)
    return out


def attn_proj_params(block: BlockParts) -> Params:
    """The attention's output Linear(s): ``proj`` / ``out_proj`` / ``o_proj`` / HF ``output.dense``."""
    return attention_linear_params(block, lambda name: leaf(name) in PROJ_NAMES or f".{name}".endswith(".output.dense"))


def mlp_linears(model: nn.Module, block: BlockParts) -> list[tuple[str, nn.Linear]]:
    site = locate_mlp(model, block.site_path)
    if site is None:
        return []
    mlp = getattr(site, "mlp", None)
    if mlp is not None:  # a child MLP (timm Mlp, torchvision MLPBlock / MLP Sequential, HF ViTMLP)
        mlp_path = join(site.path, next(n for n, m in site.module.named_children() if m is mlp))
        linears = [(n, m) for n, m in mlp.named_modules() if isinstance(m, nn.Linear) and BRANCH_MARKER not in n]
        return [(join(mlp_path, n), m) for n, m in linears]
    if getattr(site, "intermediate", None) is not None:  # HF intermediate.dense / output.dense
        return [(join(site.path, f"{part}.dense"), getattr(site, part).dense) for part in ("intermediate", "output")]
    return [  # nn.TransformerEncoderLayer: linear1 / linear2
        (join(site.path, n), m) for n, m in site.module.named_children() if n in ("linear1", "linear2")
    ]


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


def find_blocks(model: nn.Module, sites: list[AttentionSite]) -> list[Block]:
    """One :class:`Block` per block holding an attention site, in model order."""
    out = []
    by_path = {s.path: s for s in sites}
    for block in block_parts(model, [(s.path, s.module) for s in sites]):
        norm1, norm2 = _norm_path(block, 0), _norm_path(block, 1)
        proj = [n for n, _ in attn_proj_params(block)]
        linears = [path for path, _ in mlp_linears(model, block)]
        out.append(Block(
            path=block.path, module=block.module, site=by_path[block.site_path], attention_path=block.attention_path,
            norm1=norm1, norm2=norm2, attn_proj=_module_of(proj), mlp=locate_mlp(model, block.site_path),
            fc1=linears[0] if len(linears) >= 2 else None, fc2=linears[-1] if len(linears) >= 2 else None,
        ))
    return out


def _norm_path(block, which: int) -> str | None:
    params = norm_params(block, which)
    return _module_of([n for n, _ in params])


def _module_of(param_names: list[str]) -> str | None:
    """The module path of the first parameter name (``a.b.weight`` -> ``a.b``)."""
    return param_names[0].rpartition(".")[0] if param_names else None
