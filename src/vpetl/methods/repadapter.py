"""RepAdapter (Luo et al. 2023, luogen1996/RepAdapter): a linear adapter right before the
attention's q/k/v projections and before the MLP's first Linear, merged exactly afterwards::

    RA(y) = y + s * (W_B dropout(W_A y + b_A) + b_B)          y: (..., D)
    block:  x = x + attn(RA_attn(norm1(x)));   x = x + mlp(RA_mlp(norm2(x)))

``W_A`` (``down``): ``(r, D)`` dense, xavier-uniform; ``W_B`` (``up``): ``D x r`` *grouped*
(``groups`` = 2: hidden units ``0..r/2-1`` feed outputs ``0..D/2-1``, the rest the rest;
stored as ``(D, r/groups)``), zero; both biases zero, so the model is unchanged at step 0. No
activation; dropout 0.1 on the hidden units. Defaults from the official code: ``r = 8``
(``train.py --dim``), ``groups = 2`` and ``s = 1`` (``repadapter.RepAdapter`` and
``set_RepAdapter``; its VTAB configs tune ``s`` per task in {0.1, 0.5, 1, 5, 10}). Count per
adapter ``D*r + r + D*r/groups + D``: 9,992 for ViT-B (``D = 768``), 239,808 for its 24.

Placement: the adapter transforms the *output* of the block's ``norm1`` / ``norm2`` (a derived
class on the norm, :mod:`vpetl.derived`), which is what the q/k/v projections / ``fc1`` read in
pre-norm blocks (timm ViT/DeiT/Swin, torchvision ViT/Swin/Swin3D, HF ViT) -- also where the
attention reads ``qkv.weight`` itself (torchvision window attention). Post-norm blocks (SwinV2,
``ResPostBlock``) and ``nn.TransformerEncoderLayer`` are refused. Both adapters of a block are
registered on it: ``<block>.vpetl_repadapter.attn.*`` and ``<block>.vpetl_repadapter.mlp.*``.

Merge (exact): ``RA(y) = M y + c`` with ``M = I + s * dense(W_B) W_A`` and
``c = s * (W_B b_A + b_B)``; every Linear ``W y + b`` fed by the norm becomes
``(W M) y + (W c + b)``: the fused ``qkv`` / separate q, k, v / ``in_proj_weight`` for
attention, ``fc1`` (every MLP Linear but the last that reads ``D`` features) for the MLP. A norm
cannot absorb ``M`` (its affine is diagonal). Window attention that zero-pads the tokens after
the norm (timm / torchvision Swin, Swin3D, when the feature map is not a multiple of the
window) is the one inexact case: padded tokens read ``qkv(0) = b`` injected but ``W c + b``
merged, which changes the real tokens' attention slightly (standard input sizes need no padding).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..blocks import BlockParts, mlp_linears
from ..branches import Branch, ProjectionBranch
from ..derived import Derived
from ..errors import ConfigError, InjectionError, MergeError
from ..handlers.base import LinearProjections
from ..handlers.mha import MultiheadAttentionHandler
from ..handlers.window import WindowAttentionHandler
from ..options import frozen_set, number, probability, width
from ..registry import Method, register

if TYPE_CHECKING:
    from ..blocks import Block
    from ..inject import Injection
    from ..record import InjectionRecord

NAME = "vpetl_repadapter"
ATTR = "_vpetl_repadapter"
# Blocks whose norm1/norm2 sit *after* attention / MLP: the adapter would not feed q/k/v or fc1.
POST_NORM_BLOCKS = frozenset(
    {"SwinTransformerBlockV2", "SwinTransformerV2Block", "SwinTransformerV2CrBlock", "ResPostBlock", "Swinv2Layer"}
)

# One Linear-like target of the merge: (the model, the module's path in it, weight attribute, bias attribute).
Fold = tuple[nn.Module, str, str, str]


@register
@dataclass(frozen=True)
class RepAdapter(Method):
    """RepAdapter: ``y + s * (W_B dropout(W_A y + b_A) + b_B)`` on the inputs of attention and
    MLP (module docs), ``W_B`` grouped and zero-initialised; folds exactly into the next Linears."""

    name: ClassVar[str] = "repadapter"
    kind: ClassVar[str] = "repadapter"
    paper: ClassVar[str] = "RepAdapter (Luo et al. 2023), luogen1996/RepAdapter"
    formula: ClassVar[str] = "per block 2*(d*r + r + d*r/groups + d)"
    mergeable: ClassVar[bool] = True

    d_bottle: int = 8
    scale: float = 1.0
    groups: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        width(self.d_bottle, "RepAdapter d_bottle")
        width(self.groups, "RepAdapter groups")
        if self.d_bottle % self.groups:
            raise ConfigError(
                f"RepAdapter d_bottle ({self.d_bottle}) must be a multiple of groups ({self.groups}): W_B splits "
                "the hidden units into equal groups (e.g. d_bottle=8, groups=2)."
            )
        frozen_set(self, "scale", number(self.scale, "RepAdapter scale"))
        frozen_set(self, "dropout", probability(self.dropout, "RepAdapter dropout"))

    def attach(self, injection: Injection) -> None:
        """One :class:`RepAdapterPair` per block (``<block>.vpetl_repadapter``); the block's
        norm1 / norm2 get a derived class that passes their output through it."""
        _refuse_additive_merges_before(injection)
        for block in injection.blocks():
            _check_block(block)
            d_attn = injection.projection_spec(block.site, "", "RepAdapter").d_in
            attn = RepAdapterBranch(d_attn, self, _attention_folds(injection.model, block))
            mlp = None
            missing = _why_no_mlp_adapter(block)
            if missing is None:
                mlp = RepAdapterBranch(block.mlp.d_in, self, _mlp_folds(injection.model, block))
            elif injection.strict:
                raise InjectionError(
                    f"{block.path} ({type(block.module).__name__}): {missing}, so RepAdapter has no place before its "
                    "MLP. Pass strict=False to adapt only the attention input of such blocks."
                )
            else:
                warnings.warn(f"{block.path}: {missing}; RepAdapter adapts only its attention input.", stacklevel=4)
            pair = RepAdapterPair(attn, mlp).train(block.module.training)  # dropout follows the model's mode
            path = injection.add_branch(block.path, NAME, injection.place(pair, next(block.site.module.parameters())))
            injection.adopt(f"{path}.attn", attn)
            injection.derive(block.norm1, _AttentionInput, ATTR, pair)
            if mlp is not None:
                injection.adopt(f"{path}.mlp", mlp)
                injection.derive(block.norm2, _MlpInput, ATTR, pair)

    def merge(self, record: InjectionRecord) -> None:
        """``W <- W M`` and ``b <- W c + b`` in every Linear each adapter feeds (module docs)."""
        adapters = [b for b in record.branches.values() if isinstance(b, RepAdapterBranch)]
        for adapter in adapters:  # check them all before changing any weight
            adapter.check_mergeable()
        for adapter in adapters:
            adapter.fold_()


class GroupedLinear(nn.Module):
    """``y = W x + b`` with ``W`` block-diagonal in ``groups`` blocks: output group ``g`` reads
    input group ``g`` only (a grouped 1x1 convolution). ``weight``: ``(d_out, d_in / groups)``."""

    def __init__(self, d_in: int, d_out: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(d_out, d_in // groups))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        g = self.groups
        w = self.weight.view(g, -1, self.weight.shape[1])  # (g, d_out/g, d_in/g)
        y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (g, -1)), w.to(x.dtype))
        return y.flatten(-2) + self.bias.to(x.dtype)

    def dense(self) -> Tensor:
        """The full ``(d_out, d_in)`` matrix (zeros off the diagonal blocks)."""
        return torch.block_diag(*self.weight.view(self.groups, -1, self.weight.shape[1]))

    def extra_repr(self) -> str:
        d_in, d_out = self.weight.shape[1] * self.groups, self.weight.shape[0]
        return f"in_features={d_in}, out_features={d_out}, groups={self.groups}"


class RepAdapterBranch(Branch):
    """One RepAdapter ``y + s * up(dropout(down(y)))`` (module docs); ``folds`` are the Linears
    it feeds, or why it cannot be merged."""

    kind = "repadapter"

    def __init__(self, d: int, config: RepAdapter, folds: tuple[Fold, ...] | str) -> None:
        super().__init__()
        if d % config.groups:
            raise InjectionError(
                f"RepAdapter groups={config.groups} must divide the token width {d}; choose groups among its divisors."
            )
        self.scale = config.scale
        self.down = nn.Linear(d, config.d_bottle)
        self.dropout = nn.Dropout(config.dropout)
        self.up = GroupedLinear(config.d_bottle, d, config.groups)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.folds = folds  # a plain tuple (module references, no submodules) or a reason string

    def forward(self, y: Tensor) -> Tensor:
        self._mark_called()
        delta = self.up(self.dropout(self.down(self._input(y, self.down.weight)))) * self.scale
        return y + delta.to(y.dtype)

    def affine(self) -> tuple[Tensor, Tensor]:
        """``(M, c)`` in float64 with ``forward(y) = y M^T + c`` in eval mode."""
        w_a, b_a = self.down.weight.double(), self.down.bias.double()
        w_b, b_b = self.up.dense().double(), self.up.bias.double()
        m = torch.eye(w_a.shape[1], dtype=torch.float64, device=w_a.device) + self.scale * (w_b @ w_a)
        return m, self.scale * (w_b @ b_a + b_b)

    def check_mergeable(self) -> None:
        if isinstance(self.folds, str):
            raise MergeError(f"cannot merge RepAdapter: {self.folds}. Keep the injected model, or vpetl.unload(model).")
        _, c = self.affine()
        for owner, path, weight, bias in self.folds:
            if getattr(owner.get_submodule(path), bias, None) is None and bool(c.abs().max() > 0):
                raise MergeError(
                    f"cannot merge RepAdapter into {type(owner.get_submodule(path)).__name__} ({path}), which has no "
                    f"{bias}: the adapter's constant W c needs one. Keep the injected model, or vpetl.unload(model)."
                )

    @torch.no_grad()
    def fold_(self) -> None:
        """``W <- W M``, ``b <- W c + b`` in every target, in place (float64 arithmetic)."""
        m, c = self.affine()
        for owner, path, weight_name, bias_name in self.folds:
            target = owner.get_submodule(path)
            weight, bias = getattr(target, weight_name), getattr(target, bias_name, None)
            w = weight.double()
            if bias is not None:
                bias.copy_((w @ c.to(w.device) + bias.double()).to(bias.dtype))
            weight.copy_((w @ m.to(w.device)).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class RepAdapterPair(Branch):
    """A block's two adapters: ``attn`` (after norm1) and ``mlp`` (after norm2, or None)."""

    kind = "repadapter"

    def __init__(self, attn: RepAdapterBranch, mlp: RepAdapterBranch | None) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp

    def adapt(self, role: str, y: Tensor) -> Tensor:
        self._mark_called()
        return getattr(self, role)(y)


