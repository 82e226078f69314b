"""Contract tests for ``Attention`` and ``CrossAttention``.

Legend: ``B`` batch, ``N`` tokens, ``Nq`` queries, ``Nk`` keys, ``h`` heads,
``d`` head dim, ``D = h * d``. Every ``*padding_mask`` is True = padding.

The manual path (``fused_attn=False``) must be bitwise padding invariant;
the SDPA path (``fused_attn=True``) only up to float tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    CrossBatch,
    PaddedBatch,
    assert_close_or_equal,
    cross_batches,
    padded_batches,
    poison_padding,
    randn,
    reference_attention,
)
from torch import nn
from torch.overrides import TorchFunctionMode

import crossmae
from crossmae import Attention, CrossAttention

FUSED = pytest.mark.parametrize("fused", [False, True], ids=["manual", "sdpa"])
KINDS = st.sampled_from(["random", "nan", "inf", "mixed"])


# ----------------------------------------------------------------------------- helpers


def make_attention(dim: int, heads: int, seed: int, fused: bool, **kw: Any) -> Attention:
    torch.manual_seed(seed)
    kw.setdefault("qkv_bias", True)
    return Attention(dim, num_heads=heads, fused_attn=fused, **kw).eval()


def make_cross(cb: CrossBatch, fused: bool, **kw: Any) -> CrossAttention:
    torch.manual_seed(cb.seed)
    kw.setdefault("qkv_bias", True)
    return CrossAttention(
        cb.dim, context_dim=cb.context_dim, num_heads=cb.num_heads, fused_attn=fused, **kw
    ).eval()


def ref_self_attention(
    m: Attention, x: torch.Tensor, pm: torch.Tensor | None, h: int
) -> torch.Tensor:
    """Independent float64 computation from the module's weights ((3 h d) layout)."""
    x = x.double()
    w, b = m.qkv.weight.double(), m.qkv.bias
    qkv = x @ w.T + (b.double() if b is not None else 0.0)
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=h)
    o = reference_attention(q, k, v, pm)
    o = rearrange(o, "b h n d -> b n (h d)")
    return o @ m.proj.weight.double().T + m.proj.bias.double()


def ref_cross_attention(
    m: CrossAttention, x: torch.Tensor, ctx: torch.Tensor, pm: torch.Tensor | None, h: int
) -> torch.Tensor:
    """Independent float64 cross-attention: q from x, k then v from kv, heads (h d)."""
    dim = m.q.weight.shape[0]
    q = x.double() @ m.q.weight.double().T
    if m.q.bias is not None:
        q = q + m.q.bias.double()
    kv = ctx.double() @ m.kv.weight.double().T
    if m.kv.bias is not None:
        kv = kv + m.kv.bias.double()
    k, v = kv[..., :dim], kv[..., dim:]
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in (q, k, v))
    o = rearrange(reference_attention(q, k, v, pm), "b h n d -> b n (h d)")
    return o @ m.proj.weight.double().T + m.proj.bias.double()


