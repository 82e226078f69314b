"""Fixed sine-cosine position embeddings (MAE's tables, and the same formula anywhere).

1D embedding of width ``D`` at position ``p``:
``[sin(p * w_0 .. w_{D/2-1}), cos(p * w_0 .. w_{D/2-1})]`` with ``w_i = 10000 ** (-i / (D/2))``.
2D embedding of width ``D`` at ``(row, col)``: the 1D embedding of ``col`` (width ``D/2``)
followed by that of ``row`` (width ``D/2``), exactly MAE's ``get_2d_sincos_pos_embed``.
Everything is computed in float64 and returned in ``dtype`` (default: torch's default dtype).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._checks import check_int, check_tensor

__all__ = ["sincos_pos_embed_1d", "sincos_pos_embed_2d", "sincos_pos_embed_2d_from_coords"]


def _check_dim(dim: object, multiple: int) -> int:
    d = check_int("dim", dim, minimum=1)
    if d % multiple != 0:
        raise ValueError(f"dim must be a positive multiple of {multiple}, got {dim}")
    return d


def _check_dtype(dtype: object) -> torch.dtype:
    """The output dtype: None (torch's default dtype) or a floating-point torch.dtype."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating-point torch.dtype (e.g. torch.float32) or None, got "
            f"{dtype!r}; sine-cosine values in [-1, 1] cannot be stored in it"
        )
    return dtype


def _embed_1d(dim: int, pos: Tensor) -> Tensor:
    half = dim // 2
    omega = torch.arange(half, dtype=torch.float64, device=pos.device) / half
    omega = 1.0 / (10000.0**omega)
    angles = pos.to(torch.float64)[..., None] * omega  # [..., n, half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_pos_embed_1d(
    dim: int,
    positions: Union[Tensor, int],
    *,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """1D sine-cosine embedding of arbitrary positions (time steps, day of year, ...).

    Args:
        dim: embedding width (even, > 0).
        positions: float or int tensor ``[..., n]`` of positions (any values), or an int
            ``n`` meaning ``arange(n)``.
        dtype: floating-point output dtype (default: torch's default dtype).

    Returns:
        ``[..., n, dim]``: ``sin`` of every frequency, then ``cos``.
    """
    d = _check_dim(dim, 2)
    out_dtype = _check_dtype(dtype)
    if isinstance(positions, int) and not isinstance(positions, bool):
        pos = torch.arange(check_int("positions", positions, minimum=0), dtype=torch.float64)
    else:
        pos = check_tensor("positions", positions)
        if pos.dtype == torch.bool or pos.is_complex():
            raise TypeError(f"positions must be a real int or float tensor, got {pos.dtype}")
        if pos.ndim == 0:
            raise ValueError("positions must have at least one dimension [..., n], got a scalar")
    return _embed_1d(d, pos).to(out_dtype)


_STEP_TABLES: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}
_MAX_STEP_TABLES = 64


def steps_table(dim: int, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``sincos_pos_embed_1d(dim, arange(n))`` on ``device`` in ``dtype`` (private).

    A constant of its arguments, so it is made once and kept (a read-only tensor without
    gradient; at most 64 are kept): an eager forward that embeds the steps ``0..n-1`` every
    call launches none of its kernels again. Made afresh under ``torch.compile`` (the graph
    folds it) and while a CUDA graph is being captured."""
    if torch.compiler.is_compiling() or (
        device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    ):
        return sincos_pos_embed_1d(dim, torch.arange(n, device=device), dtype=dtype)
    key = (dim, n, device, dtype)
    table = _STEP_TABLES.get(key)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():
            table = sincos_pos_embed_1d(dim, torch.arange(n, device=device), dtype=dtype)
        if len(_STEP_TABLES) >= _MAX_STEP_TABLES:
            _STEP_TABLES.pop(next(iter(_STEP_TABLES)))
        _STEP_TABLES[key] = table
    return table


def sincos_pos_embed_2d_from_coords(
    dim: int, coords: Tensor, *, dtype: Optional[torch.dtype] = None
) -> Tensor:
    """2D sine-cosine embedding at arbitrary ``(row, col)`` coordinates.

    Args:
        dim: embedding width (multiple of 4).
        coords: float or int tensor ``[..., n, 2]`` holding ``(row, col)`` per token.
        dtype: floating-point output dtype (default: torch's default dtype).

    Returns:
        ``[..., n, dim]``: the first ``dim/2`` channels embed the column, the last ``dim/2``
        the row (MAE's layout), so grid coordinates reproduce `sincos_pos_embed_2d`.
    """
    d = _check_dim(dim, 4)
    out_dtype = _check_dtype(dtype)
    c = check_tensor("coords", coords)
    if c.dtype == torch.bool or c.is_complex():
        raise TypeError(f"coords must be a real int or float tensor, got {c.dtype}")
    if c.ndim < 2 or c.shape[-1] != 2:
        raise ValueError(f"coords must have shape [..., n, 2] (row, col), got {tuple(c.shape)}")
    emb = torch.cat([_embed_1d(d // 2, c[..., 1]), _embed_1d(d // 2, c[..., 0])], dim=-1)
    return emb.to(out_dtype)


def sincos_pos_embed_2d(
    dim: int,
    grid_size: Union[int, tuple[int, int]],
    *,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """MAE's fixed 2D sine-cosine table over an ``H x W`` grid, rows flattened row-major.

    Args:
        dim: embedding width (multiple of 4).
        grid_size: ``H`` (square) or ``(H, W)``.
        dtype: floating-point output dtype (default: torch's default dtype).

    Returns:
        ``[H * W, dim]``; token ``k = row * W + col``. No cls row (prepend zeros if needed).
    """
    d = _check_dim(dim, 4)
    out_dtype = _check_dtype(dtype)
    if isinstance(grid_size, int) and not isinstance(grid_size, bool):
        h = w = check_int("grid_size", grid_size, minimum=1)
    elif isinstance(grid_size, (tuple, list)) and len(grid_size) == 2:
        h = check_int("grid_size[0]", grid_size[0], minimum=1)
        w = check_int("grid_size[1]", grid_size[1], minimum=1)
    else:
        raise TypeError(f"grid_size must be an int or a pair (H, W), got {grid_size!r}")
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    return sincos_pos_embed_2d_from_coords(d, torch.stack([rows, cols], dim=-1), dtype=out_dtype)
