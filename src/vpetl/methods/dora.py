"""DoRA (Liu et al., ICML 2024; NVlabs/DoRA): weight-decomposed low-rank adaptation. A frozen
Linear's weight ``W`` (``out x in``) is split into a magnitude and a direction; LoRA adapts the
direction, the magnitude is trained directly::

    V  = W + s B A                    B: (out, r) zeros,  A: (r, in) Kaiming-uniform (a = sqrt 5)
    n  = ||V||_row                    (out,)  L2 norm of each output row, over the input axis
    W' = diag(m / n) V                m: (out,) trainable, initialised to ||W||_row (so W' = W at step 0)
    y  = x W'^T + b                   the bias is unchanged

``n`` is treated as a constant in backward (paper §4.3; the official code's default
``dora_simple=True`` detaches it), which saves the memory of its graph. ``s = alpha / r`` with the
official default ``alpha = 2 r`` (commonsense ``finetune.py``: r = 8, alpha = 16; every released
script keeps alpha = 2 r), i.e. ``scale = 2.0``; the default rank is the official 8.

Targets. ``linears`` names whole Linears: ``"qkv"`` (the default) is every attention's q/k/v
projection, each Linear as one (timm's fused ``qkv``, ``out = 3d``; HF's separate
query/key/value, each its own), ``"proj"`` the attention output, ``"fc1"`` / ``"fc2"`` the MLP's.
``positions`` (letters of "qkv") adapts q/k/v *slots* instead: in a fused qkv each chosen slot
has its own ``B, A, m`` over its ``w`` rows and the other rows stay ``W``; a separate q/k/v Linear
is its own slot. Count: ``r (in + out) + out`` per Linear (``r (in + w) + w`` per slot); ViT-B/16
with r = 8 on every qkv: 12 * (8 * (768 + 2304) + 2304) = 322,560.

How. The Linear's class is derived (:mod:`vpetl.derived`) so that reading its ``weight`` gives
``W'`` (the raw Parameter stays in ``_parameters``, so keys, ``load_state_dict`` and optimisers
see it). Every forward that reads the weight gets ``W'``: ``nn.Linear``'s, torchvision window
attention's (it reads ``attn.qkv.weight``), timm BEiT/EVA's ``F.linear(x, qkv.weight, ...)``; a
:class:`~vpetl.projection.BranchedLinear` that adopts the Linear for PATT on the same q/k/v asks
it through ``_vpetl_effective``, so PATT adds its branch to ``x W'^T + b``. An effective weight
given by a method that adapted the Linear first (SSF) is the ``W`` DoRA starts from.
``nn.MultiheadAttention`` (torchvision ViT) keeps q/k/v in ``in_proj_weight`` (``3d x d``): that
Parameter is adapted the same way. Parameters: ``<linear>.vpetl_dora.{down.weight, up.weight,
magnitude}``, per slot ``<linear>.vpetl_dora.<q|k|v>.{...}``, and ``<attention>.vpetl_dora...``
for ``nn.MultiheadAttention``.

``dropout`` (the official ``lora_dropout``: 0.05 in its LLaMA runs; 0 here, as in vpetl's LoRA)
drops the input of the adapted part only, as the official forward does:
``y = x W^T + b + drop(x) (W' - W)^T`` in training (a forward hook on the Linear adds
``(drop(x) - x) (W' - W)^T`` to ``nn.Linear``'s ``x W'^T + b``), where the Linear is called as a
module: code that reads ``.weight`` itself (window attention, a PATT-branched projection) gets
``W'`` without dropout. Merges exactly: ``W <- W'``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import Branch
from ..derived import Derived
from ..errors import ConfigError, InjectionError
from ..handlers.base import LinearProjections
from ..options import frozen_set, normalize_positions, number, probability, width
from ..projection import SlotLayout
from ..record import AttrSet
from ..registry import Method, register
from .lora import inner_weight, linear_targets, normalize_linears

if TYPE_CHECKING:
    from ..handlers.sites import AttentionSite
    from ..inject import Injection
    from ..record import InjectionRecord

DORA_ATTR = "_vpetl_dora"  # plain attribute on an adapted Linear: (its DoraBranch,)
LINEARS = ("qkv", "proj", "fc1", "fc2")


@register
@dataclass(frozen=True)
class DoRA(Method):
    """DoRA: ``W' = diag(m / ||W + s B A||_row) (W + s B A)`` on every chosen Linear (default:
    every attention q/k/v projection, each Linear whole) or on q/k/v slots (``positions``);
    rank 8, ``scale`` (alpha / r) 2.0 as in the official code; the row norm is detached in
    backward. Options: ``linears`` from "qkv", "proj", "fc1", "fc2" (None: ``("qkv",)`` unless
    ``positions`` is given), ``positions`` letters of "qkv", ``dropout`` on the adapted part's
    input."""

    name: ClassVar[str] = "dora"
    kind: ClassVar[str] = "dora"
    paper: ClassVar[str] = "DoRA (Liu et al., ICML 2024; NVlabs/DoRA)"
    formula: ClassVar[str] = "per Linear r*(in + out) + out (per q/k/v slot r*(in + w) + w); ViT-B/16 r=8 qkv 322,560"
    width_field: ClassVar[str] = "rank"
    mergeable: ClassVar[bool] = True
    conflicts: ClassVar[frozenset[str]] = frozenset({"lora"})
    conflict_reason: ClassVar[str] = (
        "DoRA already holds a low-rank update of the weights it adapts and renormalises their rows, so a LoRA "
        "update beside it would be neither DoRA nor LoRA; use DoRA alone (its linears/positions reach the same "
        "Linears as LoRA's)"
    )

    rank: int = 8
    scale: float = 2.0
    linears: tuple[str, ...] | None = None
    positions: str = ""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        width(self.rank, "DoRA rank (d_bottle)")
        frozen_set(self, "scale", number(self.scale, "DoRA scale"))
        if self.positions != "":
            frozen_set(self, "positions", normalize_positions(self.positions, "DoRA positions"))
        if self.linears is not None:
            frozen_set(self, "linears", normalize_linears(self.linears, LINEARS, "DoRA linears"))
            if "qkv" in self.linears and self.positions:
                raise ConfigError(
                    f"DoRA linears {list(self.linears)} include 'qkv' (every q/k/v projection whole) and positions="
                    f"{self.positions!r} adapts slots of those same projections; choose one, e.g. "
                    f"DoRA(positions={self.positions!r}, linears={[n for n in self.linears if n != 'qkv']})."
                )
            if not self.linears and not self.positions:
                raise ConfigError("DoRA needs a target: linears from 'qkv', 'proj', 'fc1', 'fc2' or q/k/v positions.")
        frozen_set(self, "dropout", probability(self.dropout, "DoRA dropout"))

    @property
    def targets(self) -> tuple[str, ...]:
        """The whole Linears adapted: ``linears``, or ``("qkv",)`` when neither it nor
        ``positions`` is given."""
        if self.linears is not None:
            return self.linears
        return () if self.positions else ("qkv",)

    def attach(self, injection: Injection) -> None:
        """One :class:`DoraBranch` per adapted Linear, as ``<linear>.vpetl_dora``; the Linear's
        class is derived so its ``weight`` reads as ``W'``."""
        targets: list[tuple[str, nn.Module, SlotLayout | None, str]] = []
        if self.positions or "qkv" in self.targets:
            for site in injection.attention_sites():
                injection.projection_spec(site, self.positions, "DoRA")
                for name, layout in _qkv_modules(site):
                    letters = "".join(c for c in layout.letters if c in self.positions)
                    if "qkv" not in self.targets and not letters:
                        continue
                    if "qkv" in self.targets or len(layout.letters) == 1:
                        letters = ""  # the whole Linear
                    path = ".".join(p for p in (site.path, name) if p)
                    targets.append((path, injection.model.get_submodule(path), layout, letters))
        for path, linear, _ in linear_targets(injection, [n for n in self.targets if n != "qkv"], "DoRA"):
            targets.append((path, linear, None, ""))
        for path, module, layout, letters in targets:
            name = weight_name(type(module))
            if self.dropout > 0 and name != "weight":
                raise InjectionError(
                    f"DoRA dropout drops the input of the adapted part, which needs a Linear called as a module; "
                    f"{path} ({type(module).__name__}) holds its q/k/v in {name}. Use dropout=0, or DoRA(linears="
                    "('proj', 'fc1', 'fc2')), on this model."
                )
            branch = DoraBranch(getattr(module, name).detach(), self.rank, self.scale, self.dropout, layout, letters)
            injection.add_branch(path, "vpetl_dora", injection.place(branch, module._parameters[name]))
            injection.derive(path, _DoraWeight, DORA_ATTR, branch)
            if self.dropout > 0:
                injection.record.add_hook(module, branch.dropout_hook, pre=False)

    def merge(self, record: InjectionRecord) -> None:
        """``W <- W'`` in every adapted Linear's weight Parameter (in place)."""
        for entry in record.undo_log:
            if isinstance(entry, AttrSet) and entry.name == DORA_ATTR:
                branch: DoraBranch = entry.new[0]
                if not branch.merged:
                    module, name = entry.obj, weight_name(type(entry.obj))
                    merged = branch.effective(inner_weight(module, _DoraWeight, name))
                    module._parameters[name].copy_(merged)
                    branch.merged = True  # the Linear now reads its raw (merged) weight


