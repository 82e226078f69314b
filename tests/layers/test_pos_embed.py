"""Contract tests for the sin-cos positional embedding tables.

Independent float64 reference from REFERENCE.md: the 1D embedding of width
``D`` at position ``p`` is ``[sin(p * w_0..w_{D/2-1}), cos(p * w_0..w_{D/2-1})]``
with ``w_i = 1 / 10000 ** (i / (D / 2))``. The 2D table over an ``H x W`` grid
is row-major (token ``k = row * W + col``); its first ``D/2`` channels embed the
column, the last ``D/2`` the row.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import rand, seeds

from crossmae import sincos_pos_embed_1d, sincos_pos_embed_2d, sincos_pos_embed_2d_from_coords


def ref_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    omega = torch.tensor([1.0 / 10000 ** (i / half) for i in range(half)], dtype=torch.float64)
    ang = positions.double()[..., None] * omega
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


def ref_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return torch.cat([ref_1d(dim // 2, cols), ref_1d(dim // 2, rows)], dim=-1)


def grid_coords(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every token of an ``h x w`` grid, row-major."""
    rows = torch.tensor([r for r in range(h) for _ in range(w)], dtype=torch.float64)
    cols = torch.tensor([c for _ in range(h) for c in range(w)], dtype=torch.float64)
    return rows, cols


even_dims = st.sampled_from([2, 4, 6, 8, 16, 32, 64, 256])
dims_div4 = st.sampled_from([4, 8, 12, 16, 32, 64, 128])


# ----------------------------------------------------------------------------- 1D


