"""Many tasks on one frozen backbone: deltas loaded side by side, every sample routed to its own.

``vpetl.load_delta(model, path, task="digits")`` adds a delta as a named task; each further
named load adds its branches and its head beside the ones already there. Inside
``with vpetl.route(model, tasks):`` one forward computes every sample with its own task's
branches and head::

    with vpetl.route(model, ["digits", "fashion", None, "digits"]):   # one entry per sample
        outputs = model(images)                                          # (4, C) or a list of 4

How a mixed batch is computed. The base runs once for the whole batch. At every adapted
projection and MLP, a routed branch of task ``t`` gathers the rows of its samples
(``x2d[rows_t]``, ``(M_t, d)``), computes its delta on them alone and adds it back with one
``index_add_`` (``out[rows_t] += delta_t``): one gathered product per task and branch, never a
loop over samples. A sample's rows are found from the batch size ``B``: a projection input of
``M`` rows holds ``M / B`` consecutive rows per sample (tokens, or windows x tokens for window
attention). The heads run the same way, one per task on its samples' features; the output is a
tensor when every routed head has the same width, otherwise a list with one tensor per sample.
``None`` routes a sample through the plain base (its own head).

What can be routed: the branch methods whose branches only add to a projection's slots or to an
MLP's output -- PATT (variant ``add``), LoRA on q/k/v, the adapter (``bapat`` included) -- and a
trained head. Methods that change the base's own computation (SSF, DoRA, RepAdapter, tuning
base parameters), add keys or tokens (prefix, VPT) or need whole sequences cannot share one
batch with other tasks and are refused with the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .branches import Branch, ProjectionBranch
from .config import InjectConfig
from .derived import Derived, derived_class
from .errors import ConfigError, InjectionError
from .methods.adapter import Adapter
from .methods.lora import LoRA
from .methods.patt import PATT, PattVariant
from .options import Kernel
from .projection import OutputSlots
from .record import InjectionRecord, get_record

TASKS_ATTR = "_vpetl_tasks"
HEADS_NAME = "vpetl_heads"


@dataclass
class Task:
    """One loaded task: its config, its branch modules by their single-task paths, its head (a
    copy of the base's head module holding the task's weights, or None: the base head), the
    parameters of its delta file by their names there, and the file's base fingerprint."""

    name: str
    config: InjectConfig
    branches: dict[str, Branch]
    head: nn.Module | None
    params: dict[str, nn.Parameter]
    metadata: dict[str, str]


@dataclass
class Routing:
    """The task of every sample of the batch being run (``None``: the plain base), or one task
    for the whole batch (``single``)."""

    single: str | None = None
    per_sample: tuple[str | None, ...] | None = None
    _rows: dict[tuple[str | None, int, str], Tensor] = field(default_factory=dict)

    def rows(self, task: str | None, total: int, device: torch.device, where: str) -> Tensor | None:
        """Indices of the rows of ``task``'s samples among ``total`` rows, ``(M_t,)`` int64; None
        means every row (the whole batch is this task)."""
        if self.per_sample is None:
            return None if self.single == task else _EMPTY.to(device)
        batch = len(self.per_sample)
        if total % batch:
            raise InjectionError(
                f"vpetl.route was given {batch} tasks (one per sample), but {where} sees {total} rows, which is "
                f"not a multiple of {batch}: vpetl cannot find the batch dimension. Pass as many tasks as the "
                "batch has samples (the first dimension of the input)."
            )
        key = (task, total, str(device))
        if key not in self._rows:
            per = total // batch
            samples = torch.tensor([i for i, t in enumerate(self.per_sample) if t == task], dtype=torch.int64)
            self._rows[key] = (samples[:, None] * per + torch.arange(per)).reshape(-1).to(device)
        return self._rows[key]


_EMPTY = torch.empty(0, dtype=torch.int64)


@dataclass
class TaskSet:
    """The tasks of a model (in load order) and the routing of the forward being run."""

    tasks: dict[str, Task] = field(default_factory=dict)
    routing: Routing | None = None

    def active(self, where: str) -> Routing:
        if self.routing is None:
            raise InjectionError(
                f"this model carries the tasks {list(self.tasks)}; run it inside `with vpetl.route(model, tasks):` "
                f"(one task name for the batch, one per sample, or None for the plain base). Reached at {where}."
            )
        return self.routing


# --------------------------------------------------------------------------- routed branches


