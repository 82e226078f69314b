"""Segmented (packed variable-length) attention in crossmae's own Triton kernels: a drop-in
for the packed kernel `_varlen` calls (``torch.nn.attention.varlen.varlen_attn``, flash
attention 2), written for the small head dims flash pads (16 runs as 32 there).

Legend: ``tq`` / ``tk`` packed query / key rows, ``h`` heads, ``d`` head dim, ``s``
segments.

Rows are packed ``q [tq, h, d]``, ``k, v [tk, h, d]``; segment ``i`` owns query rows
``cu_q[i]:cu_q[i + 1]`` and key rows ``cu_k[i]:cu_k[i + 1]`` (int32 ``[s + 1]``, from 0 to
the row count, non-decreasing: what `_varlen` builds). The forward is flash attention's
(online softmax over key blocks, log-sum-exp saved); the backward runs one kernel for
``dq`` (which also writes ``delta = rowsum(o * do)``) and one for ``dk``, ``dv``: no
atomics. Rows of a segment without keys are 0, as flash leaves them; keys of a segment
without queries get zero gradients. As with flash, the boundaries must cover every row
(``cu_q[-1] == tq``, ``cu_k[-1] == tk``) and ``max_q`` / ``max_k`` bound every segment:
rows outside them are left unwritten (no value is checked on the host).

The kernel table picks them per head dim (`backend.DEFAULT_KERNEL_TABLE`'s
``kernel="segmented"`` rules; a ``"varlen"`` plan with ``segmented``). `use_for_varlen`
swaps them in for every packed call of the process instead (the benchmarks do, with
``CROSSMAE_BENCH_VARLEN=segmented``). The kernels run as ``torch.library`` ops (one opaque node for
``torch.compile``, captured by CUDA graphs) and, in eager mode, as an autograd function.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

HEAD_DIMS = (16, 32, 64, 128)
#: CUDA grids allow at most this many segments (grid dimension y)
MAX_SEGMENTS = 65535
_HALF = (torch.float16, torch.bfloat16)
_INT32 = 2**31
_TRITON_SHIPPED = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether ``triton`` is installed (looked up at import)."""
    return _TRITON_SHIPPED


def supports(device_type: str, dtype: torch.dtype, head_dim: int, dropout_p: float) -> bool:
    """Whether a call with these plain values can run on the kernels: CUDA, float16 or
    bfloat16, a head dim of `HEAD_DIMS`, no dropout, ``triton`` installed (`fits` checks
    the tensors of a call)."""
    return (
        device_type == "cuda"
        and dtype in _HALF
        and head_dim in HEAD_DIMS
        and dropout_p == 0.0
        and available()
    )


def _span(x: Tensor) -> int:
    return 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride())) if x.numel() else 0


def fits(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> bool:
    """Whether the kernels can take this call (metadata only): CUDA, one half dtype, a head
    dim of `HEAD_DIMS` on every tensor, unit stride along it, ``k`` and ``v`` of one shape,
    contiguous int32 boundaries of equal length (at most `MAX_SEGMENTS` segments), int32
    offsets (also of the contiguous outputs and gradients), and ``triton`` installed."""
    return (
        q.dim() == 3
        and k.dim() == 3
        and v.shape == k.shape
        and q.shape[1:] == k.shape[1:]
        and q.shape[-1] in HEAD_DIMS
        and q.dtype in _HALF
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.device.type == "cuda"
        and q.device == k.device == v.device == cu_q.device == cu_k.device
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and cu_q.dtype == torch.int32
        and cu_k.dtype == torch.int32
        and cu_q.dim() == 1
        and cu_q.shape == cu_k.shape
        and cu_q.is_contiguous()
        and cu_k.is_contiguous()
        and 2 <= cu_q.shape[0] <= MAX_SEGMENTS + 1
        and max(_span(q), _span(k), _span(v), q.numel(), k.numel()) < _INT32
        and available()
    )


@torch.library.custom_op("crossmae::segmented_attention", mutates_args=())
def _segmented_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    scale: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from . import _segmented_kernels

    return _segmented_kernels.forward(q, k, v, cu_q, cu_k, max_q, scale)


@_segmented_attention.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    scale: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    tq, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        h, tq, dtype=torch.float32
    )


@torch.library.custom_op("crossmae::segmented_attention_backward", mutates_args=())
def _segmented_attention_backward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor,
    cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    from . import _segmented_kernels

    return _segmented_kernels.backward(q, k, v, o, do, lse, cu_q, cu_k, max_q, max_k, scale)


@_segmented_attention_backward.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor,
    cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    c = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=c),
        torch.empty_like(k, memory_format=c),
        torch.empty_like(v, memory_format=c),
    )


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale


def _backward(ctx: Any, do: Tensor, _dlse: Any) -> tuple[Any, ...]:
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _segmented_attention_backward(
        q, k, v, o, do, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale
    )
    return dq, dk, dv, None, None, None, None, None


_segmented_attention.register_autograd(_backward, setup_context=_setup)


class _Eager(torch.autograd.Function):
    """The same kernels for eager mode, without the custom op's Python dispatch layers."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
        max_k: int, scale: float,
    ) -> Tensor:  # fmt: skip
        from . import _segmented_kernels

        o, lse = _segmented_kernels.forward(q, k, v, cu_q, cu_k, max_q, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor) -> tuple[Any, ...]:
        from . import _segmented_kernels

        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        grads = _segmented_kernels.backward(
            q, k, v, o, do, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale
        )
        return (*grads, None, None, None, None, None)


def segmented_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    scale: Optional[float] = None,
) -> Tensor:
    """``softmax(q kᵀ · scale) v`` within every segment (see the module docs); returns
    ``[tq, h, d]``. ``max_q`` / ``max_k``: bounds on any segment's query / key rows (the
    padded lengths: they size the grids, no value is read on the host). ``scale``
    defaults to ``1 / sqrt(d)``. The call must `fits`."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return _segmented_attention(q, k, v, cu_q, cu_k, max_q, max_k, s)[0]
    return _Eager.apply(q, k, v, cu_q, cu_k, max_q, max_k, s)  # type: ignore[no-untyped-call]


def varlen_fn(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int
) -> Tensor:
    """`segmented_attention` with `_varlen`'s kernel signature, falling back to
    ``varlen_attn`` for a call the kernels cannot take."""
    if fits(q, k, v, cu_q, cu_k):
        return segmented_attention(q, k, v, cu_q, cu_k, max_q, max_k)
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)
    return out if isinstance(out, Tensor) else out[0]


def use_for_varlen(on: bool = True) -> None:
    """Route every packed call of `_varlen` through `varlen_fn` (``on``), whatever the
    plan, or back to torch's ``varlen_attn`` (process-wide; for benchmarks and tests)."""
    from . import _varlen

    _varlen._VARLEN = varlen_fn if on else _varlen._UNLOADED