def weight_name(cls: type) -> str:
    """The weight DoRA adapts in a module of class ``cls``."""
    return "in_proj_weight" if issubclass(cls, nn.MultiheadAttention) else "weight"


def _qkv_modules(site: AttentionSite) -> list[tuple[str, SlotLayout]]:
    """The modules holding ``site``'s q/k/v projection weights (paths relative to the site)
    and the layout of their output rows."""
    if isinstance(site.handler, LinearProjections):
        return site.handler.linears(site.module)
    qkv = site.module._modules.get("qkv")
    if site.handler.name == "torchvision-window" and isinstance(qkv, nn.Linear):
        return [("qkv", SlotLayout("qkv"))]
    attn = site.module if isinstance(site.module, nn.MultiheadAttention) else site.module._modules.get("self_attn")
    if isinstance(attn, nn.MultiheadAttention) and isinstance(attn._parameters.get("in_proj_weight"), Tensor):
        return [("" if attn is site.module else "self_attn", SlotLayout("qkv"))]
    raise InjectionError(
        f"DoRA adapts q/k/v projections held in an nn.Linear or in nn.MultiheadAttention's in_proj_weight; "
        f"{site.path or '<root>'} ({type(site.module).__name__}) has neither (e.g. separate q/k/v weights for "
        "kdim/vdim != embed_dim). On this model use DoRA(linears=('proj', 'fc1', 'fc2'))."
    )


