"""GEMM parameters cast once per block and forward under autocast
(`crossmae.layers._precast`): the same values and gradients as autocast's per-call casts,
bit for bit, with the casts gone from the forward and the backward.

Every comparison runs one model twice on the same inputs under CPU autocast: once as
shipped, once with precasting switched off (``_precast._start`` returning None), and
compares the loss and every parameter gradient with ``torch.equal``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import crossmae as cm
from crossmae.layers import _precast
from tests.strategies import generator, tiny_water_batch, tiny_water_model

BF16 = torch.bfloat16


class _Ops(TorchDispatchMode):
    """Records every aten op with its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        for a in args:
            if isinstance(a, (list, tuple)):
                flat.extend(t for t in a if isinstance(t, torch.Tensor))
        self.calls.append((func, flat))
        return func(*args, **(kwargs or {}))

    def casts_of(self, tensors: list[torch.Tensor]) -> int:
        """``_to_copy`` calls whose input shares storage with one of ``tensors``."""
        ptrs = {t.data_ptr() for t in tensors}
        return sum(
            1
            for f, a in self.calls
            if f is torch.ops.aten._to_copy.default and a and a[0].data_ptr() in ptrs
        )

    def count(self, op: Any) -> int:
        return sum(1 for f, _ in self.calls if f is op)


