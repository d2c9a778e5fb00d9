"""FacT (Jie & Deng, AAAI 2023): one low-rank factorisation of all the weight updates of a ViT.

Every block's q, k, v, attention output and MLP Linears are seen as ``D x D`` slices (fc1 and
fc2 as ``m`` slices each, ``m`` = MLP ratio, 4 for ViT-B: 12 slices per block, 144 for 12
blocks). The updates share two projections over the **whole model**::

    U: D -> r   (vpetl_fact.u.weight, (r, D), nn.Linear default init, no bias)
    V: r -> D   (vpetl_fact.v.weight, (D, r), zeros, no bias)

and each adapted Linear adds ``s * Δ`` to its output (``dp`` = dropout, 0.1 by default), with
``T`` a core in nn.Linear weight layout ``(out, in)``::

    Δq = V dp(T_q U x)                 (same for k, v and the attention output o)  T: (r, r)
    Δfc1 = flatten_m(V unflatten_{m x r}(dp(T_1 U x)))                            T_1: (m r, r)
    Δfc2(h) = V dp(T_2 [U h_0; ...; U h_{m-1}]),  h_a = h[a D : (a+1) D]          T_2: (r, m r)

**fact_tt** (tensor-train): the cores are trained per block. TT count on ViT-B/16
``1536 r + 144 r²`` (r=8: 21,504; r=16: 61,440).

**fact_tk** (Tucker): the cores come from a shared core ``C (r, r, r)`` and factor matrix
``P (r, S)``, ``S`` = slices (144 for ViT-B), both xavier-uniform. With ``K = C P[:, o:o+n]``
(``(r, r, n)``, ``K[i, j, k] = Σ_m C[i, j, m] P[m, o + k]``) and block offset ``o = b (4 + 2m)``
(slices o+0..3: q, k, v, attention output; o+4..o+3+m: fc1; o+4+m..o+3+2m: fc2)::

    T_q = K_0^T, T_k = K_1^T, T_v = K_2^T, T_o = K_3^T         K_j = K[:, :, j]
    T_1 = reshape_{r x m r}(K_fc1)^T,  T_2 = reshape_{r x m r}(K_fc2)     (row-major reshape)

exactly as the official code computes them (``FacT/fact_tk.py``; note its row-major reshape
interleaves the fc slices of the core). TK count on ViT-B/16 ``1536 r + 144 r + r³`` (r=16:
30,976; r=32: 86,528).

Defaults from JieShibo/PETL-ViT ``FacT/``: ``set_FacT(dim=8, s=1)`` gives scale 1.0; the rank is
the one its VTAB configs use most (``configs/tt``: 8, ``configs/tk``: 32; the paper's
"FacT-TT≤16" / "FacT-TK≤32"); per-task configs set scale from 0.01 to 100. TT cores use
nn.Linear's default init (not zero), ``V`` is zero, so the model is unchanged at step 0.

Merges exactly (dropout is the identity in eval): each Linear's weight gains
``s · blockdiag_b(V) T blockdiag_a(U)`` (``a``/``b`` = its input/output slices).

Keys: ``vpetl_fact.{u,v}.weight`` (+ TK ``vpetl_fact.{c,p}``) on the model root,
``<attention>.vpetl_fact.{t_q,t_k,t_v}`` and ``<linear>.vpetl_fact.t`` (TT) on the attention
output, fc1 and fc2 Linears. FacT needs one width D in every block; hierarchical models
(Swin, MViT) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import Branch, ProjectionBranch, _add_product_
from ..derived import Derived
from ..errors import InjectionError
from ..options import frozen_set, number, probability, width
from ..registry import Method, register

if TYPE_CHECKING:
    from ..inject import Injection
    from ..projection import OutputSlots, SlotLayout
    from ..record import InjectionRecord

LETTERS = "qkv"
_ALTERNATIVES = "lora, patt, adapter or bapat"


@dataclass(frozen=True)
class _FactBase(Method):
    """Options shared by FacT-TT and FacT-TK: ``rank`` r (``d_bottle``), ``scale`` s, ``dropout``
    on the core output."""

    kind: ClassVar[str] = "fact"
    width_field: ClassVar[str] = "rank"
    mergeable: ClassVar[bool] = True
    tucker: ClassVar[bool] = False

    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        width(self.rank, f"{self.name} rank (d_bottle)")
        frozen_set(self, "scale", number(self.scale, f"{self.name} scale"))
        frozen_set(self, "dropout", probability(self.dropout, f"{self.name} dropout"))

    def attach(self, injection: "Injection") -> None:
        """Shared ``U``/``V`` (and TK's ``C``, ``P``) on the root as ``vpetl_fact``; a
        :class:`FactQkv` on every attention; a :class:`FactLinear` under every attention
        output, fc1 and fc2 Linear, whose class gets :class:`_FactForward`."""
        plan, dim = _plan(injection)
        shared = FactShared(dim, sum(4 + 2 * m for *_, m in plan), self)
        injection.place(shared, injection.model.get_submodule(plan[0][1]).weight)
        injection.add_branch("", "vpetl_fact", shared)
        offset = 0
        for site, proj, fc1, fc2, m in plan:
            injection.add_projection_branch(site, "vpetl_fact", FactQkv(shared, offset, self))
            # (Linear, first slice, input slices, output slices): attention output, fc1, fc2
            for path, start, ins, outs in ((proj, offset + 3, 1, 1), (fc1, offset + 4, 1, m),
                                           (fc2, offset + 4 + m, m, 1)):
                linear = injection.model.get_submodule(path)
                branch = injection.place(FactLinear(shared, linear, start, ins, outs, self), linear.weight)
                injection.add_branch(path, "vpetl_fact", branch)
                injection.derive(path, _FactForward, "_vpetl_fact", branch)
            offset += 4 + 2 * m

    def merge(self, record: "InjectionRecord") -> None:
        """Add each slice's ``s V T U`` to the frozen q/k/v rows and Linear weights."""
        for site in record.sites:
            qkv = site.module._modules.get("vpetl_fact")
            if isinstance(qkv, FactQkv):
                for letter in LETTERS:
                    rows = site.handler.weight_rows(site.module, letter)
                    rows.add_(qkv.delta_weight(letter).to(rows.dtype).view(rows.shape))
        for branch in record.branches.values():
            if isinstance(branch, FactLinear):
                weight = branch.target.weight
                weight.add_(branch.delta_weight().to(weight.dtype))


@register
@dataclass(frozen=True)
class FactTT(_FactBase):
    """FacT-TT: shared ``U``/``V``, per-block cores ``T_q, T_k, T_v, T_o (r x r)``,
    ``T_1 (r -> m r)``, ``T_2 (m r -> r)``; default rank 8, scale 1.0, dropout 0.1."""

    name: ClassVar[str] = "fact_tt"
    paper: ClassVar[str] = "FacT-TT (Jie & Deng, AAAI 2023); JieShibo/PETL-ViT FacT/fact_tt.py"
    formula: ClassVar[str] = "2*D*r + per block (4 + 2m)*r^2 (m = MLP ratio); ViT-B/16: 1536r + 144r^2"

    rank: int = 8


@register
@dataclass(frozen=True)
class FactTK(_FactBase):
    """FacT-TK: shared ``U``/``V``, core ``C (r, r, r)`` and factors ``P (r, S)`` giving every
    slice's core; default rank 32, scale 1.0, dropout 0.1."""

    name: ClassVar[str] = "fact_tk"
    paper: ClassVar[str] = "FacT-TK (Jie & Deng, AAAI 2023); JieShibo/PETL-ViT FacT/fact_tk.py"
    formula: ClassVar[str] = "2*D*r + S*r + r^3, S = (4 + 2m) slices per block; ViT-B/16: 1536r + 144r + r^3"
    tucker: ClassVar[bool] = True

    rank: int = 32


def _plan(injection: "Injection") -> tuple[list[tuple], int]:
    """``(site, proj, fc1, fc2, m)`` per block in model order and the common width ``D``; a
    clear error for a block FacT cannot adapt or for widths that change between blocks."""
    model, plan, widths = injection.model, [], {}
    sites = injection.attention_sites()
    blocks = injection.blocks()
    covered = {b.site.path for b in blocks}
    outside = [s.path or "<root>" for s in sites if s.path not in covered]
    if outside:
        raise InjectionError(f"FacT adapts whole transformer blocks; the attention at {', '.join(outside[:4])} "
                             f"is not in a block list. Use {_ALTERNATIVES}.")
    for block in blocks:
        missing = [role for role in ("attn_proj", "fc1", "fc2") if getattr(block, role) is None]
        if missing:
            raise InjectionError(
                f"FacT adapts q, k, v, the attention output and both MLP Linears of every block; {block.path} "
                f"has no {' / '.join(missing)}. Use {_ALTERNATIVES} on this model."
            )
        spec = injection.projection_spec(block.site, LETTERS, "FacT")
        proj, fc1, fc2 = (model.get_submodule(getattr(block, r)) for r in ("attn_proj", "fc1", "fc2"))
        for role, module in (("attention output", proj), ("fc1", fc1), ("fc2", fc2)):
            if not isinstance(module, nn.Linear):
                raise InjectionError(f"FacT adds into nn.Linear layers; the {role} of {block.path} is a "
                                     f"{type(module).__name__}. Use {_ALTERNATIVES} on this model.")
        dim = spec.d_in
        shapes_ok = (set(spec.widths.values()) == {dim} and proj.in_features == proj.out_features == dim
                     and fc1.in_features == fc2.out_features == dim and fc1.out_features == fc2.in_features
                     and fc1.out_features % dim == 0)
        if not shapes_ok:
            raise InjectionError(
                f"FacT cuts every adapted weight into D x D slices; in {block.path} (D = {dim}) q/k/v widths "
                f"{spec.widths}, attention output {proj.in_features}->{proj.out_features}, MLP "
                f"{fc1.in_features}->{fc1.out_features}->{fc2.out_features} are not D or a multiple of D. "
                f"Use {_ALTERNATIVES} on this model."
            )
        widths.setdefault(dim, []).append(block.path)
        plan.append((block.site, block.attn_proj, block.fc1, block.fc2, fc1.out_features // dim))
    if len(widths) > 1:
        listing = "; ".join(f"{d} ({', '.join(paths[:2])}{', ...' if len(paths) > 2 else ''})"
                            for d, paths in widths.items())
        raise InjectionError(
            f"FacT shares one U (D -> r) and V (r -> D) across all blocks, so it applies to constant-width "
            f"ViTs (timm ViT/DeiT, HF ViT); {type(model).__name__} has blocks of widths {listing}. For "
            f"hierarchical models (Swin, MViT) use {_ALTERNATIVES}."
        )
    return plan, next(iter(widths))


class FactShared(Branch):
    """The model-wide factors: ``u`` (D -> r), ``v`` (r -> D, zeros); TK also ``c (r, r, r)`` and
    ``p (r, S)`` (xavier-uniform). Registered once, on the model root."""

    kind = "fact"

    def __init__(self, dim: int, slices: int, config: _FactBase):
        super().__init__()
        r = config.rank
        self.u = nn.Linear(dim, r, bias=False)
        self.v = nn.Linear(r, dim, bias=False)
        nn.init.zeros_(self.v.weight)
        if config.tucker:
            self.c = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, r, r)))
            self.p = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, slices)))

    def down(self, x: Tensor) -> Tensor:
        """``U x``: ``(..., D)`` -> ``(..., r)``."""
        self._mark_called()
        return self.u(self._input(x, self.u.weight))

    def tucker_cores(self, start: int, count: int) -> Tensor:
        """``K = C P[:, start:start+count]``, ``(r, r, count)``."""
        return torch.matmul(self.c, self.p[:, start:start + count])


