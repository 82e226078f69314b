"""Tests for the downstream token options: ``SeriesTokenizer(group_reduce="mean")`` and
``StaticToken(missing_flags=False)``.

Legend: ``B`` batch, ``S`` sites, ``T`` steps, ``C`` channels, ``g`` sites per patch, ``P``
patches, ``A`` static attributes, ``D`` width. ``site_padding_mask`` True = padding site;
``missing_mask`` True = missing value; ``target_valid`` True = observed value.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossmae.tokenizers import SeriesTokenizer, StaticToken

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _series_inputs(
    g: torch.Generator, b: int, s: int, t: int, c: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, S, T, C]`` float64 with NaN/inf at some unobserved values, a ``missing_mask``
    (True = missing), a ``site_padding_mask [B, S]`` (True = padding) and the observed
    flags (True = observed)."""
    x = torch.randn(b, s, t, c, generator=g, dtype=torch.float64)
    nonfinite = torch.rand(b, s, t, c, generator=g) < 0.2
    x = torch.where(nonfinite, torch.tensor(float("nan"), dtype=torch.float64), x)
    x[..., 0][torch.rand(b, s, t, generator=g) < 0.05] = float("inf")
    missing = torch.rand(b, s, t, c, generator=g) < 0.2
    spm = torch.rand(b, s, generator=g) < 0.3
    spm[0] = True  # a sample with no real site: every token padding
    observed = torch.isfinite(x) & ~missing & ~spm[:, :, None, None]
    return x, missing, spm, observed


def test_group_mean_tokens_match_a_loop_float64() -> None:
    """Token = proj(per-channel mean over the group's observed values) + positions +
    modality, computed by an explicit loop; padding and targets as without the option."""
    g = _gen(0)
    b, s, t, c, gs, d = 3, 7, 4, 2, 3, 8
    x, missing, spm, observed = _series_inputs(g, b, s, t, c)
    tok = SeriesTokenizer(d, s, in_chans=c, group_size=gs, modality_embed=True, group_reduce="mean")
    tok = tok.double()
    assert tuple(tok.proj.weight.shape) == (d, c)
    tokens, pad = tok(x, spm, missing_mask=missing)
    p = math.ceil(s / gs)
    pos = tok.position_embedding(t)  # [t*P, d]
    assert tok.modality_embed is not None
    want = torch.zeros(b, t * p, d, dtype=torch.float64)
    want_pad = torch.zeros(b, t * p, dtype=torch.bool)
    for bi in range(b):
        for ti in range(t):
            for pi in range(p):
                mean = torch.zeros(c, dtype=torch.float64)
                any_seen = False
                for ci in range(c):
                    vals = [
                        float(x[bi, si, ti, ci])
                        for si in range(pi * gs, min((pi + 1) * gs, s))
                        if observed[bi, si, ti, ci]
                    ]
                    if vals:
                        mean[ci] = sum(vals) / len(vals)
                        any_seen = True
                n = ti * p + pi
                want[bi, n] = tok.proj(mean) + pos[n] + tok.modality_embed
                want_pad[bi, n] = not any_seen
    torch.testing.assert_close(tokens, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(pad, want_pad)
    assert pad[0].all() and not pad.all()
    plain = SeriesTokenizer(d, s, in_chans=c, group_size=gs).double()
    _, plain_pad = plain(x, spm, missing_mask=missing)
    assert torch.equal(pad, plain_pad)
    for a, e in zip(
        tok.targets(x, spm, missing_mask=missing), plain.targets(x, spm, missing_mask=missing)
    ):
        assert torch.equal(a, e)
    hidden = torch.rand(b, p, t, generator=g) < 0.5
    assert torch.equal(tok.layout_to_tokens(hidden), plain.layout_to_tokens(hidden))


@settings(max_examples=5, deadline=None)
@given(SEEDS, st.sampled_from([1, 2, 4]))
def test_group_mean_ignores_whatever_unobserved_values_hold(seed: int, gs: int) -> None:
    """NaN/inf/huge values at padded sites, missing values and fill-up sites never reach a
    token or a gradient: replacing them changes nothing; padded tokens stay finite."""
    g = _gen(seed)
    b, s, t, c, d = 2, 5, 3, 1, 8
    x, missing, spm, observed = _series_inputs(g, b, s, t, c)
    tok = SeriesTokenizer(d, s, in_chans=c, group_size=gs, group_reduce="mean").double()
    # unobserved: finite ones (flagged or at padded sites) -> 1e30, non-finite ones -> -inf
    junk = torch.where(torch.isfinite(x), 1e30, float("-inf")).to(x.dtype)
    other = torch.where(observed, x, junk)
    x = x.clone().requires_grad_(True)
    tokens, pad = tok(x, spm, missing_mask=missing)
    tokens2, pad2 = tok(other, spm, missing_mask=missing)
    assert torch.isfinite(tokens).all()
    assert torch.equal(pad, pad2)
    torch.testing.assert_close(tokens[~pad], tokens2[~pad], rtol=1e-12, atol=1e-12)
    tokens.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad[~observed] == 0).all()


