"""Take an injection back out: ``unload`` restores the original modules, ``merge`` first
folds LoRA into the frozen weights.

Merging LoRA is exact: ``W_p x + scale * B_p A_p x = (W_p + scale * B_p A_p) x``. PATT and
the adapter cannot be merged: ``tanh(x W_down) W_up`` (PATT) and ``relu(x W_down) W_up``
(adapter) are not linear in ``x``, so no weight matrix reproduces them. Prefix and prompt
tokens add keys or tokens the base model does not have, so no weight change reproduces them.
"""

from __future__ import annotations

import torch
from torch import nn

from . import scripting
from .branches import LoraBranch
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
    """Fold LoRA into the frozen projection weights in place, then ``unload``.

    Raises ``MergeError`` (and leaves the model untouched) if PATT or an adapter is present.
    """
    record = _require_record(model)
    config = record.config
    nonlinear = [
        name for name, cfg in (("PATT", config.patt), ("the adapter", config.adapter)) if cfg is not None
    ]
    if nonlinear:
        raise MergeError(
            f"cannot merge {' and '.join(nonlinear)} (method {config.method!r}): PATT computes "
            "tanh(x W_down) W_up and the adapter relu(x W_down) W_up, which are not linear in x, so no "
            "weight matrix reproduces them. Keep the injected model for inference, or call "
            "vpetl.unload(model) to drop the branches; only LoRA can be merged."
        )
    tokens = [name for name, cfg in (("prefix", config.prefix), ("prompt", config.prompt)) if cfg is not None]
    if tokens:
        raise MergeError(
            f"cannot merge {' and '.join(tokens)} tokens (method {config.method!r}): they add keys or tokens "
            "that the base model does not have, so no weight change reproduces them. Keep the injected model "
            "for inference, or call vpetl.unload(model) to drop them; only LoRA can be merged."
        )
    with torch.no_grad():
        for module, handler in record.sites:
            lora = module._modules.get("vpetl_lora")
            if not isinstance(lora, LoraBranch):
                continue
            for letter in lora.positions:
                rows = handler.weight_rows(module, letter)
                delta = lora.delta_weight(letter).to(rows.dtype)
                rows.add_(delta.view(rows.shape))
    return unload(model)
