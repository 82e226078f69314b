"""Tests for the structured masking strategies in ``crossmae.masking.strategies``.

Legend: ``B`` batch, ``T`` steps (or channels), ``L`` locations, ``N = T * L`` tokens,
time-major (token = t * L + l). ``padding_mask`` True = padding; ``missing`` True = the
modality is missing for that sample.

Every check compares against an independent slow reference written with Python loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import generator, seeds

from crossmae.masking.split import MaskSplit, random_masking
from crossmae.masking.strategies import (
    channel_masking,
    chunk_masking,
    grouped_random_masking,
    mask_missing_samples,
    modality_dropout,
    tail_masking,
    time_step_masking,
    tube_masking,
)

# ----------------------------------------------------------------------------- helpers


def ref_counts(u: int, mr: float, pr: float) -> tuple[int, int]:
    """``(keep, predict)`` of the contract's formula, in plain Python."""
    keep = int(u * (1 - mr))
    skip = int(u * (mr - pr))
    return keep, u - keep - skip


@dataclass(frozen=True)
class Grid:
    """A drawn masking problem: ``B`` samples of ``T x L`` tokens with padding and ratios."""

    b: int
    t: int
    l: int  # noqa: E741
    mr: float
    pr: Optional[float]
    pad_kind: str
    seed: int

    @property
    def n(self) -> int:
        return self.t * self.l

    @property
    def pr_eff(self) -> float:
        return self.mr if self.pr is None else self.pr

    def padding_mask(self) -> Optional[torch.Tensor]:
        """bool ``[B, N]`` (True = padding) or None, built from the seed."""
        if self.pad_kind == "none":
            return None
        if self.pad_kind == "all":
            return torch.ones(self.b, self.n, dtype=torch.bool)
        g = generator(self.seed + 1)
        share = torch.rand(self.b, 1, generator=g, dtype=torch.float64)
        pad = torch.rand(self.b, self.n, generator=g, dtype=torch.float64) < share
        if self.pad_kind == "rows":  # some samples are fully padded
            empty = torch.rand(self.b, generator=g) < 0.5
            pad = pad | empty[:, None]
        elif self.pad_kind == "steps":  # whole steps padded, locations padded
            step_pad = torch.rand(self.b, self.t, 1, generator=g) < 0.3
            loc_pad = torch.rand(self.b, 1, self.l, generator=g) < 0.3
            pad = (step_pad | loc_pad).reshape(self.b, self.n)
        return pad


@st.composite
def grids(draw: st.DrawFn, max_b: int = 4, max_t: int = 6, max_l: int = 6) -> Grid:
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(0, max_t))
    l_ = draw(st.integers(0, max_l))
    mr = draw(
        st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 0.99]) | st.floats(0, 0.99)
    )
    pr: Optional[float] = None
    if mr > 0 and draw(st.booleans()):
        pr = draw(st.sampled_from([mr, mr / 2, mr / 3]) | st.floats(mr / 100, mr))
        pr = min(max(pr, 1e-6), mr)
    pad_kind = draw(st.sampled_from(["none", "random", "rows", "steps", "all"]))
    return Grid(b, t, l_, mr, pr, pad_kind, draw(seeds()))


def real_of(g: Grid, pad: Optional[torch.Tensor]) -> torch.Tensor:
    """bool ``[B, T, L]``, True = real token."""
    if pad is None:
        return torch.ones(g.b, g.t, g.l, dtype=torch.bool)
    return (~pad).reshape(g.b, g.t, g.l)


def check_split(split: MaskSplit, pad: Optional[torch.Tensor], b: int, n: int) -> None:
    """Structural invariants every MaskSplit must satisfy (slow, loop-based)."""
    vis, pred = split.visible_mask, split.predict_mask
    assert vis.shape == (b, n) and pred.shape == (b, n)
    assert vis.dtype == torch.bool and pred.dtype == torch.bool
    assert not (vis & pred).any()
    if pad is not None:
        assert not (vis & pad).any() and not (pred & pad).any()
    for ids, ids_pad, sel in (
        (split.ids_keep, split.keep_padding_mask, vis),
        (split.ids_predict, split.predict_padding_mask, pred),
    ):
        assert ids.dtype == torch.int64 and ids_pad.dtype == torch.bool
        assert ids.shape == ids_pad.shape and ids.shape[0] == b
        counts = [int(sel[i].sum()) for i in range(b)]
        if b > 0:  # an empty batch keeps the static width (as random_masking does)
            assert ids.shape[1] == max(counts)
        for i in range(b):
            expected = [j for j in range(n) if bool(sel[i, j])]
            got = [int(ids[i, s]) for s in range(ids.shape[1]) if not bool(ids_pad[i, s])]
            assert got == expected  # ascending token order, exactly the selected tokens
            assert all(int(ids[i, s]) == 0 for s in range(ids.shape[1]) if bool(ids_pad[i, s]))


