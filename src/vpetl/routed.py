"""The branches of a model carrying several tasks: each adds only into its own samples' rows.

Wired by :func:`vpetl.multitask.wire_tasks`; every routed branch reads the batch's routing
(:class:`vpetl.routing.Routing`) from the model's :class:`~vpetl.routing.TaskSet`.

How a task's rows are reached, cheapest first:

* the whole batch is one task: the task's own branch, unchanged;
* the task's samples are consecutive: a slice, so the branch adds in place into a view of the
  projection output (no gather, no buffer);
* otherwise its rows are gathered (``index_select``), the branch runs on them alone, and its
  result is added back with one ``index_add_`` of whole output rows (for PATT, one GEMM gives
  those rows directly, zeros in the q slot: no zero-filled buffer).

:class:`RoutedPatt` holds the PATT branches of every task at one projection; with
``kernel="triton"`` it computes the whole projection, base and every task's branch, in the two
launches of :mod:`vpetl.kernels.grouped_triton` (each row tile reads its task's weights).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .branches import Branch, ProjectionBranch
from .derived import Derived
from .errors import InjectionError
from .methods.patt import PattBranch
from .options import Kernel
from .projection import OutputSlots, SlotLayout, slot_map
from .routing import Routing, TaskSet

TASKS_ATTR = "_vpetl_tasks"
WHERE = "a q/k/v projection"


def _add_biases(branch: ProjectionBranch, out: OutputSlots) -> None:
    """The constant part of ``branch`` (normally folded into the projection's bias) on ``out``."""
    for letter in out.letters:
        term = branch.bias_for(letter)
        if term is not None:
            view = out.view(letter)
            view.add_(term.to(view.dtype).view(view.shape[1:]))


def _add_on_span(branch: ProjectionBranch, x: Tensor, x2d: Tensor, out: OutputSlots, span: slice) -> None:
    """``branch`` added in place into rows ``span`` of ``out`` (a view: nothing copied). The
    whole batch passes the projection's own input ``x``, which a PATT branch shared by separate
    k and v Linears recognises to compute its hidden once."""
    if span.start == 0 and span.stop == x2d.shape[0]:
        branch.add_into_(x, x2d, out)
        _add_biases(branch, out)
        return
    sub_x, sub = x2d[span], OutputSlots(out.out2d[span], out.layout)
    branch.add_into_(sub_x, sub_x, sub)
    _add_biases(branch, sub)


class RoutedProjection(ProjectionBranch):
    """Task ``task``'s projection branch, applied to its samples' rows only (module docs): LoRA,
    and a PATT branch that no :class:`RoutedPatt` groups (a learned scale)."""

    scriptable = False

    def __init__(self, inner: ProjectionBranch, task: str, taskset: TaskSet) -> None:
        super().__init__()
        self.positions = inner.positions
        self._inner, self.task, self._taskset = (inner,), task, taskset  # references: no keys here

    def add_into_(self, x: Tensor, x2d: Tensor, out: OutputSlots) -> None:
        inner = self._inner[0]
        routing = self._taskset.active(f"a projection of task {self.task!r}")
        span = routing.span(self.task, x2d.shape[0], WHERE)
        if span is not None:
            if span.stop > span.start:
                _add_on_span(inner, x, x2d, out, span)
            return
        rows = routing.rows(self.task, x2d.shape[0], x2d.device, WHERE)
        sub_x = x2d.index_select(0, rows)
        sub = OutputSlots(out.out2d.new_zeros(rows.numel(), out.out2d.shape[1]), out.layout)
        inner.add_into_(sub_x, sub_x, sub)
        _add_biases(inner, sub)
        out.out2d.index_add_(0, rows, sub.out2d)  # full rows: contiguous, 3x faster than into a slot view

    def plain_delta(self, x: Tensor, layout: Any, out_features: int) -> Tensor:
        raise _not_traceable()


def _not_traceable() -> InjectionError:
    return InjectionError("a model with routed tasks cannot be traced or exported; export one task at a time "
                          "(load its delta into a plain model).")


def _full_width_delta(branch: PattBranch, h: Tensor, out: OutputSlots) -> Tensor:
    """``s (h U^T + b_u)`` as full projection rows ``(M_t, N)``, zero outside the branch's slots
    (``s`` fixed: grouped branches have no learned scale), from one GEMM against the
    up-projection scattered to the output's columns: no zero-filled buffer, and the
    ``index_add_`` back into the output stays contiguous (into a slot view it is 3x slower on CPU)."""
    layout, n_out = out.layout, out.out2d.shape[1]
    letters = [c for c in branch.positions if c in layout.letters]
    up = layout.scatter_rows({c: branch.up.weight[branch._rows[c]] for c in letters}, n_out, (h.shape[1],))
    scale = float(branch.scale)
    if branch.up.bias is None:
        delta = torch.mm(h, up.t().to(h.dtype)).mul_(scale)
    else:
        bias = layout.scatter_rows({c: branch.up.bias[branch._rows[c]] for c in letters}, n_out)
        delta = torch.addmm(bias.to(h.dtype), h, up.t().to(h.dtype), beta=scale, alpha=scale)
    return delta.to(out.out2d.dtype)


class RoutedPatt(ProjectionBranch):
    """The PATT branches of several tasks at one projection (same positions, slot widths and
    activation; ranks may differ). Torch: each task on its own rows (module docs). Triton
    (``kernel="triton"``): :meth:`fused_projection`, the grouped kernels of
    :mod:`vpetl.kernels.grouped_triton` over the stacked weights ``W_d (T, R, d)``,
    ``U (T, P, R)``, padded to the largest rank ``R``."""

    kind = "routed_patt"
    scriptable = False

    def __init__(self, members: dict[str, PattBranch], taskset: TaskSet) -> None:
        super().__init__()
        first = next(iter(members.values()))
        self.positions = first.positions
        self._members = tuple(members.items())  # references: the branches are registered by the wiring
        self._index = {task: i for i, task in enumerate(members)}
        self._taskset = taskset
        self._stack_cache: tuple[tuple, tuple] | None = None
        self._gathered: dict[str, tuple[Tensor, Tensor, int]] = {}

    def _gather(self, task: str, branch: PattBranch, x: Tensor, x2d: Tensor, rows: Tensor) -> Tensor:
        """The rows of ``task`` from ``x2d``. Separate k and v Linears reading the same ``x`` (a
        branch with several consumers) share one gather, so the branch's own cache computes
        the hidden ``h`` once; the gather is dropped after its last consumer."""
        if branch._consumers == 1:
            return x2d.index_select(0, rows)
        cached = self._gathered.pop(task, None)
        if cached is not None and cached[0] is x:
            if cached[2] > 1:
                self._gathered[task] = (x, cached[1], cached[2] - 1)
            return cached[1]
        sub_x = x2d.index_select(0, rows)
        self._gathered[task] = (x, sub_x, branch._consumers - 1)
        return sub_x

    def add_into_(self, x: Tensor, x2d: Tensor, out: OutputSlots) -> None:
        routing = self._taskset.active("a PATT projection")
        total = x2d.shape[0]
        for task, branch in self._members:
            span = routing.span(task, total, WHERE)
            if span is not None:
                if span.stop > span.start:
                    _add_on_span(branch, x, x2d, out, span)
                continue
            rows = routing.rows(task, total, x2d.device, WHERE)
            branch._mark_called()
            sub_x = self._gather(task, branch, x, x2d, rows)
            h = branch.hidden(sub_x, sub_x)
            out.out2d.index_add_(0, rows, _full_width_delta(branch, h, out))

    def fused_projection(self, x2d: Tensor, weight: Tensor, bias: Tensor | None, layout: SlotLayout,
                         kernel: Kernel) -> Tensor | None:
        """``x W^T + b`` with every task's PATT on its rows, ``(M, N)``, from the grouped Triton
        kernels; None where they do not apply (then :meth:`add_into_` runs). Only with
        ``kernel="triton"``: "auto" keeps torch until the kernels are timed on a GPU."""
        device_type = x2d.device.type
        if not kernels.use_triton(kernel, device_type, auto=False):
            return None
        members = [branch for _, branch in self._members]
        if (x2d.shape[0] == 0 or any(b._consumers != 1 or not b.fusable for b in members)
                or not set(self.positions) <= set(layout.letters)
                or kernels.hooked(*[m for b in members for m in (b.down, b.up)])):
            return None
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x2d.dtype
        params = [t for b in members for t in (b.down.weight, b.down.bias, b.up.weight, b.up.bias) if t is not None]
        if not autocast and any(t.dtype != dtype for t in (weight, *params, *([bias] if bias is not None else []))):
            return None
        grouped, single = kernels.grouped_ops(), kernels.triton_ops()
        if (dtype not in grouped.SUPPORTED_DTYPES or max(b.down.weight.shape[0] for b in members) > grouped.MAX_RANK
                or weight.shape[0] % (len(layout.letters) * max(layout.heads, 1))):
            return None
        routing = self._taskset.active("a PATT projection")
        total, device = x2d.shape[0], x2d.device
        runs = routing.runs(self._index, total, WHERE)
        present = {index for index, _, _ in runs if index >= 0}
        if not present:
            return None  # no task of this group in the batch: the plain projection
        seg = routing.memo(("segments", tuple(self._index), total, str(device)),
                           lambda: grouped.segments(runs, len(members), grouped.block_rows(), device))
        for index in present:
            members[index]._mark_called()
        stacked = self._stacked(dtype, device)
        slots = slot_map(single, layout, weight.shape[0], members[0], device)
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            return grouped.grouped_patt_project(x2d.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                                *stacked, slots, seg, members[0].activation.value)

    def _stacked(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """``(W_d, b_d, U, b_u, s)`` of every task stacked and zero-padded to the largest rank
        (differentiable; kept between calls while no gradient is needed and no weight changed)."""
        members = [branch for _, branch in self._members]
        params = [t for b in members for t in (b.down.weight, b.down.bias, b.up.weight, b.up.bias) if t is not None]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = (dtype, device, tuple((id(p), p._version) for p in params))
        if not grad and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        rank = max(b.down.weight.shape[0] for b in members)

        def zeros(size: int) -> Tensor:
            return torch.zeros(size, dtype=dtype, device=device)

        has_bd = any(b.down.bias is not None for b in members)
        has_bu = any(b.up.bias is not None for b in members)
        stacked = (
            torch.stack([F.pad(b.down.weight.to(dtype), (0, 0, 0, rank - b.down.weight.shape[0])) for b in members]),
            torch.stack([zeros(rank) if b.down.bias is None else F.pad(b.down.bias.to(dtype), (0, rank - b.down.bias.shape[0]))
                         for b in members]) if has_bd else None,
            torch.stack([F.pad(b.up.weight.to(dtype), (0, rank - b.up.weight.shape[1])) for b in members]),
            torch.stack([zeros(b.up.weight.shape[0]) if b.up.bias is None else b.up.bias.to(dtype)
                         for b in members]) if has_bu else None,
            torch.tensor([float(b.scale) for b in members], dtype=torch.float32, device=device),
        )
        if not grad:
            self._stack_cache = (key, stacked)
        return stacked

    def plain_delta(self, x: Tensor, layout: Any, out_features: int) -> Tensor:
        raise _not_traceable()


class RoutedAdapters(Branch):
    """The adapters of every task beside one MLP (children by task name), each added to its
    samples' rows of the MLP output."""

    reads_output = False

    def __init__(self, adapters: dict[str, Branch], taskset: TaskSet) -> None:
        super().__init__()
        for name, adapter in adapters.items():
            self.add_module(name, adapter)
        self._taskset = (taskset,)

    def add_to(self, out: Tensor, x: Tensor, kernel: Kernel = Kernel.AUTO) -> Tensor:
        """``out`` with each task's adapter added on its samples' rows (``out``, ``x``: ``(..., d)``).

        In inference the rows are written back into ``out`` itself, the MLP's fresh output (as
        the single-task adapter does); with autograd on, into one copy of it."""
        routing = self._taskset[0].active("an MLP adapter")
        flat_out, flat_x = out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
        total = flat_out.shape[0]
        result = None if torch.is_grad_enabled() else flat_out
        for task, adapter in self.named_children():
            span = routing.span(task, total, "an MLP")
            if span is not None and span.start == 0 and span.stop == total:
                return adapter.add_to(out, x, kernel)
            if span is not None and span.stop == span.start:
                continue
            result = flat_out.clone() if result is None else result  # one copy for all tasks
            if span is not None:
                rows = result[span]  # still the MLP's output there: tasks own disjoint rows
                summed = adapter.add_to(rows, flat_x[span], kernel)
                if summed.data_ptr() != rows.data_ptr():  # not added in place
                    rows.copy_(summed)
                continue
            rows = routing.rows(task, total, out.device, "an MLP")
            summed = adapter.add_to(flat_out.index_select(0, rows), flat_x.index_select(0, rows), kernel)
            result.index_copy_(0, rows, summed.to(result.dtype))
        return out if result is None else result.view(out.shape)


class RoutedHead(Derived):
    """Mixin for the head module: every task's samples go through that task's head (registered
    beside the head as ``vpetl_heads.<task>``), ``None`` and tasks without a head through the
    base head."""

    class_prefix = "Routed"

    def forward(self, x: Tensor) -> Any:
        taskset, heads = self.__dict__[TASKS_ATTR]
        routing: Routing = taskset.active("the head")
        if routing.per_sample is None:
            head = heads[routing.single] if routing.single in heads else None  # noqa: SIM401 (ModuleDict has no .get)
            return super().forward(x) if head is None else head(x)
        batch = len(routing.per_sample)
        if x.shape[0] != batch:
            raise InjectionError(
                f"vpetl.route was given {batch} tasks (one per sample) but the head received {x.shape[0]} rows; "
                "pass one task per sample of the batch."
            )
        outputs: dict[str | None, tuple[Tensor, Tensor]] = {}
        for task in dict.fromkeys(routing.per_sample):
            rows = routing.rows(task, batch, x.device, "the head")
            head = heads[task] if task in heads else None  # noqa: SIM401 (ModuleDict has no .get)
            sub = x.index_select(0, rows)
            outputs[task] = (rows, super().forward(sub) if head is None else head(sub))
        widths = {y.shape[1:] for _, y in outputs.values()}
        if len(widths) == 1:
            first = next(iter(outputs.values()))[1]
            out = first.new_zeros((batch, *first.shape[1:]))
            for rows, y in outputs.values():
                out = out.index_copy(0, rows, y)
            return out
        per_sample: list[Tensor | None] = [None] * batch
        for rows, y in outputs.values():
            for j, i in enumerate(rows.tolist()):
                per_sample[i] = y[j]
        return per_sample


def routed_projection_branches(by_task: dict[str, ProjectionBranch], taskset: TaskSet) -> list[ProjectionBranch]:
    """The routed branches of one projection, from each task's branch there: the PATT branches
    that can share a grouped kernel (same positions, slot widths, activation; fixed scale, the
    ``add`` variant) become one :class:`RoutedPatt` per such group, first in the list; every
    other branch becomes a :class:`RoutedProjection`."""
    groups: dict[tuple, dict[str, PattBranch]] = {}
    others: list[ProjectionBranch] = []
    for task, branch in by_task.items():
        if isinstance(branch, PattBranch) and branch.fusable:
            key = (branch.positions, tuple((c, s.stop - s.start) for c, s in branch._rows.items()),
                   branch.activation, branch._consumers)
            groups.setdefault(key, {})[task] = branch
        else:
            others.append(RoutedProjection(branch, task, taskset))
    return [RoutedPatt(members, taskset) for members in groups.values()] + others


__all__ = ["RoutedAdapters", "RoutedHead", "RoutedPatt", "RoutedProjection", "TASKS_ATTR",
           "routed_projection_branches"]
