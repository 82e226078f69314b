"""Gradients: every parameter of every preset (tiny) receives a finite gradient for every
masking strategy, including batches where a sample sees nothing, predicts nothing, or is
missing a modality, and batches where no sample predicts anything.

DistributedDataParallel needs the same parameters used at every step (a parameter without a
gradient in one step and with one in the next stalls the reduction), so "receives a
gradient" means ``p.grad is not None``; zero is allowed (nothing to predict gives a zero
loss with zero gradients). `NO_GRAD_EXPECTED` lists the parameters that legitimately get no
gradient in a configuration, with the reason; it is empty today.

Image presets: 16x16 images, 4x4 patches read as a ``t x l = 4 x 4`` grid for the
time-structured strategies. Water: every modality gets the same strategy over its own
``t x l`` token grid (rasters ``2 x 3``, series ``2 x 2``), with its tokenizer's padding.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
from reliability_helpers import (
    IMAGE_GRID,
    IMAGE_PATCHES,
    IMAGE_PRESETS,
    IMAGE_VARIANTS,
    WATER_STEPS,
    WATER_VARIANTS,
    Recorder,
    build_image,
    build_water,
    gen,
    grad_report,
    images,
    water_inputs,
    water_static,
)
from torch import Tensor

import crossmae as cm

Strategy = Callable[[int, int, int, Optional[Tensor], torch.Generator], cm.MaskSplit]
"""``(b, t, l, padding_mask, generator) -> MaskSplit`` over ``n = t * l`` tokens."""


def _nothing_visible_then_nothing_predicted(
    b: int, t: int, l_: int, pad: Optional[Tensor], g: torch.Generator
) -> cm.MaskSplit:
    """Sample 0 sees nothing (predicts everything); sample 1 sees everything (predicts
    nothing); other samples: a random split."""
    base = cm.random_masking(b, t * l_, 0.5, padding_mask=pad, generator=g)
    vis, pred = base.visible_mask.clone(), base.predict_mask.clone()
    vis[0], pred[0] = False, True
    if b > 1:
        vis[1], pred[1] = True, False
    return cm.mask_split_from_masks(vis, pred, padding_mask=pad)


STRATEGIES: dict[str, Strategy] = {
    "random_masking": lambda b, t, l_, pad, g: cm.random_masking(
        b, t * l_, 0.75, predict_ratio=0.25, padding_mask=pad, generator=g
    ),
    "grouped_random_masking": lambda b, t, l_, pad, g: cm.grouped_random_masking(
        b, t, l_, 0.5, padding_mask=pad, generator=g
    ),
    "time_step_masking": lambda b, t, l_, pad, g: cm.time_step_masking(
        b, t, l_, 0.5, padding_mask=pad, generator=g
    ),
    "chunk_masking": lambda b, t, l_, pad, g: cm.chunk_masking(
        b, t, l_, 0.5, chunk_size=2, padding_mask=pad, generator=g
    ),
    "tail_masking": lambda b, t, l_, pad, g: cm.tail_masking(b, t, l_, 0.5, padding_mask=pad),
    "tube_masking": lambda b, t, l_, pad, g: cm.tube_masking(
        b, t, l_, 0.5, padding_mask=pad, generator=g
    ),
    "channel_masking": lambda b, t, l_, pad, g: cm.channel_masking(
        b, t, l_, 0.5, padding_mask=pad, generator=g
    ),
    "mask_split_from_masks: nothing visible / nothing predicted": _nothing_visible_then_nothing_predicted,
    "mask_missing_samples: sample 0 missing": lambda b, t, l_, pad, g: cm.mask_missing_samples(
        cm.random_masking(b, t * l_, 0.5, padding_mask=pad, generator=g), torch.arange(b) == 0
    ),
    "mask_missing_samples: every sample missing": lambda b, t, l_, pad, g: cm.mask_missing_samples(
        cm.random_masking(b, t * l_, 0.5, padding_mask=pad, generator=g),
        torch.ones(b, dtype=torch.bool),
    ),
    "modality_dropout: drop_prob=0.5": lambda b, t, l_, pad, g: cm.modality_dropout(
        cm.grouped_random_masking(b, t, l_, 0.5, padding_mask=pad, generator=g),
        drop_prob=0.5,
        noise=torch.linspace(0, 1, b),
    ),
}

# (preset or model, variant, strategy) -> {parameter name: why it gets no gradient}
NO_GRAD_EXPECTED: dict[tuple[str, str, str], dict[str, str]] = {}

IMAGE_CASES = [
    (p, v)
    for p in IMAGE_PRESETS
    for v in (tuple(IMAGE_VARIANTS) if p == "crossmae_vit_small" else ("default",))
]


def _check_grads(
    rec: Recorder, api: str, variant: str, strategy: str, model: torch.nn.Module, loss: Tensor
) -> None:
    assert bool(torch.isfinite(loss)), f"loss {loss}"
    loss.backward()
    none, bad = grad_report(model)
    allowed = NO_GRAD_EXPECTED.get((api, variant, strategy), {})
    unexpected = [n for n in none if n not in allowed]
    ok = not unexpected and not bad
    failure = ""
    if unexpected:
        failure += f"no gradient for {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} ({len(unexpected)} parameters)"
    if bad:
        failure += f" non-finite gradient for {bad[:4]}"
    note = "every parameter gets a finite gradient"
    if allowed:
        note += "; documented exceptions: " + "; ".join(f"{k} ({v})" for k, v in allowed.items())
    rec.check(api, f"gradients, {strategy}, variant {variant}", ok, note, failure)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize(
    ("preset", "variant"), IMAGE_CASES, ids=[f"{p}-{v}" for p, v in IMAGE_CASES]
)
def test_image_preset_gradients(preset: str, variant: str, strategy: str, rec: Recorder) -> None:
    model = build_image(preset, seed=0, **IMAGE_VARIANTS[variant]).train()
    t, l_ = IMAGE_GRID
    split = STRATEGIES[strategy](2, t, l_, None, gen(3))
    assert split.visible_mask.shape == (2, IMAGE_PATCHES)
    out = model(images(), split=split)
    _check_grads(rec, preset, variant, strategy, model, out.loss)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("variant", list(WATER_VARIANTS))
def test_water_gradients(variant: str, strategy: str, rec: Recorder) -> None:
    model = build_water(seed=0, **WATER_VARIANTS[variant]).train()
    x = water_inputs(3)
    x["river_flow"][2] = float("nan")  # sample 2 has no river-flow data at all
    static = water_static(3)
    tokenized = model.tokenize(x)
    splits: dict[str, Any] = {}
    for k, (name, (tokens, pad)) in enumerate(tokenized.items()):
        n = tokens.shape[1]
        splits[name] = STRATEGIES[strategy](3, WATER_STEPS, n // WATER_STEPS, pad, gen(10 + k))
    out = model(
        x, static=static, splits=splits, missing={"evaporation": torch.tensor([False, True, False])}
    )
    _check_grads(rec, "water_mae_small", variant, strategy, model, out.loss)