def _core(shape: tuple[int, int]) -> nn.Parameter:
    """A TT core in nn.Linear weight layout with nn.Linear's default init (as the official cores)."""
    weight = torch.empty(shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)


class FactQkv(ProjectionBranch):
    """Adds ``s V dp(T_c U x)`` into the q, k and v slots of an attention's projection(s).

    TT: cores ``t_q``, ``t_k``, ``t_v`` ``(r, r)``; TK: slices ``offset + 0..2`` of the shared core.
    """

    kind = "fact"
    scriptable = False

    def __init__(self, shared: FactShared, offset: int, config: _FactBase):
        super().__init__()
        self.positions = LETTERS
        self.scale, self.dropout, self.offset, self.tucker = config.scale, config.dropout, offset, config.tucker
        self._shared = (shared,)  # a reference, not a submodule: its keys live on the root only
        if not config.tucker:
            for c in LETTERS:
                self.register_parameter(f"t_{c}", _core((config.rank, config.rank)))

    @property
    def shared(self) -> FactShared:
        return self._shared[0]

    def core(self, letter: str) -> Tensor:
        """``T`` of slot ``letter`` in nn.Linear weight layout ``(r, r)``."""
        if self.tucker:
            return self.shared.tucker_cores(self.offset + LETTERS.index(letter), 1)[:, :, 0].t()
        return getattr(self, f"t_{letter}")

    def _hidden(self, u: Tensor, letter: str) -> Tensor:
        core = self.core(letter)
        return F.dropout(F.linear(u, core.to(u.dtype)), self.dropout, self.training)

    def add_into_(self, x: Tensor, x2d: Tensor, out: "OutputSlots") -> None:
        self._mark_called()
        u = self.shared.down(x2d)
        for c in LETTERS:
            if c in out.letters:
                _add_product_(out.view(c), self._hidden(u, c), self.shared.v.weight.t(), self.scale)

    def plain_delta(self, x: Tensor, layout: "SlotLayout", out_features: int) -> Tensor:
        """``s Σ_c V dp(T_c U x)`` at slot ``c``'s columns, out of place."""
        self._mark_called()
        u = self.shared.down(x)
        letters = [c for c in LETTERS if c in layout.letters]
        hidden = torch.cat([self._hidden(u, c) for c in letters], -1)
        rank = (self.shared.u.out_features,)
        up = torch.cat([layout.scatter_rows({c: self.shared.v.weight}, out_features, rank) for c in letters], 1)
        return F.linear(hidden, up.to(hidden.dtype)) * self.scale

    def delta_weight(self, letter: str) -> Tensor:
        """``s V T_c U``, ``(D, D)``: what merging adds to slot ``letter``'s weight rows."""
        shared = self.shared
        return (shared.v.weight @ self.core(letter) @ shared.u.weight) * self.scale

    def extra_repr(self) -> str:
        return f"{'tk' if self.tucker else 'tt'}, offset={self.offset}, scale={self.scale}, dropout={self.dropout}"


