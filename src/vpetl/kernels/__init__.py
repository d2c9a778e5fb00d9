"""Which implementation runs PATT fused with its projection (and the adapter): torch or Triton.

==========  ===============================================================================
kernel      what runs
==========  ===============================================================================
"torch"     the pure-PyTorch path: for a PATT branch covering the projection,
            :mod:`vpetl.kernels.torch_path` (one GEMM for ``x W^T + b`` with the branch
            bias folded in, the branch ``addmm_`` into the K/V slice, an explicit backward);
            anything else :func:`vpetl.projection.project_generic`. What CPU users get.
"triton"    the fused Triton kernels (:mod:`vpetl.kernels.patt_triton`) on CUDA tensors,
            or on CPU tensors under ``TRITON_INTERPRET=1`` (slow and exact: for tests; the
            variable must be set before Triton is first imported).
"auto"      Triton for CUDA tensors when Triton imports; torch otherwise (CPU tensors
            always take the torch path: the interpreter is for testing only; under
            ``torch.compile`` the torch path, which inductor traces and fuses itself).
==========  ===============================================================================

The environment variable ``VPETL_KERNEL`` (auto/torch/triton), when set, overrides the
configured kernel of every branch at call time. Projections the kernels do not cover fall
back to the torch path without error: a PATT branch whose positions are split over
several Linears (separate q/k/v), a branch sharing the projection with LoRA, float64,
mixed dtypes, ranks above :data:`patt_triton.MAX_RANK`, an empty input, and branches
whose ``down``/``up`` Linears carry module hooks (the fused ops never call those modules,
so the generic path runs to let the hooks fire).

The Triton *adapter* path runs only when asked for (``"triton"``): whether it pays beside
the MLP has not been measured on a GPU yet, so ``"auto"`` keeps the torch ``addmm``. The same
holds for the grouped kernels of routed tasks (:mod:`vpetl.kernels.grouped_triton`, used by
:class:`vpetl.routed.RoutedPatt`).
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

from ..options import Kernel
from ..errors import ConfigError

ENV_VAR = "VPETL_KERNEL"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import
        return False
    return True


def interpreting() -> bool:
    """``TRITON_INTERPRET=1`` is set and took effect: Triton's own library functions were
    decorated in interpreter mode, which happens only if the variable was set before
    ``triton.language`` was first imported (timm imports it, so set it before that)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not _triton_importable():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def triton_available() -> bool:
    """True when the Triton kernels can run here: Triton imports, and a CUDA device is
    present or ``TRITON_INTERPRET=1`` is in effect (the interpreter runs them on the CPU)."""
    if not _triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return interpreting()
    return torch.cuda.is_available()


def configured(kernel: Kernel | str) -> Kernel:
    """``kernel`` with the ``VPETL_KERNEL`` override applied."""
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return Kernel(env.strip().lower())
        except ValueError:
            accepted = ", ".join(repr(k.value) for k in Kernel)
            raise ConfigError(f"{ENV_VAR} must be one of {accepted}; got {env!r}.") from None
    return Kernel(kernel)


def use_triton(kernel: Kernel | str, device_type: str, *, auto: bool = True) -> bool:
    """Whether a call on tensors of ``device_type`` runs the Triton path.

    ``auto=False`` makes "auto" mean torch (for paths not yet shown to pay). "triton" on a
    device it cannot run on raises: asking for Triton and silently getting torch would
    make benchmarks lie.
    """
    kernel = configured(kernel)
    if kernel is Kernel.TORCH:
        return False
    if kernel is Kernel.AUTO:  # under torch.compile the torch path is traced and fused by inductor
        return (auto and device_type == "cuda" and _triton_importable() and not _broken
                and not torch.compiler.is_compiling())
    if not _triton_importable():
        raise ConfigError(f"kernel='triton' needs Triton, which cannot be imported here. Use kernel='auto' or 'torch'.")
    if device_type == "cuda" or (device_type == "cpu" and interpreting()):
        return True
    raise ConfigError(
        f"kernel='triton' cannot run on {device_type} tensors: it needs CUDA tensors, or CPU tensors with "
        "TRITON_INTERPRET=1 set before Triton is first imported (timm and torch.compile import it). "
        "Use kernel='auto' or 'torch'."
    )


def hooked(*modules: torch.nn.Module) -> bool:
    """Whether forward/backward hooks (on these modules or global) are registered: the fused
    ops compute a branch's Linears without calling them, so hooks would silently not fire."""
    from torch.nn.modules import module as nn_module

    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


_broken = False  # set when a Triton launch failed under "auto": torch from then on


def disable_auto(error: BaseException) -> None:
    """Record that the Triton path failed under "auto" (e.g. a compiler error on this GPU):
    warn once and run the torch path from now on."""
    global _broken
    if not _broken:
        warnings.warn(
            f"vpetl: the Triton kernels failed ({type(error).__name__}: {error}); kernel='auto' falls back "
            "to the torch path from now on. Pass kernel='triton' to see the error instead.",
            RuntimeWarning,
            stacklevel=3,
        )
    _broken = True


def triton_ops() -> ModuleType:
    """The Triton kernels module (imported on first use: importing it decides interpreter or GPU)."""
    from . import patt_triton

    return patt_triton


def grouped_ops() -> ModuleType:
    """The grouped Triton kernels for many tasks' PATT on one projection (imported on first use)."""
    from . import grouped_triton

    return grouped_triton


__all__ = [
    "ENV_VAR", "configured", "disable_auto", "grouped_ops", "hooked", "interpreting", "triton_available", "triton_ops",
    "use_triton",
]
