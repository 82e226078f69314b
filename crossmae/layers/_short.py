"""Short-key attention: one Triton kernel forward and one backward, for unpadded calls whose
keys all fit in one tile (``m <= 128``; e.g. CrossMAE's decoders and the ViT encoder over the
50 visible tokens of a ViT-B/16 at mask ratio 0.75).

Legend: ``b`` batch, ``h`` heads, ``n`` queries, ``m`` keys, ``d`` head dim.

With every key in one tile there is no online softmax: the forward reads each query block
and the keys once and writes the output and the rows' log-sum-exp; the backward runs one
program per ``(b, h)`` that holds its keys and values, walks the query blocks, writes
``dq`` per block and keeps ``dk``, ``dv`` in registers to the end: no atomics, no
preprocessing kernel. Scores and sums are float32; ``p`` meets ``v`` (and ``ds`` meets ``k``
and ``q``) in the input dtype, as in flash attention.

The two kernels run as ``torch.library.custom_op`` ops (``crossmae::short_attention`` and
its backward), so ``torch.compile`` treats each as one opaque op and CUDA graphs capture
them. The kernels (`_short_kernels`, which needs ``triton``) are imported on the first call.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

MAX_KEYS = 128
HEAD_DIMS = (16, 32, 64, 128)
_HALF = (torch.float16, torch.bfloat16)


# Looked up once, at import, without importing triton: torch 2.11's compiler refuses to
# trace ``find_spec``, and stacks plan inside their compiled graphs.
_TRITON_SHIPPED = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether ``triton`` is installed (looked up at import)."""
    return _TRITON_SHIPPED


def supports(
    device_type: str, dtype: torch.dtype, head_dim: int, keys: Optional[int], dropout_p: float
) -> bool:
    """Whether a call with these plain values can run here: CUDA, float16/bfloat16, a head
    dim of `HEAD_DIMS`, ``1 <= keys <= MAX_KEYS`` (None: unknown, no), no dropout, and
    ``triton`` installed."""
    return (
        device_type == "cuda"
        and dtype in _HALF
        and head_dim in HEAD_DIMS
        and keys is not None
        and 1 <= keys <= MAX_KEYS
        and dropout_p == 0.0
        and available()
    )


def fits(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    """`supports` for the tensors of one call ``q [b, h, n, d]``, ``k, v [b, h, m, d]``
    (metadata only), with the three dtypes and head dims equal."""
    return (
        q.dim() == 4
        and k.dim() == 4
        and v.dim() == 4
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and k.shape[-1] == q.shape[-1]
        and v.shape[-1] == q.shape[-1]
        and k.shape[:2] == q.shape[:2]
        and v.shape[:3] == k.shape[:3]
        and q.device == k.device == v.device
        and max(_span(q), _span(k), _span(v)) < _INT32  # the kernels index in int32
        and supports(q.device.type, q.dtype, q.shape[-1], k.shape[2], dropout_p)
    )


_INT32 = 2**31


def _span(x: Tensor) -> int:
    """One past the largest element offset of ``x`` (its memory extent, in elements)."""
    return 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride())) if x.numel() else 0


def _bnhd(x: Tensor, n: int) -> Tensor:
    """A ``[b, h, n, d]`` view of a new ``[b, n, h, d]`` tensor like ``x``."""
    b, h, _, d = x.shape
    return x.new_empty(b, n, h, d).transpose(1, 2)


@torch.library.custom_op("crossmae::short_attention", mutates_args=())
def _short_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    from . import _short_kernels

    return _short_kernels.forward(q, k, v, scale)


@_short_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, h, n, _ = q.shape
    return _bnhd(q, n), q.new_empty(b * h, n, dtype=torch.float32)


@torch.library.custom_op("crossmae::short_attention_backward", mutates_args=())
def _short_attention_backward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    from . import _short_kernels

    return _short_kernels.backward(q, k, v, o, do, lse, scale)


@_short_attention_backward.register_fake
def _(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _bnhd(q, q.shape[2]), _bnhd(k, k.shape[2]), _bnhd(v, v.shape[2])


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx: Any, do: Tensor, _dlse: Any) -> tuple[Any, ...]:
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _short_attention_backward(q, k, v, o, do, lse, ctx.scale)
    return dq, dk, dv, None


_short_attention.register_autograd(_backward, setup_context=_setup)


class _Eager(torch.autograd.Function):
    """The same two kernels for eager mode, without the custom op's Python dispatch layers
    (the eager step is bound by the host issuing it)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        from . import _short_kernels

        o, lse = _short_kernels.forward(q, k, v, scale)
        _setup(ctx, (q, k, v, scale), (o, lse))
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: Tensor) -> tuple[Any, ...]:
        from . import _short_kernels

        q, k, v, o, lse = ctx.saved_tensors
        return (*_short_kernels.backward(q, k, v, o, do, lse, ctx.scale), None)


def short_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale) v`` for ``q [b, h, n, d]``, ``k, v [b, h, m, d]`` with
    ``m <= 128`` (see `fits`); returns ``[b, h, n, d]`` (a view of ``[b, n, h, d]``
    memory). ``scale`` defaults to ``1 / sqrt(d)``. While compiling this is the custom op
    (one opaque node for inductor); in eager mode an autograd function over the same
    kernels."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return _short_attention(q, k, v, s)[0]
    return _Eager.apply(q, k, v, s)  # type: ignore[no-untyped-call]
