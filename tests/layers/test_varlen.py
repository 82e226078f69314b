"""The packed variable-length path (CUDA) checked on CPU with a reference segment kernel.

The real kernel only runs on CUDA; here its segment semantics are emulated by a slow
reference (a loop over segments, in the test only) so that the packing logic (real-first
permutation, interleaved real/dummy segments, inverse permutation) is exercised on every
run. The GPU benchmark compares the real kernel against the masked path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import crossmae as cm
from crossmae.layers import _varlen, attention
from tests.strategies import generator, seeds, tiny_water_batch, tiny_water_model


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
    assert q.shape[0] == int(cu_q[-1]) and k.shape[0] == int(cu_k[-1])
    assert max_q >= int((cu_q[1:] - cu_q[:-1]).max()) and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
    out = torch.zeros_like(q)
    for i in range(len(cu_q) - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        if b > a and d > c:
            seg = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
            )
            out[a:b] = seg.transpose(0, 1)
    return out


@st.composite
def padded_case(draw):  # type: ignore[no-untyped-def]
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, 9))
    m = draw(st.integers(1, 9))
    return b, n, m, draw(seeds())


@given(padded_case())
def test_varlen_cross_matches_masked_sdpa(case) -> None:  # type: ignore[no-untyped-def]
    b, n, m, seed = case
    g = generator(seed)
    q, k, v = (torch.randn(b, 2, x, 8, generator=g) for x in (n, m, m))
    kpad = torch.rand(b, m, generator=g) < 0.4
    kpad[0] = True  # always one sample without keys
    out = _varlen.varlen_attend(q, k, v, kpad, kernel=reference_varlen)
    ref = cm.padded_attention(q, k, v, kpad, fused=False)
    real = ~kpad.all(1)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


@given(padded_case())
def test_varlen_self_attention_with_query_padding(case) -> None:  # type: ignore[no-untyped-def]
    b, n, _, seed = case
    g = generator(seed)
    x = torch.randn(b, 2, n, 8, generator=g)
    pad = torch.rand(b, n, generator=g) < 0.5
    out = _varlen.varlen_attend(x, x, x, pad, pad, kernel=reference_varlen)
    ref = cm.padded_attention(x, x, x, pad, fused=False)
    real_q = ~pad  # real queries of samples that have keys
    real_q &= ~pad.all(1, keepdim=True)
    torch.testing.assert_close(
        out.permute(0, 2, 1, 3)[real_q], ref.permute(0, 2, 1, 3)[real_q], atol=1e-5, rtol=1e-5
    )
    assert out.isfinite().all()


@pytest.mark.parametrize("layout", ["qkv", "transposed_head_dim"])
def test_varlen_rows_are_views_of_a_fused_projection(layout: str) -> None:
    """The packed kernel gets ``[(b n) h d]`` rows with a contiguous head dim: views of a
    fused ``qkv`` projection's memory (no copy), a copy where the head dim is strided; the
    output is the same either way."""
    b, n, h, d = 3, 5, 2, 8
    g = generator(4)
    if layout == "qkv":  # b n (three h d), as Attention splits it
        qkv = torch.randn(b, n, 3 * h * d, generator=g)
        q, k, v = qkv.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)
    else:  # head dim strided: the kernel needs it contiguous
        q, k, v = (torch.randn(b, h, d, n, generator=g).transpose(-1, -2) for _ in range(3))
    pad = torch.rand(b, n, generator=g) < 0.4
    pad[:, 0] = False
    seen: list[torch.Tensor] = []

    def kernel(qr, kr, vr, *rest):  # type: ignore[no-untyped-def]
        seen.extend([qr, kr, vr])
        return reference_varlen(qr.contiguous(), kr.contiguous(), vr.contiguous(), *rest)

    out = _varlen.varlen_attend(q, k, v, pad, pad, kernel=kernel, keys_sorted=False)
    assert all(t.shape == (b * n, h, d) and t.stride(-1) == 1 for t in seen)
    if layout == "qkv":
        # the keys/values were reordered (a gather: new memory), the queries too; a sorted
        # call hands the projection's own memory to the kernel
        seen.clear()
        tpad = torch.zeros(b, n, dtype=torch.bool)
        _varlen.varlen_attend(
            q, k, v, tpad, tpad, kernel=kernel, keys_sorted=True, queries_sorted=True
        )
        assert all(t.data_ptr() == qkv.data_ptr() + i * h * d * qkv.element_size()
                   for i, t in enumerate(seen))  # fmt: skip
    ref = cm.padded_attention(q, k, v, pad, fused=False)
    real = ~pad
    torch.testing.assert_close(
        out.permute(0, 2, 1, 3)[real], ref.permute(0, 2, 1, 3)[real], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("self_attn", [False, True])
def test_modules_dispatch_to_varlen_and_agree(
    monkeypatch: pytest.MonkeyPatch, self_attn: bool
) -> None:
    """Force the dispatcher onto the packed path (reference kernel) and compare modules."""
    calls = []

    def kernel(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return reference_varlen(*args)

    g = generator(3)
    block = cm.CrossAttentionBlock(16, 12, 4, self_attn=self_attn).eval()
    x = torch.randn(3, 5, 16, generator=g)
    ctx = torch.randn(3, 7, 12, generator=g)
    cpad = torch.tensor([[False] * 7, [False] * 3 + [True] * 4, [True] * 7])
    qpad = torch.tensor([[False] * 5, [False, True, False, True, True], [False] * 5])
    with torch.no_grad():
        ref = block(x, ctx, cpad, qpad)
        monkeypatch.setattr(attention, "can_use_varlen", lambda q, p: True)
        monkeypatch.setattr(_varlen, "_VARLEN", kernel)
        out = block(x, ctx, cpad, qpad)
    assert calls, "the packed path was not taken"
    real = ~qpad
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert out.isfinite().all()


def test_segments_are_static_and_cover_everything() -> None:
    lengths = torch.tensor([0, 3, 5])
    seg = _varlen._segments(lengths, 5)
    assert seg.tolist() == [0, 0, 5, 8, 10, 15, 15]
    assert seg.dtype == torch.int32


def test_can_use_varlen_is_false_on_cpu() -> None:
    q = torch.randn(1, 1, 2, 8, dtype=torch.bfloat16)
    assert not _varlen.can_use_varlen(q, 0.0)


@pytest.mark.parametrize("wfm", [False, True])
def test_encoder_and_decoder_reorder_once_and_agree(
    monkeypatch: pytest.MonkeyPatch, wfm: bool
) -> None:
    """The CUDA-only 'padding to the end, once per stack' reordering, forced on CPU with the
    reference kernel, gives the same encoder outputs (in the original order) and decoder
    predictions as the plain masked path."""
    from crossmae.decoders import CrossMAEDecoder
    from crossmae.encoders import TransformerEncoder

    g = generator(7)
    enc = TransformerEncoder(16, 2, 4).eval()
    dec = CrossMAEDecoder(16, 8, 2, 2, 5, num_tokens=9, num_feature_maps=3 if wfm else None).eval()
    x = torch.randn(3, 9, 16, generator=g)
    pad = torch.rand(3, 9, generator=g) < 0.4
    pad[2] = True
    ids = torch.randint(0, 9, (3, 4), generator=g)
    with torch.no_grad():
        ref = enc(x, pad, return_layers="all", include_input=True)
        ref_pred = dec(ref.features if wfm else ref.tokens, ids, context_padding_mask=pad)
        monkeypatch.setattr(_varlen, "prefer_trailing_padding", lambda t: True)
        monkeypatch.setattr(attention, "can_use_varlen", lambda q, p: True)
        monkeypatch.setattr(_varlen, "_VARLEN", reference_varlen)
        out = enc(x, pad, return_layers="all", include_input=True)
        pred = dec(out.features if wfm else out.tokens, ids, context_padding_mask=pad)
    real = ~pad
    torch.testing.assert_close(out.tokens[real], ref.tokens[real], atol=1e-5, rtol=1e-5)
    assert out.features is not None and ref.features is not None
    torch.testing.assert_close(out.features[:, real], ref.features[:, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)


def test_multimodal_model_same_loss_on_the_packed_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The water model's CUDA route (keys reordered once, packed kernel) forced on CPU."""
    torch.manual_seed(0)
    model = tiny_water_model()
    inputs, static = tiny_water_batch(model.names, generator(11))
    with torch.no_grad():
        ref = model(inputs, static=static, generator=generator(5))
        monkeypatch.setattr(_varlen, "prefer_trailing_padding", lambda x: True)
        monkeypatch.setattr(attention, "can_use_varlen", lambda q, p: True)
        monkeypatch.setattr(_varlen, "_VARLEN", reference_varlen)
        out = model(inputs, static=static, generator=generator(5))
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=1e-5)
    for name in model.names:
        torch.testing.assert_close(
            out.sample_losses[name], ref.sample_losses[name], atol=1e-4, rtol=1e-5
        )


