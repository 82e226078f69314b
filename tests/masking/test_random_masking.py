"""Contract tests for ``random_masking`` and ``MaskSplit``.

Legend: ``B`` batch, ``N`` tokens, ``K`` largest keep count, ``P`` largest
predict count. ``padding_mask``/``keep_padding_mask``/``predict_padding_mask``:
True = padding. ``visible_mask``: True = seen by the encoder. ``predict_mask``:
True = reconstruction target.

Counts are computed here with plain Python floats/ints, exactly as CONTRACT.md
states: ``n_keep = int(n * (1 - mask_ratio))``,
``n_skip = int(n * (mask_ratio - predict_ratio))``,
``n_predict = n - n_keep - n_skip``.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Optional

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import generator, lengths_to_mask, rand, seeds, shuffled_mask

from crossmae import MaskSplit, gather_tokens, mask_split_from_masks, random_masking

FIELDS = (
    "ids_keep",
    "keep_padding_mask",
    "ids_predict",
    "predict_padding_mask",
    "visible_mask",
    "predict_mask",
)

BOUNDARY_RATIOS = [
    (0.75, None),
    (0.75, 0.25),
    (0.75, 0.75),
    (0.7, 0.3),
    (0.7, 0.1),
    (0.3, 0.1),
    (0.3, 0.3),
    (0.1, 0.1),
    (0.9, 0.45),
    (0.6, 0.2),
    (0.55, 0.15),
    (0.85, 0.35),
    (0.95, 0.05),
    (0.35, 0.3),
    (0.45, 0.15),
    (0.4, 0.3),
    (0.5, 0.5),
]
VALID_RATIOS = BOUNDARY_RATIOS


def counts(n: int, mask_ratio: float, predict_ratio: Optional[float]) -> tuple[int, int, int]:
    pr = mask_ratio if predict_ratio is None else predict_ratio
    n_keep = int(n * (1 - mask_ratio))
    n_skip = int(n * (mask_ratio - pr))
    return n_keep, n_skip, n - n_keep - n_skip


def reference_split(
    noise: torch.Tensor,
    padding_mask: torch.Tensor,
    mask_ratio: float,
    predict_ratio: Optional[float],
) -> list[tuple[list[int], list[int]]]:
    """Per sample: (ids kept in shuffle order, ids predicted ascending)."""
    out = []
    for b in range(noise.shape[0]):
        real = [i for i in range(noise.shape[1]) if not bool(padding_mask[b, i])]
        nz = noise[b].tolist()
        order = sorted(real, key=lambda i: (nz[i], i))  # stable ascending sort by noise
        n_keep, _, n_pred = counts(len(real), mask_ratio, predict_ratio)
        keep = order[:n_keep]
        pred = sorted(order[len(order) - n_pred :]) if n_pred > 0 else []
        out.append((keep, pred))
    return out


def check_split(
    split: MaskSplit,
    padding_mask: torch.Tensor,
    mask_ratio: float,
    predict_ratio: Optional[float],
    noise: Optional[torch.Tensor] = None,
) -> None:
    """Check every structural property of a split (and the order when noise is known)."""
    b, n = padding_mask.shape
    real = ~padding_mask
    ns = real.sum(dim=1).tolist()
    cs = [counts(ni, mask_ratio, predict_ratio) for ni in ns]
    k = max((c[0] for c in cs), default=0)
    p = max((c[2] for c in cs), default=0)
    assert split.ids_keep.shape == (b, k) and split.ids_keep.dtype == torch.int64
    assert split.ids_predict.shape == (b, p) and split.ids_predict.dtype == torch.int64
    assert split.keep_padding_mask.shape == (b, k) and split.keep_padding_mask.dtype == torch.bool
    assert split.predict_padding_mask.shape == (b, p)
    assert split.predict_padding_mask.dtype == torch.bool
    assert split.visible_mask.shape == (b, n) and split.visible_mask.dtype == torch.bool
    assert split.predict_mask.shape == (b, n) and split.predict_mask.dtype == torch.bool

    # per-sample counts equal the plain-Python formulas (real slots left-aligned)
    assert torch.equal(split.keep_padding_mask, lengths_to_mask([c[0] for c in cs], k))
    assert torch.equal(split.predict_padding_mask, lengths_to_mask([c[2] for c in cs], p))
    assert split.visible_mask.sum(dim=1).tolist() == [c[0] for c in cs]
    assert split.predict_mask.sum(dim=1).tolist() == [c[2] for c in cs]
    skip = real & ~split.visible_mask & ~split.predict_mask
    assert skip.sum(dim=1).tolist() == [c[1] for c in cs]

    # disjoint, only real tokens, keep + predict + skip cover exactly the real tokens
    assert not (split.visible_mask & split.predict_mask).any()
    assert not (split.visible_mask & padding_mask).any()
    assert not (split.predict_mask & padding_mask).any()

    # padded id slots hold 0; real ids are distinct real tokens agreeing with the masks
    assert not split.ids_keep[split.keep_padding_mask].any()
    assert not split.ids_predict[split.predict_padding_mask].any()
    for i in range(b):
        keep = split.ids_keep[i, : cs[i][0]].tolist()
        pred = split.ids_predict[i, : cs[i][2]].tolist()
        assert len(set(keep)) == len(keep) and len(set(pred)) == len(pred)
        assert set(keep) == set(torch.nonzero(split.visible_mask[i]).flatten().tolist())
        assert set(pred) == set(torch.nonzero(split.predict_mask[i]).flatten().tolist())
        assert pred == sorted(pred), "ids_predict must be ascending"
        assert all(not bool(padding_mask[i, t]) for t in keep + pred)

    if noise is not None:
        ref = reference_split(noise, padding_mask, mask_ratio, predict_ratio)
        for i, (keep, pred) in enumerate(ref):
            assert split.ids_keep[i, : cs[i][0]].tolist() == keep
            assert split.ids_predict[i, : cs[i][2]].tolist() == pred


@st.composite
def ratios(draw: st.DrawFn) -> tuple[float, Optional[float]]:
    if draw(st.booleans()):
        return draw(st.sampled_from(VALID_RATIOS))
    mr = draw(st.floats(0.01, 0.99, allow_nan=False))
    if draw(st.booleans()):
        return mr, None
    pr = draw(st.floats(0.0, mr).filter(lambda v: 0 < v <= mr))
    return mr, pr


@st.composite
def padding_masks(draw: st.DrawFn, max_batch: int = 6, max_len: int = 40) -> torch.Tensor:
    b = draw(st.integers(1, max_batch))
    n = draw(st.integers(0, max_len))
    lengths = draw(st.lists(st.integers(0, n), min_size=b, max_size=b))
    m = lengths_to_mask(lengths, n)
    return shuffled_mask(m, draw(seeds())) if draw(st.booleans()) else m


# ----------------------------------------------------------------------------- counts


def test_boundary_ratio_set_hits_float_rounding() -> None:
    """Meta-check: the ratios below really contain cases where float math != exact math."""
    hits = 0
    for mr, pr in VALID_RATIOS:
        pr_ = mr if pr is None else pr
        for n in range(101):
            exact_keep = int(n * (1 - Fraction(mr)))
            exact_skip = int(n * (Fraction(mr) - Fraction(pr_)))
            if counts(n, mr, pr)[:2] != (exact_keep, exact_skip):
                hits += 1
    assert hits > 0


@pytest.mark.parametrize(("mask_ratio", "predict_ratio"), VALID_RATIOS)
def test_counts_match_python_formula_for_every_length(
    mask_ratio: float, predict_ratio: Optional[float]
) -> None:
    # one batch with every real length 0..100 (trailing padding)
    pm = lengths_to_mask(list(range(101)), 100)
    noise = rand(7, 101, 100)
    split = random_masking(
        101, 100, mask_ratio, predict_ratio=predict_ratio, padding_mask=pm, noise=noise
    )
    check_split(split, pm, mask_ratio, predict_ratio, noise)


@pytest.mark.parametrize(("mask_ratio", "predict_ratio"), VALID_RATIOS)
@pytest.mark.parametrize("n", [1, 3, 7, 10, 13, 20, 29, 49, 94, 97, 196])
def test_counts_unpadded(mask_ratio: float, predict_ratio: Optional[float], n: int) -> None:
    split = random_masking(2, n, mask_ratio, predict_ratio=predict_ratio, generator=generator(n))
    check_split(split, torch.zeros(2, n, dtype=torch.bool), mask_ratio, predict_ratio)


@given(pm=padding_masks(), r=ratios(), seed=seeds())
def test_split_properties_with_noise(
    pm: torch.Tensor, r: tuple[float, Optional[float]], seed: int
) -> None:
    mr, pr = r
    b, n = pm.shape
    noise = rand(seed, b, n)
    split = random_masking(b, n, mr, predict_ratio=pr, padding_mask=pm, noise=noise)
    check_split(split, pm, mr, pr, noise)


@given(pm=padding_masks(), r=ratios(), seed=seeds())
def test_split_properties_with_generator(
    pm: torch.Tensor, r: tuple[float, Optional[float]], seed: int
) -> None:
    mr, pr = r
    b, n = pm.shape
    split = random_masking(b, n, mr, predict_ratio=pr, padding_mask=pm, generator=generator(seed))
    check_split(split, pm, mr, pr)
    again = random_masking(b, n, mr, predict_ratio=pr, padding_mask=pm, generator=generator(seed))
    for f in FIELDS:
        assert torch.equal(getattr(split, f), getattr(again, f)), f


# ----------------------------------------------------------------------------- order / MAE compat


@given(b=st.integers(1, 5), n=st.integers(1, 60), r=ratios(), seed=seeds())
def test_mae_compatible_ids_keep(
    b: int, n: int, r: tuple[float, Optional[float]], seed: int
) -> None:
    mr, pr = r
    noise = rand(seed, b, n)
    split = random_masking(b, n, mr, predict_ratio=pr, noise=noise)
    len_keep = int(n * (1 - mr))
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(split.ids_keep, ids_shuffle[:, :len_keep])
    n_pred = counts(n, mr, pr)[2]
    expected_pred = torch.sort(ids_shuffle[:, n - n_pred :], dim=1).values
    assert torch.equal(split.ids_predict, expected_pred)
    assert not split.keep_padding_mask.any() and not split.predict_padding_mask.any()


@given(b=st.integers(1, 4), n=st.integers(0, 60), r=ratios(), seed=seeds())
def test_unpadded_split_equals_the_padded_path_without_padding(
    b: int, n: int, r: tuple[float, Optional[float]], seed: int
) -> None:
    """Without ``padding_mask`` the split takes a shorter path (slices of the shuffle): it
    equals the padded path given an all-False mask, field by field, dtypes included, and
    no two fields share memory (editing one never edits another). (An empty batch is not
    compared: there the padded path's widths come from its data, 0.)"""
    mr, pr = r
    noise = rand(seed, b, n)
    fast = random_masking(b, n, mr, predict_ratio=pr, noise=noise)
    pm = torch.zeros(b, n, dtype=torch.bool)
    full = random_masking(b, n, mr, predict_ratio=pr, noise=noise, padding_mask=pm)
    for f in FIELDS:
        x, y = getattr(fast, f), getattr(full, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    ptrs = [getattr(fast, f).untyped_storage().data_ptr() for f in FIELDS]
    sizes = [getattr(fast, f).untyped_storage().nbytes() for f in FIELDS]
    owned = [p for p, size in zip(ptrs, sizes) if size > 0]
    assert len(set(owned)) == len(owned)


def test_ties_are_broken_stably() -> None:
    pm = torch.tensor([[False, True, False, False, True, False, False, False]])
    noise = torch.zeros(1, 8)
    split = random_masking(1, 8, 0.5, predict_ratio=0.5, padding_mask=pm, noise=noise)
    real = [0, 2, 3, 5, 6, 7]
    assert split.ids_keep[0].tolist() == real[:3]
    assert split.ids_predict[0].tolist() == real[3:]


@given(pm=padding_masks(), r=ratios(), seed=seeds(), kind=st.sampled_from(["nan", "inf", "big"]))
def test_noise_at_padded_slots_is_ignored(
    pm: torch.Tensor, r: tuple[float, Optional[float]], seed: int, kind: str
) -> None:
    mr, pr = r
    b, n = pm.shape
    noise = rand(seed, b, n)
    garbage = {"nan": float("nan"), "inf": float("-inf"), "big": -1e9}[kind]
    bad = torch.where(pm, torch.full_like(noise, garbage), noise)
    a = random_masking(b, n, mr, predict_ratio=pr, padding_mask=pm, noise=noise)
    c = random_masking(b, n, mr, predict_ratio=pr, padding_mask=pm, noise=bad)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(c, f)), f


def test_batch_independence_of_split() -> None:
    pm = lengths_to_mask([10, 0, 7, 10], 10)
    noise = rand(3, 4, 10)
    full = random_masking(4, 10, 0.75, predict_ratio=0.25, padding_mask=pm, noise=noise)
    for i in range(4):
        one = random_masking(
            1, 10, 0.75, predict_ratio=0.25, padding_mask=pm[i : i + 1], noise=noise[i : i + 1]
        )
        kk, pp = one.ids_keep.shape[1], one.ids_predict.shape[1]
        assert torch.equal(full.ids_keep[i, :kk], one.ids_keep[0])
        assert torch.equal(full.ids_predict[i, :pp], one.ids_predict[0])
        assert torch.equal(full.visible_mask[i], one.visible_mask[0])
        assert torch.equal(full.predict_mask[i], one.predict_mask[0])


def test_all_padding_and_empty_sequences() -> None:
    split = random_masking(3, 5, 0.75, padding_mask=torch.ones(3, 5, dtype=torch.bool))
    assert split.ids_keep.shape == (3, 0) and split.ids_predict.shape == (3, 0)
    assert not split.visible_mask.any() and not split.predict_mask.any()
    split = random_masking(2, 0, 0.5)
    assert split.ids_keep.shape == (2, 0) and split.visible_mask.shape == (2, 0)


def test_device_argument() -> None:
    split = random_masking(2, 6, 0.5, device="cpu")
    for f in FIELDS:
        assert getattr(split, f).device.type == "cpu"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("mask_ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_mask_ratio(mask_ratio: float) -> None:
    with pytest.raises(ValueError):
        random_masking(2, 8, mask_ratio)


@pytest.mark.parametrize(
    ("mask_ratio", "predict_ratio"),
    [(0.5, 0.0), (0.5, -0.1), (0.5, 0.6), (0.0, 0.0), (0.3, 0.30001)],
)
def test_bad_predict_ratio(mask_ratio: float, predict_ratio: Optional[float]) -> None:
    with pytest.raises(ValueError):
        random_masking(2, 8, mask_ratio, predict_ratio=predict_ratio)


def test_bad_shapes_and_types() -> None:
    with pytest.raises(ValueError, match="padding_mask"):
        random_masking(2, 8, 0.5, padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        random_masking(2, 8, 0.5, padding_mask=torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        random_masking(2, 8, 0.5, padding_mask=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="noise"):
        random_masking(2, 8, 0.5, noise=torch.rand(2, 9))
    with pytest.raises(ValueError, match="noise"):
        random_masking(2, 8, 0.5, noise=torch.rand(8))
    with pytest.raises(ValueError):
        random_masking(2, -1, 0.5)


# ----------------------------------------------------------------------------- MaskSplit


def test_mask_split_is_immutable_record() -> None:
    split = random_masking(2, 8, 0.5, generator=generator(0))
    for f in FIELDS:
        assert isinstance(getattr(split, f), torch.Tensor)
    with pytest.raises((AttributeError, dataclasses.FrozenInstanceError)):
        split.ids_keep = torch.zeros(2, 4, dtype=torch.long)  # type: ignore[misc]


@given(pm=padding_masks(), r=ratios(), seed=seeds())
def test_mask_split_from_masks_roundtrip(
    pm: torch.Tensor, r: tuple[float, Optional[float]], seed: int
) -> None:
    mr, pr = r
    b, n = pm.shape
    split = random_masking(b, n, mr, predict_ratio=pr, padding_mask=pm, generator=generator(seed))
    again = mask_split_from_masks(split.visible_mask, split.predict_mask, padding_mask=pm)
    assert torch.equal(again.visible_mask, split.visible_mask)
    assert torch.equal(again.predict_mask, split.predict_mask)
    assert torch.equal(again.ids_predict, split.ids_predict)
    assert torch.equal(again.predict_padding_mask, split.predict_padding_mask)
    assert torch.equal(again.keep_padding_mask, split.keep_padding_mask)
    for i in range(b):
        real = ~split.keep_padding_mask[i]
        assert set(again.ids_keep[i][real].tolist()) == set(split.ids_keep[i][real].tolist())
    # helpers (documented: return (tokens with padded slots zeroed, matching padding mask))
    x = rand(seed, b, n, 3)
    x = torch.where(pm[..., None], torch.full_like(x, float("nan")), x)
    for method, ids, ids_pm in (
        (split.visible_tokens, split.ids_keep, split.keep_padding_mask),
        (split.predict_tokens, split.ids_predict, split.predict_padding_mask),
    ):
        tokens, tokens_pm = method(x)
        assert torch.equal(tokens_pm, ids_pm)
        expected = torch.where(ids_pm[..., None], torch.zeros(()), gather_tokens(x, ids))
        assert torch.equal(tokens, expected)
