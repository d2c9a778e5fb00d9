"""A frozen projection Linear that side branches add into, without renaming its keys.

``BranchedLinear`` is an ``nn.Linear`` that *adopts* the original module's ``weight`` and
``bias`` Parameter objects, so ``blocks.0.attn.qkv.weight`` stays ``blocks.0.attn.qkv.weight``
and a base checkpoint still loads after ``inject``. Its forward is

    out = x W^T + (b + sum of the branches' scaled up-projection biases, folded per slot)
    for each branch: branch.add_into_(x, out)       # in-place addmm_ into slot views

``SlotLayout`` says which columns of the output hold which position (q, k, v):
position-major ``[n, H, hd]`` (timm ViT and most others) or head-major ``[H, n, hd]``
(timm maxxvit with ``head_first``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .branches import ProjectionBranch


@dataclass(frozen=True)
class SlotLayout:
    """Output columns of a projection: ``letters`` in output order (e.g. "qkv", "kv", "v");
    ``heads`` > 0 means head-major ``[H, n, hd]`` instead of position-major ``[n, w]``."""

    letters: str
    heads: int = 0

    def view(self, out2d: Tensor, letters: str) -> Tensor:
        """The columns of consecutive ``letters``: ``(M, k*w)``, or ``(M, H, hd)`` head-major."""
        n, first = len(self.letters), self.letters.index(letters[0])
        if self.heads:
            hd = out2d.shape[1] // (n * self.heads)
            return out2d.view(out2d.shape[0], self.heads, n * hd)[:, :, first * hd : (first + 1) * hd]
        w = out2d.shape[1] // n
        return out2d[:, first * w : (first + len(letters)) * w]

    def rows(self, weight: Tensor, letter: str) -> Tensor:
        """The rows of a ``(n*w, d_in)`` weight that produce slot ``letter``: a view,
        ``(w, d_in)`` or head-major ``(H, hd, d_in)`` (used to merge LoRA in place)."""
        n, i = len(self.letters), self.letters.index(letter)
        if self.heads:
            return weight.view(self.heads, n, -1, weight.shape[1])[:, i]
        w = weight.shape[0] // n
        return weight[i * w : (i + 1) * w]

    def runs(self, positions: str) -> list[str]:
        """Group ``positions`` held here into runs of adjacent columns (one GEMM each)."""
        runs: list[str] = []
        for c in positions:
            if c not in self.letters:
                continue
            if runs and not self.heads and self.letters.index(c) == self.letters.index(runs[-1][-1]) + 1:
                runs[-1] += c
            else:
                runs.append(c)
        return runs


class OutputSlots:
    """A projection output ``(M, n*w)`` seen through its layout; what branches add into."""

    __slots__ = ("out2d", "layout", "letters")

    def __init__(self, out2d: Tensor, layout: SlotLayout):
        self.out2d, self.layout, self.letters = out2d, layout, layout.letters

    def runs(self, positions: str) -> list[str]:
        return self.layout.runs(positions)

    def view(self, letters: str) -> Tensor:
        return self.layout.view(self.out2d, letters)


def project(
    x: Tensor, weight: Tensor, bias: Tensor | None, layout: SlotLayout, branches: list[ProjectionBranch]
) -> Tensor:
    """``x W^T + b`` plus every branch added into its slots; ``x`` is ``(..., d_in)``.

    The branches' constant terms are folded into the bias (one tiny vector op instead of
    another pass over the output); the matmul parts are ``addmm_`` into slot views.
    """
    x2d = x.reshape(-1, x.shape[-1])
    bias, unfolded = _folded_bias(bias, layout, branches, weight.shape[0])
    out2d = F.linear(x2d, weight, bias)
    slots = OutputSlots(out2d, layout)
    for branch in branches:
        branch.add_into_(x, x2d, slots)
    for letter, term in unfolded:
        view = slots.view(letter)
        view.add_(term.to(view.dtype).view(view.shape[1:]))
    return out2d.view(*x.shape[:-1], weight.shape[0])


def _folded_bias(
    bias: Tensor | None, layout: SlotLayout, branches: list[ProjectionBranch], out_features: int
) -> tuple[Tensor | None, list[tuple[str, Tensor]]]:
    """Base bias with the branches' constant terms folded in per slot; the terms that
    cannot be folded (no base bias, head-major layout) are returned to add separately."""
    extras = [(c, t) for b in branches for c in layout.letters if (t := b.bias_for(c)) is not None]
    if not extras:
        return bias, []
    if bias is None or layout.heads:
        return bias, extras
    w = out_features // len(layout.letters)
    pieces = []
    for i, c in enumerate(layout.letters):
        piece = bias[i * w : (i + 1) * w]
        for letter, term in extras:
            if letter == c:
                piece = piece + term
        pieces.append(piece)
    return torch.cat(pieces), []


class BranchedLinear(nn.Linear):
    """``nn.Linear`` owning the original weight/bias Parameters plus attached branches.

    The branches are registered on the attention module that owns this projection (one
    PATT branch may feed several projections); here they are plain references.
    """

    def __init__(self, base: nn.Linear, layout: SlotLayout):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.layout = layout
        self._branches: list[ProjectionBranch] = []
        object.__setattr__(self, "_base", base)  # not a submodule (keys stay): vpetl.unload restores it

    @property
    def base(self) -> nn.Linear:
        return self._base

    def attach(self, branch: ProjectionBranch) -> None:
        self._branches.append(branch)


    def forward(self, x: Tensor) -> Tensor:
        return project(x, self.weight, self.bias, self.layout, self._branches)

    def extra_repr(self) -> str:
        kinds = ", ".join(b.kind for b in self._branches)
        return f"{super().extra_repr()}, slots={self.layout.letters!r}, branches=[{kinds}]"


def adoptable(module: nn.Module) -> bool:
    """True for a plain ``nn.Linear`` (or a subclass that keeps Linear's forward)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
