"""Packed (static-shape) layout: pack/unpack, and packed encoders equal padded encoders."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossmae as cm
from crossmae.encoders import TransformerEncoder
from crossmae.layers import _varlen, attention
from tests.layers.test_varlen import reference_varlen
from tests.strategies import generator, seeds


@st.composite
def ragged(draw):  # type: ignore[no-untyped-def]
    b = draw(st.integers(0, 4))
    n = draw(st.integers(0, 7))
    lengths = draw(st.lists(st.integers(0, n), min_size=b, max_size=b))
    slack = draw(st.integers(0, 5))
    return b, n, lengths, slack, draw(seeds())


def _batch(b: int, n: int, lengths: list[int], seed: int, c: int = 8):  # type: ignore[no-untyped-def]
    g = generator(seed)
    x = torch.randn(b, n, c, generator=g)
    pad = cm.lengths_to_padding_mask(torch.tensor(lengths, dtype=torch.long), n)
    scatter = torch.rand(b, n, generator=g).argsort(1) if n else torch.zeros(b, 0, dtype=torch.long)
    pad = torch.gather(pad, 1, scatter)  # padding anywhere, not only at the end
    return x.masked_fill(pad[..., None], float("nan")), pad


@given(ragged())
def test_pack_unpack_round_trip_ignores_padding(case) -> None:  # type: ignore[no-untyped-def]
    b, n, lengths, slack, seed = case
    x, pad = _batch(b, n, lengths, seed)
    total = sum(lengths)
    packed = cm.pack_tokens(x, pad, total + slack)
    assert packed.tokens.shape == (total + slack, 8)
    assert packed.tokens.isfinite().all()  # NaN in padded slots is never read
    cu = packed.cu_seqlens.tolist()
    assert cu[: b + 1] == [0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()]
    assert cu[-1] == total + slack and cu == sorted(cu)
    assert all(hi - lo <= packed.max_seqlen for lo, hi in zip(cu, cu[1:]))
    assert packed.row_padding_mask.sum().item() == slack
    back = cm.unpack_tokens(packed.tokens, packed, b)
    assert torch.equal(back[~pad], x[~pad])
    assert (back[pad] == 0).all()
    seg = cm.layers.packed_segment_ids(packed)
    owner = (
        torch.arange(b).repeat_interleave(torch.tensor(lengths, dtype=torch.long)) if b else seg[:0]
    )
    assert torch.equal(seg[:total], owner)
    assert (seg[total:] >= b).all()


def test_pack_refuses_to_drop_tokens() -> None:
    x = torch.randn(2, 4, 3)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="capacity"):
        cm.pack_tokens(x, pad, 7)
    with pytest.raises(ValueError, match="capacity"):
        cm.pack_tokens(x, pad, 0)
    with pytest.raises(TypeError, match="padding_mask"):
        cm.pack_tokens(x, pad.float(), 8)  # type: ignore[arg-type]


@pytest.mark.parametrize("route", ["mask", "varlen"])
@given(case=ragged())
def test_packed_encoder_equals_padded_encoder(route: str, case) -> None:  # type: ignore[no-untyped-def]
    b, n, lengths, slack, seed = case
    torch.manual_seed(0)
    enc = TransformerEncoder(8, 2, 2, cond_dim=3).eval()
    for film in enc.films or []:  # make FiLM non-trivial
        torch.nn.init.normal_(film.proj.weight, std=0.5)
    x, pad = _batch(b, n, lengths, seed)
    cond = torch.randn(b, 3, generator=generator(seed + 1))
    packed = cm.pack_tokens(x, pad, sum(lengths) + slack)
    with torch.no_grad():
        ref = enc(x, pad, cond=cond, return_layers="all", include_input=True)
        if route == "varlen":
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(attention, "can_use_varlen", lambda q, p: True)
                mp.setattr(_varlen, "_VARLEN", reference_varlen)
                out = enc.forward_packed(packed, cond=cond, return_layers="all", include_input=True)
        else:
            out = enc.forward_packed(packed, cond=cond, return_layers="all", include_input=True)
    tokens = cm.unpack_tokens(out.tokens, packed, b)
    torch.testing.assert_close(tokens[~pad], ref.tokens[~pad], atol=1e-5, rtol=1e-5)
    assert out.features is not None and ref.features is not None
    for k in range(out.features.shape[0]):
        f = cm.unpack_tokens(out.features[k], packed, b)
        torch.testing.assert_close(f[~pad], ref.features[k][~pad], atol=1e-5, rtol=1e-5)
    assert out.tokens.isfinite().all()


def test_packed_encoder_gradients_finite_and_compile() -> None:
    enc = TransformerEncoder(8, 1, 2)
    x, pad = _batch(3, 5, [5, 0, 2], seed=3)
    packed = cm.pack_tokens(x, pad, 8)
    out = enc.forward_packed(packed)
    out.tokens.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in enc.parameters())
    compiled = torch.compile(enc.forward_packed, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(packed).tokens, enc.forward_packed(packed).tokens)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_attention_keeps_a_nan_in_its_segment(fused: bool) -> None:
    """Off-CUDA packed attention never lets rows of different segments meet (a single
    block-diagonal softmax would: a 0 weight times a NaN value is NaN), in the forward and
    in the gradients; it equals attention segment by segment."""
    g = generator(9)
    lengths = [3, 0, 4, 2]
    t, h, d = sum(lengths) + 3, 2, 4  # 3 slack rows: one more segment
    cu = torch.tensor([0, 3, 3, 7, 9, 12], dtype=torch.int32)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    v = v.clone()
    v[1, 0, 0] = float("nan")  # a real NaN in segment 0
    q.requires_grad_(True)
    out = cm.packed_attention(q, k, v, cu, 4, fused=fused)
    assert torch.isnan(out[:3]).any() and out[3:].isfinite().all()
    out[3:].sum().backward()
    assert q.grad is not None and q.grad[3:].isfinite().all()  # other segments: finite
    with torch.no_grad():
        for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if hi == lo or lo == 0:
                continue
            seg = [a[lo:hi].transpose(0, 1) for a in (q, k, v)]  # [h, l, d]
            ref = torch.softmax(seg[0] @ seg[1].transpose(-1, -2) * d**-0.5, -1) @ seg[2]
            torch.testing.assert_close(out[lo:hi], ref.transpose(0, 1))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.integers(0, 12))
def test_segment_index_matches_searchsorted(lengths: list[int], extra: int) -> None:
    """`segment_index` (scatter-add + cumsum, which inductor lowers on CUDA) gives every row
    the segment ``searchsorted`` gives it, empty segments and rows past the end included."""
    from crossmae.layers.packing import segment_index

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    rows = int(cu[-1]) + extra
    expected = torch.searchsorted(cu[1:], torch.arange(rows, dtype=torch.int32), right=True)
    assert torch.equal(segment_index(cu, rows), expected.long())
