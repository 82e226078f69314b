"""Packed variable-length attention for padded batches on CUDA (no host sync).

Legend: ``b`` batch, ``h`` heads, ``n`` query slots, ``m`` key slots, ``d`` head dim.

A padded batch is turned into the packed layout of ``torch.nn.attention.varlen`` without
knowing any length on the host: real tokens are moved to the front of their row (a stable
sort of the padding flags, attention being invariant to key order), and every sample is
split into two segments, *real* (its real queries against its real keys) and *dummy* (its
padded queries against its padded keys). All boundaries come from on-device cumulative sums
over the fixed strides ``n`` and ``m``, so the packed length is ``b * n`` / ``b * m`` and
``max_q``/``max_k`` are the padded lengths: nothing syncs, shapes are static (compile- and
CUDA-graph-friendly), and padded keys cost nothing to real queries.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from einops import rearrange
from torch import Tensor

__all__: list[str] = []

VarlenFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int], Tensor]


_UNLOADED: object = object()
# The kernel, imported on first use: importing ``torch.nn.attention.varlen`` pulls in
# ``torch._dynamo`` (about a second, and torch's NumPy warning where NumPy is missing), which
# ``import crossmae`` must not pay. Tests replace this attribute with a reference kernel.
_VARLEN: object = _UNLOADED


def _kernel() -> Optional[VarlenFn]:
    """``torch.nn.attention.varlen.varlen_attn`` (imported on first call), None when missing."""
    global _VARLEN
    if _VARLEN is _UNLOADED:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # torch < 2.10
            _VARLEN = None
        else:
            _VARLEN = varlen_attn
    return _VARLEN  # type: ignore[return-value]


def _has_module(name: str) -> bool:
    """Whether module ``name`` exists, found without importing it (``find_spec``)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# Looked up once, at import (about 50 µs): ``find_spec`` is a function torch.compile refuses
# to trace, so asking it at every plan broke the graph of every stack on CUDA.
_VARLEN_SHIPPED = _has_module("torch.nn.attention.varlen")


def varlen_available() -> bool:
    """Whether this torch build ships ``torch.nn.attention.varlen.varlen_attn`` (looked up
    at import without importing it, unless a kernel was already loaded or injected)."""
    if _VARLEN is not _UNLOADED:
        return _VARLEN is not None
    return _VARLEN_SHIPPED


def supports(device_type: str, dtype: torch.dtype, head_dim: int, dropout_p: float) -> bool:
    """Whether the packed kernel can serve a call with these properties (CUDA, half
    precision, no attention dropout, flash head dims: a multiple of 8 up to 256)."""
    return (
        device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and dropout_p == 0.0
        and head_dim % 8 == 0
        and head_dim <= 256
        and varlen_available()
    )


def can_use_varlen(q: Tensor, dropout_p: float) -> bool:
    """Whether the packed kernel can serve this call (see `supports`)."""
    return supports(q.device.type, q.dtype, q.shape[-1], dropout_p)


def prefer_trailing_padding(x: Tensor) -> bool:
    """Deprecated helper of 0.1 (CUDA = reorder); the stacks now ask `crossmae.layers.backend`
    (reorder only when the packed kernel is the plan)."""
    return x.is_cuda


def _segments(lengths: Tensor, stride: int) -> Tensor:
    """Cumulative boundaries ``[0, l_0, s, s + l_1, 2s, ..., b*s]`` as int32 ``[2b + 1]``."""
    b = lengths.shape[0]
    starts = torch.arange(b, device=lengths.device, dtype=torch.int32) * stride
    mids = starts + lengths.to(torch.int32)
    bounds = torch.stack([starts, mids], dim=1).reshape(-1)
    end = torch.full((1,), b * stride, device=lengths.device, dtype=torch.int32)
    return torch.cat([bounds, end])


def self_segments(padding_mask: Tensor) -> Tensor:
    """Segment boundaries of self-attention over ``padding_mask [b, n]`` (True = padding,
    trailing in every row): `_segments` of the real lengths, int32 ``[2b + 1]``."""
    return _segments((~padding_mask).sum(dim=1), padding_mask.shape[1])


def _rows(x: Tensor) -> Tensor:
    """``x [b h n d]`` as the packed kernel's rows ``[(b n) h d]``: a view where the memory
    allows (a head slice of a fused ``qkv`` projection does: the kernel takes any row
    stride with a contiguous head dim), a copy otherwise."""
    rows = x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1], x.shape[3])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def real_first_permutation(padding_mask: Tensor) -> Tensor:
    """Per-row permutation putting real slots first (stable), int64 ``[b, n]``."""
    return torch.argsort(padding_mask.to(torch.uint8), dim=1, stable=True)


