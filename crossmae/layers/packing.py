"""Packed (static-shape) token layout: the real tokens of a padded batch in one row block.

Legend: ``b`` batch, ``n`` padded length, ``t`` capacity (rows of the packed layout), ``c``
width. Mask polarity: ``padding_mask`` True = padding slot.

`pack_tokens` moves the real tokens of ``[b, n, c]`` into ``[t, c]`` (sample after sample,
in token order) where ``t`` is a capacity chosen by the caller (a bucket, e.g. the total of
real tokens rounded up to a multiple of 128). Every shape is static and nothing syncs with
the device, so projections and MLPs cost the real tokens (plus the bucket's slack), not the
padding, and the step can be captured in a CUDA graph. The unused tail rows ("slack") are
zeros and form one extra segment that attends only to itself.

If the real tokens do not fit (``sum(lengths) > t``) packing fails rather than dropping
tokens: a ``ValueError`` off-GPU, a device-side assertion on CUDA (checking on the host would
need a sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_float_tensor, check_int, check_padding_mask

__all__ = ["PackedTokens", "pack_tokens", "packed_segment_ids", "unpack_tokens"]


class PackedTokens(NamedTuple):
    """A batch in packed layout.

    Attributes:
        tokens: ``[t, c]`` real tokens sample after sample, then zero slack rows.
        cu_seqlens: int32 ``[b + 1 + ceil(t / n)]``: ``[0, l_0, l_0 + l_1, ..., sum(l), ...,
            t]``; segment ``i < b`` is sample ``i``, the segments after it split the slack
            rows into pieces of at most ``n`` rows (some may be empty).
        source_index: int64 ``[t]`` position ``i * n + j`` of every packed row in the padded batch
            (0 for slack rows).
        row_padding_mask: bool ``[t]``, True = slack row (not a real token).
        max_seqlen: ``max(n, 1)``, an upper bound of every segment's length.
        num_tokens: the padded length ``n`` of the source batch (for `unpack_tokens`).
    """

    tokens: Tensor
    cu_seqlens: Tensor
    source_index: Tensor
    row_padding_mask: Tensor
    max_seqlen: int
    num_tokens: int


def pack_tokens(x: Tensor, padding_mask: Tensor, capacity: int) -> PackedTokens:
    """Pack the real tokens of ``x [b, n, c]`` into ``capacity`` rows (see module docs).

    Args:
        x: ``[b, n, c]`` (padded slots may hold anything, NaN included: they are not read).
        padding_mask: bool ``[b, n]``, True = padding.
        capacity: rows ``t`` of the packed layout; must be ``>= sum(real tokens)`` (checked on
            the device, without a host sync).

    Returns:
        `PackedTokens`.
    """
    x = check_float_tensor("x", x, ndim=3)
    pad = check_padding_mask("padding_mask", padding_mask, x.shape[:2], "x [b, n, c]")
    if pad is None:
        raise TypeError("padding_mask must be a bool [b, n] tensor, got None")
    t = check_int("capacity", capacity, minimum=0)
    b, n, c = x.shape
    lengths = (~pad).sum(dim=1)
    total = lengths.sum()
    if not x.is_cuda and not torch.compiler.is_compiling() and int(total) > t:
        # Off-GPU the check costs nothing: raise a proper error before any work.
        raise ValueError(f"capacity={t} is smaller than the {int(total)} real tokens to pack")
    torch._assert_async(total <= t, "pack_tokens: more real tokens than capacity")
    rows = torch.arange(t, device=x.device)
    row_pad = rows >= total
    # Slack rows form segments of at most n rows each (so n bounds every segment length,
    # which the CUDA kernel's grid is sized by); their count is static: ceil(t / n).
    piece = max(n, 1)
    pieces = max(1, -(-t // piece))
    slack_bounds = (total + piece * torch.arange(1, pieces + 1, device=x.device)).clamp(max=t)
    zero = lengths.new_zeros(1)
    cu = torch.cat([zero, lengths.cumsum(0), slack_bounds]).to(torch.int32)
    if b * n == 0:
        index = torch.zeros(t, dtype=torch.long, device=x.device)
        return PackedTokens(x.new_zeros(t, c), cu, index, row_pad, piece, n)
    flat_pad = pad.reshape(-1)
    order = torch.argsort(flat_pad.to(torch.uint8), stable=True)  # real rows first, in order
    if t <= b * n:
        index = order[:t]
    else:
        index = torch.cat([order, order.new_zeros(t - b * n)])
    index = index.masked_fill(row_pad, 0)
    tokens = x.reshape(b * n, c)[index].masked_fill(row_pad[:, None], 0.0)
    return PackedTokens(tokens, cu, index, row_pad, piece, n)


def _check_packed(packed: object) -> PackedTokens:
    if not isinstance(packed, PackedTokens):
        raise TypeError(
            f"packed must be a PackedTokens (from pack_tokens), got {type(packed).__name__}"
        )
    return packed


def _packed_batch_size(packed: PackedTokens) -> int:
    """``b`` of the batch ``packed`` was made from, read from its static layout (no sync)."""
    t = packed.source_index.shape[0]
    pieces = max(1, -(-t // max(packed.num_tokens, 1)))  # slack segments, as in pack_tokens
    return int(packed.cu_seqlens.shape[0]) - 1 - pieces


def unpack_tokens(values: Tensor, packed: PackedTokens, batch_size: int) -> Tensor:
    """Scatter packed rows ``values [t, ...]`` back to ``[b, n, ...]`` (padding slots = 0).

    Args:
        values: float ``[t, ...]``, one row per packed row (e.g. ``packed.tokens`` after an
            encoder).
        packed: the `PackedTokens` layout from `pack_tokens`.
        batch_size: ``b`` of the batch that was packed (must match the layout).

    Returns:
        ``[b, n, ...]``; padding slots hold 0.

    Raises:
        TypeError: ``values`` not a float tensor, ``packed`` not a `PackedTokens`, or
            ``batch_size`` not an int.
        ValueError: ``values`` rows or ``batch_size`` not matching the layout.
    """
    v = check_float_tensor("values", values)
    packed = _check_packed(packed)
    if v.ndim == 0 or v.shape[0] != packed.source_index.shape[0]:
        raise ValueError(
            f"values has shape {tuple(v.shape)} but the packed layout has "
            f"{packed.source_index.shape[0]} rows ([t, ...])"
        )
    b = check_int("batch_size", batch_size, minimum=0)
    expected = _packed_batch_size(packed)
    if b != expected:
        raise ValueError(
            f"batch_size={b} but the packed layout holds {expected} samples "
            f"(cu_seqlens {tuple(packed.cu_seqlens.shape)}, {packed.source_index.shape[0]} rows)"
        )
    n = packed.num_tokens
    out = v.new_zeros(b * n + 1, *v.shape[1:])
    idx = packed.source_index.masked_fill(packed.row_padding_mask, b * n)  # slack → scratch row
    out = out.index_copy(0, idx, v)
    return out[: b * n].reshape(b, n, *v.shape[1:])


def packed_segment_ids(packed: PackedTokens) -> Tensor:
    """Sample index of every packed row, int64 ``[t]`` (``>= b`` for slack rows)."""
    packed = _check_packed(packed)
    return segment_index(packed.cu_seqlens, packed.tokens.shape[0])


def segment_index(cu_seqlens: Tensor, rows: int) -> Tensor:
    """Segment of each of ``rows`` packed rows, int64 ``[rows]``: the number of boundaries
    ``cu_seqlens[1:]`` at or below the row (rows at or past ``cu_seqlens[-1]`` get ``s``).

    Marks every boundary with a scatter-add and takes a cumulative sum: static shapes, no
    sync, and unlike ``searchsorted`` over a slice it lowers under inductor on CUDA (torch
    2.11's inductor cannot lower that ``searchsorted``: its boundaries are a slice view)."""
    cu = cu_seqlens[1:].long().clamp(max=rows)
    marks = torch.zeros(rows + 1, dtype=torch.long, device=cu_seqlens.device)
    marks = marks.index_add(0, cu, torch.ones_like(cu))
    return marks.cumsum(0)[:rows]
