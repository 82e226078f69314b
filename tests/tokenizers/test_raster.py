"""Tests for the raster tokenizers: patchify/unpatchify, valid patches, RasterTokenizer, PatchEmbed.

Legend: ``B`` batch, ``T`` steps, ``C`` channels, ``H``/``W`` pixels, ``ph``/``pw`` patch size,
``gh``/``gw`` patch grid, ``L`` patches, ``Lv`` valid patches, ``K = ph*pw*C``, ``D`` width.
Every ``padding_mask`` is True = padding; ``valid_mask``/``target_valid`` True = valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from crossmae.layers.pos_embed import sincos_pos_embed_1d, sincos_pos_embed_2d
from crossmae.tokenizers import (
    PatchEmbed,
    RasterTokenizer,
    patchify,
    raster_position_embedding,
    unpatchify,
    valid_patches_from_mask,
)

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# patchify / unpatchify


def _ref_patchify_bchw(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Slow reference: vector index (i * pw + j) * C + c of patch row * gw + col."""
    b, c, h, w = x.shape
    gh, gw = h // ph, w // pw
    out = torch.empty(b, gh * gw, ph * pw * c, dtype=x.dtype)
    for r in range(gh):
        for q in range(gw):
            for i in range(ph):
                for j in range(pw):
                    for ch in range(c):
                        out[:, r * gw + q, (i * pw + j) * c + ch] = x[:, ch, r * ph + i, q * pw + j]
    return out


@dataclass(frozen=True)
class Grid:
    b: int
    t: int
    c: int
    ph: int
    pw: int
    gh: int
    gw: int
    seed: int

    @property
    def hw(self) -> tuple[int, int]:
        return self.gh * self.ph, self.gw * self.pw


@st.composite
def grids(draw: st.DrawFn, max_grid: int = 4, max_patch: int = 3) -> Grid:
    return Grid(
        b=draw(st.integers(1, 3)),
        t=draw(st.integers(1, 3)),
        c=draw(st.integers(1, 3)),
        ph=draw(st.integers(1, max_patch)),
        pw=draw(st.integers(1, max_patch)),
        gh=draw(st.integers(1, max_grid)),
        gw=draw(st.integers(1, max_grid)),
        seed=draw(SEEDS),
    )


@settings(deadline=None)
@given(grids())
def test_patchify_matches_reference_and_round_trips_all_layouts(grid: Grid) -> None:
    g = _gen(grid.seed)
    h, w = grid.hw
    ps = (grid.ph, grid.pw)
    # [B, C, H, W]
    x = _randn(g, grid.b, grid.c, h, w)
    p = patchify(x, ps)
    assert p.shape == (grid.b, grid.gh * grid.gw, grid.ph * grid.pw * grid.c)
    assert torch.equal(p, _ref_patchify_bchw(x, grid.ph, grid.pw))
    assert torch.equal(unpatchify(p, ps, (h, w)), x)
    # [B, T, C, H, W]: every step patchified like a [B, C, H, W] image
    x5 = _randn(g, grid.b, grid.t, grid.c, h, w)
    p5 = patchify(x5, ps)
    assert p5.shape == (grid.b, grid.t, grid.gh * grid.gw, grid.ph * grid.pw * grid.c)
    for ti in range(grid.t):
        assert torch.equal(p5[:, ti], _ref_patchify_bchw(x5[:, ti], grid.ph, grid.pw))
    assert torch.equal(unpatchify(p5, ps, (h, w)), x5)
    # [B, T, H, W] (explicit layout): the same as C = 1
    x4 = _randn(g, grid.b, grid.t, h, w)
    p4 = patchify(x4, ps, layout="bthw")
    assert p4.shape == (grid.b, grid.t, grid.gh * grid.gw, grid.ph * grid.pw)
    assert torch.equal(p4, patchify(x4[:, :, None], ps))
    assert torch.equal(unpatchify(p4, ps, (h, w), layout="bthw"), x4)