def inverse_permutation(perm: Tensor) -> Tensor:
    """Inverse of a per-row permutation ``perm [b, n]``."""
    n = perm.shape[1]
    src = torch.arange(n, device=perm.device).expand(perm.shape[0], n)
    return torch.empty_like(perm).scatter_(1, perm, src)


def take_tokens(x: Tensor, perm: Tensor, dim: int) -> Tensor:
    """``x`` reordered along token dim ``dim`` by ``perm [b, n]`` (batch is ``dim - 1`` or
    the leading batch axis right before the tokens)."""
    shape = [1] * x.ndim
    shape[dim - 1], shape[dim] = perm.shape
    idx = perm.reshape(shape).expand(*x.shape[:dim], perm.shape[1], *x.shape[dim + 1 :])
    return torch.gather(x, dim, idx)


def _take(x: Tensor, perm: Tensor) -> Tensor:
    """``x [b h n d]`` reordered along ``n`` by ``perm [b n]``."""
    idx = perm[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return torch.gather(x, 2, idx)


def varlen_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    query_padding_mask: Optional[Tensor] = None,
    *,
    keys_sorted: bool = False,
    queries_sorted: bool = False,
    kernel: Optional[VarlenFn] = None,
    segments: Optional[Tensor] = None,
) -> Tensor:
    """Attention of ``q [b h n d]`` over the real keys of ``k, v [b h m d]`` via packed segments.

    ``key_padding_mask`` / ``query_padding_mask``: bool, True = padding. Padded keys must be
    finite (callers zero them). Rows of samples with no real key are left for the caller to
    zero. ``kernel`` replaces the varlen function (used by the CPU tests with a reference).
    ``segments``: `self_segments` of ``key_padding_mask`` for self-attention with trailing
    padding (``query_padding_mask is key_padding_mask``), computed once by the stack.
    """
    fn = kernel if kernel is not None else _kernel()
    if fn is None:
        raise RuntimeError("torch.nn.attention.varlen is not available in this torch build")
    b, n = q.shape[0], q.shape[2]
    m = k.shape[2]
    qperm = None
    if (
        segments is not None
        and keys_sorted
        and queries_sorted
        and query_padding_mask is key_padding_mask
        and n == m
    ):
        cu_q = cu_k = segments  # the stack's, for every block
    else:
        if not keys_sorted:
            kperm = real_first_permutation(key_padding_mask)
            k = _take(k, kperm)
            v = _take(v, kperm)
        k_len = (~key_padding_mask).sum(dim=1)
        cu_k = _segments(k_len, m)
        if query_padding_mask is None:
            cu_q = _segments(torch.full_like(k_len, n), n)
        else:
            if not queries_sorted:
                qperm = real_first_permutation(query_padding_mask)
                q = _take(q, qperm)
            if query_padding_mask is key_padding_mask and n == m:
                cu_q = cu_k  # self-attention: the same segments (fewer launches per call)
            else:
                cu_q = _segments((~query_padding_mask).sum(dim=1), n)
    out = fn(_rows(q), _rows(k), _rows(v), cu_q, cu_k, n, m)
    out = rearrange(out, "(b n) h d -> b h n d", b=b)
    if qperm is not None:  # undo the query reordering
        out = _take(out, inverse_permutation(qperm))
    return out


