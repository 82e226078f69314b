"""Determinism: the same seed / generator gives bitwise identical masks, outputs, losses and
gradients across two runs, and everything runs under ``torch.use_deterministic_algorithms``
on the CPU (the previous setting is restored after each test).

Legend: ``b`` batch, ``t`` steps, ``l`` locations, ``n = t * l`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch
from reliability_helpers import (
    Recorder,
    build_image,
    build_water,
    close,
    gen,
    images,
    pad_mask,
    water_inputs,
    water_static,
)

import crossmae as cm

B, T, L = 3, 4, 3
N = T * L
PM = pad_mask([N, 7, 0], N)

STRATEGIES: dict[str, Callable[[torch.Generator], cm.MaskSplit]] = {
    "random_masking": lambda g: cm.random_masking(
        B, N, 0.6, predict_ratio=0.3, padding_mask=PM, generator=g
    ),
    "grouped_random_masking": lambda g: cm.grouped_random_masking(
        B, T, L, 0.5, padding_mask=PM, generator=g
    ),
    "time_step_masking": lambda g: cm.time_step_masking(B, T, L, 0.5, padding_mask=PM, generator=g),
    "chunk_masking": lambda g: cm.chunk_masking(
        B, T, L, 0.5, chunk_size=3, padding_mask=PM, generator=g
    ),
    "tube_masking": lambda g: cm.tube_masking(B, T, L, 0.5, padding_mask=PM, generator=g),
    "channel_masking": lambda g: cm.channel_masking(B, T, L, 0.5, padding_mask=PM, generator=g),
    "tail_masking": lambda g: cm.tail_masking(B, T, L, 0.5, padding_mask=PM),
    "modality_dropout": lambda g: cm.modality_dropout(
        cm.random_masking(B, N, 0.5, generator=g), drop_prob=0.5, generator=g
    ),
}


@pytest.fixture
def deterministic_algorithms() -> Iterator[None]:
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_masking_same_generator_same_split(name: str, rec: Recorder) -> None:
    fn = STRATEGIES[name]
    first, second = fn(gen(7)), fn(gen(7))
    ok = all(torch.equal(a, b) for a, b in zip(first, second))
    rec.check(
        name,
        "determinism: two calls with generators seeded alike",
        ok,
        "identical MaskSplit (bitwise)",
        "splits differ",
    )


def _image_step(seed: int, **build: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    model = build_image(seed=0, **build).train()
    torch.manual_seed(seed)  # dropout / drop path draw from the global RNG
    out = model(images(), generator=gen(seed))
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _water_step(seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    model = build_water(seed=0, drop_path=0.1).train()
    torch.manual_seed(seed)
    out = model(
        water_inputs(),
        static=water_static(),
        generator=gen(seed),
        missing={"river_flow": torch.tensor([True, False])},
    )
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_image_model_same_seed_same_everything(rec: Recorder) -> None:
    (o1, g1), (o2, g2) = (
        _image_step(3, drop_path=0.2, decoder_drop_path=0.2),
        _image_step(3, drop_path=0.2, decoder_drop_path=0.2),
    )
    close(o1, o2, rtol=0, atol=0)
    close(g1, g2, rtol=0, atol=0)
    rec.check(
        "ImageCrossMAE",
        "determinism: training mode with drop path, same seed twice",
        True,
        "identical split, predictions, loss and gradients (bitwise)",
    )


def test_water_model_same_seed_same_everything(rec: Recorder) -> None:
    (o1, g1), (o2, g2) = _water_step(5), _water_step(5)
    close(o1, o2, rtol=0, atol=0)
    close(g1, g2, rtol=0, atol=0)
    rec.check(
        "MultimodalMAE",
        "determinism: training mode with drop path, same seed twice",
        True,
        "identical splits, predictions, losses and gradients (bitwise)",
    )


def test_different_seeds_differ(rec: Recorder) -> None:
    """Sanity: the determinism tests above are not vacuous."""
    a, b = (
        cm.random_masking(B, N, 0.5, generator=gen(1)),
        cm.random_masking(B, N, 0.5, generator=gen(2)),
    )
    rec.check(
        "random_masking",
        "determinism: generators seeded differently",
        not torch.equal(a.visible_mask, b.visible_mask),
        "different splits",
        "identical splits",
    )


def test_image_model_under_deterministic_algorithms(
    deterministic_algorithms: None, rec: Recorder
) -> None:
    (o1, g1) = _image_step(3)
    torch.use_deterministic_algorithms(False)
    (o2, g2) = _image_step(3)
    torch.use_deterministic_algorithms(True)
    close(o1, o2, rtol=0, atol=0)
    close(g1, g2, rtol=0, atol=0)
    rec.check(
        "ImageCrossMAE",
        "torch.use_deterministic_algorithms(True), forward + backward",
        True,
        "runs on the CPU; identical to the default mode",
    )


def test_water_model_under_deterministic_algorithms(
    deterministic_algorithms: None, rec: Recorder
) -> None:
    (o1, g1) = _water_step(5)
    torch.use_deterministic_algorithms(False)
    (o2, g2) = _water_step(5)
    torch.use_deterministic_algorithms(True)
    close(o1, o2, rtol=0, atol=0)
    close(g1, g2, rtol=0, atol=0)
    rec.check(
        "MultimodalMAE",
        "torch.use_deterministic_algorithms(True), forward + backward",
        True,
        "runs on the CPU; identical to the default mode",
    )


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_masking_under_deterministic_algorithms(
    name: str, deterministic_algorithms: None, rec: Recorder
) -> None:
    split = STRATEGIES[name](gen(7))
    rec.check(
        name,
        "torch.use_deterministic_algorithms(True)",
        isinstance(split, cm.MaskSplit),
        "runs on the CPU",
    )


def test_setting_restored_after_the_fixture() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
