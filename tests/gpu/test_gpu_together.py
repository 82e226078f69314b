"""`decode_together` on CUDA: the lockstep decoders (one packed kernel call per layer)
equal each decoder alone, in bf16 and fp16 autocast, eager and compiled (one graph); NaN
in padded keys never reaches an output.

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).

Legend: ``b`` batch, ``m`` keys, ``p`` queries, ``e`` context width. Polarity: True = padding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpu_helpers import DEVICE, DTYPES, FWD_TOL, GPU, GRAD_TOL, rel_err, scattered_padding

import crossmae as cm
from crossmae.layers import _varlen

pytestmark = GPU

LENGTHS = [37, 0, 120, 5, 1, 64]  # sample 1 has no key at all
M, E, DIM, HEADS = 120, 64, 32, 2  # head dim 16 (the water decoders')
P = (40, 7, 23)  # queries of the three decoders
DEV_TYPE = torch.device(DEVICE).type


def _parts(seed: int = 0) -> tuple[list[cm.CrossMAEDecoder], Any, Any, list[Any], list[Any]]:
    torch.manual_seed(seed)
    decs = [
        cm.CrossMAEDecoder(E, DIM, 2, HEADS, out_dim=3 + i, num_tokens=200, num_feature_maps=2)
        .to(DEVICE)
        .eval()
        for i in range(len(P))
    ]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    b = len(LENGTHS)
    pad = scattered_padding(LENGTHS, M, seed)
    ctx = torch.randn(2, b, M, E, device=DEVICE, generator=g)
    ids = [torch.randint(0, 200, (b, p), device=DEVICE, generator=g) for p in P]
    qpads = [torch.rand(b, p, device=DEVICE, generator=g) < 0.2 for p in P]
    return decs, ctx, pad, ids, qpads


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = _varlen._kernel()
    assert real is not None

    def counted(*a: Any) -> torch.Tensor:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(_varlen, "_VARLEN", counted)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_lockstep_equals_each_decoder(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE != "cuda" or not _varlen.varlen_available():
        pytest.skip("the packed kernel runs on CUDA only")
    decs, ctx, pad, ids, qpads = _parts()
    ctx = ctx.masked_fill(pad[None, ..., None], float("nan"))
    clean = ctx.nan_to_num(0.0)
    calls = _calls(monkeypatch)
    with torch.autocast(DEV_TYPE, dtype=dtype):
        alone = [
            d(clean, i, context_padding_mask=pad, query_padding_mask=q)
            for d, i, q in zip(decs, ids, qpads)
        ]
        assert len(calls) == 2 * len(P)
        calls.clear()
        x = ctx.detach().requires_grad_(True)
        got = cm.decode_together(decs, x, ids, context_padding_mask=pad, query_padding_masks=qpads)
        assert len(calls) == 2  # one call per layer for all three decoders
    for g, a, q in zip(got, alone, qpads):
        assert torch.isfinite(g).all()
        assert rel_err(g[~q], a[~q]) < FWD_TOL[dtype]
    sum(g.float()[~q].square().mean() for g, q in zip(got, qpads)).backward()  # type: ignore[union-attr]
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad[:, pad].abs().max() == 0  # padded keys get no gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("wfm", [False, True], ids=["shared-context", "wfm"])
def test_stacked_lockstep_equals_each_decoder(dtype: torch.dtype, wfm: bool) -> None:
    """Decoders of one query count run stacked (batched GEMMs, one stacked parameter copy,
    the shared context's kv projections as one GEMM): outputs and parameter gradients
    equal each decoder alone on the real kernel, in bf16 and fp16 autocast."""
    if DEVICE != "cuda" or not _varlen.varlen_available():
        pytest.skip("the packed kernel runs on CUDA only")
    from crossmae.decoders import together

    torch.manual_seed(0)
    counts = (40, 40, 23, 23, 40)
    decs = [
        cm.CrossMAEDecoder(E, DIM, 2, HEADS, out_dim=3 + i, num_tokens=200,
                           num_feature_maps=2 if wfm else None).to(DEVICE).eval()
        for i in range(len(counts))
    ]  # fmt: skip
    g = torch.Generator(device=DEVICE).manual_seed(1)
    b = len(LENGTHS)
    pad = scattered_padding(LENGTHS, M, 1)
    ctx = torch.randn(*((2,) if wfm else ()), b, M, E, device=DEVICE, generator=g)
    ids = [torch.randint(0, 200, (b, p), device=DEVICE, generator=g) for p in counts]
    qpads = [torch.rand(b, p, device=DEVICE, generator=g) < 0.2 for p in counts]
    seen: list[list[list[int]]] = []
    real = together._stack_groups

    def spy(*a: Any) -> Any:
        out = real(*a)
        seen.append([idx for idx, _ in out])
        return out

    def run(fn: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.autocast(DEV_TYPE, dtype=dtype):
            outs = fn()
        loss = sum(o.float()[~q].square().mean() for o, q in zip(outs, qpads))
        grads = []
        for d in decs:  # one flat gradient per decoder (a k bias' true gradient is 0)
            gs = torch.autograd.grad(loss, list(d.parameters()), retain_graph=True)  # type: ignore[arg-type]
            grads.append(torch.cat([x.flatten() for x in gs]))
        return outs, grads

    alone = run(lambda: [
        d(ctx, i, context_padding_mask=pad, query_padding_mask=q)
        for d, i, q in zip(decs, ids, qpads)
    ])  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(together, "_stack_groups", spy)
        got = run(lambda: cm.decode_together(
            decs, ctx, ids, context_padding_mask=pad, query_padding_masks=qpads))  # fmt: skip
    assert sorted(seen[-1]) == [[0, 1, 4], [2, 3]]
    for o, a, q in zip(got[0], alone[0], qpads):
        assert torch.isfinite(o).all()
        assert rel_err(o[~q], a[~q]) < FWD_TOL[dtype]
    for gr, ar in zip(got[1], alone[1]):
        assert torch.isfinite(gr).all()
        assert rel_err(gr, ar) < GRAD_TOL[dtype]


def test_lockstep_compiles_in_one_graph() -> None:
    if DEVICE != "cuda" or not _varlen.varlen_available():
        pytest.skip("the packed kernel runs on CUDA only")
    decs, ctx, pad, ids, qpads = _parts(1)

    def run(c: Any) -> list[torch.Tensor]:
        with torch.autocast(DEV_TYPE, dtype=torch.bfloat16):
            return cm.decode_together(
                decs, c, ids, context_padding_mask=pad, query_padding_masks=qpads
            )

    ref = run(ctx)
    torch._dynamo.reset()
    out = torch.compile(run, fullgraph=True)(ctx)
    for o, r, q in zip(out, ref, qpads):
        assert rel_err(o[~q], r[~q]) < GRAD_TOL[torch.bfloat16]
