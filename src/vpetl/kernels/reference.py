"""Plain PyTorch oracles for the fused kernels: what the paper's code computes, written the
obvious way (Linear - activation - Linear, added out of place). Slow on purpose; the tests
compare the torch path and the Triton kernels against these, outputs and gradients.

Shapes: ``x`` is ``(M, d_in)``; the frozen projection ``weight`` is ``(N, d_in)`` with
``N = n * w`` output columns holding the ``n`` position slots (q, k, v) of width ``w``,
position-major ``[n, w]`` or, with ``heads`` > 0, head-major ``[H, n, hd]``.

PATT (Eq. 9-10)::

    h = act(x W_down^T + b_down)                       (M, r)
    P = h W_up^T + b_up                                 (M, len(positions) * w)
    slot c of (x W^T + b)  +=  s * P[:, chunk c]        chunks in ``positions`` order

Adapter (Eq. 6-7)::

    y = out + s * (act(x W_down^T + b_down) W_up^T + b_up)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ACTS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}


def slot_columns(letters: str, heads: int, out_features: int, letter: str) -> Tensor:
    """Output columns of slot ``letter``, in the order the branch's up-projection rows fill
    them: ``(w,)`` indices. Position-major: ``[i*w, (i+1)*w)``; head-major: head by head."""
    n, i = len(letters), letters.index(letter)
    if not heads:
        w = out_features // n
        return torch.arange(i * w, (i + 1) * w)
    hd = out_features // (n * heads)
    base = torch.arange(heads)[:, None] * (n * hd) + i * hd
    return (base + torch.arange(hd)[None, :]).reshape(-1)


def patt_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    scale: float,
    positions: str = "kv",
    letters: str = "qkv",
    heads: int = 0,
    activation: str = "tanh",
) -> Tensor:
    """``x W^T + b`` with ``s * (act(x W_down^T + b_down) W_up^T + b_up)`` added to the slots of
    ``positions``; out of place, differentiable in every argument. Returns ``(M, N)``."""
    out = F.linear(x, weight, bias)
    branch = F.linear(_ACTS[activation](F.linear(x, down_weight, down_bias)), up_weight, up_bias) * scale
    width = up_weight.shape[0] // len(positions)
    delta = torch.zeros_like(out)
    for j, c in enumerate(positions):
        cols = slot_columns(letters, heads, weight.shape[0], c).to(out.device)
        delta = delta.index_add(1, cols, branch[:, j * width : (j + 1) * width])
    return out + delta


def adapter_reference(
    out: Tensor,
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    scale: float,
    activation: str = "relu",
) -> Tensor:
    """``out + s * (act(x W_down^T + b_down) W_up^T + b_up)``, all ``(M, .)``."""
    return out + F.linear(_ACTS[activation](F.linear(x, down_weight, down_bias)), up_weight, up_bias) * scale


def grouped_patt_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    branches: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None, float]],
    task_of_row: list[int],
    positions: str = "kv",
    letters: str = "qkv",
    heads: int = 0,
    activation: str = "tanh",
) -> Tensor:
    """Every row ``m`` through :func:`patt_reference` with the branch ``branches[task_of_row[m]]``
    (``(W_down, b_down, W_up, b_up, scale)``; task -1: the plain projection), one row at a time;
    out of place and differentiable in every argument. Returns ``(M, N)``."""
    rows = []
    for m, t in enumerate(task_of_row):
        if t < 0:
            rows.append(F.linear(x[m : m + 1], weight, bias))
        else:
            down_w, down_b, up_w, up_b, scale = branches[t]
            rows.append(patt_reference(x[m : m + 1], weight, bias, down_w, down_b, up_w, up_b, scale, positions,
                                       letters, heads, activation))
    return torch.cat(rows)
