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
        ValueError: shapes not matching, or a non-padded id outside ``[0, num_tokens)``
            (checked on CPU tensors; a device-side assertion on CUDA, so no host sync).
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
    # index n is the scratch slot for padded values: a real id there would vanish silently
    _check_ids_in_range(ids, n, pad, "num_tokens")
    idx = ids.long()
    if pad is not None:
        idx = idx.masked_fill(pad, n)  # scratch slot n, sliced off below
    out = values.new_full((values.shape[0], n + 1, *values.shape[2:]), fill_value)
    out = out.scatter(1, _expand_index(idx, values), values)
    return out[:, :n]


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
