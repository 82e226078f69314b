"""The whole training step (masking drawn from a generator, tokenize, split, forward,
backward, optimizer step) issues no host sync, so it can be captured in a CUDA graph.

A sync is a value read on the host: ``.item()``/``int()``/``bool()``/``.tolist()`` on a
tensor, or an op whose output shape depends on values (``nonzero``, ``masked_select``,
boolean indexing, ``unique``, ``repeat_interleave`` without ``output_size``). On the CPU such
reads are free and crossmae's value checks use them where they cost nothing; those checks
are skipped on CUDA and while compiling, so the test runs the step with
``torch.compiler.is_compiling`` reporting True (the code path CUDA and compiled runs take)
and records every sync, with the line that made it.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.models.test_image import images, tiny_model
from tests.strategies import generator, tiny_water_batch, tiny_water_model

SYNC_OPS = {
    "aten._local_scalar_dense.default",
    "aten.item.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.allclose.default",
}
HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "crossmae" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[-3:][::-1])


class SyncRecorder(TorchDispatchMode):
    """Records ops that need the device's values on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        bad = name in SYNC_OPS
        if name.startswith(("aten.index.Tensor", "aten.index_put")) and len(args) > 1:
            bad = any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
            )
        if bad:
            self.hits.append(f"{name} at {_where()}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def record_syncs(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[Callable[[], Any]], list[str]]]:
    # Import dynamo before `is_compiling` is patched: it registers torch's functions by
    # identity on import, and a later torch.compile in the session must see the real one.
    import torch._dynamo

    hits: list[str] = []
    armed = [False]
    for meth in HOST_READS:
        orig = getattr(torch.Tensor, meth)

        def wrapped(
            self: torch.Tensor, *a: Any, _orig: Any = orig, _m: str = meth, **k: Any
        ) -> Any:
            if armed[0]:
                hits.append(f"Tensor.{_m} at {_where()}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, wrapped)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def run(step: Callable[[], Any]) -> list[str]:
        hits.clear()
        armed[0] = True
        try:
            with SyncRecorder() as rec:
                step()
        finally:
            armed[0] = False
        return hits + rec.hits

    yield run


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # capturable=True: the step count stays a tensor (what a CUDA graph needs; fused=True on
    # CUDA). On the CPU the foreach implementation runs the same sync-free update.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True, foreach=True)


def test_image_step_is_sync_free(record_syncs: Callable[[Callable[[], Any]], list[str]]) -> None:
    model = tiny_model().train()
    opt = _optimizer(model)
    x = images(2)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        out = model(x, generator=g)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # optimizer state is created outside the measured step, as before a capture
    hits = record_syncs(step)
    assert not hits, "host syncs in the image training step:\n" + "\n".join(hits)


def static_masking(model: Any, mask_ratio: float = 0.39, *, static_shape: bool = True) -> None:
    """Every modality draws its masks with host-known widths (the default since 0.2; the
    CUDA-graph recipe), or with the batch's widths (``static_shape=False``)."""
    from crossmae.models import grouped_masking_fn

    for mod in model.modalities.values():
        mod.masking = grouped_masking_fn(mask_ratio, static_shape=static_shape)


def test_static_masking_keeps_shapes_and_loss_semantics() -> None:
    """Static widths only add padding slots: same shapes every step, finite loss, and the
    same visible/predicted tokens as the batch-sized split for the same generator."""
    model = tiny_water_model()
    inputs, static = tiny_water_batch(model.names, generator(1))
    with torch.no_grad():
        static_masking(model, static_shape=False)
        ref = model(inputs, static=static, generator=generator(4))
        static_masking(model)
        out = model(inputs, static=static, generator=generator(4))
        again = model(inputs, static=static, generator=generator(9))
    for name in model.names:
        a, b = ref.splits[name], out.splits[name]
        assert torch.equal(a.visible_mask, b.visible_mask)
        assert torch.equal(a.predict_mask, b.predict_mask)
        assert b.ids_keep.shape[1] >= a.ids_keep.shape[1]
        assert b.ids_keep.shape == again.splits[name].ids_keep.shape
        assert b.ids_predict.shape == again.splits[name].ids_predict.shape
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_static_widths_pad_more_slots_with_site_padding_and_same_loss() -> None:
    """With padded sites (the last site group of every sample), the batch's widths shrink
    and the default static widths do not: the extra slots are padding, the roles of every
    token and the loss are those of the batch-sized split."""
    model = tiny_water_model()
    inputs, static = tiny_water_batch(model.names, generator(1))
    site_pad = torch.zeros(2, 12, dtype=torch.bool)
    site_pad[:, 8:] = True
    kw: dict[str, Any] = dict(static=static, site_padding_mask=site_pad)
    with torch.no_grad():
        static_masking(model, static_shape=False)
        tight = model(inputs, generator=generator(4), **kw)
        static_masking(model)
        wide = model(inputs, generator=generator(4), **kw)
    grew = 0
    for name in ("evaporation", "river_flow"):
        a, b = tight.splits[name], wide.splits[name]
        assert torch.equal(a.visible_mask, b.visible_mask)
        assert torch.equal(a.predict_mask, b.predict_mask)
        assert b.ids_predict.shape[1] >= a.ids_predict.shape[1]
        grew += b.ids_predict.shape[1] > a.ids_predict.shape[1]
        assert torch.equal(b.num_predict, a.num_predict)
    assert grew == 2
    torch.testing.assert_close(wide.loss, tight.loss, atol=1e-5, rtol=1e-5)


def test_default_widths_are_the_batch_s_on_cpu_and_static_when_compiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``grouped_masking_fn``'s default (``static_shape=None``) gives the batch's widths
    where reading them is free (CPU, eager) and the host-computed ones on the path of CUDA
    and compiled runs, with the same token roles either way."""
    from crossmae.models import grouped_masking_fn

    model = tiny_water_model()
    inputs, static = tiny_water_batch(model.names, generator(1))
    site_pad = torch.zeros(2, 12, dtype=torch.bool)
    site_pad[:, 8:] = True
    kw: dict[str, Any] = dict(static=static, site_padding_mask=site_pad)

    def splits(static_shape: Any) -> dict[str, Any]:
        for mod in model.modalities.values():
            mod.masking = grouped_masking_fn(0.39, static_shape=static_shape)
        with torch.no_grad():
            return model(inputs, generator=generator(4), **kw).splits

    auto, tight, wide = splits(None), splits(False), splits(True)
    for name in model.names:
        assert auto[name].ids_predict.shape == tight[name].ids_predict.shape
        assert torch.equal(auto[name].predict_mask, wide[name].predict_mask)
    assert any(wide[n].ids_predict.shape[1] > tight[n].ids_predict.shape[1] for n in model.names)
    importlib.import_module("torch._dynamo")  # registered before the patch (`record_syncs`)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiling = splits(None)
    for name in model.names:
        assert compiling[name].ids_predict.shape == wide[name].ids_predict.shape
        assert compiling[name].ids_keep.shape == wide[name].ids_keep.shape
        assert torch.equal(compiling[name].visible_mask, wide[name].visible_mask)
    with pytest.raises(TypeError, match="static_shape"):
        grouped_masking_fn(0.39, static_shape=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask_ratio"):  # at construction, not at a draw
        grouped_masking_fn(1.5)
    with pytest.raises(ValueError, match="predict_ratio"):
        grouped_masking_fn(0.5, 0.75)


def test_water_step_is_sync_free(record_syncs: Callable[[Callable[[], Any]], list[str]]) -> None:
    """The water model as built, its own masking drawn inside ``forward`` (no
    static-masking recipe): on the path CUDA and compiled runs take, its padded series
    modalities size their splits on the host, so the whole step reads nothing back."""
    model = tiny_water_model().train()
    assert any(not mod.never_padded for mod in model.modalities.values())
    opt = _optimizer(model)
    inputs, static = tiny_water_batch(model.names, generator(1))
    g = generator(2)
    missing = {"river_flow": torch.tensor([True, False])}

    def step() -> None:
        out = model(inputs, static=static, generator=g, missing=missing)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()
    hits = record_syncs(step)
    assert not hits, "host syncs in the water training step:\n" + "\n".join(hits)


def test_batch_sized_widths_sync_once_per_padded_draw(
    record_syncs: Callable[[Callable[[], Any]], list[str]],
) -> None:
    """``grouped_masking_fn(static_shape=False)`` still gives the tightest widths, for a
    host sync per padded modality (the recorder sees it: the default is not blind)."""
    from crossmae.models import grouped_masking_fn

    model = tiny_water_model().train()
    padded = [n for n, mod in model.modalities.items() if not mod.never_padded]
    for name in padded:
        model.modalities[name].masking = grouped_masking_fn(0.39, static_shape=False)
    inputs, static = tiny_water_batch(model.names, generator(1))
    g = generator(2)
    hits = record_syncs(lambda: model(inputs, static=static, generator=g))
    assert len(hits) >= len(padded), hits


def test_the_recorder_sees_syncs(record_syncs: Callable[[Callable[[], Any]], list[str]]) -> None:
    """The recorder is not blind: each kind of sync is reported."""
    t = torch.tensor([1.0, 0.0, 2.0])
    assert record_syncs(lambda: t.sum().item())
    assert record_syncs(lambda: t.tolist())
    assert record_syncs(lambda: bool(t.any()))
    assert record_syncs(lambda: t.nonzero())
    assert record_syncs(lambda: t[t > 0])
    assert not record_syncs(lambda: t.masked_fill(t > 0, 0.0).sum())


def test_image_forward_traces_as_one_graph_given_noise() -> None:
    """With the masking noise drawn outside (dynamo cannot trace an explicit
    `torch.Generator`), the whole image forward is one graph: no graph break."""
    model = tiny_model().train()
    x = images(2)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled(x, noise=noise)
    ref = model(x, noise=noise)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
