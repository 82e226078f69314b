"""Lockstep decoders of one shape run stacked (`crossmae.layers._stacked`).

`decode_together` groups decoders with the same block structure and query count and runs
their blocks as one batched computation (stacked parameters, one op per step for all).
These tests check that the route is taken exactly where it may be, that it equals every
decoder run alone (outputs and every gradient, in float64), and that it launches fewer
ops; the packed CUDA kernel is the CPU reference of the other lockstep tests.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import crossmae as cm
from crossmae.decoders import together
from crossmae.layers import _stacked, _varlen
from tests.decoders.test_together import E, packed_route
from tests.strategies import generator, seeds


def make(
    seed: int,
    n: int,
    *,
    depth: int = 2,
    qkv_bias: bool = True,
    wfm: bool = False,
    dtype: torch.dtype = torch.float64,
    **kw: Any,
) -> list[cm.CrossMAEDecoder]:
    torch.manual_seed(seed)
    return [
        cm.CrossMAEDecoder(
            E, 8, depth, 2, out_dim=3 + i, num_tokens=12, qkv_bias=qkv_bias,
            num_feature_maps=2 if wfm else None, **kw,
        ).to(dtype)
        for i in range(n)
    ]  # fmt: skip


def batch(
    seed: int, b: int, m: int, ps: list[int], *, wfm: bool = False, qpad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[Optional[torch.Tensor]]]:
    g = generator(seed)
    ctx = torch.randn(*((2,) if wfm else ()), b, m, E, generator=g, dtype=torch.float64)
    cpad = torch.rand(b, m, generator=g) < 0.4
    cpad[0] = True  # a sample without any real key
    ids = [torch.randint(0, 12, (b, p), generator=g) for p in ps]
    qpads: list[Optional[torch.Tensor]] = [
        (torch.rand(b, p, generator=g) < 0.3) if qpad and i % 2 == 0 else None
        for i, p in enumerate(ps)
    ]
    return ctx, cpad, ids, qpads


def lockstep(decs: list[cm.CrossMAEDecoder], ctx: torch.Tensor, cpad: torch.Tensor,
             ids: list[torch.Tensor], qpads: list[Any]) -> list[torch.Tensor]:  # fmt: skip
    return cm.decode_together(decs, ctx, ids, context_padding_mask=cpad, query_padding_masks=qpads)


def alone(decs: list[cm.CrossMAEDecoder], ctx: torch.Tensor, cpad: torch.Tensor,
          ids: list[torch.Tensor], qpads: list[Any]) -> list[torch.Tensor]:  # fmt: skip
    return [
        d(ctx, i, context_padding_mask=cpad, query_padding_mask=q)
        for d, i, q in zip(decs, ids, qpads)
    ]


def spy_groups(monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """Record what `_stack_groups` returns on every lockstep run."""
    seen: list[list[list[int]]] = []
    real = together._stack_groups

    def spy(*a: Any) -> Any:
        out = real(*a)
        seen.append([idx for idx, _ in out])
        return out

    monkeypatch.setattr(together, "_stack_groups", spy)
    return seen


def grads_of(
    fn: Callable[[], list[torch.Tensor]],
    ctx: torch.Tensor,
    decs: list[cm.CrossMAEDecoder],
    qpads: list[Any],
) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    outs = fn()
    # only real query rows count (padded rows are meaningless on both routes)
    loss = sum(
        ((o * (1 + k)).sin() * (1.0 if q is None else (~q)[..., None])).sum()
        for k, (o, q) in enumerate(zip(outs, qpads))
    )
    params = [ctx, *[p for d in decs for p in d.parameters()]]
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # type: ignore[arg-type]
    return outs, list(grads)


def assert_equal_runs(
    got: tuple[list[torch.Tensor], list[Optional[torch.Tensor]]],
    ref: tuple[list[torch.Tensor], list[Optional[torch.Tensor]]],
    qpads: list[Any],
    tol: float = 1e-10,
) -> None:
    for g, r, q in zip(got[0], ref[0], qpads):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert torch.isfinite(g).all()
        real = torch.ones(g.shape[:2], dtype=torch.bool) if q is None else ~q
        torch.testing.assert_close(g[real], r[real], atol=tol, rtol=tol)
    for g, r in zip(got[1], ref[1]):
        if r is None:
            assert g is None or not g.any()
        else:
            assert g is not None
            torch.testing.assert_close(g, r, atol=tol, rtol=tol)


@st.composite
def stacked_case(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(2, 4))
    return {
        "b": draw(st.integers(1, 3)),
        "m": draw(st.integers(1, 6)),
        # few distinct counts: groups of equal shape, and singletons beside them
        "p": [draw(st.sampled_from([0, 2, 3])) for _ in range(n)],
        "wfm": draw(st.booleans()),
        "qpad": draw(st.booleans()),
        "qkv_bias": draw(st.booleans()),
        "depth": draw(st.integers(1, 3)),
        "seed": draw(seeds()),
    }


@settings(max_examples=25, deadline=None)
@given(stacked_case())
def test_stacked_equals_each_decoder_alone(c: dict[str, Any]) -> None:
    """Outputs on every real row, and the gradients of the context and of every parameter
    of every decoder, equal each decoder run alone (float64); the decoders of each query
    count form one stacked group."""
    decs = make(c["seed"] % 997, len(c["p"]), depth=c["depth"], qkv_bias=c["qkv_bias"],
                wfm=c["wfm"])  # fmt: skip
    ctx, cpad, ids, qpads = batch(c["seed"], c["b"], c["m"], c["p"], wfm=c["wfm"], qpad=c["qpad"])
    ctx.requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        packed_route(mp)
        seen = spy_groups(mp)
        ref = grads_of(lambda: alone(decs, ctx, cpad, ids, qpads), ctx, decs, qpads)
        got = grads_of(lambda: lockstep(decs, ctx, cpad, ids, qpads), ctx, decs, qpads)
    assert_equal_runs(got, ref, qpads)
    want = {}
    for i, p in enumerate(c["p"]):
        want.setdefault(p, []).append(i)
    assert sorted(seen[-1]) == sorted(g for g in want.values() if len(g) > 1)


def test_stacked_run_launches_fewer_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four decoders of one shape: the stacked lockstep run dispatches far fewer non-view
    ops (forward and backward) than the same run with stacking off, with equal results."""
    decs = make(0, 4, depth=3)
    ctx, cpad, ids, qpads = batch(1, 3, 5, [4, 4, 4, 4])
    packed_route(monkeypatch)
    # one op for the kernel, as on CUDA (the reference kernel's own ops would dominate)
    monkeypatch.setattr(_varlen, "_VARLEN", lambda q, *rest: q * 1.0)
    views = {"view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze",
             "expand", "reshape", "detach", "alias", "split", "split_with_sizes", "unbind",
             "slice", "select", "as_strided", "_reshape_alias"}  # fmt: skip

    def count() -> tuple[int, list[torch.Tensor]]:
        n = [0]

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if func.overloadpacket.__name__ not in views:
                    n[0] += 1
                return func(*args, **(kwargs or {}))

        with Count():
            outs = lockstep(decs, ctx, cpad, ids, qpads)
            sum(o.sum() for o in outs).backward()  # type: ignore[union-attr]
        return n[0], outs

    stacked_ops, stacked = count()
    monkeypatch.setattr(together, "_stack_groups", lambda *a: [])
    plain_ops, plain = count()
    for s, p in zip(stacked, plain):
        torch.testing.assert_close(s, p, atol=1e-10, rtol=1e-10)
    assert stacked_ops < 0.6 * plain_ops, (stacked_ops, plain_ops)