class _AttentionInput(Derived):
    """Mixin for the norm feeding attention: its output goes through the block's ``attn`` adapter."""

    class_prefix = "RepAdapted"

    def forward(self, *args, **kwargs):
        return getattr(self, ATTR)[0].adapt("attn", super().forward(*args, **kwargs))


class _MlpInput(Derived):
    """Mixin for the norm feeding the MLP: its output goes through the block's ``mlp`` adapter."""

    class_prefix = "RepAdapted"

    def forward(self, *args, **kwargs):
        return getattr(self, ATTR)[0].adapt("mlp", super().forward(*args, **kwargs))


# ----------------------------------------------------------------------------- placement


def _refuse_additive_merges_before(injection: Injection) -> None:
    """Entries attached earlier that add mergeable q/k/v branches (LoRA) merge after RepAdapter
    (``vpetl.merge`` goes last to first), which would give ``W M + BA`` instead of ``(W + BA) M``."""
    kinds = {e.kind: e for e in injection.config.methods if e.mergeable and not isinstance(e, RepAdapter)}
    earlier = sorted({kinds[b.kind].name for b in injection.record.branches.values()
                      if isinstance(b, ProjectionBranch) and b.kind in kinds})
    if earlier:
        raise ConfigError(
            f"put RepAdapter before {', '.join(earlier)} in the list of entries (e.g. [RepAdapter(), LoRA()]): the "
            f"forward is the same, and vpetl.merge (which goes last to first) must fold {', '.join(earlier)} into "
            "q/k/v before RepAdapter multiplies those weights by its matrix M."
        )


