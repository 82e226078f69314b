"""The Triton kernels of `_segmented` (imported on the first call: this module needs
``triton``, which a CPU-only machine may lack).

Rows are packed: ``q [tq, h, d]``, ``k, v [tk, h, d]`` (any row and head stride, unit
stride along ``d``), segment ``s`` owning query rows ``cu_q[s]:cu_q[s + 1]`` and key rows
``cu_k[s]:cu_k[s + 1]``. Every program reads its segment's bounds from the device, so no
length ever reaches the host; programs past their segment's end return at once.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634


def _on(x: Tensor) -> Any:
    """Triton launches on the current CUDA device: make it ``x``'s for the launches."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@triton.jit
def _rows_at(X, rows, h, cols, st, sh):
    """Pointers to the ``rows x cols`` tile of head ``h`` of packed rows ``X [t, h, d]``."""
    return X + rows[:, None] * st + h * sh + cols[None, :]


@triton.jit
def _load_rows(X, rows, valid, h, cols, st, sh):
    """The ``rows x cols`` tile of head ``h`` of ``X [t, h, d]``; rows not ``valid`` read 0."""
    return tl.load(_rows_at(X, rows, h, cols, st, sh), mask=valid[:, None], other=0.0)


@triton.jit
def _fwd(
    Q, K, V, Out, LSE, CQ, CK,
    sqt, sqh, skt, skh, svt, svh, sot, soh,
    TQ, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    q_lo = tl.load(CQ + seg)
    q_hi = tl.load(CQ + seg + 1)
    start = q_lo + pid_m * BLOCK_M
    if start >= q_hi:
        return
    k_lo = tl.load(CK + seg)
    k_hi = tl.load(CK + seg + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mm = offs_m < q_hi
    q = _load_rows(Q, offs_m, mm, h, offs_d, sqt, sqh)
    mx = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < k_hi
        k = _load_rows(K, offs_n, mn, h, offs_d, skt, skh)
        v = _load_rows(V, offs_n, mn, h, offs_d, svt, svh)
        qk = tl.where(mn[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        new = tl.maximum(mx, tl.max(qk, 1) * scale2)  # log2 domain; finite: a real key
        alpha = tl.exp2(mx - new)
        p = tl.exp2(qk * scale2 - new[:, None])  # one fused multiply-add per score
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        mx = new
    # a segment without keys: its rows are 0 (as flash leaves them), log-sum-exp 0
    some = den > 0.0
    o = acc / tl.where(some, den, 1.0)[:, None]
    tl.store(
        _rows_at(Out, offs_m, h, offs_d, sot, soh), o.to(Out.dtype.element_ty), mask=mm[:, None]
    )
    lse = tl.where(some, mx + tl.log2(tl.where(some, den, 1.0)), 0.0)
    tl.store(LSE + h * TQ + offs_m, lse, mask=mm)


@triton.jit
def _bwd_q(
    Q, K, V, Out, DO, LSE, DELTA, DQ, CQ, CK,
    sqt, sqh, skt, skh, svt, svh, sot, soh, sdot, sdoh, sdqt, sdqh,
    TQ, scale, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``dq`` of one block of queries, and the rows' ``delta = sum(o * do)`` (read by
    `_bwd_kv`, launched after this kernel on the same stream)."""
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    q_lo = tl.load(CQ + seg)
    q_hi = tl.load(CQ + seg + 1)
    start = q_lo + pid_m * BLOCK_M
    if start >= q_hi:
        return
    k_lo = tl.load(CK + seg)
    k_hi = tl.load(CK + seg + 1)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mm = offs_m < q_hi
    q = _load_rows(Q, offs_m, mm, h, offs_d, sqt, sqh)
    o = _load_rows(Out, offs_m, mm, h, offs_d, sot, soh)
    do = _load_rows(DO, offs_m, mm, h, offs_d, sdot, sdoh)
    lse = tl.load(LSE + h * TQ + offs_m, mask=mm, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * TQ + offs_m, delta, mask=mm)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < k_hi
        k = _load_rows(K, offs_n, mn, h, offs_d, skt, skh)
        v = _load_rows(V, offs_n, mn, h, offs_d, svt, svh)
        p = tl.where(mn[None, :], tl.exp2(tl.dot(q, tl.trans(k)) * scale2 - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    tl.store(
        _rows_at(DQ, offs_m, h, offs_d, sdqt, sdqh), dq.to(DQ.dtype.element_ty), mask=mm[:, None]
    )


@triton.jit
def _bwd_kv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CQ, CK,
    sqt, sqh, skt, skh, svt, svh, sdot, sdoh, sdkt, sdkh,
    TQ, scale, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``dk, dv`` of one block of keys (DK and DV share their strides). Keys of a segment
    without queries get zero gradients."""
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    h = tl.program_id(2)
    k_lo = tl.load(CK + seg)
    k_hi = tl.load(CK + seg + 1)
    start = k_lo + pid_n * BLOCK_N
    if start >= k_hi:
        return
    q_lo = tl.load(CQ + seg)
    q_hi = tl.load(CQ + seg + 1)
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mn = offs_n < k_hi
    k = _load_rows(K, offs_n, mn, h, offs_d, skt, skh)
    v = _load_rows(V, offs_n, mn, h, offs_d, svt, svh)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # Transposed products (keys as rows): the wide key block is every product's M, as
    # Hopper's warpgroup MMA wants, and p, ds need no transposes.
    for m0 in range(q_lo, q_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mm = offs_m < q_hi
        qT = tl.load(
            Q + offs_m[None, :] * sqt + h * sqh + offs_d[:, None], mask=mm[None, :], other=0.0
        )
        do = _load_rows(DO, offs_m, mm, h, offs_d, sdot, sdoh)
        lse = tl.load(LSE + h * TQ + offs_m, mask=mm, other=0.0)
        delta = tl.load(DELTA + h * TQ + offs_m, mask=mm, other=0.0)
        sT = tl.dot(k, qT)  # [BLOCK_N, BLOCK_M]
        pT = tl.where(mn[:, None] & mm[None, :], tl.exp2(sT * scale2 - lse[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    dk = dk * scale
    tl.store(
        _rows_at(DK, offs_n, h, offs_d, sdkt, sdkh), dk.to(DK.dtype.element_ty), mask=mn[:, None]
    )
    tl.store(
        _rows_at(DV, offs_n, h, offs_d, sdkt, sdkh), dv.to(DV.dtype.element_ty), mask=mn[:, None]
    )


# (block_m, block_n, num_warps, num_stages) per head dim. Head dims 16 and 32: the fastest
# of `benchmarks/run.py`'s sweep (CROSSMAE_BENCH_SEGMENTED_SWEEP=1) on the H200 at the
# water model's shapes (2026-12-03, benchmarks/RESULTS.md: 1110 x 7892 at d=16, 7892 x
# 7892 at d=32; each a few percent over the first guesses). Head dims 64 and 128: not
# measured, flash attention's usual tiles. The dq kernel walks keys in narrow blocks under
# a block of queries, the dk/dv kernel queries in narrow blocks beside a tall block of keys.
FWD_CONFIG: dict[int, tuple[int, int, int, int]] = {
    16: (64, 128, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (64, 64, 4, 2),
}  # fmt: skip
BWD_Q_CONFIG: dict[int, tuple[int, int, int, int]] = {
    16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (128, 32, 4, 2), 128: (64, 32, 4, 2),
}  # fmt: skip
BWD_KV_CONFIG: dict[int, tuple[int, int, int, int]] = {
    16: (16, 128, 4, 2), 32: (64, 64, 4, 2), 64: (32, 128, 4, 2), 128: (32, 64, 4, 2),
}  # fmt: skip


def forward(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Output ``[tq, h, d]`` (contiguous) and the rows' log2-sum-exp ``[h, tq]``."""
    tq, h, d = q.shape
    o = torch.empty(tq, h, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(h, tq, device=q.device, dtype=torch.float32)
    block_m, block_n, warps, stages = FWD_CONFIG[d]
    grid = (triton.cdiv(max(max_q, 1), block_m), cu_q.shape[0] - 1, h)
    with _on(q):
        _fwd[grid](
            q, k, v, o, lse, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1),
            tq, scale * _LOG2E,
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return o, lse


def backward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor,
    cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``dq [tq, h, d]``, ``dk, dv [tk, h, d]``, contiguous. ``do`` may come in any layout
    (autograd hands expanded or permuted gradients): the kernels read it contiguous."""
    do = do.contiguous()
    tq, h, d = q.shape
    tk = k.shape[0]
    dq = torch.empty(tq, h, d, device=q.device, dtype=q.dtype)
    dk = torch.empty(tk, h, d, device=k.device, dtype=k.dtype)
    dv = torch.empty(tk, h, d, device=v.device, dtype=v.dtype)
    delta = torch.empty(h, tq, device=q.device, dtype=torch.float32)
    segs = cu_q.shape[0] - 1
    block_m, block_n, warps, stages = BWD_Q_CONFIG[d]
    with _on(q):
        _bwd_q[(triton.cdiv(max(max_q, 1), block_m), segs, h)](
            q, k, v, o, do, lse, delta, dq, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
            tq, scale, scale * _LOG2E,
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    block_m, block_n, warps, stages = BWD_KV_CONFIG[d]
    with _on(q):
        _bwd_kv[(triton.cdiv(max(max_k, 1), block_n), segs, h)](
            q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk.stride(0), dk.stride(1),
            tq, scale, scale * _LOG2E,
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return dq, dk, dv
