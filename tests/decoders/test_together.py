"""`decode_together`: several CrossMAE decoders over one context, in lockstep.

The packed CUDA kernel is replaced by a CPU reference (`reference_varlen`), so the lockstep
route (one kernel call per layer for every decoder) runs here in float64 and is compared
with each decoder run alone, on the packed route and on the CPU's own masked-SDPA route.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossmae as cm
from crossmae.layers import _varlen
from tests.layers.test_varlen import reference_varlen
from tests.strategies import generator, seeds, tiny_water_batch, tiny_water_model

E = 12  # context width


def counting(calls: list[int]) -> Callable[..., torch.Tensor]:
    def kernel(*a: Any) -> torch.Tensor:
        calls.append(1)
        return reference_varlen(*a)  # type: ignore[no-any-return]

    return kernel


def packed_route(monkeypatch: pytest.MonkeyPatch, calls: Optional[list[int]] = None) -> None:
    """Make the backend plan the packed kernel on CPU (with the reference kernel)."""
    # as on CUDA in half precision: any head dim, no attention dropout
    monkeypatch.setattr(_varlen, "supports", lambda dev, dtype, d, p: p == 0.0)
    monkeypatch.setattr(_varlen, "_VARLEN", counting([] if calls is None else calls))


def decoders(
    seed: int, depths: tuple[int, ...], *, wfm: bool = False, self_attn: bool = False
) -> list[cm.CrossMAEDecoder]:
    torch.manual_seed(seed)
    out = []
    for i, depth in enumerate(depths):
        dec = cm.CrossMAEDecoder(
            E, 8, depth, 2, out_dim=3 + i, num_tokens=10 + i, self_attn=self_attn,
            num_feature_maps=2 if wfm else None,
        )  # fmt: skip
        out.append(dec.double())
    return out


@st.composite
def case(draw: st.DrawFn) -> dict[str, Any]:
    b = draw(st.integers(1, 3))
    m = draw(st.integers(1, 7))
    count = draw(st.integers(2, 3))
    return {
        "b": b,
        "m": m,
        "p": [draw(st.integers(0, 5)) for _ in range(count)],
        "wfm": draw(st.booleans()),
        "self_attn": draw(st.booleans()),
        "query_pad": draw(st.booleans()),
        "seed": draw(seeds()),
    }


def small_case(seed: int, *, b: int, m: int, p: list[int], **flags: bool) -> dict[str, Any]:
    """A fixed `case` (no WFM, no self-attention, no query padding unless given)."""
    base = {"wfm": False, "self_attn": False, "query_pad": False}
    return {"b": b, "m": m, "p": p, **base, **flags, "seed": seed}


def inputs(c: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[Any]]:
    g = generator(c["seed"])
    b, m = c["b"], c["m"]
    shape = (2, b, m, E) if c["wfm"] else (b, m, E)
    ctx = torch.randn(*shape, generator=g, dtype=torch.float64)
    cpad = torch.rand(b, m, generator=g) < 0.4
    cpad[0] = True  # one sample without any real key
    ctx = ctx.masked_fill(cpad[..., None], float("nan"))  # padding never read
    ids = [torch.randint(0, 10, (b, p), generator=g) for p in c["p"]]
    qpads: list[Any] = [
        (torch.rand(b, p, generator=g) < 0.3) if c["query_pad"] else None for p in c["p"]
    ]
    return ctx, cpad, ids, qpads


def one_by_one(decs: list[cm.CrossMAEDecoder], ctx: torch.Tensor, cpad: torch.Tensor,
               ids: list[torch.Tensor], qpads: list[Any]) -> list[torch.Tensor]:  # fmt: skip
    return [
        d(ctx, i, context_padding_mask=cpad, query_padding_mask=q)
        for d, i, q in zip(decs, ids, qpads)
    ]


def assert_rows_close(got: list[torch.Tensor], ref: list[torch.Tensor], qpads: list[Any]) -> None:
    for g, r, q in zip(got, ref, qpads):
        assert g.shape == r.shape
        assert torch.isfinite(g).all()
        real = torch.ones(g.shape[:2], dtype=torch.bool) if q is None else ~q
        torch.testing.assert_close(g[real], r[real], atol=1e-10, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(case())
def test_lockstep_equals_each_decoder_alone(c: dict[str, Any]) -> None:
    """Equal to every decoder run alone on the CPU's masked-SDPA route, and on the packed
    route; the lockstep run makes one kernel call per layer, not one per decoder."""
    decs = decoders(c["seed"] % 1000, (2,) * len(c["p"]), wfm=c["wfm"], self_attn=c["self_attn"])
    ctx, cpad, ids, qpads = inputs(c)
    ref = one_by_one(decs, ctx, cpad, ids, qpads)  # default CPU route, no packing
    with pytest.MonkeyPatch.context() as mp:
        calls: list[int] = []
        packed_route(mp, calls)
        alone = one_by_one(decs, ctx, cpad, ids, qpads)
        alone_calls = len(calls)
        calls.clear()
        got = cm.decode_together(
            decs, ctx, ids, context_padding_mask=cpad, query_padding_masks=qpads
        )
    assert_rows_close(got, ref, qpads)
    assert_rows_close(got, alone, qpads)
    self_calls = 2 * len(decs) if c["self_attn"] and c["query_pad"] else 0  # varlen self-attn
    assert alone_calls == 2 * len(decs) + self_calls
    assert len(calls) == 2 + self_calls  # depth 2: one cross-attention call per layer


def test_lockstep_gradients_equal() -> None:
    c = small_case(3, b=3, m=6, p=[4, 2, 5], wfm=True, query_pad=True)
    decs = decoders(1, (2, 2, 2), wfm=True)
    ctx, cpad, ids, qpads = inputs(c)
    ctx = ctx.nan_to_num(0.0).requires_grad_(True)

    def grads(fn: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        outs = fn()
        loss = sum((o * (1 + k)).sin().sum() for k, o in enumerate(outs))
        params = [ctx, *[p for d in decs for p in d.parameters()]]
        return list(torch.autograd.grad(loss, params, allow_unused=True))  # type: ignore[arg-type]

    qmask = [q for q in qpads]
    ref = grads(lambda: one_by_one(decs, ctx, cpad, ids, qmask))
    with pytest.MonkeyPatch.context() as mp:
        packed_route(mp)
        got = grads(
            lambda: cm.decode_together(
                decs, ctx, ids, context_padding_mask=cpad, query_padding_masks=qmask
            )
        )
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_padded_context_never_reaches_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN in padded keys, a sample with none at all: finite, and that sample's outputs
    equal the decoder's queries-only prediction (attention contributes exactly 0)."""
    decs = decoders(2, (1, 1))
    c = small_case(7, b=2, m=5, p=[3, 4])
    ctx, cpad, ids, _ = inputs(c)
    packed_route(monkeypatch)
    got = cm.decode_together(decs, ctx, ids, context_padding_mask=cpad)
    nothing = torch.ones_like(cpad)
    alone = one_by_one(decs, ctx.nan_to_num(123.0), nothing, ids, [None, None])
    for g, a in zip(got, alone):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g[0], a[0], atol=1e-12, rtol=1e-12)  # sample 0 has no key


