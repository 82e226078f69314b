"""`ImageCrossMAE`, `MaskSplit.validate` and `scatter_tokens` on CUDA, per kernel.

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).

Legend: ``b`` batch, ``N`` patches, ``k`` visible slots, ``p`` predicted slots. Polarity:
``visible_mask`` True = seen; ``predict_mask`` True = scored; ``*_padding_mask`` True =
padding.
"""

from __future__ import annotations

import functools

import pytest
import torch
from gpu_helpers import DEVICE, GPU, assert_kernel_selected, rel_err
from strategies import CORRUPTED_FIELD, SPLIT_CORRUPTIONS, SplitSpec, corrupt_split

import crossmae as cm

pytestmark = GPU

B, C, IMG, PATCH = 4, 3, 32, 4
N = (IMG // PATCH) ** 2
VARIANTS = {
    "crossmae_wfm": dict(),
    "mae_decoder_norm_pix": dict(use_cross_attn=False, use_weighted_fm=False, norm_pix_loss=True),
}


@functools.cache
def _model(variant: str) -> cm.ImageCrossMAE:
    torch.manual_seed(0)
    return (
        cm.models.crossmae_vit_small(
            img_size=IMG,
            patch_size=PATCH,
            depth=2,
            decoder_depth=2,
            embed_dim=32,
            num_heads=2,  # head dim 16: every kernel serves it
            decoder_embed_dim=32,
            decoder_num_heads=2,
            **VARIANTS[variant],
        )
        .to(DEVICE)
        .train()
    )


def _split(dense: bool) -> cm.MaskSplit:
    return SplitSpec(3, dense, 0.75).build(B, N).to(DEVICE)


def _step(model, imgs, split, dense):  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = model(imgs, split=split, dense=dense)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "padded"])
def test_nan_outside_visible_patches(kernel: str, variant: str, dense: bool) -> None:
    assert_kernel_selected(kernel, torch.bfloat16, 16)
    model = _model(variant)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    imgs = torch.randn(B, C, IMG, IMG, device=DEVICE, generator=g)
    split = _split(dense)
    clean, clean_grads = _step(model, imgs, split, dense)
    assert bool(clean.loss.isfinite())
    poisoned = imgs.clone()
    hidden = ~split.visible_mask & ~split.predict_mask  # neither seen nor scored
    grid = hidden.view(B, 1, IMG // PATCH, 1, IMG // PATCH, 1)
    grid = grid.expand(B, C, IMG // PATCH, PATCH, IMG // PATCH, PATCH).reshape(B, C, IMG, IMG)
    poisoned[grid] = float("nan")  # every pixel the model must not read
    target = split.predict_mask.view(B, 1, IMG // PATCH, 1, IMG // PATCH, 1)
    target = target.expand(B, C, IMG // PATCH, PATCH, IMG // PATCH, PATCH).reshape(B, C, IMG, IMG)
    out, grads = _step(model, poisoned, split, dense)
    assert torch.equal(out.loss, clean.loss) and torch.equal(out.pred, clean.pred)
    for name, gr in grads.items():
        assert bool(gr.isfinite().all()), f"{name}.grad not finite"
        assert rel_err(gr, clean_grads[name]) < 1e-2, name  # backward may sum in any order
    # one missing target pixel per sample: finite loss and gradients (the target rule)
    t_poison = imgs.clone()
    flat = target.flatten(1)
    rows = torch.nonzero(flat.any(dim=1)).flatten()  # samples with a target
    first = flat.float().argmax(dim=1)[rows]  # their first target pixel
    t_poison.view(B, -1)[rows, first] = float("inf")
    out, grads = _step(model, t_poison, split, dense)
    assert bool(out.loss.isfinite()) and torch.equal(out.pred, clean.pred)
    assert all(bool(gr.isfinite().all()) for gr in grads.values())


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "padded"])
def test_forward_backward_with_a_given_split_never_syncs(kernel: str, dense: bool) -> None:
    if DEVICE != "cuda":
        pytest.skip("sync debugging is a CUDA feature")
    model = _model("crossmae_wfm")
    imgs = torch.randn(B, C, IMG, IMG, device=DEVICE)
    split = _split(dense)
    _step(model, imgs, split, dense)  # warm up (lazy inits may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(model, imgs, split, dense)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kind", SPLIT_CORRUPTIONS)
def test_validate_refuses_corrupted_splits_on_the_device(kind: str) -> None:
    bad = corrupt_split(SplitSpec(5, False, 0.75).build(B, N), kind).to(DEVICE)
    with pytest.raises(ValueError, match=rf"split\.{CORRUPTED_FIELD[kind]}\b"):
        bad.validate()
    assert _split(False).validate().ids_keep.device.type == DEVICE


def test_scatter_repeats_sum_on_the_device() -> None:
    """On CUDA repeated real ids are not checked: they sum, and the gradient agrees."""
    if DEVICE != "cuda":
        pytest.skip("the unchecked path is the device's")
    values = torch.tensor([[[1.0], [2.0], [3.0]]], device=DEVICE, requires_grad=True)
    ids = torch.tensor([[1, 1, 2]], device=DEVICE)
    out = cm.scatter_tokens(values, ids, 4)
    assert out.flatten().tolist() == [0.0, 3.0, 3.0, 0.0]
    weight = torch.tensor([[[10.0], [20.0], [30.0], [40.0]]], device=DEVICE)
    (out * weight).sum().backward()
    assert values.grad is not None
    assert values.grad.flatten().tolist() == [20.0, 20.0, 30.0]


def test_compiled_model_equals_eager_and_ignores_unseen_pixels(kernel: str) -> None:
    """``torch.compile`` of the whole model with a given padded split: same loss as eager
    (bf16 tolerance), and NaN in every pixel outside the visible and predicted patches
    changes nothing."""
    torch._dynamo.reset()
    model = _model("crossmae_wfm")
    g = torch.Generator(device=DEVICE).manual_seed(1)
    imgs = torch.randn(B, C, IMG, IMG, device=DEVICE, generator=g)
    split = _split(False)
    eager, eager_grads = _step(model, imgs, split, False)
    compiled = torch.compile(model, dynamic=False)
    out, grads = _step(compiled, imgs, split, False)
    assert abs(float(out.loss) - float(eager.loss)) <= 3e-2 * abs(float(eager.loss)) + 1e-4
    for name, gr in eager_grads.items():
        key = name if name in grads else f"_orig_mod.{name}"
        assert rel_err(grads[key], gr) < 6e-2, name
    hidden = ~split.visible_mask & ~split.predict_mask
    pix = hidden.view(B, 1, IMG // PATCH, 1, IMG // PATCH, 1)
    pix = pix.expand(B, C, IMG // PATCH, PATCH, IMG // PATCH, PATCH).reshape(B, C, IMG, IMG)
    poisoned = imgs.masked_fill(pix, float("nan"))
    p_out, p_grads = _step(compiled, poisoned, split, False)
    assert torch.equal(p_out.loss, out.loss) and torch.equal(p_out.pred, out.pred)
    for name, gr in p_grads.items():
        assert bool(gr.isfinite().all()), name
        assert rel_err(gr, grads[name]) < 1e-2, name
