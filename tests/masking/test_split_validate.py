"""Self-contradictory `MaskSplit` s are refused; `scatter_tokens` repeats (issue 9, 3 and 4).

Legend: ``b`` batch, ``n`` tokens, ``k`` kept slots, ``p`` predicted slots. Polarity:
``*_padding_mask`` True = padding; ``visible_mask`` True = seen; ``predict_mask`` True =
reconstructed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    CORRUPTED_FIELD,
    SPLIT_CORRUPTIONS,
    SplitSpec,
    corrupt_split,
    generator,
    seeds,
    split_specs,
    tiny_image_model,
)

import crossmae as cm
from crossmae.masking import tokens as tokens_mod

B, N = 3, 16


@given(spec=split_specs())
def test_library_splits_validate(spec: SplitSpec) -> None:
    split = spec.build(B, N)
    assert split.validate() is split
    assert split.validate(N) is split


@given(spec=split_specs(), kind=st.sampled_from(SPLIT_CORRUPTIONS))
def test_corrupted_splits_are_refused_naming_the_field(spec: SplitSpec, kind: str) -> None:
    bad = corrupt_split(spec.build(B, N), kind)
    field = CORRUPTED_FIELD[kind]
    with pytest.raises(ValueError, match=rf"split\.{field}\b"):
        bad.validate()
    # every public entry point that accepts a split refuses it on the CPU (free there)
    with pytest.raises(ValueError, match=rf"split\.{field}\b"):
        cm.mask_missing_samples(bad, torch.zeros(B, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"split\.{field}\b"):
        cm.modality_dropout(bad)


def _image() -> cm.ImageCrossMAE:
    return tiny_image_model(8, 2, 8, 2)


@given(spec=split_specs(), kind=st.sampled_from(SPLIT_CORRUPTIONS))
def test_image_model_refuses_corrupted_splits(spec: SplitSpec, kind: str) -> None:
    model = _image()
    imgs = torch.randn(B, 3, 16, 16, generator=generator(spec.seed))
    good = spec.build(B, N)
    bad = corrupt_split(good, kind)
    field = CORRUPTED_FIELD[kind]
    with pytest.raises(ValueError, match=rf"split\.{field}\b"):
        model(imgs, split=bad)
    with pytest.raises(ValueError, match=rf"split\.{field}\b"):
        model.forward_encoder(imgs, bad)
    with pytest.raises(ValueError, match=rf"split\.{field}\b"):
        model.reconstruct(imgs, bad)
    enc = model.forward_encoder(imgs, good)
    with pytest.raises(ValueError, match=rf"split\.{field}\b"):
        model.forward_decoder(enc, bad)


def test_overlap_is_named_even_when_ids_agree_with_masks() -> None:
    vis = torch.zeros(1, 4, dtype=torch.bool)
    vis[0, :2] = True
    good = cm.mask_split_from_masks(vis, ~vis)
    both = good._replace(
        ids_predict=torch.tensor([[1, 2, 3]]),
        predict_padding_mask=torch.zeros(1, 3, dtype=torch.bool),
        predict_mask=torch.tensor([[False, True, True, True]]),
    )
    with pytest.raises(ValueError, match="both visible and predicted"):
        both.validate()


# --------------------------------------------------------------------------- scatter_tokens
@st.composite
def repeated_ids(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(values [b, k, 2], ids [b, k] with at least one real repeat, padding_mask, n)``."""
    seed = draw(seeds())
    g = generator(seed)
    b, k, n = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 6))
    ids = torch.randint(0, n, (b, k), generator=g)
    pad = torch.rand(b, k, generator=g) < 0.3
    row = draw(st.integers(0, b - 1))
    ids[row, 1] = ids[row, 0]
    pad[row, :2] = False
    return torch.randn(b, k, 2, generator=g), ids, pad, n


@given(case=repeated_ids())
def test_scatter_refuses_repeated_real_ids_on_the_cpu(case) -> None:  # type: ignore[no-untyped-def]
    values, ids, pad, n = case
    with pytest.raises(ValueError, match=r"\bids\b.*repeats"):
        cm.scatter_tokens(values, ids, n, padding_mask=pad)


@given(case=repeated_ids(), fill=st.sampled_from([0.0, -1.5]))
def test_scatter_repeats_sum_where_unchecked(case, fill: float) -> None:  # type: ignore[no-untyped-def]
    """Where repeats cannot be checked (CUDA, compile) they sum, and the gradient agrees:
    d out[i, m] / d values[i, j] = 1 exactly for every real ``j`` with ``ids[i, j] = m``."""
    values, ids, pad, n = case
    values = values.double().requires_grad_(True)
    original = tokens_mod._host_checkable
    tokens_mod._host_checkable = lambda t: False  # what CUDA / torch.compile see
    try:
        out = cm.scatter_tokens(values, ids, n, padding_mask=pad, fill_value=fill)
    finally:
        tokens_mod._host_checkable = original
    onehot = torch.nn.functional.one_hot(ids, n).double() * (~pad)[..., None]  # [b k n]
    hits = onehot.sum(dim=1)  # [b n]
    summed = torch.einsum("bkn,bkd->bnd", onehot, values.detach())
    expected = torch.where(hits[..., None] > 0, summed, torch.full_like(summed, fill))
    torch.testing.assert_close(out.detach(), expected)
    w = torch.randn(out.shape, generator=generator(1), dtype=torch.float64)
    (out * w).sum().backward()
    expected_grad = torch.einsum("bkn,bnd->bkd", onehot, w)
    torch.testing.assert_close(values.grad, expected_grad)


def test_scatter_unique_ids_unchanged() -> None:
    """The 0.1.0 example without the repeat: exact placement, fill elsewhere."""
    values = torch.tensor([[[1.0], [2.0], [3.0]]])
    out = cm.scatter_tokens(values, torch.tensor([[1, 0, 2]]), 4, fill_value=7.0)
    assert out.flatten().tolist() == [2.0, 1.0, 3.0, 7.0]
    with pytest.raises(ValueError, match="repeats"):
        cm.scatter_tokens(values, torch.tensor([[1, 1, 2]]), 4)


def test_mae_decoder_refuses_repeated_ids_keep() -> None:
    dec = cm.MAEDecoder(8, 8, 1, 2, 4, num_tokens=4)
    ctx = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match=r"ids_keep.*repeats"):
        dec(ctx, torch.tensor([[1, 1, 2]]), torch.tensor([[0, 3]]))
