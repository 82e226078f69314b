"""The Triton kernels of `_short` (imported on the first short-attention call: this module
needs ``triton``, which a CPU-only machine may lack)."""

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


def _block_n(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


@triton.jit
def _at(X, b, h, rows, cols, sb, sh, sn, sd):
    """Pointers to the ``rows x cols`` tile of a strided ``X[b, h]``."""
    return X + b * sb + h * sh + rows[:, None] * sn + cols[None, :] * sd


@triton.jit
def _fwd(
    Q, K, V, Out, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    H, NQ, NK, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mm = offs_m < NQ
    mn = offs_n < NK
    q = tl.load(_at(Q, b, h, offs_m, offs_d, sqb, sqh, sqn, sqd), mask=mm[:, None], other=0.0)
    k = tl.load(_at(K, b, h, offs_n, offs_d, skb, skh, skn, skd), mask=mn[:, None], other=0.0)
    v = tl.load(_at(V, b, h, offs_n, offs_d, svb, svh, svn, svd), mask=mn[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale2  # log2 domain
    s = tl.where(mn[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    p = tl.exp2(s - mx[:, None])
    den = tl.sum(p, 1)
    o = tl.dot(p.to(v.dtype), v) / den[:, None]
    out = _at(Out, b, h, offs_m, offs_d, sob, soh, son, sod)
    tl.store(out, o.to(Out.dtype.element_ty), mask=mm[:, None])
    tl.store(LSE + bh * NQ + offs_m, mx + tl.log2(den), mask=mm)


@triton.jit
def _bwd(
    Q, K, V, Out, DO, LSE, DQ, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sdob, sdoh, sdon, sdod,
    H, NQ, NK, scale, scale2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # dq, dk, dv are [b, n|m, h, d] contiguous
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mn = offs_n < NK
    k = tl.load(_at(K, b, h, offs_n, offs_d, skb, skh, skn, skd), mask=mn[:, None], other=0.0)
    v = tl.load(_at(V, b, h, offs_n, offs_d, svb, svh, svn, svd), mask=mn[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for start in range(0, NQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mm = offs_m < NQ
        q = tl.load(_at(Q, b, h, offs_m, offs_d, sqb, sqh, sqn, sqd), mask=mm[:, None], other=0.0)
        o = tl.load(_at(Out, b, h, offs_m, offs_d, sob, soh, son, sod), mask=mm[:, None], other=0.0)
        do = tl.load(
            _at(DO, b, h, offs_m, offs_d, sdob, sdoh, sdon, sdod), mask=mm[:, None], other=0.0
        )
        lse = tl.load(LSE + bh * NQ + offs_m, mask=mm, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        s = tl.dot(q, tl.trans(k)) * scale2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mn[None, :] & mm[:, None], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k) * scale
        tl.store(
            DQ + ((b * NQ + offs_m[:, None]) * H + h) * D + offs_d[None, :],
            dq.to(DQ.dtype.element_ty), mask=mm[:, None],
        )  # fmt: skip
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dk = dk * scale
    rows = ((b * NK + offs_n[:, None]) * H + h) * D + offs_d[None, :]
    tl.store(DK + rows, dk.to(DK.dtype.element_ty), mask=mn[:, None])
    tl.store(DV + rows, dv.to(DV.dtype.element_ty), mask=mn[:, None])


# (block_m, num_warps) per head dim. Head dims 32 and 64 measured on an H200 at 50 keys
# (benchmarks/RESULTS.md, 2026-12-03): 64 query rows and 4 warps are fastest both ways
# (forward 32 / 128 rows: 1.4-1.8x slower; backward 16 / 32 rows or 8 warps: 1.1-1.9x);
# head dims 16 and 128 were only checked for correctness (tests/gpu/test_gpu_short.py).
FWD_CONFIG: dict[int, tuple[int, int]] = {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (32, 4)}
BWD_CONFIG: dict[int, tuple[int, int]] = {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (16, 4)}


def _bnhd(x: Tensor, n: int) -> Tensor:
    b, h, _, d = x.shape
    return x.new_empty(b, n, h, d).transpose(1, 2)


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Output ``[b, h, n, d]`` (``[b, n, h, d]`` memory) and log2-sum-exp ``[b*h, n]``."""
    b, h, n, d = q.shape
    m = k.shape[2]
    o = _bnhd(q, n)
    lse = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
    block_m, warps = FWD_CONFIG[d]
    grid = (triton.cdiv(n, block_m), b * h)
    with _on(q):
        _fwd[grid](
            q, k, v, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            h, n, m, scale * _LOG2E,
            D=d, BLOCK_M=block_m, BLOCK_N=_block_n(m), num_warps=warps,
        )  # fmt: skip
    return o, lse


def backward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``dq, dk, dv``, each ``[b, h, ., d]`` over ``[b, ., h, d]`` memory."""
    b, h, n, d = q.shape
    m = k.shape[2]
    dq = _bnhd(q, n)
    dk = _bnhd(k, m)
    dv = _bnhd(v, m)
    block_m, warps = BWD_CONFIG[d]
    with _on(q):
        _bwd[(b * h,)](
            q, k, v, o, do, lse, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(),
            h, n, m, scale, scale * _LOG2E,
            D=d, BLOCK_M=block_m, BLOCK_N=_block_n(m), num_warps=warps,
        )  # fmt: skip
    return dq, dk, dv