@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=4),
    st.integers(0, 7),
    st.lists(st.integers(0, 7), min_size=1, max_size=4),
)
def test_together_segments_pair_every_call_and_sample(counts, m, lengths) -> None:  # type: ignore[no-untyped-def]
    """Segment ``2 (i b + j)`` holds call i's sample-j queries and that sample's real keys
    (offset by call i's block of keys), segment ``+1`` no query and its padded keys."""
    key_lengths = torch.tensor([min(x, m) for x in lengths])
    b = key_lengths.shape[0]
    cu_q, cu_k = _varlen.together_segments(counts, m, key_lengths)
    assert cu_q.dtype == cu_k.dtype == torch.int32
    assert cu_q.shape == cu_k.shape == (2 * b * len(counts) + 1,)
    q_off = 0
    for i, n in enumerate(counts):
        for j in range(b):
            s = 2 * (i * b + j)
            assert (int(cu_q[s]), int(cu_q[s + 1]), int(cu_q[s + 2])) == (
                q_off + j * n, q_off + (j + 1) * n, q_off + (j + 1) * n)  # fmt: skip
            k0 = i * b * m + j * m
            assert (int(cu_k[s]), int(cu_k[s + 1]), int(cu_k[s + 2])) == (
                k0, k0 + int(key_lengths[j]), k0 + m)  # fmt: skip
        q_off += b * n


