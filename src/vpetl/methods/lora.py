"""LoRA (Hu et al. 2022): a low-rank update beside frozen Linears, on the attention's q/k/v
projections (one pair per position) and, optionally, on the attention output ``proj`` and the
MLP's ``fc1`` / ``fc2``::

    slot p of q/k/v:  Q = x W_q^T + b_q + s_q (x A_q^T) B_q^T       A_q: (r_q, d_in)  B_q: (w, r_q)
    a whole Linear:   y = x W^T + b + s_t (x A^T) B^T                A: (r_t, in)      B: (out, r_t)

``A`` Kaiming-uniform (a = sqrt 5), ``B`` zero (the model is unchanged at step 0), no bias.

Scaling. ``scale`` is the multiplier at rank ``rank`` (LoRA's ``alpha / rank``, 1.0 by
default), so ``alpha = scale * rank``. A target given its own rank ``r_t`` (``ranks``) uses
``s_t = alpha / r_t``; with ``rslora=True`` (rank-stabilised LoRA, Kalajdzievski 2023) every
target uses ``s_t = alpha / sqrt(r_t)``. Without ``ranks`` and ``rslora`` every ``s_t`` is
``scale`` itself, exactly as in vpetl 0.1.0.

Where the parameters live: the q/k/v pairs are ``<attention>.vpetl_lora.<q|k|v>.{down,up}.weight``
(vpetl 0.1.0's keys, added into the projection's slots by :mod:`vpetl.projection`); a whole
Linear's pair is ``<linear>.vpetl_lora.{down,up}.weight``, and the Linear gets a derived class
(:mod:`vpetl.derived`) whose forward adds the branch and whose ``weight`` reads as
``W + s_t B A`` for code that reads the weight instead of calling the module (torchvision's
window attention and ``nn.MultiheadAttention`` read ``proj.weight`` / ``out_proj.weight``).

Counts: ``sum_p r_p (d_in + w) + sum_t r_t (in_t + out_t)``; ViT-B/16 with r = 4 on q, v, proj,
fc1, fc2: 12 * 4 * (2*1536 + 1536 + 2*3840) = 589,824. Merges exactly: ``W += s B A``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import Branch, ProjectionBranch, _add_product_
from ..derived import Derived
from ..errors import ConfigError, InjectionError, format_names
from ..options import POSITION_LETTERS, flag, frozen_set, normalize_positions, number, width
from ..record import AttrSet
from ..registry import Method, register

if TYPE_CHECKING:
    from ..inject import Injection
    from ..projection import OutputSlots, SlotLayout
    from ..record import InjectionRecord

LINEAR_ROLES = {"proj": "attn_proj", "fc1": "fc1", "fc2": "fc2"}  # target name -> vpetl.blocks.Block field
LORA_ATTR = "_vpetl_lora"  # plain attribute on an adapted Linear: (its LinearLoraBranch,)


@register
@dataclass(frozen=True)
class LoRA(Method):
    """LoRA: ``W x + s B A x`` on the q/k/v ``positions`` (separate pair per position, paper
    layout) and on the whole ``linears`` (any of "proj", "fc1", "fc2"); no bias, ``A``
    Kaiming-uniform, ``B`` zero. ``scale`` is the multiplier at rank ``rank`` (alpha / rank);
    ``ranks`` gives targets their own rank (``{"fc1": 8, "q": 4}``), scaled ``alpha / r_t``, or
    ``alpha / sqrt(r_t)`` with ``rslora`` (see the module docs)."""

    name: ClassVar[str] = "lora"
    kind: ClassVar[str] = "lora"
    paper: ClassVar[str] = "LoRA (Hu et al. 2022); V-PETL Table 3 layout (q and v)"
    formula: ClassVar[str] = "sum over q/k/v positions r_p*(d_in + w) + sum over linears r_t*(in + out)"
    width_field: ClassVar[str] = "rank"
    mergeable: ClassVar[bool] = True

    rank: int = 16
    scale: float = 1.0
    positions: str = "qv"
    linears: tuple[str, ...] = ()
    ranks: tuple[tuple[str, int], ...] = ()
    rslora: bool = False

    def __post_init__(self) -> None:
        width(self.rank, "LoRA rank (d_bottle)")
        frozen_set(self, "scale", number(self.scale, "LoRA scale"))
        frozen_set(self, "linears", normalize_linears(self.linears, tuple(LINEAR_ROLES), "LoRA linears"))
        if self.positions == "" and not self.linears:
            raise ConfigError("LoRA needs a target: q/k/v positions (e.g. 'qv') or linears from 'proj', 'fc1', 'fc2'.")
        if self.positions != "":
            frozen_set(self, "positions", normalize_positions(self.positions, "LoRA positions"))
        frozen_set(self, "ranks", normalize_ranks(self.ranks, (*self.positions, *self.linears), "LoRA ranks"))
        flag(self.rslora, "LoRA rslora")

    def rank_of(self, target: str) -> int:
        """The rank of ``target`` (a position letter or a linear name)."""
        return dict(self.ranks).get(target, self.rank)

    def multiplier(self, target: str) -> float:
        """``s_t``: ``scale`` at rank ``rank``; ``alpha / r_t`` or, with ``rslora``,
        ``alpha / sqrt(r_t)``, where ``alpha = scale * rank``."""
        r = self.rank_of(target)
        if self.rslora:
            return self.scale * self.rank / math.sqrt(r)
        return self.scale if r == self.rank else self.scale * self.rank / r

    def attach(self, injection: Injection) -> None:
        """One :class:`LoraBranch` per attention site (``<attention>.vpetl_lora``) for the
        positions; one :class:`LinearLoraBranch` per chosen Linear (``<linear>.vpetl_lora``)."""
        if self.positions:
            for site in injection.attention_sites():
                spec = injection.projection_spec(site, self.positions, "LoRA")
                branch = LoraBranch(spec.d_in, {c: spec.widths[c] for c in self.positions}, self)
                injection.add_projection_branch(site, "vpetl_lora", branch)
        for path, linear, target in linear_targets(injection, self.linears, "LoRA"):
            branch = LinearLoraBranch(linear.in_features, linear.out_features, self.rank_of(target),
                                      self.multiplier(target))
            injection.add_branch(path, "vpetl_lora", injection.place(branch, linear._parameters["weight"]))
            injection.derive(path, _LoraLinear, LORA_ATTR, branch)

    def merge(self, record: InjectionRecord) -> None:
        """``W_p += s_p B_p A_p`` in the frozen rows of every adapted position, and
        ``W += s_t B A`` in every adapted Linear's weight."""
        for site in record.sites:
            lora = site.module._modules.get("vpetl_lora")
            if isinstance(lora, LoraBranch):
                for letter in lora.positions:
                    rows = site.handler.weight_rows(site.module, letter)
                    rows.add_(lora.delta_weight(letter).to(rows.dtype).view(rows.shape))
        for entry in record.undo_log:
            if isinstance(entry, AttrSet) and entry.name == LORA_ATTR:
                branch = entry.new[0]
                if not branch.merged:
                    raw = entry.obj._parameters["weight"]
                    raw.add_(branch.delta_weight().to(raw.dtype))
                    branch.merged = True  # the Linear now reads (and adds) its raw weight only


