"""Grouped Triton kernels: the PATT branches of many tasks on one frozen projection, one launch per step.

Import through :mod:`vpetl.kernels` only (``TRITON_INTERPRET=1`` must be set before the first
import to run on the CPU), like :mod:`vpetl.kernels.patt_triton`, whose notation, helpers and
accumulation rules these kernels share.

A mixed batch routes every sample to a task (:mod:`vpetl.multitask`). Its rows are cut into
*segments*, runs of consecutive rows of one task (task ``-1``: no branch here, the plain
base), and the segments into row tiles of at most ``BM`` rows that never cross a segment
boundary: the tile map ``tiles`` ``(n, 3)`` int32 holds ``(task, first row, end row)`` per tile,
so each program reads exactly one task's branch weights (the segmented-GEMM idea of multi-LoRA
serving, here for a nonlinear branch). The ``T`` tasks' weights are stacked and padded to one
rank ``R`` (zero rows give ``h = act(0) = 0``, which adds nothing)::

    W_d (T, R, K)   b_d (T, R)   U (T, P, R)   b_u (T, P)   s (T,) fp32

Forward (two launches; the rows are never gathered or sorted)::

    h[m]      = act(x[m] W_d[t]^T + b_d[t])                      _grouped_hidden_kernel   task tiles
    out[m, n] = x[m] W[n]^T + b[n]
                + s_t (h[m] U_t[row(n)]^T + b_u_t[row(n)])       _grouped_project_kernel  every tile

Backward, ``G = dL/d out``, ``G_p = G[:, col(p)]``::

    dz[m]  = s_t G_p[m] U_t * act'(z[m]);  dU_t += s_t G_p^T h,  db_u_t += s_t sum G_p
                                                                 _grouped_branch_bwd_kernel (fp32 atomics)
    dx[m]  = G[m] W + dz[m] W_d[t]                               _grouped_dx_kernel
    dW_d[t] = dz_t^T x_t,  db_d[t] = sum dz_t                    torch, once per task

The tiles are fixed (not autotuned): ``BM`` is the tile map's row block, so it must be known
when the map is cut. They were chosen from the ahead-of-time compile reports, not from timings
on a GPU (none was available to measure them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .patt_triton import (
    ACT_IDS, FUSE_DW_MAX_RANK, MAX_RANK, SUPPORTED_DTYPES, SlotMap, _activate_grad, _dot, _hidden_epilogue,
    _interpreting, _pow2, _precision, _upcast,
)

__all__ = ["MAX_RANK", "SUPPORTED_DTYPES", "Segments", "block_rows", "grouped_patt_project", "segments"]


# --------------------------------------------------------------------------------------------
# the tile map
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segments:
    """Where each task's rows are, for the grouped kernels.

    ``tiles`` ``(n, 3)`` int32 on the device: ``(task, first row, end row)`` of every row tile
    (task -1: the plain base); ``task_tiles``: the tiles with a task; ``rows``: per task, its
    rows as int64 indices (for the per-task weight gradients); ``block``: the row block ``BM``
    the tiles were cut for.
    """

    tiles: Tensor
    task_tiles: Tensor
    rows: tuple[Tensor, ...]
    block: int


def block_rows() -> int:
    """``BM`` of the grouped kernels: 64 on a GPU, 16 in the interpreter (small test problems
    then still span several tiles per segment)."""
    return 16 if _interpreting() else 64


def segments(runs: list[tuple[int, int, int]], tasks: int, block: int, device: torch.device) -> Segments:
    """The tile map of ``runs``, ``(task, first row, end row)`` in row order covering every row
    once (task -1 for rows without a branch), cut into tiles of at most ``block`` rows."""
    tiles = [(t, s, min(s + block, end)) for t, start, end in runs for s in range(start, end, block)]
    rows = [[] for _ in range(tasks)]
    for t, start, end in runs:
        if t >= 0:
            rows[t].append(torch.arange(start, end))
    table = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3)
    return Segments(
        tiles=table.to(device),
        task_tiles=table[table[:, 0] >= 0].contiguous().to(device),
        rows=tuple(torch.cat(r).to(device) if r else torch.empty(0, dtype=torch.int64, device=device) for r in rows),
        block=block,
    )


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile(tiles_ptr, pid):
    """``(task, first row, end row)`` of row tile ``pid``."""
    return tl.load(tiles_ptr + 3 * pid), tl.load(tiles_ptr + 3 * pid + 1), tl.load(tiles_ptr + 3 * pid + 2)


@triton.jit
def _accumulate(acc, a_ptr, s_am, s_ak, b_ptr, s_bk, s_bn, offs_m, m_ok, offs_n, n_ok, K,
                PREC: tl.constexpr, UPCAST: tl.constexpr, BK: tl.constexpr):
    """``acc + A[offs_m, :K] B[:K, offs_n]`` in fp32, the reduction in blocks of ``BK``; ``K``
    may be 0 at run time (a tile that skips a branch)."""
    offs_k = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(a_ptr + offs_m[:, None] * s_am + kk[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + offs_n[None, :] * s_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, PREC, UPCAST)
    return acc


@triton.jit
def _grouped_hidden_kernel(
    x_ptr, wd_ptr, bd_ptr, h_ptr, z_ptr, tiles_ptr,
    K, R,
    s_xm, s_xk, s_wt, s_wr, s_wk, s_bt, s_hm, s_hr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """``h = act(x W_d[t]^T + b_d[t])`` on one task tile's rows, columns ``(BR,)`` block ``pid_r``."""
    task, start, end = _tile(tiles_ptr, tl.program_id(0))
    offs_m = start + tl.arange(0, BM)
    offs_r = tl.program_id(1) * BR + tl.arange(0, BR)
    m_ok = offs_m < end
    r_ok = offs_r < R
    acc = _accumulate(tl.zeros((BM, BR), dtype=tl.float32), x_ptr, s_xm, s_xk, wd_ptr + task * s_wt, s_wk, s_wr,
                      offs_m, m_ok, offs_r, r_ok, K, PREC, UPCAST, BK)
    _hidden_epilogue(acc, bd_ptr + task * s_bt, h_ptr, z_ptr, offs_m, m_ok, offs_r, r_ok, s_hm, s_hr,
                     ACT, HAS_BIAS, STORE_Z)