class DoraBranch(Branch):
    """DoRA's trained tensors for one Linear: ``down`` (A), ``up`` (B) and ``magnitude`` (m),
    either for the whole Linear or per q/k/v slot (children ``q``/``k``/``v``); see the module
    docs. ``effective(W)`` is ``W'``."""

    kind = "dora"

    def __init__(self, weight: Tensor, rank: int, scale: float, dropout: float,
                 layout: SlotLayout | None = None, letters: str = ""):
        super().__init__()
        self.scale = scale
        self.letters = letters
        self.layout = layout
        self.merged = False  # set by DoRA.merge: the Linear's raw weight holds W'
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        if not letters:
            _init_part(self, weight, rank)
        else:
            d_in = weight.shape[1]
            for c in letters:
                part = nn.Module()
                _init_part(part, layout.rows(weight, c).reshape(-1, d_in), rank)
                self.add_module(c, part)
            rows = torch.cat([layout.columns(weight.shape[0], c) for c in letters]).to(weight.device)
            self.register_buffer("row_index", rows, persistent=False)

    def effective(self, weight: Tensor) -> Tensor:
        """``W'`` for the frozen ``weight`` (``(out, in)``); ``weight`` itself once merged."""
        if self.merged:
            return weight
        self._mark_called()
        if not self.letters:
            return self._rescaled(self, weight)
        d_in = weight.shape[1]
        rows = [self._rescaled(getattr(self, c), self.layout.rows(weight, c).reshape(-1, d_in)) for c in self.letters]
        return weight.index_copy(0, self.row_index, torch.cat(rows))

    def _rescaled(self, part: nn.Module, w: Tensor) -> Tensor:
        """``diag(m / n) (w + s B A)`` with ``n`` detached, in ``w``'s dtype."""
        v = w.to(part.up.weight.dtype) + (part.up.weight @ part.down.weight) * self.scale
        norm = torch.linalg.vector_norm(v, dim=1).detach()
        return (v * (part.magnitude / norm).unsqueeze(1)).to(w.dtype)

    def dropout_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Forward hook of the adapted Linear, in training: ``nn.Linear`` computed
        ``x W'^T + b``; adding ``(drop(x) - x) (W' - W)^T`` gives the official
        ``x W^T + b + drop(x) (W' - W)^T`` (dropout on the adapted part's input only)."""
        if not module.training or self.merged or self.dropout is None:
            return None
        x = args[0]
        delta = module.weight - inner_weight(module, _DoraWeight)
        return output + F.linear(self.dropout(x) - x, delta.to(output.dtype))

    def extra_repr(self) -> str:
        where = f", slots={self.letters!r}" if self.letters else ""
        return f"scale={self.scale}{where}"


def _init_part(part: nn.Module, weight: Tensor, rank: int) -> None:
    """``down`` (A) Kaiming-uniform, ``up`` (B) zero, ``magnitude`` = row norms of ``weight``."""
    out_features, in_features = weight.shape
    part.down = nn.Linear(in_features, rank, bias=False, device=weight.device)
    part.up = nn.Linear(rank, out_features, bias=False, device=weight.device)
    nn.init.kaiming_uniform_(part.down.weight, a=math.sqrt(5))
    nn.init.zeros_(part.up.weight)
    part.magnitude = nn.Parameter(torch.linalg.vector_norm(weight.float(), dim=1))


class _DoraWeight(Derived):
    """Mixin for an adapted module: its ``weight`` (``in_proj_weight`` for
    ``nn.MultiheadAttention``) reads as DoRA's ``W'`` of the weight the classes behind this mixin
    give (the raw Parameter, or another method's effective weight); the raw Parameter stays in
    ``_parameters`` (state-dict keys, optimisers and ``load_state_dict`` see it)."""

    class_prefix = "VpetlDora"

    @classmethod
    def derived_namespace(cls, base: type) -> dict[str, Any]:
        name = weight_name(base)
        return {name: property(lambda self: self._vpetl_dora_weight(name), doc="DoRA's W' = diag(m/n)(W + s B A)")}

    def _vpetl_dora_weight(self, name: str) -> Tensor:
        return self.__dict__[DORA_ATTR][0].effective(inner_weight(self, _DoraWeight, name))

    def _vpetl_effective(self, name: str, raw: Tensor | None) -> Tensor | None:
        """DoRA's value of parameter ``name`` given its raw value, after the transform of a
        method that derived this module before DoRA (SSF); the bias is DoRA's unchanged. A
        :class:`vpetl.projection.BranchedLinear` that adopted this Linear's Parameters (PATT on
        the same q/k/v projection) calls it, so DoRA and the projection's branches compose."""
        inner = getattr(super(), "_vpetl_effective", None)
        if inner is not None:
            raw = inner(name, raw)
        if name != weight_name(type(self)):
            return raw
        return self.__dict__[DORA_ATTR][0].effective(raw)
