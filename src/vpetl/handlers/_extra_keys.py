"""Extra keys and values along the token axis (prefix-tuning, PATT variant ``concat``).

Shared by the handlers that own their attention math (timm ``Attention``,
``nn.MultiheadAttention``, torchvision window attention). With ``B`` attention rows (batch,
or batch x windows), ``H`` heads of width ``hd``, ``S`` keys from the input and the branches
of :mod:`vpetl.token_branches` in injection order::

    K' = [P_k^(1) .. P_k^(m) | K | A_k^(1) .. A_k^(n)]          (B, H, S', hd)
    V' = [P_v^(1) .. P_v^(m) | V | A_v^(1) .. A_v^(n)]          (B, H, S', hd)
    S' = L_1 + .. + L_m + S + n * S

``P^(i)`` (placement "prepend", ``(L_i, H*hd)``) is the same for every row; ``A^(j)``
(placement "append", ``(B, S, H*hd)``) has one key per input token: key ``S + (j-1) S + t``
comes from token ``t``. The logits' key axis grows the same way, so everything added to the
logits is extended along its last axis (:class:`KeyLayout`):

* a position bias (relative-position table) gets 0 for every extra key (:func:`extend_bias`);
* a mask gets "allowed" for the prepended keys and, for each appended block, a copy of the
  source tokens' columns (:func:`extend_mask`): a key derived from token ``t`` is visible
  exactly where token ``t``'s own key is.

The module keeps the branches in a plain tuple attribute :data:`EXTRA_KV_ATTR` (no
state-dict keys; the branches themselves are registered as ``vpetl_prefix`` / ``vpetl_patt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..tracing import plain_path

EXTRA_KV_ATTR = "_vpetl_extra_kv"


@dataclass(frozen=True)
class KeyLayout:
    """The key axis after extension: ``prefix`` shared keys, then the ``source`` input keys,
    then ``copies`` blocks of ``source`` keys (one per input token each)."""

    source: int
    prefix: int = 0
    copies: int = 0

    @property
    def total(self) -> int:
        """``S'``, the number of keys after extension."""
        return self.prefix + self.source * (1 + self.copies)


def extra_branches(module: nn.Module) -> tuple:
    """The token-axis branches wired into ``module`` (empty when none)."""
    return module.__dict__.get(EXTRA_KV_ATTR, ())


def per_head(t: Tensor, heads: int) -> Tensor:
    """``(..., T, H*hd)`` -> ``(..., H, T, hd)`` (a view)."""
    return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(-3, -2)


def _check_width(branch: nn.Module, name: str, t: Tensor, heads: int, head_dim: int) -> None:
    if t.shape[-1] != heads * head_dim:
        raise RuntimeError(
            f"{type(branch).__name__} returned extra {name} of width {t.shape[-1]}; the attention has "
            f"{heads} heads of width {head_dim} ({heads * head_dim} in all). Inject again on this model."
        )


