"""Adapter placement for HF transformers blocks whose MLP is split in two modules.

HF VideoMAE, YOLOS, DPT, Swinv2, Data2VecVision, TimeSformer, BERT-style layers (transformers 5.x)
have no MLP child: the layer calls

    y = layernorm_after(h)                 # the MLP's input
    z = self.intermediate(y)               # dense + activation
    out = self.output(z, h)                # dense + dropout (+ residual h, for most of them)

The adapter sits beside that MLP and reads its input ``y`` (Eq. 7, as for every other family):
``out = output(intermediate(y), ...) + s * adapter(y)``.

Placement: as for every MLP (handlers/mlp.py), the adapter is registered on the block, here the
layer, so its keys read ``...layer.3.vpetl_adapter.down.weight``. ``intermediate`` and ``output``
keep their keys; their classes are swapped (``record.swap_class``, reverted by ``vpetl.unload``):

* the adapted ``intermediate`` hands its input ``y`` to a small link object shared with
  ``output`` (a plain attribute, no state-dict key);
* the adapted ``output`` takes ``y`` from the link (clearing it, so nothing outlives the
  forward that made it) and adds ``s * adapter(y)`` to its result in one fused ``addmm``.
  It raises if ``y`` is missing: ``output`` called without ``intermediate`` before it would
  otherwise silently skip the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..branches import Branch
from ..derived import Derived, derived_class
from ..errors import InjectionError
from ..options import Kernel
from ..record import InjectionRecord
from .mlp import MLP_LOCATORS, MlpSite

LINK_ATTR = "_vpetl_mlp_link"


class MlpInputLink:
    """Carries the MLP input from ``intermediate`` to ``output`` within one forward."""

    def __init__(self, adapter: Branch, kernel: Kernel) -> None:
        self.adapter = adapter  # a plain reference (the link is not a module): no extra keys
        self.kernel = kernel  # the injection's kernel choice
        self.pending: Tensor | None = None

    def put(self, x: Tensor) -> None:
        self.pending = x  # a re-run (e.g. gradient checkpointing) simply replaces it

    def take(self, output: nn.Module) -> Tensor:
        x, self.pending = self.pending, None
        if x is None:
            raise InjectionError(
                f"vpetl's adapted {type(output).__name__} ran without its intermediate module running first "
                "in the same forward, so the adapter beside this split MLP has no input. Call the layer as a "
                "whole (intermediate, then output), or vpetl.unload(model) to restore the original modules."
            )
        return x


class IntermediateForward(Derived):
    """Mixin: forward also passes its input (the MLP's input) to the link."""

    class_prefix = "Adapted"

    def forward(self, hidden_states, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        self.__dict__[LINK_ATTR].put(hidden_states)
        return out


class OutputForward(Derived):
    """Mixin: forward adds ``s * adapter(y)`` (``y`` from the link) to its result."""

    class_prefix = "Adapted"

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        link = self.__dict__[LINK_ATTR]
        return link.adapter.add_to(out, link.take(self), link.kernel)


def adapted_intermediate_class(cls: type) -> type:
    return derived_class(IntermediateForward, cls)


def adapted_output_class(cls: type) -> type:
    return derived_class(OutputForward, cls)


@dataclass
class SplitMlpSite(MlpSite):
    """An HF layer (``module``) with an ``intermediate`` + ``output`` pair as its MLP."""

    intermediate: nn.Module | None = None
    output: nn.Module | None = None

    def wire(self, adapter: Branch, record: InjectionRecord) -> None:
        assert self.intermediate is not None and self.output is not None
        if adapter.reads_output:
            raise InjectionError(
                f"{self.path}: the sequential adapter reads the MLP's output, but {type(self.output).__name__} "
                "returns it already summed with the residual, so vpetl cannot take it apart; use "
                "placement='parallel' (the paper's default) on this model."
            )
        record.add_module(self.module, "vpetl_adapter", adapter)
        link = MlpInputLink(adapter, record.config.kernel)
        record.set_attr(self.intermediate, LINK_ATTR, link)
        record.set_attr(self.output, LINK_ATTR, link)
        record.swap_class(self.intermediate, adapted_intermediate_class(type(self.intermediate)))
        record.swap_class(self.output, adapted_output_class(type(self.output)))


def _dense(module: nn.Module | None) -> nn.Linear | None:
    dense = None if module is None else module._modules.get("dense")
    return dense if isinstance(dense, nn.Linear) else None


def locate_split_mlp(block: nn.Module, block_path: str) -> MlpSite | None:
    """A layer with ``intermediate`` (``dense`` d -> D) and ``output`` (``dense`` D -> d) children."""
    intermediate, output = block._modules.get("intermediate"), block._modules.get("output")
    up, down = _dense(intermediate), _dense(output)
    if up is None or down is None:
        return None
    if down.in_features != up.out_features or down.out_features != up.in_features:
        return None
    return SplitMlpSite(block_path, block, up.in_features, down.out_features, intermediate, output)


MLP_LOCATORS.append(locate_split_mlp)