@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=3),
    st.integers(1, 6),
    st.lists(st.integers(0, 6), min_size=1, max_size=3),
    seeds(),
)
def test_together_segments_skip_samples_without_a_real_query(counts, m, lengths, seed) -> None:  # type: ignore[no-untyped-def]
    """With ``query_padding``, a sample whose queries are all padding pairs them with at
    most one key; every other segment is the plain layout's, and the key boundaries still
    tile each sample's ``m`` slots."""
    key_lengths = torch.tensor([min(x, m) for x in lengths])
    b = key_lengths.shape[0]
    g = generator(seed)
    qpad = [torch.rand(b, n, generator=g) < 0.5 for n in counts]
    for q in qpad:
        if q.shape[1]:
            q[0] = True  # one sample without a real query in every call
    plain_q, plain_k = _varlen.together_segments(counts, m, key_lengths)
    cu_q, cu_k = _varlen.together_segments(counts, m, key_lengths, query_padding=qpad)
    torch.testing.assert_close(cu_q, plain_q)
    for i, n in enumerate(counts):
        for j in range(b):
            s = 2 * (i * b + j)
            k0 = i * b * m + j * m
            assert int(cu_k[s]) == k0 and int(cu_k[s + 2]) == k0 + m  # tiles the sample
            if n > 0 and bool(qpad[i][j].all()):
                assert int(cu_k[s + 1]) - k0 == min(int(key_lengths[j]), 1)
            else:
                assert int(cu_k[s + 1]) == int(plain_k[s + 1])
    none = _varlen.together_segments(counts, m, key_lengths, query_padding=[None] * len(counts))
    torch.testing.assert_close(none[1], plain_k)
    with pytest.raises(ValueError, match="masks for"):
        _varlen.together_segments(counts, m, key_lengths, query_padding=[*qpad, None])
    if counts[0] > 0:
        bad = [torch.zeros(b, counts[0] + 1, dtype=torch.bool), *qpad[1:]]
        with pytest.raises(ValueError, match="expected"):
            _varlen.together_segments(counts, m, key_lengths, query_padding=bad)