class LoraBranch(ProjectionBranch):
    """LoRA with a separate low-rank pair per position (``q`` and ``v`` in the paper).

    Children are named by letter, each with ``down`` (A, ``r x d_in``, Kaiming-uniform) and
    ``up`` (B, ``w x r``, zeros), so keys read ``...vpetl_lora.q.down.weight``. ``scales[p]`` is
    position ``p``'s multiplier; ``scale`` is the common one (all positions share it unless
    ``ranks`` gives them different ranks; such a branch is not TorchScript-able).
    """

    kind = "lora"
    scriptable = True

    def __init__(self, d_in: int, widths: Mapping[str, int], config: LoRA):
        super().__init__()
        self.positions = config.positions
        self.scales = {c: config.multiplier(c) for c in self.positions}
        self.scale = self.scales[self.positions[0]]
        self._uniform = len(set(self.scales.values())) == 1
        if not self._uniform:
            self.scriptable = False  # vpetl.scripting records one scale per branch
        for c in self.positions:
            pair = nn.Module()
            pair.down = nn.Linear(d_in, config.rank_of(c), bias=False)
            pair.up = nn.Linear(config.rank_of(c), widths[c], bias=False)
            nn.init.kaiming_uniform_(pair.down.weight, a=math.sqrt(5))
            nn.init.zeros_(pair.up.weight)
            self.add_module(c, pair)

    def pair(self, letter: str) -> nn.Module:
        return getattr(self, letter)

    def add_into_(self, x: Tensor, x2d: Tensor, out: OutputSlots) -> None:
        self._mark_called()
        for c in self.positions:
            if c in out.letters:
                pair = self.pair(c)
                _add_product_(out.view(c), pair.down(self._input(x2d, pair.down.weight)), pair.up.weight.t(),
                              self.scales[c])

    def plain_delta(self, x: Tensor, layout: SlotLayout, out_features: int) -> Tensor:
        """``sum_p s_p (x A_p^T) B_p^T`` with each ``B_p`` at slot ``p``'s output columns."""
        self._mark_called()
        delta = None
        for c in self.positions:
            if c in layout.letters:
                pair = self.pair(c)
                up = layout.scatter_rows({c: pair.up.weight}, out_features, (pair.down.out_features,))
                term = F.linear(pair.down(self._input(x, pair.down.weight)), up)
                term = term if self._uniform else term * self.scales[c]
                delta = term if delta is None else delta + term
        return delta * self.scale if self._uniform else delta

    def delta_weight(self, letter: str) -> Tensor:
        """``s_p B A``, ``(w, d_in)``: what merging adds to the frozen weight's rows."""
        pair = self.pair(letter)
        return (pair.up.weight @ pair.down.weight) * self.scales[letter]

    def extra_repr(self) -> str:
        scales = f"scale={self.scale}" if self._uniform else f"scales={self.scales}"
        return f"positions={self.positions!r}, {scales}"


