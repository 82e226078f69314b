"""Contract tests for ``Block`` and ``CrossAttentionBlock``.

Legend: ``B`` batch, ``N`` tokens, ``Nq`` queries, ``Nk`` keys, ``D`` width.
Every ``*padding_mask`` is True = padding.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
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
)
from torch import nn

from crossmae import Attention, Block, CrossAttention, CrossAttentionBlock, Mlp

FUSED = pytest.mark.parametrize("fused", [False, True], ids=["manual", "sdpa"])
KINDS = st.sampled_from(["random", "nan", "inf", "mixed"])


def make_block(pb: PaddedBatch, fused: bool, **kw: Any) -> Block:
    torch.manual_seed(pb.seed)
    kw.setdefault("qkv_bias", True)
    kw.setdefault("mlp_ratio", 2.0)
    block = Block(pb.dim, pb.num_heads, fused_attn=fused, **kw).eval()
    _randomize_norms(block)
    return block


def make_cab(cb: CrossBatch, fused: bool, self_attn: bool, **kw: Any) -> CrossAttentionBlock:
    torch.manual_seed(cb.seed)
    kw.setdefault("qkv_bias", True)
    kw.setdefault("mlp_ratio", 2.0)
    block = CrossAttentionBlock(
        cb.dim,
        cb.context_dim,
        cb.num_heads,
        self_attn=self_attn,
        fused_attn=fused,
        **kw,
    ).eval()
    _randomize_norms(block)
    return block


def _randomize_norms(module: nn.Module) -> None:
    """Give LayerNorms non-trivial affine parameters so the formula checks bite."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm) and sub.weight is not None:
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.uniform_(-0.5, 0.5)


def assert_finite_grads(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite grad in {name}"


def zero_padded(out: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
    return torch.where(pm[..., None], torch.zeros_like(out), out)


# ----------------------------------------------------------------------------- structure


def test_block_structure_and_defaults() -> None:
    b = Block(16, 4)
    children = dict(b.named_children())
    for name in ("norm1", "attn", "norm2", "mlp"):
        assert name in children, name
    assert isinstance(b.attn, Attention)
    assert isinstance(b.mlp, Mlp)
    assert isinstance(b.norm1, nn.LayerNorm) and isinstance(b.norm2, nn.LayerNorm)
    assert b.mlp.fc1.out_features == 64  # mlp_ratio 4.0
    assert isinstance(b.mlp.act, nn.GELU)
    assert b.attn.qkv.bias is None
    b2 = Block(
        16,
        2,
        mlp_ratio=1.5,
        qkv_bias=True,
        act_layer=nn.SiLU,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-3),
    )
    assert b2.mlp.fc1.out_features == 24
    assert isinstance(b2.mlp.act, nn.SiLU)
    assert b2.norm1.eps == 1e-3
    assert b2.attn.qkv.bias is not None


@pytest.mark.parametrize("self_attn", [False, True])
def test_cross_attention_block_structure(self_attn: bool) -> None:
    b = CrossAttentionBlock(16, 12, 4, self_attn=self_attn)
    children = dict(b.named_children())
    for name in ("norm1", "cross_attn", "norm2", "mlp"):
        assert name in children, name
    assert isinstance(b.cross_attn, CrossAttention)
    assert b.cross_attn.kv.in_features == 12
    assert b.cross_attn.q.in_features == 16
    assert b.mlp.fc1.out_features == 64
    param_names = {n for n, _ in b.named_parameters()}
    if self_attn:
        assert isinstance(children["self_attn"], Attention)
        assert isinstance(children["norm0"], nn.LayerNorm)
        assert any(n.startswith("self_attn.") for n in param_names)
        assert any(n.startswith("norm0.") for n in param_names)
    else:
        assert "self_attn" not in children and "norm0" not in children
        assert not any(n.startswith(("self_attn.", "norm0.")) for n in param_names)


def test_cross_attention_block_context_dim_default() -> None:
    b = CrossAttentionBlock(8, num_heads=2)
    assert b.cross_attn.kv.in_features == 8


# ----------------------------------------------------------------------------- formulas


@FUSED
@given(pb=padded_batches(max_len=12, max_batch=4))
def test_block_is_prenorm_residual(fused: bool, pb: PaddedBatch) -> None:
    b = make_block(pb, fused).double()
    x, pm = pb.tokens().double(), pb.padding_mask
    with torch.no_grad():
        out = b(x, padding_mask=pm)
        x1 = x + b.attn(b.norm1(x), padding_mask=pm)
        ref = x1 + b.mlp(b.norm2(x1))
        out_nomask = b(x)
        x1n = x + b.attn(b.norm1(x))
        ref_nomask = x1n + b.mlp(b.norm2(x1n))
    real = ~pm
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_nomask, ref_nomask, atol=1e-10, rtol=1e-10)


