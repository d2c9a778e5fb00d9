"""Full fine-tuning: every parameter trains (V-PETL Table 3's upper reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..registry import Method, register

if TYPE_CHECKING:
    from ..inject import Injection


@register
@dataclass(frozen=True)
class Full(Method):
    """Every parameter of the model trains; the delta file holds them all."""

    name: ClassVar[str] = "full"
    kind: ClassVar[str] = "base"
    paper: ClassVar[str] = "full fine-tuning; V-PETL Table 3"
    formula: ClassVar[str] = "every parameter"
    width_field: ClassVar[None] = None
    adds_branches: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True

    def attach(self, injection: Injection) -> None:
        injection.train(injection.model.parameters())

    def merge(self, record) -> None:
        """Nothing to fold: the trained values are the base's own parameters."""
