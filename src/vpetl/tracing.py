"""When vpetl's branches take their plain path: graph capture, export and shape inference.

The fast paths (:mod:`vpetl.kernels`) add branch products *in place* into views of the
projection output, pick an implementation from the tensors' device and dtype, and run custom
autograd functions. Tools that record a graph from Python see those as control flow on
traced values (``torch.fx.symbolic_trace``), or lose the in-place writes into views
(``torch.onnx.export(..., dynamo=False)``, which traces with ``torch.jit.trace``), and the
``meta`` device has no autocast state to ask about. For those callers every branch computes
the same function out of place with plain ``torch`` ops:

    out = x W^T + b  +  sum over branches of  s * (act(x W_down^T + b_down) U^T + c)

where ``U`` (``(n*w, r)``) and ``c`` hold the branch's up-projection rows at its slots'
output columns and zeros elsewhere (:meth:`vpetl.projection.SlotLayout.scatter_rows`).
``torch.export`` / ``torch.onnx.export(..., dynamo=True)`` / ``torch.compile`` trace with fake
tensors through the fast paths, which they capture correctly, so they keep them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ExportError


def plain_path(x: Tensor) -> bool:
    """True when ``x`` is an FX proxy, ``torch.jit.trace`` (and so the ONNX TorchScript
    exporter) is recording, or ``x`` lives on the ``meta`` device."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
        return True
    return x.device.type == "meta"


def raise_not_scriptable(module: nn.Module) -> None:
    """Raise :class:`ExportError` for ``torch.jit.script`` of a model holding vpetl ``module``,
    which :mod:`vpetl.scripting` does not cover."""
    raise ExportError(
        f"torch.jit.script cannot compile vpetl's {type(module).__name__}: vpetl scripts PATT (variant 'add' or "
        "'no_input'), LoRA and prefix tokens in timm attention, nn.MultiheadAttention and torchvision window "
        "attention, and adapters beside one-argument MLPs; not this module. Take the injected model "
        "out of Python with torch.export.export(model, (example,)), torch.onnx.export(model, (example,), path) "
        "or torch.jit.trace(model, example), which reproduce it; or call vpetl.merge(model) first (LoRA) to get "
        "a plain model that scripts."
    )