@FUSED
@pytest.mark.parametrize("self_attn", [False, True])
@given(cb=cross_batches(max_keys=12, max_queries=8, max_batch=4))
def test_cross_attention_block_is_prenorm_residual(
    fused: bool, self_attn: bool, cb: CrossBatch
) -> None:
    b = make_cab(cb, fused, self_attn).double()
    x, ctx = cb.queries(torch.float64), cb.context(torch.float64)
    qpm, cpm = cb.query_padding_mask, cb.context_padding_mask
    with torch.no_grad():
        out = b(x, ctx, context_padding_mask=cpm, query_padding_mask=qpm)
        h = x
        if self_attn:
            h = h + b.self_attn(b.norm0(h), padding_mask=qpm)
        h = h + b.cross_attn(b.norm1(h), ctx, context_padding_mask=cpm)  # context used as given
        ref = h + b.mlp(b.norm2(h))
    real = ~qpm
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=1e-10)


@FUSED
@given(cb=cross_batches(max_keys=12, max_queries=8))
def test_query_padding_mask_only_matters_for_self_attention(fused: bool, cb: CrossBatch) -> None:
    b = make_cab(cb, fused, self_attn=False)
    x, ctx, cpm = cb.queries(), cb.context(), cb.context_padding_mask
    with torch.no_grad():
        a = b(x, ctx, context_padding_mask=cpm)
        c = b(x, ctx, context_padding_mask=cpm, query_padding_mask=cb.query_padding_mask)
    real = ~cb.query_padding_mask
    assert_close_or_equal(c[real], a[real], exact=not fused)


@given(pb=padded_batches(max_len=10))
def test_block_drop_path_and_dropout_inactive_in_eval(pb: PaddedBatch) -> None:
    torch.manual_seed(pb.seed)
    noisy = Block(pb.dim, pb.num_heads, drop=0.5, attn_drop=0.5, drop_path=0.5)
    plain = Block(pb.dim, pb.num_heads)
    plain.load_state_dict(noisy.state_dict())
    noisy.eval()
    plain.eval()
    x, pm = pb.tokens(), pb.padding_mask
    with torch.no_grad():
        torch.testing.assert_close(noisy(x, padding_mask=pm), plain(x, padding_mask=pm))


# ----------------------------------------------------------------------------- padding


@FUSED
@given(pb=padded_batches(force_padding=True), kind=KINDS)
def test_block_padding_invariance(fused: bool, pb: PaddedBatch, kind: str) -> None:
    b = make_block(pb, fused)
    x, pm = pb.tokens(), pb.padding_mask
    with torch.no_grad():
        out = b(x, padding_mask=pm)
        out_bad = b(poison_padding(x, pm, pb.seed + 1, kind=kind), padding_mask=pm)
    real = ~pm
    assert torch.isfinite(out).all(), "outputs at padded positions must be finite"
    assert torch.isfinite(out_bad[real]).all()
    assert_close_or_equal(out_bad[real], out[real], exact=not fused)


@FUSED
@pytest.mark.parametrize("self_attn", [False, True])
@given(cb=cross_batches(), kind=KINDS)
def test_cross_attention_block_padding_invariance(
    fused: bool, self_attn: bool, cb: CrossBatch, kind: str
) -> None:
    b = make_cab(cb, fused, self_attn)
    x, ctx = cb.queries(), cb.context()
    qpm, cpm = cb.query_padding_mask, cb.context_padding_mask
    kw = {"context_padding_mask": cpm, "query_padding_mask": qpm}
    with torch.no_grad():
        out = b(x, ctx, **kw)
        out_bad = b(
            poison_padding(x, qpm, cb.seed + 2, kind=kind),
            poison_padding(ctx, cpm, cb.seed + 3, kind=kind),
            **kw,
        )
    real = ~qpm
    assert torch.isfinite(out).all(), "outputs at padded positions must be finite"
    assert torch.isfinite(out_bad[real]).all()
    assert_close_or_equal(out_bad[real], out[real], exact=not fused)