def check_unit_roles(
    vis_u: list[list[list[bool]]],
    pred_u: list[list[list[bool]]],
    real_u: list[list[list[bool]]],
    noise_u: Optional[list[list[list[float]]]],
    mr: float,
    pr: float,
) -> None:
    """Per group: counts by the formula; visible = smallest noise, predicted = largest."""
    for i, groups in enumerate(real_u):
        for gi, real in enumerate(groups):
            idx = [j for j, r in enumerate(real) if r]
            keep, npred = ref_counts(len(idx), mr, pr)
            vis = [j for j in idx if vis_u[i][gi][j]]
            prd = [j for j in idx if pred_u[i][gi][j]]
            assert len(vis) == keep and len(prd) == npred
            assert not any(vis_u[i][gi][j] or pred_u[i][gi][j] for j, r in enumerate(real) if not r)
            if noise_u is not None:
                order = sorted(idx, key=lambda j: (noise_u[i][gi][j], j))
                assert sorted(vis) == sorted(order[:keep])
                assert sorted(prd) == sorted(order[len(order) - npred :])


def unit_roles_from_tokens(
    tok: torch.Tensor, real_tok: torch.Tensor, unit_of: Callable[[int, int], int], units: int
) -> list[list[bool]]:
    """Per sample, per unit: the common role of its real tokens (asserts it is common)."""
    b, t, l_ = real_tok.shape
    out: list[list[bool]] = []
    for i in range(b):
        roles: list[Optional[bool]] = [None] * units
        for s in range(t):
            for j in range(l_):
                if not bool(real_tok[i, s, j]):
                    continue
                u = unit_of(s, j)
                v = bool(tok[i, s * l_ + j])
                assert roles[u] is None or roles[u] == v, "a unit's real tokens differ in role"
                roles[u] = v
        out.append([bool(r) for r in roles])
    return out


# ----------------------------------------------------------------------------- grouped


@given(grids(), st.booleans())
def test_grouped_counts_per_step_and_noise_order(g: Grid, explicit_noise: bool) -> None:
    pad = g.padding_mask()
    noise = torch.rand(g.b, g.n, generator=generator(g.seed)) if explicit_noise else None
    split = grouped_random_masking(
        g.b,
        g.t,
        g.l,
        g.mr,
        predict_ratio=g.pr,
        padding_mask=pad,
        noise=noise,
        generator=generator(g.seed),
    )
    check_split(split, pad, g.b, g.n)
    real = real_of(g, pad).tolist()
    vis = split.visible_mask.reshape(g.b, g.t, g.l).tolist()
    prd = split.predict_mask.reshape(g.b, g.t, g.l).tolist()
    noise_u = noise.reshape(g.b, g.t, g.l).tolist() if noise is not None else None
    check_unit_roles(vis, prd, real, noise_u, g.mr, g.pr_eff)


@given(grids(max_t=1))
def test_grouped_single_step_equals_random_masking(g: Grid) -> None:
    pad = g.padding_mask()
    noise = torch.rand(g.b, g.n, generator=generator(g.seed))
    got = grouped_random_masking(
        g.b, g.t, g.l, g.mr, predict_ratio=g.pr, padding_mask=pad, noise=noise
    )
    ref = random_masking(g.b, g.n, g.mr, predict_ratio=g.pr, padding_mask=pad, noise=noise)
    assert torch.equal(got.visible_mask, ref.visible_mask)
    assert torch.equal(got.predict_mask, ref.predict_mask)
    assert torch.equal(got.ids_predict, ref.ids_predict)