class FactLinear(Branch):
    """The FacT delta of one Linear with ``ins`` input and ``outs`` output D-slices (attention
    output 1/1, fc1 1/m, fc2 m/1): ``s flatten(V unflatten(dp(T flatten(U unflatten(x)))))``.

    TT: core ``t`` ``(outs r, ins r)``; TK: slices ``start .. start + max(ins, outs) - 1``.
    """

    kind = "fact"

    def __init__(self, shared: FactShared, target: nn.Linear, start: int, ins: int, outs: int, config: _FactBase):
        super().__init__()
        self.scale, self.dropout, self.tucker = config.scale, config.dropout, config.tucker
        self.start, self.ins, self.outs = start, ins, outs
        self._shared, self._target = (shared,), (target,)  # references, not submodules
        if not config.tucker:
            self.t = _core((outs * config.rank, ins * config.rank))

    @property
    def shared(self) -> FactShared:
        return self._shared[0]

    @property
    def target(self) -> nn.Linear:
        """The Linear whose output this branch adds to (and whose weight ``merge`` changes)."""
        return self._target[0]

    def core(self) -> Tensor:
        """``T`` in nn.Linear weight layout ``(outs r, ins r)``."""
        if not self.tucker:
            return self.t
        k = self.shared.tucker_cores(self.start, max(self.ins, self.outs))
        if self.ins == self.outs == 1:
            return k[:, :, 0].t()
        flat = k.reshape(k.shape[0], -1)  # (r, m r), row-major over (j, slice) as the official code
        return flat.t() if self.outs > 1 else flat

    def forward(self, x: Tensor) -> Tensor:
        """The delta added to the Linear's output, ``(..., outs D)``, from its input ``x``."""
        self._mark_called()
        shared = self.shared
        u = shared.down(x) if self.ins == 1 else shared.down(x.unflatten(-1, (self.ins, -1))).flatten(-2)
        h = F.dropout(F.linear(u, self.core().to(u.dtype)), self.dropout, self.training)
        if self.outs > 1:
            return shared.v(h.unflatten(-1, (self.outs, -1))).flatten(-2) * self.scale
        return shared.v(h) * self.scale

    def delta_weight(self) -> Tensor:
        """``s blockdiag_outs(V) T blockdiag_ins(U)``, the target weight's exact change."""
        shared = self.shared
        v = torch.block_diag(*[shared.v.weight] * self.outs)
        u = torch.block_diag(*[shared.u.weight] * self.ins)
        return (v @ self.core() @ u) * self.scale

    def extra_repr(self) -> str:
        kind = "tk" if self.tucker else "tt"
        return f"{kind}, slices {self.ins}->{self.outs}, start={self.start}, scale={self.scale}, dropout={self.dropout}"


class _FactForward(Derived):
    """``Linear.forward(x) + FacT delta(x)`` (the branch in ``self._vpetl_fact[0]``)."""

    class_prefix = "VpetlFact"

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out + self._vpetl_fact[0](x).to(out.dtype)