@FUSED
@given(pb=padded_batches(max_len=16), extra=st.integers(1, 6), kind=KINDS)
def test_block_appending_padded_tokens(fused: bool, pb: PaddedBatch, extra: int, kind: str) -> None:
    b = make_block(pb, fused)
    x, pm = pb.tokens(), pb.padding_mask
    x_ext = torch.cat([x, randn(pb.seed + 3, pb.batch, extra, pb.dim)], dim=1)
    pm_ext = torch.cat([pm, torch.ones(pb.batch, extra, dtype=torch.bool)], dim=1)
    x_ext = poison_padding(x_ext, pm_ext, pb.seed + 4, kind=kind)
    with torch.no_grad():
        out = b(x, padding_mask=pm)
        out_ext = b(x_ext, padding_mask=pm_ext)
    real = ~pm
    torch.testing.assert_close(out_ext[:, : pb.max_len][real], out[real], atol=1e-5, rtol=1e-5)


@FUSED
@pytest.mark.parametrize("self_attn", [False, True])
@given(cb=cross_batches(max_keys=16), extra=st.integers(1, 6), kind=KINDS)
def test_cross_attention_block_appending_padded_keys_and_queries(
    fused: bool, self_attn: bool, cb: CrossBatch, extra: int, kind: str
) -> None:
    b = make_cab(cb, fused, self_attn)
    x, ctx = cb.queries(), cb.context()
    qpm, cpm = cb.query_padding_mask, cb.context_padding_mask
    ones = torch.ones(cb.batch, extra, dtype=torch.bool)
    ctx_ext = torch.cat([ctx, randn(cb.seed + 3, cb.batch, extra, cb.context_dim)], dim=1)
    cpm_ext = torch.cat([cpm, ones], dim=1)
    ctx_ext = poison_padding(ctx_ext, cpm_ext, cb.seed + 4, kind=kind)
    x_ext = torch.cat([x, randn(cb.seed + 5, cb.batch, extra, cb.dim)], dim=1)
    qpm_ext = torch.cat([qpm, ones], dim=1)
    with torch.no_grad():
        out = b(x, ctx, context_padding_mask=cpm, query_padding_mask=qpm)
        out_ext = b(x_ext, ctx_ext, context_padding_mask=cpm_ext, query_padding_mask=qpm_ext)
    real = ~qpm
    torch.testing.assert_close(out_ext[:, : cb.num_queries][real], out[real], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- batch independence


@FUSED
@given(pb=padded_batches(min_batch=2, max_len=16), data=st.data())
def test_block_batch_independence(fused: bool, pb: PaddedBatch, data: st.DataObject) -> None:
    b = make_block(pb, fused)
    x, pm = pb.tokens(), pb.padding_mask
    j = data.draw(st.integers(0, pb.batch - 1))
    x2, pm2 = x.clone(), pm.clone()
    x2[j] = float("nan") if data.draw(st.booleans()) else 7.0
    pm2[j] = ~pm[j]
    with torch.no_grad():
        out = b(x, padding_mask=pm)
        out2 = b(x2, padding_mask=pm2)
        others = [i for i in range(pb.batch) if i != j]
        assert_close_or_equal(out2[others], out[others], exact=not fused)
        for i in range(pb.batch):
            real = ~pm[i]
            single = b(x[i : i + 1, real])
            torch.testing.assert_close(out[i, real], single[0], atol=1e-5, rtol=1e-5)


@FUSED
@pytest.mark.parametrize("self_attn", [False, True])
@given(cb=cross_batches(min_keys=0, max_keys=16, max_queries=8), data=st.data())
def test_cross_attention_block_batch_independence(
    fused: bool, self_attn: bool, cb: CrossBatch, data: st.DataObject
) -> None:
    b = make_cab(cb, fused, self_attn)
    x, ctx = cb.queries(), cb.context()
    qpm, cpm = cb.query_padding_mask, cb.context_padding_mask
    j = data.draw(st.integers(0, cb.batch - 1))
    x2, ctx2, qpm2, cpm2 = x.clone(), ctx.clone(), qpm.clone(), cpm.clone()
    x2[j] = 3.0
    ctx2[j] = float("nan") if data.draw(st.booleans()) else -4.0
    qpm2[j] = ~qpm[j]
    cpm2[j] = ~cpm[j]
    with torch.no_grad():
        out = b(x, ctx, context_padding_mask=cpm, query_padding_mask=qpm)
        out2 = b(x2, ctx2, context_padding_mask=cpm2, query_padding_mask=qpm2)
        others = [i for i in range(cb.batch) if i != j]
        assert_close_or_equal(out2[others], out[others], exact=not fused)
        for i in range(cb.batch):
            rq, rk = ~qpm[i], ~cpm[i]
            single = b(x[i : i + 1, rq], ctx[i : i + 1, rk])
            torch.testing.assert_close(out[i, rq], single[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- empty rows, grads


@FUSED
@given(pb=padded_batches(max_len=12), kind=KINDS, data=st.data())
def test_block_empty_samples_finite_grads(
    fused: bool, pb: PaddedBatch, kind: str, data: st.DataObject
) -> None:
    b = make_block(pb, fused)
    pm = pb.padding_mask.clone()
    empty = data.draw(st.lists(st.booleans(), min_size=pb.batch, max_size=pb.batch))
    pm[torch.tensor(empty)] = True
    x = poison_padding(pb.tokens(), pm, pb.seed + 1, kind=kind).requires_grad_(True)
    out = b(x, padding_mask=pm)
    real = ~pm
    assert torch.isfinite(out[real]).all()
    zero_padded(out, pm).square().sum().backward()
    assert_finite_grads(b)
    assert x.grad is not None and torch.isfinite(x.grad[real]).all()


@FUSED
@pytest.mark.parametrize("self_attn", [False, True])
@given(cb=cross_batches(max_keys=12, max_queries=6), kind=KINDS, data=st.data())
def test_cross_attention_block_zero_keys_finite_grads(
    fused: bool, self_attn: bool, cb: CrossBatch, kind: str, data: st.DataObject
) -> None:
    b = make_cab(cb, fused, self_attn)
    cpm = cb.context_padding_mask.clone()
    empty = data.draw(st.lists(st.booleans(), min_size=cb.batch, max_size=cb.batch))
    cpm[torch.tensor(empty)] = True
    qpm = cb.query_padding_mask
    ctx = poison_padding(cb.context(), cpm, cb.seed + 1, kind=kind).requires_grad_(True)
    x = cb.queries().requires_grad_(True)
    out = b(x, ctx, context_padding_mask=cpm, query_padding_mask=qpm)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert_finite_grads(b)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert ctx.grad is not None and torch.isfinite(ctx.grad[~cpm]).all()


@FUSED
@pytest.mark.parametrize("self_attn", [False, True])
def test_cross_attention_block_without_any_keys(fused: bool, self_attn: bool) -> None:
    torch.manual_seed(0)
    b = CrossAttentionBlock(8, 6, 2, self_attn=self_attn, fused_attn=fused)
    x = torch.randn(3, 4, 8, requires_grad=True)
    for nk in (0, 5):
        ctx = torch.full((3, nk, 6), float("nan"))
        out = b(x, ctx, context_padding_mask=torch.ones(3, nk, dtype=torch.bool))
        assert out.shape == (3, 4, 8) and torch.isfinite(out).all()
        out.sum().backward()
        assert_finite_grads(b)
    out0 = b(torch.randn(3, 0, 8), torch.randn(3, 5, 6))
    assert out0.shape == (3, 0, 8)


@FUSED
def test_block_zero_tokens(fused: bool) -> None:
    b = Block(8, 2, fused_attn=fused)
    x = torch.randn(2, 0, 8, requires_grad=True)
    out = b(x, padding_mask=torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert_finite_grads(b)


# ----------------------------------------------------------------------------- argument checks


def test_block_mask_checks() -> None:
    b = Block(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="padding_mask"):
        b(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        b(x, padding_mask=torch.zeros(2, 5))


def test_cross_attention_block_mask_checks() -> None:
    b = CrossAttentionBlock(8, 4, 2, self_attn=True)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="context_padding_mask"):
        b(x, ctx, context_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="context_padding_mask"):
        b(x, ctx, context_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="query_padding_mask"):
        b(x, ctx, query_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_padding_mask"):
        b(x, ctx, query_padding_mask=torch.zeros(2, 3))