@pytest.mark.parametrize("together", [False, True])
def test_nan_in_padded_context_gets_a_zero_gradient(
    together: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN stored in padded context slots (WFM: mixed and normed per layer) gives those
    slots an exact 0 gradient and every other gradient finite, alone and in lockstep."""
    decs = decoders(3, (2, 2), wfm=True)
    c = small_case(9, b=3, m=6, p=[4, 3], wfm=True)
    ctx, cpad, ids, qpads = inputs(c)
    packed_route(monkeypatch)
    x = ctx.detach().requires_grad_(True)
    if together:
        outs = cm.decode_together(decs, x, ids, context_padding_mask=cpad)
    else:
        outs = one_by_one(decs, x, cpad, ids, qpads)
    sum(o.square().sum() for o in outs).backward()  # type: ignore[union-attr]
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, cpad] == 0).all()
    for d in decs:
        assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)


def test_differing_depths_run_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    decs = decoders(4, (1, 2))
    c = small_case(1, b=2, m=4, p=[3, 2])
    ctx, cpad, ids, qpads = inputs(c)
    calls: list[int] = []
    packed_route(monkeypatch, calls)
    got = cm.decode_together(decs, ctx, ids, context_padding_mask=cpad)
    assert len(calls) == 3  # 1 + 2 layers, each decoder on its own
    assert_rows_close(got, one_by_one(decs, ctx, cpad, ids, qpads), qpads)


def test_hooks_and_overridden_forward_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lockstep run would bypass a forward hook or a subclass's forward: those run alone."""
    decs = decoders(5, (1, 1))
    c = small_case(2, b=2, m=4, p=[3, 2])
    ctx, cpad, ids, _ = inputs(c)
    calls: list[int] = []
    packed_route(monkeypatch, calls)
    seen: list[int] = []
    handle = decs[1].blocks[0].register_forward_hook(lambda *a: seen.append(1))
    cm.decode_together(decs, ctx, ids, context_padding_mask=cpad)
    assert seen == [1] and len(calls) == 2
    handle.remove()

    class Doubled(cm.CrossMAEDecoder):
        def forward(self, *a: Any, **kw: Any) -> torch.Tensor:
            return 2 * super().forward(*a, **kw)

    twice = Doubled(E, 8, 1, 2, out_dim=4, num_tokens=11).double()
    twice.load_state_dict(decs[1].state_dict())
    got = cm.decode_together([decs[0], twice], ctx, ids, context_padding_mask=cpad)
    plain = cm.decode_together(decs, ctx, ids, context_padding_mask=cpad)
    torch.testing.assert_close(got[1], 2 * plain[1])


def test_blocks_compiled_in_place_run_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Module.compile`` compiles a block's ``forward`` only: that block keeps running it."""
    decs = decoders(8, (1, 1))
    ctx, cpad, ids, qpads = inputs(small_case(4, b=2, m=4, p=[3, 2]))
    calls: list[int] = []
    packed_route(monkeypatch, calls)
    ref = one_by_one(decs, ctx, cpad, ids, qpads)
    torch._dynamo.reset()
    decs[0].blocks[0].compile(backend="eager")
    calls.clear()
    got = cm.decode_together(decs, ctx, ids, context_padding_mask=cpad)
    torch._dynamo.reset()
    assert len(calls) == 2  # one call per decoder: no lockstep
    assert_rows_close(got, ref, qpads)


def test_compile_blocks_keeps_lockstep(monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile_blocks` also compiles the lockstep steps: the decoders still share one call
    per layer, results are equal, and blocks of one shape share the compiled graphs."""
    from torch._dynamo.utils import counters

    decs = decoders(8, (2, 2, 2))
    ctx, cpad, ids, qpads = inputs(small_case(4, b=2, m=4, p=[3, 2, 4]))
    calls: list[int] = []
    packed_route(monkeypatch, calls)
    ref = one_by_one(decs, ctx, cpad, ids, qpads)
    torch._dynamo.reset()
    counters.clear()
    try:
        for d in decs:
            assert cm.compile_blocks(d, backend="eager") == 2
        calls.clear()
        got = cm.decode_together(decs, ctx, ids, context_padding_mask=cpad)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert len(calls) == 2  # depth 2: one call per layer for the three decoders
    assert_rows_close(got, ref, qpads)
    assert 2 <= graphs <= 6  # before/after steps; not one pair per block (6 blocks)


def test_a_decoder_of_another_dtype_is_named() -> None:
    """One context, one dtype: a float32 decoder beside float64 ones is refused by name."""
    decs = decoders(10, (1, 1))
    decs[1] = decs[1].float()
    ctx, cpad, ids, _ = inputs(small_case(5, b=2, m=4, p=[3, 2]))
    with pytest.raises(TypeError, match=r"decoders\[1\]: context has dtype torch.float64"):
        cm.decode_together(decs, ctx, ids, context_padding_mask=cpad)


def test_without_padding_every_decoder_runs_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    decs = decoders(6, (1, 1))
    ctx = torch.randn(2, 4, E, dtype=torch.float64)
    ids = [torch.randint(0, 10, (2, 3)), torch.randint(0, 10, (2, 2))]
    calls: list[int] = []
    packed_route(monkeypatch, calls)
    got = cm.decode_together(decs, ctx, ids)
    assert calls == []  # no padding: plain SDPA per decoder
    for g, d, i in zip(got, decs, ids):
        torch.testing.assert_close(g, d(ctx, i))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decoders": "abc"}, TypeError, "decoders must be a sequence"),
        ({"decoders": []}, ValueError, "at least one CrossMAEDecoder"),
        ({"decoders": [torch.nn.Linear(2, 2)]}, TypeError, r"decoders\[0\] must be"),
        ({"ids_predict": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "ids_predict must be"),
        ({"ids_predict": [torch.zeros(2, 3, dtype=torch.long)]}, ValueError, "ids_predict has 1"),
        (
            {"query_padding_masks": torch.zeros(2, 3, dtype=torch.bool)},
            TypeError,
            "query_padding_masks must be",
        ),
        ({"query_padding_masks": [None]}, ValueError, "query_padding_masks has 1"),
        (
            {
                "ids_predict": [
                    torch.zeros(2, 3, dtype=torch.long),
                    torch.zeros(3, 3, dtype=torch.long),
                ]
            },
            ValueError,
            r"decoders\[1\]: ids_predict has batch 3",
        ),
    ],
)
def test_argument_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    decs = decoders(7, (1, 1))
    args: dict[str, Any] = {
        "decoders": decs,
        "context": torch.randn(2, 4, E, dtype=torch.float64),
        "ids_predict": [torch.zeros(2, 3, dtype=torch.long)] * 2,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cm.decode_together(args.pop("decoders"), args.pop("context"), args.pop("ids_predict"),
                           **args)  # fmt: skip


# ------------------------------------------------------------------- in MultimodalMAE
def test_multimodal_model_fuses_its_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The water model with and without ``fuse_decoders``: same loss and gradients on the
    packed route, and one decoder kernel call per layer instead of one per modality."""
    model = tiny_water_model().double()
    inputs_, static = tiny_water_batch(model.names, generator(11))
    inputs_ = {k: v.double() for k, v in inputs_.items()}
    static = static.double()
    calls: list[int] = []
    packed_route(monkeypatch, calls)
    results = {}
    for fuse in (False, True):
        model.fuse_decoders = fuse
        model.zero_grad()
        calls.clear()
        out = model(inputs_, static=static, generator=generator(5))
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[fuse] = (out, grads, len(calls))
    (ref, ref_g, ref_calls), (got, got_g, got_calls) = results[False], results[True]
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-10, rtol=1e-10)
    assert len(got_g) == len(ref_g)
    for g, r in zip(got_g, ref_g):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
    for name in model.names:  # padded rows are meaningless (a sample lacking a modality
        real = ~got.splits[name].predict_padding_mask  # attends to one key in lockstep)
        torch.testing.assert_close(got.preds[name][real], ref.preds[name][real])
    assert list(got.preds) == model.names  # modality order kept
    decoders_ = len(model.names)
    assert ref_calls - got_calls == decoders_ - 1  # depth 1: five calls became one


_TINY_WATER = tiny_water_model().double()


@settings(max_examples=8, deadline=None)
@given(
    st.lists(st.booleans(), min_size=5, max_size=5),
    st.lists(st.booleans(), min_size=2, max_size=2),
    seeds(),
)
def test_lockstep_equals_one_by_one_under_any_missing_pattern(
    missing_mods: list[bool], which: list[bool], seed: int
) -> None:
    """Any modality missing for any sample (none, some, all): lockstep and one-by-one
    decoding give the same loss, per-sample losses and predictions on real slots."""
    model = _TINY_WATER
    inputs_, static = tiny_water_batch(model.names, generator(seed))
    inputs_ = {k: v.double() for k, v in inputs_.items()}
    missing = {
        name: torch.tensor(which) if flag else torch.zeros(2, dtype=torch.bool)
        for name, flag in zip(model.names, missing_mods)
    }
    with pytest.MonkeyPatch.context() as mp:
        calls: list[int] = []
        packed_route(mp, calls)
        outs, counts = {}, {}
        with torch.no_grad():
            for fuse in (False, True):
                model.fuse_decoders = fuse
                calls.clear()
                outs[fuse] = model(
                    inputs_, static=static.double(), missing=missing, generator=generator(seed)
                )
                counts[fuse] = len(calls)
        model.fuse_decoders = True
    assert counts[False] - counts[True] == len(model.names) - 1  # lockstep really ran
    ref, got = outs[False], outs[True]
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-10, rtol=1e-10, equal_nan=True)
    for name in model.names:
        torch.testing.assert_close(
            got.sample_losses[name], ref.sample_losses[name], atol=1e-10, rtol=1e-10,
            equal_nan=True,
        )  # fmt: skip
        real = ~got.splits[name].predict_padding_mask
        torch.testing.assert_close(got.preds[name][real], ref.preds[name][real])


def test_fuse_decoders_must_be_a_bool() -> None:
    model = tiny_water_model()
    with pytest.raises(TypeError, match="fuse_decoders"):
        cm.MultimodalMAE(dict(model.modalities), model.fusion, fuse_decoders=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fuse_decoders"):
        model.fuse_decoders = "no"  # type: ignore[assignment]
    assert model.fuse_decoders is True


def test_training_mode_lockstep(monkeypatch: pytest.MonkeyPatch) -> None:
    """In train mode without stochastic layers the results are equal; with drop path they
    still run in lockstep (one call per layer) and every sample is finite; with attention
    dropout the packed kernel is out, so the decoders run alone."""
    c = small_case(12, b=3, m=5, p=[4, 2])
    ctx, cpad, ids, qpads = inputs(c)
    calls: list[int] = []
    packed_route(monkeypatch, calls)
    decs = [d.train() for d in decoders(9, (2, 2))]
    ref = one_by_one(decs, ctx, cpad, ids, qpads)
    calls.clear()
    got = cm.decode_together(decs, ctx, ids, context_padding_mask=cpad)
    assert len(calls) == 2
    assert_rows_close(got, ref, qpads)
    torch.manual_seed(0)
    dropping = [
        cm.CrossMAEDecoder(E, 8, 2, 2, out_dim=3, num_tokens=10, drop_path=0.5).double().train()
        for _ in range(2)
    ]
    calls.clear()
    outs = cm.decode_together(dropping, ctx, ids, context_padding_mask=cpad)
    assert len(calls) == 2 and all(torch.isfinite(o).all() for o in outs)
    attn_drop = [
        cm.CrossMAEDecoder(E, 8, 2, 2, out_dim=3, num_tokens=10, attn_drop=0.1).double().train()
        for _ in range(2)
    ]
    calls.clear()
    cm.decode_together(attn_drop, ctx, ids, context_padding_mask=cpad)
    assert calls == []  # attention dropout: masked SDPA per decoder, not the packed kernel


def _traceable_kernel(q, k, v, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
    """A stand-in for the CUDA kernel that dynamo can trace (reads every input)."""
    return q * 1.0 + (cu_q.sum() + cu_k.sum() + k.sum() + v.sum()).to(q.dtype) * 0.0


def test_lockstep_and_padded_encoder_compile_in_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA route (plan, reordering, segments, one packed call per layer) traces with
    ``fullgraph=True``: no graph break on the code a CPU never runs otherwise."""
    monkeypatch.setattr(_varlen, "supports", lambda dev, dtype, d, p: p == 0.0)
    monkeypatch.setattr(_varlen, "_VARLEN", _traceable_kernel)
    torch.manual_seed(0)
    enc = cm.TransformerEncoder(E, 2, 2).eval()
    decs = [cm.CrossMAEDecoder(E, 8, 2, 2, 3 + i, num_tokens=10).eval() for i in range(3)]
    x = torch.randn(3, 6, E)
    pad = torch.tensor([[False, True, False, False, True, True]] * 3)
    ids = [torch.randint(0, 10, (3, 2 + i)) for i in range(3)]

    def run(t: torch.Tensor) -> list[torch.Tensor]:
        keys = enc(t, pad).tokens
        return cm.decode_together(decs, keys, ids, context_padding_mask=pad)

    torch._dynamo.reset()
    try:
        out = torch.compile(run, fullgraph=True, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    assert [tuple(o.shape) for o in out] == [(3, 2, 3), (3, 3, 4), (3, 4, 5)]


def test_multimodal_model_with_compile_blocks_keeps_lockstep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regional compilation and lockstep decoding combine: same loss as eager, five decoder
    calls per layer become one."""
    model = tiny_water_model().double()
    inputs_, static = tiny_water_batch(model.names, generator(11))
    inputs_ = {k: v.double() for k, v in inputs_.items()}
    calls: list[int] = []
    packed_route(monkeypatch, calls)
    # compiled blocks keep their encoders apart; so does this eager reference
    from crossmae.encoders import _together

    monkeypatch.setattr(_together, "may_stack", lambda: False)
    with torch.no_grad():
        ref = model(inputs_, static=static.double(), generator=generator(5))
        eager_calls = len(calls)
        torch._dynamo.reset()
        try:
            cm.compile_blocks(model, backend="eager")
            model.fuse_decoders = False
            calls.clear()
            alone = model(inputs_, static=static.double(), generator=generator(5))
            alone_calls = len(calls)
            model.fuse_decoders = True
            calls.clear()
            got = model(inputs_, static=static.double(), generator=generator(5))
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(alone.loss, ref.loss, atol=1e-10, rtol=1e-10)
    assert len(calls) == eager_calls  # lockstep, as without compilation
    assert alone_calls - len(calls) == len(model.names) - 1  # depth 1: five calls → one


def test_samples_without_a_real_query_skip_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder whose queries are all padding in a sample (a modality the sample lacks)
    attends there to one key, not to all: the packed call's work (sum of queries x keys
    over segments) drops by that sample's share, real rows and gradients are unchanged."""
    c = small_case(5, b=3, m=6, p=[4, 3], query_pad=True)
    decs = decoders(2, (1, 1))
    ctx, cpad, ids, qpads = inputs(c)
    ctx = ctx.nan_to_num(0.0).requires_grad_(True)
    cpad[1:] = False  # samples 1, 2: every key real
    qpads[0][1] = True  # decoder 0 has no real query in sample 1
    qpads[1][:] = False
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def kernel(*a: Any) -> torch.Tensor:
        seen.append((a[3].clone(), a[4].clone()))
        return reference_varlen(*a)  # type: ignore[no-any-return]

    monkeypatch.setattr(_varlen, "supports", lambda dev, dtype, d, p: p == 0.0)
    monkeypatch.setattr(_varlen, "_VARLEN", kernel)

    def run(fn: Callable[[], list[torch.Tensor]]) -> tuple[list[torch.Tensor], Any]:
        outs = fn()
        loss = sum(o.masked_fill(q[..., None], 0.0).sin().sum() for o, q in zip(outs, qpads))
        params = [ctx, *[p for d in decs for p in d.parameters()]]
        return outs, torch.autograd.grad(loss, params, allow_unused=True)  # type: ignore[arg-type]

    ref, ref_g = run(lambda: one_by_one(decs, ctx, cpad, ids, qpads))
    seen.clear()
    got, got_g = run(
        lambda: cm.decode_together(
            decs, ctx, ids, context_padding_mask=cpad, query_padding_masks=qpads
        )
    )
    assert_rows_close(got, ref, qpads)
    for g, r in zip(got_g, ref_g):
        if r is not None:
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
    ((cu_q, cu_k),) = seen  # one packed call for the one layer
    work = ((cu_q[1:] - cu_q[:-1]) * (cu_k[1:] - cu_k[:-1])).tolist()
    b, m = 3, 6
    # call 0, sample 1: segment 2 holds its 4 queries against one key, segment 3 the rest
    assert work[2] == 4 * 1 and int(cu_k[3] - cu_k[2]) == 1 and int(cu_k[4] - cu_k[3]) == m - 1
    assert work[4] == 4 * m  # call 0, sample 2: real queries, every key
    real_keys = (~cpad).sum(1).tolist()
    assert sum(work) == 4 * (real_keys[0] + 1 + m) + 3 * (real_keys[0] + 2 * m)
    assert len(work) == 2 * b * 2
