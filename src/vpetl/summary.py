"""``vpetl.summary(model)``: trainable versus total parameters, per branch kind."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .record import get_record
from .registry import BRANCH_MARKER, branch_kinds


@dataclass(frozen=True)
class Summary:
    """Counts of a model's parameters; ``str(summary)`` is a printable table."""

    method: str | None
    trainable_by_kind: dict[str, int]
    trainable: int
    total: int
    base_total: int
    tasks: dict[str, str] = field(default_factory=dict)  # name -> "method, N trainable" (vpetl.multitask)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        title = f"vpetl summary (method {self.method!r})" if self.method else "vpetl summary (not injected)"
        width = max([len(k) for k in self.trainable_by_kind] + [9])
        lines = [title, f"{'kind':<{width}}  {'trainable':>12}"]
        lines += [f"{kind:<{width}}  {count:>12,}" for kind, count in self.trainable_by_kind.items()]
        lines.append("-" * (width + 14))
        lines.append(
            f"{'trainable':<{width}}  {self.trainable:>12,}  ({100 * self.trainable_fraction:.2f}% of "
            f"{self.total:,} total; base {self.base_total:,})"
        )
        lines += [f"task {name}: {text}" for name, text in self.tasks.items()]
        return "\n".join(lines)


def _kind(name: str, head_prefixes: tuple[str, ...]) -> str:
    dotted = "." + name
    for kind in branch_kinds():
        if f".{BRANCH_MARKER}{kind}." in dotted:
            return kind
    if head_prefixes and name.startswith(head_prefixes):
        return "head"
    if name.rsplit(".", 1)[-1].endswith("bias"):
        return "bias"
    return "base"


def summary(model: nn.Module) -> Summary:
    """Trainable parameters of ``model`` (by ``requires_grad``) grouped by branch kind (one per
    registered method: patt, adapter, lora, ...) then head / bias / base, with the total and
    the base-model total."""
    record = get_record(model)
    head_prefixes = tuple(p + "." for p in record.head_paths) if record else ()
    by_kind: dict[str, int] = {}
    trainable = total = base_total = 0
    for name, param in model.named_parameters():
        kind = _kind(name, head_prefixes)
        total += param.numel()
        if kind not in branch_kinds():
            base_total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            by_kind[kind] = by_kind.get(kind, 0) + param.numel()
    order = [*branch_kinds(), "head", "bias", "base"]
    ordered = {k: by_kind[k] for k in order if k in by_kind}
    tasks = {}
    if record is not None and record.tasks is not None:
        for name, task in record.tasks.tasks.items():
            size = sum(p.numel() for p in task.params.values())
            head = "its own head" if task.head is not None else "the base head"
            tasks[name] = f"{task.config.method}, {size:,} trainable, {head}"
    return Summary(record.config.method if record else None, ordered, trainable, total, base_total, tasks)