def test_patchify_square_int_patch_and_bool_input() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    assert torch.equal(patchify(x, 2), patchify(x, (2, 2)))
    m = x > 50
    assert torch.equal(patchify(m, (2, 3)), patchify(x, (2, 3)) > 50)
    assert torch.equal(unpatchify(patchify(m, (2, 3)), (2, 3), (4, 6)), m)


def test_patchify_errors_name_the_argument() -> None:
    x = torch.zeros(1, 1, 5, 6)
    with pytest.raises(ValueError, match="patch_size"):
        patchify(x, 2)
    with pytest.raises(ValueError, match="layout"):
        patchify(x, 1, layout="nchw")
    with pytest.raises(ValueError, match="x must"):
        patchify(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ValueError, match="x must have 5"):
        patchify(x, 1, layout="btchw")
    with pytest.raises(TypeError, match="patch_size"):
        patchify(x, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patch_size"):
        patchify(x, (0, 1))
    with pytest.raises(TypeError, match="x must be a torch"):
        patchify([1, 2], 1)  # type: ignore[arg-type]
    p = torch.zeros(1, 6, 4)
    with pytest.raises(ValueError, match="patches has 6 patches"):
        unpatchify(p, 2, (4, 4))
    with pytest.raises(ValueError, match="last dimension"):
        unpatchify(torch.zeros(1, 4, 5), 2, (4, 4))
    with pytest.raises(ValueError, match="last dimension"):
        unpatchify(torch.zeros(1, 2, 4, 8), 2, (4, 4), layout="bthw")
    with pytest.raises(ValueError, match="image_size"):
        unpatchify(torch.zeros(1, 4, 4), 2, (5, 4))


# ---------------------------------------------------------------------------------------------
# valid_patches_from_mask


def _ref_valid_patches(land: torch.Tensor, ph: int, pw: int, cov: float) -> list[bool]:
    gh, gw = land.shape[0] // ph, land.shape[1] // pw
    out = []
    for r in range(gh):
        for q in range(gw):
            count = sum(bool(land[r * ph + i, q * pw + j]) for i in range(ph) for j in range(pw))
            # documented rule: the float64 share count / (ph * pw) compared with min_coverage
            # (so min_coverage=k/n written as a float selects patches with exactly k of n)
            out.append(count / (ph * pw) >= cov)
    return out


@settings(deadline=None)
@given(grids(max_patch=4), st.floats(0.01, 1.0), st.floats(0.0, 1.0), st.booleans())
def test_valid_patches_from_mask_matches_reference(
    grid: Grid, density: float, cov: float, exact: bool
) -> None:
    cov = max(cov, 1e-3)
    if exact:  # hit the boundary exactly: cov = k / (ph * pw)
        n = grid.ph * grid.pw
        cov = max(1, round(cov * n)) / n
    land = torch.rand(grid.hw, generator=_gen(grid.seed)) < density
    got = valid_patches_from_mask(land, (grid.ph, grid.pw), cov)
    assert got.dtype == torch.bool and got.shape == (grid.gh * grid.gw,)
    assert got.tolist() == _ref_valid_patches(land, grid.ph, grid.pw, cov)


def test_valid_patches_half_coverage_boundary() -> None:
    land = torch.zeros(2, 4, dtype=torch.bool)
    land[0, :2] = True  # left patch: 2/4 land; right patch: 0/4 ... then 3/4
    land[:, 2] = True
    land[0, 3] = True
    assert valid_patches_from_mask(land, 2).tolist() == [True, True]
    assert valid_patches_from_mask(land, 2, min_coverage=0.75).tolist() == [False, True]
    assert valid_patches_from_mask(land, 2, min_coverage=1.0).tolist() == [False, False]
    # the water model's 10 x 10 patches at 50 %: 50 land pixels pass, 49 do not
    land = torch.zeros(10, 20, dtype=torch.bool)
    land[:5, :10] = True  # left patch: 50 / 100
    land[:4, 10:] = True  # right patch: 40 + 9 = 49 / 100
    land[4, 10:19] = True
    assert valid_patches_from_mask(land, 10).tolist() == [True, False]
    assert valid_patches_from_mask(torch.ones(6, 6, dtype=torch.bool), 3, 5 / 6).all()


def test_valid_patches_errors() -> None:
    land = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="min_coverage"):
        valid_patches_from_mask(land, 2, 0.0)
    with pytest.raises(ValueError, match="min_coverage"):
        valid_patches_from_mask(land, 2, 1.5)
    with pytest.raises(TypeError, match="valid_mask"):
        valid_patches_from_mask(land.float(), 2)
    with pytest.raises(ValueError, match="valid_mask"):
        valid_patches_from_mask(land[None], 2)
    with pytest.raises(ValueError, match="patch_size"):
        valid_patches_from_mask(land, 3)


