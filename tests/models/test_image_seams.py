"""`ImageCrossMAE` never reads a pixel outside the visible patches (issue 9, defect 1).

Legend: ``b`` batch, ``C`` channels, ``H``/``W`` image size, ``N`` patches, ``k`` visible
slots, ``p`` predicted slots, ``e`` width. Polarity: ``visible_mask`` True = seen by the
encoder; ``predict_mask`` True = scored; ``*_padding_mask`` True = padding slot.

Properties (both decoders, dense and padded splits):

* NaN/inf in any pixel outside the visible patches leaves every parameter gradient finite;
* when that pixel is not in a predicted patch, loss, predictions and every gradient are
  bit-identical to the clean image;
* when it is (the target rule): predictions are bit-identical, the pixel counts as a
  missing target value (NaN and inf give the same loss and gradients, equal to the masked
  MSE with that value excluded, ``norm_pix_loss`` statistics included).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import SplitSpec, generator, split_specs

import crossmae as cm

B, C, IMG, PATCH = 3, 3, 16, 4
GRID = IMG // PATCH
N = GRID * GRID
VARIANTS = {
    "crossmae_wfm": dict(),
    "crossmae_norm_pix": dict(use_weighted_fm=False, norm_pix_loss=True),
    "mae_decoder": dict(use_cross_attn=False, use_weighted_fm=False),
    "mae_decoder_wfm_norm_pix": dict(use_cross_attn=False, norm_pix_loss=True),
}


@functools.cache
def _model(variant: str, dtype: torch.dtype = torch.float32) -> cm.ImageCrossMAE:
    torch.manual_seed(0)
    model = cm.models.crossmae_vit_small(
        img_size=IMG,
        patch_size=PATCH,
        depth=1,
        decoder_depth=1,
        embed_dim=24,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_num_heads=2,
        **VARIANTS[variant],
    )
    return model.to(dtype).eval()


def _images(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(B, C, IMG, IMG, generator=generator(seed), dtype=torch.float64).to(dtype)


def _step(model: cm.ImageCrossMAE, imgs: torch.Tensor, split: cm.MaskSplit, dense: bool):
    model.zero_grad(set_to_none=True)
    out = model(imgs, split=split, dense=dense)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _pixel_of_patch(patch: int, offset: int) -> tuple[int, int, int]:
    """A (channel, row, col) inside ``patch`` chosen by ``offset``."""
    r, c = divmod(patch, GRID)
    ch, rest = divmod(offset % (C * PATCH * PATCH), PATCH * PATCH)
    dy, dx = divmod(rest, PATCH)
    return ch, r * PATCH + dy, c * PATCH + dx


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_embed_selected_equals_the_convolution(variant: str) -> None:
    """float64: the visible-only embedding equals the 0.1.0 path (conv, then gather)."""
    model = _model(variant, torch.float64)
    imgs = _images(1, torch.float64)
    split = SplitSpec(3, False, 0.75).build(B, N)
    pe = model.patch_embed
    new = pe.embed_selected(imgs, split.ids_keep, split.keep_padding_mask)
    old = cm.gather_tokens(pe(imgs), split.ids_keep)
    real = ~split.keep_padding_mask
    torch.testing.assert_close(new[real], old[real], rtol=1e-12, atol=1e-12)
    # and the weight keeps its Conv2d layout (checkpoints load unchanged)
    assert tuple(pe.proj.weight.shape) == (24, C, PATCH, PATCH)


# each example runs 2-3 training steps: at most 30 examples (the ci profile asks for 60)
@settings(max_examples=min(settings().max_examples, 30))
@given(
    spec=split_specs(),
    seed=st.integers(0, 2**16),
    pick=st.integers(0, 10**6),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    variant=st.sampled_from(list(VARIANTS)),
)
def test_unseen_pixel_never_poisons(
    spec: SplitSpec, seed: int, pick: int, value: float, variant: str
) -> None:
    model = _model(variant)
    imgs = _images(seed)
    split = spec.build(B, N)
    clean, clean_grads = _step(model, imgs, split, spec.dense)
    sample = pick % B
    hidden = torch.nonzero(~split.visible_mask[sample]).flatten()
    patch = int(hidden[(pick // B) % hidden.numel()])
    ch, y, x = _pixel_of_patch(patch, pick // 7)
    poisoned = imgs.clone()
    poisoned[sample, ch, y, x] = value
    out, grads = _step(model, poisoned, split, spec.dense)

    assert grads.keys() == clean_grads.keys()
    for name, g in grads.items():
        assert bool(torch.isfinite(g).all()), f"{name}.grad not finite"
    assert torch.equal(out.pred, clean.pred), "predictions changed"
    if not bool(split.predict_mask[sample, patch]):
        assert torch.equal(out.loss, clean.loss)
        for name, g in grads.items():
            assert torch.equal(g, clean_grads[name]), f"{name}.grad changed"
        return
    # target rule: the pixel is a missing target value
    other = imgs.clone()
    other[sample, ch, y, x] = float("nan") if value != value else float("inf")
    out2, grads2 = _step(model, other, split, spec.dense)
    assert torch.equal(out.loss, out2.loss), "NaN and inf targets differ"
    for name, g in grads.items():
        assert torch.equal(g, grads2[name]), f"{name}.grad differs between NaN and inf"
    raw, pad = split.predict_tokens(cm.patchify(poisoned, PATCH))
    expected = cm.masked_mse_loss(
        clean.pred,
        raw,
        padding_mask=pad,
        valid_mask=torch.isfinite(raw),
        norm_pix=model.norm_pix_loss,
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)
    assert bool(torch.isfinite(out.target).all())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nan_in_patch_zero_behind_padded_slots(variant: str) -> None:
    """0.1.0's second trigger: padded ``ids_keep`` slots point at patch 0; NaN there."""
    model = _model(variant)
    imgs = _images(5)
    vis = torch.zeros(B, N, dtype=torch.bool)
    vis[:, 5:9] = True
    vis[0, 5:] = False  # sample 0 keeps fewer patches: its padded slots point at patch 0
    vis[0, 5] = True
    pred = torch.zeros(B, N, dtype=torch.bool)
    pred[:, 10:12] = True
    split = cm.mask_split_from_masks(vis, pred)
    assert bool(split.keep_padding_mask[0].any()) and not bool(vis[0, 0])
    clean, clean_grads = _step(model, imgs, split, False)
    poisoned = imgs.clone()
    poisoned[0, :, :PATCH, :PATCH] = float("nan")
    out, grads = _step(model, poisoned, split, False)
    assert torch.equal(out.loss, clean.loss) and torch.equal(out.pred, clean.pred)
    for name, g in grads.items():
        assert torch.equal(g, clean_grads[name]), name