def extend_keys(
    k: Tensor, v: Tensor, x_key: Tensor, x_value: Tensor, branches: Sequence[nn.Module]
) -> tuple[Tensor, Tensor, KeyLayout]:
    """Concatenate every branch's ``keys_values`` to ``k`` and ``v`` per head (module docstring).

    Args:
        k, v: ``(B, H, S, hd)`` keys and values of the input (after the head split).
        x_key, x_value: ``(B, S, d_in)``, the tensors feeding the K and V projections (usually
            the same object; an "append" branch then runs once, else K from ``x_key`` and V
            from ``x_value``).
        branches: objects with ``placement`` ("prepend"/"append") and ``keys_values``.
    Returns:
        ``K'``, ``V'`` ``(B, H, S', hd)`` and the :class:`KeyLayout` of their key axis.
    """
    rows, heads, source, head_dim = k.shape
    checked = not plain_path(k)  # traced shapes are not known: the checks run in eager forwards
    front_k, front_v, back_k, back_v = [], [], [], []
    prefix = copies = 0
    for branch in branches:
        placement = branch.placement
        if placement == "prepend":
            ek, ev = branch.keys_values(x_key)  # (L, H*hd), shared by all rows
            if checked:
                for name, t in (("keys", ek), ("values", ev)):
                    _check_width(branch, name, t, heads, head_dim)
            front_k.append(per_head(ek.to(k.dtype), heads).expand(rows, -1, -1, -1))
            front_v.append(per_head(ev.to(v.dtype), heads).expand(rows, -1, -1, -1))
            prefix += branch.length
        elif placement == "append":
            if x_value is x_key:
                ek, ev = branch.keys_values(x_key)  # (B, S, H*hd) each
            else:
                ek, ev = branch.keys_values(x_key)[0], branch.keys_values(x_value)[1]
            for name, t in (("keys", ek), ("values", ev)) if checked else ():
                _check_width(branch, name, t, heads, head_dim)
                if t.shape[:-1] != (rows, source):
                    raise RuntimeError(
                        f"{type(branch).__name__} appended {name} of shape {tuple(t.shape)}; expected one per "
                        f"input token, {(rows, source, heads * head_dim)}."
                    )
            back_k.append(per_head(ek.to(k.dtype), heads))
            back_v.append(per_head(ev.to(v.dtype), heads))
            copies += 1
        else:
            raise ValueError(
                f"{type(branch).__name__}.placement is {placement!r}; token-axis branches must say 'prepend' "
                "or 'append'."
            )
    if not (front_k or back_k):
        return k, v, KeyLayout(source)
    k = torch.cat([*front_k, k, *back_k], dim=-2)
    v = torch.cat([*front_v, v, *back_v], dim=-2)
    return k, v, KeyLayout(source, prefix, copies)


def _key_columns(t: Tensor, layout: KeyLayout, what: str) -> Tensor:
    """``t`` with its last (key) axis of length ``S`` (a length-1 axis is broadcast to ``S``)."""
    if plain_path(t):  # traced: sizes unknown; expand keeps an S axis and broadcasts a 1
        return t.expand(*t.shape[:-1], layout.source)
    if t.shape[-1] == layout.source:
        return t
    if t.shape[-1] == 1:
        return t.expand(*t.shape[:-1], layout.source)
    raise RuntimeError(
        f"the {what} has shape {tuple(t.shape)}; its last axis should cover the {layout.source} keys of the "
        f"input (or be 1 to broadcast) before vpetl extends it for the extra keys."
    )


def extend_mask(mask: Tensor, layout: KeyLayout, allowed: bool | float) -> Tensor:
    """``(..., S)`` -> ``(..., S')``: ``allowed`` for the prepended keys, then the mask, then
    ``layout.copies`` copies of its columns (an appended key inherits its token's column).

    ``allowed`` is the value meaning "may attend": ``0.0`` for an additive float mask,
    ``True`` for a bool mask in SDPA's convention, ``False`` in ``nn.MultiheadAttention``'s.
    """
    if not (layout.prefix or layout.copies):
        return mask
    mask = _key_columns(mask, layout, "attention mask")
    parts = []
    if layout.prefix:
        parts.append(torch.full((*mask.shape[:-1], layout.prefix), allowed, dtype=mask.dtype, device=mask.device))
    parts += [mask] * (1 + layout.copies)
    return torch.cat(parts, dim=-1)


def extend_bias(bias: Tensor, layout: KeyLayout) -> Tensor:
    """``(..., S)`` -> ``(..., S')`` with 0 for every extra key (a position bias, e.g. Swin's
    relative-position bias ``(1, H, N, N)``: the extra keys have no position)."""
    if not (layout.prefix or layout.copies):
        return bias
    bias = _key_columns(bias, layout, "position bias")
    front = bias.new_zeros((*bias.shape[:-1], layout.prefix))
    back = bias.new_zeros((*bias.shape[:-1], layout.source * layout.copies))
    return torch.cat([front, bias, back], dim=-1)
