"""Take an injection back out: ``unload`` restores the original modules, ``merge`` first folds
every method entry into the frozen weights, when every entry can be (``Method.mergeable``).

Each method says how it merges (its ``merge``): LoRA adds ``scale * B A`` to the weight rows,
SSF scales and shifts weights and biases, and so on. Nonlinear branches (PATT, the adapter)
and methods that add keys or tokens (prefix, VPT) cannot: no weight change reproduces them.
"""

from __future__ import annotations

import torch
from torch import nn

from . import scripting
from .errors import MergeError
from .inject import _require_record
from .record import set_record


def unload(model: nn.Module) -> nn.Module:
    """Remove every branch and restore the original modules, classes, attributes and
    ``requires_grad`` flags; state-dict keys and module types are exactly as before
    ``inject``. Base parameters keep their current values (unchanged unless the method
    trained them, as bitfit / full / the head do). Returns the same model."""
    record = _require_record(model)
    record.undo(model)
    scripting.forget_plans(model)
    set_record(model, None)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every method entry into the base weights in place, then ``unload``: the result is
    the plain model with exactly its original keys and module types.

    Raises ``MergeError`` (and leaves the model untouched) if any entry cannot be merged.
    """
    record = _require_record(model)
    config = record.config
    blocked = [e for e in config.methods if not e.mergeable]
    if blocked:
        reasons = "; ".join(f"{e.name}: {e.why_not_mergeable}" for e in blocked)
        mergeable = ", ".join(sorted(e.name for e in _registered() if e.mergeable))
        raise MergeError(
            f"cannot merge method {config.method!r}: {reasons}. Keep the injected model for inference, or call "
            f"vpetl.unload(model) to drop the branches. Methods that merge exactly: {mergeable}."
        )
    with torch.no_grad():
        # innermost (attached last) first; entries that rewrite the base weights themselves
        # (SSF: the other entries' deltas are added outside its scaling) before all others
        order = list(reversed(config.methods))
        for entry in sorted(order, key=lambda e: not e.merge_first):
            entry.merge(record)
    return unload(model)


def _registered():
    from .registry import REGISTRY

    return REGISTRY.values()
