"""Bad and extreme inputs for the layers: attention, blocks, MLP, drop path, feature maps,
position embeddings and the fused-attention switch.

Every case is one public callable, one input and the outcome the standard requires (see
``reliability_helpers``): a ``ValueError``/``TypeError`` naming the argument and the value,
or a documented correct result. Modules are built tiny (width 8, 2 heads) with a fixed seed.

Legend: ``b`` batch, ``n`` query tokens, ``m`` key tokens, ``c`` width, ``h`` heads, ``d``
head dim. Polarity: ``*_padding_mask`` True = padding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reliability_helpers import (
    Case,
    Raises,
    Recorder,
    Returns,
    nan_in_sample_only,
    nc,
    pad_mask,
    randn,
    run_case,
    same_as,
    shape_is,
)
from torch import Tensor

import crossmae as cm

C = 8  # width
H = 2  # heads


def _seeded(factory: Any, *args: Any, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    module = factory(*args, **kwargs)
    return module.eval() if isinstance(module, torch.nn.Module) else module


def attn() -> cm.Attention:
    return _seeded(cm.Attention, C, H)


def xattn() -> cm.CrossAttention:
    return _seeded(cm.CrossAttention, C, context_dim=6, num_heads=H)


def block() -> cm.Block:
    return _seeded(cm.Block, C, H)


def xblock() -> cm.CrossAttentionBlock:
    return _seeded(cm.CrossAttentionBlock, C, context_dim=6, num_heads=H, self_attn=True)


def x3(b: int = 2, n: int = 3, c: int = C, seed: int = 0) -> Tensor:
    return randn(b, n, c, seed=seed)


def with_value(t: Tensor, index: tuple[int, ...], value: float) -> Tensor:
    out = t.clone()
    out[index] = value
    return out


PM = pad_mask([3, 1], 3)  # sample 0: 3 real tokens; sample 1: 1 real, 2 padded
CTX_PM = pad_mask([4, 2], 4)


def _module_cases() -> list[Case]:
    cases: list[Case] = []

    # ---------------------------------------------------------------- Attention
    A = "Attention"
    cases += [
        Case(A, "x of rank 2 [n, c]", lambda: attn()(randn(3, C)), Raises(("x",), ("(3, 8)",))),
        Case(A, "x with the wrong width", lambda: attn()(x3(c=5)), Raises(("x",), ("5",))),
        Case(A, "x int64 tokens", lambda: attn()(x3().long()), Raises(("x",), ("torch.int64",))),
        Case(A, "x a list, not a tensor", lambda: attn()(x3().tolist()), Raises(("x",), ("list",))),
        Case(
            A,
            "x float64 into a float32 module",
            lambda: attn()(x3().double()),
            Raises(("x",), ("torch.float64",)),
        ),
        Case(
            A,
            "padding_mask float (0/1) instead of bool",
            lambda: attn()(x3(), PM.float()),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            A,
            "padding_mask uint8",
            lambda: attn()(x3(), PM.to(torch.uint8)),
            Raises(("padding_mask",), ("torch.uint8",)),
        ),
        Case(
            A,
            "padding_mask with another batch size",
            lambda: attn()(x3(), pad_mask([3, 1, 2], 3)),
            Raises(("padding_mask",), ("(3, 3)",)),
        ),
        Case(
            A,
            "padding_mask with another length",
            lambda: attn()(x3(), pad_mask([3, 1], 4)),
            Raises(("padding_mask",), ("(2, 4)",)),
        ),
        Case(
            A,
            "padding_mask of rank 3 [b, n, 1]",
            lambda: attn()(x3(), PM[..., None]),
            Raises(("padding_mask",), ("(2, 3, 1)",)),
        ),
        Case(
            A,
            "empty batch (b=0)",
            lambda: attn()(x3(b=0)),
            Returns("[0, n, c], finite", shape_is(0, 3, C)),
        ),
        Case(
            A,
            "zero tokens (n=0)",
            lambda: attn()(x3(n=0), pad_mask([0, 0], 0)),
            Returns("[b, 0, c]", shape_is(2, 0, C)),
        ),
        Case(
            A,
            "a sample whose tokens are all padding",
            lambda: attn()(x3(), pad_mask([3, 0], 3)),
            Returns(
                "finite output for the empty sample; the other sample unchanged",
                same_as(lambda: torch.cat([attn()(x3()[:1]), attn()(x3()[1:], pad_mask([0], 3))])),
            ),
        ),
        Case(
            A,
            "NaN in a real token of sample 0",
            lambda: attn()(with_value(x3(), (0, 1, 0), float("nan")), PM),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            A,
            "NaN/inf stored in padded slots",
            lambda: attn()(
                with_value(with_value(x3(), (1, 1, 0), float("nan")), (1, 2, 3), float("inf")), PM
            )[1, :1],
            Returns(
                "real outputs unchanged (padding invariance)",
                same_as(lambda: attn()(x3(), PM)[1, :1]),
            ),
        ),
        Case(
            A,
            "non-contiguous x and padding_mask",
            lambda: attn()(nc(x3()), nc(PM)),
            Returns("same result as contiguous", same_as(lambda: attn()(x3(), PM))),
        ),
        Case(
            A,
            "num_heads not dividing dim",
            lambda: cm.Attention(8, 3),
            Raises(("dim", "num_heads"), ("3",)),
        ),
        Case(A, "num_heads=0", lambda: cm.Attention(8, 0), Raises(("num_heads",), ("0",))),
        Case(
            A,
            "attn_drop=1.0 (outside [0, 1))",
            lambda: cm.Attention(8, 2, attn_drop=1.0),
            Raises(("attn_drop",), ("1.0",)),
        ),
        Case(
            A,
            "proj_drop=-0.1",
            lambda: cm.Attention(8, 2, proj_drop=-0.1),
            Raises(("proj_drop",), ("-0.1",)),
        ),
    ]

    # ---------------------------------------------------------------- CrossAttention
    X = "CrossAttention"
    ctx = lambda b=2, m=4, c=6, seed=1: randn(b, m, c, seed=seed)  # noqa: E731
    cases += [
        Case(
            X,
            "context with the wrong width",
            lambda: xattn()(x3(), ctx(c=8)),
            Raises(("context",), ("8",)),
        ),
        Case(
            X,
            "context of rank 2",
            lambda: xattn()(x3(), randn(4, 6)),
            Raises(("context",), ("(4, 6)",)),
        ),
        Case(
            X,
            "context int64",
            lambda: xattn()(x3(), ctx().long()),
            Raises(("context",), ("torch.int64",)),
        ),
        Case(
            X,
            "x and context with different batch sizes",
            lambda: xattn()(x3(), ctx(b=3)),
            Raises((("x", "context"),), ("(3, 4, 6)",)),
        ),
        Case(X, "x with the wrong width", lambda: xattn()(x3(c=6), ctx()), Raises(("x",), ("6",))),
        Case(
            X,
            "context_padding_mask float",
            lambda: xattn()(x3(), ctx(), CTX_PM.float()),
            Raises(("context_padding_mask",), ("torch.float32",)),
        ),
        Case(
            X,
            "context_padding_mask sized like the queries",
            lambda: xattn()(x3(), ctx(), PM),
            Raises(("context_padding_mask",), ("(2, 3)",)),
        ),
        Case(
            X,
            "context float64 into a float32 module",
            lambda: xattn()(x3(), ctx().double()),
            Raises(("context",), ("torch.float64",)),
        ),
        Case(
            X,
            "empty batch (b=0)",
            lambda: xattn()(x3(b=0), ctx(b=0)),
            Returns("[0, n, c]", shape_is(0, 3, C)),
        ),
        Case(
            X,
            "zero queries (n=0)",
            lambda: xattn()(x3(n=0), ctx()),
            Returns("[b, 0, c]", shape_is(2, 0, C)),
        ),
        Case(
            X,
            "zero keys (m=0)",
            lambda: xattn()(x3(), ctx(m=0), pad_mask([0, 0], 0)),
            Returns("finite [b, n, c] (attention part exactly 0)", shape_is(2, 3, C)),
        ),
        Case(
            X,
            "a sample with every key padded",
            lambda: xattn()(x3(), ctx(), pad_mask([4, 0], 4)),
            Returns(
                "finite; the empty sample gets proj(0) = proj.bias",
                lambda r: torch.testing.assert_close(r[1], xattn().proj.bias.expand(3, C).detach()),
            ),
        ),
        Case(
            X,
            "NaN in a real context token of sample 0",
            lambda: xattn()(x3(), with_value(ctx(), (0, 0, 0), float("nan")), CTX_PM),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            X,
            "NaN/inf in padded context slots",
            lambda: xattn()(
                x3(),
                with_value(with_value(ctx(), (1, 3, 0), float("nan")), (1, 2, 1), float("-inf")),
                CTX_PM,
            ),
            Returns(
                "unchanged (padding invariance)", same_as(lambda: xattn()(x3(), ctx(), CTX_PM))
            ),
        ),
        Case(
            X,
            "non-contiguous x, context and mask",
            lambda: xattn()(nc(x3()), nc(ctx()), nc(CTX_PM)),
            Returns("same result as contiguous", same_as(lambda: xattn()(x3(), ctx(), CTX_PM))),
        ),
        Case(
            X,
            "context_dim=0",
            lambda: cm.CrossAttention(8, context_dim=0, num_heads=2),
            Raises(("context_dim",), ("0",)),
        ),
    ]

    # ---------------------------------------------------------------- Block
    B = "Block"
    cases += [
        Case(B, "x with the wrong width", lambda: block()(x3(c=5)), Raises(("x",), ("5",))),
        Case(B, "x int64 tokens", lambda: block()(x3().long()), Raises(("x",), ("torch.int64",))),
        Case(B, "x of rank 2", lambda: block()(randn(3, C)), Raises(("x",), ("(3, 8)",))),
        Case(
            B,
            "x a list, with a padding_mask",
            lambda: block()(x3().tolist(), PM),
            Raises(("x",), ("list",)),
        ),
        Case(
            B,
            "x float64 into a float32 module",
            lambda: block()(x3().double()),
            Raises(("x",), ("torch.float64",)),
        ),
        Case(
            B,
            "padding_mask float",
            lambda: block()(x3(), PM.float()),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            B,
            "padding_mask with another length",
            lambda: block()(x3(), pad_mask([3, 1], 5)),
            Raises(("padding_mask",), ("(2, 5)",)),
        ),
        Case(
            B,
            "empty batch (b=0)",
            lambda: block()(x3(b=0)),
            Returns("[0, n, c]", shape_is(0, 3, C)),
        ),
        Case(
            B,
            "zero tokens (n=0)",
            lambda: block()(x3(n=0), pad_mask([0, 0], 0)),
            Returns("[b, 0, c]", shape_is(2, 0, C)),
        ),
        Case(
            B,
            "a sample whose tokens are all padding",
            lambda: block()(x3(), pad_mask([3, 0], 3)),
            Returns("finite"),
        ),
        Case(
            B,
            "NaN in a real token of sample 0",
            lambda: block()(with_value(x3(), (0, 0, 0), float("nan")), PM),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            B,
            "NaN/inf in padded slots",
            lambda: block()(with_value(x3(), (1, 2, 0), float("nan")), PM)[1, :1],
            Returns("real outputs unchanged", same_as(lambda: block()(x3(), PM)[1, :1])),
        ),
        Case(
            B,
            "non-contiguous x and padding_mask",
            lambda: block()(nc(x3()), nc(PM)),
            Returns("same result as contiguous", same_as(lambda: block()(x3(), PM))),
        ),
        Case(
            B,
            "mlp_ratio=0",
            lambda: cm.Block(8, 2, mlp_ratio=0.0),
            Raises(("mlp_ratio",), ("0.0",)),
        ),
        Case(
            B,
            "drop_path=1.0",
            lambda: cm.Block(8, 2, drop_path=1.0),
            Raises(("drop_path",), ("1.0",)),
        ),
    ]

    # ---------------------------------------------------------------- CrossAttentionBlock
    XB = "CrossAttentionBlock"
    cases += [
        Case(
            XB, "x with the wrong width", lambda: xblock()(x3(c=5), ctx()), Raises(("x",), ("5",))
        ),
        Case(XB, "x int64", lambda: xblock()(x3().long(), ctx()), Raises(("x",), ("torch.int64",))),
        Case(
            XB,
            "context with the wrong width",
            lambda: xblock()(x3(), ctx(c=8)),
            Raises(("context",), ("8",)),
        ),
        Case(
            XB,
            "x and context with different batch sizes",
            lambda: xblock()(x3(), ctx(b=3)),
            Raises((("x", "context"),), ("(3, 4, 6)",)),
        ),
        Case(
            XB,
            "query_padding_mask float",
            lambda: xblock()(x3(), ctx(), None, PM.float()),
            Raises(("query_padding_mask",), ("torch.float32",)),
        ),
        Case(
            XB,
            "query_padding_mask sized like the context",
            lambda: xblock()(x3(), ctx(), None, CTX_PM),
            Raises(("query_padding_mask",), ("(2, 4)",)),
        ),
        Case(
            XB,
            "context_padding_mask sized like the queries",
            lambda: xblock()(x3(), ctx(), PM),
            Raises(("context_padding_mask",), ("(2, 3)",)),
        ),
        Case(
            XB,
            "empty batch (b=0)",
            lambda: xblock()(x3(b=0), ctx(b=0)),
            Returns("[0, n, c]", shape_is(0, 3, C)),
        ),
        Case(
            XB,
            "zero queries and zero keys",
            lambda: xblock()(x3(n=0), ctx(m=0), pad_mask([0, 0], 0), pad_mask([0, 0], 0)),
            Returns("[b, 0, c]", shape_is(2, 0, C)),
        ),
        Case(
            XB,
            "every key and every query of sample 1 padded",
            lambda: xblock()(x3(), ctx(), pad_mask([4, 0], 4), pad_mask([3, 0], 3)),
            Returns("finite"),
        ),
        Case(
            XB,
            "NaN in a real query of sample 0",
            lambda: xblock()(with_value(x3(), (0, 0, 0), float("nan")), ctx(), CTX_PM, PM),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            XB,
            "NaN in padded queries and keys",
            lambda: xblock()(
                with_value(x3(), (1, 2, 0), float("nan")),
                with_value(ctx(), (1, 3, 0), float("nan")),
                CTX_PM,
                PM,
            )[1, :1],
            Returns(
                "real outputs unchanged", same_as(lambda: xblock()(x3(), ctx(), CTX_PM, PM)[1, :1])
            ),
        ),
        Case(
            XB,
            "non-contiguous inputs",
            lambda: xblock()(nc(x3()), nc(ctx()), nc(CTX_PM), nc(PM)),
            Returns(
                "same result as contiguous", same_as(lambda: xblock()(x3(), ctx(), CTX_PM, PM))
            ),
        ),
        Case(
            XB,
            "num_heads=3 with dim=8",
            lambda: cm.CrossAttentionBlock(8, num_heads=3),
            Raises(("dim", "num_heads"), ("3",)),
        ),
    ]

    # ---------------------------------------------------------------- padded_attention
    P = "padded_attention"
    q = lambda b=2, n=3, d=4, seed=0: randn(b, H, n, d, seed=seed)  # noqa: E731
    kv = lambda b=2, m=4, d=4, seed=1: randn(b, H, m, d, seed=seed)  # noqa: E731
    cases += [
        Case(
            P,
            "q of rank 3",
            lambda: cm.padded_attention(randn(2, 3, 4), kv(), kv()),
            Raises(("q",), ("(2, 3, 4)",)),
        ),
        Case(
            P,
            "k int64",
            lambda: cm.padded_attention(q(), kv().long(), kv()),
            Raises(("k",), ("torch.int64",)),
        ),
        Case(
            P,
            "q and k with different batch sizes",
            lambda: cm.padded_attention(q(b=3), kv(), kv()),
            Raises(("q", "k"), ("(3, 2, 3, 4)",)),
        ),
        Case(
            P,
            "q and k with different head dims",
            lambda: cm.padded_attention(q(d=2), kv(), kv()),
            Raises(("q", "k"), ("2",)),
        ),
        Case(
            P,
            "k and v with different lengths",
            lambda: cm.padded_attention(q(), kv(), kv(m=5)),
            Raises(("k", "v"), ("(2, 2, 5, 4)",)),
        ),
        Case(
            P,
            "k float64 while q, v float32",
            lambda: cm.padded_attention(q(), kv().double(), kv()),
            Raises(("k",), ("torch.float64",)),
        ),
        Case(
            P,
            "key_padding_mask float",
            lambda: cm.padded_attention(q(), kv(), kv(), CTX_PM.float()),
            Raises(("key_padding_mask",), ("torch.float32",)),
        ),
        Case(
            P,
            "key_padding_mask with the query length",
            lambda: cm.padded_attention(q(), kv(), kv(), PM),
            Raises(("key_padding_mask",), ("(2, 3)",)),
        ),
        Case(
            P,
            "dropout_p=1.0",
            lambda: cm.padded_attention(q(), kv(), kv(), dropout_p=1.0),
            Raises(("dropout_p",), ("1.0",)),
        ),
        Case(
            P,
            "dropout_p=nan",
            lambda: cm.padded_attention(q(), kv(), kv(), dropout_p=float("nan")),
            Raises(("dropout_p",), ("nan",)),
        ),
        Case(
            P,
            "every key of sample 1 padded",
            lambda: cm.padded_attention(q(), kv(), kv(), pad_mask([4, 0], 4))[1],
            Returns(
                "exactly 0 for the empty sample (documented)",
                lambda r: torch.testing.assert_close(r, torch.zeros_like(r)),
            ),
        ),
        Case(
            P,
            "NaN/inf in padded keys and values",
            lambda: cm.padded_attention(
                q(),
                with_value(kv(), (1, 0, 3, 0), float("nan")),
                with_value(kv(seed=2), (1, 1, 2, 0), float("inf")),
                CTX_PM,
            ),
            Returns(
                "unchanged (padded keys zeroed first)",
                same_as(lambda: cm.padded_attention(q(), kv(), kv(seed=2), CTX_PM)),
            ),
        ),
        Case(
            P,
            "NaN in a real key of sample 0",
            lambda: cm.padded_attention(
                q(), with_value(kv(), (0, 0, 0, 0), float("nan")), kv(seed=2), CTX_PM
            ),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            P,
            "empty batch (b=0)",
            lambda: cm.padded_attention(q(b=0), kv(b=0), kv(b=0)),
            Returns("[0, h, n, d]", shape_is(0, H, 3, 4)),
        ),
        Case(
            P,
            "zero keys (m=0) with a mask",
            lambda: cm.padded_attention(q(), kv(m=0), kv(m=0), pad_mask([0, 0], 0)),
            Returns("zeros [b, h, n, d]", shape_is(2, H, 3, 4)),
        ),
        Case(
            P,
            "non-contiguous q, k, v, mask",
            lambda: cm.padded_attention(nc(q()), nc(kv()), nc(kv(seed=2)), nc(CTX_PM)),
            Returns(
                "same result as contiguous",
                same_as(lambda: cm.padded_attention(q(), kv(), kv(seed=2), CTX_PM)),
            ),
        ),
        Case(
            P,
            "fused=False (explicit softmax) vs fused=True",
            lambda: cm.padded_attention(q(), kv(), kv(seed=2), CTX_PM, fused=False),
            Returns(
                "same result as the fused path",
                same_as(lambda: cm.padded_attention(q(), kv(), kv(seed=2), CTX_PM, fused=True)),
            ),
        ),
    ]

    # ---------------------------------------------------------------- Mlp
    M = "Mlp"
    mlp = lambda: _seeded(cm.Mlp, C, 16)  # noqa: E731
    cases += [
        Case(M, "x with the wrong width", lambda: mlp()(x3(c=5)), Raises(("x",), ("5",))),
        Case(M, "x int64", lambda: mlp()(x3().long()), Raises(("x",), ("torch.int64",))),
        Case(
            M,
            "x of rank 1 [c]",
            lambda: mlp()(randn(C)),
            Returns("[out_features] (any leading dims)", shape_is(C)),
        ),
        Case(
            M, "empty batch (b=0)", lambda: mlp()(x3(b=0)), Returns("[0, n, c]", shape_is(0, 3, C))
        ),
        Case(
            M,
            "NaN in sample 0",
            lambda: mlp()(with_value(x3(), (0, 0, 0), float("nan"))),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            M,
            "non-contiguous x",
            lambda: mlp()(nc(x3())),
            Returns("same result as contiguous", same_as(lambda: mlp()(x3()))),
        ),
        Case(M, "in_features=0", lambda: cm.Mlp(0), Raises(("in_features",), ("0",))),
        Case(M, "hidden_features=-1", lambda: cm.Mlp(4, -1), Raises(("hidden_features",), ("-1",))),
        Case(M, "drop=1.0", lambda: cm.Mlp(4, drop=1.0), Raises(("drop",), ("1.0",))),
    ]

    # ---------------------------------------------------------------- drop_path / DropPath
    D = "drop_path"
    cases += [
        Case(
            D,
            "drop_prob=1.0",
            lambda: cm.drop_path(x3(), 1.0, True),
            Raises(("drop_prob",), ("1.0",)),
        ),
        Case(
            D,
            "drop_prob=-0.1",
            lambda: cm.drop_path(x3(), -0.1, True),
            Raises(("drop_prob",), ("-0.1",)),
        ),
        Case(
            D,
            "drop_prob a string",
            lambda: cm.drop_path(x3(), "0.5", True),
            Raises(("drop_prob",), ("'0.5'",)),
        ),
        Case(
            D,
            "x int64 while training",
            lambda: cm.drop_path(x3().long(), 0.5, True),
            Raises(("x",), ("torch.int64",)),
        ),
        Case(
            D,
            "x a list while training",
            lambda: cm.drop_path(x3().tolist(), 0.5, True),
            Raises(("x",), ("list",)),
        ),
        Case(
            D,
            "empty batch (b=0) while training",
            lambda: cm.drop_path(x3(b=0), 0.5, True),
            Returns("[0, n, c]", shape_is(0, 3, C)),
        ),
        Case(
            D,
            "training=False",
            lambda: cm.drop_path(x3(), 0.5, False),
            Returns("identity", same_as(lambda: x3())),
        ),
        Case(
            D,
            "non-contiguous x while training",
            lambda: (torch.manual_seed(3), cm.drop_path(nc(x3()), 0.5, True))[1],
            Returns(
                "same result as contiguous (same seed)",
                same_as(lambda: (torch.manual_seed(3), cm.drop_path(x3(), 0.5, True))[1]),
            ),
        ),
    ]
    DP = "DropPath"
    cases += [
        Case(DP, "drop_prob=1.0", lambda: cm.DropPath(1.0), Raises(("drop_prob",), ("1.0",))),
        Case(
            DP, "drop_prob=nan", lambda: cm.DropPath(float("nan")), Raises(("drop_prob",), ("nan",))
        ),
        Case(
            DP,
            "eval mode",
            lambda: cm.DropPath(0.5).eval()(x3()),
            Returns("identity", same_as(lambda: x3())),
        ),
        Case(
            DP,
            "empty batch (b=0) in training",
            lambda: cm.DropPath(0.5).train()(x3(b=0)),
            Returns("[0, n, c]", shape_is(0, 3, C)),
        ),
    ]

    # ---------------------------------------------------------------- StackedLayerNorm
    S = "StackedLayerNorm"
    sln = lambda: _seeded(cm.StackedLayerNorm, 2, C)  # noqa: E731
    x4 = lambda b=2, n=3: randn(2, b, n, C)  # noqa: E731
    cases += [
        Case(
            S,
            "x with the wrong stack size",
            lambda: sln()(randn(3, 2, 3, C)),
            Raises(("x",), ("(3, 2, 3, 8)",)),
        ),
        Case(
            S,
            "x with the wrong width",
            lambda: sln()(randn(2, 2, 3, 5)),
            Raises(("x",), ("(2, 2, 3, 5)",)),
        ),
        Case(S, "x int64", lambda: sln()(x4().long()), Raises(("x",), ("torch.int64",))),
        Case(S, "x a list", lambda: sln()(x4().tolist()), Raises(("x",), ("list",))),
        Case(
            S,
            "empty batch (b=0)",
            lambda: sln()(x4(b=0)),
            Returns("[num, 0, n, c]", shape_is(2, 0, 3, C)),
        ),
        Case(
            S,
            "NaN in one token",
            lambda: sln()(with_value(x4(), (0, 0, 0, 0), float("nan")))[0, :, 0],
            Returns("NaN propagates to that token only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            S,
            "non-contiguous x",
            lambda: sln()(nc(x4())),
            Returns("same result as contiguous", same_as(lambda: sln()(x4()))),
        ),
        Case(S, "num=0", lambda: cm.StackedLayerNorm(0, 4), Raises(("num",), ("0",))),
    ]

    # ---------------------------------------------------------------- WeightedFeatureMaps
    W = "WeightedFeatureMaps"
    wfm = lambda: _seeded(cm.WeightedFeatureMaps, 3, 2)  # noqa: E731
    f4 = lambda k=3, b=2, n=3: randn(k, b, n, C)  # noqa: E731
    cases += [
        Case(
            W,
            "a list with too few maps",
            lambda: wfm()([x3(), x3()]),
            Raises(("features",), ("2",)),
        ),
        Case(
            W,
            "a stacked tensor with the wrong map count",
            lambda: wfm()(f4(k=4)),
            Raises(("features",), ("(4, 2, 3, 8)",)),
        ),
        Case(
            W,
            "maps of different shapes",
            lambda: wfm()([x3(), x3(n=4), x3()]),
            Raises(("features",), ("(2, 4, 8)",)),
        ),
        Case(
            W,
            "a list holding a non-tensor",
            lambda: wfm()([x3(), "x", x3()]),
            Raises(("features",), ("str",)),
        ),
        Case(
            W, "int64 features", lambda: wfm()(f4().long()), Raises(("features",), ("torch.int64",))
        ),
        Case(W, "features a dict", lambda: wfm()({"a": x3()}), Raises(("features",), ("dict",))),
        Case(
            W,
            "empty batch (b=0)",
            lambda: wfm()(f4(b=0)),
            Returns("[o, 0, n, c]", shape_is(2, 0, 3, C)),
        ),
        Case(
            W,
            "zero tokens (n=0)",
            lambda: wfm()(f4(n=0)),
            Returns("[o, b, 0, c]", shape_is(2, 2, 0, C)),
        ),
        Case(
            W,
            "NaN in one token of one map",
            lambda: wfm()(with_value(f4(), (1, 0, 0, 0), float("nan")))[:, 0, 0].transpose(0, 1),
            Returns(
                "NaN propagates to that token in every output only",
                nan_in_sample_only(0),
                finite=False,
            ),
        ),
        Case(
            W,
            "non-contiguous stacked features",
            lambda: wfm()(nc(f4())),
            Returns("same result as contiguous", same_as(lambda: wfm()(f4()))),
        ),
        Case(
            W, "num_inputs=0", lambda: cm.WeightedFeatureMaps(0, 2), Raises(("num_inputs",), ("0",))
        ),
    ]
    return cases


def _pos_cases() -> list[Case]:
    cases: list[Case] = []
    P1 = "sincos_pos_embed_1d"
    cases += [
        Case(P1, "dim odd", lambda: cm.sincos_pos_embed_1d(5, 3), Raises(("dim",), ("5",))),
        Case(P1, "dim=0", lambda: cm.sincos_pos_embed_1d(0, 3), Raises(("dim",), ("0",))),
        Case(P1, "dim a float", lambda: cm.sincos_pos_embed_1d(4.0, 3), Raises(("dim",), ("4.0",))),
        Case(
            P1,
            "positions negative int",
            lambda: cm.sincos_pos_embed_1d(4, -1),
            Raises(("positions",), ("-1",)),
        ),
        Case(
            P1,
            "positions bool tensor",
            lambda: cm.sincos_pos_embed_1d(4, torch.ones(3, dtype=torch.bool)),
            Raises(("positions",), ("torch.bool",)),
        ),
        Case(
            P1,
            "positions a 0-d tensor",
            lambda: cm.sincos_pos_embed_1d(4, torch.tensor(2.0)),
            Raises(("positions",), ("scalar",)),
        ),
        Case(
            P1,
            "positions a list",
            lambda: cm.sincos_pos_embed_1d(4, [0, 1]),
            Raises(("positions",), ("list",)),
        ),
        Case(
            P1,
            "positions=0 (no tokens)",
            lambda: cm.sincos_pos_embed_1d(4, 0),
            Returns("[0, dim]", shape_is(0, 4)),
        ),
        Case(
            P1,
            "positions [0] empty tensor",
            lambda: cm.sincos_pos_embed_1d(4, torch.zeros(0)),
            Returns("[0, dim]", shape_is(0, 4)),
        ),
        Case(
            P1,
            "positions 1e30",
            lambda: cm.sincos_pos_embed_1d(4, torch.tensor([1e30])),
            Returns("finite (sin/cos of any finite value)"),
        ),
        Case(
            P1,
            "NaN position",
            lambda: cm.sincos_pos_embed_1d(4, torch.tensor([0.0, float("nan")])),
            Returns("NaN propagates to that row only", nan_in_sample_only(1), finite=False),
        ),
        Case(
            P1,
            "non-contiguous positions [b, n]",
            lambda: cm.sincos_pos_embed_1d(8, nc(rand_pos())),
            Returns(
                "same result as contiguous", same_as(lambda: cm.sincos_pos_embed_1d(8, rand_pos()))
            ),
        ),
        Case(
            P1,
            "dtype=torch.int64 output",
            lambda: cm.sincos_pos_embed_1d(4, 3, dtype=torch.int64),
            Raises(("dtype",), ("torch.int64",)),
        ),
    ]
    P2 = "sincos_pos_embed_2d"
    cases += [
        Case(
            P2,
            "dim not a multiple of 4",
            lambda: cm.sincos_pos_embed_2d(6, 2),
            Raises(("dim",), ("6",)),
        ),
        Case(
            P2, "grid_size=0", lambda: cm.sincos_pos_embed_2d(8, 0), Raises(("grid_size",), ("0",))
        ),
        Case(
            P2,
            "grid_size (2, 0)",
            lambda: cm.sincos_pos_embed_2d(8, (2, 0)),
            Raises(("grid_size",), ("0",)),
        ),
        Case(
            P2,
            "grid_size a triple",
            lambda: cm.sincos_pos_embed_2d(8, (2, 3, 4)),
            Raises(("grid_size",), ("(2, 3, 4)",)),
        ),
        Case(
            P2,
            "grid_size a float",
            lambda: cm.sincos_pos_embed_2d(8, 2.5),
            Raises(("grid_size",), ("2.5",)),
        ),
        Case(
            P2,
            "grid_size (2, True)",
            lambda: cm.sincos_pos_embed_2d(8, (2, True)),
            Raises(("grid_size",), ("True",)),
        ),
        Case(
            P2,
            "rectangular grid (2, 3)",
            lambda: cm.sincos_pos_embed_2d(8, (2, 3)),
            Returns("[6, dim]", shape_is(6, 8)),
        ),
    ]
    P3 = "sincos_pos_embed_2d_from_coords"
    coords = lambda: torch.tensor([[0, 1], [2, 3], [1, 1]], dtype=torch.float32)  # noqa: E731
    cases += [
        Case(
            P3,
            "coords [n, 3]",
            lambda: cm.sincos_pos_embed_2d_from_coords(8, torch.zeros(3, 3)),
            Raises(("coords",), ("(3, 3)",)),
        ),
        Case(
            P3,
            "coords of rank 1",
            lambda: cm.sincos_pos_embed_2d_from_coords(8, torch.zeros(2)),
            Raises(("coords",), ("(2,)",)),
        ),
        Case(
            P3,
            "coords bool",
            lambda: cm.sincos_pos_embed_2d_from_coords(8, torch.zeros(3, 2, dtype=torch.bool)),
            Raises(("coords",), ("torch.bool",)),
        ),
        Case(
            P3,
            "dim=6",
            lambda: cm.sincos_pos_embed_2d_from_coords(6, coords()),
            Raises(("dim",), ("6",)),
        ),
        Case(
            P3,
            "zero coordinates [0, 2]",
            lambda: cm.sincos_pos_embed_2d_from_coords(8, torch.zeros(0, 2)),
            Returns("[0, dim]", shape_is(0, 8)),
        ),
        Case(
            P3,
            "NaN coordinate",
            lambda: cm.sincos_pos_embed_2d_from_coords(
                8, with_value(coords(), (1, 0), float("nan"))
            )[[1, 0, 2]],
            Returns("NaN propagates to that row only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            P3,
            "non-contiguous coords",
            lambda: cm.sincos_pos_embed_2d_from_coords(8, nc(coords())),
            Returns(
                "same result as contiguous",
                same_as(lambda: cm.sincos_pos_embed_2d_from_coords(8, coords())),
            ),
        ),
    ]
    F = "set_fused_attn"
    cases += [
        Case(F, "enable a string", lambda: cm.set_fused_attn("no"), Raises(("enable",), ("'no'",))),
        Case(F, "enable=1 (int)", lambda: cm.set_fused_attn(1), Raises(("enable",), ("1",))),
    ]
    cases += [
        Case(
            "use_fused_attn",
            "no arguments",
            lambda: cm.use_fused_attn(),
            Returns("a bool", lambda r: isinstance(r, bool) or _fail("not a bool")),
        ),
    ]
    F = "set_padded_attention_kernel"
    cases += [
        Case(F, "kernel=1 (int)", lambda: cm.set_padded_attention_kernel(1), Raises(("kernel",), ("1",))),
        Case(F, "kernel an unknown name", lambda: cm.set_padded_attention_kernel("fast"), Raises(("kernel",), ("'fast'",))),
        Case(F, "kernel in capitals", lambda: cm.set_padded_attention_kernel("AUTO"), Raises(("kernel",), ("'AUTO'",))),
        Case(
            "padded_attention_kernel",
            "no arguments",
            lambda: cm.padded_attention_kernel(),
            Returns(
                "one of PADDED_ATTENTION_KERNELS",
                lambda r: r in cm.PADDED_ATTENTION_KERNELS or _fail(f"{r!r}"),
            ),
        ),
    ]  # fmt: skip
    return cases


def _packing_cases() -> list[Case]:
    """pack_tokens / unpack_tokens / packed_attention and the encoder's packed path."""
    x = lambda b=2, n=4, c=C: randn(b, n, c, seed=8)  # noqa: E731
    pm = pad_mask([4, 2], 4)  # 6 real tokens
    pk = lambda cap=8: cm.pack_tokens(x(), pm, cap)  # noqa: E731
    qkv = lambda t=8, seed=0: randn(t, H, 4, seed=seed)  # noqa: E731
    cu = lambda: pk().cu_seqlens  # noqa: E731

    def attn_p(**kw: Any) -> Tensor:
        cu_ = kw.pop("cu", None)
        return cm.packed_attention(
            qkv(), qkv(seed=1), qkv(seed=2), cu() if cu_ is None else cu_, kw.pop("max_seqlen", 4)
        )

    def enc() -> cm.TransformerEncoder:
        torch.manual_seed(0)
        return cm.TransformerEncoder(C, 2, H).eval()

    PT, UT, PA, E = "pack_tokens", "unpack_tokens", "packed_attention", "TransformerEncoder"
    return [
        Case(
            PT,
            "capacity smaller than the real tokens",
            lambda: cm.pack_tokens(x(), pm, 5),
            Raises(("capacity",), ("5",)),
        ),
        Case(
            PT, "capacity=-1", lambda: cm.pack_tokens(x(), pm, -1), Raises(("capacity",), ("-1",))
        ),
        Case(
            PT,
            "capacity a float",
            lambda: cm.pack_tokens(x(), pm, 8.0),
            Raises(("capacity",), ("8.0",)),
        ),
        Case(
            PT,
            "padding_mask None",
            lambda: cm.pack_tokens(x(), None, 8),
            Raises(("padding_mask",), ("None",)),
        ),
        Case(
            PT,
            "padding_mask float",
            lambda: cm.pack_tokens(x(), pm.float(), 8),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            PT,
            "padding_mask of another length",
            lambda: cm.pack_tokens(x(), pad_mask([4, 2], 5), 8),
            Raises(("padding_mask",), ("(2, 5)",)),
        ),
        Case(
            PT,
            "x int64",
            lambda: cm.pack_tokens(x().long(), pm, 8),
            Raises(("x",), ("torch.int64",)),
        ),
        Case(PT, "x of rank 2", lambda: cm.pack_tokens(x()[0], pm, 8), Raises(("x",), ("(4, 8)",))),
        Case(
            PT,
            "empty batch (b=0)",
            lambda: cm.pack_tokens(x(b=0), pad_mask([], 4), 4),
            Returns(
                "zero slack rows [t, c]",
                lambda r: _check(
                    tuple(r.tokens.shape) == (4, C) and bool(r.row_padding_mask.all()),
                    str(r.tokens.shape),
                ),
            ),
        ),
        Case(
            PT,
            "zero tokens (n=0), capacity 0",
            lambda: cm.pack_tokens(x(n=0), pad_mask([0, 0], 0), 0),
            Returns(
                "empty [0, c]",
                lambda r: _check(tuple(r.tokens.shape) == (0, C), str(r.tokens.shape)),
            ),
        ),
        Case(
            PT,
            "NaN/inf in padded slots",
            lambda: cm.pack_tokens(
                with_value(with_value(x(), (1, 3, 0), float("nan")), (1, 2, 1), float("inf")), pm, 8
            ),
            Returns("finite, unchanged (padding never read)", same_as(pk)),
        ),
        Case(
            PT,
            "NaN in a real token",
            lambda: cm.pack_tokens(with_value(x(), (1, 0, 0), float("nan")), pm, 8).tokens[4:],
            Returns("NaN propagates to that row only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            PT,
            "non-contiguous x and mask",
            lambda: cm.pack_tokens(nc(x()), nc(pm), 8),
            Returns("same as contiguous", same_as(pk)),
        ),
        Case(
            UT,
            "values with the wrong row count",
            lambda: cm.unpack_tokens(pk().tokens[:5], pk(), 2),
            Raises(("values",), ("5",)),
        ),
        Case(
            UT,
            "values int64",
            lambda: cm.unpack_tokens(pk().tokens.long(), pk(), 2),
            Raises(("values",), ("torch.int64",)),
        ),
        Case(
            UT,
            "packed a plain tuple",
            lambda: cm.unpack_tokens(pk().tokens, tuple(pk()), 2),
            Raises(("packed",), ("tuple",)),
        ),
        Case(
            UT,
            "packed None",
            lambda: cm.unpack_tokens(pk().tokens, None, 2),
            Raises(("packed",), ("None",)),
        ),
        Case(
            UT,
            "batch_size smaller than packed",
            lambda: cm.unpack_tokens(pk().tokens, pk(), 1),
            Raises(("batch_size",), ("1",)),
        ),
        Case(
            UT,
            "batch_size larger than packed",
            lambda: cm.unpack_tokens(pk().tokens, pk(), 3),
            Raises(("batch_size",), ("3",)),
        ),
        Case(
            UT,
            "batch_size=-1",
            lambda: cm.unpack_tokens(pk().tokens, pk(), -1),
            Raises(("batch_size",), ("-1",)),
        ),
        Case(
            UT,
            "round trip with padding",
            lambda: cm.unpack_tokens(pk().tokens, pk(), 2),
            Returns(
                "real tokens back in place, padding 0",
                same_as(lambda: x().masked_fill(pm[..., None], 0.0)),
            ),
        ),
        Case(
            UT,
            "non-contiguous values",
            lambda: cm.unpack_tokens(nc(pk().tokens), pk(), 2),
            Returns("same as contiguous", same_as(lambda: cm.unpack_tokens(pk().tokens, pk(), 2))),
        ),
        Case(
            PA,
            "q of rank 4",
            lambda: cm.packed_attention(qkv()[None], qkv(seed=1), qkv(seed=2), cu(), 4),
            Raises(("q",), ("(1, 8, 2, 4)",)),
        ),
        Case(
            PA,
            "q int64",
            lambda: cm.packed_attention(qkv().long(), qkv(seed=1), qkv(seed=2), cu(), 4),
            Raises(("q",), ("torch.int64",)),
        ),
        Case(
            PA,
            "k with fewer rows than q",
            lambda: cm.packed_attention(qkv(), qkv(5, seed=1), qkv(5, seed=2), cu(), 4),
            Raises(("k",), ("(5, 2, 4)",)),
        ),
        Case(
            PA,
            "cu_seqlens float",
            lambda: attn_p(cu=cu().float()),
            Raises(("cu_seqlens",), ("torch.float32",)),
        ),
        Case(PA, "cu_seqlens of rank 2", lambda: attn_p(cu=cu()[None]), Raises(("cu_seqlens",))),
        Case(PA, "max_seqlen=-1", lambda: attn_p(max_seqlen=-1), Raises(("max_seqlen",), ("-1",))),
        Case(
            PA,
            "max_seqlen a float",
            lambda: attn_p(max_seqlen=2.5),
            Raises(("max_seqlen",), ("2.5",)),
        ),
        Case(PA, "valid layout", lambda: attn_p(), Returns("[t, h, d], finite", shape_is(8, H, 4))),
        Case(
            PA,
            "non-contiguous q, k, v",
            lambda: cm.packed_attention(nc(qkv()), nc(qkv(seed=1)), nc(qkv(seed=2)), cu(), 4),
            Returns("same as contiguous", same_as(attn_p)),
        ),
        Case(
            PA,
            "fused=False vs fused=True",
            lambda: cm.packed_attention(qkv(), qkv(seed=1), qkv(seed=2), cu(), 4, fused=False),
            Returns("same result as the fused path", same_as(attn_p)),
        ),
        Case(
            E,
            "forward_packed: a plain tuple",
            lambda: enc().forward_packed(tuple(pk())),
            Raises(("packed",), ("tuple",)),
        ),
        Case(
            E,
            "forward_packed: tokens of another width",
            lambda: enc().forward_packed(cm.pack_tokens(x(c=6), pm, 8)),
            Raises(("packed.tokens",), ("6",)),
        ),
        Case(
            E,
            "forward_packed: include_input without return_layers",
            lambda: enc().forward_packed(pk(), include_input=True),
            Raises(("include_input",)),
        ),
        Case(
            E,
            "forward_packed vs the padded forward",
            lambda: cm.unpack_tokens(enc().forward_packed(pk()).tokens, pk(), 2).masked_fill(
                pm[..., None], 0.0
            ),
            Returns(
                "same real tokens as forward(x, padding_mask)",
                same_as(lambda: enc()(x(), pm).tokens.masked_fill(pm[..., None], 0.0)),
            ),
        ),
        Case(
            "PackedTokens",
            "returned by pack_tokens",
            lambda: pk(),
            Returns(
                "the six documented fields",
                lambda r: _check(
                    isinstance(r, cm.PackedTokens)
                    and r._fields
                    == (
                        "tokens",
                        "cu_seqlens",
                        "source_index",
                        "row_padding_mask",
                        "max_seqlen",
                        "num_tokens",
                    ),
                    str(getattr(r, "_fields", r)),
                ),
            ),
        ),
    ]


def _check(cond: bool, msg: str) -> None:
    assert cond, msg


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def rand_pos() -> Tensor:
    return randn(2, 5, seed=4) * 100


CASES = _module_cases() + _pos_cases() + _packing_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_input(case: Case, rec: Recorder) -> None:
    prev = cm.use_fused_attn()
    try:
        run_case(rec, case)
    finally:
        cm.set_fused_attn(prev)


def test_set_fused_attn_round_trip(rec: Recorder) -> None:
    """The switch is read once at module construction; both paths give the same result."""
    prev = cm.use_fused_attn()
    try:
        cm.set_fused_attn(False)
        explicit = attn()
        cm.set_fused_attn(True)
        fused = attn()
        ok = (not explicit.fused_attn) and fused.fused_attn
        x = randn(2, 3, C)
        torch.testing.assert_close(explicit(x, PM), fused(x, PM), rtol=1e-5, atol=1e-6)
    finally:
        cm.set_fused_attn(prev)
    rec.check(
        "set_fused_attn",
        "False then True; modules built after each",
        ok,
        "each module keeps the switch it was built with; both paths agree",
    )
