"""The handler protocol: how one attention shape exposes its q/k/v projections to branches.

A handler *matches* an attention module, *describes* its projections (input width, the
width of each q/k/v slot, whether the backbone uses biases) and *wires* ready-made branches
into its forward. The walker (``vpetl.inject``) owns everything else: creating branches,
registering them under clear names, freezing, verifying that every branch is called.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..branches import ProjectionBranch
from ..errors import InjectionError, MergeError
from ..projection import BranchedLinear, SlotLayout
from ..record import InjectionRecord


@dataclass(frozen=True)
class ProjectionSpec:
    """How a handler describes one attention's q/k/v projections to the methods: the one
    public structure a projection site is seen through.

    ``calls`` groups the position letters by projection call (``("qkv",)`` for a fused qkv,
    ``("q", "k", "v")`` for separate Linears, ``("q", "kv")`` for q + fused kv): a branch
    covering several groups is read by that many projections per forward.
    """

    d_in: int
    widths: dict[str, int]  # slot width per position letter
    bias: bool  # the backbone's q/k/v projections carry a bias
    device: torch.device
    dtype: torch.dtype
    calls: tuple[str, ...] = ("qkv",)

    def consumers(self, positions: str) -> int:
        """How many projection calls per forward read a branch covering ``positions``."""
        return max(1, sum(1 for letters in self.calls if set(letters) & set(positions)))


class AttentionHandler(ABC):
    """One attention shape: how a family of attention modules exposes its q/k/v projections."""

    name: str = "attention"

    @abstractmethod
    def match(self, module: nn.Module) -> bool:
        """True if this handler adapts ``module`` (checked on the module itself, not children)."""

    @abstractmethod
    def spec(self, module: nn.Module) -> ProjectionSpec:
        """Shapes of the module's q/k/v projections."""

    @abstractmethod
    def wire(self, module: nn.Module, branches: list[ProjectionBranch], record: InjectionRecord) -> None:
        """Make ``module``'s forward add every branch into its q/k/v; log changes in ``record``."""

    def wire_extra_keys(self, module: nn.Module, branches: list, record: InjectionRecord) -> None:
        """Make ``module``'s attention concatenate every branch's ``keys_values`` to K and V
        along the token axis (:mod:`vpetl.token_branches`); log changes in ``record``."""
        raise InjectionError(
            f"{type(module).__name__} (handler {self.name!r}) cannot take extra key/value tokens, which "
            "prefix-tuning and PATT variant 'concat' need: vpetl adds them where it owns the attention math "
            "(timm VisionTransformer attention, nn.MultiheadAttention, torchvision Swin/Swin3D window "
            "attention). Use PATT (variant 'add'), LoRA or the adapter on this model."
        )

    def weight_rows(self, module: nn.Module, letter: str) -> torch.Tensor:
        """A view of the frozen weight rows producing position ``letter`` (``(w, d_in)`` or
        ``(H, hd, d_in)``), so ``vpetl.merge`` can fold LoRA into them in place."""
        raise MergeError(f"vpetl cannot merge LoRA into {type(module).__name__} (handler {self.name!r}).")


class LinearProjections(AttentionHandler):
    """Attention whose projections are ``nn.Linear`` children called as modules: each used
    one is replaced by a :class:`BranchedLinear` that adopts its Parameters (keys unchanged)."""

    @abstractmethod
    def linears(self, module: nn.Module) -> list[tuple[str, SlotLayout]]:
        """Child names of the projection Linears and the layout of each one's output."""

    def weight_rows(self, module: nn.Module, letter: str) -> torch.Tensor:
        for child in module.children():
            if isinstance(child, BranchedLinear) and letter in child.layout.letters:
                return child.layout.rows(child.weight, letter)
        raise MergeError(f"{type(module).__name__} has no projection for position {letter!r}.")

    def spec(self, module: nn.Module) -> ProjectionSpec:
        widths: dict[str, int] = {}
        has_bias = False
        for name, layout in self.linears(module):
            linear = getattr(module, name)
            for c in layout.letters:
                widths[c] = linear.out_features // len(layout.letters)
            has_bias = has_bias or linear.bias is not None
        first = getattr(module, self.linears(module)[0][0])
        calls = tuple(layout.letters for _, layout in self.linears(module))
        return ProjectionSpec(first.in_features, widths, has_bias, first.weight.device, first.weight.dtype, calls)

    def wire(self, module: nn.Module, branches: list[ProjectionBranch], record: InjectionRecord) -> None:
        for name, layout in self.linears(module):
            users = [b for b in branches if set(b.positions) & set(layout.letters)]
            if users:
                record.swap_module(module, name, BranchedLinear(getattr(module, name), layout, users,
                                                                   record.config.kernel))