def test_only_stock_inert_blocks_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Self-attention, a subclassed norm, another activation, active drop path, other
    widths or another eps keep a decoder out of the stacked groups; eval mode makes drop
    path inert again."""
    packed_route(monkeypatch)
    seen = spy_groups(monkeypatch)
    ctx, cpad, ids, _ = batch(2, 2, 5, [3, 3, 3])

    def groups(decs: list[cm.CrossMAEDecoder]) -> list[list[int]]:
        lockstep(decs, ctx, cpad, ids, [None] * 3)
        return seen[-1]

    assert groups(make(0, 3)) == [[0, 1, 2]]
    assert groups(make(0, 3, self_attn=True)) == []

    class MyNorm(nn.LayerNorm):
        pass

    decs = make(0, 3)
    decs[1].blocks[0].norm2 = MyNorm(8).double()
    assert groups(decs) == [[0, 2]]
    decs = make(0, 3)
    decs[2].blocks[1].mlp.act = nn.SiLU()
    assert groups(decs) == [[0, 1]]
    decs = make(0, 3)
    decs[0].blocks[0].norm1.eps = 1e-3
    assert groups(decs) == [[1, 2]]
    decs = make(0, 3, drop_path=0.2)
    for d in decs:
        d.train()
    assert groups(decs) == []
    for d in decs:
        d.eval()
    assert groups(decs) == [[0, 1, 2]]
    decs = make(0, 3)
    decs[1] = cm.CrossMAEDecoder(E, 8, 2, 2, out_dim=4, num_tokens=12, mlp_ratio=2.0).double()
    assert groups(decs) == [[0, 2]]


def test_hooks_keep_a_decoder_out_of_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook on any submodule of a decoder's blocks (the stacked run would bypass it), or
    a global module hook, keeps those decoders on their own steps: every hook fires."""
    packed_route(monkeypatch)
    seen = spy_groups(monkeypatch)
    ctx, cpad, ids, _ = batch(3, 2, 5, [3, 3, 3])
    decs = make(0, 3)
    fired: list[str] = []
    handle = decs[1].blocks[1].mlp.fc2.register_forward_hook(lambda *a: fired.append("fc2"))
    outs = lockstep(decs, ctx, cpad, ids, [None] * 3)
    assert seen[-1] == [[0, 2]] and fired == ["fc2"]
    ref = alone(decs, ctx, cpad, ids, [None] * 3)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10)
    handle.remove()
    fired.clear()
    glob = nn.modules.module.register_module_forward_hook(
        lambda mod, *a: fired.append(type(mod).__name__)
    )
    try:
        lockstep(decs, ctx, cpad, ids, [None] * 3)
    finally:
        glob.remove()
    assert seen[-1] == [] and fired.count("Mlp") == 3 * 2
    decs[0].blocks[0].norm1.register_full_backward_hook(lambda *a: None)
    lockstep(decs, ctx, cpad, ids, [None] * 3)
    assert seen[-1] == [[1, 2]]


