"""`MultimodalMAE.draw_splits`: the splits forward would draw, drawn before it (for a
compiled forward, which cannot trace a generator)."""

from __future__ import annotations

import pytest
import torch

from crossmae.models import grouped_masking_fn
from tests.strategies import generator, tiny_water_batch, tiny_water_model


def _fields(split: object) -> dict[str, torch.Tensor]:
    return {k: v for k, v in split._asdict().items() if isinstance(v, torch.Tensor)}  # type: ignore[attr-defined]


@pytest.mark.parametrize("static_shape", [False, True])
def test_draws_equal_forwards_own(static_shape: bool) -> None:
    model = tiny_water_model()
    if static_shape:
        for mod in model.modalities.values():
            mod.masking = grouped_masking_fn(0.5, static_shape=True)
    inputs, static = tiny_water_batch(model.names, generator(2))
    missing = {"evaporation": torch.tensor([False, True])}
    with torch.no_grad():
        own = model(inputs, static=static, missing=missing, generator=generator(7))
        splits = model.draw_splits(inputs, missing=missing, generator=generator(7))
        given = model(inputs, static=static, missing=missing, splits=splits)
    assert list(splits) == model.names
    for name in model.names:
        for field, value in _fields(splits[name]).items():
            torch.testing.assert_close(value, getattr(own.splits[name], field), msg=field)
    torch.testing.assert_close(given.loss, own.loss)
    # the flags reach the split: no token of a missing modality is kept or predicted
    evap = splits["evaporation"]
    assert not bool(evap.visible_mask[1].any()) and not bool(evap.predict_mask[1].any())
    # sample 0 has no river flow at all: nothing of it is seen
    assert not bool(splits["river_flow"].visible_mask[0].any())


def test_another_generator_state_draws_other_masks() -> None:
    model = tiny_water_model()
    inputs, _ = tiny_water_batch(model.names, generator(2))
    a = model.draw_splits(inputs, generator=generator(1))
    b = model.draw_splits(inputs, generator=generator(2))
    assert any(not torch.equal(a[n].visible_mask, b[n].visible_mask) for n in model.names)


def test_no_gradient_and_arguments_checked_first() -> None:
    model = tiny_water_model()
    inputs, _ = tiny_water_batch(model.names, generator(3))
    splits = model.draw_splits(inputs, generator=generator(1))
    assert all(not v.requires_grad for s in splits.values() for v in _fields(s).values())
    with pytest.raises(TypeError, match="generator"):
        model.draw_splits(inputs, generator=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inputs"):
        model.draw_splits({"precipitation": inputs["precipitation"]}, generator=generator(1))
    calls: list[int] = []
    model.modalities["precipitation"].tokenizer.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="missing"):
        model.draw_splits(inputs, missing={"nope": torch.zeros(2, dtype=torch.bool)})
    assert calls == []  # refused before any tokenizer ran
