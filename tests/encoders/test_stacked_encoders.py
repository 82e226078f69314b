"""Encoders of one architecture over inputs of one shape run stacked
(`crossmae.encoders._together`): equal to each encoder alone, taken only where it may be.

`MultimodalMAE` stacks the encoders of its modalities that qualify (the water model's three
rasters, and its two series with their FiLM conditioning); these tests compare the stacked
computation with every encoder run alone in float64, outputs and gradients, on the CPU's
own attention route and on the packed route (the CPU reference of the CUDA kernel).
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import crossmae as cm
from crossmae.encoders import _together
from tests.decoders.test_together import packed_route
from tests.strategies import generator, seeds, tiny_water_batch, tiny_water_model

C = 8


def encoders(n: int, seed: int, **kw: Any) -> list[cm.TransformerEncoder]:
    torch.manual_seed(seed)
    out = []
    depth = kw.pop("depth", 2)
    for _ in range(n):
        enc = cm.TransformerEncoder(C, depth, 2, **kw).double()
        for p in enc.parameters():  # norms and biases away from their init
            nn.init.normal_(p, std=0.3)
        out.append(enc.eval())
    return out


def run_alone(encs: list[cm.TransformerEncoder], xs: list[torch.Tensor],
              pads: list[Optional[torch.Tensor]], conds: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:  # fmt: skip
    return [
        e(x, p, **({} if c is None else {"cond": c})).tokens
        for e, x, p, c in zip(encs, xs, pads, conds)
    ]


def run_stacked(encs: list[cm.TransformerEncoder], xs: list[torch.Tensor],
                pads: list[Optional[torch.Tensor]], conds: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:  # fmt: skip
    parts = [_together.encoder_parts(e) for e in encs]
    assert all(p is not None for p in parts)
    assert len({p[0] for p in parts if p is not None}) == 1
    outs = _together.encode_stacked(encs, [p[1:] for p in parts if p is not None], xs, pads, conds)
    for o, p in zip(outs, pads):
        assert o.padding_mask is p and o.features is None
    return [o.tokens for o in outs]


@st.composite
def stacked_case(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "g": draw(st.integers(2, 3)),
        "b": draw(st.integers(1, 3)),
        "n": draw(st.integers(1, 6)),
        "depth": draw(st.integers(1, 2)),
        "padded": draw(st.booleans()),
        "film": draw(st.booleans()),
        "final_norm": draw(st.booleans()),
        "qkv_bias": draw(st.booleans()),
        "packed": draw(st.booleans()),
        "seed": draw(seeds()),
    }


@settings(max_examples=30, deadline=None)
@given(stacked_case())
def test_stacked_encoders_equal_each_alone(c: dict[str, Any]) -> None:
    """Every real token's output and every gradient (inputs, conditioning, each encoder's
    parameters) equal each encoder run alone, with or without padding (a sample with no
    real token included), FiLM, final norm and qkv bias, on the CPU's route and on the
    packed route (keys reordered to the end of every row and back)."""
    kw: dict[str, Any] = {"depth": c["depth"], "final_norm": c["final_norm"],
                          "qkv_bias": c["qkv_bias"]}  # fmt: skip
    if c["film"]:
        kw["cond_dim"] = 3
    encs = encoders(c["g"], c["seed"] % 997, **kw)
    gen = generator(c["seed"])
    g, b, n = c["g"], c["b"], c["n"]
    xs = [torch.randn(b, n, C, generator=gen, dtype=torch.float64, requires_grad=True)
          for _ in range(g)]  # fmt: skip
    pads: list[Optional[torch.Tensor]] = [None] * g
    if c["padded"]:
        pads = [torch.rand(b, n, generator=gen) < 0.4 for _ in range(g)]
        pads[0][0] = True  # a sample without any real token
    conds: list[Optional[torch.Tensor]] = [None] * g
    if c["film"]:
        conds = [torch.randn(b, 3, generator=gen, dtype=torch.float64, requires_grad=True)
                 for _ in range(g)]  # fmt: skip
    leaves = [*xs, *[x for x in conds if x is not None],
              *[p for e in encs for p in e.parameters()]]  # fmt: skip

    def grads(fn: Any) -> tuple[list[torch.Tensor], list[Any]]:
        outs = fn(encs, xs, pads, conds)
        loss = sum(
            ((o * (1 + i)).sin() * (1.0 if p is None else (~p)[..., None])).sum()
            for i, (o, p) in enumerate(zip(outs, pads))
        )
        return outs, list(torch.autograd.grad(loss, leaves, allow_unused=True))  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        if c["packed"]:
            packed_route(mp)
        ref_out, ref_grad = grads(run_alone)
        got_out, got_grad = grads(run_stacked)
    for o, r, p in zip(got_out, ref_out, pads):
        assert o.shape == r.shape and torch.isfinite(o).all()
        real = torch.ones(o.shape[:2], dtype=torch.bool) if p is None else ~p
        torch.testing.assert_close(o[real], r[real], atol=1e-10, rtol=1e-10)
    for gg, r in zip(got_grad, ref_grad):
        if r is None:
            assert gg is None or not gg.any()
        else:
            torch.testing.assert_close(gg, r, atol=1e-10, rtol=1e-10)


def test_only_stock_encoders_stack() -> None:
    """A hook anywhere, a subclassed block part, active drop path or attention dropout,
    or a block compiled in place rule an encoder out; equal architectures share a key,
    another width, depth, eps or head count does not."""
    base = encoders(1, 0)[0]
    key = _together.encoder_parts(base)
    assert key is not None
    assert _together.encoder_parts(encoders(1, 1)[0])[0] == key[0]  # type: ignore[index]
    for kw in ({"depth": 3}, {"num_heads": 4}, {"final_norm": False}, {"cond_dim": 3}):
        torch.manual_seed(0)
        other = cm.TransformerEncoder(C, kw.get("depth", 2), kw.get("num_heads", 2),
                                      **{k: v for k, v in kw.items() if k not in ("depth", "num_heads")})  # fmt: skip
        got = _together.encoder_parts(other.double())
        assert got is not None and got[0] != key[0], kw
    eps = encoders(1, 0)[0]
    eps.blocks[1].norm2.eps = 1e-3
    assert _together.encoder_parts(eps)[0] != key[0]  # type: ignore[index]
    hooked = encoders(1, 0)[0]
    hooked.blocks[0].mlp.fc1.register_forward_hook(lambda *a: None)
    assert _together.encoder_parts(hooked) is None
    hooked = encoders(1, 0)[0]
    hooked.norm.register_forward_pre_hook(lambda *a: None)
    assert _together.encoder_parts(hooked) is None

    class MyLinear(nn.Linear):
        pass

    sub = encoders(1, 0)[0]
    sub.blocks[0].attn.proj = MyLinear(C, C).double()
    assert _together.encoder_parts(sub) is None
    torch.manual_seed(0)
    drop = cm.TransformerEncoder(C, 2, 2, drop_path=0.3).double()
    assert _together.encoder_parts(drop.train()) is None
    assert _together.encoder_parts(drop.eval()) is not None
    adrop = cm.TransformerEncoder(C, 2, 2, attn_drop=0.1).double()
    assert _together.encoder_parts(adrop.train()) is None
    compiled = encoders(1, 0)[0]
    compiled.blocks[0].compile(backend="eager")
    assert _together.encoder_parts(compiled) is None


def _water(dtype: torch.dtype = torch.float64) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    model = tiny_water_model().to(dtype)
    inputs, static = tiny_water_batch(model.names, generator(3))
    return model, {k: v.to(dtype) for k, v in inputs.items()}, static.to(dtype)


def _stacked_names(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    seen: list[list[str]] = []
    real = _together.encode_stacked

    def spy(encs: Any, *a: Any) -> Any:
        seen.append([type(e).__name__ for e in encs])
        return real(encs, *a)

    monkeypatch.setattr(_together, "encode_stacked", spy)
    return seen


def test_water_model_stacks_rasters_and_series(monkeypatch: pytest.MonkeyPatch) -> None:
    """The water model's three raster encoders and its two FiLM-conditioned series
    encoders run as two stacks; loss and every parameter gradient equal the per-modality
    route, on the CPU's own route and on the packed route."""
    for packed in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if packed:
                packed_route(mp)
            seen = _stacked_names(mp)
            model, inputs, static = _water()
            out = model(inputs, static=static, generator=generator(4))
            got = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
            assert sorted(len(s) for s in seen) == [2, 3]
            mp.setattr(_together, "may_stack", lambda: False)
            ref = model(inputs, static=static, generator=generator(4))
            want = torch.autograd.grad(ref.loss, list(model.parameters()), allow_unused=True)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-10, rtol=1e-10)
        for name in model.names:
            torch.testing.assert_close(out.sample_losses[name], ref.sample_losses[name])
        for a, r in zip(got, want):
            if r is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def test_a_hooked_encoder_runs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward hook on one raster encoder fires, and the other two rasters still stack."""
    seen = _stacked_names(monkeypatch)
    model, inputs, static = _water()
    fired: list[int] = []
    first = model.names[0]
    model.modalities[first].encoder.register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        model(inputs, static=static, generator=generator(4))
    assert fired == [1]
    assert sorted(len(s) for s in seen) == [2, 2]


def test_stacked_encoders_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 autocast (CPU): the stacked encoders agree with the per-modality route to
    bfloat16 rounding."""
    model, inputs, static = _water(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs, static=static, generator=generator(4))
        monkeypatch.setattr(_together, "may_stack", lambda: False)
        ref = model(inputs, static=static, generator=generator(4))
    torch.testing.assert_close(out.loss, ref.loss, atol=0.05, rtol=0.05)