def test_grouped_water_model_shapes() -> None:
    """94 land patches of 522 per step, 30 steps, hide 37 per step."""
    b, t, l_ = 2, 30, 522
    g = generator(0)
    land = torch.zeros(b, l_, dtype=torch.bool)
    for i in range(b):
        land[i, torch.randperm(l_, generator=g)[:94]] = True
    pad = ~land[:, None, :].expand(b, t, l_).reshape(b, t * l_)
    split = grouped_random_masking(b, t, l_, 0.39, padding_mask=pad, generator=g)
    per_step_vis = split.visible_mask.reshape(b, t, l_).sum(-1)
    per_step_pred = split.predict_mask.reshape(b, t, l_).sum(-1)
    assert torch.equal(per_step_vis, torch.full((b, t), 57))
    assert torch.equal(per_step_pred, torch.full((b, t), 37))
    assert split.ids_keep.shape == (b, 1710) and split.ids_predict.shape == (b, 1110)
    assert not split.keep_padding_mask.any() and not split.predict_padding_mask.any()
    same = grouped_random_masking(b, t, l_, 37 / 94, padding_mask=pad, generator=generator(0))
    assert torch.equal(same.visible_mask.reshape(b, t, l_).sum(-1), per_step_vis)


@given(grids())
def test_unpadded_path_equals_all_real_padding_mask(g: Grid) -> None:
    """The sync-free widths (no padding_mask) equal the data-sized ones."""
    no_pad = torch.zeros(g.b, g.n, dtype=torch.bool)
    gen = generator(g.seed)
    noise_tok = torch.rand(g.b, g.n, generator=gen)
    noise_t = torch.rand(g.b, g.t, generator=gen)
    noise_l = torch.rand(g.b, g.l, generator=gen)
    chunk = 1 + g.seed % 3
    noise_c = torch.rand(g.b, math.ceil(g.t / chunk), generator=gen)
    kw: dict[str, Any] = {"predict_ratio": g.pr}
    calls: list[Callable[[Optional[torch.Tensor]], MaskSplit]] = [
        lambda p: grouped_random_masking(
            g.b, g.t, g.l, g.mr, padding_mask=p, noise=noise_tok, **kw
        ),
        lambda p: time_step_masking(g.b, g.t, g.l, g.mr, padding_mask=p, noise=noise_t, **kw),
        lambda p: chunk_masking(
            g.b, g.t, g.l, g.mr, chunk_size=chunk, padding_mask=p, noise=noise_c, **kw
        ),
        lambda p: tail_masking(g.b, g.t, g.l, g.mr, padding_mask=p, **kw),
        lambda p: channel_masking(g.b, g.t, g.l, g.mr, padding_mask=p, noise=noise_t, **kw),
        lambda p: tube_masking(g.b, g.t, g.l, g.mr, padding_mask=p, noise=noise_l, **kw),
    ]
    for call in calls:
        a, b = call(None), call(no_pad)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y)


# ----------------------------------------------------------------------------- steps / chunks


@given(grids(), st.integers(1, 4), st.booleans())
def test_chunk_masking_hides_whole_chunks(g: Grid, chunk: int, explicit_noise: bool) -> None:
    pad = g.padding_mask()
    num_chunks = math.ceil(g.t / chunk)
    noise = torch.rand(g.b, num_chunks, generator=generator(g.seed)) if explicit_noise else None
    split = chunk_masking(
        g.b,
        g.t,
        g.l,
        g.mr,
        chunk_size=chunk,
        predict_ratio=g.pr,
        padding_mask=pad,
        noise=noise,
        generator=generator(g.seed),
    )
    check_split(split, pad, g.b, g.n)
    real = real_of(g, pad)

    def unit_of(s: int, j: int) -> int:
        return s // chunk

    vis = unit_roles_from_tokens(split.visible_mask, real, unit_of, num_chunks)
    prd = unit_roles_from_tokens(split.predict_mask, real, unit_of, num_chunks)
    real_u = [
        [bool(real[i, c * chunk : (c + 1) * chunk].any()) for c in range(num_chunks)]
        for i in range(g.b)
    ]
    noise_u = [[row] for row in noise.tolist()] if noise is not None else None
    check_unit_roles(
        [[r] for r in vis], [[r] for r in prd], [[r] for r in real_u], noise_u, g.mr, g.pr_eff
    )


