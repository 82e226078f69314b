"""Bad and extreme inputs for the encoder, the decoders, the image and multimodal models,
their configs, builders and presets, the official-checkpoint loader, and the record types.

Models are tiny (see ``reliability_helpers``): the image model is ``crossmae_vit_small`` at
16x16 pixels, 4x4 patches, 2 + 2 blocks; the water model is `water_mae_small` with 2 steps,
20x20 rasters (3 land patches), 8 sites in groups of 4, width 16.

Legend: ``b`` batch, ``n`` tokens, ``m`` context tokens, ``p`` predicted slots, ``k``
feature maps, ``c`` width. Polarity: ``*_padding_mask`` True = padding, ``missing`` True =
modality absent for that sample.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reliability_helpers import (
    IMAGE_PATCHES,
    MODALITIES,
    WATER_TINY,
    Case,
    KernelError,
    Raises,
    Recorder,
    Returns,
    build_image,
    gen,
    images,
    nan_in_sample_only,
    nc,
    pad_mask,
    rand,
    randn,
    run_case,
    same_as,
    shape_is,
    shared_image,
    shared_water,
    water_inputs,
    water_static,
)
from torch import Tensor

import crossmae as cm
from crossmae.models import official_key_for


def _assert(cond: bool, msg: str) -> None:
    assert cond, msg


def _zeroed(out: cm.EncoderOutput, pad: Tensor) -> cm.EncoderOutput:
    """``out`` with padding slots set to 0 (what ``capacity=`` returns there)."""
    feats = out.features
    if feats is not None:
        feats = feats.masked_fill(pad[None, ..., None], 0.0)
    return cm.EncoderOutput(out.tokens.masked_fill(pad[..., None], 0.0), out.padding_mask, feats)


def with_value(t: Tensor, index: tuple[Any, ...], value: float) -> Tensor:
    out = t.clone()
    out[index] = value
    return out


# --------------------------------------------------------------------------- encoder, FiLM
def enc(**kw: Any) -> cm.TransformerEncoder:
    torch.manual_seed(0)
    return cm.TransformerEncoder(8, 2, 2, cond_dim=3, **kw).eval()


def plain_enc() -> cm.TransformerEncoder:
    torch.manual_seed(0)
    return cm.TransformerEncoder(8, 2, 2).eval()


def _encoder_cases() -> list[Case]:
    E = "TransformerEncoder"
    tok = lambda b=2, n=4, c=8: randn(b, n, c)  # noqa: E731
    cond = lambda b=2, a=3: randn(b, a, seed=1)  # noqa: E731
    pm = pad_mask([4, 2], 4)
    cases = [
        Case(
            E,
            "tokens with the wrong width",
            lambda: enc()(tok(c=6), cond=cond()),
            Raises(("tokens",), ("6",)),
        ),
        Case(
            E,
            "tokens int64",
            lambda: enc()(tok().long(), cond=cond()),
            Raises(("tokens",), ("torch.int64",)),
        ),
        Case(
            E,
            "tokens of rank 2",
            lambda: enc()(tok()[0], cond=cond()),
            Raises(("tokens",), ("(4, 8)",)),
        ),
        Case(
            E,
            "tokens float64 into a float32 encoder",
            lambda: plain_enc()(tok().double()),
            Raises(("tokens",), ("torch.float64",)),
        ),
        Case(
            E,
            "padding_mask float",
            lambda: enc()(tok(), pm.float(), cond=cond()),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            E,
            "padding_mask of another length",
            lambda: enc()(tok(), pad_mask([4, 2], 5), cond=cond()),
            Raises(("padding_mask",), ("(2, 5)",)),
        ),
        Case(
            E,
            "cond missing (encoder built with cond_dim)",
            lambda: enc()(tok()),
            Raises(("cond",), ("None",)),
        ),
        Case(
            E,
            "cond of another batch",
            lambda: enc()(tok(), cond=cond(b=3)),
            Raises(("cond",), ("(3, 3)",)),
        ),
        Case(
            E,
            "cond of another width",
            lambda: enc()(tok(), cond=cond(a=4)),
            Raises(("cond",), ("(2, 4)",)),
        ),
        Case(
            E,
            "cond int64",
            lambda: enc()(tok(), cond=cond().long()),
            Raises(("cond",), ("torch.int64",)),
        ),
        Case(
            E,
            "cond given to an encoder without cond_dim",
            lambda: plain_enc()(tok(), cond=cond()),
            Raises(("cond",)),
        ),
        Case(
            E,
            "return_layers=5 (depth 2)",
            lambda: plain_enc()(tok(), return_layers=5),
            Raises(("return_layers",), ("5",)),
        ),
        Case(
            E,
            "return_layers='last'",
            lambda: plain_enc()(tok(), return_layers="last"),
            Raises(("return_layers",), ("'last'",)),
        ),
        Case(
            E,
            "return_layers=[0, 0]",
            lambda: plain_enc()(tok(), return_layers=[0, 0]),
            Raises(("return_layers",), ("[0, 0]",)),
        ),
        Case(
            E,
            "return_layers=[1.0]",
            lambda: plain_enc()(tok(), return_layers=[1.0]),
            Raises(("return_layers",), ("1.0",)),
        ),
        Case(
            E,
            "include_input without return_layers",
            lambda: plain_enc()(tok(), include_input=True),
            Raises(("include_input", "return_layers")),
        ),
        Case(
            E,
            "return_layers=-1 with include_input",
            lambda: plain_enc()(tok(), return_layers=-1, include_input=True).features,
            Returns("[2, b, n, c] (input + last block)", shape_is(2, 2, 4, 8)),
        ),
        Case(
            E,
            "empty batch (b=0)",
            lambda: enc()(tok(b=0), cond=cond(b=0), return_layers="all"),
            Returns(
                "empty outputs",
                lambda r: _assert(tuple(r.features.shape) == (2, 0, 4, 8), str(r.features.shape)),
            ),
        ),
        Case(
            E,
            "zero tokens (n=0)",
            lambda: enc()(tok(n=0), pad_mask([0, 0], 0), cond=cond()),
            Returns("[b, 0, c]", shape_is(2, 0, 8)),
        ),
        Case(
            E,
            "a sample whose tokens are all padding",
            lambda: enc()(tok(), pad_mask([4, 0], 4), cond=cond(), return_layers="all"),
            Returns("finite tokens and features"),
        ),
        Case(
            E,
            "NaN in a real token of sample 0",
            lambda: enc()(with_value(tok(), (0, 0, 0), float("nan")), pm, cond=cond()).tokens,
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            E,
            "NaN in cond of sample 1",
            lambda: enc()(tok(), pm, cond=with_value(cond(), (1, 0), float("nan"))).tokens,
            Returns("NaN propagates to sample 1 only", nan_in_sample_only(1), finite=False),
        ),
        Case(
            E,
            "NaN/inf in padded slots",
            lambda: enc()(
                with_value(with_value(tok(), (1, 3, 0), float("nan")), (1, 2, 1), float("inf")),
                pm,
                cond=cond(),
                return_layers="all",
            ).tokens[1, :2],
            Returns(
                "real outputs unchanged",
                same_as(lambda: enc()(tok(), pm, cond=cond()).tokens[1, :2]),
            ),
        ),
        Case(
            E,
            "non-contiguous tokens, mask, cond",
            lambda: enc()(nc(tok()), nc(pm), cond=nc(cond()), return_layers="all"),
            Returns(
                "same result as contiguous",
                same_as(lambda: enc()(tok(), pm, cond=cond(), return_layers="all")),
            ),
        ),
        Case(
            E,
            "float32 cond into a bfloat16 encoder (side input)",
            lambda: enc().bfloat16()(tok().bfloat16(), cond=cond()).tokens,
            Returns(
                "works, bfloat16 tokens", lambda r: _assert(r.dtype == torch.bfloat16, str(r.dtype))
            ),
        ),
        Case(
            E,
            "capacity=True",
            lambda: enc()(tok(), pm, cond=cond(), capacity=True),
            Raises(("capacity",), ("True",)),
        ),
        Case(
            E,
            "capacity=-1",
            lambda: enc()(tok(), pm, cond=cond(), capacity=-1),
            Raises(("capacity",), ("-1",)),
        ),
        Case(
            E,
            "capacity a float",
            lambda: enc()(tok(), pm, cond=cond(), capacity=8.0),
            Raises(("capacity",), ("8.0",)),
        ),
        Case(
            E,
            "capacity smaller than the real tokens",
            lambda: enc()(tok(), pm, cond=cond(), capacity=5),
            Raises(("capacity",), ("5",)),
        ),
        Case(
            E,
            "capacity without padding_mask, below b*n",
            lambda: enc()(tok(), cond=cond(), capacity=7),
            Raises(("capacity",), ("7",)),
        ),
        Case(
            E,
            "capacity with NaN/inf in padded slots",
            lambda: enc()(
                with_value(with_value(tok(), (1, 3, 0), float("nan")), (1, 2, 1), float("inf")),
                pm,
                cond=cond(),
                return_layers="all",
                capacity=8,
            ),
            Returns(
                "equals the padded forward on real slots, 0 in padding",
                same_as(
                    lambda: _zeroed(enc()(tok(), pm, cond=cond(), return_layers="all"), pm),
                    atol=1e-6,
                    rtol=1e-6,
                ),
            ),
        ),
        Case(
            E,
            "capacity, a sample whose tokens are all padding",
            lambda: enc()(tok(), pad_mask([4, 0], 4), cond=cond(), return_layers="all", capacity=4),
            Returns("finite tokens and features"),
        ),
        Case(
            E,
            "capacity, NaN in a real token of sample 0",
            lambda: (
                enc()(
                    with_value(tok(), (0, 0, 0), float("nan")), pm, cond=cond(), capacity=6
                ).tokens
            ),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(E, "depth=-1", lambda: cm.TransformerEncoder(8, -1, 2), Raises(("depth",), ("-1",))),
        Case(
            E,
            "num_heads=3 with dim=8",
            lambda: cm.TransformerEncoder(8, 1, 3),
            Raises(("dim", "num_heads"), ("3",)),
        ),
        Case(
            E,
            "drop_path=1.0",
            lambda: cm.TransformerEncoder(8, 1, 2, drop_path=1.0),
            Raises(("drop_path",), ("1.0",)),
        ),
        Case(
            E,
            "cond_dim=0",
            lambda: cm.TransformerEncoder(8, 1, 2, cond_dim=0),
            Raises(("cond_dim",), ("0",)),
        ),
        Case(
            E,
            "depth=0",
            lambda: cm.TransformerEncoder(8, 0, 2)(tok()),
            Returns("final norm of the input", shape_is(2, 4, 8)),
        ),
    ]
    F = "FiLM"
    film = lambda: (torch.manual_seed(0), cm.FiLM(3, 8))[1]  # noqa: E731
    cases += [
        Case(
            F,
            "cond of another batch",
            lambda: film()(tok(), cond(b=3)),
            Raises(("cond",), ("(3, 3)",)),
        ),
        Case(
            F,
            "cond of another width",
            lambda: film()(tok(), cond(a=4)),
            Raises(("cond",), ("(2, 4)",)),
        ),
        Case(
            F,
            "cond int64",
            lambda: film()(tok(), cond().long()),
            Raises(("cond",), ("torch.int64",)),
        ),
        Case(F, "x with the wrong width", lambda: film()(tok(c=6), cond()), Raises(("x",), ("6",))),
        Case(
            F,
            "float32 cond into a bfloat16 FiLM (side input)",
            lambda: film().bfloat16()(tok().bfloat16(), cond()),
            Returns(
                "works, bfloat16 output", lambda r: _assert(r.dtype == torch.bfloat16, str(r.dtype))
            ),
        ),
        Case(
            F,
            "empty batch (b=0)",
            lambda: film()(tok(b=0), cond(b=0)),
            Returns("[0, n, c]", shape_is(0, 4, 8)),
        ),
        Case(
            F,
            "non-contiguous x and cond",
            lambda: film()(nc(tok()), nc(cond())),
            Returns("same as contiguous", same_as(lambda: film()(tok(), cond()))),
        ),
        Case(F, "cond_dim=0", lambda: cm.FiLM(0, 8), Raises(("cond_dim",), ("0",))),
    ]
    return cases


# --------------------------------------------------------------------------- decoders
def xdec(**kw: Any) -> cm.CrossMAEDecoder:
    torch.manual_seed(0)
    return cm.CrossMAEDecoder(6, 8, 2, 2, 5, num_tokens=10, num_feature_maps=3, **kw).eval()


def maedec(**kw: Any) -> cm.MAEDecoder:
    torch.manual_seed(0)
    return cm.MAEDecoder(6, 8, 1, 2, 5, num_tokens=10, **kw).eval()


def _decoder_cases() -> list[Case]:
    D = "CrossMAEDecoder"
    ctx4 = lambda k=3, b=2, m=4, e=6: randn(k, b, m, e, seed=2)  # noqa: E731
    ids = torch.tensor([[1, 7, 9], [0, 3, 0]])
    qpm = pad_mask([3, 2], 3)
    cpm = pad_mask([4, 1], 4)
    cases = [
        Case(
            D,
            "context of rank 3 for a WFM decoder",
            lambda: xdec()(ctx4()[0], ids),
            Raises(("context",), ("(2, 4, 6)",)),
        ),
        Case(
            D,
            "context with the wrong width",
            lambda: xdec()(ctx4(e=5), ids),
            Raises(("context",), ("5",)),
        ),
        Case(
            D,
            "context with the wrong map count",
            lambda: xdec()(ctx4(k=2), ids),
            Raises(("context",), ("(2, 2, 4, 6)",)),
        ),
        Case(
            D,
            "context int64",
            lambda: xdec()(ctx4().long(), ids),
            Raises(("context",), ("torch.int64",)),
        ),
        Case(
            D,
            "context float64 into a float32 decoder",
            lambda: xdec()(ctx4().double(), ids),
            Raises(("context",), ("torch.float64",)),
        ),
        Case(
            D,
            "ids_predict float",
            lambda: xdec()(ctx4(), ids.float()),
            Raises(("ids_predict",), ("torch.float32",)),
        ),
        Case(
            D,
            "ids_predict a list",
            lambda: xdec()(ctx4(), ids.tolist()),
            Raises(("ids_predict",), ("list",)),
        ),
        Case(D, "ids_predict of rank 1", lambda: xdec()(ctx4(), ids[0]), Raises(("ids_predict",))),
        Case(
            D,
            "ids_predict of another batch",
            lambda: xdec()(ctx4(), ids[:1]),
            Raises(("ids_predict",), ("1",)),
        ),
        Case(
            D,
            "ids_predict >= num_tokens",
            lambda: xdec()(ctx4(), torch.tensor([[10, 0, 0], [0, 0, 0]])),
            KernelError("out-of-range ids are not checked (device sync)"),
        ),
        Case(
            D,
            "context_padding_mask float",
            lambda: xdec()(ctx4(), ids, context_padding_mask=cpm.float()),
            Raises(("context_padding_mask",), ("torch.float32",)),
        ),
        Case(
            D,
            "context_padding_mask of another length",
            lambda: xdec()(ctx4(), ids, context_padding_mask=pad_mask([4, 1], 5)),
            Raises(("context_padding_mask",), ("(2, 5)",)),
        ),
        Case(
            D,
            "query_padding_mask sized like the context",
            lambda: xdec()(ctx4(), ids, query_padding_mask=cpm),
            Raises(("query_padding_mask",), ("(2, 4)",)),
        ),
        Case(
            D,
            "pos with the wrong width",
            lambda: xdec()(ctx4(), ids, pos=randn(10, 4)),
            Raises(("pos",), ("4",)),
        ),
        Case(
            D,
            "pos [b', n, c] of another batch",
            lambda: xdec()(ctx4(), ids, pos=randn(3, 10, 8)),
            Raises(("pos",), ("(3, 10, 8)",)),
        ),
        Case(
            D,
            "pos of rank 1",
            lambda: xdec()(ctx4(), ids, pos=randn(8)),
            Raises(("pos",), ("(8,)",)),
        ),
        Case(
            D,
            "pos int64",
            lambda: xdec()(ctx4(), ids, pos=torch.ones(10, 8, dtype=torch.long)),
            Raises(("pos",), ("torch.int64",)),
        ),
        Case(
            D,
            "pos missing (built with pos_embed=None)",
            lambda: xdec(pos_embed=None)(ctx4(), ids),
            Raises(("pos",)),
        ),
        Case(
            D,
            "pos float64 table (side input)",
            lambda: xdec()(ctx4(), ids, pos=randn(10, 8, dtype=torch.float64)),
            Returns(
                "cast to the decoder dtype",
                lambda r: _assert(r.dtype == torch.float32, str(r.dtype)),
            ),
        ),
        Case(
            D,
            "empty batch (b=0)",
            lambda: xdec()(ctx4(b=0), ids[:0]),
            Returns("[0, p, o]", shape_is(0, 3, 5)),
        ),
        Case(
            D,
            "zero queries (p=0)",
            lambda: xdec()(ctx4(), ids[:, :0]),
            Returns("[b, 0, o]", shape_is(2, 0, 5)),
        ),
        Case(
            D,
            "zero context tokens (m=0)",
            lambda: xdec()(ctx4(m=0), ids, context_padding_mask=pad_mask([0, 0], 0)),
            Returns("finite predictions from the queries alone", shape_is(2, 3, 5)),
        ),
        Case(
            D,
            "a sample with every context token padded",
            lambda: xdec()(
                ctx4(), ids, context_padding_mask=pad_mask([4, 0], 4), query_padding_mask=qpm
            ),
            Returns("finite"),
        ),
        Case(
            D,
            "NaN in a real context token of sample 0",
            lambda: xdec()(
                with_value(ctx4(), (0, 0, 0, 0), float("nan")), ids, context_padding_mask=cpm
            ),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            D,
            "NaN in padded context slots",
            lambda: xdec()(
                with_value(ctx4(), (slice(None), 1, slice(1, 4)), float("nan")),
                ids,
                context_padding_mask=cpm,
                query_padding_mask=qpm,
            ),
            Returns(
                "unchanged",
                same_as(
                    lambda: xdec()(ctx4(), ids, context_padding_mask=cpm, query_padding_mask=qpm)
                ),
            ),
        ),
        Case(
            D,
            "non-contiguous context, ids, masks",
            lambda: xdec()(
                nc(ctx4()), nc(ids), context_padding_mask=nc(cpm), query_padding_mask=nc(qpm)
            ),
            Returns(
                "same as contiguous",
                same_as(
                    lambda: xdec()(ctx4(), ids, context_padding_mask=cpm, query_padding_mask=qpm)
                ),
            ),
        ),
        Case(
            D,
            "depth=0",
            lambda: cm.CrossMAEDecoder(6, 8, 0, 2, 5, num_tokens=10),
            Raises(("depth",), ("0",)),
        ),
        Case(
            D,
            "pos_embed='sincos'",
            lambda: cm.CrossMAEDecoder(6, 8, 1, 2, 5, num_tokens=10, pos_embed="sincos"),
            Raises(("pos_embed",), ("'sincos'",)),
        ),
        Case(
            D,
            "pos_embed='learned' without num_tokens",
            lambda: cm.CrossMAEDecoder(6, 8, 1, 2, 5),
            Raises(("num_tokens",), ("None",)),
        ),
        Case(
            D,
            "pos_embed table of another width",
            lambda: cm.CrossMAEDecoder(6, 8, 1, 2, 5, pos_embed=randn(10, 4)),
            Raises(("pos_embed",), ("4",)),
        ),
        Case(
            D,
            "num_feature_maps=0",
            lambda: cm.CrossMAEDecoder(6, 8, 1, 2, 5, num_tokens=10, num_feature_maps=0),
            Raises(("num_feature_maps",), ("0",)),
        ),
        Case(
            D,
            "out_dim=0",
            lambda: cm.CrossMAEDecoder(6, 8, 1, 2, 0, num_tokens=10),
            Raises(("out_dim",), ("0",)),
        ),
    ]
    M = "MAEDecoder"
    ctx3 = lambda b=2, m=3, e=6: randn(b, m, e, seed=3)  # noqa: E731
    keep = torch.tensor([[2, 5, 8], [4, 0, 0]])
    kpm = pad_mask([3, 1], 3)
    pred_ids = torch.tensor([[0, 9], [1, 2]])
    full = pad_mask([10, 8], 10)
    cases += [
        Case(
            M,
            "context with the wrong width",
            lambda: maedec()(ctx3(e=5), keep, pred_ids),
            Raises(("context",), ("5",)),
        ),
        Case(
            M,
            "context int64",
            lambda: maedec()(ctx3().long(), keep, pred_ids),
            Raises(("context",), ("torch.int64",)),
        ),
        Case(
            M,
            "ids_keep not matching the context",
            lambda: maedec()(ctx3(), keep[:, :2], pred_ids),
            Raises(("ids_keep",), ("(2, 2)",)),
        ),
        Case(
            M,
            "ids_keep float",
            lambda: maedec()(ctx3(), keep.float(), pred_ids),
            Raises(("ids_keep",), ("torch.float32",)),
        ),
        Case(
            M,
            "ids_predict float",
            lambda: maedec()(ctx3(), keep, pred_ids.float()),
            Raises(("ids_predict",), ("torch.float32",)),
        ),
        Case(
            M,
            "padding_mask of another length",
            lambda: maedec()(ctx3(), keep, pred_ids, padding_mask=pad_mask([9, 9], 9)),
            Raises(("padding_mask",), ("(2, 9)",)),
        ),
        Case(
            M,
            "context_padding_mask float",
            lambda: maedec()(ctx3(), keep, pred_ids, context_padding_mask=kpm.float()),
            Raises(("context_padding_mask",), ("torch.float32",)),
        ),
        Case(
            M,
            "query_padding_mask of another shape",
            lambda: maedec()(ctx3(), keep, pred_ids, query_padding_mask=kpm),
            Raises(("query_padding_mask",), ("(2, 3)",)),
        ),
        Case(
            M,
            "ids_keep == num_tokens (one past the end)",
            lambda: maedec()(
                ctx3(), torch.tensor([[2, 5, 10], [4, 0, 0]]), pred_ids, context_padding_mask=kpm
            ),
            KernelError("out-of-range ids are never silently dropped"),
        ),
        Case(
            M,
            "ids_predict >= num_tokens",
            lambda: maedec()(
                ctx3(), keep, torch.tensor([[10, 0], [1, 2]]), context_padding_mask=kpm
            ),
            KernelError("out-of-range ids are not checked (device sync)"),
        ),
        Case(
            M,
            "pos [n-1, c]",
            lambda: maedec(pos_embed=None)(ctx3(), keep, pred_ids, pos=randn(9, 8)),
            Raises(("pos",), ("(9, 8)",)),
        ),
        Case(
            M,
            "pos with the wrong width",
            lambda: maedec(pos_embed=None)(ctx3(), keep, pred_ids, pos=randn(10, 4)),
            Raises(("pos",), ("(10, 4)",)),
        ),
        Case(
            M,
            "pos [b', n, c] of another batch",
            lambda: maedec(pos_embed=None)(ctx3(), keep, pred_ids, pos=randn(3, 10, 8)),
            Raises(("pos",), ("(3, 10, 8)",)),
        ),
        Case(
            M,
            "pos missing (built with pos_embed=None)",
            lambda: maedec(pos_embed=None)(ctx3(), keep, pred_ids),
            Raises(("pos",)),
        ),
        Case(
            M,
            "empty batch (b=0)",
            lambda: maedec()(ctx3(b=0), keep[:0], pred_ids[:0]),
            Returns("[0, p, o]", shape_is(0, 2, 5)),
        ),
        Case(
            M,
            "nothing visible (m=0)",
            lambda: maedec()(ctx3(m=0), keep[:, :0], pred_ids),
            Returns("finite predictions", shape_is(2, 2, 5)),
        ),
        Case(
            M,
            "nothing predicted (p=0)",
            lambda: maedec()(ctx3(), keep, pred_ids[:, :0], context_padding_mask=kpm),
            Returns("[b, 0, o]", shape_is(2, 0, 5)),
        ),
        Case(
            M,
            "NaN in padded visible slots",
            lambda: maedec()(
                with_value(ctx3(), (1, slice(1, 3)), float("nan")),
                keep,
                pred_ids,
                context_padding_mask=kpm,
                padding_mask=full,
            ),
            Returns(
                "unchanged",
                same_as(
                    lambda: maedec()(
                        ctx3(), keep, pred_ids, context_padding_mask=kpm, padding_mask=full
                    )
                ),
            ),
        ),
        Case(
            M,
            "NaN in a real visible token of sample 0",
            lambda: maedec()(
                with_value(ctx3(), (0, 0, 0), float("nan")),
                keep,
                pred_ids,
                context_padding_mask=kpm,
            ),
            Returns("NaN propagates to sample 0 only", nan_in_sample_only(0), finite=False),
        ),
        Case(
            M,
            "non-contiguous inputs",
            lambda: maedec()(
                nc(ctx3()),
                nc(keep),
                nc(pred_ids),
                context_padding_mask=nc(kpm),
                padding_mask=nc(full),
            ),
            Returns(
                "same as contiguous",
                same_as(
                    lambda: maedec()(
                        ctx3(), keep, pred_ids, context_padding_mask=kpm, padding_mask=full
                    )
                ),
            ),
        ),
        Case(
            M,
            "depth=-1",
            lambda: cm.MAEDecoder(6, 8, -1, 2, 5, num_tokens=10),
            Raises(("depth",), ("-1",)),
        ),
        Case(
            M,
            "out_dim=0",
            lambda: cm.MAEDecoder(6, 8, 1, 2, 0, num_tokens=10),
            Raises(("out_dim",), ("0",)),
        ),
        Case(
            M,
            "num_tokens=0 with a learned table",
            lambda: cm.MAEDecoder(6, 8, 1, 2, 5, num_tokens=0),
            Raises(("num_tokens",), ("0",)),
        ),
    ]
    return cases


# --------------------------------------------------------------------------- image model
def fixed_split(b: int = 2) -> cm.MaskSplit:
    return cm.random_masking(
        b, IMAGE_PATCHES, 0.75, predict_ratio=0.25, noise=rand(b, IMAGE_PATCHES, seed=11)
    )


def pixel_of_patch(k: int) -> tuple[int, int]:
    return (k // 4) * 4, (k % 4) * 4


def nan_in_patch(split: cm.MaskSplit, field: str, sample: int = 0) -> Tensor:
    """Images with one NaN pixel in a patch of ``split.<field>`` (``ids_keep`` etc.)."""
    if field == "skipped":
        skipped = ~(split.visible_mask | split.predict_mask)
        k = int(torch.nonzero(skipped[sample])[0])
    else:
        k = int(getattr(split, field)[sample, 0])
    r, c = pixel_of_patch(k)
    return with_value(images(), (sample, 0, r, c), float("nan"))


def _image_cases() -> list[Case]:
    I_ = "ImageCrossMAE"
    m = shared_image
    sp = fixed_split
    cases = [
        Case(I_, "imgs of rank 3", lambda: m()(images()[0]), Raises(("imgs",), ("(3, 16, 16)",))),
        Case(I_, "imgs int64", lambda: m()(images().long()), Raises(("imgs",), ("torch.int64",))),
        Case(
            I_,
            "imgs with 1 channel",
            lambda: m()(images()[:, :1]),
            Raises(("imgs",), ("(2, 1, 16, 16)",)),
        ),
        Case(
            I_,
            "imgs of another size",
            lambda: m()(images()[..., :12]),
            Raises(("imgs",), ("(2, 3, 16, 12)",)),
        ),
        Case(
            I_,
            "mask_ratio=1.0",
            lambda: m()(images(), mask_ratio=1.0),
            Raises(("mask_ratio",), ("1.0",)),
        ),
        Case(
            I_,
            "predict_ratio > mask_ratio",
            lambda: m()(images(), mask_ratio=0.5, predict_ratio=0.6),
            Raises(("predict_ratio",), ("0.6",)),
        ),
        Case(
            I_,
            "noise [b, N+1]",
            lambda: m()(images(), noise=rand(2, IMAGE_PATCHES + 1)),
            Raises(("noise",), ("(2, 17)",)),
        ),
        Case(
            I_,
            "split and mask_ratio together",
            lambda: m()(images(), split=sp(), mask_ratio=0.5),
            Raises(("split", "mask_ratio")),
        ),
        Case(
            I_,
            "split a tuple",
            lambda: m()(images(), split=tuple(sp())),
            Raises(("split",), ("tuple",)),
        ),
        Case(
            I_,
            "split of another batch",
            lambda: m()(images(), split=fixed_split(3)),
            Raises(("split",), ("(3, 16)",)),
        ),
        Case(
            I_,
            "split with a float keep_padding_mask",
            lambda: m()(
                images(), split=sp()._replace(keep_padding_mask=sp().keep_padding_mask.float())
            ),
            Raises((("split", "keep_padding_mask"),), ("torch.float32",)),
        ),
        Case(
            I_,
            "split with float ids_keep",
            lambda: m()(images(), split=sp()._replace(ids_keep=sp().ids_keep.float())),
            Raises((("split", "ids_keep"),), ("torch.float32",)),
        ),
        Case(
            I_,
            "split with ids_predict >= N",
            lambda: m()(
                images(), split=sp()._replace(ids_predict=sp().ids_predict + IMAGE_PATCHES)
            ),
            KernelError("out-of-range ids are not checked (device sync)"),
        ),
        Case(I_, "dense='yes'", lambda: m()(images(), dense="yes"), Raises(("dense",), ("'yes'",))),
        Case(
            I_,
            "empty batch (b=0)",
            lambda: m()(images(b=0), generator=gen(0)),
            Returns(
                "loss 0, empty pred",
                lambda r: _assert(float(r.loss) == 0.0 and r.pred.shape[0] == 0, str(r.loss)),
            ),
        ),
        Case(
            I_,
            "NaN in a visible patch of sample 0",
            lambda: m()(nan_in_patch(sp(), "ids_keep"), split=sp()),
            Returns(
                "NaN propagates to sample 0's predictions and the loss",
                lambda r: (
                    nan_in_sample_only(0)(r.pred),
                    _assert(bool(torch.isnan(r.loss)), "loss finite"),
                )[1],
                finite=False,
            ),
        ),
        Case(
            I_,
            "NaN in a predicted patch of sample 0",
            lambda: m()(nan_in_patch(sp(), "ids_predict"), split=sp()),
            Returns(
                "a missing target value (issue 9 target rule): not scored; loss, target "
                "and predictions finite",
                lambda r: (
                    _assert(bool(torch.isfinite(r.pred).all()), "pred NaN"),
                    _assert(bool(torch.isfinite(r.loss)), "loss not finite"),
                    _assert(bool(torch.isfinite(r.target).all()), "target not finite"),
                )[1],
            ),
        ),
        Case(
            I_,
            "NaN in a hidden, not predicted patch",
            lambda: m()(nan_in_patch(sp(), "skipped"), split=sp()),
            Returns(
                "unchanged: unused pixels are never read",
                same_as(lambda: m()(images(), split=sp())),
            ),
        ),
        Case(
            I_,
            "channels_last imgs",
            lambda: m()(images().to(memory_format=torch.channels_last), split=sp()),
            Returns(
                "same as contiguous",
                same_as(lambda: m()(images(), split=sp()), rtol=1e-5, atol=1e-5),
            ),
        ),
        Case(
            I_,
            "non-contiguous split and noise",
            lambda: m()(
                images(),
                noise=nc(rand(2, IMAGE_PATCHES, seed=11)),
                mask_ratio=0.75,
                predict_ratio=0.25,
            ),
            Returns("same as contiguous", same_as(lambda: m()(images(), split=sp(), dense=True))),
        ),
        Case(
            I_,
            "float64 imgs",
            lambda: m()(images(dtype=torch.float64), split=sp()),
            Returns(
                "cast to the model dtype (documented)",
                lambda r: _assert(r.pred.dtype == torch.float32, str(r.pred.dtype)),
            ),
        ),
        Case(
            I_,
            "reconstruct with a float visible mask",
            lambda: m().reconstruct(images(), sp().visible_mask.float()),
            Raises(("split_or_visible_mask",), ("torch.float32",)),
        ),
        Case(
            I_,
            "reconstruct with nothing visible",
            lambda: m().reconstruct(images(), torch.zeros(2, IMAGE_PATCHES, dtype=torch.bool)),
            Returns("finite [b, C, H, W]", shape_is(2, 3, 16, 16)),
        ),
        Case(
            I_,
            "reconstruct with everything visible",
            lambda: m().reconstruct(images(), torch.ones(2, IMAGE_PATCHES, dtype=torch.bool)),
            Returns("the input itself", same_as(images)),
        ),
        Case(
            I_,
            "random_split(batch_size=-1)",
            lambda: m().random_split(-1),
            Raises(("batch_size",), ("-1",)),
        ),
        Case(
            I_,
            "decoder context_dim != encoder width",
            lambda: cm.ImageCrossMAE(
                m().patch_embed,
                m().encoder,
                cm.CrossMAEDecoder(8, 8, 1, 2, 48, num_tokens=16),
                img_size=16,
                patch_size=4,
                in_chans=3,
            ),
            Raises(("context_dim",), ("8",)),
        ),
    ]
    C = "ImageCrossMAEConfig"
    cases += [
        Case(
            C,
            "img_size not divisible by patch_size",
            lambda: cm.ImageCrossMAEConfig(img_size=30, patch_size=8),
            Raises(("img_size", "patch_size"), ("30",)),
        ),
        Case(
            C,
            "embed_dim not divisible by num_heads",
            lambda: cm.ImageCrossMAEConfig(embed_dim=20, num_heads=3),
            Raises(("embed_dim", "num_heads"), ("20",)),
        ),
        Case(
            C,
            "mask_ratio=1.0",
            lambda: cm.ImageCrossMAEConfig(mask_ratio=1.0),
            Raises(("mask_ratio",), ("1.0",)),
        ),
        Case(
            C,
            "predict_ratio=0",
            lambda: cm.ImageCrossMAEConfig(predict_ratio=0.0),
            Raises(("predict_ratio",), ("0.0",)),
        ),
        Case(
            C,
            "fm_layers=(12,) with depth 12",
            lambda: cm.ImageCrossMAEConfig(fm_layers=(12,)),
            Raises(("fm_layers",), ("12",)),
        ),
        Case(
            C,
            "use_cross_attn='yes'",
            lambda: cm.ImageCrossMAEConfig(use_cross_attn="yes"),
            Raises(("use_cross_attn",), ("'yes'",)),
        ),
        Case(
            C,
            "in_chans=0",
            lambda: cm.ImageCrossMAEConfig(in_chans=0),
            Raises(("in_chans",), ("0",)),
        ),
    ]
    EC, DC = "EncoderConfig", "DecoderConfig"
    cases += [
        Case(EC, "depth=0", lambda: cm.EncoderConfig(depth=0), Raises(("depth",), ("0",))),
        Case(
            EC,
            "drop_path=1.0",
            lambda: cm.EncoderConfig(drop_path=1.0),
            Raises(("drop_path",), ("1.0",)),
        ),
        Case(
            EC,
            "fused_attn='x'",
            lambda: cm.EncoderConfig(fused_attn="x"),
            Raises(("fused_attn",), ("'x'",)),
        ),
        Case(
            EC,
            "norm_eps=0",
            lambda: cm.EncoderConfig(norm_eps=0.0),
            Raises(("norm_eps",), ("0.0",)),
        ),
        Case(
            DC,
            "num_heads=3 with embed_dim=512",
            lambda: cm.DecoderConfig(num_heads=3),
            Raises(("embed_dim", "num_heads"), ("3",)),
        ),
        Case(
            DC,
            "mlp_ratio=0",
            lambda: cm.DecoderConfig(mlp_ratio=0.0),
            Raises(("mlp_ratio",), ("0.0",)),
        ),
        Case(
            DC, "self_attn=1", lambda: cm.DecoderConfig(self_attn=1), Raises(("self_attn",), ("1",))
        ),
    ]
    dcfg = cm.DecoderConfig(embed_dim=8, depth=1, num_heads=2)
    BC, BM, BE, BI = (
        "build_crossmae_decoder",
        "build_mae_decoder",
        "build_encoder",
        "build_image_crossmae",
    )
    cases += [
        Case(
            BE,
            "config a DecoderConfig",
            lambda: cm.build_encoder(dcfg),
            Raises(("config",), ("DecoderConfig",)),
        ),
        Case(
            BE,
            "tiny EncoderConfig",
            lambda: (
                cm.build_encoder(cm.EncoderConfig(embed_dim=8, depth=1, num_heads=2))(
                    randn(2, 3, 8)
                ).tokens
            ),
            Returns("[b, n, c]", shape_is(2, 3, 8)),
        ),
        Case(
            BC,
            "config with use_cross_attn=False",
            lambda: cm.build_crossmae_decoder(
                cm.DecoderConfig(embed_dim=8, depth=1, num_heads=2, use_cross_attn=False),
                context_dim=8,
                out_dim=4,
                grid_size=2,
            ),
            Raises(("use_cross_attn",)),
        ),
        Case(
            BC,
            "context_dim=0",
            lambda: cm.build_crossmae_decoder(dcfg, context_dim=0, out_dim=4, grid_size=2),
            Raises(("context_dim",), ("0",)),
        ),
        Case(
            BC,
            "grid_size=0",
            lambda: cm.build_crossmae_decoder(dcfg, context_dim=8, out_dim=4, grid_size=0),
            Raises(("grid_size",), ("0",)),
        ),
        Case(
            BC,
            "num_feature_maps=0",
            lambda: cm.build_crossmae_decoder(
                dcfg, context_dim=8, out_dim=4, grid_size=2, num_feature_maps=0
            ),
            Raises(("num_feature_maps",), ("0",)),
        ),
        Case(
            BC,
            "out_dim=0",
            lambda: cm.build_crossmae_decoder(dcfg, context_dim=8, out_dim=0, grid_size=2),
            Raises(("out_dim",), ("0",)),
        ),
        Case(
            BM,
            "out_dim=0",
            lambda: cm.build_mae_decoder(dcfg, context_dim=8, out_dim=0, grid_size=2),
            Raises(("out_dim",), ("0",)),
        ),
        Case(
            BM,
            "config an EncoderConfig",
            lambda: cm.build_mae_decoder(cm.EncoderConfig(), context_dim=8, out_dim=4, grid_size=2),
            Raises(("config",), ("EncoderConfig",)),
        ),
        Case(
            BM,
            "grid_size=(2, 0)",
            lambda: cm.build_mae_decoder(dcfg, context_dim=8, out_dim=4, grid_size=(2, 0)),
            Raises(("grid_size",), ("0",)),
        ),
        Case(
            BI,
            "config a dict",
            lambda: cm.build_image_crossmae({"img_size": 16}),
            Raises(("config",), ("dict",)),
        ),
    ]
    for preset in ("crossmae_vit_small", "crossmae_vit_base", "crossmae_vit_large"):
        fn = getattr(cm, preset)
        cfg_fn = getattr(cm, preset + "_config")
        cases += [
            Case(preset, "an unknown override", lambda fn=fn: fn(bogus=1), Raises(("bogus",))),
            Case(
                preset,
                "mask_ratio=2.0 override",
                lambda fn=fn: fn(
                    img_size=16, patch_size=4, depth=1, decoder_depth=1, mask_ratio=2.0
                ),
                Raises(("mask_ratio",), ("2.0",)),
            ),
            Case(
                preset,
                "tiny overrides (meta device)",
                lambda fn=fn: _on_meta(fn),
                Returns(
                    "an ImageCrossMAE",
                    lambda r: _assert(isinstance(r, cm.ImageCrossMAE), type(r).__name__),
                ),
            ),
            Case(
                preset + "_config",
                "an unknown override",
                lambda cfg_fn=cfg_fn: cfg_fn(bogus=1),
                Raises(("bogus",)),
            ),
            Case(
                preset + "_config",
                "patch_size=0 override",
                lambda cfg_fn=cfg_fn: cfg_fn(patch_size=0),
                Raises(("patch_size",), ("0",)),
            ),
        ]
    return cases


def _on_meta(fn: Any) -> cm.ImageCrossMAE:
    with torch.device("meta"):
        model: cm.ImageCrossMAE = fn(img_size=32, patch_size=8, depth=2, decoder_depth=2)
    return model


def official_state_dict(model: cm.ImageCrossMAE) -> dict[str, Tensor]:
    """Our state dict renamed to the official CrossMAE names (the fixed tables included)."""
    out: dict[str, Tensor] = {}
    depth = model.decoder.depth
    for key, value in model.state_dict().items():
        names = official_key_for(key, decoder_depth=depth)
        if len(names) == 1:
            out[names[0]] = value.clone()
        else:
            for j, name in enumerate(names):
                out[name] = value[j].clone()
    out["pos_embed"] = model.pos_embed.clone()
    table = model.decoder.pos_table
    assert table is not None
    out["decoder_pos_embed"] = torch.cat([table.new_zeros(1, table.shape[1]), table])[None]
    return out


def _official_cases() -> list[Case]:
    O_ = "load_official_crossmae_state_dict"
    load = cm.load_official_crossmae_state_dict
    sd = lambda: official_state_dict(shared_image())  # noqa: E731
    fresh = lambda: build_image(seed=5)  # noqa: E731
    return [
        Case(O_, "state_dict a list", lambda: load([1, 2]), Raises(("state_dict",), ("list",))),
        Case(
            O_, "a non-str key", lambda: load({1: torch.zeros(1)}), Raises(("state_dict",), ("1",))
        ),
        Case(
            O_,
            "a non-tensor value",
            lambda: load({"cls_token": 1.0}),
            Raises(("state_dict",), ("float",)),
        ),
        Case(O_, "model a string", lambda: load(sd(), "vit"), Raises(("model",), ("str",))),
        Case(O_, "strict='yes'", lambda: load(sd(), strict="yes"), Raises(("strict",), ("'yes'",))),
        Case(
            O_,
            "a tensor of the wrong shape",
            lambda: load({**sd(), "cls_token": torch.zeros(1, 1, 5)}, fresh()),
            Raises(("cls_token",), ("(1, 1, 5)",)),
        ),
        Case(
            O_,
            "a missing key (strict)",
            lambda: load({k: v for k, v in sd().items() if k != "mask_token"}, fresh()),
            Raises(("missing",), ("mask_token",)),
        ),
        Case(
            O_,
            "an MAE-decoder model",
            lambda: load(sd(), build_image(use_cross_attn=False)),
            Raises(("model",)),
        ),
        Case(
            O_,
            "our model's weights under the official names",
            lambda: load(sd(), fresh())[0](images(), split=fixed_split()),
            Returns(
                "loads strict; identical outputs",
                same_as(lambda: shared_image()(images(), split=fixed_split()), rtol=0, atol=0),
            ),
        ),
        Case(
            "OfficialLoadReport",
            "returned by the loader",
            lambda: load(sd(), fresh())[1],
            Returns(
                "ok, with every fixed table verified",
                lambda r: _assert(
                    r.ok and sorted(r.ignored) == ["decoder_pos_embed", "pos_embed"], str(r)
                ),
            ),
        ),
    ]


# --------------------------------------------------------------------------- water model
def _water_parts() -> tuple[Any, cm.TransformerEncoder, cm.CrossMAEDecoder]:
    torch.manual_seed(0)
    tok = cm.SeriesTokenizer(16, 8, group_size=4)
    return tok, cm.TransformerEncoder(16, 1, 2), cm.CrossMAEDecoder(16, 8, 1, 2, 4, num_tokens=4)


def _water_cases() -> list[Case]:
    W = "MultimodalMAE"
    m = shared_water
    x = water_inputs
    st = water_static
    g = lambda: gen(0)  # noqa: E731
    yes = torch.tensor([True, False])

    def splits() -> dict[str, cm.MaskSplit]:
        tok = m().tokenize(x())
        return m().make_splits({k: v[1] for k, v in tok.items()}, generator=g())

    def run(inputs: Any = None, **kw: Any) -> cm.MultimodalOutput:
        kw.setdefault("static", st())
        if "splits" not in kw:
            kw.setdefault("generator", g())
        return m()(x() if inputs is None else inputs, **kw)

    cases = [
        Case(
            W,
            "inputs missing a modality",
            lambda: run({k: v for k, v in x().items() if k != "river_flow"}),
            Raises(("inputs",), ("river_flow",)),
        ),
        Case(
            W,
            "inputs with an unknown modality",
            lambda: run({**x(), "snow": x()["precipitation"]}),
            Raises(("inputs",), ("snow",)),
        ),
        Case(
            W,
            "a raster of another spatial size",
            lambda: run({**x(), "precipitation": randn(2, 2, 21, 20)}),
            Raises((("inputs", "precipitation"),), ("21",)),
        ),
        Case(
            W,
            "a raster int64",
            lambda: run({**x(), "temperature": x()["temperature"].long()}),
            Raises((("inputs", "temperature"),), ("torch.int64",)),
        ),
        Case(
            W,
            "a raster a list",
            lambda: run({**x(), "temperature": x()["temperature"].tolist()}),
            Raises((("inputs", "temperature"),), ("list",)),
        ),
        Case(
            W,
            "modalities with different batch sizes",
            lambda: run({**x(), "evaporation": randn(3, 8, 2)}),
            Raises((("inputs", "evaporation"),), ("3",)),
        ),
        Case(
            W,
            "more steps than the model's num_steps (t=4 vs 2)",
            lambda: run(water_inputs(steps=4)),
            Raises((("inputs", "num_steps", "precipitation"),), ("4",)),
        ),
        Case(
            W,
            "t=3 steps for a 2-step model",
            lambda: run(water_inputs(steps=3)),
            Raises((("inputs", "num_steps", "precipitation"),)),
        ),
        Case(W, "static missing", lambda: run(static=None), Raises(("static",))),
        Case(
            W,
            "static of another batch",
            lambda: run(static=water_static(3)),
            Raises(("static",), ("3",)),
        ),
        Case(
            W,
            "static with the wrong attribute count",
            lambda: run(static=randn(2, 8, 10)),
            Raises(("static",), ("(2, 8, 10)",)),
        ),
        Case(
            W,
            "site_padding_mask float",
            lambda: run(site_padding_mask=torch.zeros(2, 8)),
            Raises(("site_padding_mask",), ("torch.float32",)),
        ),
        Case(
            W,
            "missing flags float",
            lambda: run(missing={"river_flow": yes.float()}),
            Raises(("missing",), ("torch.float32",)),
        ),
        Case(
            W,
            "missing for an unknown modality",
            lambda: run(missing={"riverflow": yes}),
            Raises(("missing",), ("riverflow",)),
        ),
        Case(
            W,
            "splits for an unknown modality",
            lambda: run(splits={**splits(), "snow": splits()["river_flow"]}),
            Raises(("splits",), ("snow",)),
        ),
        Case(
            W,
            "splits lacking a modality",
            lambda: run(splits={k: v for k, v in splits().items() if k != "evaporation"}),
            Raises(("splits",), ("evaporation",)),
        ),
        Case(
            W,
            "tokenizer_kwargs for an unknown modality",
            lambda: run(tokenizer_kwargs={"riverflow": {}}),
            Raises(("tokenizer_kwargs",), ("riverflow",)),
        ),
        Case(
            W,
            "a split over the wrong token count",
            lambda: run(
                splits={**splits(), "precipitation": cm.random_masking(2, 7, 0.5, generator=g())}
            ),
            Raises((("splits", "precipitation"),), ("7",)),
        ),
        Case(
            W,
            "empty batch (b=0)",
            lambda: run(water_inputs(0), static=water_static(0)),
            Returns("loss 0", lambda r: _assert(float(r.loss) == 0.0, str(r.loss))),
        ),
        Case(
            W,
            "river_flow missing for every sample",
            lambda: run(missing={"river_flow": torch.tensor([True, True])}),
            Returns(
                "finite loss; river_flow loss 0",
                lambda r: _assert(float(r.losses["river_flow"]) == 0.0, str(r.losses)),
            ),
        ),
        Case(
            W,
            "every value of river_flow NaN for sample 0",
            lambda: run({**x(), "river_flow": with_value(x()["river_flow"], (0,), float("nan"))}),
            Returns(
                "documented missing data: finite loss, sample 0 scores 0 there",
                lambda r: _assert(
                    float(r.sample_losses["river_flow"][0]) == 0.0,
                    str(r.sample_losses["river_flow"]),
                ),
            ),
        ),
        Case(
            W,
            "NaN vs inf at the same raster pixel",
            lambda: run(
                {
                    **x(),
                    "precipitation": with_value(x()["precipitation"], (1, 0, 3, 3), float("nan")),
                }
            ),
            Returns(
                "documented missing value: finite, NaN == inf",
                same_as(
                    lambda: run(
                        {
                            **x(),
                            "precipitation": with_value(
                                x()["precipitation"], (1, 0, 3, 3), float("inf")
                            ),
                        }
                    )
                ),
            ),
        ),
        Case(
            W,
            "NaN static attribute",
            lambda: run(static=with_value(st(), (0, 1, 2), float("nan"))),
            Returns(
                "documented missing attribute: finite, NaN == inf",
                same_as(lambda: run(static=with_value(st(), (0, 1, 2), float("inf")))),
            ),
        ),
        Case(
            W,
            "non-contiguous inputs, static, masks",
            lambda: run(
                {k: nc(v) for k, v in x().items()},
                static=nc(st()),
                site_padding_mask=nc(pad_mask([8, 6], 8)),
            ),
            Returns(
                "same as contiguous", same_as(lambda: run(site_padding_mask=pad_mask([8, 6], 8)))
            ),
        ),
        Case(W, "modalities empty", lambda: cm.MultimodalMAE({}), Raises(("modalities",))),
        Case(
            W,
            "a modality that is not a Modality",
            lambda: cm.MultimodalMAE({"a": torch.nn.Linear(2, 2)}),
            Raises(("modalities",), ("Linear",)),
        ),
        Case(
            W,
            "use_weighted_fm without fusion",
            lambda: cm.MultimodalMAE(
                {"a": cm.Modality(*_water_parts())}, None, use_weighted_fm=True
            ),
            Raises(("use_weighted_fm",)),
        ),
    ]
    MO = "Modality"
    cases += [
        Case(
            MO,
            "num_steps=2.7",
            lambda: cm.Modality(*_water_parts(), num_steps=2.7),
            Raises(("num_steps",), ("2.7",)),
        ),
        Case(
            MO,
            "num_steps=0",
            lambda: cm.Modality(*_water_parts(), num_steps=0),
            Raises(("num_steps",), ("0",)),
        ),
        Case(
            MO,
            "loss_weight=nan",
            lambda: cm.Modality(*_water_parts(), loss_weight=float("nan")),
            Raises(("loss_weight",), ("nan",)),
        ),
        Case(
            MO,
            "loss_weight a string",
            lambda: cm.Modality(*_water_parts(), loss_weight="x"),
            Raises(("loss_weight",), ("'x'",)),
        ),
        Case(
            MO,
            "tokenizer a string",
            lambda: cm.Modality("tok", *_water_parts()[1:]),
            Raises(("tokenizer",), ("str",)),
        ),
        Case(
            MO,
            "encoder a Linear",
            lambda: cm.Modality(_water_parts()[0], torch.nn.Linear(2, 2), _water_parts()[2]),
            Raises(("encoder",), ("Linear",)),
        ),
    ]
    WC = "WaterMAEConfig"
    cases += [
        Case(
            WC,
            "loss_weights of the wrong length",
            lambda: cm.WaterMAEConfig(loss_weights=(1.0,) * 4),
            Raises(("loss_weights",), ("4",)),
        ),
        Case(
            WC,
            "duplicate modality names",
            lambda: cm.WaterMAEConfig(raster_names=("a", "a", "b")),
            Raises(("names",), ("'a'",)),
        ),
        Case(
            WC,
            "mask_ratio=1.0",
            lambda: cm.WaterMAEConfig(mask_ratio=1.0),
            Raises(("mask_ratio",), ("1.0",)),
        ),
        Case(
            WC,
            "predict_ratio > mask_ratio",
            lambda: cm.WaterMAEConfig(mask_ratio=0.4, predict_ratio=0.9),
            Raises(("predict_ratio",), ("0.9",)),
        ),
        Case(
            WC,
            "num_steps=0",
            lambda: cm.WaterMAEConfig(num_steps=0),
            Raises(("num_steps",), ("0",)),
        ),
        Case(
            WC,
            "use_weighted_fm with fusion_depth=0",
            lambda: cm.WaterMAEConfig(use_weighted_fm=True, fusion_depth=0),
            Raises(("use_weighted_fm", "fusion_depth")),
        ),
    ]
    WS, BW = "water_mae_small", "build_water_mae"
    cases += [
        Case(WS, "an unknown override", lambda: cm.water_mae_small(bogus=1), Raises(("bogus",))),
        Case(
            WS,
            "decoder_dim=6 (not a multiple of 4)",
            lambda: cm.water_mae_small(**{**WATER_TINY, "decoder_dim": 6}),
            Raises(("decoder_dim",), ("6",)),
        ),
        Case(
            WS,
            "num_land_patches > patches",
            lambda: cm.water_mae_small(**{**WATER_TINY, "num_land_patches": 5}),
            Raises(("num_land_patches",), ("5",)),
        ),
        Case(
            WS,
            "image_size not divisible by patch_size",
            lambda: cm.water_mae_small(**{**WATER_TINY, "image_size": (25, 20)}),
            Raises(("image_size",), ("(25, 20)",)),
        ),
        Case(
            WS,
            "tiny overrides",
            lambda: cm.water_mae_small(**WATER_TINY),
            Returns(
                "a MultimodalMAE with the five modalities",
                lambda r: _assert(r.names == list(MODALITIES), str(r.names)),
            ),
        ),
        Case(
            BW,
            "config a dict",
            lambda: cm.build_water_mae({"num_steps": 2}),
            Raises(("config",), ("dict",)),
        ),
        Case(
            BW,
            "a tiny WaterMAEConfig",
            lambda: cm.build_water_mae(cm.WaterMAEConfig(**WATER_TINY)),
            Returns(
                "a MultimodalMAE",
                lambda r: _assert(isinstance(r, cm.MultimodalMAE), type(r).__name__),
            ),
        ),
    ]
    return cases


# --------------------------------------------------------------------------- record types
def _record_cases() -> list[Case]:
    def fields(cls: type, names: tuple[str, ...]) -> Any:
        def check(r: Any) -> None:
            assert isinstance(r, cls), type(r).__name__
            assert tuple(r._fields) == names, r._fields

        return check

    return [
        Case(
            "EncoderOutput",
            "returned by TransformerEncoder",
            lambda: plain_enc()(randn(2, 3, 8), return_layers="all"),
            Returns(
                "(tokens, padding_mask, features)",
                fields(cm.EncoderOutput, ("tokens", "padding_mask", "features")),
            ),
        ),
        Case(
            "MaskSplit",
            "returned by random_masking",
            lambda: cm.random_masking(2, 5, 0.5),
            Returns(
                "the six documented fields",
                fields(
                    cm.MaskSplit,
                    (
                        "ids_keep",
                        "keep_padding_mask",
                        "ids_predict",
                        "predict_padding_mask",
                        "visible_mask",
                        "predict_mask",
                    ),
                ),
            ),
        ),
        Case(
            "ImageCrossMAEOutput",
            "returned by ImageCrossMAE",
            lambda: shared_image()(images(), split=fixed_split()),
            Returns(
                "(loss, pred, split, target)",
                fields(cm.ImageCrossMAEOutput, ("loss", "pred", "split", "target")),
            ),
        ),
        Case(
            "MultimodalOutput",
            "returned by MultimodalMAE",
            lambda: shared_water()(water_inputs(), static=water_static(), generator=gen(0)),
            Returns(
                "the seven documented fields, one entry per modality",
                lambda r: (
                    fields(
                        cm.MultimodalOutput,
                        (
                            "loss",
                            "losses",
                            "sample_losses",
                            "preds",
                            "targets",
                            "target_valid",
                            "splits",
                        ),
                    )(r),
                    _assert(list(r.preds) == list(MODALITIES), str(list(r.preds))),
                ),
            ),
        ),
    ]


CASES = (
    _encoder_cases()
    + _decoder_cases()
    + _image_cases()
    + _official_cases()
    + _water_cases()
    + _record_cases()
)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_model_input(case: Case, rec: Recorder) -> None:
    run_case(rec, case)


def test_shared_models_untouched() -> None:
    """The cached tiny models are shared between cases: none may have been modified."""
    assert not shared_image().training and not shared_water().training
    assert next(shared_image().parameters()).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in shared_water().parameters())
