"""Many tasks on one frozen backbone: deltas loaded side by side, every sample routed to its own.

``vpetl.load_delta(model, path, task="digits")`` adds a delta as a named task; each further
named load adds its branches and its head beside the ones already there. Inside
``with vpetl.route(model, tasks):`` one forward computes every sample with its own task's
branches and head::

    with vpetl.route(model, ["digits", "fashion", None, "digits"]):   # one entry per sample
        outputs = model(images)                                          # (4, C) or a list of 4

How a mixed batch is computed. The base runs once for the whole batch. At every adapted
projection and MLP, each task's branch adds into its own samples' rows only: in place on a
slice when those samples are consecutive, otherwise gathered (``x2d[rows_t]``, ``(M_t, d)``) and
added back with one ``index_add_`` into the slots it writes -- one product per task and branch,
never a loop over samples (:mod:`vpetl.routed`); with ``kernel="triton"`` the PATT branches of
all tasks at a projection run as one grouped kernel (:mod:`vpetl.kernels.grouped_triton`). A
sample's rows are found from the batch size ``B``: a projection input of ``M`` rows holds
``M / B`` consecutive rows per sample (tokens, or windows x tokens for window attention,
:mod:`vpetl.routing`). The heads run per task on their samples' features; the output is a
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

import torch
from torch import Tensor, nn

from .branches import Branch, ProjectionBranch
from .config import InjectConfig
from .derived import derived_class
from .errors import ConfigError, InjectionError
from .methods.adapter import Adapter
from .methods.lora import LoRA
from .methods.patt import PATT, PattVariant
from .record import InjectionRecord, get_record
from .routed import TASKS_ATTR, RoutedAdapters, RoutedHead, routed_projection_branches
from .routing import Routing, Task, TaskSet

HEADS_NAME = "vpetl_heads"


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
    projection: dict[str, dict[str, ProjectionBranch]] = {}
    containers: dict[tuple[str, str], nn.ModuleDict] = {}
    adapters: dict[str, dict[str, Branch]] = {}
    for task in taskset.tasks.values():
        for path, branch in task.branches.items():
            parent, _, name = path.rpartition(".")
            if isinstance(branch, ProjectionBranch):
                containers.setdefault((parent, name), nn.ModuleDict())[task.name] = branch
                projection.setdefault(parent, {})[task.name] = branch
            else:
                adapters.setdefault(parent, {})[task.name] = branch
    mlp_sites = {s.path: s for s in injection.mlp_sites()} if adapters else {}  # before any wiring
    for (parent, name), container in containers.items():
        record.add_module(model.get_submodule(parent), name, container)
        for task_name, branch in container.items():
            record.branches[f"{parent}.{name}.{task_name}" if parent else f"{name}.{task_name}"] = branch
    for path, by_task in projection.items():
        site = sites[path]
        site.handler.wire(site.module, routed_projection_branches(by_task, taskset), record)
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