@given(grids())
def test_time_step_masking_equals_chunk_of_one_and_hides_whole_steps(g: Grid) -> None:
    pad = g.padding_mask()
    noise = torch.rand(g.b, g.t, generator=generator(g.seed))
    split = time_step_masking(
        g.b, g.t, g.l, g.mr, predict_ratio=g.pr, padding_mask=pad, noise=noise
    )
    ref = chunk_masking(
        g.b, g.t, g.l, g.mr, chunk_size=1, predict_ratio=g.pr, padding_mask=pad, noise=noise
    )
    for x, y in zip(split, ref):
        assert torch.equal(x, y)
    real = real_of(g, pad)
    vis = split.visible_mask.reshape(g.b, g.t, g.l)
    # every real token of a step shares the step's role
    for i in range(g.b):
        for s in range(g.t):
            roles = {bool(vis[i, s, j]) for j in range(g.l) if bool(real[i, s, j])}
            assert len(roles) <= 1
    vis_steps = [[bool(vis[i, s].any()) for s in range(g.t)] for i in range(g.b)]
    real_steps = [[bool(real[i, s].any()) for s in range(g.t)] for i in range(g.b)]
    for i in range(g.b):
        keep, _ = ref_counts(sum(real_steps[i]), g.mr, g.pr_eff)
        assert sum(vis_steps[i]) == keep


@given(grids())
def test_tail_masking_hides_exactly_the_last_steps(g: Grid) -> None:
    pad = g.padding_mask()
    split = tail_masking(g.b, g.t, g.l, g.mr, predict_ratio=g.pr, padding_mask=pad)
    check_split(split, pad, g.b, g.n)
    real = real_of(g, pad)
    for i in range(g.b):
        steps = [s for s in range(g.t) if bool(real[i, s].any())]
        keep, npred = ref_counts(len(steps), g.mr, g.pr_eff)
        want_vis = torch.zeros(g.t, g.l, dtype=torch.bool)
        want_pred = torch.zeros(g.t, g.l, dtype=torch.bool)
        for s in steps[:keep]:
            want_vis[s] = real[i, s]
        for s in steps[len(steps) - npred :]:
            want_pred[s] = real[i, s]
        assert torch.equal(split.visible_mask[i].reshape(g.t, g.l), want_vis)
        assert torch.equal(split.predict_mask[i].reshape(g.t, g.l), want_pred)


def test_tail_masking_example() -> None:
    split = tail_masking(1, 5, 2, 0.6, predict_ratio=0.1)
    assert split.visible_mask.tolist() == [[True] * 4 + [False] * 6]
    assert split.predict_mask.tolist() == [[False] * 8 + [True] * 2]


# ----------------------------------------------------------------------------- channel / tube


@given(grids())
def test_channel_masking_hides_whole_channels(g: Grid) -> None:
    pad = g.padding_mask()
    noise = torch.rand(g.b, g.t, generator=generator(g.seed))
    split = channel_masking(g.b, g.t, g.l, g.mr, predict_ratio=g.pr, padding_mask=pad, noise=noise)
    check_split(split, pad, g.b, g.n)
    real = real_of(g, pad)

    def unit_of(c: int, j: int) -> int:
        return c

    vis = unit_roles_from_tokens(split.visible_mask, real, unit_of, g.t)
    prd = unit_roles_from_tokens(split.predict_mask, real, unit_of, g.t)
    real_u = [[[bool(real[i, c].any()) for c in range(g.t)]] for i in range(g.b)]
    noise_u = [[row] for row in noise.tolist()]
    check_unit_roles([[r] for r in vis], [[r] for r in prd], real_u, noise_u, g.mr, g.pr_eff)


@given(grids(), st.booleans())
def test_tube_mask_identical_across_steps(g: Grid, explicit_noise: bool) -> None:
    pad = g.padding_mask()
    noise = torch.rand(g.b, g.l, generator=generator(g.seed)) if explicit_noise else None
    split = tube_masking(
        g.b,
        g.t,
        g.l,
        g.mr,
        predict_ratio=g.pr,
        padding_mask=pad,
        noise=noise,
        generator=generator(g.seed),
    )
    check_split(split, pad, g.b, g.n)
    real = real_of(g, pad)

    def unit_of(s: int, j: int) -> int:
        return j

    vis = unit_roles_from_tokens(split.visible_mask, real, unit_of, g.l)
    prd = unit_roles_from_tokens(split.predict_mask, real, unit_of, g.l)
    real_u = [[[bool(real[i, :, j].any()) for j in range(g.l)]] for i in range(g.b)]
    noise_u = [[row] for row in noise.tolist()] if noise is not None else None
    check_unit_roles([[r] for r in vis], [[r] for r in prd], real_u, noise_u, g.mr, g.pr_eff)
    if pad is None:  # without padding the spatial mask is literally the same at every step
        v = split.visible_mask.reshape(g.b, g.t, g.l)
        assert all(torch.equal(v[:, s], v[:, 0]) for s in range(g.t))


