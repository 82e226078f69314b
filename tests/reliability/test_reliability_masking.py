"""Bad and extreme inputs for masking: `random_masking`, the structured strategies,
`mask_split_from_masks`, `mask_missing_samples`, `modality_dropout`, `MaskSplit`, token
gather/scatter and the length/padding-mask conversions.

Out-of-range *values* inside index tensors (``ids`` past the sequence, negative lengths)
cannot be checked without a device sync; the documented behaviour is that the CPU kernel
raises (CUDA: a device-side assert) and that nothing is ever silently dropped, clamped or
wrapped (`KernelError` cases).

Legend: ``b`` batch, ``n`` tokens, ``t`` steps, ``l`` locations, ``k`` kept slots, ``p``
predicted slots. Polarity: ``padding_mask`` True = padding; ``visible_mask`` True = seen;
``predict_mask`` True = reconstructed; ``missing`` True = modality absent.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
from reliability_helpers import (
    Case,
    KernelError,
    Raises,
    Recorder,
    Returns,
    gen,
    nc,
    pad_mask,
    rand,
    randn,
    run_case,
    same_as,
    shape_is,
)
from torch import Tensor

import crossmae as cm


def valid_split(
    b: int,
    n: int,
    padding_mask: Optional[Tensor] = None,
    counts: Optional[tuple[list[int], list[int]]] = None,
) -> Callable[[Any], None]:
    """Check the `MaskSplit` invariants: shapes, ids agree with the masks, roles disjoint,
    padding never selected; optionally the exact per-sample (keep, predict) counts."""

    def check(s: cm.MaskSplit) -> None:
        assert isinstance(s, cm.MaskSplit), type(s)
        assert tuple(s.visible_mask.shape) == (b, n) and tuple(s.predict_mask.shape) == (b, n)
        assert s.ids_keep.dtype == torch.int64 and s.ids_predict.dtype == torch.int64
        assert not bool((s.visible_mask & s.predict_mask).any()), "a token is visible and predicted"
        if padding_mask is not None:
            assert not bool((s.visible_mask & padding_mask).any()), "padding selected as visible"
            assert not bool((s.predict_mask & padding_mask).any()), "padding selected as target"
        for ids, pad, mask in (
            (s.ids_keep, s.keep_padding_mask, s.visible_mask),
            (s.ids_predict, s.predict_padding_mask, s.predict_mask),
        ):
            assert ids.shape == pad.shape and ids.shape[0] == b
            hits = torch.zeros(b, n, dtype=torch.long)
            if ids.numel():
                hits.scatter_add_(1, ids.masked_fill(pad, 0), (~pad).long())
            assert hits.numel() == 0 or int(hits.max()) <= 1, "a token selected twice"
            assert torch.equal(hits > 0, mask), "ids / padding masks disagree with the token mask"
            if ids.shape[1] and b > 0:
                assert not bool(pad.all(dim=0).any()), "a column of padding only (widths not tight)"
        if counts is not None:
            assert s.num_keep.tolist() == counts[0], (
                f"keep counts {s.num_keep.tolist()} != {counts[0]}"
            )
            assert s.num_predict.tolist() == counts[1], (
                f"predict counts {s.num_predict.tolist()} != {counts[1]}"
            )

    return check


B, N = 2, 10
PM = pad_mask([10, 6], N)  # sample 1: 6 real tokens


def noise(b: int = B, n: int = N, seed: int = 0) -> Tensor:
    return rand(b, n, seed=seed)


def _random_masking_cases() -> list[Case]:
    R = "random_masking"
    rm = cm.random_masking
    return [
        Case(R, "batch_size=-1", lambda: rm(-1, N, 0.5), Raises(("batch_size",), ("-1",))),
        Case(R, "batch_size a float", lambda: rm(2.0, N, 0.5), Raises(("batch_size",), ("2.0",))),
        Case(R, "batch_size=True", lambda: rm(True, N, 0.5), Raises(("batch_size",), ("True",))),
        Case(R, "num_tokens=-1", lambda: rm(B, -1, 0.5), Raises(("num_tokens",), ("-1",))),
        Case(
            R,
            "num_tokens a tensor",
            lambda: rm(B, torch.tensor(N), 0.5),
            Raises(("num_tokens",), ("Tensor",)),
        ),
        Case(R, "mask_ratio=1.0", lambda: rm(B, N, 1.0), Raises(("mask_ratio",), ("1.0",))),
        Case(R, "mask_ratio=-0.1", lambda: rm(B, N, -0.1), Raises(("mask_ratio",), ("-0.1",))),
        Case(
            R, "mask_ratio=nan", lambda: rm(B, N, float("nan")), Raises(("mask_ratio",), ("nan",))
        ),
        Case(
            R, "mask_ratio a string", lambda: rm(B, N, "0.5"), Raises(("mask_ratio",), ("'0.5'",))
        ),
        Case(
            R,
            "mask_ratio a 0-d tensor",
            lambda: rm(B, N, torch.tensor(0.5)),
            Raises(("mask_ratio",), ("tensor(0.5000)",)),
        ),
        Case(
            R,
            "predict_ratio=0",
            lambda: rm(B, N, 0.5, predict_ratio=0.0),
            Raises(("predict_ratio",), ("0.0",)),
        ),
        Case(
            R,
            "predict_ratio > mask_ratio",
            lambda: rm(B, N, 0.5, predict_ratio=0.75),
            Raises(("predict_ratio", "mask_ratio"), ("0.75",)),
        ),
        Case(
            R,
            "predict_ratio=inf",
            lambda: rm(B, N, 0.5, predict_ratio=float("inf")),
            Raises(("predict_ratio",), ("inf",)),
        ),
        Case(
            R,
            "padding_mask float",
            lambda: rm(B, N, 0.5, padding_mask=PM.float()),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            R,
            "padding_mask [b, n+1]",
            lambda: rm(B, N, 0.5, padding_mask=pad_mask([10, 6], N + 1)),
            Raises(("padding_mask",), ("(2, 11)",)),
        ),
        Case(
            R,
            "padding_mask of another batch",
            lambda: rm(B, N, 0.5, padding_mask=pad_mask([10], N)),
            Raises(("padding_mask",), ("(1, 10)",)),
        ),
        Case(
            R,
            "noise int64",
            lambda: rm(B, N, 0.5, noise=torch.zeros(B, N, dtype=torch.long)),
            Raises(("noise",), ("torch.int64",)),
        ),
        Case(
            R,
            "noise [b, n-1]",
            lambda: rm(B, N, 0.5, noise=noise(n=N - 1)),
            Raises(("noise",), ("(2, 9)",)),
        ),
        Case(
            R,
            "noise of rank 1",
            lambda: rm(B, N, 0.5, noise=noise()[0]),
            Raises(("noise",), ("(10,)",)),
        ),
        Case(
            R,
            "device='bogus'",
            lambda: rm(B, N, 0.5, device="bogus"),
            Raises(("device",), ("'bogus'",)),
        ),
        Case(
            R,
            "empty batch (b=0)",
            lambda: rm(0, N, 0.5),
            Returns(
                "empty split; widths from the ratio, ids_keep [0, int(n * (1 - r))]",
                lambda s: (
                    valid_split(0, N)(s),
                    _assert(tuple(s.ids_keep.shape) == (0, 5), str(s.ids_keep.shape)),
                ),
            ),
        ),
        Case(
            R,
            "zero tokens (n=0)",
            lambda: rm(B, 0, 0.5),
            Returns("empty split [b, 0]", valid_split(B, 0, counts=([0, 0], [0, 0]))),
        ),
        Case(
            R,
            "a sample whose tokens are all padding",
            lambda: rm(B, N, 0.5, padding_mask=pad_mask([10, 0], N), generator=gen(1)),
            Returns(
                "that sample keeps and predicts nothing",
                valid_split(B, N, pad_mask([10, 0], N), ([5, 0], [5, 0])),
            ),
        ),
        Case(
            R,
            "padding_mask with ragged lengths",
            lambda: rm(B, N, 0.75, predict_ratio=0.25, padding_mask=PM, generator=gen(1)),
            Returns(
                "per-sample counts int(n*(1-r)), n-keep-int(n*(r-p))",
                valid_split(B, N, PM, ([2, 1], [3, 2])),
            ),
        ),
        Case(
            R,
            "mask_ratio=0 (predict_ratio defaults to 0)",
            lambda: rm(B, N, 0.0, generator=gen(1)),
            Returns(
                "every token visible, none predicted", valid_split(B, N, counts=([10, 10], [0, 0]))
            ),
        ),
        Case(
            R,
            "NaN and inf in noise",
            lambda: rm(
                B,
                N,
                0.5,
                noise=noise().index_put(
                    (torch.tensor([0, 0]), torch.tensor([1, 2])),
                    torch.tensor([float("nan"), float("inf")]),
                ),
            ),
            Returns(
                "documented: exact counts; NaN ranks last (torch.sort order)",
                valid_split(B, N, counts=([5, 5], [5, 5])),
            ),
        ),
        Case(
            R,
            "non-contiguous noise and padding_mask",
            lambda: rm(B, N, 0.5, noise=nc(noise()), padding_mask=nc(PM)),
            Returns(
                "same split as contiguous",
                same_as(lambda: rm(B, N, 0.5, noise=noise(), padding_mask=PM)),
            ),
        ),
        Case(
            R,
            "float64 noise",
            lambda: rm(B, N, 0.5, noise=noise().double()),
            Returns("same split as float32 noise", same_as(lambda: rm(B, N, 0.5, noise=noise()))),
        ),
    ]


def _strategy_cases() -> list[Case]:
    """The structured strategies over a ``t x l`` time-major grid (``b=2, t=4, l=3``)."""
    b, t, l_ = 2, 4, 3
    n = t * l_
    pm = pad_mask([n, 7], n)  # sample 1: steps 0-1 full, step 2 one real location, step 3 empty
    cases: list[Case] = []
    strategies: dict[
        str, tuple[Callable[..., cm.MaskSplit], str, dict[str, Any], Optional[tuple[int, int]]]
    ] = {
        # name: (fn, steps argument name, extra kwargs, noise shape)
        "grouped_random_masking": (cm.grouped_random_masking, "num_steps", {}, (b, n)),
        "time_step_masking": (cm.time_step_masking, "num_steps", {}, (b, t)),
        "chunk_masking": (cm.chunk_masking, "num_steps", {"chunk_size": 2}, (b, 2)),
        "tube_masking": (cm.tube_masking, "num_steps", {}, (b, l_)),
        "channel_masking": (cm.channel_masking, "num_channels", {}, (b, t)),
        "tail_masking": (cm.tail_masking, "num_steps", {}, None),
    }
    for name, (fn, steps_arg, kw, noise_shape) in strategies.items():

        def call(
            *args: Any,
            _fn: Callable[..., cm.MaskSplit] = fn,
            _kw: dict[str, Any] = kw,
            **kwargs: Any,
        ) -> cm.MaskSplit:
            return _fn(*args, **{**_kw, **kwargs})

        cases += [
            Case(
                name,
                "mask_ratio=1.0",
                lambda call=call: call(b, t, l_, 1.0),
                Raises(("mask_ratio",), ("1.0",)),
            ),
            Case(
                name,
                "mask_ratio=nan",
                lambda call=call: call(b, t, l_, float("nan")),
                Raises(("mask_ratio",), ("nan",)),
            ),
            Case(
                name,
                "predict_ratio > mask_ratio",
                lambda call=call: call(b, t, l_, 0.5, predict_ratio=0.6),
                Raises(("predict_ratio",), ("0.6",)),
            ),
            Case(
                name,
                f"{steps_arg}=-1",
                lambda call=call: call(b, -1, l_, 0.5),
                Raises((steps_arg,), ("-1",)),
            ),
            Case(
                name,
                "num_locations=True",
                lambda call=call: call(b, t, True, 0.5),
                Raises(("num_locations",), ("True",)),
            ),
            Case(
                name,
                "batch_size a float",
                lambda call=call: call(2.0, t, l_, 0.5),
                Raises(("batch_size",), ("2.0",)),
            ),
            Case(
                name,
                "padding_mask [b, t*l + 1]",
                lambda call=call: call(b, t, l_, 0.5, padding_mask=pad_mask([n, 7], n + 1)),
                Raises(("padding_mask",), ("(2, 13)",)),
            ),
            Case(
                name,
                "padding_mask float",
                lambda call=call: call(b, t, l_, 0.5, padding_mask=pm.float()),
                Raises(("padding_mask",), ("torch.float32",)),
            ),
            Case(
                name,
                "empty batch (b=0)",
                lambda call=call: call(0, t, l_, 0.5),
                Returns("empty split", valid_split(0, n)),
            ),
            Case(
                name,
                f"{steps_arg}=0",
                lambda call=call: call(b, 0, l_, 0.5),
                Returns("empty split [b, 0]", valid_split(b, 0)),
            ),
            Case(
                name,
                "num_locations=0",
                lambda call=call: call(b, t, 0, 0.5),
                Returns("empty split [b, 0]", valid_split(b, 0)),
            ),
            Case(
                name,
                "a sample whose tokens are all padding",
                lambda call=call: call(b, t, l_, 0.5, padding_mask=pad_mask([n, 0], n)),
                Returns(
                    "that sample selects nothing",
                    lambda s: (
                        valid_split(b, n, pad_mask([n, 0], n))(s)
                        or _assert(
                            not bool(s.visible_mask[1].any() or s.predict_mask[1].any()),
                            "empty sample selected",
                        )
                    ),
                ),
            ),
            Case(
                name,
                "ragged padding",
                lambda call=call: call(b, t, l_, 0.5, padding_mask=pm),
                Returns("padding never selected", valid_split(b, n, pm)),
            ),
        ]
        if noise_shape is not None:
            good = rand(*noise_shape, seed=3)
            bad_shape = (noise_shape[0], noise_shape[1] + 1)
            cases += [
                Case(
                    name,
                    "noise of the wrong shape",
                    lambda call=call, bs=bad_shape: call(b, t, l_, 0.5, noise=rand(*bs)),
                    Raises(("noise",), (str(bad_shape),)),
                ),
                Case(
                    name,
                    "noise int64",
                    lambda call=call, ns=noise_shape: call(
                        b, t, l_, 0.5, noise=torch.zeros(ns, dtype=torch.long)
                    ),
                    Raises(("noise",), ("torch.int64",)),
                ),
                Case(
                    name,
                    "non-contiguous noise and padding_mask",
                    lambda call=call, g=good: call(b, t, l_, 0.5, noise=nc(g), padding_mask=nc(pm)),
                    Returns(
                        "same split as contiguous",
                        same_as(
                            lambda call=call, g=good: call(b, t, l_, 0.5, noise=g, padding_mask=pm)
                        ),
                    ),
                ),
            ]
    C = "chunk_masking"
    cases += [
        Case(
            C,
            "chunk_size=0",
            lambda: cm.chunk_masking(b, t, l_, 0.5, chunk_size=0),
            Raises(("chunk_size",), ("0",)),
        ),
        Case(
            C,
            "chunk_size a float",
            lambda: cm.chunk_masking(b, t, l_, 0.5, chunk_size=2.0),
            Raises(("chunk_size",), ("2.0",)),
        ),
        Case(
            C,
            "chunk_size > num_steps",
            lambda: cm.chunk_masking(b, t, l_, 0.5, chunk_size=9, generator=gen(0)),
            Returns(
                "one chunk: the counts of 1 unit (0 kept, 1 predicted)",
                valid_split(b, n, counts=([0, 0], [n, n])),
            ),
        ),
        Case(
            C,
            "num_steps not a multiple of chunk_size",
            lambda: cm.chunk_masking(b, 5, l_, 0.5, chunk_size=2, generator=gen(0)),
            Returns("last chunk shorter", valid_split(b, 5 * l_)),
        ),
    ]
    return cases


def _assert(cond: bool, msg: str) -> None:
    assert cond, msg


def _split_cases() -> list[Case]:
    b, n = 2, 6
    vis = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    pred = torch.tensor([[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    sp = lambda: cm.mask_split_from_masks(vis, pred)  # noqa: E731
    F = "mask_split_from_masks"
    MM = "mask_missing_samples"
    MD = "modality_dropout"
    S = "MaskSplit"
    yes = torch.tensor([True, False])
    return [
        Case(
            F,
            "visible_mask int64",
            lambda: cm.mask_split_from_masks(vis.long(), pred),
            Raises(("visible_mask",), ("torch.int64",)),
        ),
        Case(
            F,
            "visible_mask of rank 1",
            lambda: cm.mask_split_from_masks(vis[0], pred),
            Raises(("visible_mask",), ("(6,)",)),
        ),
        Case(
            F,
            "predict_mask float",
            lambda: cm.mask_split_from_masks(vis, pred.float()),
            Raises(("predict_mask",), ("torch.float32",)),
        ),
        Case(
            F,
            "predict_mask None",
            lambda: cm.mask_split_from_masks(vis, None),
            Raises(("predict_mask",), ("None",)),
        ),
        Case(
            F,
            "predict_mask of another shape",
            lambda: cm.mask_split_from_masks(vis, pred[:, :5]),
            Raises(("predict_mask",), ("(2, 5)",)),
        ),
        Case(
            F,
            "padding_mask of another shape",
            lambda: cm.mask_split_from_masks(vis, pred, padding_mask=pred[:1]),
            Raises(("padding_mask",), ("(1, 6)",)),
        ),
        Case(
            F,
            "visible and predict overlap",
            lambda: cm.mask_split_from_masks(vis, vis),
            Raises((("visible_mask", "predict_mask"),)),
        ),
        Case(
            F,
            "empty batch (b=0)",
            lambda: cm.mask_split_from_masks(vis[:0], pred[:0]),
            Returns("empty split", valid_split(0, n)),
        ),
        Case(
            F,
            "zero tokens (n=0)",
            lambda: cm.mask_split_from_masks(vis[:, :0], pred[:, :0]),
            Returns("empty split", valid_split(b, 0)),
        ),
        Case(
            F,
            "a sample with nothing visible and nothing predicted",
            lambda: cm.mask_split_from_masks(vis & yes[:, None], pred & yes[:, None]),
            Returns(
                "valid split, widths of the other sample",
                valid_split(b, n, counts=([2, 0], [2, 0])),
            ),
        ),
        Case(
            F,
            "padding_mask overlapping the masks",
            lambda: cm.mask_split_from_masks(vis, pred, padding_mask=pad_mask([6, 2], n)),
            Returns(
                "padded tokens dropped from both roles",
                valid_split(b, n, pad_mask([6, 2], n), ([2, 0], [2, 2])),
            ),
        ),
        Case(
            F,
            "non-contiguous masks",
            lambda: cm.mask_split_from_masks(nc(vis), nc(pred)),
            Returns("same split as contiguous", same_as(sp)),
        ),
        Case(
            MM,
            "missing int64",
            lambda: cm.mask_missing_samples(sp(), yes.long()),
            Raises(("missing",), ("torch.int64",)),
        ),
        Case(
            MM,
            "missing [b, 1]",
            lambda: cm.mask_missing_samples(sp(), yes[:, None]),
            Raises(("missing",), ("(2, 1)",)),
        ),
        Case(
            MM,
            "missing of another batch",
            lambda: cm.mask_missing_samples(sp(), torch.tensor([True])),
            Raises(("missing",), ("(1,)",)),
        ),
        Case(
            MM,
            "split a list",
            lambda: cm.mask_missing_samples([vis, pred], yes),
            Raises(("split",), ("list",)),
        ),
        Case(
            MM,
            "split a pair of float masks",
            lambda: cm.mask_missing_samples((vis.float(), pred), yes),
            Raises((("split", "visible_mask"),), ("torch.float32",)),
        ),
        Case(
            MM,
            "every sample missing",
            lambda: cm.mask_missing_samples(sp(), torch.tensor([True, True])),
            Returns(
                "nothing visible or predicted, widths 0", valid_split(b, n, counts=([0, 0], [0, 0]))
            ),
        ),
        Case(
            MM,
            "sample 0 missing",
            lambda: cm.mask_missing_samples(sp(), yes),
            Returns(
                "sample 0 emptied, sample 1 unchanged", valid_split(b, n, counts=([0, 1], [0, 3]))
            ),
        ),
        Case(
            MM,
            "empty batch (b=0)",
            lambda: cm.mask_missing_samples(cm.mask_split_from_masks(vis[:0], pred[:0]), yes[:0]),
            Returns("empty split", valid_split(0, n)),
        ),
        Case(
            MM,
            "(visible_mask, predict_mask) pair",
            lambda: cm.mask_missing_samples((vis, pred), yes),
            Returns(
                "same as for the MaskSplit", same_as(lambda: cm.mask_missing_samples(sp(), yes))
            ),
        ),
        Case(
            MD,
            "drop_prob=1.5",
            lambda: cm.modality_dropout(sp(), drop_prob=1.5),
            Raises(("drop_prob",), ("1.5",)),
        ),
        Case(
            MD,
            "drop_prob=nan",
            lambda: cm.modality_dropout(sp(), drop_prob=float("nan")),
            Raises(("drop_prob",), ("nan",)),
        ),
        Case(
            MD,
            "drop_prob a string",
            lambda: cm.modality_dropout(sp(), drop_prob="0.1"),
            Raises(("drop_prob",), ("'0.1'",)),
        ),
        Case(
            MD,
            "noise [b, 1]",
            lambda: cm.modality_dropout(sp(), drop_prob=0.5, noise=rand(b, 1)),
            Raises(("noise",), ("(2, 1)",)),
        ),
        Case(
            MD,
            "noise int64",
            lambda: cm.modality_dropout(
                sp(), drop_prob=0.5, noise=torch.zeros(b, dtype=torch.long)
            ),
            Raises(("noise",), ("torch.int64",)),
        ),
        Case(
            MD,
            "missing float",
            lambda: cm.modality_dropout(sp(), yes.float()),
            Raises(("missing",), ("torch.float32",)),
        ),
        Case(
            MD,
            "drop_prob=1.0",
            lambda: cm.modality_dropout(sp(), drop_prob=1.0, generator=gen(0)),
            Returns("every sample dropped", valid_split(b, n, counts=([0, 0], [0, 0]))),
        ),
        Case(
            MD,
            "drop_prob=0 and no missing",
            lambda: cm.modality_dropout(sp()),
            Returns("unchanged", same_as(sp)),
        ),
        Case(
            MD,
            "NaN in noise",
            lambda: cm.modality_dropout(
                sp(), drop_prob=0.5, noise=torch.tensor([float("nan"), 0.1])
            ),
            Returns(
                "documented: NaN < drop_prob is False, the sample is kept",
                valid_split(b, n, counts=([2, 0], [2, 0])),
            ),
        ),
        Case(
            S,
            "visible_tokens of x with another batch",
            lambda: sp().visible_tokens(randn(3, n, 4)),
            Raises((("ids", "ids_keep", "x"),), ("(3, 6, 4)",)),
        ),
        Case(
            S,
            "visible_tokens of x int64",
            lambda: sp().visible_tokens(randn(b, n, 4).long()),
            Returns("gathers any dtype (padded slots 0)", shape_is(b, 2, 4)),
        ),
        Case(
            S,
            "predict_tokens of x with NaN at unselected tokens",
            lambda: sp().predict_tokens(
                randn(b, n, 4).index_fill(1, torch.tensor([4, 5]), float("nan"))
            ),
            Returns("finite: unselected and padded slots never read"),
        ),
        Case(S, "to('cpu')", lambda: sp().to("cpu"), Returns("same split", same_as(sp))),
    ]


def _token_cases() -> list[Case]:
    b, n, d = 2, 5, 3
    x = lambda: randn(b, n, d)  # noqa: E731
    ids = torch.tensor([[4, 0], [1, 1]])
    G = "gather_tokens"
    SC = "scatter_tokens"
    L = "lengths_to_padding_mask"
    P = "padding_mask_to_lengths"
    vals = lambda k=2: randn(b, k, d, seed=5)  # noqa: E731
    return [
        Case(G, "x a list", lambda: cm.gather_tokens(x().tolist(), ids), Raises(("x",), ("list",))),
        Case(G, "x of rank 1", lambda: cm.gather_tokens(randn(5), ids), Raises(("x",), ("(5,)",))),
        Case(
            G,
            "ids float",
            lambda: cm.gather_tokens(x(), ids.float()),
            Raises(("ids",), ("torch.float32",)),
        ),
        Case(
            G, "ids of rank 1", lambda: cm.gather_tokens(x(), ids[0]), Raises(("ids",), ("(2,)",))
        ),
        Case(
            G,
            "ids with another batch",
            lambda: cm.gather_tokens(x(), ids[:1]),
            Raises(("ids",), ("(1, 2)",)),
        ),
        Case(
            G,
            "ids int32",
            lambda: cm.gather_tokens(x(), ids.int()),
            Returns("accepted (as int64)", same_as(lambda: cm.gather_tokens(x(), ids))),
        ),
        Case(
            G,
            "ids >= n (out of range)",
            lambda: cm.gather_tokens(x(), torch.tensor([[5, 0], [1, 1]])),
            KernelError("out-of-range ids are not checked (device sync)"),
        ),
        Case(
            G,
            "negative ids",
            lambda: cm.gather_tokens(x(), torch.tensor([[-1, 0], [1, 1]])),
            KernelError("negative ids are not wrapped"),
        ),
        Case(
            G,
            "x with zero tokens but ids selecting some",
            lambda: cm.gather_tokens(x()[:, :0], ids),
            Raises(("x", "ids"), ("(2, 0, 3)",)),
        ),
        Case(
            G,
            "empty batch (b=0)",
            lambda: cm.gather_tokens(x()[:0], ids[:0]),
            Returns("[0, k, ...]", shape_is(0, 2, d)),
        ),
        Case(
            G,
            "zero ids (k=0)",
            lambda: cm.gather_tokens(x(), ids[:, :0]),
            Returns("[b, 0, ...]", shape_is(b, 0, d)),
        ),
        Case(
            G,
            "x [b, n] without features",
            lambda: cm.gather_tokens(x()[..., 0], ids),
            Returns("[b, k]", shape_is(b, 2)),
        ),
        Case(
            G,
            "NaN at a token not selected",
            lambda: cm.gather_tokens(x().index_fill(1, torch.tensor([2, 3]), float("nan")), ids),
            Returns("finite (never read)"),
        ),
        Case(
            G,
            "non-contiguous x and ids",
            lambda: cm.gather_tokens(nc(x()), nc(ids)),
            Returns("same result as contiguous", same_as(lambda: cm.gather_tokens(x(), ids))),
        ),
        Case(
            SC,
            "values a list",
            lambda: cm.scatter_tokens(vals().tolist(), ids, n),
            Raises(("values",), ("list",)),
        ),
        Case(
            SC,
            "ids float",
            lambda: cm.scatter_tokens(vals(), ids.float(), n),
            Raises(("ids",), ("torch.float32",)),
        ),
        Case(
            SC,
            "values and ids of different shapes",
            lambda: cm.scatter_tokens(vals(3), ids, n),
            Raises(("values", "ids"), ("(2, 3, 3)",)),
        ),
        Case(
            SC,
            "num_tokens=-1",
            lambda: cm.scatter_tokens(vals(), ids, -1),
            Raises(("num_tokens",), ("-1",)),
        ),
        Case(
            SC,
            "num_tokens a float",
            lambda: cm.scatter_tokens(vals(), ids, 5.0),
            Raises(("num_tokens",), ("5.0",)),
        ),
        Case(
            SC,
            "padding_mask float",
            lambda: cm.scatter_tokens(vals(), ids, n, padding_mask=pad_mask([2, 1], 2).float()),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            SC,
            "padding_mask int64",
            lambda: cm.scatter_tokens(vals(), ids, n, padding_mask=ids * 0),
            Raises(("padding_mask",), ("torch.int64",)),
        ),
        Case(
            SC,
            "padding_mask of another shape",
            lambda: cm.scatter_tokens(vals(), ids, n, padding_mask=pad_mask([1], 2)),
            Raises(("padding_mask",), ("(1, 2)",)),
        ),
        Case(
            SC,
            "fill_value a string",
            lambda: cm.scatter_tokens(vals(), ids, n, fill_value="x"),
            Raises(("fill_value",)),
        ),
        Case(
            SC,
            "ids == num_tokens (one past the end)",
            lambda: cm.scatter_tokens(vals(), torch.tensor([[5, 0], [1, 2]]), n),
            KernelError("out-of-range ids are never silently dropped"),
        ),
        Case(
            SC,
            "ids > num_tokens",
            lambda: cm.scatter_tokens(vals(), torch.tensor([[7, 0], [1, 2]]), n),
            KernelError("out-of-range ids are not checked (device sync)"),
        ),
        Case(
            SC,
            "negative ids",
            lambda: cm.scatter_tokens(vals(), torch.tensor([[-1, 0], [1, 2]]), n),
            KernelError("negative ids are not wrapped"),
        ),
        Case(
            SC,
            "NaN in padded value slots",
            lambda: cm.scatter_tokens(
                vals().index_fill(1, torch.tensor([1]), float("nan")),
                ids,
                n,
                padding_mask=pad_mask([1, 1], 2),
            ),
            Returns("finite: padded slots never written"),
        ),
        Case(
            SC,
            "empty batch (b=0)",
            lambda: cm.scatter_tokens(vals()[:0], ids[:0], n),
            Returns("[0, n, ...]", shape_is(0, n, d)),
        ),
        Case(
            SC,
            "k=0 and num_tokens=0",
            lambda: cm.scatter_tokens(vals(0), ids[:, :0], 0),
            Returns("[b, 0, ...]", shape_is(b, 0, d)),
        ),
        Case(
            SC,
            "int64 values",
            lambda: cm.scatter_tokens(vals().long(), torch.tensor([[4, 0], [1, 2]]), n),
            Returns("any dtype is placed as is", shape_is(b, n, d)),
        ),
        Case(
            SC,
            "non-contiguous values, ids, mask",
            lambda: cm.scatter_tokens(nc(vals()), nc(ids), n, padding_mask=nc(pad_mask([2, 1], 2))),
            Returns(
                "same result as contiguous",
                same_as(
                    lambda: cm.scatter_tokens(vals(), ids, n, padding_mask=pad_mask([2, 1], 2))
                ),
            ),
        ),
        Case(
            L,
            "lengths float",
            lambda: cm.lengths_to_padding_mask(torch.tensor([1.0, 2.0])),
            Raises(("lengths",), ("torch.float32",)),
        ),
        Case(
            L,
            "lengths bool",
            lambda: cm.lengths_to_padding_mask(torch.tensor([True])),
            Raises(("lengths",), ("torch.bool",)),
        ),
        Case(
            L,
            "lengths of rank 2",
            lambda: cm.lengths_to_padding_mask(torch.tensor([[1, 2]])),
            Raises(("lengths",), ("(1, 2)",)),
        ),
        Case(
            L,
            "lengths a list",
            lambda: cm.lengths_to_padding_mask([1, 2]),
            Raises(("lengths",), ("list",)),
        ),
        Case(
            L,
            "max_len=-1",
            lambda: cm.lengths_to_padding_mask(torch.tensor([1, 2]), -1),
            Raises(("max_len",), ("-1",)),
        ),
        Case(
            L,
            "max_len a float",
            lambda: cm.lengths_to_padding_mask(torch.tensor([1, 2]), 3.0),
            Raises(("max_len",), ("3.0",)),
        ),
        Case(
            L,
            "negative lengths, max_len inferred",
            lambda: cm.lengths_to_padding_mask(torch.tensor([-1, 2])),
            Raises(("lengths",), ("-1",)),
        ),
        Case(
            L,
            "every length negative, max_len inferred",
            lambda: cm.lengths_to_padding_mask(torch.tensor([-2, -1])),
            Raises(("lengths",), ("-1",)),
        ),
        Case(
            L,
            "lengths > max_len",
            lambda: cm.lengths_to_padding_mask(torch.tensor([5, 2]), 3),
            KernelError("lengths outside [0, max_len] are never silently truncated"),
        ),
        Case(
            L,
            "negative lengths with max_len",
            lambda: cm.lengths_to_padding_mask(torch.tensor([-1, 2]), 3),
            KernelError("lengths outside [0, max_len] are never silently truncated"),
        ),
        Case(
            L,
            "empty batch (b=0)",
            lambda: cm.lengths_to_padding_mask(torch.zeros(0, dtype=torch.long)),
            Returns("[0, 0]", shape_is(0, 0)),
        ),
        Case(
            L,
            "every length 0",
            lambda: cm.lengths_to_padding_mask(torch.zeros(2, dtype=torch.long)),
            Returns("[b, 0]", shape_is(2, 0)),
        ),
        Case(
            L,
            "non-contiguous int32 lengths",
            lambda: cm.lengths_to_padding_mask(nc(torch.tensor([3, 1], dtype=torch.int32)), 4),
            Returns(
                "same as contiguous int64",
                same_as(lambda: cm.lengths_to_padding_mask(torch.tensor([3, 1]), 4)),
            ),
        ),
        Case(
            P,
            "padding_mask float",
            lambda: cm.padding_mask_to_lengths(pad_mask([1, 2], 3).float()),
            Raises(("padding_mask",), ("torch.float32",)),
        ),
        Case(
            P,
            "padding_mask of rank 1",
            lambda: cm.padding_mask_to_lengths(pad_mask([1], 3)[0]),
            Raises(("padding_mask",), ("(3,)",)),
        ),
        Case(
            P,
            "padding_mask a list",
            lambda: cm.padding_mask_to_lengths([[True]]),
            Raises(("padding_mask",), ("list",)),
        ),
        Case(
            P,
            "empty batch (b=0)",
            lambda: cm.padding_mask_to_lengths(pad_mask([], 3)),
            Returns("[0]", shape_is(0)),
        ),
        Case(
            P,
            "non-contiguous padding_mask",
            lambda: cm.padding_mask_to_lengths(nc(pad_mask([1, 3], 3))),
            Returns(
                "same as contiguous",
                same_as(lambda: cm.padding_mask_to_lengths(pad_mask([1, 3], 3))),
            ),
        ),
    ]


CASES = _random_masking_cases() + _strategy_cases() + _split_cases() + _token_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_masking_input(case: Case, rec: Recorder) -> None:
    run_case(rec, case)
