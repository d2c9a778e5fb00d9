"""Implementations of the fused projection + PATT branch (issue: Triton kernels). [in progress]

``select(kernel, x)`` decides per call which path runs; ``VPETL_KERNEL`` overrides the config.
"""

from __future__ import annotations

from ..config import Kernel


def triton_available() -> bool:
    """True when the Triton kernels can run (placeholder until they land)."""
    return False
