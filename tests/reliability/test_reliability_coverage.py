"""Bad and extreme input for the public names added after 0.1.0 that had no row yet.

`FiLMProjection`, `visible_patch_mean`, `visible_site_mean`, `SpatioTemporalQueryPos`,
`token_valid_mask_from_pixels`, `ModalityLoss`, `padding_wins`, `AttentionPlan`,
`KernelRule`, `set_kernel_table`, `kernel_table`, `MaskSplit.validate` / `.to` /
`.collate`, `crossmae.distributed.global_sample_mean` / `global_multimodal_loss`,
`decode_together`, `compile_blocks` and `capture_step`:
wrong type → ``TypeError`` naming the argument, wrong shape or value → ``ValueError``
naming it, raised before any work; plus empty batches, NaN in padded and in real inputs,
and non-contiguous inputs where the callable takes tensors.

Protocols (`Encoder`, `QueryDecoder`, `SequenceDecoder`, `Tokenizer`) and constants
(`PADDED_ATTENTION_KERNELS`) take no input: the entry points that receive them check them
(`MultimodalMAE`, `set_padded_attention_kernel`), and those rows live with those names.

Legend: ``b`` batch, ``s`` sites, ``a`` attributes, ``P`` patches, ``n`` tokens, ``p``
queried tokens, ``c`` width. Polarity: ``*_padding_mask`` True = padding;
``patch_visible_mask`` / ``visible_mask`` True = seen; ``pixel_valid_mask`` True = valid.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from reliability_helpers import (
    Case,
    KernelError,
    Raises,
    Recorder,
    Returns,
    nan_in_sample_only,
    nc,
    randn,
    run_case,
    same_as,
    shape_is,
    shared_water,
    water_inputs,
    water_static,
)

import crossmae as cm
import crossmae.distributed as cdist


# --------------------------------------------------------------------------- helpers
def _eq(expected: Callable[[], Any]) -> Callable[[Any], None]:
    return same_as(expected, rtol=0.0, atol=0.0)


def _film() -> cm.FiLMProjection:
    torch.manual_seed(0)
    return cm.FiLMProjection(3, 4)


def _qpos(**kw: Any) -> cm.SpatioTemporalQueryPos:
    torch.manual_seed(0)
    return cm.SpatioTemporalQueryPos(4, 6, 3, **kw)


def _split(b: int = 2, n: int = 8) -> cm.MaskSplit:
    return cm.random_masking(b, n, 0.5, generator=torch.Generator().manual_seed(0))


def _attrs(b: int = 2, s: int = 5, a: int = 3) -> torch.Tensor:
    return randn(b, s, a)


VIS = torch.tensor([[True, False, True], [False, True, True]])  # [b=2, P=3] for s=5, g=2


def _with_nan(t: torch.Tensor, index: tuple[int, ...]) -> torch.Tensor:
    t = t.clone()
    t[index] = float("nan")
    return t


# --------------------------------------------------------------------------- FiLMProjection
def _film_cases() -> list[Case]:
    f = _film()
    cond = randn(2, 3)
    return [
        Case(
            "FiLMProjection",
            "cond_dim='3'",
            lambda: cm.FiLMProjection("3", 4),
            Raises(("cond_dim",), ("'3'",)),
        ),
        Case("FiLMProjection", "dim=0", lambda: cm.FiLMProjection(3, 0), Raises(("dim",), ("0",))),
        Case(
            "FiLMProjection.forward",
            "integer cond",
            lambda: f(cond.long()),
            Raises(("cond",), ("int64",)),
        ),
        Case(
            "FiLMProjection.forward",
            "cond of rank 3",
            lambda: f(cond[None]),
            Raises(("cond",), ("(1, 2, 3)",)),
        ),
        Case(
            "FiLMProjection.forward",
            "cond width 5 for cond_dim=3",
            lambda: f(randn(2, 5)),
            Raises(("cond",), ("(2, 5)",)),
        ),
        Case(
            "FiLMProjection.forward",
            "cond a list",
            lambda: f([[0.0] * 3]),
            Raises(("cond",), ("list",)),
        ),
        Case(
            "FiLMProjection.forward",
            "float64 cond into a float32 module",
            lambda: f(cond.double()),
            Returns("cast to the parameters' dtype: same as float32 cond", _eq(lambda: f(cond))),
        ),
        Case(
            "FiLMProjection.forward",
            "empty batch b=0",
            lambda: f(randn(0, 3)),
            Returns("empty [0, 4] gamma and beta", shape_is(0, 4)),
        ),
        Case(
            "FiLMProjection.forward",
            "NaN in sample 1's cond",
            lambda: f(_with_nan(cond, (1, 0))),
            Returns(
                "NaN reaches sample 1 only",
                nan_in_sample_only(1, pick=lambda r: r[0]),
                finite=False,
            ),
        ),
        Case(
            "FiLMProjection.forward",
            "non-contiguous cond",
            lambda: f(nc(cond)),
            Returns("same as contiguous", _eq(lambda: f(cond))),
        ),
    ]


# --------------------------------------------------------------------------- visible_patch_mean
def _vpm_cases() -> list[Case]:
    x = _attrs()
    spm = torch.tensor([[False, False, False, True, True], [False] * 5])
    vpm = cm.visible_patch_mean
    return [
        Case(
            "visible_patch_mean",
            "integer attributes",
            lambda: vpm(x.long(), 2, VIS),
            Raises(("attributes",), ("int64",)),
        ),
        Case(
            "visible_patch_mean",
            "attributes of rank 2",
            lambda: vpm(x[0], 2, VIS),
            Raises(("attributes",), ("(5, 3)",)),
        ),
        Case(
            "visible_patch_mean",
            "group_size=0",
            lambda: vpm(x, 0, VIS),
            Raises(("group_size",), ("0",)),
        ),
        Case(
            "visible_patch_mean",
            "group_size='2'",
            lambda: vpm(x, "2", VIS),
            Raises(("group_size",), ("'2'",)),
        ),
        Case(
            "visible_patch_mean",
            "float patch_visible_mask",
            lambda: vpm(x, 2, VIS.float()),
            Raises(("patch_visible_mask",), ("float32",)),
        ),
        Case(
            "visible_patch_mean",
            "patch_visible_mask [2, 2] for P=3",
            lambda: vpm(x, 2, VIS[:, :2]),
            Raises(("patch_visible_mask",), ("(2, 2)",)),
        ),
        Case(
            "visible_patch_mean",
            "float site_padding_mask",
            lambda: vpm(x, 2, VIS, site_padding_mask=spm.float()),
            Raises(("site_padding_mask",), ("float32",)),
        ),
        Case(
            "visible_patch_mean",
            "site_padding_mask [2, 4] for s=5",
            lambda: vpm(x, 2, VIS, site_padding_mask=spm[:, :4]),
            Raises(("site_padding_mask",), ("(2, 4)",)),
        ),
        Case(
            "visible_patch_mean",
            "empty batch b=0",
            lambda: vpm(x[:0], 2, VIS[:0]),
            Returns("empty [0, 3]", shape_is(0, 3)),
        ),
        Case(
            "visible_patch_mean",
            "NaN/inf at padding sites",
            lambda: vpm(_with_nan(_with_nan(x, (0, 3)), (0, 4)), 2, VIS, site_padding_mask=spm),
            Returns(
                "bit-identical to clean padding sites",
                _eq(lambda: vpm(x, 2, VIS, site_padding_mask=spm)),
            ),
        ),
        Case(
            "visible_patch_mean",
            "NaN at a real visible site of sample 1",
            lambda: vpm(_with_nan(x, (1, 2)), 2, VIS),
            Returns("NaN reaches sample 1 only", nan_in_sample_only(1), finite=False),
        ),
        Case(
            "visible_patch_mean",
            "NaN at a site of a hidden patch",
            lambda: vpm(_with_nan(x, (0, 2)), 2, VIS),
            Returns("hidden patch never read: bit-identical", _eq(lambda: vpm(x, 2, VIS))),
        ),
        Case(
            "visible_patch_mean",
            "non-contiguous attributes",
            lambda: vpm(nc(x), 2, VIS),
            Returns("same as contiguous", _eq(lambda: vpm(x, 2, VIS))),
        ),
    ]


# --------------------------------------------------------------------------- visible_site_mean
def _vsm_cases() -> list[Case]:
    x = _attrs(s=4)  # s=4 sites, g=2 -> P=2 patches; 2 steps -> 4 tokens
    sp = cm.grouped_random_masking(2, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    fn = cm.visible_site_mean(2)
    return [
        Case(
            "visible_site_mean",
            "group_size='2'",
            lambda: cm.visible_site_mean("2"),
            Raises(("group_size",), ("'2'",)),
        ),
        Case(
            "visible_site_mean",
            "group_size=0",
            lambda: cm.visible_site_mean(0),
            Raises(("group_size",), ("0",)),
        ),
        Case(
            "visible_site_mean",
            "cond_fn: static a list",
            lambda: fn([[0.0]], None, sp, None),
            Raises(("static",), ("list",)),
        ),
        Case(
            "visible_site_mean",
            "cond_fn: static of rank 2",
            lambda: fn(x[0], None, sp, None),
            Raises(("static",), ("(4, 3)",)),
        ),
        Case(
            "visible_site_mean",
            "cond_fn: split a tuple",
            lambda: fn(x, None, (sp[0], sp[1]), None),
            Raises(("split",), ("tuple",)),
        ),
        Case(
            "visible_site_mean",
            "cond_fn: split over 5 tokens for P=2 patches",
            lambda: fn(x, None, _split(2, 5), None),
            Raises(("split",), ("5",)),
        ),
        Case(
            "visible_site_mean",
            "cond_fn: split batch 3 for static batch 2",
            lambda: fn(x, None, _split(3, 4), None),
            Raises(("split",), ("3",)),
        ),
        Case(
            "visible_site_mean",
            "cond_fn: valid input",
            lambda: fn(x, None, sp, None),
            Returns(
                "equals visible_patch_mean over the steps' visible patches",
                _eq(lambda: cm.visible_patch_mean(x, 2, sp.visible_mask.view(2, 2, 2).any(dim=1))),
            ),
        ),
    ]


# --------------------------------------------------------------------------- SpatioTemporalQueryPos
def _qpos_cases() -> list[Case]:
    q = _qpos()
    ids = torch.tensor([[0, 5, 11], [3, 4, 0]])
    STQP = cm.SpatioTemporalQueryPos
    return [
        Case(
            "SpatioTemporalQueryPos",
            "num_patches='4'",
            lambda: STQP("4", 6, 3),
            Raises(("num_patches",), ("'4'",)),
        ),
        Case(
            "SpatioTemporalQueryPos",
            "dim=5 (odd, sin-cos time table)",
            lambda: STQP(4, 5, 3),
            Raises(("dim",), ("5",)),
        ),
        Case(
            "SpatioTemporalQueryPos",
            "max_time_steps=0",
            lambda: STQP(4, 6, 0),
            Raises(("max_time_steps",), ("0",)),
        ),
        Case(
            "SpatioTemporalQueryPos",
            "float patch_index",
            lambda: STQP(4, 6, 3, patch_index=torch.zeros(2)),
            Raises(("patch_index",), ("float32",)),
        ),
        Case(
            "SpatioTemporalQueryPos",
            "patch_index value 4 for num_patches=4",
            lambda: STQP(4, 6, 3, patch_index=torch.tensor([0, 4])),
            Raises(("patch_index",), ("4",)),
        ),
        Case(
            "SpatioTemporalQueryPos",
            "empty patch_index",
            lambda: STQP(4, 6, 3, patch_index=torch.zeros(0, dtype=torch.long)),
            Raises(("patch_index",)),
        ),
        Case(
            "SpatioTemporalQueryPos",
            "time_table [2, 6] for max_time_steps=3",
            lambda: STQP(4, 6, 3, time_table=torch.zeros(2, 6)),
            Raises(("time_table",), ("(2, 6)",)),
        ),
        Case(
            "SpatioTemporalQueryPos",
            "integer time_table",
            lambda: STQP(4, 6, 3, time_table=torch.zeros(3, 6, dtype=torch.long)),
            Raises(("time_table",), ("int64",)),
        ),
        Case(
            "SpatioTemporalQueryPos.forward",
            "float ids",
            lambda: q(ids.float()),
            Raises(("ids",), ("float32",)),
        ),
        Case(
            "SpatioTemporalQueryPos.forward",
            "ids of rank 1",
            lambda: q(ids[0]),
            Raises(("ids",), ("(3,)",)),
        ),
        Case(
            "SpatioTemporalQueryPos.forward",
            "id 12 = max_time_steps * L",
            lambda: q(torch.tensor([[12]])),
            KernelError("ids are not range-checked on the host (it would sync)"),
        ),
        Case(
            "SpatioTemporalQueryPos.forward",
            "empty batch b=0",
            lambda: q(ids[:0]),
            Returns("empty [0, 3, 6]", shape_is(0, 3, 6)),
        ),
        Case(
            "SpatioTemporalQueryPos.forward",
            "non-contiguous ids",
            lambda: q(nc(ids)),
            Returns("same as contiguous", _eq(lambda: q(ids))),
        ),
        Case(
            "SpatioTemporalQueryPos.num_tokens",
            "num_steps=0",
            lambda: q.num_tokens(0),
            Raises(("num_steps",), ("0",)),
        ),
        Case(
            "SpatioTemporalQueryPos.num_tokens",
            "num_steps=4 > max_time_steps=3",
            lambda: q.num_tokens(4),
            Raises(("num_steps", "max_time_steps"), ("4",)),
        ),
    ]


# --------------------------------------------------------------------------- token_valid_mask_from_pixels
def _tvm_cases() -> list[Case]:
    land = torch.tensor([[True, True, False, False]] * 2 + [[True] * 4] * 2)  # [4, 4]
    ids = torch.tensor([[0, 3], [1, 2]])
    tvm = cm.token_valid_mask_from_pixels
    return [
        Case(
            "token_valid_mask_from_pixels",
            "float pixel_valid_mask",
            lambda: tvm(land.float(), 2, ids),
            Raises(("pixel_valid_mask",), ("float32",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "pixel_valid_mask of rank 1",
            lambda: tvm(land[0], 2, ids),
            Raises(("pixel_valid_mask",), ("(4,)",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "patch_size='2'",
            lambda: tvm(land, "2", ids),
            Raises(("patch_size",), ("'2'",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "patch_size=0",
            lambda: tvm(land, 0, ids),
            Raises(("patch_size",), ("0",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "patch_size 3 for a 4x4 map",
            lambda: tvm(land, 3, ids),
            Raises(("pixel_valid_mask", "patch_size"), ("3",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "float ids",
            lambda: tvm(land, 2, ids.float()),
            Raises(("ids",), ("float32",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "ids of rank 1",
            lambda: tvm(land, 2, ids[0]),
            Raises(("ids",), ("(2,)",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "map batch 3 for ids batch 2",
            lambda: tvm(land.expand(3, 4, 4), 2, ids),
            Raises(("pixel_valid_mask", "ids"), ("3",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "in_chans=0",
            lambda: tvm(land, 2, ids, in_chans=0),
            Raises(("in_chans",), ("0",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "float patch_index",
            lambda: tvm(land, 2, ids, patch_index=torch.zeros(2)),
            Raises(("patch_index",), ("float32",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "patch_index value 4 for a 2x2 grid",
            lambda: tvm(land, 2, ids, patch_index=torch.tensor([0, 4])),
            KernelError(
                "patch_index values are not range-checked per call (ModalityLoss checks them once)"
            ),
        ),
        Case(
            "ModalityLoss",
            "patch_index value 4 for a 2x2 grid",
            lambda: cm.ModalityLoss(
                pixel_valid_mask=land, patch_size=2, patch_index=torch.tensor([0, 4])
            ),
            Raises(("patch_index",), ("4",)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "id 8 past a [b, t=2, H, W] map",
            lambda: tvm(land.expand(2, 2, 4, 4), 2, torch.tensor([[8], [0]])),
            KernelError("ids are not range-checked on the host (it would sync)"),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "empty batch b=0",
            lambda: tvm(land, 2, ids[:0]),
            Returns("empty [0, 2, 4]", shape_is(0, 2, 4)),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "in_chans=2, patches (0, 3)",
            lambda: tvm(land, 2, ids[:1], in_chans=2),
            Returns(
                "each pixel's flag repeated per channel",
                _eq(lambda: torch.tensor([[[True] * 8, [True] * 8]])),
            ),
        ),
        Case(
            "token_valid_mask_from_pixels",
            "half-valid patch 1",
            lambda: tvm(land, 2, torch.tensor([[1]])),
            Returns(
                "patch 1 (top right) is all invalid", _eq(lambda: torch.tensor([[[False] * 4]]))
            ),
        ),
    ]


# --------------------------------------------------------------------------- ModalityLoss
def _loss_cases() -> list[Case]:
    land = torch.ones(4, 4, dtype=torch.bool)
    pred, target = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    ids = torch.tensor([[0, 1, 0], [2, 0, 0]])
    plain, raster = cm.ModalityLoss(), cm.ModalityLoss(pixel_valid_mask=land, patch_size=2)
    ML = cm.ModalityLoss

    def call(loss: cm.ModalityLoss, **kw: Any) -> Any:
        args: dict[str, Any] = dict(
            pred=pred, target=target, padding_mask=pad, valid_mask=valid, ids=ids
        )
        args.update(kw)
        return loss(args.pop("pred"), args.pop("target"), **args)

    return [
        Case(
            "ModalityLoss",
            "average='mean'",
            lambda: ML(average="mean"),
            Raises(("average",), ("'mean'",)),
        ),
        Case("ModalityLoss", "in_chans=0", lambda: ML(in_chans=0), Raises(("in_chans",), ("0",))),
        Case(
            "ModalityLoss",
            "pixel_valid_mask without patch_size",
            lambda: ML(pixel_valid_mask=land),
            Raises(("patch_size",)),
        ),
        Case(
            "ModalityLoss",
            "float pixel_valid_mask",
            lambda: ML(pixel_valid_mask=land.float(), patch_size=2),
            Raises(("pixel_valid_mask",), ("float32",)),
        ),
        Case(
            "ModalityLoss",
            "patch_size='2'",
            lambda: ML(pixel_valid_mask=land, patch_size="2"),
            Raises(("patch_size",), ("'2'",)),
        ),
        Case(
            "ModalityLoss",
            "patch_size 3 for a 4x4 map",
            lambda: ML(pixel_valid_mask=land, patch_size=3),
            Raises(("pixel_valid_mask", "patch_size"), ("3",)),
        ),
        Case(
            "ModalityLoss",
            "float patch_index",
            lambda: ML(pixel_valid_mask=land, patch_size=2, patch_index=torch.zeros(2)),
            Raises(("patch_index",), ("float32",)),
        ),
        Case(
            "ModalityLoss",
            "patch_index without pixel_valid_mask",
            lambda: ML(patch_index=torch.tensor([0])),
            Raises(("patch_index", "pixel_valid_mask")),
        ),
        Case(
            "ModalityLoss.forward",
            "integer pred",
            lambda: call(plain, pred=pred.long()),
            Raises(("pred",), ("int64",)),
        ),
        Case(
            "ModalityLoss.forward",
            "target [2, 3, 5] for pred [2, 3, 4]",
            lambda: call(plain, target=randn(2, 3, 5)),
            Raises(("target",), ("(2, 3, 5)",)),
        ),
        Case(
            "ModalityLoss.forward",
            "float padding_mask",
            lambda: call(plain, padding_mask=pad.float()),
            Raises(("padding_mask",), ("float32",)),
        ),
        Case(
            "ModalityLoss.forward",
            "float valid_mask (pixel map)",
            lambda: call(raster, valid_mask=valid.float()),
            Raises(("valid_mask",), ("float32",)),
        ),
        Case(
            "ModalityLoss.forward",
            "float ids (pixel map)",
            lambda: call(raster, ids=ids.float()),
            Raises(("ids",), ("float32",)),
        ),
        Case(
            "ModalityLoss.forward",
            "NaN/inf in padded slots",
            lambda: call(
                plain, pred=_with_nan(pred, (1, 2, 0)), target=_with_nan(target, (0, 2, 1))
            ),
            Returns("bit-identical to clean padded slots", _eq(lambda: call(plain))),
        ),
        Case(
            "ModalityLoss.forward",
            "NaN in sample 1's real prediction",
            lambda: call(plain, pred=_with_nan(pred, (1, 0, 0))),
            Returns("NaN reaches sample 1 only", nan_in_sample_only(1), finite=False),
        ),
        Case(
            "ModalityLoss.forward",
            "all-valid pixel map",
            lambda: call(raster),
            Returns("same as without a pixel map", _eq(lambda: call(plain))),
        ),
        Case(
            "ModalityLoss.forward",
            "empty batch b=0",
            lambda: call(
                plain,
                pred=pred[:0],
                target=target[:0],
                padding_mask=pad[:0],
                valid_mask=valid[:0],
                ids=ids[:0],
            ),
            Returns("empty [0]", shape_is(0)),
        ),
    ]


# --------------------------------------------------------------------------- padding_wins
def _pw_cases() -> list[Case]:
    sp = _split()
    pm = torch.zeros(2, 8, dtype=torch.bool)
    pm[0, 6:] = True
    pw = cm.padding_wins

    def check_pad(out: cm.MaskSplit) -> None:
        assert not bool((out.visible_mask & pm).any()), "a padding token stayed visible"
        assert not bool((out.predict_mask & pm).any()), "a padding token stayed predicted"
        out.validate(8)

    return [
        Case(
            "padding_wins",
            "split a tuple",
            lambda: pw(tuple(sp), pm),
            Raises(("split",), ("tuple",)),
        ),
        Case(
            "padding_wins",
            "float padding_mask",
            lambda: pw(sp, pm.float()),
            Raises(("padding_mask",), ("float32",)),
        ),
        Case(
            "padding_wins",
            "padding_mask [2, 7] for n=8",
            lambda: pw(sp, pm[:, :7]),
            Raises(("padding_mask",), ("(2, 7)",)),
        ),
        Case(
            "padding_wins",
            "padding_mask batch 3 for split batch 2",
            lambda: pw(sp, torch.zeros(3, 8, dtype=torch.bool)),
            Raises(("padding_mask",), ("(3, 8)",)),
        ),
        Case(
            "padding_wins",
            "padding_mask a list",
            lambda: pw(sp, pm.tolist()),
            Raises(("padding_mask",), ("list",)),
        ),
        Case(
            "padding_wins",
            "2 padding tokens in sample 0",
            lambda: pw(sp, pm),
            Returns("padding is neither visible nor predicted; result validates", check_pad),
        ),
        Case(
            "padding_wins",
            "empty batch b=0",
            lambda: pw(_split(0, 8), pm[:0]),
            Returns("empty split", shape_is(0, 4)),
        ),
    ]


# --------------------------------------------------------------------------- kernel table / plan
def _backend_cases() -> list[Case]:
    AP, KR = cm.AttentionPlan, cm.KernelRule

    def set_and_restore(rules: Any) -> Any:
        old = cm.kernel_table()
        try:
            cm.set_kernel_table(rules)
            return cm.kernel_table()
        finally:
            cm.set_kernel_table(old)

    def is_default_table(t: Any) -> None:
        assert t == cm.DEFAULT_KERNEL_TABLE and len(t) >= 1, repr(t)

    def is_tuple_of_rules(t: Any) -> None:
        assert isinstance(t, tuple) and all(isinstance(r, KR) for r in t), repr(t)

    def one_rule(t: Any) -> None:
        assert t == (KR(kernel="flex", head_dim=8),), repr(t)

    return [
        Case(
            "AttentionPlan", "kernel='fast'", lambda: AP("fast"), Raises(("kernel",), ("'fast'",))
        ),
        Case("AttentionPlan", "kernel=1", lambda: AP(1), Raises(("kernel",), ("1",))),
        Case(
            "AttentionPlan",
            "reorder='yes'",
            lambda: AP("varlen", reorder="yes"),
            Raises(("reorder",), ("'yes'",)),
        ),
        Case(
            "AttentionPlan",
            "trailing=1",
            lambda: AP("varlen", trailing=1),
            Raises(("trailing",), ("1",)),
        ),
        Case(
            "AttentionPlan",
            "eager=None",
            lambda: AP("short", eager=None),
            Raises(("eager",), ("None",)),
        ),
        Case(
            "AttentionPlan",
            "segmented=True with kernel='sdpa_mask' (only varlen has a segmented choice)",
            lambda: AP("sdpa_mask", segmented=True),
            Raises(("segmented", "kernel"), ("'sdpa_mask'",)),
        ),
        Case(
            "AttentionPlan",
            "segmented=1",
            lambda: AP("varlen", segmented=1),
            Raises(("segmented",), ("1",)),
        ),
        Case(
            "AttentionPlan",
            "sdpa_backends=('fast',)",
            lambda: AP("sdpa", sdpa_backends=("fast",)),
            Raises(("sdpa_backends",), ("'fast'",)),
        ),
        Case(
            "AttentionPlan",
            "sdpa_backends='flash' (a string)",
            lambda: AP("sdpa", sdpa_backends="flash"),
            Raises(("sdpa_backends",), ("'flash'",)),
        ),
        Case(
            "AttentionPlan",
            "self_segments=[1, 2] (not a pair of tensors)",
            lambda: AP("varlen", self_segments=[1, 2]),
            Raises(("self_segments",), ("list",)),
        ),
        Case(
            "AttentionPlan.reordered",
            "a varlen plan",
            lambda: AP("varlen", reorder=True).reordered(),
            Returns("reorder=False, trailing=True", _eq_plan(AP("varlen", trailing=True))),
        ),
        Case(
            "KernelRule",
            "kernel='sdpa'",
            lambda: KR(kernel="sdpa"),
            Raises(("kernel",), ("'sdpa'",)),
        ),
        Case("KernelRule", "head_dim=0", lambda: KR(head_dim=0), Raises(("head_dim",), ("0",))),
        Case(
            "KernelRule", "head_dim='8'", lambda: KR(head_dim="8"), Raises(("head_dim",), ("'8'",))
        ),
        Case(
            "KernelRule",
            "max_keys=True",
            lambda: KR(max_keys=True),
            Raises(("max_keys",), ("True",)),
        ),
        Case(
            "KernelRule", "padded='yes'", lambda: KR(padded="yes"), Raises(("padded",), ("'yes'",))
        ),
        Case(
            "KernelRule",
            "sdpa_backends='flash' (a string)",
            lambda: KR(sdpa_backends="flash"),
            Raises(("sdpa_backends",), ("'flash'",)),
        ),
        Case(
            "KernelRule",
            "sdpa_backends=('fast',)",
            lambda: KR(sdpa_backends=("fast",)),
            Raises(("sdpa_backends",), ("'fast'",)),
        ),
        Case(
            "KernelRule",
            "min_keys=9 > max_keys=4",
            lambda: KR(min_keys=9, max_keys=4),
            Raises(("min_keys", "max_keys"), ("9", "4")),
        ),
        Case(
            "KernelRule",
            "kernel='short' with padded=True (it takes no mask)",
            lambda: KR(kernel="short", padded=True),
            Raises(("kernel", "padded"), ("'short'", "True")),
        ),
        Case(
            "KernelRule", "eager=0", lambda: KR(kernel="short", eager=0), Raises(("eager",), ("0",))
        ),
        Case(
            "KernelRule",
            "eager=False with kernel='varlen' (only the Triton kernels have an eager choice)",
            lambda: KR(kernel="varlen", eager=False),
            Raises(("eager", "kernel"), ("False", "'varlen'")),
        ),
        Case(
            "KernelRule",
            "kernel='segmented' with padded=False",
            lambda: KR(kernel="segmented", padded=False),
            Raises(("kernel", "padded"), ("'segmented'", "False")),
        ),
        Case(
            "set_kernel_table",
            "rules a KernelRule (not a sequence)",
            lambda: set_and_restore(KR()),
            Raises(("rules",), ("KernelRule",)),
        ),
        Case(
            "set_kernel_table",
            "rules a string",
            lambda: set_and_restore("flex"),
            Raises(("rules",), ("str",)),
        ),
        Case(
            "set_kernel_table",
            "rules holding a dict",
            lambda: set_and_restore([{"kernel": "flex"}]),
            Raises(("rules",), ("dict",)),
        ),
        Case(
            "set_kernel_table",
            "a list of one rule",
            lambda: set_and_restore([KR(kernel="flex", head_dim=8)]),
            Returns("kernel_table() is that rule, as a tuple", one_rule),
        ),
        Case(
            "set_kernel_table",
            "None (restore the default)",
            lambda: set_and_restore(None),
            Returns("kernel_table() is DEFAULT_KERNEL_TABLE", is_default_table),
        ),
        Case(
            "set_kernel_table",
            "an empty tuple (no rule)",
            lambda: set_and_restore(()),
            Returns("kernel_table() is ()", lambda t: _assert(t == (), repr(t))),
        ),
        Case(
            "kernel_table",
            "no arguments (default table)",
            cm.kernel_table,
            Returns("a tuple of KernelRule", is_tuple_of_rules),
        ),
    ]


def _eq_plan(expected: cm.AttentionPlan) -> Callable[[Any], None]:
    def check(result: Any) -> None:
        assert result == expected, f"{result!r} != {expected!r}"

    return check


# --------------------------------------------------------------------------- MaskSplit methods
def _split_cases() -> list[Case]:
    sp = _split()
    one = cm.MaskSplit(*(t[0] for t in sp))
    wide = cm.random_masking(1, 8, 0.25, generator=torch.Generator().manual_seed(1))

    def collated(out: cm.MaskSplit) -> None:
        assert tuple(out.ids_keep.shape) == (2, 6), tuple(out.ids_keep.shape)
        out.validate(8)

    return [
        Case(
            "MaskSplit.validate",
            "num_tokens='8'",
            lambda: sp.validate("8"),
            Raises(("num_tokens",), ("'8'",)),
        ),
        Case(
            "MaskSplit.validate",
            "num_tokens=9 for an 8-token split",
            lambda: sp.validate(9),
            Raises(("num_tokens",), ("9",)),
        ),
        Case(
            "MaskSplit.validate",
            "num_tokens=-1",
            lambda: sp.validate(-1),
            Raises(("num_tokens",), ("-1",)),
        ),
        Case(
            "MaskSplit.validate",
            "a valid split",
            lambda: sp.validate(8),
            Returns("returns the split itself", _eq(lambda: sp)),
        ),
        Case(
            "MaskSplit.to",
            "non_blocking='yes'",
            lambda: sp.to("cpu", non_blocking="yes"),
            Raises(("non_blocking",), ("'yes'",)),
        ),
        Case(
            "MaskSplit.to",
            "device='gpu0' (no such device)",
            lambda: sp.to("gpu0"),
            Raises(("device",), ("'gpu0'",)),
        ),
        Case("MaskSplit.to", "device=3.5", lambda: sp.to(3.5), Raises(("device",), ("3.5",))),
        Case(
            "MaskSplit.to",
            "device='cpu'",
            lambda: sp.to("cpu"),
            Returns("same split", _eq(lambda: sp)),
        ),
        Case(
            "MaskSplit.collate",
            "splits a MaskSplit",
            lambda: cm.MaskSplit.collate(sp),
            Raises(("splits",), ("MaskSplit",)),
        ),
        Case(
            "MaskSplit.collate",
            "empty list",
            lambda: cm.MaskSplit.collate([]),
            Raises(("splits",), ("list",)),
        ),
        Case(
            "MaskSplit.collate",
            "splits holding a tuple",
            lambda: cm.MaskSplit.collate([sp, tuple(sp)]),
            Raises(("splits",), ("tuple",)),
        ),
        Case(
            "MaskSplit.collate",
            "splits over 8 and 6 tokens",
            lambda: cm.MaskSplit.collate([sp, _split(1, 6)]),
            Raises(("splits",), ("6", "8")),
        ),
        Case(
            "MaskSplit.collate",
            "one sample (k=4) + a batch of one (k=6)",
            lambda: cm.MaskSplit.collate([one, wide]),
            Returns("re-padded to k=6; result validates", collated),
        ),
    ]


# --------------------------------------------------------------------------- distributed
def _dist_cases() -> list[Case]:
    gsm, gml = cdist.global_sample_mean, cdist.global_multimodal_loss
    per, scored = randn(3), torch.tensor([True, False, True])
    model = shared_water()

    def water_out() -> Any:
        with torch.no_grad():
            return model(
                water_inputs(2), static=water_static(2), generator=torch.Generator().manual_seed(0)
            )

    def weights() -> dict[str, float]:
        return {n: 1.0 for n in model.names}

    def equals_loss(total: Any) -> None:
        out = water_out()
        torch.testing.assert_close(total, out.loss)

    return [
        Case(
            "distributed.global_sample_mean",
            "integer per_sample",
            lambda: gsm(per.long(), scored),
            Raises(("per_sample",), ("int64",)),
        ),
        Case(
            "distributed.global_sample_mean",
            "per_sample of rank 2",
            lambda: gsm(per[None], scored),
            Raises(("per_sample",), ("(1, 3)",)),
        ),
        Case(
            "distributed.global_sample_mean",
            "float scored",
            lambda: gsm(per, scored.float()),
            Raises(("scored",), ("float32",)),
        ),
        Case(
            "distributed.global_sample_mean",
            "scored [2] for per_sample [3]",
            lambda: gsm(per, scored[:2]),
            Raises(("scored",), ("(2,)",)),
        ),
        Case(
            "distributed.global_sample_mean",
            "no scored sample",
            lambda: gsm(torch.zeros(3), torch.zeros(3, dtype=torch.bool)),
            Returns("0", _eq(lambda: torch.tensor(0.0))),
        ),
        Case(
            "distributed.global_sample_mean",
            "empty batch b=0",
            lambda: gsm(per[:0], scored[:0]),
            Returns("0", _eq(lambda: torch.tensor(0.0))),
        ),
        Case(
            "distributed.global_sample_mean",
            "one device",
            lambda: gsm(per, scored),
            Returns("sum / scored count", _eq(lambda: per.sum() / 2)),
        ),
        Case(
            "distributed.global_multimodal_loss",
            "output a dict",
            lambda: gml({}, {}),
            Raises(("output",), ("dict",)),
        ),
        Case(
            "distributed.global_multimodal_loss",
            "weights a list of names",
            lambda: gml(water_out(), list(model.names)),
            Raises(("weights",), ("list",)),
        ),
        Case(
            "distributed.global_multimodal_loss",
            "weights missing a modality",
            lambda: gml(water_out(), {model.names[0]: 1.0}),
            Raises(("weights",), (model.names[1],)),
        ),
        Case(
            "distributed.global_multimodal_loss",
            "weight 'one'",
            lambda: gml(water_out(), {**weights(), model.names[0]: "one"}),
            Raises(("weights",), ("'one'",)),
        ),
        Case(
            "distributed.global_multimodal_loss",
            "the model's loss weights, one device",
            lambda: gml(
                water_out(), {n: float(m.loss_weight) for n, m in model.modalities.items()}
            ),
            Returns("equals output.loss", equals_loss),
        ),
    ]


# --------------------------------------------------------------------------- post-norm encoder
def _postnorm_cases() -> list[Case]:
    torch.manual_seed(0)
    blk = cm.PostNormBlock(8, 2).eval()
    enc = cm.PostNormTransformerEncoder(8, 2, 2, cond_dim=3).eval()
    x = randn(2, 5, 8)
    pad = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    g, bt = randn(2, 8, seed=3), randn(2, 8, seed=4)
    cond = randn(2, 3, seed=5)

    def run_enc(t: torch.Tensor = x, m: Any = pad, c: Any = cond, **kw: Any) -> Any:
        return enc(t, m, cond=c, **kw).tokens

    def real_same(result: Any) -> None:
        ref = run_enc()
        torch.testing.assert_close(result[0, :3], ref[0, :3], rtol=0, atol=0)
        torch.testing.assert_close(result[1], ref[1], rtol=0, atol=0)

    def blk_real_same(result: Any) -> None:
        ref = blk(x, pad)
        torch.testing.assert_close(result[0, :3], ref[0, :3], rtol=0, atol=0)

    nan_pad = _with_nan(_with_nan(x, (0, 3, 1)), (0, 4, 0))
    all_pad = torch.tensor([[True] * 5, [False] * 5])
    return [
        Case("PostNormBlock", "dim=0", lambda: cm.PostNormBlock(0, 2), Raises(("dim",), ("0",))),
        Case(
            "PostNormBlock.forward",
            "x int64 tokens",
            lambda: blk(x.long()),
            Raises(("x",), ("int64",)),
        ),
        Case(
            "PostNormBlock.forward", "x of rank 2", lambda: blk(x[0]), Raises(("x",), ("(5, 8)",))
        ),
        Case(
            "PostNormBlock.forward",
            "x with the wrong width",
            lambda: blk(randn(2, 5, 6)),
            Raises(("x",), ("6",)),
        ),
        Case(
            "PostNormBlock.forward",
            "x float64 into a float32 module",
            lambda: blk(x.double()),
            Raises(("x",), ("float64",)),
        ),
        Case(
            "PostNormBlock.forward",
            "padding_mask float",
            lambda: blk(x, pad.float()),
            Raises(("padding_mask",), ("float32",)),
        ),
        Case(
            "PostNormBlock.forward",
            "padding_mask with another length",
            lambda: blk(x, pad[:, :4]),
            Raises(("padding_mask",), ("(2, 4)",)),
        ),
        Case(
            "PostNormBlock.forward",
            "gamma without beta",
            lambda: blk(x, pad, gamma=g),
            Raises(("gamma", "beta")),
        ),
        Case(
            "PostNormBlock.forward",
            "gamma [2, 6] for dim=8",
            lambda: blk(x, pad, gamma=g[:, :6], beta=bt),
            Raises(("gamma",), ("(2, 6)",)),
        ),
        Case(
            "PostNormBlock.forward",
            "integer beta",
            lambda: blk(x, pad, gamma=g, beta=bt.long()),
            Raises(("beta",), ("int64",)),
        ),
        Case(
            "PostNormBlock.forward",
            "NaN/inf in padded slots",
            lambda: blk(nan_pad, pad),
            Returns("real outputs bit-identical", blk_real_same),
        ),
        Case(
            "PostNormBlock.forward",
            "a sample whose tokens are all padding",
            lambda: blk(x, all_pad),
            Returns("finite"),
        ),
        Case(
            "PostNormBlock.forward",
            "empty batch (b=0)",
            lambda: blk(x[:0], pad[:0]),
            Returns("[0, n, c]", shape_is(0, 5, 8)),
        ),
        Case(
            "PostNormBlock.forward",
            "zero tokens (n=0)",
            lambda: blk(x[:, :0], pad[:, :0]),
            Returns("[b, 0, c]", shape_is(2, 0, 8)),
        ),
        Case(
            "PostNormBlock.forward",
            "non-contiguous x",
            lambda: blk(nc(x), pad),
            Returns("same as contiguous", same_as(lambda: blk(x, pad))),
        ),
        Case(
            "PostNormTransformerEncoder",
            "depth=-1",
            lambda: cm.PostNormTransformerEncoder(8, -1, 2),
            Raises(("depth",), ("-1",)),
        ),
        Case(
            "PostNormTransformerEncoder",
            "cond_dim=0",
            lambda: cm.PostNormTransformerEncoder(8, 1, 2, cond_dim=0),
            Raises(("cond_dim",), ("0",)),
        ),
        Case(
            "PostNormTransformerEncoder",
            "norm_features=True, final_norm=False",
            lambda: cm.PostNormTransformerEncoder(8, 1, 2, final_norm=False, norm_features=True),
            Raises(("norm_features", "final_norm")),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "tokens int64",
            lambda: run_enc(x.long()),
            Raises(("tokens",), ("int64",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "tokens with the wrong width",
            lambda: run_enc(randn(2, 5, 6)),
            Raises(("tokens",), ("6",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "tokens float64 into a float32 module",
            lambda: run_enc(x.double()),
            Raises(("tokens",), ("float64",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "padding_mask float",
            lambda: run_enc(m=pad.float()),
            Raises(("padding_mask",), ("float32",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "cond missing (built with cond_dim)",
            lambda: run_enc(c=None),
            Raises(("cond",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "cond [2, 4] for cond_dim=3",
            lambda: run_enc(c=randn(2, 4)),
            Raises(("cond",), ("(2, 4)",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "return_layers=5 for depth 2",
            lambda: run_enc(return_layers=5),
            Raises(("return_layers",), ("5",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "NaN/inf in padded slots",
            lambda: run_enc(nan_pad),
            Returns("real outputs bit-identical", real_same),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "NaN in a real token of sample 1",
            lambda: run_enc(_with_nan(x, (1, 0, 0))),
            Returns("NaN propagates to sample 1 only", nan_in_sample_only(1), finite=False),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "NaN in sample 1's cond",
            lambda: run_enc(c=_with_nan(cond, (1, 0))),
            Returns("NaN propagates to sample 1 only", nan_in_sample_only(1), finite=False),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "a sample whose tokens are all padding",
            lambda: run_enc(m=all_pad),
            Returns("finite"),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "empty batch (b=0)",
            lambda: run_enc(x[:0], pad[:0], cond[:0]),
            Returns("[0, n, c]", shape_is(0, 5, 8)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "capacity=True",
            lambda: run_enc(capacity=True),
            Raises(("capacity",), ("True",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "capacity=-1",
            lambda: run_enc(capacity=-1),
            Raises(("capacity",), ("-1",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "capacity a float",
            lambda: run_enc(capacity=8.0),
            Raises(("capacity",), ("8.0",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "capacity smaller than the real tokens",
            lambda: run_enc(capacity=7),
            Raises(("capacity",), ("7",)),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "capacity with NaN/inf in padded slots",
            lambda: run_enc(nan_pad, capacity=8),
            Returns(
                "equals the padded forward on real slots, 0 in padding",
                same_as(lambda: run_enc().masked_fill(pad[..., None], 0.0), atol=1e-6, rtol=1e-6),
            ),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "capacity, a sample whose tokens are all padding",
            lambda: run_enc(m=all_pad, capacity=5),
            Returns("finite"),
        ),
        Case(
            "PostNormTransformerEncoder.forward",
            "non-contiguous tokens",
            lambda: run_enc(nc(x)),
            Returns("same as contiguous", same_as(lambda: run_enc())),
        ),
    ]


# --------------------------------------------------------------------------- decode_together
def _decs(count: int = 2) -> list[cm.CrossMAEDecoder]:
    torch.manual_seed(0)
    return [cm.CrossMAEDecoder(8, 8, 1, 2, 3 + i, num_tokens=10) for i in range(count)]


def _together_cases() -> list[Case]:
    decs = _decs()
    ctx = randn(3, 5, 8)
    pad = torch.tensor([[False, False, True, False, True]] * 3)
    ids = [torch.tensor([[0, 1, 2]] * 3), torch.tensor([[3, 4]] * 3)]

    def run(c: torch.Tensor = ctx, i: Any = ids, **kw: Any) -> Any:
        return cm.decode_together(decs, c, i, context_padding_mask=pad, **kw)

    zeroed = ctx.masked_fill(pad[..., None], 0.0)
    poisoned = ctx.masked_fill(pad[..., None], float("nan"))
    sample1 = ctx.clone()
    sample1[1, 0, 0] = float("nan")  # a real slot of sample 1
    api = "decode_together"
    return [
        Case(api, "decoders one module, not a sequence",
             lambda: cm.decode_together(decs[0], ctx, ids),  # type: ignore[arg-type]
             Raises(("decoders",), ("CrossMAEDecoder",))),
        Case(api, "decoders empty", lambda: cm.decode_together([], ctx, []),
             Raises(("decoders",), ("empty",))),
        Case(api, "decoders holding an MAEDecoder",
             lambda: cm.decode_together([cm.MAEDecoder(8, 8, 1, 2, 3, 10)], ctx, ids[:1]),  # type: ignore[list-item]
             Raises(("decoders[0]",), ("MAEDecoder",))),
        Case(api, "ids_predict one tensor, not a sequence", lambda: run(i=ids[0]),
             Raises(("ids_predict",), ("Tensor",))),
        Case(api, "ids_predict for 1 of 2 decoders", lambda: run(i=ids[:1]),
             Raises(("ids_predict",), ("1",))),
        Case(api, "float ids_predict", lambda: run(i=[x.float() for x in ids]),
             Raises(("decoders[0]", "ids_predict"), ("float32",))),
        Case(api, "query_padding_masks for 1 of 2 decoders",
             lambda: run(query_padding_masks=[None]), Raises(("query_padding_masks",), ("1",))),
        Case(api, "context width 5 for context_dim=8", lambda: run(c=randn(3, 5, 5)),
             Raises(("context",), ("(3, 5, 5)",))),
        Case(api, "empty batch b=0",
             lambda: cm.decode_together(decs, randn(0, 5, 8), [x[:0] for x in ids]),
             Returns("empty [0, p, o] per decoder", shape_is(0, 3, 3))),
        Case(api, "one decoder predicting no token (p=0)",
             lambda: run(i=[ids[0], ids[1][:, :0]]),
             Returns("[3, 0, 4] for it", lambda r: _assert(tuple(r[1].shape) == (3, 0, 4),
                                                           str(tuple(r[1].shape))))),
        Case(api, "NaN in padded context slots", lambda: run(c=poisoned),
             Returns("same as zeros there", _eq(lambda: run(c=zeroed)))),
        Case(api, "NaN in a real context slot of sample 1", lambda: run(c=sample1),
             Returns("NaN reaches sample 1 only", nan_in_sample_only(1, pick=lambda r: r[0]),
                     finite=False)),
        Case(api, "non-contiguous context", lambda: run(c=nc(ctx)),
             Returns("same as contiguous", _eq(lambda: run()))),
        Case(api, "equal to each decoder alone", lambda: run(),
             Returns("decoder i's own forward", same_as(lambda: [
                 d(ctx, i, context_padding_mask=pad) for d, i in zip(decs, ids)]))),
    ]  # fmt: skip


def _assert(ok: bool, msg: str) -> None:
    assert ok, msg


# --------------------------------------------------------------------------- compile_blocks
def _compile_blocks_cases() -> list[Case]:
    api = "compile_blocks"
    return [
        Case(api, "model an int", lambda: cm.compile_blocks(3),  # type: ignore[arg-type]
             Raises(("model",), ("int",))),
        Case(api, "types a list", lambda: cm.compile_blocks(_decs(1)[0], types=[cm.Block]),  # type: ignore[arg-type]
             Raises(("types",), ("[",))),
        Case(api, "types empty", lambda: cm.compile_blocks(_decs(1)[0], types=()),
             Raises(("types",), ("()",))),
        Case(api, "a model without blocks", lambda: cm.compile_blocks(torch.nn.Linear(2, 2)),
             Raises(("model",), ("Linear",))),
    ]  # fmt: skip


def _capture_cases() -> list[Case]:
    api = "capture_step"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], capturable=False)
    return [
        Case(api, "step an int", lambda: cm.capture_step(3),  # type: ignore[arg-type]
             Raises(("step",), ("int",))),
        Case(api, "an optimizer built with capturable=False",
             lambda: cm.capture_step(lambda: None, optimizers=[opt]),
             Raises(("optimizers[0]",), ("capturable=False",))),
        Case(api, "a CPU generator",
             lambda: cm.capture_step(lambda: None, generators=[torch.Generator()]),
             Raises(("generators[0]",), ("cpu",))),
        Case(api, "warmup=0", lambda: cm.capture_step(lambda: None, warmup=0),
             Raises(("warmup",), ("0",))),
    ]  # fmt: skip


CASES = (
    _film_cases()
    + _vpm_cases()
    + _vsm_cases()
    + _qpos_cases()
    + _tvm_cases()
    + _loss_cases()
    + _pw_cases()
    + _backend_cases()
    + _split_cases()
    + _dist_cases()
    + _postnorm_cases()
    + _together_cases()
    + _compile_blocks_cases()
    + _capture_cases()
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_coverage_case(case: Case, rec: Recorder) -> None:
    run_case(rec, case)