@given(dim=even_dims, n=st.integers(1, 20))
def test_1d_position_zero(dim: int, n: int) -> None:
    out = sincos_pos_embed_1d(dim, torch.zeros(n))
    assert out.shape == (n, dim)
    assert torch.equal(out[:, : dim // 2], torch.zeros(n, dim // 2))
    assert torch.equal(out[:, dim // 2 :], torch.ones(n, dim // 2))


@given(dim=even_dims, n=st.integers(0, 30), seed=seeds(), scale=st.sampled_from([1.0, 30.0, 366.0]))
def test_1d_matches_reference_float32(dim: int, n: int, seed: int, scale: float) -> None:
    pos = (rand(seed, n) * 2 - 0.5) * scale  # arbitrary values, negative too (e.g. day of year)
    out = sincos_pos_embed_1d(dim, pos)
    assert out.shape == (n, dim)
    assert out.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out.double(), ref_1d(dim, pos), atol=2e-4, rtol=0)


@given(dim=even_dims, n=st.integers(0, 30), seed=seeds())
def test_1d_matches_reference_float64(dim: int, n: int, seed: int) -> None:
    pos = (rand(seed, n, dtype=torch.float64) - 0.3) * 400
    out = sincos_pos_embed_1d(dim, pos, dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_1d(dim, pos), atol=1e-9, rtol=0)


def test_1d_integer_positions_and_batch_dims() -> None:
    pos = torch.arange(24, dtype=torch.long).reshape(2, 3, 4)
    out = sincos_pos_embed_1d(8, pos)
    assert out.shape == (2, 3, 4, 8)
    assert out.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out.double(), ref_1d(8, pos), atol=1e-5, rtol=0)
    flat = sincos_pos_embed_1d(8, pos.reshape(-1))
    torch.testing.assert_close(out.reshape(-1, 8), flat)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_1d_dtype_kwarg(dtype: torch.dtype) -> None:
    out = sincos_pos_embed_1d(16, torch.arange(10), dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_1d(16, torch.arange(10)), atol=1e-2, rtol=0)


@pytest.mark.parametrize("dim", [1, 3, 7])
def test_1d_odd_dim_raises(dim: int) -> None:
    with pytest.raises(ValueError):
        sincos_pos_embed_1d(dim, torch.arange(4))


# ----------------------------------------------------------------------------- 2D grid


@given(dim=dims_div4, h=st.integers(1, 9), w=st.integers(1, 9))
def test_2d_grid_layout(dim: int, h: int, w: int) -> None:
    out = sincos_pos_embed_2d(dim, (h, w))
    assert out.shape == (h * w, dim)
    assert out.dtype == torch.get_default_dtype()
    rows, cols = grid_coords(h, w)
    ref = ref_2d(dim, rows, cols)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    # first half: column embedding; second half: row embedding
    torch.testing.assert_close(
        out[:, : dim // 2].double(), ref_1d(dim // 2, cols), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        out[:, dim // 2 :].double(), ref_1d(dim // 2, rows), atol=1e-6, rtol=0
    )


def test_2d_token_index_is_row_major() -> None:
    h, w, dim = 3, 5, 8
    out = sincos_pos_embed_2d(dim, (h, w), dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            k = r * w + c
            expected = torch.cat(
                [
                    ref_1d(dim // 2, torch.tensor([float(c)]))[0],
                    ref_1d(dim // 2, torch.tensor([float(r)]))[0],
                ]
            )
            torch.testing.assert_close(out[k], expected, atol=1e-12, rtol=0)
    # token 1 is column 1 of row 0: its row half equals token 0's row half
    assert torch.equal(out[1, dim // 2 :], out[0, dim // 2 :])
    assert not torch.equal(out[1, : dim // 2], out[0, : dim // 2])


@given(dim=dims_div4, g=st.integers(1, 8))
def test_2d_int_grid_size_is_square(dim: int, g: int) -> None:
    torch.testing.assert_close(sincos_pos_embed_2d(dim, g), sincos_pos_embed_2d(dim, (g, g)))


def test_2d_dtype_kwarg() -> None:
    out = sincos_pos_embed_2d(16, (4, 3), dtype=torch.float64)
    assert out.dtype == torch.float64
    rows, cols = grid_coords(4, 3)
    torch.testing.assert_close(out, ref_2d(16, rows, cols), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dim", [2, 6, 10, 5])
def test_2d_indivisible_dim_raises(dim: int) -> None:
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(dim, (3, 4))
    with pytest.raises(ValueError):
        sincos_pos_embed_2d_from_coords(dim, torch.zeros(5, 2))


# ----------------------------------------------------------------------------- 2D from coords


@given(dim=dims_div4, h=st.integers(1, 8), w=st.integers(1, 8))
def test_2d_from_coords_equals_grid(dim: int, h: int, w: int) -> None:
    rows, cols = grid_coords(h, w)
    coords = torch.stack([rows, cols], dim=-1).float()
    out = sincos_pos_embed_2d_from_coords(dim, coords)
    assert out.shape == (h * w, dim)
    torch.testing.assert_close(out, sincos_pos_embed_2d(dim, (h, w)), atol=1e-6, rtol=0)
    long_out = sincos_pos_embed_2d_from_coords(dim, coords.long())
    torch.testing.assert_close(long_out, out, atol=1e-6, rtol=0)


@given(dim=dims_div4, n=st.integers(0, 12), seed=seeds())
def test_2d_from_coords_arbitrary(dim: int, n: int, seed: int) -> None:
    coords = (rand(seed, 2, 3, n, 2, dtype=torch.float64) - 0.5) * 100
    out = sincos_pos_embed_2d_from_coords(dim, coords, dtype=torch.float64)
    assert out.shape == (2, 3, n, dim)
    assert out.dtype == torch.float64
    ref = ref_2d(dim, coords[..., 0], coords[..., 1])
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)


def test_2d_from_coords_bad_last_dim() -> None:
    with pytest.raises(ValueError):
        sincos_pos_embed_2d_from_coords(8, torch.zeros(4, 3))


def test_known_mae_value() -> None:
    # A hand-computed entry: dim 8 on a 2x2 grid, token 3 = (row 1, col 1):
    # column half [sin(1), sin(1e-2), cos(1), cos(1e-2)], same for the row half.
    out = sincos_pos_embed_2d(8, 2, dtype=torch.float64)
    half = [math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)]
    torch.testing.assert_close(out[3], torch.tensor(half + half, dtype=torch.float64))
    # token 1 = (row 0, col 1)
    row0 = [0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(out[1], torch.tensor(half + row0, dtype=torch.float64))


def test_steps_table_is_the_1d_table_made_once() -> None:
    """`steps_table` equals ``sincos_pos_embed_1d(dim, arange(n))`` exactly, is made once per
    (dim, n, device, dtype) and reused, carries no gradient, works in training after being
    first made under ``inference_mode``, and keeps at most 64 tables."""
    from crossmae.layers import pos_embed as pe

    pe._STEP_TABLES.clear()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        first = pe.steps_table(12, 7, cpu, torch.float32)
    assert torch.equal(first, pe.sincos_pos_embed_1d(12, torch.arange(7), dtype=torch.float32))
    assert pe.steps_table(12, 7, cpu, torch.float32) is first
    assert not first.requires_grad and not first.is_inference()
    other = pe.steps_table(12, 7, cpu, torch.float64)
    assert other is not first and other.dtype == torch.float64
    w = torch.randn(7, 12, requires_grad=True)
    (w * pe.steps_table(12, 7, cpu, torch.float32)).sum().backward()
    assert torch.equal(w.grad, first)
    for n in range(100):
        pe.steps_table(4, n + 1, cpu, torch.float32)
    assert len(pe._STEP_TABLES) <= 64
    pe._STEP_TABLES.clear()


def test_public_embeddings_do_not_hand_out_the_shared_tables() -> None:
    """`spatial_embedding` and `position_embedding` return fresh tensors: writing into them
    leaves the shared step tables, and so the next forward, unchanged."""
    from crossmae.layers import pos_embed as pe
    from crossmae.tokenizers import SeriesTokenizer

    pe._STEP_TABLES.clear()
    tok = SeriesTokenizer(16, 8, spatial_embed="sincos", time_embed=None)
    x = torch.randn(2, 8, 3)
    want = tok(x)[0]
    emb = tok.spatial_embedding()
    emb.add_(100.0)
    flat = tok.position_embedding(1)
    flat.add_(100.0)
    assert torch.equal(tok(x)[0], want)
    assert all(t.abs().max() <= 1.0 for t in pe._STEP_TABLES.values())