# ---------------------------------------------------------------------------------------------
# RasterTokenizer


@dataclass(frozen=True)
class RasterCase:
    grid: Grid
    land: torch.Tensor  # [H, W] bool, True = valid pixel
    patch_valid: torch.Tensor  # [L] bool
    dim: int


@st.composite
def raster_cases(draw: st.DrawFn) -> RasterCase:
    grid = draw(grids(max_grid=3, max_patch=3))
    g = _gen(grid.seed + 1)
    land = torch.rand(grid.hw, generator=g) < draw(st.floats(0.2, 1.0))
    patch_valid = torch.rand(grid.gh * grid.gw, generator=g) < draw(st.floats(0.2, 1.0))
    patch_valid[draw(st.integers(0, grid.gh * grid.gw - 1))] = True
    return RasterCase(grid, land, patch_valid, draw(st.sampled_from([4, 8, 12])))


def _make(case: RasterCase, **kwargs: Any) -> RasterTokenizer:
    g = case.grid
    torch.manual_seed(g.seed % 1000)
    tok = RasterTokenizer(
        case.dim,
        (g.ph, g.pw),
        g.hw,
        in_chans=g.c,
        valid_mask=case.land,
        valid_patch_mask=case.patch_valid,
        **kwargs,
    )
    with torch.no_grad():  # make every parameter matter
        for p in tok.parameters():
            p.copy_(_randn(_gen(g.seed + 2), *p.shape))
    return tok


def _ref_tokens(tok: RasterTokenizer, x: torch.Tensor, tp: torch.Tensor) -> torch.Tensor:
    """Slow reference: loops over (b, t, valid patch), time-major order."""
    b, t = x.shape[:2]
    ph, pw = tok.patch_size
    gh, gw = tok.grid_size
    land_vec = tok.value_valid  # checked against the land mask in its own test
    valid_idx = tok.valid_patch_index.tolist()
    lv = len(valid_idx)
    spatial_table = sincos_pos_embed_2d(tok.embed_dim, (gh, gw), dtype=torch.float64)
    out = torch.empty(b, t * lv, tok.embed_dim, dtype=torch.float64)
    w = tok.proj.weight.double()
    bias = tok.proj.bias.double() if tok.proj.bias is not None else 0.0
    for bi in range(b):
        for ti in range(t):
            time_emb = sincos_pos_embed_1d(tok.embed_dim, tp[bi, ti : ti + 1], dtype=torch.float64)
            for v, k in enumerate(valid_idx):
                r, q = divmod(k, gw)
                block = x[bi, ti, :, r * ph : (r + 1) * ph, q * pw : (q + 1) * pw]
                vec = block.permute(1, 2, 0).reshape(-1).double()
                ok = torch.isfinite(vec) & land_vec[v]
                vec = torch.where(ok, vec, torch.zeros(()))
                if tok.missing_fraction:
                    vec = torch.cat([vec, (~ok).double().mean().reshape(1)])
                tokv = w @ vec + bias + time_emb[0]
                if tok.spatial_pos_embed is None:
                    tokv = tokv + spatial_table[k]
                else:
                    tokv = tokv + tok.spatial_pos_embed[v].double()
                if tok.modality_embed is not None:
                    tokv = tokv + tok.modality_embed.double()
                out[bi, ti * lv + v] = tokv
    return out


