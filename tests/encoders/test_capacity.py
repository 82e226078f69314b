"""``forward(tokens, padding_mask, capacity=t)``: padded in, padded out, at packed cost.

Both encoders (`TransformerEncoder`, `PostNormTransformerEncoder`) must return on real slots
exactly what the padded path returns (tokens, feature taps, gradients to tokens and cond),
with 0 in padding slots, for any lengths (empty samples, full rows), any capacity from the
real count up, NaN stored in padding, and under ``torch.compile(fullgraph=True)``. On the
CPU the packed route runs the block-diagonal ("dense") kernel; the varlen and flex routes are
covered in tests/layers/test_backend.py.

Legend: ``b`` batch, ``n`` padded length, ``c`` width, ``k`` feature maps, ``a`` cond width.
Mask polarity: ``padding_mask`` True = padding.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import crossmae as cm
from crossmae.encoders import postnorm as postnorm_module
from crossmae.encoders import transformer as transformer_module
from tests.strategies import PaddedBatch, generator, padded_batches, poison_padding, randn

F64 = torch.float64
C, A = 8, 3  # width, cond width


def _encoder(kind: str, film: bool, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    cond_dim = A if film else None
    enc: torch.nn.Module
    if kind == "pre":
        enc = cm.TransformerEncoder(C, 2, 2, cond_dim=cond_dim, **kw)
        for f in getattr(enc, "films", None) or []:  # zero-initialised: make FiLM act
            torch.nn.init.normal_(f.proj.weight, std=0.5)
    else:
        enc = cm.PostNormTransformerEncoder(C, 2, 2, cond_dim=cond_dim, **kw)
    return enc.to(F64).eval()


def _inputs(
    batch: PaddedBatch, film: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    x = batch.tokens(C).to(F64)
    cond = randn(batch.seed + 1, batch.batch, A, dtype=F64) if film else None
    return x, batch.padding_mask, cond


def _run(
    enc: torch.nn.Module,
    x: torch.Tensor,
    pad: torch.Tensor,
    cond: Optional[torch.Tensor],
    capacity: Optional[int],
) -> tuple[cm.EncoderOutput, tuple[torch.Tensor, ...]]:
    """Forward with taps, and the gradients (tokens, cond) of a loss over real slots."""
    x = x.detach().requires_grad_(True)
    c = cond.detach().requires_grad_(True) if cond is not None else None
    out = enc(x, pad, cond=c, return_layers="all", include_input=True, capacity=capacity)
    real = ~pad
    w = randn(5, *out.tokens.shape, dtype=F64)
    assert out.features is not None
    loss = (out.tokens * w)[real].sum() + (out.features.square() * w)[:, real].sum()
    grads = torch.autograd.grad(loss, [x] + ([c] if c is not None else []), allow_unused=True)
    return out, tuple(torch.zeros_like(x) if g is None else g for g in grads)


def _assert_same_on_real_slots(
    got: tuple[cm.EncoderOutput, tuple[torch.Tensor, ...]],
    ref: tuple[cm.EncoderOutput, tuple[torch.Tensor, ...]],
    pad: torch.Tensor,
) -> None:
    (out, grads), (want, want_grads) = got, ref
    real = ~pad
    assert out.tokens.shape == want.tokens.shape
    assert out.padding_mask is pad
    atol = rtol = 1e-10
    torch.testing.assert_close(out.tokens[real], want.tokens[real], atol=atol, rtol=rtol)
    assert out.features is not None and want.features is not None
    assert out.features.shape == want.features.shape and out.features.is_contiguous()
    torch.testing.assert_close(out.features[:, real], want.features[:, real], atol=atol, rtol=rtol)
    # documented: 0 in every padding slot (tokens and features)
    assert (out.tokens[pad] == 0).all() and (out.features[:, pad] == 0).all()
    for g, wg in zip(grads, want_grads):
        assert g.isfinite().all()
        torch.testing.assert_close(g, wg, atol=atol, rtol=rtol)
    assert (grads[0][pad] == 0).all()  # nothing flows to padded input slots


@pytest.mark.parametrize("kind", ["pre", "post"])
@given(
    batch=padded_batches(max_batch=4, max_len=7, heads=(2,), head_dims=(4,)),
    slack=st.integers(0, 5),
    film=st.booleans(),
)
def test_capacity_equals_padded_path(kind: str, batch: PaddedBatch, slack: int, film: bool) -> None:
    enc = _encoder(kind, film)
    x, pad, cond = _inputs(batch, film)
    capacity = sum(batch.lengths) + slack
    ref = _run(enc, x, pad, cond, None)
    got = _run(enc, poison_padding(x, pad, batch.seed), pad, cond, capacity)
    _assert_same_on_real_slots(got, ref, pad)


@pytest.mark.parametrize("kind", ["pre", "post"])
@pytest.mark.parametrize("slack", [0, 3])
def test_empty_sample_full_rows_and_nan_padding(kind: str, slack: int) -> None:
    """A sample with zero real tokens, all-real rows, scattered padding, NaN/inf in padding;
    capacity exactly the real count and with slack."""
    enc = _encoder(kind, film=True)
    g = generator(11)
    x = torch.randn(4, 6, C, generator=g, dtype=F64)
    cond = torch.randn(4, A, generator=g, dtype=F64)
    pad = torch.tensor(
        [
            [False] * 6,  # all real
            [True] * 6,  # zero real tokens
            [True, False, True, False, False, True],  # padding anywhere
            [False] * 6,
        ]
    )
    poisoned = poison_padding(x, pad, 3, kind="mixed")
    ref = _run(enc, x, pad, cond, None)
    got = _run(enc, poisoned, pad, cond, int((~pad).sum()) + slack)
    _assert_same_on_real_slots(got, ref, pad)


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_all_padding_and_empty_batch(kind: str) -> None:
    enc = _encoder(kind, film=True)
    x = torch.full((2, 3, C), float("nan"), dtype=F64)
    pad = torch.ones(2, 3, dtype=torch.bool)
    cond = torch.randn(2, A, dtype=F64)
    out = enc(x, pad, cond=cond, return_layers=-1, capacity=0)
    assert out.tokens.shape == (2, 3, C) and (out.tokens == 0).all()
    assert out.features is not None and out.features.shape == (1, 2, 3, C)
    empty = enc(x[:0], pad[:0], cond=cond[:0], return_layers="all", capacity=4)
    assert empty.tokens.shape == (0, 3, C)
    assert empty.features is not None and empty.features.shape == (2, 0, 3, C)


@pytest.mark.parametrize("kind", ["pre", "post"])
@pytest.mark.parametrize(
    ("bad", "error", "shown"),
    [
        (True, TypeError, "True"),
        (8.0, TypeError, "8.0"),
        ("8", TypeError, "'8'"),
        (-1, ValueError, "-1"),
    ],
)
def test_bad_capacity_is_refused_naming_it(
    kind: str, bad: object, error: type[Exception], shown: str
) -> None:
    enc = _encoder(kind, film=False)
    x = torch.randn(2, 4, C, dtype=F64)
    pad = cm.lengths_to_padding_mask(torch.tensor([4, 2]), 4)
    with pytest.raises(error, match="capacity") as info:
        enc(x, pad, capacity=bad)
    assert shown in str(info.value)


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_capacity_too_small_raises_on_the_cpu(kind: str) -> None:
    enc = _encoder(kind, film=False)
    x = torch.randn(2, 4, C, dtype=F64)
    pad = cm.lengths_to_padding_mask(torch.tensor([4, 2]), 4)
    with pytest.raises(ValueError, match="capacity=5"):
        enc(x, pad, capacity=5)
    enc(x, pad, capacity=6)  # exactly the real count is enough


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_capacity_without_padding_mask_runs_the_plain_path(kind: str) -> None:
    """No padding: packed and padded layouts coincide; capacity is still checked (>= b * n,
    free: static shapes)."""
    enc = _encoder(kind, film=False)
    x = torch.randn(2, 4, C, dtype=F64)
    with torch.no_grad():
        ref = enc(x, return_layers="all")
        out = enc(x, capacity=8, return_layers="all")
    assert out.padding_mask is None
    assert torch.equal(out.tokens, ref.tokens)
    assert out.features is not None and ref.features is not None
    assert torch.equal(out.features, ref.features)
    with pytest.raises(ValueError, match="capacity=7"):
        enc(x, capacity=7)


def _count_packs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = cm.pack_tokens

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(transformer_module, "pack_tokens", counting)
    monkeypatch.setattr(postnorm_module, "pack_tokens", counting)
    return calls


@pytest.mark.parametrize(
    ("kind", "kw"),
    [("pre", {"drop_path": 0.5}), ("pre", {"attn_drop": 0.3}), ("post", {"attn_drop": 0.3})],
)
def test_training_with_attention_dropout_or_drop_path_runs_the_padded_path(
    monkeypatch: pytest.MonkeyPatch, kind: str, kw: dict[str, float]
) -> None:
    """The packed kernels take no attention dropout, and stochastic depth is per sample: in
    training those run the padded path (same random draws), padding slots zeroed."""
    enc = _encoder(kind, film=True, **kw).train()
    x = torch.randn(3, 5, C, dtype=F64)
    cond = torch.randn(3, A, dtype=F64)
    pad = cm.lengths_to_padding_mask(torch.tensor([5, 0, 2]), 5)
    calls = _count_packs(monkeypatch)
    torch.manual_seed(4)
    ref = enc(x, pad, cond=cond, return_layers="all")
    torch.manual_seed(4)
    out = enc(x, pad, cond=cond, return_layers="all", capacity=7)
    assert not calls
    real = ~pad
    torch.testing.assert_close(out.tokens[real], ref.tokens[real])
    assert (out.tokens[pad] == 0).all()
    assert out.features is not None and (out.features[:, pad] == 0).all()
    enc.eval()  # in eval the packed route runs
    enc(x, pad, cond=cond, capacity=7)
    assert calls


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_training_without_attention_dropout_packs(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Elementwise dropout (``drop``) is the same per row: training still takes the packed
    route, and its gradients are finite."""
    kw: dict[str, float] = {"drop": 0.2, "attn_drop": 0.0}
    if kind == "post":
        kw["proj_drop"] = 0.1
    enc = _encoder(kind, film=False, **kw).train()
    calls = _count_packs(monkeypatch)
    x = torch.randn(2, 4, C, dtype=F64, requires_grad=True)
    pad = cm.lengths_to_padding_mask(torch.tensor([1, 3]), 4)
    enc(x, pad, capacity=4).tokens.sum().backward()
    assert calls and x.grad is not None and x.grad.isfinite().all()


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_capacity_under_compile_fullgraph(kind: str) -> None:
    """No graph break and no host sync on the capacity route (static int capacity)."""
    enc = _encoder(kind, film=True).float()
    g = generator(2)
    x = torch.randn(3, 6, C, generator=g)
    cond = torch.randn(3, A, generator=g)
    pad = cm.lengths_to_padding_mask(torch.tensor([6, 0, 3]), 6)
    compiled = torch.compile(enc, fullgraph=True, backend="eager")
    with torch.no_grad():
        ref = enc(x, pad, cond=cond, return_layers="all")
        for capacity in (9, 16):
            out = compiled(x, pad, cond=cond, return_layers="all", capacity=capacity)
            real = ~pad
            torch.testing.assert_close(out.tokens[real], ref.tokens[real], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                out.features[:, real], ref.features[:, real], atol=1e-5, rtol=1e-5
            )
            assert (out.tokens[pad] == 0).all()


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_capacity_under_autocast_keeps_the_padded_dtypes(kind: str) -> None:
    enc = _encoder(kind, film=False).float()
    x = torch.randn(2, 4, C)
    pad = cm.lengths_to_padding_mask(torch.tensor([4, 1]), 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = enc(x, pad, return_layers="all")
        out = enc(x, pad, return_layers="all", capacity=5)
    assert out.tokens.dtype == ref.tokens.dtype
    assert out.features is not None and ref.features is not None
    assert out.features.dtype == ref.features.dtype == torch.bfloat16
    real = ~pad
    torch.testing.assert_close(
        out.tokens[real].float(), ref.tokens[real].float(), atol=0.1, rtol=0.05
    )


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_nan_in_a_real_token_stays_in_its_sample(kind: str) -> None:
    """Batch independence on the packed route: a NaN in sample 0's real token reaches sample
    0 only (outputs and input gradients), as on the padded path."""
    enc = _encoder(kind, film=True)
    x = torch.randn(3, 5, C, dtype=F64)
    x[0, 1, 2] = float("nan")
    x.requires_grad_(True)
    cond = torch.randn(3, A, dtype=F64)
    pad = cm.lengths_to_padding_mask(torch.tensor([3, 5, 2]), 5)
    out = enc(x, pad, cond=cond, return_layers="all", capacity=12)
    assert torch.isnan(out.tokens[0]).any()
    assert out.tokens[1:].isfinite().all()
    assert out.features is not None and out.features[:, 1:].isfinite().all()
    out.tokens[1:].sum().backward()
    assert x.grad is not None and x.grad[1:].isfinite().all()
