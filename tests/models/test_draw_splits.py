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


class _PlanLog:
    """Records every attention plan `backend.decide` makes: ``(head_dim, padded, kernel)``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from crossmae.layers import backend

        self.calls: list[tuple[int, bool, str]] = []
        real = backend.decide

        def spy(*args: object, **kwargs: object) -> backend.AttentionPlan:
            plan = real(*args, **kwargs)  # type: ignore[arg-type]
            self.calls.append((int(args[2]), bool(kwargs["padded"]), plan.kernel))  # type: ignore[call-overload]
            return plan

        monkeypatch.setattr(backend, "decide", spy)

    def take(self) -> list[tuple[int, bool, str]]:
        out, self.calls = sorted(self.calls), []
        return out


def _never_padded(model: object) -> list[str]:
    return [n for n, m in model.modalities.items() if m.never_padded]  # type: ignore[attr-defined]


def test_drawn_splits_plan_the_same_attention_as_forwards_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_water_model()
    dense = _never_padded(model)
    assert dense and len(dense) < len(model.names)  # rasters never padded, series padded
    inputs, static = tiny_water_batch(model.names, generator(4))
    log = _PlanLog(monkeypatch)
    with torch.no_grad():
        own = model(inputs, static=static, generator=generator(3))
        own_plans = log.take()
        splits = model.draw_splits(inputs, generator=generator(3))
        log.take()  # draw_splits tokenizes only: no attention
        given = model(inputs, static=static, splits=splits)
        given_plans = log.take()
    assert given_plans == own_plans
    assert any(not padded for _, padded, _ in own_plans)  # the unmasked encoders exist
    torch.testing.assert_close(given.loss, own.loss)
    from crossmae.masking.split import MaskSplit

    assert all(isinstance(s, MaskSplit) for s in splits.values())


def test_edited_or_missing_splits_plan_masked_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mark means 'drawn by the model's masking, nothing removed': a copy edited with
    ``_replace`` or a modality with ``missing=`` flags is planned with its padding mask."""
    model = tiny_water_model()
    name = _never_padded(model)[0]
    inputs, static = tiny_water_batch(model.names, generator(5))
    # one plan per modality: encoders of one shape would otherwise share one stacked plan
    from crossmae.encoders import _together

    monkeypatch.setattr(_together, "may_stack", lambda: False)
    log = _PlanLog(monkeypatch)
    with torch.no_grad():
        splits = model.draw_splits(inputs, generator=generator(1))
        model(inputs, static=static, splits=splits)
        marked = log.take()
        edited = dict(splits)
        edited[name] = splits[name]._replace(ids_keep=splits[name].ids_keep.clone())
        assert type(edited[name]).__name__ == "MaskSplit"
        out_edited = model(inputs, static=static, splits=edited)
        after_edit = log.take()
        missing = {name: torch.zeros(inputs[name].shape[0], dtype=torch.bool)}
        drawn = model.draw_splits(inputs, missing=missing, generator=generator(1))
        assert type(drawn[name]).__name__ == "MaskSplit"
        model(inputs, static=static, splits=drawn, missing=missing)
        with_missing = log.take()
        out_marked = model(inputs, static=static, splits=splits)
    unmasked = lambda plans: sum(1 for _, padded, _ in plans if not padded)  # noqa: E731
    assert unmasked(after_edit) < unmasked(marked)
    assert unmasked(with_missing) < unmasked(marked)
    # same tokens either way: the masked plan only costs time
    torch.testing.assert_close(out_edited.loss, out_marked.loss)


def test_drawn_splits_keep_the_unmasked_plan_under_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_water_model()
    inputs, static = tiny_water_batch(model.names, generator(6))
    # one plan per modality (compiled forwards do not stack encoders of one shape)
    from crossmae.encoders import _together

    monkeypatch.setattr(_together, "may_stack", lambda: False)
    log = _PlanLog(monkeypatch)
    with torch.no_grad():
        splits = model.draw_splits(inputs, generator=generator(2))
        eager = model(inputs, static=static, splits=splits)
        eager_plans = log.take()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        out = compiled(inputs, static=static, splits=splits)
        traced_plans = log.take()
    torch._dynamo.reset()
    assert traced_plans == eager_plans
    torch.testing.assert_close(out.loss, eager.loss)
