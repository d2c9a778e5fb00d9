"""Method ``"tune"``: unfreeze base parameters by their position in the block (Table 1).

Every position is looked up in each transformer *block* (the ancestor of an attention module
that sits in an ``nn.ModuleList`` / ``nn.Sequential``: timm ``blocks.N``, torchvision
``encoder.layers.encoder_layer_N`` and ``features.S.N``, HF ``layers.N`` / ``encoder.layer.N``),
except ``downsample``, which lives between stages:

================  ==========================================================================
position          what it unfreezes (per block unless said otherwise)
================  ==========================================================================
``norm1``         the norm feeding attention: ``norm1`` / ``ln_1`` / ``layernorm_before`` ...
``attn_proj``     attention output projection: ``proj`` / ``out_proj`` / ``o_proj`` /
                  HF ``attention.output.dense`` (weight ``d x d`` + bias)
``attn_qkv``      the q/k/v projections: fused ``qkv``, separate ``q``/``k``/``v``,
                  ``query``/``key``/``value``, ``q_proj``..., BEiT-style ``q_bias``/``v_bias``,
                  ``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias`` (``3d x d`` + ``3d``)
``attn_softmax``  what shapes the attention logits before softmax: relative-position bias
                  tables (``relative_position_bias_table``, ``rel_pos_h/w/t``, anywhere in the
                  model, shared tables included), SwinV2's ``cpb_mlp`` and ``logit_scale``
``norm2``         the norm feeding the MLP: ``norm2`` / ``ln_2`` / ``layernorm_after`` ...
``mlp_fc1``       the MLP's input Linear(s): every Linear of the MLP but the last
``mlp_fc2``       the MLP's output Linear: its last Linear
``downsample``    patch merging between stages (model-wide): torchvision ``PatchMerging`` /
                  ``PatchMergingV2`` (Swin3D's too), timm / HF ``*PatchMerging``, and a stage's
                  ``downsample`` child
================  ==========================================================================

Norms are found by name first; a block whose norms have other names but exactly two norm
children uses registration order (first feeds attention, second the MLP). For Video Swin-B
(``torchvision.models.video.swin3d_b``) the counts are Table 1's: norm1 24,064; attn_proj
6,991,616; attn_qkv 20,974,848; attn_softmax 953,160; norm2 24,064; mlp_fc1 27,966,464;
mlp_fc2 27,930,368; downsample 2,759,680.

A position that matches nothing in the model is an error (a typo'd or inapplicable position
would otherwise train nothing silently).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ..blocks import (  # noqa: F401  (block_path_of: where VPT and others look it up)
    NORM1_NAMES,
    NORM2_NAMES,
    BlockParts,
    attention_linear_params,
    attn_proj_params,
    block_parts,
    block_path_of,
    join,
    leaf,
    mlp_linears,
    named_params,
    norm_params,
)
from ..errors import ConfigError, InjectionError
from ..handlers.sites import PROJECTION_CHILD_NAMES
from ..options import enum_value, frozen_set
from ..registry import BRANCH_MARKER, Method, register

if TYPE_CHECKING:
    from ..inject import Injection

class TunePosition(str, Enum):
    """Base parameters of every block that method ``"tune"`` unfreezes (Table 1 rows)."""

    NORM1 = "norm1"  # LayerNorm 1, before attention
    ATTN_PROJ = "attn_proj"  # attention output projection
    ATTN_QKV = "attn_qkv"  # q/k/v projections
    ATTN_SOFTMAX = "attn_softmax"  # relative-position bias table ("Attn, SoftMax")
    NORM2 = "norm2"  # LayerNorm 2, before the MLP
    MLP_FC1 = "mlp_fc1"
    MLP_FC2 = "mlp_fc2"
    DOWNSAMPLE = "downsample"  # patch merging between stages (Swin)


def normalize_tune_positions(value: Any) -> tuple[TunePosition, ...]:
    """One position or an iterable of them (enums or their names) as a sorted, de-duplicated tuple."""
    items = [value] if isinstance(value, (str, TunePosition)) else value
    accepted = ", ".join(repr(p.value) for p in TunePosition)
    try:
        items = list(items)
    except TypeError:
        raise ConfigError(f"tune positions must be a position or a list of them ({accepted}); got {value!r}.") from None
    if not items:
        raise ConfigError(f"tune positions must name at least one of {accepted}; got an empty list.")
    out = {enum_value(TunePosition, item, "tune position") for item in items}
    return tuple(p for p in TunePosition if p in out)


QKV_PARAM_NAMES = frozenset({
    "q_bias", "k_bias", "v_bias", "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
    "v_proj_weight", "bias_k", "bias_v",
})
REL_POS_PARAM_NAMES = frozenset({"relative_position_bias_table", "rel_pos_h", "rel_pos_w", "rel_pos_t"})
LOGIT_PARAM_NAMES = frozenset({"logit_scale"})  # inside attention only (CLIP has a root logit_scale)
LOGIT_MODULE_NAMES = frozenset({"cpb_mlp"})

Params = list[tuple[str, nn.Parameter]]


def _norm1(model: nn.Module, block: BlockParts) -> Params:
    return norm_params(block, 0)


def _norm2(model: nn.Module, block: BlockParts) -> Params:
    return norm_params(block, 1)


def _attn_proj(model: nn.Module, block: BlockParts) -> Params:
    return attn_proj_params(block)


def _attn_qkv(model: nn.Module, block: BlockParts) -> Params:
    out = attention_linear_params(block, lambda name: leaf(name) in PROJECTION_CHILD_NAMES)
    for name, module in block.attention.named_modules():
        if BRANCH_MARKER not in name:
            own = named_params(join(block.attention_path, name), module, recurse=False)
            out += [(n, p) for n, p in own if leaf(n) in QKV_PARAM_NAMES]
    return out


def _attn_softmax(model: nn.Module, block: BlockParts) -> Params:
    """SwinV2-style logit parameters; relative-position tables are collected model-wide."""
    out: Params = []
    for name, module in block.attention.named_modules():
        if BRANCH_MARKER in name:
            continue
        path = join(block.attention_path, name)
        if leaf(name) in LOGIT_MODULE_NAMES:
            out += named_params(path, module)
        out += [(n, p) for n, p in named_params(path, module, recurse=False) if leaf(n) in LOGIT_PARAM_NAMES]
    return out


def _mlp_fc(which: int) -> Callable[[nn.Module, BlockParts], Params]:
    def collect(model: nn.Module, block: BlockParts) -> Params:
        linears = mlp_linears(model, block)
        if len(linears) < 2:
            return []
        chosen = linears[:-1] if which == 1 else linears[-1:]
        return [pair for path, module in chosen for pair in named_params(path, module)]

    return collect


_MLP_WANTED = "an MLP (an mlp/ffn child, HF intermediate/output, linear1/linear2) with two or more Linears"

# per-block positions: (collector, what was looked for -- for the error message)
_PER_BLOCK: dict[TunePosition, tuple[Callable[[nn.Module, BlockParts], Params], str]] = {
    TunePosition.NORM1: (_norm1, f"a norm child named {'/'.join(NORM1_NAMES[:4])}/... or two norm children"),
    TunePosition.ATTN_PROJ: (_attn_proj, "an attention output Linear named proj/out_proj/o_proj or output.dense"),
    TunePosition.ATTN_QKV: (_attn_qkv, "q/k/v Linears (qkv, q/k/v, query/key/value, q_proj/...) or "
                            "in_proj_weight / q_bias / v_bias parameters"),
    TunePosition.ATTN_SOFTMAX: (_attn_softmax, "a relative-position bias table (relative_position_bias_table, "
                                "rel_pos_h/w/t) or a continuous position bias (cpb_mlp, logit_scale)"),
    TunePosition.NORM2: (_norm2, f"a norm child named {'/'.join(NORM2_NAMES[:4])}/... or two norm children"),
    TunePosition.MLP_FC1: (_mlp_fc(1), _MLP_WANTED),
    TunePosition.MLP_FC2: (_mlp_fc(2), _MLP_WANTED),
}


_DOWNSAMPLE_WANTED = "a patch-merging module between stages (a *PatchMerging class or a stage's downsample child)"


def _model_wide_rel_pos(model: nn.Module) -> Params:
    """Relative-position tables outside the blocks too (BEiT's shared ``rel_pos_bias``)."""
    return [(n, p) for n, p in model.named_parameters() if BRANCH_MARKER not in n and leaf(n) in REL_POS_PARAM_NAMES]


def _downsample(model: nn.Module, blocks: list[BlockParts]) -> Params:
    out: Params = []
    for path, module in model.named_modules():
        if BRANCH_MARKER in path:
            continue
        parent = path.rpartition(".")[0]
        stage_child = leaf(path) == "downsample" and any(b.path.startswith(parent + ".") for b in blocks)
        if "PatchMerging" in type(module).__name__ or stage_child:
            out += named_params(path, module)
    return out


def _collect(model: nn.Module, blocks: list[BlockParts], position: TunePosition) -> Params:
    if position is TunePosition.DOWNSAMPLE:
        return _downsample(model, blocks)
    collect = _PER_BLOCK[position][0]
    found = [pair for block in blocks for pair in collect(model, block)]
    if position is TunePosition.ATTN_SOFTMAX:
        found += _model_wide_rel_pos(model)
    return found


def _unique(pairs: Params) -> Iterator[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    for name, param in pairs:
        if id(param) not in seen:
            seen.add(id(param))
            yield name, param


def tune_named_parameters(
    model: nn.Module, sites: list[tuple[str, nn.Module]], positions: tuple[TunePosition, ...]
) -> dict[TunePosition, list[tuple[str, nn.Parameter]]]:
    """The base parameters at each position, by name (see the module docstring); raises
    ``InjectionError`` for a position that matches nothing in ``model``."""
    blocks = block_parts(model, sites)
    out = {position: list(_unique(_collect(model, blocks, position))) for position in positions}
    empty = [p for p, found in out.items() if not found]
    if empty:
        raise InjectionError(_no_match_message(model, blocks, empty))
    return out


def tune_parameters(
    model: nn.Module, sites: list[tuple[str, nn.Module]], positions: tuple[TunePosition, ...]
) -> list[nn.Parameter]:
    """The base parameters to unfreeze for ``positions`` (the head is handled by inject).

    ``sites``: ``(path, module)`` of every attention module inject found.
    """
    found = tune_named_parameters(model, sites, positions)
    return [param for _, param in _unique(pair for pairs in found.values() for pair in pairs)]


def _no_match_message(model: nn.Module, blocks: list[BlockParts], empty: list[TunePosition]) -> str:
    available = [p.value for p in TunePosition if p not in empty and _collect(model, blocks, p)]
    example = f"{blocks[0].path or '<root>'} ({type(blocks[0].module).__name__})" if blocks else "none"
    looked = []
    for position in empty:
        wanted = _DOWNSAMPLE_WANTED if position is TunePosition.DOWNSAMPLE else _PER_BLOCK[position][1]
        looked.append(f"for {position.value!r} it looked for {wanted} and found none")
    names = ", ".join(repr(p.value) for p in empty)
    return (
        f"tune position(s) {names} match no parameter of this {type(model).__name__} "
        f"({len(blocks)} blocks, e.g. {example}): {'; '.join(looked)}. "
        f"Positions this model has: {', '.join(available) or 'none of Table 1'}. "
        f"Fix: drop {names} from positions (a plain ViT, for example, has no relative-position table for "
        "'attn_softmax' and no patch merging for 'downsample')."
    )


@register
@dataclass(frozen=True)
class Tune(Method):
    """Unfreeze the base parameters at ``positions`` (Table 1; module docs), e.g.
    ``Tune(positions=("attn_qkv", "norm2"))``."""

    name: ClassVar[str] = "tune"
    kind: ClassVar[str] = "base"
    paper: ClassVar[str] = "V-PETL Table 1 (tuning single positions)"
    formula: ClassVar[str] = "the sizes of the chosen base parameters"
    width_field: ClassVar[None] = None
    adds_branches: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True  # the trained values are the base's own

    positions: tuple[TunePosition, ...] = ()

    def __post_init__(self) -> None:
        if self.positions in ((), None, []):
            raise ConfigError(
                "method 'tune' needs positions=[...] naming what to unfreeze (Table 1): "
                "norm1, attn_proj, attn_qkv, attn_softmax, norm2, mlp_fc1, mlp_fc2, downsample."
            )
        frozen_set(self, "positions", normalize_tune_positions(self.positions))

    def attach(self, injection: Injection) -> None:
        sites = injection.attention_sites()
        injection.train(tune_parameters(injection.model, [(s.path, s.module) for s in sites], self.positions))

    def merge(self, record) -> None:
        """Nothing to fold: the tuned values already are base parameters."""