def test_stacked_under_autocast_matches_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 autocast (CPU): the stacked run casts as the modules do, so outputs keep
    the per-decoder dtype and agree to bfloat16 rounding."""
    packed_route(monkeypatch)
    decs = make(4, 3, dtype=torch.float32)
    ctx, cpad, ids, qpads = batch(5, 2, 6, [4, 4, 4], qpad=True)
    ctx = ctx.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lockstep(decs, ctx, cpad, ids, qpads)
        ref = alone(decs, ctx, cpad, ids, qpads)
    for g, r, q in zip(got, ref, qpads):
        assert g.dtype == r.dtype
        real = torch.ones(g.shape[:2], dtype=torch.bool) if q is None else ~q
        torch.testing.assert_close(g[real].float(), r[real].float(), atol=0.05, rtol=0.05)


def test_a_shared_context_is_prepared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoders without feature-map mixing share the first one's prepared context (one
    tensor); with WFM every decoder keeps its own mix."""
    packed_route(monkeypatch)
    ctx, cpad, ids, _ = batch(6, 2, 5, [3, 2])
    states: list[Any] = []
    real = together._lockstep

    def spy(decs: Any, sts: Any) -> list[torch.Tensor]:
        states.extend(sts)
        return real(decs, sts)

    monkeypatch.setattr(together, "_lockstep", spy)
    lockstep(make(0, 2), ctx, cpad, ids, [None, None])
    assert states[0].context is states[1].context
    states.clear()
    wctx = batch(6, 2, 5, [3, 2], wfm=True)[0]
    lockstep(make(0, 2, wfm=True), wctx, cpad, ids, [None, None])
    assert states[0].context is not states[1].context