class LinearLoraBranch(Branch):
    """LoRA beside one whole Linear: ``s (x A^T) B^T``; ``down`` (A, ``r x in``) Kaiming-uniform,
    ``up`` (B, ``out x r``) zero; keys ``<linear>.vpetl_lora.{down,up}.weight``."""

    kind = "lora"

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = scale
        self.merged = False  # set by LoRA.merge: the Linear's raw weight holds W + s B A

    def delta(self, x: Tensor) -> Tensor:
        """``s (x A^T) B^T``, ``(..., out)``."""
        self._mark_called()
        return self.up(self.down(self._input(x, self.down.weight))) * self.scale

    def delta_weight(self) -> Tensor:
        """``s B A``, ``(out, in)``."""
        return (self.up.weight @ self.down.weight) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.down.out_features}, scale={self.scale}"


class _LoraLinear(Derived):
    """Mixin for an adapted Linear: ``forward`` is ``x W^T + b + s (x A^T) B^T``; ``weight``
    reads as ``W + s B A`` (the raw Parameter stays in ``_parameters``: keys unchanged). ``W``
    is the weight the classes behind this mixin give (the raw Parameter, or another method's
    effective weight, e.g. SSF's, when that method adapted the Linear first)."""

    class_prefix = "VpetlLora"

    @property
    def weight(self) -> Tensor:
        branch: LinearLoraBranch = self.__dict__[LORA_ATTR][0]
        inner = inner_weight(self, _LoraLinear)
        if branch.merged:
            return inner
        branch._mark_called()
        return inner + branch.delta_weight().to(inner.dtype)

    def forward(self, x: Tensor) -> Tensor:
        branch: LinearLoraBranch = self.__dict__[LORA_ATTR][0]
        if type(self).weight is not _LORA_WEIGHT:  # a method derived later reads our weight: use it whole
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, inner_weight(self, _LoraLinear), self.bias)
        return out if branch.merged else out + branch.delta(x).to(out.dtype)


_LORA_WEIGHT = vars(_LoraLinear)["weight"]