class SDPACounter(TorchFunctionMode):
    """Counts calls of ``F.scaled_dot_product_attention`` however it is imported."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def restore_fused_flag() -> Iterator[None]:
    before = crossmae.use_fused_attn()
    try:
        yield
    finally:
        crossmae.set_fused_attn(before)


def real_where(out: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
    """Zero the padded rows (differentiably) so a loss only sees real outputs."""
    return torch.where(pm[..., None], torch.zeros_like(out), out)


def assert_finite_grads(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite grad in {name}"


# ----------------------------------------------------------------------------- structure


def test_attention_parameters_and_defaults() -> None:
    m = Attention(16)  # num_heads defaults to 8
    assert isinstance(m.qkv, nn.Linear) and isinstance(m.proj, nn.Linear)
    assert m.qkv.weight.shape == (48, 16)
    assert m.qkv.bias is None  # qkv_bias=False by default
    assert m.proj.weight.shape == (16, 16)
    assert m.proj.bias is not None
    names = {n for n, _ in m.named_parameters()}
    assert names == {"qkv.weight", "proj.weight", "proj.bias"}
    assert Attention(12, num_heads=3, qkv_bias=True).qkv.bias.shape == (36,)  # type: ignore[union-attr]


def test_cross_attention_parameters_and_defaults() -> None:
    m = CrossAttention(16)
    assert m.q.weight.shape == (16, 16) and m.q.bias is None
    assert m.kv.weight.shape == (32, 16) and m.kv.bias is None  # context_dim defaults to dim
    assert m.proj.weight.shape == (16, 16) and m.proj.bias is not None
    m2 = CrossAttention(16, context_dim=5, num_heads=4, qkv_bias=True)
    assert m2.kv.weight.shape == (32, 5)
    assert m2.q.bias is not None and m2.kv.bias is not None
    assert m2.kv.bias.shape == (32,)
    names = {n for n, _ in m2.named_parameters()}
    assert names == {"q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"}


@pytest.mark.parametrize("cls", [Attention, CrossAttention])
def test_dim_not_divisible_by_heads_raises(cls: type[nn.Module]) -> None:
    with pytest.raises(ValueError):
        cls(10, num_heads=4)


# ----------------------------------------------------------------------------- reference math


@FUSED
@given(pb=padded_batches(max_len=12, max_batch=4))
def test_attention_matches_independent_reference(fused: bool, pb: PaddedBatch) -> None:
    m = make_attention(pb.dim, pb.num_heads, pb.seed, fused).double()
    x = pb.tokens().double()
    pm = pb.padding_mask
    with torch.no_grad():
        out = m(x, padding_mask=pm)
        ref = ref_self_attention(m, x, pm, pb.num_heads)
        out_nomask = m(x)
        ref_nomask = ref_self_attention(m, x, None, pb.num_heads)
    assert out.dtype == torch.float64 and out.shape == x.shape
    real = ~pm
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_nomask, ref_nomask, atol=1e-10, rtol=1e-10)


@FUSED
@given(cb=cross_batches(max_keys=12, max_queries=6, max_batch=4))
def test_cross_attention_matches_independent_reference(fused: bool, cb: CrossBatch) -> None:
    m = make_cross(cb, fused).double()
    x, ctx, pm = cb.queries(torch.float64), cb.context(torch.float64), cb.context_padding_mask
    with torch.no_grad():
        out = m(x, ctx, context_padding_mask=pm)
        ref = ref_cross_attention(m, x, ctx, pm, cb.num_heads)
        out_nomask = m(x, ctx)
        ref_nomask = ref_cross_attention(m, x, ctx, None, cb.num_heads)
    assert out.shape == (cb.batch, cb.num_queries, cb.dim) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_nomask, ref_nomask, atol=1e-10, rtol=1e-10)


@FUSED
@given(pb=padded_batches(max_len=10))
def test_all_false_mask_equals_no_mask(fused: bool, pb: PaddedBatch) -> None:
    m = make_attention(pb.dim, pb.num_heads, pb.seed, fused)
    x = pb.tokens()
    none = torch.zeros(pb.batch, pb.max_len, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(m(x, padding_mask=none), m(x), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- padding invariance


@FUSED
@given(pb=padded_batches(force_padding=True), kind=KINDS)
def test_attention_padding_invariance(fused: bool, pb: PaddedBatch, kind: str) -> None:
    m = make_attention(pb.dim, pb.num_heads, pb.seed, fused)
    x, pm = pb.tokens(), pb.padding_mask
    with torch.no_grad():
        out = m(x, padding_mask=pm)
        out_bad = m(poison_padding(x, pm, pb.seed + 1, kind=kind), padding_mask=pm)
    real = ~pm
    assert torch.isfinite(out).all(), "outputs (padded positions included) must be finite"
    assert torch.isfinite(out_bad[real]).all()
    assert_close_or_equal(out_bad[real], out[real], exact=not fused)


@FUSED
@given(cb=cross_batches(force_key_padding=True), kind=KINDS, data=st.data())
def test_cross_attention_padding_invariance(
    fused: bool, cb: CrossBatch, kind: str, data: st.DataObject
) -> None:
    m = make_cross(cb, fused)
    x, ctx, pm = cb.queries(), cb.context(), cb.context_padding_mask
    with torch.no_grad():
        out = m(x, ctx, context_padding_mask=pm)
        out_bad = m(x, poison_padding(ctx, pm, cb.seed + 2, kind=kind), context_padding_mask=pm)
        # poisoned query slots only affect their own rows (queries are independent)
        qpm = cb.query_padding_mask
        out_q = m(poison_padding(x, qpm, cb.seed + 3, kind=kind), ctx, context_padding_mask=pm)
    assert torch.isfinite(out).all()
    assert torch.isfinite(out_bad).all()
    assert_close_or_equal(out_bad, out, exact=not fused)
    real_q = ~qpm
    assert_close_or_equal(out_q[real_q], out[real_q], exact=not fused)


@FUSED
@given(pb=padded_batches(max_len=20), extra=st.integers(1, 7), kind=KINDS)
def test_attention_appending_padded_tokens(
    fused: bool, pb: PaddedBatch, extra: int, kind: str
) -> None:
    m = make_attention(pb.dim, pb.num_heads, pb.seed, fused)
    x, pm = pb.tokens(), pb.padding_mask
    x_ext = torch.cat([x, randn(pb.seed + 5, pb.batch, extra, pb.dim)], dim=1)
    pm_ext = torch.cat([pm, torch.ones(pb.batch, extra, dtype=torch.bool)], dim=1)
    x_ext = poison_padding(x_ext, pm_ext, pb.seed + 6, kind=kind)
    with torch.no_grad():
        out = m(x, padding_mask=pm)
        out_ext = m(x_ext, padding_mask=pm_ext)
    real = ~pm
    torch.testing.assert_close(out_ext[:, : pb.max_len][real], out[real], atol=1e-5, rtol=1e-5)


@FUSED
@given(cb=cross_batches(), extra=st.integers(1, 7), kind=KINDS)
def test_cross_attention_appending_padded_keys(
    fused: bool, cb: CrossBatch, extra: int, kind: str
) -> None:
    m = make_cross(cb, fused)
    x, ctx, pm = cb.queries(), cb.context(), cb.context_padding_mask
    ctx_ext = torch.cat([ctx, randn(cb.seed + 5, cb.batch, extra, cb.context_dim)], dim=1)
    pm_ext = torch.cat([pm, torch.ones(cb.batch, extra, dtype=torch.bool)], dim=1)
    ctx_ext = poison_padding(ctx_ext, pm_ext, cb.seed + 6, kind=kind)
    with torch.no_grad():
        out = m(x, ctx, context_padding_mask=pm)
        out_ext = m(x, ctx_ext, context_padding_mask=pm_ext)
    torch.testing.assert_close(out_ext, out, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- batch independence


@FUSED
@given(pb=padded_batches(min_batch=2), data=st.data())
def test_attention_batch_independence(fused: bool, pb: PaddedBatch, data: st.DataObject) -> None:
    m = make_attention(pb.dim, pb.num_heads, pb.seed, fused)
    x, pm = pb.tokens(), pb.padding_mask
    j = data.draw(st.integers(0, pb.batch - 1))
    x2 = x.clone()
    x2[j] = randn(pb.seed + 9, pb.max_len, pb.dim) * 10
    pm2 = pm.clone()
    flags = data.draw(st.lists(st.booleans(), min_size=pb.max_len, max_size=pb.max_len))
    pm2[j] = torch.tensor(flags, dtype=torch.bool).reshape(pb.max_len)
    with torch.no_grad():
        out = m(x, padding_mask=pm)
        out2 = m(x2, padding_mask=pm2)
    others = [i for i in range(pb.batch) if i != j]
    assert_close_or_equal(out2[others], out[others], exact=not fused)


@FUSED
@given(pb=padded_batches(max_len=16))
def test_attention_batched_equals_per_sample(fused: bool, pb: PaddedBatch) -> None:
    m = make_attention(pb.dim, pb.num_heads, pb.seed, fused)
    x, pm = pb.tokens(), pb.padding_mask
    with torch.no_grad():
        out = m(x, padding_mask=pm)
        for i in range(pb.batch):
            real = ~pm[i]
            single = m(x[i : i + 1, real])
            torch.testing.assert_close(out[i, real], single[0], atol=1e-5, rtol=1e-5)


@FUSED
@given(cb=cross_batches(), data=st.data())
def test_cross_attention_batch_independence(
    fused: bool, cb: CrossBatch, data: st.DataObject
) -> None:
    m = make_cross(cb, fused)
    x, ctx, pm = cb.queries(), cb.context(), cb.context_padding_mask
    j = data.draw(st.integers(0, cb.batch - 1))
    x2, ctx2, pm2 = x.clone(), ctx.clone(), pm.clone()
    x2[j] = randn(cb.seed + 3, cb.num_queries, cb.dim) * 10
    ctx2[j] = float("nan") if data.draw(st.booleans()) else 5.0
    pm2[j] = ~pm[j]
    with torch.no_grad():
        out = m(x, ctx, context_padding_mask=pm)
        out2 = m(x2, ctx2, context_padding_mask=pm2)
    others = [i for i in range(cb.batch) if i != j]
    assert_close_or_equal(out2[others], out[others], exact=not fused)
    for i in range(cb.batch):
        real = ~pm[i]
        with torch.no_grad():
            single = m(x[i : i + 1], ctx[i : i + 1, real])
        torch.testing.assert_close(out[i : i + 1], single, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- empty rows


@FUSED
@given(cb=cross_batches(max_keys=10), kind=KINDS, data=st.data())
def test_cross_attention_zero_real_keys(
    fused: bool, cb: CrossBatch, kind: str, data: st.DataObject
) -> None:
    m = make_cross(cb, fused).train(False)
    pm = cb.context_padding_mask.clone()
    empty = data.draw(
        st.lists(st.booleans(), min_size=cb.batch, max_size=cb.batch).filter(any)
    )  # at least one sample with zero real keys (all of them possibly)
    pm[torch.tensor(empty)] = True
    ctx = poison_padding(cb.context(), pm, cb.seed + 4, kind=kind)
    x = cb.queries().requires_grad_(True)
    out = m(x, ctx, context_padding_mask=pm)
    assert torch.isfinite(out).all()
    # the attention itself yields zeros, so the output is proj(0) = proj.bias
    expected = m.proj.bias.detach().expand(cb.num_queries, cb.dim)
    for i, e in enumerate(empty):
        if e:
            torch.testing.assert_close(out[i].detach(), expected, atol=1e-6, rtol=0)
    (out * randn(cb.seed + 8, *out.shape)).sum().backward()
    assert_finite_grads(m)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@FUSED
@pytest.mark.parametrize("nk", [0, 3])
def test_cross_attention_whole_batch_without_keys(fused: bool, nk: int) -> None:
    torch.manual_seed(0)
    m = CrossAttention(8, context_dim=6, num_heads=2, qkv_bias=True, fused_attn=fused)
    x = torch.randn(3, 4, 8, requires_grad=True)
    ctx = torch.full((3, nk, 6), float("nan"))
    pm = torch.ones(3, nk, dtype=torch.bool)
    out = m(x, ctx, context_padding_mask=pm)
    assert out.shape == (3, 4, 8)
    torch.testing.assert_close(out.detach(), m.proj.bias.detach().expand(3, 4, 8))
    out.square().sum().backward()
    assert_finite_grads(m)
    assert m.proj.weight.grad is not None
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if nk == 0:  # no keys at all also works without a mask
        out2 = m(x, ctx)
        torch.testing.assert_close(out2.detach(), out.detach())


@FUSED
@given(pb=padded_batches(max_len=12), kind=KINDS, data=st.data())
def test_attention_empty_samples_finite_grads(
    fused: bool, pb: PaddedBatch, kind: str, data: st.DataObject
) -> None:
    m = make_attention(pb.dim, pb.num_heads, pb.seed, fused)
    pm = pb.padding_mask.clone()
    empty = data.draw(st.lists(st.booleans(), min_size=pb.batch, max_size=pb.batch))
    pm[torch.tensor(empty)] = True
    x = poison_padding(pb.tokens(), pm, pb.seed + 2, kind=kind).requires_grad_(True)
    out = m(x, padding_mask=pm)
    real = ~pm
    assert torch.isfinite(out[real]).all()
    real_where(out, pm).sum().backward()
    assert_finite_grads(m)
    assert x.grad is not None
    assert torch.isfinite(x.grad[real]).all()
    # finite padded inputs -> every output (padded ones included) finite
    with torch.no_grad():
        out_clean = m(pb.tokens(), padding_mask=pm)
    assert torch.isfinite(out_clean).all()


@FUSED
def test_attention_zero_tokens(fused: bool) -> None:
    m = Attention(8, num_heads=2, fused_attn=fused)
    x = torch.randn(3, 0, 8, requires_grad=True)
    for kw in ({}, {"padding_mask": torch.zeros(3, 0, dtype=torch.bool)}):
        out = m(x, **kw)
        assert out.shape == (3, 0, 8)
        out.sum().backward()
        assert_finite_grads(m)


def test_cross_attention_zero_queries() -> None:
    m = CrossAttention(8, num_heads=2)
    out = m(torch.randn(2, 0, 8), torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool))
    assert out.shape == (2, 0, 8)


# ----------------------------------------------------------------------------- fused vs manual


def _paired(cls: type[nn.Module], *args: Any, **kw: Any) -> tuple[nn.Module, nn.Module]:
    manual = cls(*args, fused_attn=False, **kw).eval()
    fused = cls(*args, fused_attn=True, **kw).eval()
    fused.load_state_dict(manual.state_dict())
    return manual, fused


@given(pb=padded_batches(), masked=st.booleans())
def test_attention_fused_equals_manual(pb: PaddedBatch, masked: bool) -> None:
    torch.manual_seed(pb.seed)
    manual, fused = _paired(Attention, pb.dim, pb.num_heads, qkv_bias=True)
    x = pb.tokens()
    kw = {"padding_mask": pb.padding_mask} if masked else {}
    with torch.no_grad():
        a, b = manual(x, **kw), fused(x, **kw)
    real = ~pb.padding_mask if masked else torch.ones(pb.batch, pb.max_len, dtype=torch.bool)
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


@given(cb=cross_batches(), masked=st.booleans())
def test_cross_attention_fused_equals_manual(cb: CrossBatch, masked: bool) -> None:
    torch.manual_seed(cb.seed)
    manual, fused = _paired(CrossAttention, cb.dim, cb.context_dim, cb.num_heads, qkv_bias=True)
    x, ctx = cb.queries(), cb.context()
    kw = {"context_padding_mask": cb.context_padding_mask} if masked else {}
    with torch.no_grad():
        torch.testing.assert_close(manual(x, ctx, **kw), fused(x, ctx, **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flag", [False, True])
def test_set_fused_attn_is_read_at_construction(flag: bool, restore_fused_flag: None) -> None:
    crossmae.set_fused_attn(flag)
    assert crossmae.use_fused_attn() is flag
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2)
    cross = CrossAttention(8, num_heads=2)
    crossmae.set_fused_attn(not flag)  # changing it later must not affect built modules
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    pm = torch.tensor([[False] * 5 + [True] * 2, [True] * 7])
    with SDPACounter() as counter, torch.no_grad():
        attn(x, padding_mask=pm[:, :5])
        attn(x)
        cross(x, ctx, context_padding_mask=pm)
        cross(x, ctx)
    assert (counter.calls > 0) is flag, counter.calls


@pytest.mark.parametrize("fused", [False, True])
def test_fused_attn_kwarg_overrides_process_flag(fused: bool, restore_fused_flag: None) -> None:
    crossmae.set_fused_attn(not fused)
    attn = Attention(8, num_heads=2, fused_attn=fused)
    cross = CrossAttention(8, num_heads=2, fused_attn=fused)
    x = torch.randn(2, 5, 8)
    with SDPACounter() as counter, torch.no_grad():
        attn(x, padding_mask=torch.zeros(2, 5, dtype=torch.bool))
        cross(x, x, context_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert (counter.calls > 0) is fused


def test_gradcheck_cross_attention_manual_float64() -> None:
    torch.manual_seed(0)
    m = CrossAttention(4, context_dim=3, num_heads=2, qkv_bias=True, fused_attn=False).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    pm = torch.tensor([[False, True, False, True], [True, True, True, True]])
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]

    def fn(x: torch.Tensor, ctx: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(
            m, dict(zip(names, ps)), (x, ctx), {"context_padding_mask": pm}
        )
        return out

    assert torch.autograd.gradcheck(fn, (x, ctx, *params), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- permutations


@FUSED
@given(cb=cross_batches(), data=st.data())
def test_cross_attention_permutation_symmetries(
    fused: bool, cb: CrossBatch, data: st.DataObject
) -> None:
    m = make_cross(cb, fused)
    x, ctx, pm = cb.queries(), cb.context(), cb.context_padding_mask
    qperm = torch.tensor(data.draw(st.permutations(list(range(cb.num_queries)))), dtype=torch.long)
    kperm = torch.tensor(data.draw(st.permutations(list(range(cb.num_keys)))), dtype=torch.long)
    with torch.no_grad():
        out = m(x, ctx, context_padding_mask=pm)
        out_q = m(x[:, qperm], ctx, context_padding_mask=pm)
        out_k = m(x, ctx[:, kperm], context_padding_mask=pm[:, kperm])
    torch.testing.assert_close(out_q, out[:, qperm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k, out, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- dropout


@given(cb=cross_batches(min_keys=1, max_keys=8))
def test_dropout_inactive_in_eval(cb: CrossBatch) -> None:
    torch.manual_seed(cb.seed)
    drop = CrossAttention(
        cb.dim, cb.context_dim, cb.num_heads, attn_drop=0.5, proj_drop=0.5, fused_attn=False
    )
    plain = CrossAttention(cb.dim, cb.context_dim, cb.num_heads, fused_attn=False)
    plain.load_state_dict(drop.state_dict())
    drop.eval()
    plain.eval()
    sa_drop = Attention(cb.dim, cb.num_heads, attn_drop=0.5, proj_drop=0.5).eval()
    sa_plain = Attention(cb.dim, cb.num_heads).eval()
    sa_plain.load_state_dict(sa_drop.state_dict())
    x, ctx, pm = cb.queries(), cb.context(), cb.context_padding_mask
    with torch.no_grad():
        a = drop(x, ctx, context_padding_mask=pm)
        assert torch.equal(a, drop(x, ctx, context_padding_mask=pm))
        assert torch.equal(a, plain(x, ctx, context_padding_mask=pm))
        s = sa_drop(x, padding_mask=cb.query_padding_mask)
        assert torch.equal(s, sa_drop(x, padding_mask=cb.query_padding_mask))
        assert torch.equal(s, sa_plain(x, padding_mask=cb.query_padding_mask))


def test_dropout_active_in_training() -> None:
    torch.manual_seed(0)
    m = CrossAttention(16, num_heads=2, attn_drop=0.5, proj_drop=0.5)
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    m.train()
    with torch.no_grad():
        train_out = m(x, ctx)
        m.eval()
        eval_out = m(x, ctx)
    assert not torch.allclose(train_out, eval_out)


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("fused", [False, True])
def test_attention_mask_checks(fused: bool) -> None:
    m = Attention(8, num_heads=2, fused_attn=fused)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="padding_mask"):
        m(x, padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        m(x, padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        m(x, padding_mask=torch.zeros(2, 5, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        m(x, padding_mask=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="padding_mask"):
        m(x, padding_mask=torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("fused", [False, True])
def test_cross_attention_mask_checks(fused: bool) -> None:
    m = CrossAttention(8, context_dim=4, num_heads=2, fused_attn=fused)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 4)
    # the key mask is checked against the keys, not the queries
    with pytest.raises(ValueError, match="context_padding_mask"):
        m(x, ctx, context_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="context_padding_mask"):
        m(x, ctx, context_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="context_padding_mask"):
        m(x, ctx, context_padding_mask=torch.zeros(2, 5))