@triton.jit
def _grouped_project_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, u_ptr, bu_ptr, scale_ptr, row_ptr, tiles_ptr, out_ptr,
    N, K, R,
    s_xm, s_xk, s_wn, s_wk, s_hm, s_hr, s_ut, s_up, s_ur, s_bt, s_om, s_on,
    HAS_BIAS: tl.constexpr, HAS_BU: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """Tile ``(BM, BN)`` of ``out = x W^T + b + s_t (h U_t[row(n)]^T + b_u_t[row(n)])`` for the
    rows of one tile (one task, or -1: the base alone). As in ``_project_kernel`` the
    accumulator is divided by ``s_t`` before the branch loop and multiplied after."""
    task, start, end = _tile(tiles_ptr, tl.program_id(0))
    offs_m = start + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok = offs_m < end
    n_ok = offs_n < N
    acc = _accumulate(tl.zeros((BM, BN), dtype=tl.float32), x_ptr, s_xm, s_xk, w_ptr, s_wk, s_wn,
                      offs_m, m_ok, offs_n, n_ok, K, PREC, UPCAST, BK)
    t = tl.maximum(task, 0)
    scale = tl.load(scale_ptr + t)
    rows = tl.load(row_ptr + offs_n, mask=n_ok, other=-1)
    row_ok = rows >= 0
    rows = tl.where(row_ok, rows, 0)
    # base tiles and tiles without a branch column skip the branch loop: a dynamic bound
    use = (task >= 0) & (tl.max(row_ok.to(tl.int32), axis=0) > 0) & (scale != 0.0)
    r_end = tl.where(use, R, 0)
    acc = acc * tl.where(use, 1.0 / tl.where(use, scale, 1.0), 1.0)
    # h (BM, r) against U_t's rows gathered by row(n); masked columns (no branch row) load zeros
    acc = _accumulate(acc, h_ptr, s_hm, s_hr, u_ptr + t * s_ut, s_ur, s_up, offs_m, m_ok, rows, row_ok, r_end,
                      PREC, UPCAST, BR)
    acc = acc * tl.where(use, scale, 1.0)
    if HAS_BU:  # base tiles read task 0's bias and add it times 0 (a scalar in a mask breaks Triton 3.9's interpreter)
        bu = tl.load(bu_ptr + t * s_bt + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc += tl.where(use, scale, 0.0) * bu[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_branch_bwd_kernel(
    g_ptr, h_ptr, z_ptr, u_ptr, col_ptr, scale_ptr, tiles_ptr, dz_ptr, du_ptr, dbu_ptr,
    P, R,
    s_gm, s_gn, s_hm, s_hr, s_ut, s_up, s_ur, s_zm, s_zr,
    ACT: tl.constexpr, FUSE_DW: tl.constexpr, HAS_BU: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr,
):
    """One task tile of ``G_p`` read once: ``dz = (s_t G_p U_t) * act'(z)`` stored, and with
    ``FUSE_DW`` the tile's ``s_t G_p^T h`` and ``s_t sum G_p`` atomically added to task ``t``'s
    fp32 ``dU`` ``(T, P, R)`` / ``db_u`` ``(T, P)``."""
    task, start, end = _tile(tiles_ptr, tl.program_id(0))
    scale = tl.load(scale_ptr + task)
    offs_m = start + tl.arange(0, BM)
    offs_r = tl.arange(0, BR)
    offs_p = tl.arange(0, BP)
    m_ok = offs_m < end
    r_ok = offs_r < R
    u = u_ptr + task * s_ut
    h = tl.load(h_ptr + offs_m[:, None] * s_hm + offs_r[None, :] * s_hr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    dh = tl.zeros((BM, BR), dtype=tl.float32)
    for p0 in range(0, P, BP):
        pp = p0 + offs_p
        p_ok = pp < P
        cols = tl.load(col_ptr + pp, mask=p_ok, other=0)
        g = tl.load(g_ptr + offs_m[:, None] * s_gm + cols[None, :] * s_gn, mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        w = tl.load(u + pp[:, None] * s_up + offs_r[None, :] * s_ur, mask=p_ok[:, None] & r_ok[None, :], other=0.0)
        dh = _dot(g, w, dh, PREC, UPCAST)
        if FUSE_DW:
            du = _dot(tl.trans(g), h, tl.zeros((BP, BR), dtype=tl.float32), PREC, UPCAST)
            tl.atomic_add(du_ptr + task * P * R + pp[:, None] * R + offs_r[None, :], du * scale,
                          mask=p_ok[:, None] & r_ok[None, :])
            if HAS_BU:
                tl.atomic_add(dbu_ptr + task * P + pp, tl.sum(g.to(tl.float32), axis=0) * scale, mask=p_ok)
    z = h
    if ACT == 2:
        z = tl.load(z_ptr + offs_m[:, None] * s_zm + offs_r[None, :] * s_zr, mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0)
    dz = _activate_grad(dh * scale, h.to(tl.float32), z.to(tl.float32), ACT)
    tl.store(dz_ptr + offs_m[:, None] * R + offs_r[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _grouped_dx_kernel(
    g_ptr, w_ptr, dz_ptr, wd_ptr, tiles_ptr, dx_ptr,
    N, K, R,
    s_gm, s_gn, s_wn, s_wk, s_dt, s_dr, s_dk, s_xm, s_xk,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    """Tile ``(BM, BK)`` of ``dx = G W + dz W_d[t]`` for one row tile (base tiles: ``G W`` only)."""
    task, start, end = _tile(tiles_ptr, tl.program_id(0))
    offs_m = start + tl.arange(0, BM)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m_ok = offs_m < end
    k_ok = offs_k < K
    acc = _accumulate(tl.zeros((BM, BK), dtype=tl.float32), g_ptr, s_gm, s_gn, w_ptr, s_wn, s_wk,
                      offs_m, m_ok, offs_k, k_ok, N, PREC, UPCAST, BN)
    acc = _accumulate(acc, dz_ptr, R, 1, wd_ptr + tl.maximum(task, 0) * s_dt, s_dr, s_dk, offs_m, m_ok, offs_k, k_ok,
                      tl.where(task >= 0, R, 0), PREC, UPCAST, BR)
    tl.store(dx_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk, acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _tiles(dtype: torch.dtype, r_block: int) -> dict:
    """Column/reduction blocks and warps of the GEMM kernels (``BM`` comes from the tile map):
    fp32 tiles hold twice the bytes of 16-bit ones, so they are narrower."""
    if _interpreting():
        return {"BN": 32, "BK": 32, "BR": r_block, "num_warps": 4}
    wide = torch.finfo(dtype).bits > 16
    return {"BN": 64 if wide else 128, "BK": 32 if wide else 64, "BR": min(r_block, 32 if wide else 64),
            "num_warps": 4 if wide else 8, "num_stages": 3}


def _hidden(x: Tensor, down_w: Tensor, down_b: Tensor | None, seg: Segments, act: str):
    M, K = x.shape
    R = down_w.shape[1]
    h = torch.empty((M, R), device=x.device, dtype=x.dtype)  # rows of base tiles stay unwritten and unread
    z = torch.empty_like(h) if act == "gelu" else None
    BR = min(_pow2(R), 128)
    BK, warps = (32, 4) if _interpreting() else (32, 8) if x.element_size() > 2 else (64, 4)
    grid = (seg.task_tiles.shape[0], triton.cdiv(R, BR))
    _grouped_hidden_kernel[grid](
        x, down_w, down_b if down_b is not None else x, h, z if z is not None else h, seg.task_tiles,
        K, R,
        x.stride(0), x.stride(1), down_w.stride(0), down_w.stride(1), down_w.stride(2),
        down_b.stride(0) if down_b is not None else 0, h.stride(0), h.stride(1),
        ACT=ACT_IDS[act], HAS_BIAS=down_b is not None, STORE_Z=z is not None,
        PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype), BM=seg.block, BR=BR, BK=BK, num_warps=warps,
    )
    return h, z


def _project(x, weight, bias, h, up_w, up_b, scales, slots: SlotMap, seg: Segments) -> Tensor:
    M, K = x.shape
    N, R = weight.shape[0], h.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    meta = _tiles(x.dtype, _pow2(R))
    grid = (seg.tiles.shape[0], triton.cdiv(N, meta["BN"]))
    _grouped_project_kernel[grid](
        x, weight, bias if bias is not None else x, h, up_w, up_b if up_b is not None else x, scales, slots.rows,
        seg.tiles, out,
        N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
        up_w.stride(0), up_w.stride(1), up_w.stride(2), up_b.stride(0) if up_b is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_BU=up_b is not None, PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype),
        BM=seg.block, **meta,
    )
    return out


def _branch_backward(g, h, z, up_w, scales, slots: SlotMap, seg: Segments, act: str, fuse_dw: bool, need_bu: bool):
    M, R = h.shape
    T, P = up_w.shape[:2]
    dz = torch.empty((M, R), device=h.device, dtype=h.dtype)
    du = torch.zeros((T, P, R), device=h.device, dtype=torch.float32) if fuse_dw else None
    dbu = torch.zeros((T, P), device=h.device, dtype=torch.float32) if fuse_dw and need_bu else None
    BR = _pow2(R)
    # the row block is the tile map's (64 on a GPU); fp32 at r >= 64 holds dh and the dU partial
    # in registers with a narrower column block (benchmarks/results/kernels_compile_grouped_sm*.md)
    BP = 32 if _interpreting() else (16 if BR >= 64 else 32) if h.element_size() > 2 else (64 if BR <= 64 else 32)
    zz = z if z is not None else h
    _grouped_branch_bwd_kernel[(seg.task_tiles.shape[0],)](
        g, h, zz, up_w, slots.cols, scales, seg.task_tiles, dz, du if du is not None else dz,
        dbu if dbu is not None else dz,
        P, R,
        g.stride(0), g.stride(1), h.stride(0), h.stride(1), up_w.stride(0), up_w.stride(1), up_w.stride(2),
        zz.stride(0), zz.stride(1),
        ACT=ACT_IDS[act], FUSE_DW=fuse_dw, HAS_BU=dbu is not None, PREC=_precision(h.dtype), UPCAST=_upcast(h.dtype),
        BM=seg.block, BP=BP, BR=BR, num_warps=4 if _interpreting() else 8,
    )
    return dz, du, dbu


def _grad_input(g, weight, dz, down_w, seg: Segments, like: Tensor) -> Tensor:
    M, R = dz.shape
    N, K = weight.shape
    dx = torch.empty((M, K), device=dz.device, dtype=like.dtype)
    meta = _tiles(dz.dtype, _pow2(R))
    meta["BN"], meta["BK"] = meta["BK"], meta["BN"]  # the output's columns are K here, the reduction N
    grid = (seg.tiles.shape[0], triton.cdiv(K, meta["BK"]))
    _grouped_dx_kernel[grid](
        g, weight, dz, down_w, seg.tiles, dx,
        N, K, R,
        g.stride(0), g.stride(1), weight.stride(0), weight.stride(1),
        down_w.stride(0), down_w.stride(1), down_w.stride(2), dx.stride(0), dx.stride(1),
        PREC=_precision(dz.dtype), UPCAST=_upcast(dz.dtype), BM=seg.block, **meta,
    )
    return dx


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class GroupedPattProjection(torch.autograd.Function):
    """``x W^T + b`` with task ``t``'s PATT branch added to the K/V columns of the rows of ``t``
    (module docstring); 2-D ``x`` ``(M, K)`` -> ``(M, N)``, stacked branch weights."""

    @staticmethod
    def forward(ctx, x, weight, bias, down_w, down_b, up_w, up_b, scales, slots: SlotMap, seg: Segments, act: str):
        h, z = _hidden(x, down_w, down_b, seg, act)
        out = _project(x, weight, bias, h, up_w, up_b, scales, slots, seg)
        ctx.save_for_backward(x, weight, down_w, up_w, scales, h, z)
        ctx.slots, ctx.seg, ctx.act = slots, seg, act
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, down_w, up_w, scales, h, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        seg, cols = ctx.seg, ctx.slots.cols
        g = g.contiguous()
        dw = torch.mm(g.t(), x) if need[1] else None
        db = g.sum(0, dtype=torch.float32).to(g.dtype) if need[2] else None
        if not (need[0] or any(need[3:7])):  # only the frozen base asked for gradients
            return None, dw, db, *[None] * 8
        need_u, need_bu = need[5], need[6]
        fuse = (need_u or need_bu) and h.shape[1] <= FUSE_DW_MAX_RANK and not torch.are_deterministic_algorithms_enabled()
        dz, du, dbu = _branch_backward(g, h, z, up_w, scales, ctx.slots, seg, ctx.act, fuse, need_bu)
        dx = _grad_input(g, weight, dz, down_w, seg, x) if need[0] else None
        dwd = torch.zeros_like(down_w) if need[3] else None
        dbd = torch.zeros(down_w.shape[:2], device=x.device, dtype=down_w.dtype) if need[4] else None
        if not fuse:
            du = torch.zeros(up_w.shape, device=x.device, dtype=torch.float32) if need_u else None
            dbu = torch.zeros(up_w.shape[:2], device=x.device, dtype=torch.float32) if need_bu else None
        for t, rows in enumerate(seg.rows):
            if rows.numel() == 0:
                continue
            dz_t = dz.index_select(0, rows)
            if dwd is not None:
                dwd[t] = torch.mm(dz_t.t(), x.index_select(0, rows)).to(dwd.dtype)
            if dbd is not None:
                dbd[t] = dz_t.sum(0, dtype=torch.float32).to(dbd.dtype)
            if not fuse and (need_u or need_bu):
                gp = g.index_select(0, rows).index_select(1, cols.long())
                s = scales[t]
                if du is not None:
                    du[t] = torch.mm(gp.t().float(), h.index_select(0, rows).float()) * s
                if dbu is not None:
                    dbu[t] = gp.sum(0, dtype=torch.float32) * s
        du = du.to(up_w.dtype) if need_u else None
        dbu = dbu.to(up_w.dtype) if need_bu else None
        return dx, dw, db, dwd, dbd, du, dbu, None, None, None, None


def grouped_patt_project(x, weight, bias, down_w, down_b, up_w, up_b, scales: Tensor, slots: SlotMap,
                         seg: Segments, act: str) -> Tensor:
    """Functional entry point of :class:`GroupedPattProjection`: ``x`` ``(M, K)``, ``weight``
    ``(N, K)``, stacked ``down_w`` ``(T, R, K)``, ``down_b`` ``(T, R)``, ``up_w`` ``(T, P, R)``,
    ``up_b`` ``(T, P)`` (biases may be None), ``scales`` ``(T,)`` fp32, all on one device."""
    return GroupedPattProjection.apply(x, weight, bias, down_w, down_b, up_w, up_b, scales, slots, seg, act)