def _off(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(_precast, "_start", lambda root: None)


def _linear_params(model: nn.Module) -> list[torch.Tensor]:
    return [
        t
        for m in model.modules()
        if type(m) is nn.Linear
        for t in (m.weight, m.bias)
        if t is not None
    ]


def _image_model(**kw: Any) -> cm.ImageCrossMAE:
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4,
          "decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 4, **kw}  # fmt: skip
    return cm.crossmae_vit_base(**kw)


def _step(model: nn.Module, run: Callable[[], Any], dtype: torch.dtype = BF16) -> tuple[Any, ...]:
    """``(loss, {name: grad}, ops)`` of one autocast forward and backward."""
    model.zero_grad(set_to_none=True)
    with _Ops() as ops:
        with torch.autocast("cpu", dtype=dtype):
            out = run()
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, ops


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


@pytest.mark.parametrize(
    "kw",
    [
        {"use_weighted_fm": True},
        {"use_weighted_fm": False, "predict_ratio": 0.75},
        {"use_cross_attn": False},
        {"decoder_self_attn": True},
    ],
    ids=["wfm", "p075", "mae-decoder", "self-attn-decoder"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_image_model_bit_identical_without_the_casts(
    kw: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loss and every gradient equal autocast's own route exactly; no linear's weight or
    bias is cast by a per-call ``_to_copy`` any more (forward or backward), the casts are
    multi-tensor copies instead."""
    model = _image_model(**kw)
    x = torch.randn(3, 3, 32, 32, generator=generator(1))
    run = lambda: model(x, generator=generator(2))  # noqa: E731
    got = _step(model, run, dtype)
    with monkeypatch.context() as mp:
        _off(mp)
        want = _step(model, run, dtype)
    _same(got, want)
    params = _linear_params(model)
    assert want[2].casts_of(params) >= len(params)  # autocast casts each one
    assert got[2].casts_of(params) == 0
    assert got[2].count(torch.ops.aten._foreach_copy_.default) >= 2  # forward and backward
    assert got[2].count(torch.ops.aten._to_copy.default) < want[2].count(
        torch.ops.aten._to_copy.default
    )


def test_water_model_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """The multimodal water model (stacked encoders and decoders, tokenizers, FiLM, static
    token): loss and gradients equal autocast's own route exactly."""
    model = tiny_water_model().train()
    inputs, static = tiny_water_batch(model.names, generator(3))
    run = lambda: model(inputs, static=static, generator=generator(4))  # noqa: E731
    got = _step(model, run)
    with monkeypatch.context() as mp:
        _off(mp)
        want = _step(model, run)
    _same(got, want)
    assert got[2].count(torch.ops.aten._to_copy.default) < want[2].count(
        torch.ops.aten._to_copy.default
    )


def test_parts_alone_precast_their_own_linears(monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder or a decoder called on its own (outside a model) precasts its linears,
    with the same results as autocast's route."""
    torch.manual_seed(0)
    enc = cm.TransformerEncoder(16, 2, 4)
    dec = cm.CrossMAEDecoder(16, 8, 2, 2, num_tokens=10, out_dim=5)
    x = torch.randn(2, 6, 16, generator=generator(5))
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])

    class Out:
        def __init__(self, loss: torch.Tensor) -> None:
            self.loss = loss

    both = nn.ModuleList([enc, dec])

    def run() -> Out:
        h = enc(x, pad).tokens
        return Out(dec(h, ids, context_padding_mask=pad).float().square().mean())

    got = _step(both, run)
    with monkeypatch.context() as mp:
        _off(mp)
        want = _step(both, run)
    _same(got, want)
    assert got[2].casts_of(_linear_params(both)) == 0


def test_one_set_of_casts_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's forward decides once; the encoder's and the decoder's forwards inside it
    use its casts, and every block is cast by one multi-tensor copy each way."""
    model = _image_model()
    made: list[int] = []
    real = _precast._Casts.__init__

    def spy(self: Any, blocks: Any, dtype: Any) -> None:
        made.append(len(blocks))
        real(self, blocks, dtype)

    monkeypatch.setattr(_precast._Casts, "__init__", spy)
    x = torch.randn(2, 3, 32, 32, generator=generator(1))
    _, _, ops = _step(model, lambda: model(x, generator=generator(2)))
    assert len(made) == 1
    used_blocks = made[0]
    # every block holds a linear the forward runs here: one copy forward, one backward each
    assert ops.count(torch.ops.aten._foreach_copy_.default) == 2 * used_blocks


def test_unused_linears_are_not_cast() -> None:
    """Blocks are cast lazily: a linear the forward never runs is never copied and gets no
    gradient."""
    model = _image_model()
    model.unused = nn.Linear(48, 48)  # type: ignore[assignment]
    x = torch.randn(2, 3, 32, 32, generator=generator(1))
    model.zero_grad(set_to_none=True)
    seen: list[int] = []
    with _Ops() as ops:
        with torch.autocast("cpu", dtype=BF16):
            out = model(x, generator=generator(2))
        out.loss.backward()
    for f, args in ops.calls:
        if f is torch.ops.aten._foreach_copy_.default:
            seen.extend(t.data_ptr() for t in args)
    assert model.unused.weight.data_ptr() not in seen
    assert model.unused.weight.grad is None


def test_hooked_or_subclassed_linears_keep_their_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward hook on a linear still fires, and a subclass of ``nn.Linear`` (e.g. an
    adapter) still runs its own forward; results equal autocast's route."""

    class Scaled(nn.Linear):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Scaled.calls += 1
            return super().forward(x) * 0.5

    model = _image_model()
    blk = model.encoder.blocks[0]
    old = blk.mlp.fc2
    blk.mlp.fc2 = Scaled(old.in_features, old.out_features)
    fired: list[int] = []
    model.encoder.blocks[1].attn.qkv.register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(2, 3, 32, 32, generator=generator(1))
    run = lambda: model(x, generator=generator(2))  # noqa: E731
    got = _step(model, run)
    assert fired == [1] and Scaled.calls == 1
    with monkeypatch.context() as mp:
        _off(mp)
        want = _step(model, run)
    _same(got, want)
    assert got[2].casts_of([blk.mlp.fc2.weight, model.encoder.blocks[1].attn.qkv.weight]) >= 2


def test_frozen_parameters_and_accumulation() -> None:
    """Frozen linears get no gradient; two backward passes accumulate as with autocast."""
    model = _image_model()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, generator=generator(1))

    def twice() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for _ in range(2):
            with torch.autocast("cpu", dtype=BF16):
                out = model(x, generator=generator(2))
            out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got = twice()
    with pytest.MonkeyPatch.context() as mp:
        _off(mp)
        want = twice()
    assert got.keys() == want.keys()
    assert not any(n.startswith("encoder.") for n in got)
    for n in got:
        assert torch.equal(got[n], want[n]), n


def _casts_made(run: Callable[[], Any]) -> int:
    made: list[int] = []
    real = _precast._Cast.apply

    def spy(*a: Any) -> Any:
        made.append(1)
        return real(*a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_precast._Cast, "apply", spy)
        run()
    return len(made)


def test_inactive_without_autocast_in_float64_and_with_global_hooks() -> None:
    """No autocast (float32 or float64, gradcheck's dtype) or a global module hook: the
    modules run as they are, nothing is cast."""
    model = _image_model()
    x = torch.randn(2, 3, 32, 32, generator=generator(1))
    assert _casts_made(lambda: model(x, generator=generator(2))) == 0
    m64, x64 = _image_model().double(), x.double()
    assert _casts_made(lambda: m64(x64, generator=generator(2))) == 0
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        with torch.autocast("cpu", dtype=BF16):
            assert _casts_made(lambda: model(x, generator=generator(2))) == 0
    finally:
        handle.remove()
    with torch.autocast("cpu", dtype=BF16):
        assert _casts_made(lambda: model(x, generator=generator(2))) > 0


def test_no_grad_inference() -> None:
    """Under ``torch.no_grad`` the casts are made and the predictions equal autocast's."""
    model = _image_model().eval()
    x = torch.randn(2, 3, 32, 32, generator=generator(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        got = model(x, generator=generator(2)).pred
        with pytest.MonkeyPatch.context() as mp:
            _off(mp)
            want = model(x, generator=generator(2)).pred
    assert torch.equal(got, want)


def _compiled_blocks(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            yield m


def test_compiled_blocks_are_left_to_their_graphs() -> None:
    """Blocks compiled in place (`compile_blocks`) are not precast: their graphs cast inside."""
    model = _image_model()
    cm.compile_blocks(model, backend="eager")
    compiled = list(_compiled_blocks(model))
    assert compiled
    blocks = _precast._blocks(model, torch.device("cpu"))
    inside = {id(m) for c in compiled for m in c.modules()}
    assert not any(id(m) in inside for blk in blocks for m in blk)
    assert any(blocks)  # the heads and embeddings outside the blocks still are
