"""Contract tests for ``gather_tokens``, ``scatter_tokens`` and the length/mask helpers.

Legend: ``B`` batch, ``N`` tokens, ``K`` selected slots. ``padding_mask`` of
ids is bool ``[B, K]`` with True = padded slot (its id is a valid index but
must be ignored).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import generator, lengths_to_mask, poison_padding, randn, seeds

from crossmae import (
    gather_tokens,
    lengths_to_padding_mask,
    padding_mask_to_lengths,
    scatter_tokens,
)

TRAILING = st.sampled_from([(), (3,), (2, 3)])


@st.composite
def selections(draw: st.DrawFn) -> tuple[int, int, list[int], tuple[int, ...], int]:
    """``(B, N, per-sample counts, trailing shape, seed)`` with counts <= N."""
    b = draw(st.integers(1, 5))
    n = draw(st.integers(0, 20))
    counts = draw(st.lists(st.integers(0, n), min_size=b, max_size=b))
    return b, n, counts, draw(TRAILING), draw(seeds())


def build_ids(
    b: int, n: int, counts: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Distinct real ids per sample (left-aligned) and random valid ids in padded slots."""
    g = generator(seed)
    k = max(counts, default=0)
    ids = torch.zeros(b, k, dtype=torch.long)
    for i, c in enumerate(counts):
        ids[i, :c] = torch.randperm(n, generator=g)[:c]
        if n > 0:
            ids[i, c:] = torch.randint(0, n, (k - c,), generator=g)  # may collide with real ids
    return ids, lengths_to_mask(counts, k), k


@given(sel=selections())
def test_gather_matches_indexing(sel: tuple[int, int, list[int], tuple[int, ...], int]) -> None:
    b, n, counts, trailing, seed = sel
    ids, _, k = build_ids(b, n, counts, seed)
    x = randn(seed, b, n, *trailing)
    out = gather_tokens(x, ids)
    assert out.shape == (b, k, *trailing)
    for i in range(b):
        for j in range(k):
            assert torch.equal(out[i, j], x[i, ids[i, j]])


@given(sel=selections(), fill=st.sampled_from([0.0, -1.5, 7.0]), poison=st.booleans())
def test_scatter_gather_roundtrip(
    sel: tuple[int, int, list[int], tuple[int, ...], int], fill: float, poison: bool
) -> None:
    b, n, counts, trailing, seed = sel
    ids, pm, _ = build_ids(b, n, counts, seed)
    x = randn(seed + 1, b, n, *trailing)
    values = gather_tokens(x, ids)
    if poison:  # padded value slots hold NaN/inf: never written, so the output stays finite
        values = poison_padding(values, pm, seed + 5, kind="mixed")
    out = scatter_tokens(values, ids, n, padding_mask=pm, fill_value=fill)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    selected = torch.zeros(b, n, dtype=torch.bool)
    for i, c in enumerate(counts):
        selected[i, ids[i, :c]] = True
    sel_b = selected.reshape(b, n, *([1] * len(trailing)))
    expected = torch.where(sel_b, x, torch.full_like(x, fill))
    assert torch.equal(out, expected)


@given(sel=selections())
def test_scatter_without_padding_mask(
    sel: tuple[int, int, list[int], tuple[int, ...], int],
) -> None:
    b, n, _, trailing, seed = sel
    # unpadded: every sample selects the same number of distinct tokens
    c = n // 2
    ids, _, _ = build_ids(b, n, [c] * b, seed)
    values = randn(seed, b, c, *trailing)
    out = scatter_tokens(values, ids, n)
    expected = torch.zeros(b, n, *trailing)
    for i in range(b):
        expected[i, ids[i]] = values[i]
    assert torch.equal(out, expected)


@given(sel=selections())
def test_scatter_gradient(sel: tuple[int, int, list[int], tuple[int, ...], int]) -> None:
    b, n, counts, trailing, seed = sel
    ids, pm, k = build_ids(b, n, counts, seed)
    values = randn(seed, b, k, *trailing).requires_grad_(True)
    upstream = randn(seed + 2, b, n, *trailing)
    out = scatter_tokens(values, ids, n, padding_mask=pm)
    (out * upstream).sum().backward()
    assert values.grad is not None
    expected = gather_tokens(upstream, ids)
    m = pm.reshape(b, k, *([1] * len(trailing)))
    expected = torch.where(m, torch.zeros_like(expected), expected)
    torch.testing.assert_close(values.grad, expected)


@given(sel=selections())
def test_gather_gradient(sel: tuple[int, int, list[int], tuple[int, ...], int]) -> None:
    b, n, counts, trailing, seed = sel
    ids, _, k = build_ids(b, n, counts, seed)
    x = randn(seed, b, n, *trailing).requires_grad_(True)
    upstream = randn(seed + 3, b, k, *trailing)
    (gather_tokens(x, ids) * upstream).sum().backward()
    expected = torch.zeros(b, n, *trailing, dtype=torch.float64)
    for i in range(b):
        for j in range(k):
            expected[i, ids[i, j]] += upstream[i, j].double()
    assert x.grad is not None
    torch.testing.assert_close(x.grad.double(), expected, atol=1e-5, rtol=1e-5)


def test_empty_selections() -> None:
    x = torch.randn(3, 5, 4)
    ids = torch.zeros(3, 0, dtype=torch.long)
    assert gather_tokens(x, ids).shape == (3, 0, 4)
    out = scatter_tokens(torch.zeros(3, 0, 4), ids, 5, fill_value=2.0)
    assert torch.equal(out, torch.full((3, 5, 4), 2.0))
    # all slots padded: nothing is written
    ids = torch.zeros(3, 2, dtype=torch.long)
    out = scatter_tokens(
        torch.full((3, 2, 4), float("nan")), ids, 5, padding_mask=torch.ones(3, 2, dtype=torch.bool)
    )
    assert torch.equal(out, torch.zeros(3, 5, 4))


def test_scatter_argument_checks() -> None:
    values, ids = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        scatter_tokens(values, torch.zeros(2, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="padding_mask"):
        scatter_tokens(values, ids, 5, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        scatter_tokens(values, ids, 5, padding_mask=torch.zeros(2, 3))


# ----------------------------------------------------------------------------- lengths <-> masks


@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=6), extra=st.integers(0, 4))
def test_lengths_to_padding_mask(lengths: list[int], extra: int) -> None:
    t = torch.tensor(lengths, dtype=torch.long)
    max_len = max(lengths) + extra
    pm = lengths_to_padding_mask(t, max_len)
    assert pm.dtype == torch.bool and pm.shape == (len(lengths), max_len)
    assert torch.equal(pm, lengths_to_mask(lengths, max_len))  # True = padding
    assert padding_mask_to_lengths(pm).tolist() == lengths
    default = lengths_to_padding_mask(t)
    assert default.shape == (len(lengths), max(lengths))
    assert torch.equal(default, lengths_to_mask(lengths, max(lengths)))


def test_padding_mask_polarity_example() -> None:
    pm = lengths_to_padding_mask(torch.tensor([2, 0, 3]), 3)
    assert pm.tolist() == [[False, False, True], [True, True, True], [False, False, False]]
    assert padding_mask_to_lengths(pm).tolist() == [2, 0, 3]


@given(seed=seeds(), b=st.integers(1, 5), n=st.integers(0, 12))
def test_padding_mask_to_lengths_counts_real_slots(seed: int, b: int, n: int) -> None:
    pm = torch.rand(b, n, generator=generator(seed)) < 0.4
    assert padding_mask_to_lengths(pm).tolist() == (~pm).sum(dim=1).tolist()
