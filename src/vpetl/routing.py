"""The tasks a model carries and the routing of the batch being run (:mod:`vpetl.multitask`).

A routed batch of ``B`` samples reaches every adapted projection as ``M`` rows: ``M / B``
consecutive rows per sample (tokens, or windows x tokens for window attention). ``Routing``
turns the task of each sample into the rows of each task: index tensors for gathers, one
slice when a task's samples are consecutive (no copy), and the runs of consecutive rows that
the grouped Triton kernel cuts into tiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .branches import Branch
from .config import InjectConfig
from .errors import InjectionError


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
    _cache: dict[tuple, object] = field(default_factory=dict)

    def _per_row(self, total: int, where: str) -> int:
        batch = len(self.per_sample)
        if total % batch:
            raise InjectionError(
                f"vpetl.route was given {batch} tasks (one per sample), but {where} sees {total} rows, which is "
                f"not a multiple of {batch}: vpetl cannot find the batch dimension. Pass as many tasks as the "
                "batch has samples (the first dimension of the input)."
            )
        return total // batch

    def rows(self, task: str | None, total: int, device: torch.device, where: str) -> Tensor | None:
        """Indices of the rows of ``task``'s samples among ``total`` rows, ``(M_t,)`` int64; None
        means every row (the whole batch is this task)."""
        if self.per_sample is None:
            return None if self.single == task else _EMPTY.to(device)
        per = self._per_row(total, where)
        key = ("rows", task, total, str(device))
        if key not in self._cache:
            samples = torch.tensor([i for i, t in enumerate(self.per_sample) if t == task], dtype=torch.int64)
            self._cache[key] = (samples[:, None] * per + torch.arange(per)).reshape(-1).to(device)
        return self._cache[key]

    def span(self, task: str | None, total: int, where: str) -> slice | None:
        """The rows of ``task`` as one slice when its samples are consecutive (a view, no
        gather), else None. The whole batch is ``slice(0, total)``; a task absent from the
        batch is an empty slice."""
        if self.per_sample is None:
            return slice(0, total) if self.single == task else slice(0, 0)
        per = self._per_row(total, where)
        key = ("span", task, total)
        if key not in self._cache:
            samples = [i for i, t in enumerate(self.per_sample) if t == task]
            contiguous = not samples or samples[-1] - samples[0] + 1 == len(samples)
            self._cache[key] = (slice(samples[0] * per, (samples[-1] + 1) * per) if samples else slice(0, 0)
                                ) if contiguous else None
        return self._cache[key]

    def runs(self, group: Mapping[str, int], total: int, where: str) -> list[tuple[int, int, int]]:
        """``(index, first row, end row)`` of each run of consecutive rows whose samples share
        a task, in row order; ``index`` is the task's position in ``group`` (-1: not in it)."""
        if self.per_sample is None:
            return [(group.get(self.single, -1), 0, total)]
        per = self._per_row(total, where)
        key = ("runs", tuple(group.items()), total)
        if key not in self._cache:
            runs: list[tuple[int, int, int]] = []
            for i, task in enumerate(self.per_sample):
                index = group.get(task, -1) if task is not None else -1
                if runs and runs[-1][0] == index:
                    runs[-1] = (index, runs[-1][1], (i + 1) * per)
                else:
                    runs.append((index, i * per, (i + 1) * per))
            self._cache[key] = runs
        return self._cache[key]

    def memo(self, key: tuple, build):
        """``build()`` once per routed forward and ``key`` (e.g. a tile map per projection shape)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


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
