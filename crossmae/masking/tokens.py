"""Gather and scatter tokens by index, and padding masks from lengths.

Legend: ``b`` batch, ``n`` tokens in the full sequence, ``k`` selected tokens, ``...`` any
trailing feature dims. Mask polarity: ``padding_mask`` True = padding slot.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import (
    check_index_tensor,
    check_int,
    check_padding_mask,
    check_same_device,
    check_tensor,
)

__all__ = ["gather_tokens", "lengths_to_padding_mask", "padding_mask_to_lengths", "scatter_tokens"]


def _host_checkable(t: Tensor) -> bool:
    """Whether a value check of ``t`` is free: a CPU tensor outside of compilation."""
    return not t.is_cuda and not torch.compiler.is_compiling()


def _bad_values(t: Tensor, bad: Tensor, limit: int = 8) -> str:
    """The first ``limit`` entries of ``t`` where ``bad`` is True, with their positions."""
    where = torch.nonzero(bad)[:limit]
    shown = ", ".join(f"{int(t[tuple(i)])} at {tuple(int(j) for j in i)}" for i in where)
    more = int(bad.sum()) - int(where.shape[0])
    return shown + (f" (and {more} more)" if more > 0 else "")


def _check_ids_in_range(ids: Tensor, n: int, pad: Optional[Tensor], what: str) -> None:
    """Every non-padded id in ``[0, n)``; a ValueError on the CPU, a device assertion else."""
    ok = (ids >= 0) & (ids < n)
    if pad is not None:
        ok = ok | pad
    if _host_checkable(ids):
        if not bool(ok.all()):
            excepted = " (slots flagged by padding_mask excepted)" if pad is not None else ""
            raise ValueError(
                f"ids must be in [0, {what}={n}){excepted}, got {_bad_values(ids, ~ok)}"
            )
    else:
        torch._assert_async(ok.all(), f"ids out of range [0, {what})")


def _check_unique_ids(ids: Tensor, n: int, pad: Optional[Tensor], name: str) -> None:
    """Refuse a real id repeated within a sample, where that is free (CPU, not compiling).

    Out-of-range ids are ignored here (the range is someone else's check). On CUDA or
    while compiling nothing is checked (it would need a host sync); callers define what
    repeats then mean.
    """
    if not _host_checkable(ids) or ids.numel() == 0 or n == 0:
        return
    real = (ids >= 0) & (ids < n)
    if pad is not None:
        real = real & ~pad
    idx = ids.long().masked_fill(~real, n)  # padded slots count in a dropped scratch column
    counts = torch.zeros(ids.shape[0], n + 1, dtype=torch.long, device=ids.device)
    counts = counts.scatter_add(1, idx, torch.ones_like(idx))[:, :n]
    repeated = counts > 1
    if bool(repeated.any()):
        where = torch.nonzero(repeated)[:8]
        shown = ", ".join(
            f"id {int(j)} {int(counts[i, j])} times in sample {int(i)}" for i, j in where.tolist()
        )
        raise ValueError(
            f"{name} repeats a real id within a sample ({shown}); each real slot must name "
            "a distinct token (flag extra slots in the padding mask instead)"
        )


def _expand_index(ids: Tensor, like: Tensor) -> Tensor:
    """``ids [b, k]`` broadcast over ``like``'s trailing dims -> ``[b, k, ...]``."""
    trailing = like.shape[2:]
    idx = ids.reshape(*ids.shape, *([1] * len(trailing)))
    return idx.expand(*ids.shape, *trailing)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Select tokens per sample: ``out[i, j] = x[i, ids[i, j]]``.

    Args:
        x: ``[b, n, ...]``.
        ids: int64 ``[b, k]`` indices into ``n`` (padded slots hold a valid index such as 0
            and are flagged by the caller's ``*_padding_mask``).

    Returns:
        ``[b, k, ...]``.

    Raises:
        TypeError: ``x`` not a tensor or ``ids`` not an integer tensor.
        ValueError: shapes not matching, or (CPU tensors) an id outside ``[0, n)``; on CUDA
            an out-of-range id fails the gather kernel's device-side assertion.
    """
    x = check_tensor("x", x)
    ids = check_index_tensor("ids", ids)
    if x.ndim < 2:
        raise ValueError(f"x must have shape [b, n, ...], got {tuple(x.shape)}")
    if ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"ids has batch size {ids.shape[0]} (shape {tuple(ids.shape)}) but x has "
            f"{x.shape[0]} (shape {tuple(x.shape)})"
        )
    if x.shape[1] == 0 and ids.shape[1] > 0:
        raise ValueError(f"x has no tokens (shape {tuple(x.shape)}) but ids selects {ids.shape[1]}")
    if _host_checkable(ids):  # on CUDA the gather kernel asserts on its own
        _check_ids_in_range(ids, x.shape[1], None, "n")
    return torch.gather(x, 1, _expand_index(ids.long(), x))


def scatter_tokens(
    values: Tensor,
    ids: Tensor,
    num_tokens: int,
    *,
    padding_mask: Optional[Tensor] = None,
    fill_value: float = 0.0,
) -> Tensor:
    """Place ``values[i, j]`` at position ``ids[i, j]`` of a new ``[b, num_tokens, ...]`` tensor.

    Positions not written hold ``fill_value``. Slots flagged by ``padding_mask`` are never
    written (their index is redirected to a scratch slot that is dropped), so padded values,
    NaN included, cannot land anywhere. Differentiable w.r.t. ``values``.

    Repeated real ids: every real id must be distinct within its sample. On CPU tensors a
    repeat is refused (``ValueError``, free to check). On CUDA and under ``torch.compile``
    it cannot be checked without a host sync; there the rule is that the values landing on
    one position are **summed** (``out[i, m] = sum of values[i, j] with ids[i, j] = m``) and
    each of them receives that position's gradient, so the value and the gradient always
    agree (0.1.0 kept an arbitrary one of the values but gave every one gradient).

    Args:
        values: ``[b, k, ...]``.
        ids: int64 ``[b, k]`` target positions in ``[0, num_tokens)``.
        num_tokens: length ``n`` of the output sequence.
        padding_mask: bool ``[b, k]`` for ``values``, True = padding slot (not written).
        fill_value: value of every position not written.

    Returns:
        ``[b, num_tokens, ...]`` with ``values``' dtype and device.

    Raises:
        TypeError: ``values``/``ids``/``padding_mask`` of the wrong type or dtype.
        ValueError: shapes not matching, a non-padded id outside ``[0, num_tokens)``
            (checked on CPU tensors; a device-side assertion on CUDA, so no host sync), or
            (CPU tensors) a real id repeated within a sample.
    """
    values = check_tensor("values", values)
    ids = check_index_tensor("ids", ids)
    n = check_int("num_tokens", num_tokens, minimum=0)
    if values.ndim < 2 or tuple(values.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"values must be [b, k, ...] matching ids [b, k]; got values {tuple(values.shape)} "
            f"and ids {tuple(ids.shape)}"
        )
    pad = check_padding_mask("padding_mask", padding_mask, ids.shape, "ids [b, k]")
    if pad is not None:
        check_same_device("padding_mask", pad, "ids", ids)
    if isinstance(fill_value, bool) or not isinstance(fill_value, (int, float)):
        raise TypeError(
            f"fill_value must be a float, got {fill_value!r} ({type(fill_value).__name__})"
        )
    # index n is the scratch slot for padded values: a real id there would vanish silently
    _check_ids_in_range(ids, n, pad, "num_tokens")
    _check_unique_ids(ids, n, pad, "ids")
    idx = ids.long()
    if pad is not None:
        idx = idx.masked_fill(pad, n)  # scratch slot n, sliced off below
    # An additive scatter into zeros (0 + v == v, so unique ids are exact) keeps value and
    # gradient consistent for repeats that could not be checked (CUDA, compile): they sum.
    out = values.new_zeros((values.shape[0], n + 1, *values.shape[2:]))
    if values.dtype == torch.bool:  # no sum for bool (and no gradient to disagree with)
        out = out.scatter(1, _expand_index(idx, values), values)[:, :n]
    else:
        out = out.scatter_add(1, _expand_index(idx, values), values)[:, :n]
    if fill_value != 0.0:
        hit = torch.zeros(ids.shape[0], n + 1, dtype=torch.bool, device=ids.device)
        hit = hit.scatter(1, idx, True)[:, :n]
        out = torch.where(hit.reshape(*hit.shape, *([1] * (out.ndim - 2))), out, fill_value)
    return out


def lengths_to_padding_mask(lengths: Tensor, max_len: Optional[int] = None) -> Tensor:
    """Padding mask from per-sample lengths: ``mask[i, j] = j >= lengths[i]`` (True = padding).

    Args:
        lengths: int ``[b]`` of real-token counts.
        max_len: sequence length ``n`` (default ``lengths.max()``, which syncs with the device;
            pass it explicitly in compiled or CUDA-graph code).

    Returns:
        bool ``[b, max_len]``.

    Raises:
        TypeError: ``lengths`` not an integer tensor or ``max_len`` not an int.
        ValueError: ``lengths`` not ``[b]``, ``max_len < 0``, or a length outside
            ``[0, max_len]`` (never truncated). With ``max_len`` given the range is checked on
            CPU tensors and by a device-side assertion on CUDA (no host sync).
    """
    lengths = check_tensor("lengths", lengths)
    if lengths.is_floating_point() or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.ndim != 1:
        raise ValueError(f"lengths must have shape [b], got {tuple(lengths.shape)}")
    if max_len is None:
        if lengths.numel() == 0:
            n = 0
        else:
            # one host sync for both bounds (documented: pass max_len to avoid it)
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(lengths)).tolist())
            if lo < 0:
                raise ValueError(f"lengths must be >= 0, got {_bad_values(lengths, lengths < 0)}")
            n = hi
    else:
        n = check_int("max_len", max_len, minimum=0)
        ok = (lengths >= 0) & (lengths <= n)
        if _host_checkable(lengths):
            if not bool(ok.all()):
                raise ValueError(
                    f"lengths must be in [0, max_len={n}] (never truncated), got "
                    f"{_bad_values(lengths, ~ok)}"
                )
        else:
            torch._assert_async(ok.all(), "lengths outside [0, max_len]")
    return torch.arange(n, device=lengths.device)[None, :] >= lengths[:, None]


def padding_mask_to_lengths(padding_mask: Tensor) -> Tensor:
    """Number of real tokens per sample (``False`` entries), int64 ``[b]``."""
    pad = check_tensor("padding_mask", padding_mask)
    if pad.dtype != torch.bool or pad.ndim != 2:
        raise ValueError(
            f"padding_mask must be bool [b, n], got dtype {pad.dtype} shape {tuple(pad.shape)}"
        )
    return (~pad).sum(dim=1)