# ----------------------------------------------------------------------------- common


ALL = ["grouped", "time_step", "chunk", "tail", "channel", "tube"]


def run_strategy(name: str, g: Grid, pad: Optional[torch.Tensor], **kw: Any) -> MaskSplit:
    args = (g.b, g.t, g.l, g.mr)
    common: dict[str, Any] = {"predict_ratio": g.pr, "padding_mask": pad, **kw}
    if name == "tail":
        common.pop("generator", None)
        common.pop("noise", None)
        return tail_masking(*args, **common)
    fn: dict[str, Callable[..., MaskSplit]] = {
        "grouped": grouped_random_masking,
        "time_step": time_step_masking,
        "channel": channel_masking,
        "tube": tube_masking,
    }
    if name == "chunk":
        return chunk_masking(*args, chunk_size=2, **common)
    return fn[name](*args, **common)


@given(grids(), st.sampled_from(ALL))
def test_deterministic_given_generator(g: Grid, name: str) -> None:
    pad = g.padding_mask()
    a = run_strategy(name, g, pad, generator=generator(g.seed))
    b = run_strategy(name, g, pad, generator=generator(g.seed))
    check_split(a, pad, g.b, g.n)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@given(grids(), st.sampled_from(ALL), st.integers(0, 3))
def test_sample_with_no_real_tokens_and_padding_batches(g: Grid, name: str, row: int) -> None:
    """A fully padded sample selects nothing; the other samples are unaffected by it."""
    pad = g.padding_mask()
    base = torch.zeros(g.b, g.n, dtype=torch.bool) if pad is None else pad
    i = row % g.b
    empty = base.clone()
    empty[i] = True
    kw: dict[str, Any] = {"generator": generator(g.seed)}
    split = run_strategy(name, g, empty, **kw)
    check_split(split, empty, g.b, g.n)
    assert not split.visible_mask[i].any() and not split.predict_mask[i].any()
    assert split.keep_padding_mask[i].all() and split.predict_padding_mask[i].all()
    # B = 1 on that empty row, and the whole-batch-of-padding case
    one = run_strategy(name, Grid(1, g.t, g.l, g.mr, g.pr, "all", g.seed), empty[i : i + 1])
    assert one.ids_keep.shape == (1, 0) and one.ids_predict.shape == (1, 0)
    assert one.visible_mask.shape == (1, g.n) and not one.visible_mask.any()


@pytest.mark.parametrize("name", ALL)
def test_empty_batch_and_zero_tokens(name: str) -> None:
    for b, t, l_ in ((0, 3, 2), (2, 0, 3), (2, 3, 0), (1, 1, 1)):
        g = Grid(b, t, l_, 0.5, None, "none", 0)
        split = run_strategy(name, g, None, generator=generator(0))
        check_split(split, None, b, t * l_)