def test_target_rule_fully_missing_patch_is_not_scored() -> None:
    """A predicted patch with no finite pixel is not scored; the loss stays finite."""
    model = _model("crossmae_norm_pix")
    imgs = _images(7)
    split = SplitSpec(11, True, 0.75).build(B, N)
    poisoned = imgs.clone()
    patch = int(split.ids_predict[1, 0])
    r, c = divmod(patch, GRID)
    poisoned[1, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = float("nan")
    out, grads = _step(model, poisoned, split, True)
    pad = split.predict_padding_mask.clone()
    pad[1, 0] = True  # the same loss as not predicting that patch
    patches, _ = split.predict_tokens(cm.patchify(imgs, PATCH))
    expected = cm.masked_mse_loss(out.pred, patches, padding_mask=pad, norm_pix=True)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


class _ConvOnly(torch.nn.Module):
    """A patch embedding without ``embed_selected``: the masked-image fallback path."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.inner(img)


def test_other_patch_embeddings_never_see_hidden_pixels() -> None:
    model = _model("crossmae_wfm")
    imgs = _images(9)
    split = SplitSpec(2, True, 0.75).build(B, N)
    clean, _ = _step(model, imgs, split, True)
    original = model.patch_embed
    try:
        model.patch_embed = _ConvOnly(original)
        hidden = int(torch.nonzero(~split.visible_mask[0] & ~split.predict_mask[0])[0])
        ch, y, x = _pixel_of_patch(hidden, 3)
        poisoned = imgs.clone()
        poisoned[0, ch, y, x] = float("nan")
        out, grads = _step(model, poisoned, split, True)
    finally:
        model.patch_embed = original
    torch.testing.assert_close(out.loss, clean.loss)
    for name, g in grads.items():
        assert bool(torch.isfinite(g).all()), name