class RoutedProjection(ProjectionBranch):
    """Task ``task``'s projection branch, applied to its samples' rows only (module docs)."""

    scriptable = False

    def __init__(self, inner: ProjectionBranch, task: str, taskset: TaskSet) -> None:
        super().__init__()
        self.positions = inner.positions
        self._inner, self.task, self._taskset = (inner,), task, taskset  # references: no keys here

    def add_into_(self, x: Tensor, x2d: Tensor, out: OutputSlots) -> None:
        inner = self._inner[0]
        rows = self._taskset.active(f"a projection of task {self.task!r}").rows(
            self.task, x2d.shape[0], x2d.device, "a q/k/v projection")
        if rows is None:
            inner.add_into_(x, x2d, out)
            _add_biases(inner, out)
            return
        if rows.numel() == 0:
            return
        sub_x = x2d.index_select(0, rows)
        sub = OutputSlots(out.out2d.new_zeros(rows.numel(), out.out2d.shape[1]), out.layout)
        inner.add_into_(sub_x, sub_x, sub)
        _add_biases(inner, sub)
        out.out2d.index_add_(0, rows, sub.out2d)

    def plain_delta(self, x: Tensor, layout: Any, out_features: int) -> Tensor:
        raise InjectionError("a model with routed tasks cannot be traced or exported; export one task at a time "
                             "(load its delta into a plain model).")


def _add_biases(branch: ProjectionBranch, out: OutputSlots) -> None:
    """The constant part of ``branch`` (normally folded into the projection's bias) on ``out``."""
    for letter in out.letters:
        term = branch.bias_for(letter)
        if term is not None:
            view = out.view(letter)
            view.add_(term.to(view.dtype).view(view.shape[1:]))


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
        """``out`` with each task's adapter added on its samples' rows (``out``, ``x``: ``(..., d)``)."""
        routing = self._taskset[0].active("an MLP adapter")
        flat_out, flat_x = out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
        result = None
        for task, adapter in self.named_children():
            rows = routing.rows(task, flat_out.shape[0], out.device, "an MLP")
            if rows is None:
                return adapter.add_to(out, x, kernel)
            if rows.numel():
                summed = adapter.add_to(flat_out.index_select(0, rows), flat_x.index_select(0, rows), kernel)
                result = flat_out.clone() if result is None else result  # one copy for all tasks
                result.index_copy_(0, rows, summed.to(result.dtype))
        return out if result is None else result.view(out.shape)


class RoutedHead(Derived):
    """Mixin for the head module: every task's samples go through that task's head (registered
    beside the head as ``vpetl_heads.<task>``), ``None`` and tasks without a head through the
    base head."""

    class_prefix = "Routed"

    def forward(self, x: Tensor) -> Any:
        taskset, heads = self.__dict__[TASKS_ATTR]
        routing = taskset.active("the head")
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


# --------------------------------------------------------------------------- what can be routed


def check_routable(config: InjectConfig, origin: str) -> None:
    """Raise for a config whose branches cannot share a batch with other tasks."""
    for entry in config.methods:
        ok = (
            isinstance(entry, PATT) and entry.variant is PattVariant.ADD
            or isinstance(entry, LoRA) and not entry.linears
            or isinstance(entry, Adapter)
        )
        if not ok:
            raise ConfigError(
                f"{origin} uses {entry.describe()}, which cannot be routed per sample beside other tasks: only "
                "branches that add to the q/k/v projections or beside the MLP can (PATT with variant 'add', "
                "LoRA on q/k/v, the adapter, and bapat), with a trained head. Load it into its own model "
                "instead (vpetl.load_delta without task=)."
            )


# --------------------------------------------------------------------------- wiring


def wire_tasks(model: nn.Module, taskset: TaskSet) -> InjectionRecord:
    """Register every task's branches and heads on the plain ``model`` and route them; the
    returned record undoes it all (``vpetl.unload``)."""
    from .handlers.sites import find_attention
    from .heads import find_head_paths
    from .inject import Injection

    record = InjectionRecord(InjectConfig(method="tasks"))
    record.tasks = taskset
    injection = Injection(model, record.config, record, strict=True)
    sites = {s.path: s for s in find_attention(model)[0]}
    projection: dict[str, list[ProjectionBranch]] = {}
    containers: dict[tuple[str, str], nn.ModuleDict] = {}
    adapters: dict[str, dict[str, Branch]] = {}
    for task in taskset.tasks.values():
        for path, branch in task.branches.items():
            parent, _, name = path.rpartition(".")
            if isinstance(branch, ProjectionBranch):
                containers.setdefault((parent, name), nn.ModuleDict())[task.name] = branch
                projection.setdefault(parent, []).append(RoutedProjection(branch, task.name, taskset))
            else:
                adapters.setdefault(parent, {})[task.name] = branch
    mlp_sites = {s.path: s for s in injection.mlp_sites()} if adapters else {}  # before any wiring
    for (parent, name), container in containers.items():
        record.add_module(model.get_submodule(parent), name, container)
        for task_name, branch in container.items():
            record.branches[f"{parent}.{name}.{task_name}" if parent else f"{name}.{task_name}"] = branch
    for path, branches in projection.items():
        site = sites[path]
        site.handler.wire(site.module, branches, record)
        record.sites.append(site)
    for path, by_task in adapters.items():
        mlp_sites[path].wire(RoutedAdapters(by_task, taskset), record)
        for task_name, adapter in by_task.items():
            record.branches[f"{path}.vpetl_adapter.{task_name}" if path else f"vpetl_adapter.{task_name}"] = adapter
    heads = {t.name: t.head for t in taskset.tasks.values() if t.head is not None}
    head_paths = find_head_paths(model)
    if heads and head_paths:
        # beside the head, not inside it: a Sequential head would run an added child
        parent, _, _ = head_paths[0].rpartition(".")
        container = nn.ModuleDict(heads)
        record.add_module(model.get_submodule(parent), HEADS_NAME, container)
        head = model.get_submodule(head_paths[0])
        record.set_attr(head, TASKS_ATTR, (taskset, container))
        record.swap_class(head, derived_class(RoutedHead, type(head)))
    record.remember_requires_grad(model)
    record.head_paths = head_paths
    trained = {id(p) for t in taskset.tasks.values() for p in t.params.values()}
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in trained)
        if id(param) in trained:
            names.append(name)
    record.delta_names = tuple(names)
    return record


