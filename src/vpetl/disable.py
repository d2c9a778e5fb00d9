"""``with vpetl.disabled(model):`` runs the exact base model, branches still attached.

Inside the block the original projection modules, classes and attributes are back in place
(the injection's structural changes are replayed backwards), so forward is the base model's
own code on its own weights: exact, not "branches times zero". The branch parameters stay
registered (state dict, optimizer and ``requires_grad`` flags are untouched) and everything is
re-attached on exit, also when the block raises. Useful for comparisons and distillation
against the frozen teacher.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .errors import InjectionError
from .inject import _require_record


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: ``model`` behaves as the base model inside the block."""
    record = _require_record(model)
    if getattr(record, "disabled", False):
        raise InjectionError("vpetl.disabled(model) is already active for this model; nesting it is not supported.")
    record.detach_structure()
    record.disabled = True
    try:
        yield model
    finally:
        record.attach_structure()
        record.disabled = False