def _poison(x: torch.Tensor, where: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Write large values, NaN, +inf and -inf at ``where`` (broadcast to ``x``)."""
    garbage = _randn(g, *x.shape) * 1e4
    sel = torch.randint(0, 4, x.shape, generator=g)
    garbage[sel == 1] = float("nan")
    garbage[sel == 2] = float("inf")
    garbage[sel == 3] = float("-inf")
    return torch.where(where.expand_as(x), garbage, x)


@settings(deadline=None)
@given(
    raster_cases(),
    st.sampled_from(["sincos", "learned"]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_tokens_match_slow_reference_in_time_major_order(
    case: RasterCase, spatial: str, modality: bool, frac: bool, per_sample_time: bool
) -> None:
    g = case.grid
    tok = _make(case, spatial_embed=spatial, modality_embed=modality, missing_fraction=frac)
    gen = _gen(g.seed + 3)
    x = _randn(gen, g.b, g.t, g.c, *g.hw, dtype=torch.float64)
    x[torch.rand(x.shape, generator=gen) < 0.2] = float("nan")
    if per_sample_time:
        tp = torch.rand(g.b, g.t, generator=gen, dtype=torch.float64) * 365
        arg: torch.Tensor | None = tp
    else:
        tp = torch.arange(g.t, dtype=torch.float64).expand(g.b, g.t)
        arg = None
    tok = tok.double()
    tokens, padding_mask = tok(x, time_positions=arg)
    lv = int(case.patch_valid.sum())
    assert tok.num_valid_patches == lv
    assert tokens.shape == (g.b, g.t * lv, case.dim)
    assert tokens.dtype == torch.float64
    assert padding_mask.shape == (g.b, g.t * lv) and padding_mask.dtype == torch.bool
    assert not padding_mask.any()
    torch.testing.assert_close(tokens, _ref_tokens(tok, x, tp), rtol=1e-12, atol=1e-9)


@settings(deadline=None)
@given(raster_cases())
def test_value_validity_follows_land_mask(case: RasterCase) -> None:
    tok = _make(case)
    ph, pw = tok.patch_size
    gw = tok.grid_size[1]
    for v, k in enumerate(tok.valid_patch_index.tolist()):
        r, q = divmod(k, gw)
        land_block = case.land[r * ph : (r + 1) * ph, q * pw : (q + 1) * pw]
        expect = land_block.reshape(-1).repeat_interleave(case.grid.c)
        assert torch.equal(tok.value_valid[v], expect)
        assert tok.patch_coords[v].tolist() == [r, q]
    assert tok.valid_patch_index.tolist() == torch.nonzero(case.patch_valid).flatten().tolist()


@settings(deadline=None)
@given(raster_cases(), st.booleans())
def test_invalid_and_missing_values_never_reach_tokens_targets_or_grads(
    case: RasterCase, frac: bool
) -> None:
    g = case.grid
    tok = _make(case, spatial_embed="learned", modality_embed=True, missing_fraction=frac)
    gen = _gen(g.seed + 4)
    x = _randn(gen, g.b, g.t, g.c, *g.hw)
    missing = torch.rand(x.shape, generator=gen) < 0.3
    patch_pixels = unpatchify(
        case.patch_valid[None, :, None].expand(1, -1, g.ph * g.pw), (g.ph, g.pw), g.hw
    )[0, 0]  # [H, W] True inside valid patches
    invalid_pixel = ~(patch_pixels & case.land)  # outside valid patch or outside land
    clean = torch.where(missing | invalid_pixel, torch.zeros(()), x)
    dirty = torch.where(missing, torch.full_like(x, float("nan")), x)
    dirty = _poison(dirty, invalid_pixel, gen)

    t_clean, pm_clean = tok(clean)
    t_dirty, pm_dirty = tok(dirty)
    assert torch.isfinite(t_dirty).all()
    if frac:  # the missing share is an input: compare against the same missing pattern
        t_ref, _ = tok(torch.where(missing | invalid_pixel, torch.full_like(x, float("nan")), x))
        assert torch.equal(t_dirty, t_ref)
    else:
        assert torch.equal(t_dirty, t_clean)
    assert torch.equal(pm_dirty, pm_clean)

    target, target_valid = tok.targets(dirty)
    target_c, target_valid_c = tok.targets(clean)
    assert torch.isfinite(target).all()
    expect_valid = patchify(~(missing | invalid_pixel), (g.ph, g.pw))
    expect_valid = expect_valid[:, :, tok.valid_patch_index]
    expect_valid = rearrange(expect_valid, "b t v k -> b (t v) k")
    assert torch.equal(target_valid, expect_valid)
    assert torch.equal(target[target_valid], target_c[target_valid])
    assert (target[~target_valid] == 0).all()
    assert target_valid_c.sum() >= target_valid.sum()

    tokens, _ = tok(dirty.requires_grad_(True))
    tokens.square().mean().backward()
    assert dirty.grad is not None and torch.isfinite(dirty.grad).all()
    assert (dirty.grad[(missing | invalid_pixel).expand_as(x)] == 0).all()
    for p in tok.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@settings(deadline=None)
@given(raster_cases(), st.integers(1, 5))
def test_token_positions_and_position_embedding_for_any_t(case: RasterCase, t: int) -> None:
    g = case.grid
    tok = _make(case, spatial_embed="learned", modality_embed=True)
    lv = tok.num_valid_patches
    t_index, patch_index = tok.token_positions(t)
    assert t_index.dtype == torch.int64 and patch_index.dtype == torch.int64
    n = torch.arange(t * lv)
    assert torch.equal(t_index, n // lv)
    assert torch.equal(patch_index, tok.valid_patch_index[n % lv])
    assert tok.num_tokens(t) == t * lv

    gen = _gen(g.seed + 5)
    x = _randn(gen, g.b, t, g.c, *g.hw)
    target, _ = tok.targets(x)
    full = patchify(x, (g.ph, g.pw))  # [B, T, L, K]
    land_vec = tok.value_valid[n % lv]  # [T*Lv, K]
    expect = torch.where(land_vec, full[:, t_index, patch_index], torch.zeros(()))
    assert torch.equal(target, expect)

    tp = torch.rand(g.b, t, generator=gen) * 100
    tokens, _ = tok(x, time_positions=tp)
    pos = tok.position_embedding(time_positions=tp)
    assert pos.shape == (g.b, t * lv, case.dim)
    assert tok.modality_embed is not None
    content = tok.proj(target) + tok.modality_embed
    torch.testing.assert_close(tokens, content + pos)
    assert tok.position_embedding(t).shape == (t * lv, case.dim)
    torch.testing.assert_close(
        tok.position_embedding(t), tok.position_embedding(time_positions=torch.arange(t))
    )


@settings(deadline=None)
@given(raster_cases(), st.integers(1, 4), st.sampled_from([4, 8, 16]))
def test_sincos_position_embedding_matches_standalone_function(
    case: RasterCase, t: int, other_dim: int
) -> None:
    tok = _make(case)  # sincos spatial + sincos time
    tp = torch.rand(case.grid.b, t, generator=_gen(case.grid.seed)) * 365
    assert torch.equal(
        tok.position_embedding(time_positions=tp),
        raster_position_embedding(case.dim, tok.patch_coords, tp),
    )
    assert torch.equal(
        tok.position_embedding(t), raster_position_embedding(case.dim, tok.patch_coords, t)
    )
    # at another width: spatial 2D table at (row, col) + time table, time-major
    pe = raster_position_embedding(other_dim, tok.patch_coords, t, dtype=torch.float64)
    lv = tok.num_valid_patches
    table = sincos_pos_embed_2d(other_dim, tok.grid_size, dtype=torch.float64)
    for n in range(t * lv):
        expect = (
            table[tok.valid_patch_index[n % lv]]
            + sincos_pos_embed_1d(other_dim, torch.tensor([n // lv]), dtype=torch.float64)[0]
        )
        torch.testing.assert_close(pe[n], expect)


@settings(deadline=None)
@given(raster_cases())
def test_batch_independence(case: RasterCase) -> None:
    g = case.grid
    tok = _make(case, spatial_embed="learned")
    gen = _gen(g.seed + 6)
    x = _randn(gen, g.b + 1, g.t, g.c, *g.hw)
    tp = torch.rand(g.b + 1, g.t, generator=gen) * 10
    tokens, _ = tok(x, time_positions=tp)
    x2 = x.clone()
    x2[0] = float("nan")
    tokens2, _ = tok(x2, time_positions=tp)
    assert torch.equal(tokens[1:], tokens2[1:])
    for i in range(g.b + 1):
        one, _ = tok(x[i : i + 1], time_positions=tp[i : i + 1])
        torch.testing.assert_close(one[0], tokens[i], rtol=1e-6, atol=1e-6)


def test_pad_empty_tokens_flags_all_missing_patch_steps() -> None:
    tok = RasterTokenizer(8, 2, (4, 6), in_chans=2, pad_empty_tokens=True)
    x = torch.randn(2, 3, 2, 4, 6)
    x[1, 2, :, 2:4, 0:2] = float("nan")  # sample 1, step 2, patch (1, 0) = grid index 3
    x[0, 0, 0, 0:2, 0:2] = float("nan")  # one channel only: still has observed values
    tokens, padding_mask = tok(x)
    expect = torch.zeros(2, 3 * 6, dtype=torch.bool)
    expect[1, 2 * 6 + 3] = True
    assert torch.equal(padding_mask, expect)
    assert torch.isfinite(tokens).all()


def test_missing_fraction_distinguishes_missing_from_zero() -> None:
    torch.manual_seed(0)
    x0 = torch.zeros(1, 1, 1, 2, 2)
    xn = torch.full_like(x0, float("nan"))
    plain = RasterTokenizer(4, 2, 2)
    assert torch.equal(plain(x0)[0], plain(xn)[0])
    flagged = RasterTokenizer(4, 2, 2, missing_fraction=True)
    assert flagged.proj.in_features == 5
    assert not torch.equal(flagged(x0)[0], flagged(xn)[0])


def test_water_model_shapes_and_land_selection() -> None:
    g = _gen(0)
    land = torch.zeros(290, 180, dtype=torch.bool)
    land[40:200, 30:120] = True
    land[200:260, 5:60] = torch.rand(60, 55, generator=g) < 0.6
    tok = RasterTokenizer(
        256, 10, (290, 180), valid_mask=land, spatial_embed="learned", modality_embed=True
    )
    assert tok.grid_size == (29, 18) and tok.num_patches == 522
    expect = valid_patches_from_mask(land, 10)
    assert tok.num_valid_patches == int(expect.sum())
    assert tok.spatial_pos_embed is not None
    assert tok.spatial_pos_embed.shape == (tok.num_valid_patches, 256)
    assert tok.proj.in_features == 100
    x = _randn(g, 2, 3, 290, 180)
    x[:, :, ~land] = float("nan")  # sea is NaN, as in the water model's files
    tokens, padding_mask = tok(x)
    lv = tok.num_valid_patches
    assert tokens.shape == (2, 3 * lv, 256) and padding_mask.shape == (2, 3 * lv)
    assert torch.isfinite(tokens).all()
    target, target_valid = tok.targets(x[:, :, None])
    assert target.shape == target_valid.shape == (2, 3 * lv, 100)
    assert torch.isfinite(target).all()
    assert target_valid.sum() == 2 * 3 * int(
        patchify(land[None, None], 10)[0, tok.valid_patch_index].sum()
    )
    # [B, T, H, W] and [B, T, 1, H, W] are the same input
    assert torch.equal(tok(x[:, :, None])[0], tokens)


def test_float64_and_bf16_autocast() -> None:
    case_land = torch.rand(6, 8, generator=_gen(1)) < 0.7
    torch.manual_seed(1)
    tok = RasterTokenizer(16, 2, (6, 8), in_chans=2, valid_mask=case_land, modality_embed=True)
    x = _randn(_gen(2), 2, 3, 2, 6, 8)
    x[0, 1, 0, 0, 0] = float("nan")
    ref, _ = tok(x)
    tok64 = RasterTokenizer(16, 2, (6, 8), in_chans=2, valid_mask=case_land, modality_embed=True)
    tok64.load_state_dict(tok.state_dict())
    tok64 = tok64.double()
    out64, _ = tok64(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), ref, rtol=1e-5, atol=1e-5)
    tgt64, _ = tok64.targets(x.double())
    assert tgt64.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf, pm = tok(x)
        pe = tok.position_embedding(3)
    assert torch.isfinite(out_bf).all() and not pm.any()
    torch.testing.assert_close(out_bf.float(), ref, rtol=0.05, atol=0.1)
    assert pe.shape == ref.shape[1:]
    # half weights with a float32 input (bug 9)
    half = tok64.half()
    out_h, _ = half(x)
    assert out_h.dtype == torch.float16
    torch.testing.assert_close(out_h.float(), ref, rtol=0.02, atol=0.05)


def test_torch_compile_fullgraph() -> None:
    land = torch.rand(6, 8, generator=_gen(3)) < 0.7
    land[:2, :2] = True
    torch.manual_seed(3)
    tok = RasterTokenizer(
        16, 2, (6, 8), valid_mask=land, spatial_embed="learned", pad_empty_tokens=True
    )
    x = _randn(_gen(4), 2, 3, 6, 8)
    x[:, :, ~land] = float("nan")
    tp = torch.rand(2, 3, generator=_gen(5))
    compiled = torch.compile(tok, fullgraph=True, backend="eager")
    tokens, padding_mask = compiled(x, tp)
    ref_tokens, ref_mask = tok(x, tp)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(padding_mask, ref_mask)


def test_constructor_and_forward_errors_name_the_argument() -> None:
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: RasterTokenizer(6, 2, 4), ValueError, "embed_dim"),
        (lambda: RasterTokenizer(0, 2, 4), ValueError, "embed_dim"),
        (lambda: RasterTokenizer(8, 3, 4), ValueError, "patch_size"),
        (lambda: RasterTokenizer(8, 2, 4, spatial_embed="rope"), ValueError, "spatial_embed"),
        (lambda: RasterTokenizer(8, 2, 4, time_embed="learned"), ValueError, "time_embed"),
        (lambda: RasterTokenizer(8, 2, 4, in_chans=0), ValueError, "in_chans"),
        (
            lambda: RasterTokenizer(8, 2, 4, valid_mask=torch.ones(4, 5, dtype=torch.bool)),
            ValueError,
            "valid_mask",
        ),
        (lambda: RasterTokenizer(8, 2, 4, valid_mask=torch.ones(4, 4)), TypeError, "valid_mask"),
        (
            lambda: RasterTokenizer(8, 2, 4, valid_patch_mask=torch.ones(5, dtype=torch.bool)),
            ValueError,
            "valid_patch_mask",
        ),
        (
            lambda: RasterTokenizer(8, 2, 4, valid_patch_mask=torch.zeros(4, dtype=torch.bool)),
            ValueError,
            "valid_patch_mask",
        ),
        (lambda: RasterTokenizer(8, 2, 4, modality_embed=1), TypeError, "modality_embed"),  # type: ignore[arg-type]
        (lambda: RasterTokenizer(8, 2, 4, min_coverage=0.0), ValueError, "min_coverage"),
    ]
    tok = RasterTokenizer(8, 2, 4, in_chans=2)
    one = RasterTokenizer(8, 2, 4)
    cases += [
        (lambda: tok(torch.zeros(1, 2, 2, 4, 4, dtype=torch.long)), TypeError, "x must"),
        (lambda: tok(torch.zeros(1, 2, 4, 4)), ValueError, "in_chans"),
        (lambda: tok(torch.zeros(1, 2, 3, 4, 4)), ValueError, "x has"),
        (lambda: tok(torch.zeros(1, 2, 2, 4, 6)), ValueError, "x has"),
        (lambda: tok(torch.zeros(2, 4, 4)), ValueError, "x must"),
        (lambda: one(torch.zeros(1, 0, 4, 4)), ValueError, "time step"),
        (lambda: one(torch.zeros(2, 3, 4, 4), torch.zeros(4)), ValueError, "time_positions"),
        (lambda: one(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3)), ValueError, "time_positions"),
        (
            lambda: one(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.bool)),
            TypeError,
            "time_positions",
        ),
        (lambda: one(torch.zeros(2, 3, 4, 4), [0, 1, 2]), TypeError, "time_positions"),
        (lambda: one.token_positions(0), ValueError, "num_steps"),
        (lambda: one.position_embedding(), ValueError, "num_steps"),
        (lambda: one.targets(torch.zeros(1, 1, 4, 5)), ValueError, "x has"),
        (lambda: raster_position_embedding(6, one.patch_coords, 2), ValueError, "dim"),
        (lambda: raster_position_embedding(8, torch.zeros(3, 3), 2), ValueError, "patch_coords"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()


# ---------------------------------------------------------------------------------------------
# PatchEmbed


@settings(deadline=None)
@given(grids(max_grid=3, max_patch=4), st.sampled_from([4, 6]))
def test_patch_embed_equals_patchify_then_linear(grid: Grid, dim: int) -> None:
    torch.manual_seed(grid.seed % 1000)
    pe = PatchEmbed(dim, (grid.ph, grid.pw), grid.hw, in_chans=grid.c)
    x = _randn(_gen(grid.seed), grid.b, grid.c, *grid.hw, dtype=torch.float64)
    pe = pe.double()
    out = pe(x)
    assert out.shape == (grid.b, grid.gh * grid.gw, dim)
    assert pe.num_patches == grid.gh * grid.gw and pe.grid_size == (grid.gh, grid.gw)
    w = rearrange(pe.proj.weight, "d c p q -> d (p q c)")
    assert pe.proj.bias is not None
    expect = patchify(x, (grid.ph, grid.pw)) @ w.T + pe.proj.bias
    torch.testing.assert_close(out, expect)


def test_patch_embed_loads_conv_checkpoint_keys_and_checks_input() -> None:
    pe = PatchEmbed(32, 16, 224, in_chans=3)
    assert set(pe.state_dict()) == {"proj.weight", "proj.bias"}
    assert pe.proj.weight.shape == (32, 3, 16, 16)
    conv = torch.nn.Conv2d(3, 32, 16, 16)
    pe.load_state_dict({"proj.weight": conv.weight.data, "proj.bias": conv.bias.data})  # type: ignore[union-attr]
    img = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(pe(img), rearrange(conv(img), "b d h w -> b (h w) d"))
    free = PatchEmbed(8, (2, 4), in_chans=1)
    assert free(torch.randn(1, 1, 6, 8)).shape == (1, 3 * 2, 8)
    with pytest.raises(ValueError, match="img"):
        pe(torch.randn(2, 3, 224, 240))
    with pytest.raises(ValueError, match="img"):
        free(torch.randn(1, 1, 6, 9))
    with pytest.raises(ValueError, match="img"):
        pe(torch.randn(2, 1, 224, 224))
    with pytest.raises(TypeError, match="img"):
        pe(torch.zeros(2, 3, 224, 224, dtype=torch.long))
    with pytest.raises(ValueError, match="image_size"):
        PatchEmbed(8, 16, 200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(pe(img)).all()