def inner_weight(module: nn.Module, mixin: type, name: str = "weight") -> Tensor:
    """``module.<name>`` as the classes after ``mixin`` in its class's MRO define it (another
    method's effective weight, e.g. SSF's), or the raw Parameter."""
    mro = type(module).__mro__
    for klass in mro[mro.index(mixin) + 1:]:
        found = vars(klass).get(name)
        if found is not None and hasattr(found, "__get__"):
            return found.__get__(module, type(module))
    return module._parameters[name]


def linear_targets(injection: Injection, names: Iterable[str], method: str) -> list[tuple[str, nn.Linear, str]]:
    """``(path, Linear, name)`` of every block's chosen ``names`` (see :data:`LINEAR_ROLES`), in
    block order; an error (a warning with ``strict=False``) for blocks that lack one."""
    names = tuple(names)
    if not names:
        return []
    out: list[tuple[str, nn.Linear, str]] = []
    missing, seen = [], set()
    for block in injection.blocks():
        for name in names:
            path = getattr(block, LINEAR_ROLES[name])
            if path is None:
                missing.append(f"{block.path or '<root>'} ({name})")
                continue
            module = injection.model.get_submodule(path)
            if not isinstance(module, nn.Linear):
                raise InjectionError(
                    f"{method} adapts nn.Linear layers; the {name} of block {block.path or '<root>'} is {path} "
                    f"({type(module).__name__}). Leave {name!r} out of linears for this model."
                )
            if path not in seen:
                seen.add(path)
                out.append((path, module, name))
    if missing:
        message = (
            f"{method} found no Linear for {len(missing)} target(s): {format_names(missing, 8)}. 'proj' is the "
            "attention's output Linear (proj/out_proj/o_proj/output.dense), 'fc1'/'fc2' the MLP's first and last "
            "Linear. Leave them out of linears, or pass strict=False to skip these blocks."
        )
        if injection.strict or not out:
            raise InjectionError(message)
        warnings.warn(message, stacklevel=4)
    return out


def normalize_linears(value: Any, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    """Names from ``allowed``, each once, as a tuple in ``allowed``'s order; accepts a list/tuple
    of names or one string (``"fc1"``, or several separated by commas/spaces: ``"proj,fc1"``)."""
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, Iterable) or isinstance(value, (bytes, Mapping)):
        raise ConfigError(f"{name} must be a list of names from {list(allowed)}; got {value!r}.")
    names = list(value)
    bad = [v for v in names if not isinstance(v, str) or v not in allowed]
    if bad or len(set(names)) != len(names):
        why = f"unknown {bad}" if bad else "a name repeats"
        raise ConfigError(f"{name} must be names from {list(allowed)}, each at most once; got {value!r} ({why}).")
    return tuple(n for n in allowed if n in names)


def normalize_ranks(value: Any, targets: tuple[str, ...], name: str) -> tuple[tuple[str, int], ...]:
    """Per-target ranks as a sorted tuple of ``(target, rank)`` pairs; accepts a mapping
    (``{"fc1": 8}``) or pairs (``[["fc1", 8]]``, the delta file's JSON). Every target must be
    one of ``targets`` (the chosen positions and linears), every rank a positive integer."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        pairs = [tuple(p) if isinstance(p, (list, tuple)) else p for p in value]
    else:
        pairs = None
    if pairs is None or any(not isinstance(p, tuple) or len(p) != 2 for p in pairs):
        raise ConfigError(f"{name} must map targets to ranks, e.g. {{'fc1': 8, 'q': 4}}; got {value!r}.")
    keys = [k for k, _ in pairs]
    unknown = [k for k in keys if k not in targets]
    if unknown or len(set(keys)) != len(keys):
        why = f"{unknown} are not among the chosen targets {list(targets)}" if unknown else "a target repeats"
        raise ConfigError(
            f"{name}: {why}. Give ranks only for chosen positions (letters of {POSITION_LETTERS!r}) or linears; "
            f"got {value!r}."
        )
    return tuple(sorted((k, width(r, f"{name}[{k!r}]")) for k, r in pairs))


LoraConfig = LoRA  # the name before vpetl 0.2