def _check_block(block: Block) -> None:
    where = f"{block.path} ({type(block.module).__name__})"
    if any(isinstance(m, nn.TransformerEncoderLayer) for m in (block.module, block.site.module)):
        raise InjectionError(
            f"{where}: nn.TransformerEncoderLayer runs its norms inside a fused fast path (and is post-norm unless "
            "norm_first=True), so RepAdapter cannot sit before its projections. Use LoRA, PATT or the adapter."
        )
    if type(block.module).__name__ in POST_NORM_BLOCKS:
        raise InjectionError(
            f"{where} is a post-norm block: its norms follow the attention and the MLP, so they do not feed "
            "q/k/v or fc1 and RepAdapter has no place there. Use LoRA, PATT or the adapter on this model."
        )
    if block.norm1 is None:
        raise InjectionError(
            f"{where}: found no norm feeding its attention (a child named norm1 / ln_1 / layernorm_before with "
            "parameters); RepAdapter transforms that norm's output. Use LoRA, PATT or the adapter on this model."
        )


def _why_no_mlp_adapter(block: Block) -> str | None:
    if block.mlp is None:
        return "it has no MLP"
    if block.norm2 is None:
        return "found no norm feeding its MLP (norm2 / ln_2 / layernorm_after)"
    return None


def _attention_folds(model: nn.Module, block: Block) -> tuple[Fold, ...] | str:
    """The projections reading norm1's output, or why they cannot absorb the adapter."""
    site, module, handler = block.site, block.site.module, block.site.handler
    where = f"{site.path} ({type(module).__name__})"
    if isinstance(handler, WindowAttentionHandler):
        return ((model, _join(site.path, "qkv"), "weight", "bias"),)
    if isinstance(handler, MultiheadAttentionHandler):
        if not module._qkv_same_embed_dim:
            return f"{where} keeps separate q/k/v weights of other input widths"
        return ((model, site.path, "in_proj_weight", "in_proj_bias"),)
    if isinstance(handler, LinearProjections):
        if getattr(module, "q_bias", None) is not None:
            return f"{where} keeps its q/v biases apart and has no K bias to hold W_k c"
        if any(module._modules.get(name) is not None for name in ("sr", "pool")):
            return f"{where} projects keys/values from a reduced input, not from norm1's output"
        return tuple((model, _join(site.path, name), "weight", "bias") for name, _ in handler.linears(module))
    return f"{where}: its handler {handler.name!r} exposes no q/k/v weights to fold into"


def _mlp_folds(model: nn.Module, block: Block) -> tuple[Fold, ...] | str:
    """The MLP Linears reading norm2's output: all but the last that take ``D`` features."""
    view = BlockParts(block.path, block.module, block.attention_path, model.get_submodule(block.attention_path),
                      block.site.path)
    linears = mlp_linears(model, view)
    first = [path for path, m in linears[:-1] if m.in_features == block.mlp.d_in]
    if not first:
        return f"the MLP of {block.path} has no input Linear of width {block.mlp.d_in} before its last one"
    return tuple((model, path, "weight", "bias") for path in first)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name

