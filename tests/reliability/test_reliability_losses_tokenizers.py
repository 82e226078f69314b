"""Bad and extreme inputs for the losses and the tokenizers (patchify/unpatchify, patch
embedding, raster and series tokenizers, static token, token appending).

NaN/inf in a *tokenizer* input is documented to mean "missing value" (zeroed and flagged),
so there the check is that NaN and inf give identical, finite tokens; everywhere else NaN in
real data must propagate.

Legend: ``b`` batch, ``p`` predicted slots, ``d`` values per token, ``t`` steps, ``c``
channels, ``s`` sites, ``a`` attributes. Polarity: ``padding_mask`` True = padding,
``valid_mask`` True = valid value, ``missing_mask`` True = missing value.
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


def with_value(t: Tensor, index: tuple[Any, ...], value: float) -> Tensor:
    out = t.clone()
    out[index] = value
    return out


def _loss_cases() -> list[Case]:
    b, p, d = 2, 3, 4
    pred = lambda: randn(b, p, d, seed=0)  # noqa: E731
    tgt = lambda: randn(b, p, d, seed=1)  # noqa: E731
    pm = pad_mask([3, 1], p)
    L = "masked_mse_loss"
    mse = cm.masked_mse_loss
    cases = [
        Case(L, "pred of rank 2", lambda: mse(pred()[0], tgt()[0]), Raises(("pred",), ("(3, 4)",))),
        Case(
            L,
            "target of another shape",
            lambda: mse(pred(), tgt()[:, :2]),
            Raises(("target",), ("(2, 2, 4)",)),
        ),
        Case(
            L, "pred int64", lambda: mse(pred().long(), tgt()), Raises(("pred",), ("torch.int64",))
        ),
        Case(
            L, "target a list", lambda: mse(pred(), tgt().tolist()), Raises(("target",), ("list",))
        ),
        Case(
            L,
            "padding_mask float",
            lambda: mse(pred(), tgt(), padding_mask=pm.float()),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            L,
            "padding_mask [b, p+1]",
            lambda: mse(pred(), tgt(), padding_mask=pad_mask([3, 1], p + 1)),
            Raises(("padding_mask",), ("(2, 4)",)),
        ),
        Case(
            L,
            "valid_mask float",
            lambda: mse(pred(), tgt(), valid_mask=torch.ones(b, p, d)),
            Raises(("valid_mask",), ("torch.float32",)),
        ),
        Case(
            L,
            "valid_mask [b, p, d+1]",
            lambda: mse(pred(), tgt(), valid_mask=torch.ones(b, p, d + 1, dtype=torch.bool)),
            Raises(("valid_mask",), ("(2, 3, 5)",)),
        ),
        Case(
            L,
            "weight int64",
            lambda: mse(pred(), tgt(), weight=torch.ones(b, dtype=torch.long)),
            Raises(("weight",), ("torch.int64",)),
        ),
        Case(
            L,
            "weight [p]",
            lambda: mse(pred(), tgt(), weight=torch.ones(p)),
            Raises(("weight",), ("(3,)",)),
        ),
        Case(
            L,
            "eps=0",
            lambda: mse(pred(), tgt(), norm_pix=True, eps=0.0),
            Raises(("eps",), ("0.0",)),
        ),
        Case(
            L, "eps=nan", lambda: mse(pred(), tgt(), eps=float("nan")), Raises(("eps",), ("nan",))
        ),
        Case(
            L,
            "reduction='avg'",
            lambda: mse(pred(), tgt(), reduction="avg"),
            Raises(("reduction",), ("'avg'",)),
        ),
        Case(
            L,
            "norm_pix a string",
            lambda: mse(pred(), tgt(), norm_pix="no"),
            Raises(("norm_pix",), ("'no'",)),
        ),
        Case(
            L,
            "NaN in pred at a scored position of sample 0",
            lambda: mse(
                with_value(pred(), (0, 0, 0), float("nan")),
                tgt(),
                padding_mask=pm,
                reduction="none",
            ),
            Returns("NaN propagates to sample 0's loss only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            L,
            "NaN in pred, mean reduction",
            lambda: mse(with_value(pred(), (0, 0, 0), float("nan")), tgt()),
            Returns(
                "the loss is NaN (never hidden)",
                lambda r: _assert(bool(torch.isnan(r)), "NaN hidden"),
                finite=False,
            ),
        ),
        Case(
            L,
            "NaN/inf in pred and target at padded slots",
            lambda: mse(
                with_value(pred(), (1, 2, 0), float("nan")),
                with_value(tgt(), (1, 1), float("inf")),
                padding_mask=pm,
            ),
            Returns("unchanged (documented)", same_as(lambda: mse(pred(), tgt(), padding_mask=pm))),
        ),
        Case(
            L,
            "NaN in target at invalid values",
            lambda: mse(
                pred(),
                with_value(tgt(), (0, 0, 1), float("nan")),
                valid_mask=with_value(torch.ones(b, p, d), (0, 0, 1), 0).bool(),
                norm_pix=True,
            ),
            Returns(
                "finite, invalid values not scored",
                same_as(
                    lambda: mse(
                        pred(),
                        tgt(),
                        valid_mask=with_value(torch.ones(b, p, d), (0, 0, 1), 0).bool(),
                        norm_pix=True,
                    )
                ),
            ),
        ),
        Case(
            L,
            "every slot padded",
            lambda: mse(pred(), tgt(), padding_mask=torch.ones(b, p, dtype=torch.bool)),
            Returns("0", lambda r: _assert(float(r) == 0.0, "not 0")),
        ),
        Case(
            L,
            "empty batch (b=0)",
            lambda: mse(pred()[:0], tgt()[:0]),
            Returns("0", lambda r: _assert(float(r) == 0.0, "not 0")),
        ),
        Case(
            L,
            "zero slots (p=0)",
            lambda: mse(pred()[:, :0], tgt()[:, :0], reduction="none"),
            Returns("[b] zeros", shape_is(b)),
        ),
        Case(
            L,
            "d=1 with norm_pix",
            lambda: mse(pred()[..., :1], tgt()[..., :1], norm_pix=True),
            Returns("finite (variance 0 -> target 0)"),
        ),
        Case(
            L,
            "float32 pred, float64 target",
            lambda: mse(pred(), tgt().double()),
            Returns(
                "float64 loss (documented)",
                lambda r: _assert(r.dtype == torch.float64, str(r.dtype)),
            ),
        ),
        Case(
            L,
            "NaN weight for a scored sample",
            lambda: mse(pred(), tgt(), weight=torch.tensor([float("nan"), 1.0]), reduction="none"),
            Returns("NaN propagates to that sample only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            L,
            "non-contiguous inputs",
            lambda: mse(
                nc(pred()),
                nc(tgt()),
                padding_mask=nc(pm),
                valid_mask=nc(torch.ones(b, p, d, dtype=torch.bool)),
                weight=nc(torch.ones(b, p)),
            ),
            Returns(
                "same loss as contiguous",
                same_as(
                    lambda: mse(
                        pred(),
                        tgt(),
                        padding_mask=pm,
                        valid_mask=torch.ones(b, p, d, dtype=torch.bool),
                        weight=torch.ones(b, p),
                    )
                ),
            ),
        ),
    ]
    M = "MaskedMSELoss"
    cases += [
        Case(
            M,
            "reduction='avg'",
            lambda: cm.MaskedMSELoss(reduction="avg"),
            Raises(("reduction",), ("'avg'",)),
        ),
        Case(M, "eps=-1", lambda: cm.MaskedMSELoss(eps=-1.0), Raises(("eps",), ("-1.0",))),
        Case(M, "norm_pix=1", lambda: cm.MaskedMSELoss(norm_pix=1), Raises(("norm_pix",), ("1",))),
        Case(
            M,
            "forward: target of another shape",
            lambda: cm.MaskedMSELoss()(pred(), tgt()[:1]),
            Raises(("target",), ("(1, 3, 4)",)),
        ),
        Case(
            M,
            "forward: empty batch",
            lambda: cm.MaskedMSELoss(reduction="none")(pred()[:0], tgt()[:0]),
            Returns("[0]", shape_is(0)),
        ),
    ]
    N = "norm_pix_target"
    cases += [
        Case(
            N,
            "target int64",
            lambda: cm.norm_pix_target(tgt().long()),
            Raises(("target",), ("torch.int64",)),
        ),
        Case(
            N,
            "target 0-d",
            lambda: cm.norm_pix_target(torch.tensor(1.0)),
            Raises(("target",), ("()",)),
        ),
        Case(
            N,
            "valid_mask [b, p+1]",
            lambda: cm.norm_pix_target(tgt(), torch.ones(b, p + 1, dtype=torch.bool)),
            Raises(("valid_mask",), ("(2, 4)",)),
        ),
        Case(N, "eps=0", lambda: cm.norm_pix_target(tgt(), eps=0.0), Raises(("eps",), ("0.0",))),
        Case(
            N,
            "NaN at a valid value of sample 0",
            lambda: cm.norm_pix_target(with_value(tgt(), (0, 0, 0), float("nan"))),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            N,
            "NaN at an invalid value",
            lambda: cm.norm_pix_target(
                with_value(tgt(), (0, 0, 0), float("nan")),
                with_value(torch.ones(b, p, d), (0, 0, 0), 0).bool(),
            )[0, 0, 0],
            Returns("0 there (documented)", lambda r: _assert(float(r) == 0.0, "not 0")),
        ),
        Case(
            N,
            "one value per token (d=1)",
            lambda: cm.norm_pix_target(tgt()[..., :1]),
            Returns("finite zeros", lambda r: _assert(bool((r == 0).all()), "not 0")),
        ),
        Case(
            N,
            "empty batch (b=0)",
            lambda: cm.norm_pix_target(tgt()[:0]),
            Returns("[0, p, d]", shape_is(0, p, d)),
        ),
        Case(
            N,
            "bfloat16 target",
            lambda: cm.norm_pix_target(tgt().bfloat16()),
            Returns(
                "bfloat16 (computed in float32)",
                lambda r: _assert(r.dtype == torch.bfloat16, str(r.dtype)),
            ),
        ),
        Case(
            N,
            "non-contiguous target",
            lambda: cm.norm_pix_target(nc(tgt())),
            Returns("same as contiguous", same_as(lambda: cm.norm_pix_target(tgt()))),
        ),
    ]
    W = "weighted_sum_losses"
    one = lambda: torch.tensor(1.0)  # noqa: E731
    cases += [
        Case(
            W,
            "a loss without a weight",
            lambda: cm.weighted_sum_losses({"a": one(), "b": one()}, {"a": 1.0}),
            Raises(("weights",), ("'b'",)),
        ),
        Case(
            W,
            "a weight without a loss",
            lambda: cm.weighted_sum_losses({"a": one()}, {"a": 1.0, "c": 2.0}),
            Raises(("weights",), ("'c'",)),
        ),
        Case(W, "no losses", lambda: cm.weighted_sum_losses({}, {}), Raises(("losses",))),
        Case(
            W,
            "weight=inf",
            lambda: cm.weighted_sum_losses({"a": one()}, {"a": float("inf")}),
            Raises(("weights",), ("inf",)),
        ),
        Case(
            W,
            "weight a string",
            lambda: cm.weighted_sum_losses({"a": one()}, {"a": "1"}),
            Raises(("weights",), ("'1'",)),
        ),
        Case(
            W,
            "weight=True",
            lambda: cm.weighted_sum_losses({"a": one()}, {"a": True}),
            Raises(("weights",), ("True",)),
        ),
        Case(
            W,
            "a loss that is a float",
            lambda: cm.weighted_sum_losses({"a": 1.0}, {"a": 1.0}),
            Raises(("losses",), ("float",)),
        ),
        Case(
            W,
            "losses a list",
            lambda: cm.weighted_sum_losses([one()], {"a": 1.0}),
            Raises(("losses",), ("list",)),
        ),
        Case(
            W,
            "a NaN loss",
            lambda: cm.weighted_sum_losses(
                {"a": torch.tensor(float("nan")), "b": one()}, {"a": 1.0, "b": 0.0}
            ),
            Returns(
                "NaN propagates (even with another weight 0)",
                lambda r: _assert(bool(torch.isnan(r)), "hidden"),
                finite=False,
            ),
        ),
    ]
    return cases


def _assert(cond: bool, msg: str) -> None:
    assert cond, msg


def _tokenizer_cases() -> list[Case]:
    cases: list[Case] = []
    img = lambda b=2, c=3, h=8, w=12: randn(b, c, h, w, seed=2)  # noqa: E731
    P, U = "patchify", "unpatchify"
    cases += [
        Case(P, "x of rank 3", lambda: cm.patchify(img()[0], 4), Raises(("x",), ("3D",))),
        Case(P, "x a list", lambda: cm.patchify(img().tolist(), 4), Raises(("x",), ("list",))),
        Case(P, "patch_size=0", lambda: cm.patchify(img(), 0), Raises(("patch_size",), ("0",))),
        Case(
            P,
            "size not divisible by the patch",
            lambda: cm.patchify(img(), 5),
            Raises(("patch_size",), ("(5, 5)",)),
        ),
        Case(
            P,
            "layout='nchw'",
            lambda: cm.patchify(img(), 4, layout="nchw"),
            Raises(("layout",), ("'nchw'",)),
        ),
        Case(
            P,
            "layout='btchw' for a 4-D x",
            lambda: cm.patchify(img(), 4, layout="btchw"),
            Raises(("x",), ("(2, 3, 8, 12)",)),
        ),
        Case(
            P,
            "bool images",
            lambda: cm.patchify(img() > 0, 4),
            Returns("any dtype (documented)", shape_is(2, 6, 48)),
        ),
        Case(
            P,
            "empty batch (b=0)",
            lambda: cm.patchify(img(b=0), 4),
            Returns("[0, l, k]", shape_is(0, 6, 48)),
        ),
        Case(
            P,
            "channels_last images",
            lambda: cm.patchify(img().to(memory_format=torch.channels_last), 4),
            Returns("same as contiguous", same_as(lambda: cm.patchify(img(), 4))),
        ),
        Case(
            U,
            "patches with the wrong patch count",
            lambda: cm.unpatchify(randn(2, 5, 48), 4, (8, 12)),
            Raises(("patches",), ("5",)),
        ),
        Case(
            U,
            "last dim not ph*pw*c",
            lambda: cm.unpatchify(randn(2, 6, 47), 4, (8, 12)),
            Raises(("patches",), ("47",)),
        ),
        Case(
            U,
            "image_size not divisible",
            lambda: cm.unpatchify(randn(2, 6, 48), 4, (9, 12)),
            Raises(("image_size",), ("(9, 12)",)),
        ),
        Case(
            U,
            "patches of rank 2",
            lambda: cm.unpatchify(randn(6, 48), 4, (8, 12)),
            Raises(("patches",), ("2D",)),
        ),
        Case(
            U,
            "non-contiguous patches",
            lambda: cm.unpatchify(nc(cm.patchify(img(), 4)), 4, (8, 12)),
            Returns("exact inverse of patchify", same_as(img)),
        ),
    ]
    PE = "PatchEmbed"
    pe = lambda: (torch.manual_seed(0), cm.PatchEmbed(8, 4, (8, 12)))[1]  # noqa: E731
    cases += [
        Case(PE, "img of rank 3", lambda: pe()(img()[0]), Raises(("img",), ("(3, 8, 12)",))),
        Case(PE, "img int64", lambda: pe()(img().long()), Raises(("img",), ("torch.int64",))),
        Case(
            PE, "img with 1 channel", lambda: pe()(img(c=1)), Raises(("img",), ("(2, 1, 8, 12)",))
        ),
        Case(
            PE,
            "img of another size",
            lambda: pe()(img(h=12)),
            Raises(("img", "image_size"), ("(12, 12)",)),
        ),
        Case(
            PE,
            "img not divisible (image_size=None)",
            lambda: cm.PatchEmbed(8, 4)(img(h=10)),
            Raises(("img", "patch_size"), ("(10, 12)",)),
        ),
        Case(
            PE, "empty batch (b=0)", lambda: pe()(img(b=0)), Returns("[0, l, d]", shape_is(0, 6, 8))
        ),
        Case(
            PE,
            "float64 img",
            lambda: pe()(img().double()),
            Returns(
                "cast to the weight dtype (documented)",
                same_as(lambda: pe()(img()), rtol=1e-5, atol=1e-5),
            ),
        ),
        Case(
            PE,
            "channels_last img",
            lambda: pe()(img().to(memory_format=torch.channels_last)),
            Returns("same as contiguous", same_as(lambda: pe()(img()), rtol=1e-5, atol=1e-5)),
        ),
        Case(
            PE,
            "NaN in one pixel of sample 0",
            lambda: pe()(with_value(img(), (0, 0, 0, 0), float("nan"))),
            Returns(
                "NaN propagates to sample 0 (that patch) only", nan_in_sample_only(0), finite=False
            ),
        ),
        Case(
            PE,
            "image_size not divisible",
            lambda: cm.PatchEmbed(8, 4, (10, 12)),
            Raises(("image_size",), ("(10, 12)",)),
        ),
        Case(
            PE,
            "patch_size=(4, 0)",
            lambda: cm.PatchEmbed(8, (4, 0)),
            Raises(("patch_size",), ("0",)),
        ),
    ]
    V = "valid_patches_from_mask"
    land = torch.zeros(8, 12, dtype=torch.bool)
    land[:4, :6] = True
    cases += [
        Case(
            V,
            "valid_mask float",
            lambda: cm.valid_patches_from_mask(land.float(), 4),
            Raises(("valid_mask",), ("torch.float32",)),
        ),
        Case(
            V,
            "valid_mask of rank 3",
            lambda: cm.valid_patches_from_mask(land[None], 4),
            Raises(("valid_mask",), ("(1, 8, 12)",)),
        ),
        Case(
            V,
            "min_coverage=0",
            lambda: cm.valid_patches_from_mask(land, 4, 0.0),
            Raises(("min_coverage",), ("0.0",)),
        ),
        Case(
            V,
            "min_coverage=1.5",
            lambda: cm.valid_patches_from_mask(land, 4, 1.5),
            Raises(("min_coverage",), ("1.5",)),
        ),
        Case(
            V,
            "min_coverage=nan",
            lambda: cm.valid_patches_from_mask(land, 4, float("nan")),
            Raises(("min_coverage",), ("nan",)),
        ),
        Case(
            V,
            "not divisible",
            lambda: cm.valid_patches_from_mask(land, 5),
            Raises(("valid_mask", "patch_size"), ("(8, 12)",)),
        ),
        Case(
            V,
            "no valid pixel",
            lambda: cm.valid_patches_from_mask(land & False, 4),
            Returns("all False", lambda r: _assert(not bool(r.any()), "valid patch")),
        ),
        Case(
            V,
            "non-contiguous valid_mask",
            lambda: cm.valid_patches_from_mask(nc(land), 4),
            Returns("same as contiguous", same_as(lambda: cm.valid_patches_from_mask(land, 4))),
        ),
    ]
    RP = "raster_position_embedding"
    coords = torch.tensor([[0, 0], [0, 2], [1, 1]])
    cases += [
        Case(
            RP,
            "patch_coords [Lv, 3]",
            lambda: cm.raster_position_embedding(8, torch.zeros(3, 3), 2),
            Raises(("patch_coords",), ("(3, 3)",)),
        ),
        Case(
            RP,
            "patch_coords bool",
            lambda: cm.raster_position_embedding(8, coords.bool(), 2),
            Raises(("patch_coords",), ("torch.bool",)),
        ),
        Case(
            RP,
            "time_positions=0",
            lambda: cm.raster_position_embedding(8, coords, 0),
            Raises(("time_positions",), ("0",)),
        ),
        Case(
            RP,
            "time_positions of rank 3",
            lambda: cm.raster_position_embedding(8, coords, torch.zeros(1, 2, 3)),
            Raises(("time_positions",), ("(1, 2, 3)",)),
        ),
        Case(
            RP,
            "time_positions bool",
            lambda: cm.raster_position_embedding(8, coords, torch.ones(2, dtype=torch.bool)),
            Raises(("time_positions",), ("torch.bool",)),
        ),
        Case(
            RP,
            "dim=6",
            lambda: cm.raster_position_embedding(6, coords, 2),
            Raises(("dim",), ("6",)),
        ),
        Case(
            RP,
            "zero patches (Lv=0)",
            lambda: cm.raster_position_embedding(8, coords[:0], 2),
            Returns("[0, dim]", shape_is(0, 8)),
        ),
        Case(
            RP,
            "NaN time position",
            lambda: cm.raster_position_embedding(8, coords, torch.tensor([float("nan"), 1.0]))[:3],
            Returns(
                "NaN propagates to that step's tokens only",
                lambda r: _assert(bool(torch.isnan(r).all(dim=-1).any()), "hidden"),
                finite=False,
            ),
        ),
        Case(
            RP,
            "non-contiguous coords and positions",
            lambda: cm.raster_position_embedding(8, nc(coords), nc(torch.tensor([3.0, 7.0]))),
            Returns(
                "same as contiguous",
                same_as(lambda: cm.raster_position_embedding(8, coords, torch.tensor([3.0, 7.0]))),
            ),
        ),
    ]
    R = "RasterTokenizer"
    vpm = torch.tensor([True, False, True, True, False, True])  # 2x3 grid of 4x4 patches

    def rt(**kw: Any) -> cm.RasterTokenizer:
        torch.manual_seed(0)
        return cm.RasterTokenizer(8, 4, (8, 12), in_chans=2, valid_patch_mask=vpm, **kw)

    rx = lambda b=2, t=3, c=2, h=8, w=12: randn(b, t, c, h, w, seed=3)  # noqa: E731
    cases += [
        Case(R, "x int64", lambda: rt()(rx().long()), Raises(("x",), ("torch.int64",))),
        Case(R, "x of rank 3", lambda: rt()(rx()[0, 0]), Raises(("x",), ("(2, 8, 12)",))),
        Case(R, "x with 1 channel", lambda: rt()(rx(c=1)), Raises(("x",), ("(1, 8, 12)",))),
        Case(R, "x of another size", lambda: rt()(rx(w=8)), Raises(("x",), ("(2, 8, 8)",))),
        Case(
            R,
            "x [b, t, H, W] with in_chans=2",
            lambda: rt()(rx()[:, :, 0]),
            Raises(("x", "in_chans"), ("(2, 3, 8, 12)",)),
        ),
        Case(R, "zero steps (t=0)", lambda: rt()(rx(t=0)), Raises(("x",), ("(2, 0, 2, 8, 12)",))),
        Case(
            R,
            "time_positions of another length",
            lambda: rt()(rx(), torch.arange(4)),
            Raises(("time_positions",), ("(4,)",)),
        ),
        Case(
            R,
            "time_positions bool",
            lambda: rt()(rx(), torch.ones(3, dtype=torch.bool)),
            Raises(("time_positions",), ("torch.bool",)),
        ),
        Case(
            R,
            "time_positions [b', t] of another batch",
            lambda: rt()(rx(), torch.zeros(3, 3)),
            Raises(("time_positions",), ("(3, 3)",)),
        ),
        Case(
            R,
            "empty batch (b=0)",
            lambda: rt()(rx(b=0)),
            Returns("[0, t*Lv, d]", shape_is(0, 12, 8)),
        ),
        Case(
            R,
            "NaN vs inf at the same pixel",
            lambda: rt()(with_value(rx(), (0, 1, 0, 0, 0), float("nan"))),
            Returns(
                "documented missing value: finite, NaN == inf",
                same_as(lambda: rt()(with_value(rx(), (0, 1, 0, 0, 0), float("inf")))),
            ),
        ),
        Case(
            R,
            "an all-NaN step with pad_empty_tokens",
            lambda: rt(pad_empty_tokens=True)(with_value(rx(), (1, 2), float("nan")))[1][1],
            Returns(
                "that step's tokens are padding",
                lambda r: _assert(r.tolist() == [False] * 8 + [True] * 4, str(r.tolist())),
            ),
        ),
        Case(
            R,
            "NaN in pixels of invalid patches",
            lambda: rt()(
                with_value(
                    rx(),
                    (slice(None), slice(None), slice(None), slice(0, 4), slice(4, 8)),
                    float("nan"),
                )
            ),
            Returns(
                "unchanged: invalid patches dropped before arithmetic", same_as(lambda: rt()(rx()))
            ),
        ),
        Case(
            R,
            "float64 x",
            lambda: rt()(rx().double()),
            Returns(
                "cast to the parameter dtype", same_as(lambda: rt()(rx()), rtol=1e-5, atol=1e-5)
            ),
        ),
        Case(
            R,
            "non-contiguous x",
            lambda: rt()(nc(rx())),
            Returns("same as contiguous", same_as(lambda: rt()(rx()))),
        ),
        Case(
            R,
            "channels_last_3d x",
            lambda: rt()(rx().contiguous(memory_format=torch.channels_last_3d)),
            Returns("same as contiguous", same_as(lambda: rt()(rx()))),
        ),
        Case(
            R,
            "targets of x with NaN",
            lambda: rt().targets(with_value(rx(), (0, 0, 0, 0, 0), float("nan"))),
            Returns("target 0 and target_valid False there"),
        ),
        Case(R, "num_tokens(0)", lambda: rt().num_tokens(0), Raises(("num_steps",), ("0",))),
        Case(
            R,
            "position_embedding() without num_steps or time_positions",
            lambda: rt().position_embedding(),
            Raises((("num_steps", "time_positions"),)),
        ),
        Case(
            R,
            "embed_dim=6 with sincos",
            lambda: cm.RasterTokenizer(6, 4, (8, 12)),
            Raises(("embed_dim",), ("6",)),
        ),
        Case(
            R,
            "image_size not divisible",
            lambda: cm.RasterTokenizer(8, 4, (8, 10)),
            Raises(("image_size",), ("(8, 10)",)),
        ),
        Case(
            R,
            "valid_patch_mask selecting nothing",
            lambda: cm.RasterTokenizer(8, 4, (8, 12), valid_patch_mask=vpm & False),
            Raises(("valid_patch_mask",)),
        ),
        Case(
            R,
            "valid_patch_mask float",
            lambda: cm.RasterTokenizer(8, 4, (8, 12), valid_patch_mask=vpm.float()),
            Raises(("valid_patch_mask",), ("torch.float32",)),
        ),
        Case(
            R,
            "valid_mask of another size",
            lambda: cm.RasterTokenizer(8, 4, (8, 12), valid_mask=land[:4]),
            Raises(("valid_mask",), ("(4, 12)",)),
        ),
        Case(
            R,
            "spatial_embed='fixed'",
            lambda: cm.RasterTokenizer(8, 4, (8, 12), spatial_embed="fixed"),
            Raises(("spatial_embed",), ("'fixed'",)),
        ),
    ]
    S = "SeriesTokenizer"

    def st_(**kw: Any) -> cm.SeriesTokenizer:
        torch.manual_seed(0)
        return cm.SeriesTokenizer(8, 5, group_size=2, **kw)

    sx = lambda b=2, s=5, t=3: randn(b, s, t, seed=4)  # noqa: E731
    spm = pad_mask([5, 3], 5)
    cases += [
        Case(S, "x int64", lambda: st_()(sx().long()), Raises(("x",), ("torch.int64",))),
        Case(
            S, "x with the wrong site count", lambda: st_()(sx(s=4)), Raises(("x",), ("(2, 4, 3)",))
        ),
        Case(S, "x of rank 2", lambda: st_()(sx()[0]), Raises(("x",), ("(5, 3)",))),
        Case(
            S,
            "x [b, s, t, 2] with in_chans=1",
            lambda: st_()(sx()[..., None].expand(2, 5, 3, 2)),
            Raises(("x",), ("(2, 5, 3, 2)",)),
        ),
        Case(S, "zero steps (t=0)", lambda: st_()(sx(t=0)), Raises(("x",), ("(2, 5, 0)",))),
        Case(
            S,
            "site_padding_mask float",
            lambda: st_()(sx(), spm.float()),
            Raises(("site_padding_mask",), ("torch.float32",)),
        ),
        Case(
            S,
            "site_padding_mask of another shape",
            lambda: st_()(sx(), spm[:, :4]),
            Raises(("site_padding_mask",), ("(2, 4)",)),
        ),
        Case(
            S,
            "missing_mask float",
            lambda: st_()(sx(), missing_mask=torch.zeros(2, 5, 3)),
            Raises(("missing_mask",), ("torch.float32",)),
        ),
        Case(
            S,
            "missing_mask of another shape",
            lambda: st_()(sx(), missing_mask=torch.zeros(2, 5, 2, dtype=torch.bool)),
            Raises(("missing_mask",), ("(2, 5, 2)",)),
        ),
        Case(
            S,
            "time_positions of another length",
            lambda: st_()(sx(), time_positions=torch.arange(2)),
            Raises(("time_positions",), ("(2,)",)),
        ),
        Case(
            S,
            "empty batch (b=0)",
            lambda: st_()(sx(b=0)),
            Returns("[0, t*P, d]", shape_is(0, 9, 8)),
        ),
        Case(
            S,
            "NaN, inf and missing_mask at the same value",
            lambda: st_()(with_value(sx(), (0, 1, 1), float("nan"))),
            Returns(
                "documented missing value: NaN == inf == flagged",
                lambda r: (
                    same_as(lambda: st_()(with_value(sx(), (0, 1, 1), float("inf"))))(r),
                    same_as(
                        lambda: st_()(
                            sx(), missing_mask=with_value(torch.zeros(2, 5, 3), (0, 1, 1), 1).bool()
                        )
                    )(r),
                ),
            ),
        ),
        Case(
            S,
            "a sample whose whole series is NaN",
            lambda: st_()(with_value(sx(), (1,), float("nan"))),
            Returns(
                "finite tokens, every token of that sample padding",
                lambda r: _assert(bool(r[1][1].all()) and not bool(r[1][0].any()), str(r[1])),
            ),
        ),
        Case(
            S,
            "NaN at padded sites",
            lambda: st_()(with_value(sx(), (1, slice(3, 5)), float("nan")), spm),
            Returns("unchanged", same_as(lambda: st_()(sx(), spm))),
        ),
        Case(
            S,
            "non-contiguous x, masks, positions",
            lambda: st_()(nc(sx()), nc(spm), time_positions=nc(torch.tensor([1.0, 5.0, 9.0]))),
            Returns(
                "same as contiguous",
                same_as(lambda: st_()(sx(), spm, time_positions=torch.tensor([1.0, 5.0, 9.0]))),
            ),
        ),
        Case(S, "num_sites=0", lambda: cm.SeriesTokenizer(8, 0), Raises(("num_sites",), ("0",))),
        Case(
            S,
            "group_size=0",
            lambda: cm.SeriesTokenizer(8, 5, group_size=0),
            Raises(("group_size",), ("0",)),
        ),
        Case(
            S,
            "embed_dim odd with sin-cos time",
            lambda: cm.SeriesTokenizer(7, 5),
            Raises(("embed_dim",), ("7",)),
        ),
    ]
    T = "StaticToken"

    def stok(per_site: bool = True) -> cm.StaticToken:
        torch.manual_seed(0)
        return cm.StaticToken(3, 8, per_site=per_site)

    sa = lambda b=2, s=4: randn(b, s, 3, seed=6)  # noqa: E731
    sp4 = pad_mask([4, 1], 4)
    cases += [
        Case(
            T,
            "static [b, a] with per_site=True",
            lambda: stok()(sa()[:, 0]),
            Raises(("static",), ("(2, 3)",)),
        ),
        Case(
            T,
            "static with the wrong attribute count",
            lambda: stok()(randn(2, 4, 5)),
            Raises(("static",), ("(2, 4, 5)",)),
        ),
        Case(T, "static int64", lambda: stok()(sa().long()), Raises(("static",), ("torch.int64",))),
        Case(
            T,
            "site_padding_mask with per_site=False",
            lambda: stok(False)(sa()[:, 0], sp4),
            Raises(("site_padding_mask",)),
        ),
        Case(
            T,
            "site_padding_mask of another shape",
            lambda: stok()(sa(), sp4[:, :3]),
            Raises(("site_padding_mask",), ("(2, 3)",)),
        ),
        Case(
            T,
            "site_padding_mask float",
            lambda: stok()(sa(), sp4.float()),
            Raises(("site_padding_mask",), ("torch.float32",)),
        ),
        Case(
            T,
            "every site of a sample padded",
            lambda: stok()(sa(), pad_mask([4, 0], 4))[0][1, 0],
            Returns(
                "the learned bias (finite)",
                lambda r: torch.testing.assert_close(r, stok().proj.bias.detach()),
            ),
        ),
        Case(
            T,
            "NaN at padded sites",
            lambda: stok()(with_value(sa(), (1, 2), float("nan")), sp4),
            Returns("unchanged", same_as(lambda: stok()(sa(), sp4))),
        ),
        Case(
            T,
            "NaN attribute (missing)",
            lambda: stok()(with_value(sa(), (0, 0, 0), float("nan"))),
            Returns(
                "documented missing: NaN == inf",
                same_as(lambda: stok()(with_value(sa(), (0, 0, 0), float("-inf")))),
            ),
        ),
        Case(
            T, "empty batch (b=0)", lambda: stok()(sa(b=0)), Returns("[0, 1, d]", shape_is(0, 1, 8))
        ),
        Case(
            T,
            "zero sites (s=0)",
            lambda: stok()(sa(s=0), pad_mask([0, 0], 0)),
            Returns("the bias per sample", shape_is(2, 1, 8)),
        ),
        Case(
            T,
            "non-contiguous inputs",
            lambda: stok()(nc(sa()), nc(sp4)),
            Returns("same as contiguous", same_as(lambda: stok()(sa(), sp4))),
        ),
        Case(
            T,
            "float32 static into a bfloat16 module",
            lambda: stok().bfloat16()(sa()),
            Returns(
                "bfloat16 token (side input cast)",
                lambda r: _assert(r[0].dtype == torch.bfloat16, str(r[0].dtype)),
            ),
        ),
        Case(
            T, "num_attributes=0", lambda: cm.StaticToken(0, 8), Raises(("num_attributes",), ("0",))
        ),
    ]
    A = "append_tokens"
    tk = lambda b=2, n=3, d=4: randn(b, n, d, seed=7)  # noqa: E731
    cases += [
        Case(
            A,
            "tokens of rank 2",
            lambda: cm.append_tokens(tk()[0], None, tk()),
            Raises(("tokens",), ("(3, 4)",)),
        ),
        Case(
            A,
            "extra_tokens of another width",
            lambda: cm.append_tokens(tk(), None, tk(d=5)),
            Raises(("extra_tokens",), ("(2, 3, 5)",)),
        ),
        Case(
            A,
            "extra_tokens of another batch",
            lambda: cm.append_tokens(tk(), None, tk(b=3)),
            Raises(("extra_tokens",), ("(3, 3, 4)",)),
        ),
        Case(
            A,
            "padding_mask float",
            lambda: cm.append_tokens(tk(), pad_mask([3, 1], 3).float(), tk()),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            A,
            "extra_padding_mask of another shape",
            lambda: cm.append_tokens(tk(), None, tk(), pad_mask([1], 3)),
            Raises(("extra_padding_mask",), ("(1, 3)",)),
        ),
        Case(
            A,
            "float32 tokens + float64 extra",
            lambda: cm.append_tokens(tk(), None, tk().double()),
            Returns(
                "promoted to float64 (documented, as torch.cat)",
                lambda r: _assert(r[0].dtype == torch.float64, str(r[0].dtype)),
            ),
        ),
        Case(
            A,
            "empty batch (b=0)",
            lambda: cm.append_tokens(tk(b=0), None, tk(b=0, n=1)),
            Returns("[0, n+m, d]", shape_is(0, 4, 4)),
        ),
        Case(
            A,
            "zero tokens on both sides",
            lambda: cm.append_tokens(tk(n=0), None, tk(n=0)),
            Returns("[b, 0, d]", shape_is(2, 0, 4)),
        ),
        Case(
            A,
            "non-contiguous inputs",
            lambda: cm.append_tokens(nc(tk()), nc(pad_mask([3, 1], 3)), nc(tk(n=2))),
            Returns(
                "same as contiguous",
                same_as(lambda: cm.append_tokens(tk(), pad_mask([3, 1], 3), tk(n=2))),
            ),
        ),
    ]
    return cases


CASES = _loss_cases() + _tokenizer_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_loss_tokenizer_input(case: Case, rec: Recorder) -> None:
    run_case(rec, case)
