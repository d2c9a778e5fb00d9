"""The adapter's place: beside every transformer block's MLP, reading the MLP's input.

The adapter is registered on the block (``blocks.0.vpetl_adapter.*``), not inside the MLP, so
an ``nn.Sequential`` MLP (torchvision) keeps its length and indexing. The MLP keeps its keys
and Parameters; its class is swapped for a cached subclass whose forward is
``mlp(x) + s * adapter(x)`` (Eq. 7, first line: ``x`` is ``LN(Z^)``, the MLP's input, the
placement that suits pre- and post-norm blocks alike). ``vpetl.unload`` swaps the class back.
"""
from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor, nn

from .. import scripting
from ..branches import Branch
from ..derived import Derived, derived_class
from ..options import Kernel
from ..projection import KERNEL_ATTR
from ..record import InjectionRecord

MLP_NAMES = ("mlp", "ffn", "feed_forward", "mlp_block")


class AdaptedForwardArgs(Derived):
    """Mixin: forward is ``Base.forward(x, ...) + adapter(x)``; the adapter is reached through
    the plain attribute ``_vpetl_adapter = (adapter,)`` (a tuple: no submodule, no new keys)."""

    class_prefix = "Adapted"

    def forward(self, x, *args, **kwargs):
        kernel = self.__dict__.get(KERNEL_ATTR, Kernel.AUTO)
        return self._vpetl_adapter[0].add_to(super().forward(x, *args, **kwargs), x, kernel)


class AdaptedForward(Derived):
    """Mixin for an MLP whose forward takes one tensor: ``Base.forward(x) + adapter(x)``, and
    the same under ``torch.jit.script`` (:mod:`vpetl.scripting`; ``Base.forward`` is compiled
    as the method ``_vpetl_base_forward``)."""

    class_prefix = "Adapted"

    @classmethod
    def derived_namespace(cls, base: type) -> dict:
        forward = base.forward  # the same code under another name: TorchScript compiles methods by name
        renamed = types.FunctionType(forward.__code__, forward.__globals__, "_vpetl_base_forward",
                                     forward.__defaults__, forward.__closure__)
        renamed.__qualname__ = f"{base.__qualname__}._vpetl_base_forward"
        return {"_vpetl_base_forward": renamed}

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            out = self._vpetl_base_forward(x)
            ints: List[int] = self._vpetl_script_ints  # [reads the MLP output, record...]
            return scripting.records_sum(out, out if ints[0] == 1 else x, self._vpetl_script_tensors, ints[1:])
        return self._vpetl_eager_forward(x)

    @torch.jit.unused
    def _vpetl_eager_forward(self, x: Tensor) -> Tensor:
        return self._vpetl_adapter[0].add_to(super().forward(x), x, self.__dict__.get(KERNEL_ATTR, Kernel.AUTO))

    def __prepare_scriptable__(self) -> nn.Module:
        adapter = self._vpetl_adapter[0]
        tensors, ints = scripting.adapter_plan(adapter)
        scripting.store_plan(self, tensors, [int(adapter.reads_output), *ints])
        return self


def adapted_class(cls: type) -> type:
    """``cls`` with the adapter added to its forward (:func:`vpetl.derived.derived_class`):
    :class:`AdaptedForward` when ``cls.forward`` takes one argument, else :class:`AdaptedForwardArgs`."""
    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    one_tensor = len(parameters) == 1 and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return derived_class(AdaptedForward if one_tensor else AdaptedForwardArgs, cls)


def find_mlp(block: nn.Module) -> str | None:
    """Name of ``block``'s MLP child, or None."""
    for name in MLP_NAMES:
        child = block._modules.get(name)
        if child is not None and any(isinstance(m, nn.Linear) for m in child.modules()):
            return name
    return None


def mlp_widths(mlp: nn.Module) -> tuple[int, int]:
    """(input width, output width) of an MLP: its first and last Linear."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features


@dataclass
class MlpSite:
    """Where one block's adapter goes: it is registered on ``module`` (at ``path``) as
    ``vpetl_adapter``, reads the MLP input (width ``d_in``) and adds to its output (``d_out``)."""

    path: str
    module: nn.Module
    d_in: int
    d_out: int

    def wire(self, adapter: Branch, record: InjectionRecord) -> None:
        """Register ``adapter`` as ``<path>.vpetl_adapter`` and make forward add it."""
        raise NotImplementedError


@dataclass
class ChildMlpSite(MlpSite):
    """A block (``module``) with an MLP child ``mlp``: the MLP's class is swapped."""

    mlp: nn.Module = None

    def wire(self, adapter: Branch, record: InjectionRecord) -> None:
        record.add_module(self.module, "vpetl_adapter", adapter)
        record.set_attr(self.mlp, "_vpetl_adapter", (adapter,))
        record.set_attr(self.mlp, KERNEL_ATTR, record.config.kernel)
        record.swap_class(self.mlp, adapted_class(type(self.mlp)))


MlpLocator = Callable[[nn.Module, str], "MlpSite | None"]


def locate_child_mlp(block: nn.Module, block_path: str) -> MlpSite | None:
    """A block with an MLP child module (timm, torchvision ViT/Swin/Swin3D/MViT)."""
    name = find_mlp(block)
    if name is None:
        return None
    mlp = block._modules[name]
    d_in, d_out = mlp_widths(mlp)
    return ChildMlpSite(block_path, block, d_in, d_out, mlp=mlp)


# Tried in order on each ancestor block; other handler modules append their own
# (e.g. nn.TransformerEncoderLayer, HF ViT's intermediate/output pair).
MLP_LOCATORS: list[MlpLocator] = [locate_child_mlp]


def locate_mlp(model: nn.Module, attention_path: str, max_levels: int = 3) -> MlpSite | None:
    """The MLP of the block that holds the attention at ``attention_path``: the attention
    site itself (a whole layer, e.g. nn.TransformerEncoderLayer) or the nearest ancestor
    (up to ``max_levels`` up) that a locator recognises."""
    parts = attention_path.split(".") if attention_path else []
    for level in range(0, min(max_levels, len(parts)) + 1):
        block_path = ".".join(parts[: len(parts) - level])
        block = model.get_submodule(block_path)
        for locator in MLP_LOCATORS:
            site = locator(block, block_path)
            if site is not None:
                return site
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
