"""Triton kernels for PATT fused with the frozen qkv projection, and for the parallel adapter.

Import this module only through :mod:`vpetl.kernels` (it needs Triton, and the interpreter
is chosen when the kernels are decorated: ``TRITON_INTERPRET=1`` must be set *before* the
first import to run them on the CPU).

Notation: ``x`` ``(M, K)`` the projection input (``K = d_in``), ``W`` ``(N, K)`` the frozen
projection (``N = n * w``, the q/k/v slots), ``W_d`` ``(r, K)`` / ``b_d`` ``(r,)`` the branch's
down-projection, ``U = W_up`` ``(P, r)`` / ``b_u`` ``(P,)`` its up-projection (``P = len(positions)*w``),
``s`` the scale, and ``col(p)`` the output column that up-row ``p`` feeds (``row(n)`` its inverse,
-1 for a column no branch row feeds: the q slot of a "kv" branch).

Forward (two launches; ``K_p``/``V_p`` never exist in memory)::

    z = x W_d^T + b_d,  h = act(z)                           _hidden_kernel     (M, r)
    out[:, n] = x W[n]^T + b[n] + s * (h U[row(n)]^T + b_u[row(n)])
                                                             _project_kernel    (M, N)

``_project_kernel`` is one tiled GEMM whose K-loop runs over ``[x | h]`` against
``[W ; U gathered by row(n)]`` (the second part only in column tiles that hold K/V columns).
``h`` must be complete before that loop starts (a tanh of a partial sum is not a partial
tanh), which is why a single GEMM with an epilogue cannot compute PATT: ``h`` is a separate
skinny GEMM, computed once and read by every column tile.

Backward, with ``G = dL/d out`` ``(M, N)`` and ``G_p = G[:, col(p)]`` (dK, dV)::

    dh = s * G_p U,   dz = dh * act'(z)                      _branch_bwd_kernel (one read of G_p)
    dU = s * G_p^T h,  db_u = s * sum_m G_p                  same kernel (fp32 atomics per row block)
    dx = [G | dz] [W ; W_d]                                  _dx_kernel (one K-concatenated GEMM)
    dW_d = dz^T x,  db_d = sum_m dz                          torch.mm / sum (plain GEMM, no fusion)

The frozen ``W`` and ``b`` get no gradient unless they require one (then ``G^T x`` / ``sum G``
in torch). The adapter is the same computation with ``W`` absent, ``row = identity`` and
the MLP output ``C`` added in the epilogue: ``y = C + s * (act(x W_d^T + b_d) U^T + b_u)``.

Accumulation is fp32 for fp16/bf16/fp32 inputs; fp32 dots use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set (as ``F.linear`` does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

ACT_IDS = {"tanh": 0, "relu": 1, "gelu": 2}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 256  # dh (BM, r) and the dU partial (BP, r) stay in registers
FUSE_DW_MAX_RANK = 64  # above this the fp32 atomics for dU cost more than a second read of G_p


def _interpreting() -> bool:
    """Whether these kernels were decorated for the interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_hidden_kernel, triton.runtime.jit.JITFunction)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _activate(z, ACT: tl.constexpr):
    """act(z) in fp32: tanh (0), relu (1) or exact gelu (2)."""
    if ACT == 0:
        t = tl.exp(-2.0 * tl.abs(z))  # never overflows; tanh|z| = (1 - t) / (1 + t)
        a = (1.0 - t) / (1.0 + t)
        out = tl.where(z < 0, -a, a)
    elif ACT == 1:
        out = tl.maximum(z, 0.0)
    else:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return out