def extract_task(model: nn.Module, name: str, config: InjectConfig, tensors: dict[str, Tensor],
                 metadata: dict[str, str]) -> Task:
    """Build task ``name`` on the plain ``model``: inject its config, take its branch modules
    out again, copy ``tensors`` into them and into a copy of the head; the model is left plain."""
    from .heads import find_head_paths
    from .inject import inject
    from .record import set_record

    head_paths = find_head_paths(model)
    head_prefix = head_paths[0] + "." if head_paths else None
    inject(model, config)
    record = get_record(model)
    try:
        named = dict(model.named_parameters())
        branch_names = [n for n in record.delta_names if not (head_prefix and n.startswith(head_prefix))]
        head_names = [n for n in tensors if head_prefix and n.startswith(head_prefix)]
        expected = set(branch_names) | set(head_names)
        missing = sorted(set(branch_names) - set(tensors))
        unexpected = sorted(set(tensors) - expected)
        if missing or unexpected:
            raise InjectionError(
                f"task {name!r}: the delta's tensors do not match its config: missing {missing[:6]}, "
                f"unexpected {unexpected[:6]}."
            )
        params: dict[str, nn.Parameter] = {}
        with torch.no_grad():
            for n in branch_names:
                if named[n].shape != tensors[n].shape:
                    raise InjectionError(f"task {name!r}: {n} has shape {tuple(tensors[n].shape)} in the delta, "
                                         f"{tuple(named[n].shape)} in this model.")
                named[n].copy_(tensors[n])
                params[n] = named[n]
        head = None
        if head_names:
            head = copy.deepcopy(model.get_submodule(head_paths[0]))
            for n in head_names:
                local = n[len(head_prefix):]
                owner, _, leaf = local.rpartition(".")
                module = head.get_submodule(owner)
                like = module._parameters[leaf]
                # a copy: the file's tensors are memory-mapped, and the task must not keep the file mapped
                value = tensors[n].to(device=like.device, dtype=like.dtype, copy=True)
                module._parameters[leaf] = nn.Parameter(value, requires_grad=True)
                params[n] = module._parameters[leaf]
                if isinstance(module, nn.Linear):
                    module.out_features = module.weight.shape[0]
        branches = dict(record.branches)
    finally:
        record.undo(model)
        set_record(model, None)
    return Task(name, config, branches, head, params, metadata)


# --------------------------------------------------------------------------- public API


def tasks(model: nn.Module) -> list[str]:
    """The names of the tasks loaded into ``model`` (``load_delta(..., task=)``), in load order."""
    record = get_record(model)
    taskset = getattr(record, "tasks", None) if record is not None else None
    return list(taskset.tasks) if taskset is not None else []


@contextmanager
def route(model: nn.Module, tasks: str | None | Sequence[str | None]) -> Iterator[nn.Module]:
    """Run ``model`` with every sample routed to its task (module docs): ``tasks`` is one name for
    the whole batch, ``None`` for the plain base, or a sequence with one name (or None) per sample."""
    record = get_record(model)
    taskset = getattr(record, "tasks", None) if record is not None else None
    if taskset is None:
        raise InjectionError(
            f"this {type(model).__name__} has no tasks; load deltas with vpetl.load_delta(model, path, task='name') first."
        )
    known = list(taskset.tasks)
    if tasks is None or isinstance(tasks, str):
        names: tuple[str | None, ...] = (tasks,)
        routing = Routing(single=tasks)
    else:
        try:
            names = tuple(tasks)
        except TypeError:
            raise ConfigError(f"tasks must be a task name, None, or a sequence of them (one per sample); got "
                              f"{type(tasks).__name__}.") from None
        if not names:
            raise ConfigError("tasks is an empty sequence; give one task name (or None) per sample.")
        routing = Routing(per_sample=names)
    unknown = sorted({n for n in names if n is not None and n not in taskset.tasks}, key=str)
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad or unknown:
        raise ConfigError(f"unknown task(s) {bad or unknown}; this model has {known} (or None for the plain base).")
    if taskset.routing is not None:
        raise InjectionError("vpetl.route(model, ...) is already active for this model; nesting it is not supported.")
    taskset.routing = routing
    try:
        yield model
    finally:
        taskset.routing = None