@pytest.mark.parametrize("name", ALL)
def test_bad_arguments(name: str) -> None:
    g = Grid(2, 3, 4, 0.5, None, "none", 0)
    for mr, pr in ((1.0, None), (-0.1, None), (0.5, 0.0), (0.5, 0.6), (float("nan"), None)):
        with pytest.raises(ValueError, match="ratio"):
            run_strategy(name, Grid(2, 3, 4, mr, pr, "none", 0), None)
    with pytest.raises(ValueError, match="padding_mask"):
        run_strategy(name, g, torch.zeros(2, 11, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        run_strategy(name, g, torch.zeros(2, 12))
    with pytest.raises(TypeError, match="batch_size"):
        run_strategy(name, Grid(2.0, 3, 4, 0.5, None, "none", 0), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        run_strategy(name, Grid(-1, 3, 4, 0.5, None, "none", 0), None)
    if name != "tail":
        with pytest.raises(ValueError, match="noise"):
            run_strategy(name, g, None, noise=torch.rand(2, 5))
        with pytest.raises(TypeError, match="noise"):
            run_strategy(name, g, None, noise=torch.zeros(2, 12, dtype=torch.long))


def test_chunk_size_checked() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_masking(2, 3, 4, 0.5, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        chunk_masking(2, 3, 4, 0.5, chunk_size=1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- modalities


@given(grids(), seeds())
def test_mask_missing_samples_is_per_sample(g: Grid, flag_seed: int) -> None:
    pad = g.padding_mask()
    split = grouped_random_masking(
        g.b, g.t, g.l, g.mr, predict_ratio=g.pr, padding_mask=pad, generator=generator(g.seed)
    )
    missing = torch.rand(g.b, generator=generator(flag_seed)) < 0.5
    out = mask_missing_samples(split, missing)
    check_split(out, pad, g.b, g.n)
    for i in range(g.b):
        if bool(missing[i]):
            assert not out.visible_mask[i].any() and not out.predict_mask[i].any()
            assert out.keep_padding_mask[i].all() and out.predict_padding_mask[i].all()
        else:
            assert torch.equal(out.visible_mask[i], split.visible_mask[i])
            assert torch.equal(out.predict_mask[i], split.predict_mask[i])
        # flipping another sample's flag never changes sample i (bug 7)
        for j in range(g.b):
            if j == i:
                continue
            flipped = missing.clone()
            flipped[j] = ~flipped[j]
            other = mask_missing_samples(split, flipped)
            assert torch.equal(other.visible_mask[i], out.visible_mask[i])
            assert torch.equal(other.predict_mask[i], out.predict_mask[i])
    # all samples missing: a valid empty split
    gone = mask_missing_samples(split, torch.ones(g.b, dtype=torch.bool))
    assert gone.ids_keep.shape == (g.b, 0) and gone.ids_predict.shape == (g.b, 0)


def test_mask_missing_samples_keeps_noise_order_of_random_masking() -> None:
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8]])
    split = random_masking(2, 4, 0.5, noise=noise)
    out = mask_missing_samples(split, torch.tensor([False, True]))
    assert out.ids_keep.tolist() == [[1, 3], [0, 0]]
    assert out.keep_padding_mask.tolist() == [[False, False], [True, True]]


@given(grids(), seeds(), st.sampled_from([0.0, 0.3, 0.7, 1.0]))
def test_modality_dropout(g: Grid, flag_seed: int, p: float) -> None:
    pad = g.padding_mask()
    split = tube_masking(g.b, g.t, g.l, g.mr, padding_mask=pad, generator=generator(g.seed))
    gen = generator(flag_seed)
    missing = torch.rand(g.b, generator=gen) < 0.3
    noise = torch.rand(g.b, generator=gen)
    got = modality_dropout(split, missing, drop_prob=p, noise=noise)
    want = mask_missing_samples(split, missing | (noise < p))
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    # the (visible_mask, predict_mask) form and the flags-only form
    pair = modality_dropout((split.visible_mask, split.predict_mask), missing)
    ref = mask_missing_samples(split, missing)
    assert torch.equal(pair.visible_mask, ref.visible_mask)
    assert torch.equal(pair.predict_mask, ref.predict_mask)
    # deterministic given a generator
    a = modality_dropout(split, drop_prob=p, generator=generator(flag_seed))
    b = modality_dropout(split, drop_prob=p, generator=generator(flag_seed))
    assert torch.equal(a.visible_mask, b.visible_mask)


def test_modality_dropout_bad_arguments() -> None:
    split = random_masking(3, 4, 0.5, generator=generator(0))
    with pytest.raises(ValueError, match="missing"):
        mask_missing_samples(split, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="missing"):
        mask_missing_samples(split, torch.zeros(3))
    with pytest.raises(TypeError, match="split"):
        mask_missing_samples("split", torch.zeros(3, dtype=torch.bool))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drop_prob"):
        modality_dropout(split, drop_prob=1.5)
    with pytest.raises(ValueError, match="noise"):
        modality_dropout(split, drop_prob=0.5, noise=torch.rand(4))
    vis = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="overlap"):
        modality_dropout((vis, vis), torch.tensor([False]))