@triton.jit
def _activate_grad(dh, h, z, ACT: tl.constexpr):
    """dz = dh * act'(z), fp32; tanh and relu need only h, gelu needs z."""
    if ACT == 0:
        out = dh * (1.0 - h * h)
    elif ACT == 1:
        out = tl.where(h > 0, dh, 0.0)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = dh * (cdf + z * pdf)
    return out


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32. ``UPCAST`` (the interpreter with bf16 only: its ``tl.dot``
    multiplies bf16's raw bits) converts the operands to fp32 first, which is exact."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M row tiles sweeping the columns together
    so the row tiles of x (and h) they share stay in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _hidden_kernel(
    x_ptr, wd_ptr, bd_ptr, h_ptr, z_ptr,
    M, K, R,
    s_xm, s_xk, s_wr, s_wk, s_hm, s_hr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """``z = x W_d^T + b_d`` and ``h = act(z)``: tile ``(BM, BR)`` of the ``(M, r)`` output,
    K-loop over ``d_in``; ``z`` is stored only when the activation's gradient needs it."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(x_ptr + offs_m[:, None] * s_xm + kk[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(wd_ptr + kk[:, None] * s_wk + offs_r[None, :] * s_wr, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, PREC, UPCAST)
    _hidden_epilogue(acc, bd_ptr, h_ptr, z_ptr, offs_m, m_ok, offs_r, r_ok, s_hm, s_hr, ACT, HAS_BIAS, STORE_Z)


@triton.jit
def _hidden_epilogue(acc, bd_ptr, h_ptr, z_ptr, offs_m, m_ok, offs_r, r_ok, s_hm, s_hr,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr):
    """``z = acc + b_d`` and ``h = act(z)`` of a ``(BM, BR)`` tile stored at rows ``offs_m``,
    columns ``offs_r``; ``z`` only when the activation's gradient needs it (gelu)."""
    if HAS_BIAS:
        acc += tl.load(bd_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc, ACT)
    offs = offs_m[:, None] * s_hm + offs_r[None, :] * s_hr
    mask = m_ok[:, None] & r_ok[None, :]
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _project_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, u_ptr, bu_ptr, row_ptr, c_ptr, out_ptr,
    M, N, K, R, scale, inv_scale,
    s_xm, s_xk, s_wn, s_wk, s_hm, s_hr, s_up, s_ur, s_cm, s_cn, s_om, s_on,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BU: tl.constexpr, HAS_C: tl.constexpr,
    IDENTITY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile ``(BM, BN)`` of ``out = [x | h] [W ; s U[row(n)]]^T + b + s b_u[row(n)] (+ C)``.

    The K-loop runs over ``x``'s ``K`` columns against ``W``, then, only in tiles holding a
    branch column, over ``h``'s ``r`` columns against the gathered up-projection rows. The
    accumulator is divided by ``s`` before the branch loop and multiplied after, so the
    branch term is ``s * (h U^T)`` summed in fp32 without a second accumulator.
    """
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_BASE:
        offs_k = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            k_ok = kk < K
            a = tl.load(x_ptr + offs_m[:, None] * s_xm + kk[None, :] * s_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + kk[:, None] * s_wk + offs_n[None, :] * s_wn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, PREC, UPCAST)
    if IDENTITY:
        rows = offs_n
        row_ok = n_ok
    else:
        rows = tl.load(row_ptr + offs_n, mask=n_ok, other=-1)
        row_ok = rows >= 0
        rows = tl.where(row_ok, rows, 0)
    # tiles without a branch column (the q slot of "kv") skip the branch loop: a dynamic bound
    use = (tl.max(row_ok.to(tl.int32), axis=0) > 0) & (scale != 0.0)
    r_end = tl.where(use, R, 0)
    acc = acc * tl.where(use, inv_scale, 1.0)
    offs_j = tl.arange(0, BR)
    for j0 in range(0, r_end, BR):
        jj = j0 + offs_j
        j_ok = jj < R
        a = tl.load(h_ptr + offs_m[:, None] * s_hm + jj[None, :] * s_hr, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        b = tl.load(u_ptr + jj[:, None] * s_ur + rows[None, :] * s_up, mask=j_ok[:, None] & row_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, PREC, UPCAST)
    acc = acc * tl.where(use, scale, 1.0)
    if HAS_BU:
        acc += scale * tl.load(bu_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _branch_bwd_kernel(
    g_ptr, h_ptr, z_ptr, u_ptr, col_ptr, dz_ptr, du_ptr, dbu_ptr,
    M, P, R, scale,
    s_gm, s_gn, s_hm, s_hr, s_up, s_ur, s_zm, s_zr,
    ACT: tl.constexpr, IDENTITY: tl.constexpr, FUSE_DW: tl.constexpr, HAS_BU: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr,
):
    """One row block of ``G_p`` read once: ``dh = s G_p U`` (complete over ``P`` in registers,
    then ``dz = dh * act'(z)`` stored), and with ``FUSE_DW`` the partial ``s G_p^T h`` and
    ``s sum G_p`` of this row block atomically added to the fp32 ``dU`` / ``db_u`` buffers."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = tl.arange(0, BR)
    offs_p = tl.arange(0, BP)
    m_ok = offs_m < M
    r_ok = offs_r < R
    h = tl.load(h_ptr + offs_m[:, None] * s_hm + offs_r[None, :] * s_hr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    dh = tl.zeros((BM, BR), dtype=tl.float32)
    for p0 in range(0, P, BP):
        pp = p0 + offs_p
        p_ok = pp < P
        if IDENTITY:
            cols = pp
        else:
            cols = tl.load(col_ptr + pp, mask=p_ok, other=0)
        g = tl.load(g_ptr + offs_m[:, None] * s_gm + cols[None, :] * s_gn,
                    mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        u = tl.load(u_ptr + pp[:, None] * s_up + offs_r[None, :] * s_ur, mask=p_ok[:, None] & r_ok[None, :], other=0.0)
        dh = _dot(g, u, dh, PREC, UPCAST)
        if FUSE_DW:
            du = _dot(tl.trans(g), h, tl.zeros((BP, BR), dtype=tl.float32), PREC, UPCAST)
            tl.atomic_add(du_ptr + pp[:, None] * R + offs_r[None, :], du * scale, mask=p_ok[:, None] & r_ok[None, :])
            if HAS_BU:
                tl.atomic_add(dbu_ptr + pp, tl.sum(g.to(tl.float32), axis=0) * scale, mask=p_ok)
    z = h
    if ACT == 2:
        z = tl.load(z_ptr + offs_m[:, None] * s_zm + offs_r[None, :] * s_zr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    dz = _activate_grad(dh * scale, h.to(tl.float32), z.to(tl.float32), ACT)
    tl.store(dz_ptr + offs_m[:, None] * R + offs_r[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _dx_kernel(
    g_ptr, w_ptr, dz_ptr, wd_ptr, dx_ptr,
    M, N, K, R,
    s_gm, s_gn, s_wn, s_wk, s_dr, s_dk, s_xm, s_xk,
    HAS_BASE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile ``(BM, BK)`` of ``dx = [G | dz] [W ; W_d]``: one GEMM whose reduction runs over
    the ``N`` output columns and then the ``r`` branch columns (``dz`` is ``(M, r)`` contiguous)."""
    pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(K, BK), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    m_ok = offs_m < M
    k_ok = offs_k < K
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    if HAS_BASE:
        offs_n = tl.arange(0, BN)
        for n0 in range(0, N, BN):
            nn = n0 + offs_n
            n_ok = nn < N
            a = tl.load(g_ptr + offs_m[:, None] * s_gm + nn[None, :] * s_gn,
                        mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            b = tl.load(w_ptr + nn[:, None] * s_wn + offs_k[None, :] * s_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, PREC, UPCAST)
    offs_j = tl.arange(0, BR)
    for j0 in range(0, R, BR):
        jj = j0 + offs_j
        j_ok = jj < R
        a = tl.load(dz_ptr + offs_m[:, None] * R + jj[None, :], mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        b = tl.load(wd_ptr + jj[:, None] * s_dr + offs_k[None, :] * s_dk, mask=j_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, PREC, UPCAST)
    tl.store(dx_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk, acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreting()


# (row block, column block, reduction block, warps, stages) tried once per (N, K, r, dtype) on a
# GPU. fp32 tiles hold twice the bytes: the 16-bit shapes spill registers there (up to 17 KB on
# sm_90, 5.6 KB on sm_80); the fp32 shapes spill on neither (benchmarks/kernels_compile.py).
HALF_SHAPES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
               (64, 64, 64, 4, 4), (128, 128, 32, 4, 4))
FP32_SHAPES = ((128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3))


def _gemm_configs(a: str, b: str) -> list[triton.Config]:
    """Every tile shape of both lists (names: column block ``a``, reduction block ``b``);
    :func:`prune_configs` keeps the list that matches the operands' dtype."""
    return [triton.Config({"BM": bm, a: bn, b: bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in HALF_SHAPES + FP32_SHAPES]


# (BM, BP) of the branch backward per BR and element size, from the register reports of
# sm_90 and sm_80 (benchmarks/kernels_compile.py) with Triton 3.8 and 3.9: none of these tiles spills
# in benchmarks/results/kernels_compile_sm*.md (fp32 r = 64 at (64, 32) spilled 24 B with Triton 3.8
# on sm_90, hence (32, 32)); some autotune candidates of the other kernels do, see those reports
_BWD_TILES = {
    2: {16: (128, 64), 32: (128, 64), 64: (128, 64), 128: (64, 64), 256: (32, 32)},  # fp16, bf16
    4: {16: (64, 32), 32: (32, 32), 64: (32, 32), 128: (32, 32), 256: (32, 32)},  # fp32: 2x the registers
}
_COLUMN_BLOCK = {"project": "BN", "dx": "BK"}  # the output tile's column block; the other one is the reduction


def prune_configs(configs: list, named_args: dict, column: str, **_) -> list:
    """The autotuner's early prune: :data:`FP32_SHAPES` for fp32 operands, :data:`HALF_SHAPES`
    for fp16/bf16 (``column`` names the output tile's column block, "BN" or "BK")."""
    operand = named_args["h_ptr"] if "h_ptr" in named_args else named_args["dz_ptr"]  # project / dx
    wanted = FP32_SHAPES if operand.element_size() > 2 else HALF_SHAPES
    reduction = "BK" if column == "BN" else "BN"
    return [c for c in configs
            if (c.kwargs["BM"], c.kwargs[column], c.kwargs[reduction], c.num_warps, c.num_stages) in wanted]


_TUNED: dict[str, object] = {}


def _launcher(name: str):
    """The kernel to launch: autotuned over a few tile shapes on a GPU, fixed small tiles in
    the interpreter (where autotuning would only multiply the run time)."""
    if name not in _TUNED:
        kernel = {"project": _project_kernel, "dx": _dx_kernel}[name]
        if _interpreting():
            _TUNED[name] = kernel
        else:
            a, b = ("BN", "BK") if name == "project" else ("BK", "BN")
            prune = functools.partial(prune_configs, column=_COLUMN_BLOCK[name])
            _TUNED[name] = triton.autotune(configs=_gemm_configs(a, b), key=["N", "K", "R"],
                                           prune_configs_by={"early_config_prune": prune})(kernel)
    return _TUNED[name]


def _fixed(name: str) -> dict:
    """Block sizes for the interpreter (tests) - any size works there; 32 keeps programs few."""
    if name == "project":
        return {"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}
    return {"BM": 32, "BK": 32, "BN": 32, "GROUP_M": 4}


def hidden(x: Tensor, down_w: Tensor, down_b: Tensor | None, act: str) -> tuple[Tensor, Tensor | None]:
    """``h = act(x W_d^T + b_d)`` ``(M, r)`` in ``x``'s dtype (and ``z`` for gelu)."""
    M, K = x.shape
    R = down_w.shape[0]
    h = torch.empty((M, R), device=x.device, dtype=x.dtype)
    z = torch.empty_like(h) if act == "gelu" else None
    BR = min(_pow2(R), 128)
    if _interpreting():
        BM, BK, warps = 32, 32, 4
    elif x.element_size() > 2:  # fp32: larger tiles spill registers on sm_80 and sm_90
        BM, BK, warps = 64, 32, 8
    else:
        BM, BK, warps = (64 if BR > 64 else 128), 64, 4
    grid = (triton.cdiv(M, BM), triton.cdiv(R, BR))
    _hidden_kernel[grid](
        x, down_w, down_b if down_b is not None else x, h, z if z is not None else h,
        M, K, R,
        x.stride(0), x.stride(1), down_w.stride(0), down_w.stride(1), h.stride(0), h.stride(1),
        ACT=ACT_IDS[act], HAS_BIAS=down_b is not None, STORE_Z=z is not None,
        PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype),
        BM=BM, BR=BR, BK=BK, num_warps=warps,
    )
    return h, z


def project(
    x: Tensor | None, weight: Tensor | None, bias: Tensor | None, h: Tensor, up_w: Tensor, up_b: Tensor | None,
    rows: Tensor | None, c: Tensor | None, scale: float, out_features: int,
) -> Tensor:
    """``[x | h] [W ; s U[rows]]^T + b + s b_u[rows] (+ c)`` ``(M, out_features)``; ``x``/``weight``
    None for the adapter (``c`` given, ``rows`` None = identity)."""
    M, R = h.shape
    N = out_features
    K = x.shape[1] if x is not None else 0
    ref = c if c is not None else x
    out = torch.empty((M, N), device=h.device, dtype=h.dtype)
    kernel = _launcher("project")
    meta = {"BR": min(_pow2(R), 64 if h.dtype != torch.float32 else 32)}
    if _interpreting():
        meta.update(_fixed("project"))
        meta["BR"] = _pow2(R)

    def grid(m):
        return (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),)

    xs = (x.stride(0), x.stride(1)) if x is not None else (0, 0)
    ws = (weight.stride(0), weight.stride(1)) if weight is not None else (0, 0)
    cs = (c.stride(0), c.stride(1)) if c is not None else (0, 0)
    kernel[grid](
        x if x is not None else h, weight if weight is not None else h, bias if bias is not None else h,
        h, up_w, up_b if up_b is not None else h, rows if rows is not None else h,
        c if c is not None else h, out,
        M, N, K, R, float(scale), 1.0 / scale if scale else 1.0,
        *xs, *ws, h.stride(0), h.stride(1), up_w.stride(0), up_w.stride(1), *cs, out.stride(0), out.stride(1),
        HAS_BASE=x is not None, HAS_BIAS=bias is not None, HAS_BU=up_b is not None and scale != 0,
        HAS_C=c is not None, IDENTITY=rows is None, PREC=_precision(ref.dtype), UPCAST=_upcast(ref.dtype), **meta,
    )
    return out


def branch_backward(
    g: Tensor, h: Tensor, z: Tensor | None, up_w: Tensor, cols: Tensor | None, scale: float, act: str,
    fuse_dw: bool, need_bu: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``dz`` ``(M, r)`` and, with ``fuse_dw``, fp32 ``dU`` ``(P, r)`` and ``db_u`` ``(P,)``
    from one read of ``G_p = g[:, cols]`` (``cols`` None = identity)."""
    M, R = h.shape
    P = up_w.shape[0]
    dz = torch.empty((M, R), device=h.device, dtype=h.dtype)
    du = torch.zeros((P, R), device=h.device, dtype=torch.float32) if fuse_dw else None
    dbu = torch.zeros((P,), device=h.device, dtype=torch.float32) if fuse_dw and need_bu else None
    BR = _pow2(R)
    if _interpreting():
        BM, BP, warps = 32, 32, 4
    else:
        BM, BP = _BWD_TILES[min(h.element_size(), 4)][BR]
        warps = 8
    _branch_bwd_kernel[(triton.cdiv(M, BM),)](
        g, h, z if z is not None else h, up_w, cols if cols is not None else h, dz,
        du if du is not None else dz, dbu if dbu is not None else dz,
        M, P, R, float(scale),
        g.stride(0), g.stride(1), h.stride(0), h.stride(1), up_w.stride(0), up_w.stride(1),
        (z if z is not None else h).stride(0), (z if z is not None else h).stride(1),
        ACT=ACT_IDS[act], IDENTITY=cols is None, FUSE_DW=fuse_dw, HAS_BU=dbu is not None,
        PREC=_precision(h.dtype), UPCAST=_upcast(h.dtype), BM=BM, BP=BP, BR=BR, num_warps=warps,
    )
    return dz, du, dbu


def grad_input(g: Tensor, weight: Tensor | None, dz: Tensor, down_w: Tensor, like: Tensor) -> Tensor:
    """``dx = [g | dz] [W ; W_d]`` ``(M, K)`` (``weight`` None: ``dz W_d`` only)."""
    M, R = dz.shape
    K = down_w.shape[1]
    N = weight.shape[0] if weight is not None else 0
    dx = torch.empty((M, K), device=dz.device, dtype=like.dtype)
    kernel = _launcher("dx")
    meta = {"BR": min(_pow2(R), 64 if dz.dtype != torch.float32 else 32)}
    if _interpreting():
        meta.update(_fixed("dx"))
        meta["BR"] = _pow2(R)

    def grid(m):
        return (triton.cdiv(M, m["BM"]) * triton.cdiv(K, m["BK"]),)

    ws = (weight.stride(0), weight.stride(1)) if weight is not None else (0, 0)
    kernel[grid](
        g, weight if weight is not None else dz, dz, down_w, dx,
        M, N, K, R,
        g.stride(0), g.stride(1), *ws, down_w.stride(0), down_w.stride(1), dx.stride(0), dx.stride(1),
        HAS_BASE=weight is not None, PREC=_precision(dz.dtype), UPCAST=_upcast(dz.dtype), **meta,
    )
    return dx


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotMap:
    """Where the up-projection's rows land: ``rows[n]`` = up-row feeding output column ``n``
    (-1: none), ``cols[p]`` = output column of up-row ``p``; int32 on the tensors' device."""

    rows: Tensor
    cols: Tensor


def _weight_grads(g: Tensor, h: Tensor, cols: Tensor | None, scale: float, need_u: bool, need_bu: bool):
    """``s G_p^T h`` and ``s sum G_p`` with torch (deterministic; large ranks)."""
    gp = g if cols is None else g.index_select(1, cols)
    du = torch.mm(gp.t(), h).mul_(scale) if need_u else None
    dbu = gp.sum(0, dtype=torch.float32).mul_(scale) if need_bu else None
    return du, dbu


def _branch_grads(ctx, g: Tensor, h: Tensor, z: Tensor | None, up_w: Tensor, cols: Tensor | None):
    need_u, need_bu = ctx.needs_input_grad[ctx.u_index], ctx.needs_input_grad[ctx.u_index + 1]
    fuse = (need_u or need_bu) and h.shape[1] <= FUSE_DW_MAX_RANK and not torch.are_deterministic_algorithms_enabled()
    dz, du, dbu = branch_backward(g, h, z, up_w, cols, ctx.scale, ctx.act, fuse, need_bu)
    if not fuse:
        du, dbu = _weight_grads(g, h, cols, ctx.scale, need_u, need_bu)
    du = du.to(up_w.dtype) if need_u else None
    dbu = dbu.to(up_w.dtype) if need_bu else None
    return dz, du, dbu


class PattProjection(torch.autograd.Function):
    """``x W^T + b`` with PATT's ``s * (act(x W_d^T + b_d) U^T + b_u)`` added to the K/V columns
    named by ``slots``; all 2-D, ``x`` ``(M, d_in)`` -> ``(M, N)``. See the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, down_w, down_b, up_w, up_b, slots: SlotMap, scale: float, act: str):
        h, z = hidden(x, down_w, down_b, act)
        out = project(x, weight, bias, h, up_w, up_b, slots.rows, None, scale, weight.shape[0])
        ctx.save_for_backward(x, weight, down_w, up_w, h, z)
        ctx.slots, ctx.scale, ctx.act, ctx.u_index = slots, scale, act, 5
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, down_w, up_w, h, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not (need[0] or any(need[3:7])):  # only the frozen base asked for gradients
            return None, torch.mm(g.t(), x) if need[1] else None, g.sum(0) if need[2] else None, *[None] * 7
        dz, du, dbu = _branch_grads(ctx, g, h, z, up_w, ctx.slots.cols)
        dx = grad_input(g, weight, dz, down_w, x) if need[0] else None
        dw = torch.mm(g.t(), x) if need[1] else None
        db = g.sum(0, dtype=torch.float32).to(g.dtype) if need[2] else None
        dwd = torch.mm(dz.t(), x).to(down_w.dtype) if need[3] else None
        dbd = dz.sum(0, dtype=torch.float32).to(down_w.dtype) if need[4] else None
        return dx, dw, db, dwd, dbd, du, dbu, None, None, None


class AdapterAdd(torch.autograd.Function):
    """``c + s * (act(x W_d^T + b_d) U^T + b_u)``, all ``(M, .)``; the MLP output ``c``'s
    gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, c, x, down_w, down_b, up_w, up_b, scale: float, act: str):
        h, z = hidden(x, down_w, down_b, act)
        out = project(None, None, None, h, up_w, up_b, None, c, scale, c.shape[1])
        ctx.save_for_backward(x, down_w, up_w, h, z)
        ctx.scale, ctx.act, ctx.u_index = scale, act, 4
        return out

    @staticmethod
    def backward(ctx, g):
        x, down_w, up_w, h, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        dz, du, dbu = _branch_grads(ctx, g, h, z, up_w, None)
        dx = grad_input(g, None, dz, down_w, x) if need[1] else None
        dwd = torch.mm(dz.t(), x).to(down_w.dtype) if need[2] else None
        dbd = dz.sum(0, dtype=torch.float32).to(down_w.dtype) if need[3] else None
        return (g if need[0] else None), dx, dwd, dbd, du, dbu, None, None


def patt_project(x, weight, bias, down_w, down_b, up_w, up_b, slots: SlotMap, scale: float, act: str) -> Tensor:
    """Functional entry point of :class:`PattProjection` (2-D ``x``)."""
    return PattProjection.apply(x, weight, bias, down_w, down_b, up_w, up_b, slots, scale, act)


def adapter_add(c, x, down_w, down_b, up_w, up_b, scale: float, act: str) -> Tensor:
    """Functional entry point of :class:`AdapterAdd` (2-D ``c`` and ``x``)."""
    return AdapterAdd.apply(c, x, down_w, down_b, up_w, up_b, scale, act)
