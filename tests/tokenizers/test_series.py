"""Tests for the series tokenizers: SeriesTokenizer, StaticToken, append_tokens.

Legend: ``B`` batch, ``S`` sites, ``T`` steps, ``C`` channels, ``g`` sites per patch, ``P``
patches, ``A`` static attributes, ``D`` width. Every ``*padding_mask`` is True = padding;
``missing_mask`` True = missing value; ``target_valid`` True = observed value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossmae.layers.pos_embed import sincos_pos_embed_1d
from crossmae.tokenizers import SeriesTokenizer, StaticToken, append_tokens

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _poison(x: torch.Tensor, where: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Write large values, NaN, +inf and -inf at ``where`` (broadcast to ``x``)."""
    garbage = _randn(g, *x.shape, dtype=x.dtype) * 1e4
    sel = torch.randint(0, 4, x.shape, generator=g)
    garbage[sel == 1] = float("nan")
    garbage[sel == 2] = float("inf")
    garbage[sel == 3] = float("-inf")
    return torch.where(where.expand_as(x), garbage, x)


@dataclass(frozen=True)
class SeriesCase:
    b: int
    s: int
    t: int
    c: int
    g: int
    dim: int
    squeeze: bool  # pass [B, S, T] instead of [B, S, T, 1]
    seed: int

    @property
    def p(self) -> int:
        return math.ceil(self.s / self.g)

    def x(self, offset: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = _randn(_gen(self.seed + offset), self.b, self.s, self.t, self.c, dtype=dtype)
        return x[..., 0] if self.squeeze else x


@st.composite
def series_cases(draw: st.DrawFn) -> SeriesCase:
    c = draw(st.integers(1, 2))
    return SeriesCase(
        b=draw(st.integers(1, 3)),
        s=draw(st.integers(1, 10)),
        t=draw(st.integers(1, 3)),
        c=c,
        g=draw(st.integers(1, 4)),
        dim=draw(st.sampled_from([2, 4, 8])),
        squeeze=c == 1 and draw(st.booleans()),
        seed=draw(SEEDS),
    )


def _make(case: SeriesCase, **kwargs: Any) -> SeriesTokenizer:
    tok = SeriesTokenizer(case.dim, case.s, in_chans=case.c, group_size=case.g, **kwargs)
    with torch.no_grad():
        for p in tok.parameters():
            p.copy_(_randn(_gen(case.seed + 7), *p.shape))
    return tok


def _ref_tokens(
    tok: SeriesTokenizer,
    x: torch.Tensor,
    site_padding_mask: Optional[torch.Tensor],
    missing_mask: Optional[torch.Tensor],
    tp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: loops over (b, t, patch, slot, channel); time-major order."""
    if x.ndim == 3:
        x = x[..., None]
        missing_mask = None if missing_mask is None else missing_mask[..., None]
    b, s, t, c = x.shape
    p_count, g, d = tok.num_patches, tok.group_size, tok.embed_dim
    w = tok.proj.weight.double()
    bias = tok.proj.bias.double() if tok.proj.bias is not None else 0.0
    out = torch.empty(b, t * p_count, d, dtype=torch.float64)
    pad = torch.empty(b, t * p_count, dtype=torch.bool)
    for bi in range(b):
        for ti in range(t):
            for p in range(p_count):
                vals, miss = [], []
                for slot in range(g):
                    site = p * g + slot
                    for ch in range(c):
                        ok = (
                            site < s
                            and (site_padding_mask is None or not bool(site_padding_mask[bi, site]))
                            and bool(torch.isfinite(x[bi, site, ti, ch]))
                            and (missing_mask is None or not bool(missing_mask[bi, site, ti, ch]))
                        )
                        vals.append(float(x[bi, site, ti, ch]) if ok else 0.0)
                        miss.append(0.0 if ok else 1.0)
                feats = torch.tensor(vals + miss, dtype=torch.float64)
                v = w @ feats + bias
                if tok.spatial_pos_embed is not None:
                    v = v + tok.spatial_pos_embed[p].double()
                else:
                    v = v + sincos_pos_embed_1d(d, torch.tensor([p]), dtype=torch.float64)[0]
                if tok.time_embed_kind == "sincos":
                    v = v + sincos_pos_embed_1d(d, tp[bi, ti : ti + 1], dtype=torch.float64)[0]
                if tok.modality_embed is not None:
                    v = v + tok.modality_embed.double()
                out[bi, ti * p_count + p] = v
                pad[bi, ti * p_count + p] = all(m == 1.0 for m in miss)
    return out, pad


@settings(deadline=None)
@given(
    series_cases(),
    st.sampled_from(["learned", "sincos"]),
    st.sampled_from(["sincos", None]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_tokens_match_slow_reference(
    case: SeriesCase,
    spatial: str,
    time_embed: Optional[str],
    modality: bool,
    use_site_padding: bool,
    use_missing_mask: bool,
    per_sample_time: bool,
) -> None:
    tok = _make(case, spatial_embed=spatial, time_embed=time_embed, modality_embed=modality)
    tok = tok.double()
    gen = _gen(case.seed + 1)
    x = case.x(dtype=torch.float64)
    x[torch.rand(x.shape, generator=gen) < 0.2] = float("nan")
    spm = torch.rand(case.b, case.s, generator=gen) < 0.3 if use_site_padding else None
    mm = torch.rand(x.shape, generator=gen) < 0.2 if use_missing_mask else None
    if per_sample_time:
        tp = torch.rand(case.b, case.t, generator=gen, dtype=torch.float64) * 365
        arg: Optional[torch.Tensor] = tp
    else:
        tp = torch.arange(case.t, dtype=torch.float64).expand(case.b, case.t)
        arg = None
    tokens, padding_mask = tok(x, spm, missing_mask=mm, time_positions=arg)
    assert tokens.shape == (case.b, case.t * case.p, case.dim)
    assert tokens.dtype == torch.float64
    assert padding_mask.shape == (case.b, case.t * case.p) and padding_mask.dtype == torch.bool
    ref, ref_pad = _ref_tokens(tok, x, spm, mm, tp)
    torch.testing.assert_close(tokens, ref, rtol=1e-12, atol=1e-9)
    assert torch.equal(padding_mask, ref_pad)
    assert torch.isfinite(tokens).all()
    # targets: same order, validity = not padding per value
    target, target_valid = tok.targets(x, spm, missing_mask=mm)
    assert target.shape == target_valid.shape == (case.b, case.t * case.p, case.g * case.c)
    assert torch.equal(~target_valid.any(dim=-1), padding_mask)
    assert torch.isfinite(target).all() and (target[~target_valid] == 0).all()


@settings(deadline=None)
@given(series_cases(), st.booleans())
def test_targets_layout_and_token_positions(case: SeriesCase, use_site_padding: bool) -> None:
    tok = _make(case, modality_embed=True)
    gen = _gen(case.seed + 2)
    x = case.x()
    x[torch.rand(x.shape, generator=gen) < 0.2] = float("nan")
    spm = torch.rand(case.b, case.s, generator=gen) < 0.3 if use_site_padding else None
    target, target_valid = tok.targets(x, spm)
    t_index, patch_index = tok.token_positions(case.t)
    n = torch.arange(case.t * case.p)
    assert torch.equal(t_index, n // case.p) and torch.equal(patch_index, n % case.p)
    assert tok.num_tokens(case.t) == case.t * case.p
    x4 = x[..., None] if case.squeeze else x
    for bi in range(case.b):
        for k in range(case.t * case.p):
            for slot in range(case.g):
                site = int(patch_index[k]) * case.g + slot
                for ch in range(case.c):
                    j = slot * case.c + ch
                    if site >= case.s or (spm is not None and bool(spm[bi, site])):
                        assert not target_valid[bi, k, j]
                        continue
                    value = x4[bi, site, int(t_index[k]), ch]
                    assert bool(target_valid[bi, k, j]) == bool(torch.isfinite(value))
                    if target_valid[bi, k, j]:
                        assert target[bi, k, j] == value
    # tokens = proj([values, missing]) + position embedding + modality
    tp = torch.rand(case.b, case.t, generator=gen) * 30
    tokens, _ = tok(x, spm, time_positions=tp)
    feats = torch.cat([target, (~target_valid).float()], dim=-1)
    assert tok.modality_embed is not None
    pos = tok.position_embedding(time_positions=tp)
    assert pos.shape == tokens.shape
    torch.testing.assert_close(tokens, tok.proj(feats) + pos + tok.modality_embed)
    assert tok.position_embedding(case.t).shape == (case.t * case.p, case.dim)


@settings(deadline=None)
@given(series_cases(), st.sampled_from(["mixed", "nan", "large"]))
def test_padded_sites_never_matter(case: SeriesCase, kind: str) -> None:
    tok = _make(case, spatial_embed="learned", modality_embed=True)
    gen = _gen(case.seed + 3)
    x = case.x()
    spm = torch.rand(case.b, case.s, generator=gen) < 0.4
    where = spm[:, :, None] if case.squeeze else spm[:, :, None, None]
    if kind == "nan":
        dirty = torch.where(where, torch.full_like(x, float("nan")), x)
    elif kind == "large":
        dirty = torch.where(where, torch.full_like(x, 1e30), x)
    else:
        dirty = _poison(x, where, gen)
    clean_tokens, clean_mask = tok(x, spm)
    dirty_tokens, dirty_mask = tok(dirty, spm)
    assert torch.equal(clean_tokens, dirty_tokens)
    assert torch.equal(clean_mask, dirty_mask)
    t_clean, v_clean = tok.targets(x, spm)
    t_dirty, v_dirty = tok.targets(dirty, spm)
    assert torch.equal(t_clean, t_dirty) and torch.equal(v_clean, v_dirty)
    # gradients stay finite and never reach padded sites
    dirty.requires_grad_(True)
    out, _ = tok(dirty, spm)
    out.square().mean().backward()
    assert dirty.grad is not None and torch.isfinite(dirty.grad).all()
    assert (dirty.grad[where.expand_as(x)] == 0).all()
    for prm in tok.parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all()


@settings(deadline=None)
@given(series_cases())
def test_nan_and_missing_mask_are_equivalent(case: SeriesCase) -> None:
    tok = _make(case)
    gen = _gen(case.seed + 4)
    x = case.x()
    missing = torch.rand(x.shape, generator=gen) < 0.4
    with_nan = torch.where(missing, torch.full_like(x, float("nan")), x)
    with_flag = _poison(x, missing, gen)
    with_flag = torch.where(missing, with_flag.nan_to_num(0.0, 5.0, -5.0), with_flag)
    a = tok(with_nan)
    b = tok(with_flag, missing_mask=missing)
    c = tok(with_nan, missing_mask=missing)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert torch.equal(tok.targets(with_nan)[0], tok.targets(with_flag, missing_mask=missing)[0])


@settings(deadline=None)
@given(series_cases())
def test_all_missing_sample_has_zero_real_tokens_and_batch_independence(
    case: SeriesCase,
) -> None:
    tok = _make(case)
    x = case.x()
    x_missing = x.clone()
    x_missing[0] = float("nan")  # e.g. river flow before 1989
    tokens, padding_mask = tok(x_missing)
    assert padding_mask[0].all()
    assert torch.isfinite(tokens).all()
    ref_tokens, ref_mask = tok(x)
    assert torch.equal(tokens[1:], ref_tokens[1:]) and torch.equal(padding_mask[1:], ref_mask[1:])
    assert not ref_mask.any()  # every site real and observed, so every token is real
    spm_all = torch.ones(case.b, case.s, dtype=torch.bool)
    assert tok(x, spm_all)[1].all()
    for i in range(case.b):
        one_tokens, one_mask = tok(x_missing[i : i + 1])
        torch.testing.assert_close(one_tokens[0], tokens[i], rtol=1e-6, atol=1e-6)
        assert torch.equal(one_mask[0], padding_mask[i])


def test_observed_zero_differs_from_missing() -> None:
    torch.manual_seed(0)
    tok = SeriesTokenizer(8, 3, group_size=3)
    zeros = torch.zeros(1, 3, 2)
    missing = zeros.clone()
    missing[0, 1, 0] = float("nan")
    a, pa = tok(zeros)
    b, pb = tok(missing)
    assert not torch.equal(a[0, 0], b[0, 0])
    assert torch.equal(a[0, 1], b[0, 1])
    assert not pa.any() and not pb.any()


def test_water_model_series_shapes() -> None:
    torch.manual_seed(0)
    tok = SeriesTokenizer(256, 604, group_size=8, modality_embed=True)
    assert tok.num_patches == 76 and tok.proj.in_features == 16
    assert tok.spatial_pos_embed is not None and tok.spatial_pos_embed.shape == (76, 256)
    x = _randn(_gen(0), 2, 604, 3)
    spm = torch.zeros(2, 604, dtype=torch.bool)
    spm[1, 600:] = True  # the 4 real sites of the last patch are padding in sample 1
    tokens, padding_mask = tok(x, spm)
    assert tokens.shape == (2, 3 * 76, 256) and padding_mask.shape == (2, 3 * 76)
    assert not padding_mask[0].any()
    expect = torch.zeros(3, 76, dtype=torch.bool)
    expect[:, 75] = True
    assert torch.equal(padding_mask[1], expect.flatten())
    target, target_valid = tok.targets(x, spm)
    assert target.shape == (2, 3 * 76, 8)
    assert target_valid[0, 75].tolist() == [True] * 4 + [False] * 4
    assert int(target_valid[0].sum()) == 604 * 3


def test_float64_bf16_autocast_half_and_compile() -> None:
    torch.manual_seed(1)
    tok = SeriesTokenizer(16, 7, in_chans=2, group_size=3, modality_embed=True)
    x = _randn(_gen(1), 2, 7, 4, 2)
    x[0, 2, 1, 0] = float("nan")
    spm = torch.zeros(2, 7, dtype=torch.bool)
    spm[1, 5:] = True
    tp = torch.rand(2, 4, generator=_gen(2)) * 365
    ref, ref_mask = tok(x, spm, time_positions=tp)
    compiled = torch.compile(tok, fullgraph=True, backend="eager")
    out_c, mask_c = compiled(x, spm, time_positions=tp)
    assert torch.equal(out_c, ref) and torch.equal(mask_c, ref_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf, mask_bf = tok(x, spm, time_positions=tp)
    assert torch.isfinite(out_bf).all() and torch.equal(mask_bf, ref_mask)
    torch.testing.assert_close(out_bf.float(), ref, rtol=0.05, atol=0.1)
    tok64 = SeriesTokenizer(16, 7, in_chans=2, group_size=3, modality_embed=True)
    tok64.load_state_dict(tok.state_dict())
    tok64 = tok64.double()
    out64, _ = tok64(x.double(), spm, time_positions=tp.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), ref, rtol=1e-5, atol=1e-5)
    out_h, _ = tok64.half()(x, spm, time_positions=tp)  # float32 input, half weights
    assert out_h.dtype == torch.float16
    torch.testing.assert_close(out_h.float(), ref, rtol=0.02, atol=0.1)


def test_series_errors_name_the_argument() -> None:
    tok = SeriesTokenizer(8, 5, in_chans=2, group_size=2)
    one = SeriesTokenizer(8, 5)
    x = torch.zeros(2, 5, 3, 2)
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: SeriesTokenizer(7, 5), ValueError, "embed_dim"),
        (lambda: SeriesTokenizer(8, 0), ValueError, "num_sites"),
        (lambda: SeriesTokenizer(8, 5, group_size=0), ValueError, "group_size"),
        (lambda: SeriesTokenizer(8, 5, spatial_embed="2d"), ValueError, "spatial_embed"),
        (lambda: SeriesTokenizer(8, 5, time_embed="learned"), ValueError, "time_embed"),
        (lambda: SeriesTokenizer(8, 5, modality_embed=None), TypeError, "modality_embed"),  # type: ignore[arg-type]
        (lambda: tok(torch.zeros(2, 5, 3)), ValueError, "in_chans"),
        (lambda: tok(torch.zeros(2, 6, 3, 2)), ValueError, "x has shape"),
        (lambda: tok(torch.zeros(2, 5, 3, 1)), ValueError, "x has shape"),
        (lambda: tok(torch.zeros(2, 5, 3, 2, dtype=torch.int64)), TypeError, "x must"),
        (lambda: tok(torch.zeros(2, 5)), ValueError, "x must"),
        (lambda: tok(torch.zeros(2, 5, 0, 2)), ValueError, "time step"),
        (lambda: tok(x, torch.zeros(2, 4, dtype=torch.bool)), ValueError, "site_padding_mask"),
        (lambda: tok(x, torch.zeros(2, 5)), TypeError, "site_padding_mask"),
        (
            lambda: tok(x, missing_mask=torch.zeros(2, 5, 3, dtype=torch.bool)),
            ValueError,
            "missing_mask",
        ),
        (lambda: tok(x, missing_mask=torch.zeros(2, 5, 3, 2)), TypeError, "missing_mask"),
        (lambda: tok(x, time_positions=torch.zeros(4)), ValueError, "time_positions"),
        (lambda: tok(x, time_positions=torch.zeros(3, 3)), ValueError, "time_positions"),
        (lambda: one(torch.zeros(2, 5, 3, 2)), ValueError, "x has shape"),
        (lambda: one.token_positions(0), ValueError, "num_steps"),
        (lambda: one.position_embedding(), ValueError, "num_steps"),
        (lambda: tok.targets(x, torch.ones(5, dtype=torch.bool)), ValueError, "site_padding_mask"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()


# ---------------------------------------------------------------------------------------------
# StaticToken


@settings(deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.sampled_from([2, 8]), SEEDS)
def test_static_token_per_site_mean_over_real_sites(
    b: int, s: int, a: int, dim: int, seed: int
) -> None:
    torch.manual_seed(seed % 1000)
    tok = StaticToken(a, dim, per_site=True).double()
    gen = _gen(seed)
    static = _randn(gen, b, s, a, dtype=torch.float64)
    static[torch.rand(static.shape, generator=gen) < 0.2] = float("nan")
    spm = torch.rand(b, s, generator=gen) < 0.4
    spm[0] = True  # sample 0 has zero real sites
    dirty = _poison(static, spm[:, :, None], gen)
    token, padding_mask = tok(dirty, spm)
    assert token.shape == (b, 1, dim) and padding_mask.shape == (b, 1)
    assert padding_mask.dtype == torch.bool and not padding_mask.any()
    assert torch.isfinite(token).all()
    assert torch.equal(token[0, 0], tok.proj.bias)
    w = tok.proj.weight
    for i in range(b):
        rows = []
        for j in range(s):
            if spm[i, j]:
                continue
            v = static[i, j]
            ok = torch.isfinite(v)
            feats = torch.cat([torch.where(ok, v, torch.zeros(())), (~ok).double()])
            rows.append(w @ feats)
        expect = torch.stack(rows).mean(0) + tok.proj.bias if rows else tok.proj.bias
        torch.testing.assert_close(token[i, 0], expect)
        one, _ = tok(dirty[i : i + 1], spm[i : i + 1])
        torch.testing.assert_close(one[0], token[i])
    token.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tok.parameters())


def test_static_token_global_attributes_and_missing_indicator() -> None:
    torch.manual_seed(0)
    tok = StaticToken(11, 16)
    static = torch.randn(3, 11)
    token, padding_mask = tok(static)
    assert token.shape == (3, 1, 16) and not padding_mask.any()
    torch.testing.assert_close(token[:, 0], tok.proj(torch.cat([static, torch.zeros(3, 11)], -1)))
    zero = torch.zeros(1, 11)
    nan = torch.full((1, 11), float("nan"))
    t_zero, _ = tok(zero)
    t_nan, _ = tok(nan)
    assert torch.isfinite(t_nan).all() and not torch.equal(t_zero, t_nan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(tok(nan)[0]).all()
    compiled = torch.compile(tok, fullgraph=True, backend="eager")
    assert torch.equal(compiled(static)[0], token)


def test_static_token_errors() -> None:
    glob = StaticToken(3, 8)
    site = StaticToken(3, 8, per_site=True)
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: StaticToken(0, 8), ValueError, "num_attributes"),
        (lambda: StaticToken(3, 0), ValueError, "embed_dim"),
        (lambda: StaticToken(3, 8, per_site=1), TypeError, "per_site"),  # type: ignore[arg-type]
        (lambda: glob(torch.zeros(2, 4)), ValueError, "static"),
        (lambda: glob(torch.zeros(2, 5, 3)), ValueError, "static"),
        (lambda: glob(torch.zeros(2, 3, dtype=torch.long)), TypeError, "static"),
        (
            lambda: glob(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.bool)),
            ValueError,
            "site_padding_mask",
        ),
        (lambda: site(torch.zeros(2, 3)), ValueError, "static"),
        (
            lambda: site(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.bool)),
            ValueError,
            "site_padding_mask",
        ),
        (lambda: site(torch.zeros(2, 5, 3), torch.zeros(2, 5)), TypeError, "site_padding_mask"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()


# ---------------------------------------------------------------------------------------------
# append_tokens


def test_append_static_token_gives_every_sample_a_real_key() -> None:
    torch.manual_seed(0)
    series = SeriesTokenizer(8, 6, group_size=4)
    static = StaticToken(2, 8)
    x = torch.randn(3, 6, 2)
    x[1] = float("nan")  # sample 1: no observed value at all
    tokens, padding_mask = series(x)
    assert padding_mask[1].all()
    s_tok, s_mask = static(torch.randn(3, 2))
    all_tokens, all_mask = append_tokens(tokens, padding_mask, s_tok, s_mask)
    assert all_tokens.shape == (3, tokens.shape[1] + 1, 8)
    assert torch.equal(all_tokens[:, :-1], tokens) and torch.equal(all_tokens[:, -1:], s_tok)
    assert torch.equal(all_mask[:, :-1], padding_mask) and not all_mask[:, -1].any()
    assert (~all_mask).sum(dim=1).min() >= 1
    # None masks mean "all real"
    t2, m2 = append_tokens(tokens, None, s_tok)
    assert m2.shape == (3, tokens.shape[1] + 1) and not m2.any()
    assert torch.equal(t2, all_tokens)


def test_append_tokens_errors() -> None:
    t = torch.zeros(2, 3, 4)
    m = torch.zeros(2, 3, dtype=torch.bool)
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: append_tokens(t, m, torch.zeros(3, 1, 4)), ValueError, "extra_tokens"),
        (lambda: append_tokens(t, m, torch.zeros(2, 1, 5)), ValueError, "extra_tokens"),
        (lambda: append_tokens(t, m, torch.zeros(2, 4)), ValueError, "extra_tokens"),
        (lambda: append_tokens(t[0], None, torch.zeros(2, 1, 4)), ValueError, "tokens"),
        (lambda: append_tokens(t, m[:, :2], torch.zeros(2, 1, 4)), ValueError, "padding_mask"),
        (lambda: append_tokens(t, m.float(), torch.zeros(2, 1, 4)), TypeError, "padding_mask"),
        (
            lambda: append_tokens(t, m, torch.zeros(2, 1, 4), torch.zeros(2, 2, dtype=torch.bool)),
            ValueError,
            "extra_padding_mask",
        ),
        (lambda: append_tokens(t, m, [0.0]), TypeError, "extra_tokens"),  # type: ignore[arg-type]
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()