def test_group_mean_compiles_fullgraph() -> None:
    g = _gen(3)
    b, s, t, c, d = 2, 6, 3, 1, 8
    x, missing, spm, _ = _series_inputs(g, b, s, t, c)
    x, missing = x[..., 0].float(), missing[..., 0]
    tok = SeriesTokenizer(d, s, group_size=4, group_reduce="mean")
    compiled = torch.compile(tok, fullgraph=True, backend="eager")
    want = tok(x, spm, missing_mask=missing)
    got = compiled(x, spm, missing_mask=missing)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_group_reduce_default_keeps_the_flagged_projection() -> None:
    tok = SeriesTokenizer(8, 6, in_chans=2, group_size=3)
    assert tok.group_reduce is None
    assert tuple(tok.proj.weight.shape) == (8, 2 * 3 * 2)
    assert set(tok.state_dict()) == set(
        SeriesTokenizer(8, 6, in_chans=2, group_size=3, group_reduce="mean").state_dict()
    )


@pytest.mark.parametrize(
    ("value", "error"),
    [("max", ValueError), ("Mean", ValueError), (1, TypeError), (True, TypeError)],
)
def test_group_reduce_refuses_bad_values(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="group_reduce"):
        SeriesTokenizer(8, 6, group_reduce=value)  # type: ignore[arg-type]


def _static_loop(
    tok: StaticToken, static: torch.Tensor, spm: Optional[torch.Tensor]
) -> torch.Tensor:
    """The unflagged static token by loops: ``[B, 1, D]``."""
    b, a = static.shape[0], static.shape[-1]
    out = torch.zeros(b, 1, tok.embed_dim, dtype=torch.float64)
    for bi in range(b):
        mean = torch.zeros(a, dtype=torch.float64)
        for ai in range(a):
            if static.ndim == 2:
                v = float(static[bi, ai])
                vals = [v] if math.isfinite(v) else []
            else:
                vals = [
                    float(static[bi, si, ai])
                    for si in range(static.shape[1])
                    if math.isfinite(float(static[bi, si, ai]))
                    and not (spm is not None and spm[bi, si])
                ]
            if vals:
                mean[ai] = sum(vals) / len(vals)
        out[bi, 0] = tok.proj(mean)
    return out


@pytest.mark.parametrize("per_site", [False, True])
def test_static_token_without_flags_matches_a_loop_float64(per_site: bool) -> None:
    g = _gen(1)
    b, s, a, d = 3, 4, 5, 8
    shape = (b, s, a) if per_site else (b, a)
    static = torch.randn(*shape, generator=g, dtype=torch.float64)
    static[torch.rand(*shape, generator=g) < 0.25] = float("nan")
    spm = None
    if per_site:
        spm = torch.rand(b, s, generator=g) < 0.3
        spm[0] = True  # no real site: exactly the bias
        spm[1] = False
    tok = StaticToken(a, d, per_site=per_site, missing_flags=False).double()
    assert tuple(tok.proj.weight.shape) == (d, a)
    token, pad = tok(static, spm)
    torch.testing.assert_close(token, _static_loop(tok, static, spm), rtol=1e-12, atol=1e-12)
    assert not pad.any() and tuple(pad.shape) == (b, 1)
    if per_site:
        torch.testing.assert_close(token[0, 0], tok.proj.bias, rtol=0, atol=0)


@settings(max_examples=5, deadline=None)
@given(SEEDS)
def test_static_token_without_flags_ignores_padded_sites(seed: int) -> None:
    g = _gen(seed)
    b, s, a, d = 2, 5, 3, 8
    static = torch.randn(b, s, a, generator=g, dtype=torch.float64)
    spm = torch.rand(b, s, generator=g) < 0.5
    poisoned = static.clone()
    poisoned[spm] = float("nan")
    poisoned[spm & (torch.rand(b, s, generator=g) < 0.5)] = 1e30
    tok = StaticToken(a, d, per_site=True, missing_flags=False).double()
    clean, _ = tok(static.masked_fill(spm[..., None], 0.0), spm)
    p = poisoned.requires_grad_(True)
    got, _ = tok(p, spm)
    torch.testing.assert_close(got, clean, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    assert (p.grad[spm] == 0).all()


def test_static_token_without_flags_compiles_fullgraph() -> None:
    g = _gen(2)
    static = torch.randn(2, 4, 3, generator=g)
    static[0, 1, 2] = float("nan")
    spm = torch.tensor([[False, False, True, True], [True, True, True, True]])
    tok = StaticToken(3, 8, per_site=True, missing_flags=False)
    compiled = torch.compile(tok, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(static, spm)[0], tok(static, spm)[0])


def test_static_token_flags_default_unchanged_and_bad_values_refused() -> None:
    tok = StaticToken(4, 8)
    assert tok.missing_flags is True
    assert tuple(tok.proj.weight.shape) == (8, 8)
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="missing_flags"):
            StaticToken(4, 8, missing_flags=bad)  # type: ignore[arg-type]
