"""BitFit (Ben Zaken et al. 2022): train every bias of the base model (plus the head).

V-PETL Table 3's baseline. The trained values are the base's own biases, so there is nothing
to merge: ``vpetl.merge`` keeps them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..registry import Method, register

if TYPE_CHECKING:
    from ..inject import Injection


@register
@dataclass(frozen=True)
class BitFit(Method):
    """Every parameter whose name ends in ``bias`` trains (``blocks.0.attn.qkv.bias``, ...)."""

    name: ClassVar[str] = "bitfit"
    kind: ClassVar[str] = "bias"
    paper: ClassVar[str] = "BitFit (Ben Zaken et al. 2022); V-PETL Table 3"
    formula: ClassVar[str] = "the sum of the base's bias sizes"
    width_field: ClassVar[None] = None
    adds_branches: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True

    def attach(self, injection: Injection) -> None:
        injection.train(p for n, p in injection.model.named_parameters() if n.rsplit(".", 1)[-1].endswith("bias"))

    def merge(self, record) -> None:
        """Nothing to fold: the biases are the base's own parameters."""
