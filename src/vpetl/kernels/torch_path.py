"""The pure-PyTorch PATT projection: what CPU users (and ``kernel="torch"``) run.

Same equations as :mod:`vpetl.kernels.patt_triton` (see there), written with a handful of
BLAS calls and an explicit backward::

    forward   out = addmm(b + s b_u (folded per slot), x, W^T)           one GEMM
              h   = act(addmm(b_d, x, W_d^T))                             skinny GEMM
              out[:, K/V columns] .addmm_(h, U^T, alpha=s)                in place, no K_p/V_p
    backward  dh  = s G_p U,  dz = dh * act'(z)
              dx  = G W  (+)= dz W_d                                      addmm_ into one buffer
              dU  = s G_p^T h,  db_u = s sum G_p,  dW_d = dz^T x,  db_d = sum dz

Measured against autograd through the in-place ``addmm_`` (which clones the whole output
gradient in ``CopySlices``) and against one GEMM with ``[W ; W_down]`` concatenated (which
copies ``W`` every call and, in training, computes the frozen ``W``'s gradient through the
concatenation): see ``benchmarks/results/kernels_cpu.md``.

``layout`` is a :class:`vpetl.projection.SlotLayout`; ``runs`` lists ``(letters, up rows)``:
the groups of adjacent K/V columns (one GEMM each) and the up-projection rows feeding them.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ACTS = {"gelu": torch.nn.functional.gelu}


def _act_grad(dh: Tensor, h: Tensor, z: Tensor | None, act: str) -> Tensor:
    if act == "tanh":
        return torch.ops.aten.tanh_backward(dh, h)
    if act == "relu":
        return torch.ops.aten.threshold_backward(dh, h, 0)
    return torch.ops.aten.gelu_backward(dh, z)


def _forward(x, weight, bias, down_w, down_b, up_w, up_b, layout, runs, scale, act):
    n_out = weight.shape[0]
    if up_b is not None:  # fold s * b_u into the bias of the slots it belongs to
        folded = bias.clone() if bias is not None else x.new_zeros(n_out)
        for letters, rows in runs:
            view = layout.view(folded.view(1, n_out), letters)
            view.add_(up_b[rows].view(view.shape[1:]), alpha=scale)
        bias = folded
    out = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    z = torch.addmm(down_b, x, down_w.t()) if down_b is not None else torch.mm(x, down_w.t())
    h = z.tanh_() if act == "tanh" else z.relu_() if act == "relu" else _ACTS[act](z)  # z kept for gelu only
    for letters, rows in runs:
        view = layout.view(out, letters)
        if view.dim() == 2:
            view.addmm_(h, up_w[rows].t(), alpha=scale)
        else:  # head-major slot (M, H, hd)
            view.add_(torch.mm(h, up_w[rows].t()).view(view.shape), alpha=scale)
    return out, h, z


class TorchPattProjection(torch.autograd.Function):
    """``x W^T + b`` plus PATT added into the K/V columns, with an explicit backward (no
    gradient for the frozen ``W``/``b`` unless they require one)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down_w, down_b, up_w, up_b, layout, runs, scale, act):
        out, h, z = _forward(x, weight, bias, down_w, down_b, up_w, up_b, layout, runs, scale, act)
        ctx.save_for_backward(x, weight, down_w, up_w, h, z if act == "gelu" else None)
        ctx.layout, ctx.runs, ctx.scale, ctx.act = layout, runs, scale, act
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, down_w, up_w, h, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        layout, runs, scale = ctx.layout, ctx.runs, ctx.scale
        m = g.shape[0]
        pieces = [(rows, layout.view(g, letters).reshape(m, -1)) for letters, rows in runs]  # G_p
        dh = None
        for rows, gp in pieces:
            dh = torch.mm(gp, up_w[rows]) if dh is None else dh.addmm_(gp, up_w[rows])
        dz = _act_grad(dh.mul_(scale), h, z, ctx.act)
        dx = None
        if need[0]:
            dx = torch.mm(g, weight).addmm_(dz, down_w)
        dw = torch.mm(g.t(), x) if need[1] else None
        db = g.sum(0) if need[2] else None
        dwd = torch.mm(dz.t(), x) if need[3] else None
        dbd = dz.sum(0) if need[4] else None
        du = torch.zeros_like(up_w) if need[5] else None
        dbu = torch.zeros(up_w.shape[0], device=g.device, dtype=g.dtype) if need[6] else None
        for rows, gp in pieces:
            if du is not None:
                du[rows] = torch.mm(gp.t(), h).mul_(scale)
            if dbu is not None:
                dbu[rows] = gp.sum(0).mul_(scale)
        return dx, dw, db, dwd, dbd, du, dbu, None, None, None, None


def patt_project_torch(x, weight, bias, down_w, down_b, up_w, up_b, layout, runs, scale: float, act: str) -> Tensor:
    """``(M, N)`` output of the frozen projection with PATT added (2-D ``x``); autograd only
    when something needs a gradient."""
    tensors = (x, weight, bias, down_w, down_b, up_w, up_b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return TorchPattProjection.apply(*tensors, layout, runs, scale, act)
    return _forward(*tensors, layout, runs, scale, act)[0]
