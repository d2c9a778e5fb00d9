"""Branches that add keys and values along the token axis instead of into q/k/v slots.

An attention handler that owns the attention math calls :meth:`KeyValueBranch.keys_values`
with the tensor that feeds its K/V projection and concatenates the result to K and V per
head (``(B, H, S, hd)`` -> ``(B, H, S + L, hd)``), padding any position bias with 0 and any
mask as :attr:`KeyValueBranch.placement` says.

* :class:`vpetl.methods.prefix.PrefixBranch` (prefix-tuning, Eq. 5): ``L`` learned tokens ``P (L, d)``,
  ``[P_k | P_v] = act(P W_down^T + b_down) W_up^T + b_up``, ``(L, 2d)``, *prepended* to K, V;
  the same for every sample and window; bias and mask padded with 0 (every query sees them).
* PATT's ``concat`` variant (:class:`vpetl.methods.patt.PattBranch` with ``variant="concat"``):
  ``s K_p``/``s V_p`` from ``Z^{l-1}``, ``(..., N, d)``, *appended*: key ``N + j`` comes from
  token ``j``, so it gets token ``j``'s mask column and a 0 position bias.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .branches import Branch

Placement = Literal["prepend", "append"]


class KeyValueBranch(Branch):
    """Protocol of a token-axis branch.

    ``placement``: "prepend" -- ``keys_values`` returns ``(L, d_k)``, ``(L, d_v)``, shared by
    the batch, ``L`` being the branch's ``length``; "append" -- it returns ``(..., N, d_k)``,
    ``(..., N, d_v)`` with the input's leading dims (one extra key per input token).
    """

    placement: Placement = "prepend"

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Extra keys and values (already scaled), from ``x (..., N, d_in)``, the tensor that
        feeds the attention's K/V projection."""
        raise NotImplementedError