def test_stack_params_is_torch_stack() -> None:
    """`stack_params` equals `torch.stack` per group, forward and backward (float64
    gradcheck); an unused output gives its inputs no gradient."""
    g = generator(0)
    a = [torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    b = [torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    outs = _stacked.stack_params([a, b])
    torch.testing.assert_close(outs[0], torch.stack(a), rtol=0, atol=0)
    torch.testing.assert_close(outs[1], torch.stack(b), rtol=0, atol=0)
    grads = torch.autograd.grad(outs[0].sin().sum(), [*a, *b], allow_unused=True)
    assert grads[2] is None and grads[3] is None
    torch.testing.assert_close(grads[0], a[0].cos())
    assert torch.autograd.gradcheck(
        lambda *t: tuple(o.sin() for o in _stacked.stack_params([list(t[:2]), list(t[2:])])),
        (*a, *b),
    )


def test_stacked_layer_norm_and_linear_equal_the_modules() -> None:
    """Per-module layer norms (with or without affine parts) and linears (with or without
    bias) over ``[g, r, c]`` equal each module applied to its own slice."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    for affine, bias in ((True, True), (True, False), (False, False)):
        norms = [nn.LayerNorm(4, eps=1e-5, elementwise_affine=affine, bias=bias).double()
                 for _ in range(3)]  # fmt: skip
        for n in norms:
            for p in n.parameters():
                nn.init.normal_(p)
        w = torch.stack([n.weight for n in norms]) if affine else None
        bb = torch.stack([n.bias for n in norms]) if affine and bias else None
        got = _stacked.layer_norm(x, w, bb, 1e-5)
        torch.testing.assert_close(got, torch.stack([n(x[i]) for i, n in enumerate(norms)]))
    # the affine norm recomputes its normalized activations in the backward: gradcheck it
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b_, c_: _stacked.layer_norm(a, b_, c_, 1e-5),
                                    (xg, w, bb))  # fmt: skip
    # a norm folded into the next linear: linear(norm(x)) per module, any bias missing
    for affine, nbias, lbias in ((True, True, True), (True, False, True), (True, True, False),
                                 (False, False, True)):  # fmt: skip
        norms = [nn.LayerNorm(4, elementwise_affine=affine, bias=nbias).double()
                 for _ in range(3)]  # fmt: skip
        lins = [nn.Linear(4, 6, bias=lbias).double() for _ in range(3)]
        for mod in (*norms, *lins):
            for p in mod.parameters():
                nn.init.normal_(p)
        w = torch.stack([n.weight for n in norms]) if affine else None
        nb = torch.stack([n.bias for n in norms]) if affine and nbias else None
        lw = torch.stack([lin.weight for lin in lins])
        lb = torch.stack([lin.bias for lin in lins]) if lbias else None
        got = _stacked.linear(
            F.layer_norm(x, (4,), None, None, 1e-5), *_stacked.fold(w, nb, lw, lb)
        )
        want = torch.stack([lin(n(x[i])) for i, (n, lin) in enumerate(zip(norms, lins))])
        torch.testing.assert_close(got, want)
        stacked = [t for t in (w, nb, lw, lb) if t is not None]
        names = [nm for nm, t in zip(("nw", "nb", "lw", "lb"), (w, nb, lw, lb)) if t is not None]
        per = {"nw": [n.weight for n in norms], "nb": [n.bias for n in norms],
               "lw": [lin.weight for lin in lins], "lb": [lin.bias for lin in lins]}  # fmt: skip
        got_g = torch.autograd.grad(got.sin().sum(), stacked)
        flat = [t for nm in names for t in per[nm]]
        want_g = iter(torch.autograd.grad(want.sin().sum(), flat))
        for gg in got_g:
            torch.testing.assert_close(gg, torch.stack([next(want_g) for _ in range(3)]))
    for bias in (True, False):
        lins = [nn.Linear(4, 6, bias=bias).double() for _ in range(3)]
        w = torch.stack([lin.weight for lin in lins])
        bb = torch.stack([lin.bias for lin in lins]) if bias else None
        got = _stacked.linear(x, w, bb)
        torch.testing.assert_close(got, torch.stack([lin(x[i]) for i, lin in enumerate(lins)]))


def test_water_model_stacks_its_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The water model's three raster decoders (one query count) and its two series
    decoders (another) run as two stacked groups, with the loss of decoding one by one."""
    from tests.strategies import tiny_water_batch, tiny_water_model

    packed_route(monkeypatch)
    seen = spy_groups(monkeypatch)
    model = tiny_water_model().double()
    inputs, static = tiny_water_batch(model.names, generator(0))
    inputs = {k: v.double() for k, v in inputs.items()}
    out = model(inputs, static=static.double(), generator=generator(1))
    # the lockstep decoders are the model's modalities in order
    groups = sorted(sorted(model.names[i] for i in grp) for grp in seen[-1])
    assert groups == [
        ["evaporation", "river_flow"],
        ["precipitation", "soil_moisture", "temperature"],
    ]
    monkeypatch.setattr(together, "_stack_groups", lambda *a: [])
    ref = model(inputs, static=static.double(), generator=generator(1))
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-10, rtol=1e-10)
    for name in model.names:
        torch.testing.assert_close(out.sample_losses[name], ref.sample_losses[name])