def together_segments(
    query_counts: list[int],
    num_keys: int,
    key_lengths: Tensor,
    *,
    query_padding: Optional[Sequence[Optional[Tensor]]] = None,
) -> tuple[Tensor, Tensor]:
    """Segment boundaries of `varlen_together` (int32 ``cu_q``, ``cu_k``), computed once
    and reusable for every layer that shares the layout: call ``i`` has ``query_counts[i]``
    queries per sample; its keys are ``num_keys`` slots per sample whose first
    ``key_lengths[j]`` are real (int ``[b]``). Two segments per call and sample: the
    queries with the real keys, then no query with the padded keys.

    ``query_padding``: per call a bool ``[b, n_i]`` mask (True = padding) or None. A sample
    whose queries are **all** padding (e.g. a modality the sample lacks) attends to at most
    one key instead of all of them (its rows are meaningless; the work of a full segment
    is skipped); the rest of its keys move to the query-less segment. Partly padded
    samples keep every real key (their real rows need them)."""
    b, m = key_lengths.shape[0], num_keys
    if query_padding is not None and len(query_padding) != len(query_counts):
        raise ValueError(
            f"query_padding has {len(query_padding)} masks for {len(query_counts)} calls"
        )
    calls = len(query_counts)
    dev = key_lengths.device
    # Query boundaries depend on the counts alone. A run of consecutive calls with one
    # count is one arithmetic progression (sample j of the run starts at off + j * n):
    # one arange per run, its consecutive pairs interleaved, instead of ops per call.
    pieces, q_off, i = [], 0, 0
    while i < calls:
        n, run = query_counts[i], 1
        while i + run < calls and query_counts[i + run] == n:
            run += 1
        ends = torch.arange(
            q_off, q_off + run * b * n + 1, max(n, 1), dtype=torch.int32, device=dev
        )
        if n == 0:  # every boundary of the run is q_off
            ends = ends[:1].expand(run * b + 1)
        pieces.append(torch.stack([ends[:-1], ends[1:]], dim=1).reshape(-1))
        q_off += run * b * n
        i += run
    # the last boundary is the total, the last run's last entry
    pieces.append(ends[-1:] if pieces else torch.zeros(1, dtype=torch.int32, device=dev))
    cu_q = torch.cat(pieces)
    # Key boundaries: sample j of call i owns slots [(i b + j) m, (i b + j + 1) m), its
    # first L[i, j] real: one progression of starts for every call and sample.
    lengths = key_lengths.to(torch.int32)  # [b], or [calls, b] where some call differs
    alone: list[
        Optional[Tensor]
    ] = []  # per call: bool [b], its samples without a real query (None: no such call)
    for i, qpad in enumerate([] if query_padding is None else query_padding):
        n = query_counts[i]
        if qpad is None or n == 0:
            alone.append(None)
            continue
        if tuple(qpad.shape) != (b, n):
            raise ValueError(f"query_padding[{i}] has shape {tuple(qpad.shape)}, expected {(b, n)}")
        alone.append(qpad.all(dim=1))
    if any(a is not None for a in alone):
        rows: list[Tensor] = []
        none: Optional[Tensor] = None  # one all-False row for every call without a mask
        for a in alone:
            if a is None:
                if none is None:
                    none = torch.zeros(b, dtype=torch.bool, device=dev)
                a = none
            rows.append(a)
        lengths = torch.where(torch.stack(rows), lengths.clamp(max=1), lengths)
    starts = torch.arange(0, calls * b * m + 1, max(m, 1), dtype=torch.int32, device=dev)
    if m == 0:
        starts = starts[:1].expand(calls * b + 1)
    first = starts[:-1].view(calls, b)
    pairs = torch.stack([first, first + lengths], dim=2).reshape(-1)
    cu_k = torch.cat([pairs, starts[-1:]])
    return cu_q, cu_k


def varlen_together(
    qs: list[Tensor],
    ks: list[Tensor],
    vs: list[Tensor],
    key_lengths: Tensor,
    *,
    segments: Optional[tuple[Tensor, Tensor]] = None,
    kernel: Optional[VarlenFn] = None,
) -> list[Tensor]:
    """Several attention calls over one key layout in **one** packed kernel call.

    Call ``i`` has queries ``qs[i] [b, n_i, h, d]`` and keys/values ``ks[i], vs[i]
    [b, m, h, d]`` whose padding is trailing: sample ``j``'s real keys are its first
    ``key_lengths[j]`` slots (int ``[b]``, the same for every call; padded keys finite).
    Every query attends to the real keys of its own call and sample. Returns the outputs
    ``[b, n_i, h, d]``; rows of samples with no real key are left for the caller to zero.
    ``segments``: `together_segments` for this layout, when the caller computed them once
    for several layers. Boundaries come from on-device sums over the static strides: no
    host sync.
    """
    out = together_packed(qs, ks, vs, key_lengths, segments=segments, kernel=kernel)
    sizes = [q.shape[0] * q.shape[1] for q in qs]
    return [o.reshape(q.shape[:2] + o.shape[1:]) for o, q in zip(torch.split(out, sizes), qs)]


def together_packed(
    qs: list[Tensor],
    ks: list[Tensor],
    vs: list[Tensor],
    key_lengths: Tensor,
    *,
    segments: Optional[tuple[Tensor, Tensor]] = None,
    kernel: Optional[VarlenFn] = None,
) -> Tensor:
    """`varlen_together` 's kernel output before the split: ``[(sum_i b n_i) h d]``, call
    by call, sample by sample (so consecutive calls of one shape are one view)."""
    fn = kernel if kernel is not None else _kernel()
    if fn is None:
        raise RuntimeError("torch.nn.attention.varlen is not available in this torch build")
    m = ks[0].shape[1]
    if segments is None:
        segments = together_segments([q.shape[1] for q in qs], m, key_lengths)
    cu_q, cu_k = segments
    return fn(
        torch.cat([q.flatten(0, 1) for q in qs]),
        torch.cat(ks).flatten(0, 1),  # [(calls b m) h d]: one copy of strided views
        torch.cat(vs).flatten(0, 1),
        cu_q,
        cu_k,
        max(max(q.shape[1] for q in qs), 1),
        max(m, 1),
    )
