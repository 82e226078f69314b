"""Padding properties on CUDA, for every padded-attention kernel (``sdpa`` with a boolean
mask, ``varlen``, ``flex``) in bf16 and fp16 autocast.

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).

Legend: ``b`` batch, ``n`` tokens, ``q`` queries, ``c`` width. Polarity: every
``*_padding_mask`` is bool, True = padding.
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import (
    DEVICE,
    DTYPES,
    FWD_TOL,
    GPU,
    GRAD_TOL,
    assert_kernel_selected,
    build_stacks,
    rel_err,
    run_stack,
    scattered_padding,
)

pytestmark = GPU

LENGTHS = [37, 0, 120, 5, 1, 64]  # sample 1 has no token at all
QUERY_LENGTHS = [9, 0, 16, 1, 16, 3]
N, Q, C = 120, 16, 64


def _inputs(seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    pad = scattered_padding(LENGTHS, N, seed)
    qpad = scattered_padding(QUERY_LENGTHS, Q, seed + 1)
    x = torch.randn(len(LENGTHS), N, C, device=DEVICE, generator=g)
    queries = torch.randn(len(LENGTHS), Q, C, device=DEVICE, generator=g)
    return x.masked_fill(pad[..., None], 0.0), pad, queries.masked_fill(qpad[..., None], 0.0), qpad


def _assert_all_finite(tokens, out, grads, pad, qpad) -> None:  # type: ignore[no-untyped-def]
    assert bool(tokens[~pad].isfinite().all()), "encoder output not finite"
    assert bool(out.isfinite().all()), "decoder output not finite (padded rows included)"
    for name, g in grads.items():
        assert bool(g.isfinite().all()), f"{name} gradient not finite"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_matches_reference_and_ignores_nan_in_padded_slots(kernel: str, dtype: torch.dtype) -> None:
    assert_kernel_selected(kernel, dtype, 16)
    model, ref = build_stacks()
    x, pad, queries, qpad = _inputs()
    r_tok, r_out, r_grads = run_stack(ref, x, pad, queries, qpad, None)
    tok, out, grads = run_stack(model, x, pad, queries, qpad, dtype)
    _assert_all_finite(tok, out, grads, pad, qpad)
    real_q = ~qpad
    assert rel_err(tok[~pad], r_tok[~pad]) < FWD_TOL[dtype]
    assert rel_err(out[real_q], r_out[real_q]) < FWD_TOL[dtype]
    for name, g in r_grads.items():
        assert rel_err(grads[name], g) < GRAD_TOL[dtype], name
    for poison in (float("nan"), float("inf")):
        xp = x.masked_fill(pad[..., None], poison)
        qp = queries.masked_fill(qpad[..., None], poison)
        p_tok, p_out, p_grads = run_stack(model, xp, pad, qp, qpad, dtype)
        # the kernels see bit-identical real inputs: the real outputs are bit-identical
        assert torch.equal(p_tok[~pad], tok[~pad]), f"{poison} in padded slots moved tokens"
        assert torch.equal(p_out[real_q], out[real_q]), f"{poison} in padded slots moved out"
        _assert_all_finite(p_tok, p_out, p_grads, pad, qpad)
        for name, g in grads.items():  # backward may accumulate in another order
            assert rel_err(p_grads[name], g) < 1e-2, name


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_batch_independence(kernel: str, dtype: torch.dtype) -> None:
    """Perturbing sample j never changes sample i; each sample equals its batch of one."""
    model, _ = build_stacks()
    x, pad, queries, qpad = _inputs()
    tok, out, _ = run_stack(model, x, pad, queries, qpad, dtype)
    j = 2
    g = torch.Generator(device=DEVICE).manual_seed(7)
    x2 = x.clone()
    x2[j] = torch.randn(N, C, device=DEVICE, generator=g).masked_fill(pad[j][:, None], 0.0)
    tok2, out2, _ = run_stack(model, x2, pad, queries, qpad, dtype)
    others = [i for i in range(len(LENGTHS)) if i != j]
    for i in others:
        real, real_q = ~pad[i], ~qpad[i]
        if bool(real.any()):
            assert rel_err(tok2[i][real], tok[i][real]) < 1e-3, f"sample {i}'s tokens moved"
        if bool(real_q.any()):
            assert rel_err(out2[i][real_q], out[i][real_q]) < 1e-3, f"sample {i}'s out moved"
    assert rel_err(out2[j][~qpad[j]], out[j][~qpad[j]]) > 0, "sample j's change had no effect"
    for i in range(len(LENGTHS)):
        s = slice(i, i + 1)
        t1, o1, _ = run_stack(model, x[s], pad[s], queries[s], qpad[s], dtype)
        if bool((~pad[i]).any()):
            assert rel_err(t1[0][~pad[i]], tok[i][~pad[i]]) < FWD_TOL[dtype], f"sample {i}"
        if bool((~qpad[i]).any()):
            assert rel_err(o1[0][~qpad[i]], out[i][~qpad[i]]) < FWD_TOL[dtype], f"sample {i}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_empty_samples_and_empty_batches_have_finite_gradients(
    kernel: str, dtype: torch.dtype
) -> None:
    model, _ = build_stacks()
    x, pad, queries, qpad = _inputs()
    tok, out, grads = run_stack(model, x, pad, queries, qpad, dtype)
    _assert_all_finite(tok, out, grads, pad, qpad)
    # a whole batch without a single real key (and queries that have none to attend to)
    empty = torch.ones_like(pad)
    tok, out, grads = run_stack(
        model,
        x.masked_fill(empty[..., None], float("nan")),
        empty,
        queries,
        torch.zeros_like(qpad),
        dtype,
    )
    assert bool(out.isfinite().all())
    for name, g in grads.items():
        assert bool(g.isfinite().all()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_compiled_equals_eager(kernel: str, dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    model, _ = build_stacks()
    x, pad, queries, qpad = _inputs()
    tok, out, grads = run_stack(model, x, pad, queries, qpad, dtype)
    compiled = torch.compile(model, dynamic=False)
    c_tok, c_out, c_grads = run_stack(compiled, x, pad, queries, qpad, dtype)
    _assert_all_finite(c_tok, c_out, c_grads, pad, qpad)
    assert rel_err(c_tok[~pad], tok[~pad]) < FWD_TOL[dtype]
    assert rel_err(c_out[~qpad], out[~qpad]) < FWD_TOL[dtype]
    for name, g in grads.items():
        key = name if name in c_grads else f"_orig_mod.{name}"
        assert rel_err(c_grads[key], g) < GRAD_TOL[dtype], name
    # NaN in padded slots under compile as well
    p_tok, p_out, p_grads = run_stack(
        compiled, x.masked_fill(pad[..., None], float("nan")), pad, queries, qpad, dtype
    )
    assert rel_err(p_tok[~pad], c_tok[~pad]) < 1e-3 and rel_err(p_out[~qpad], c_out[~qpad]) < 1e-3
    _assert_all_finite(p_tok, p_out, p_grads, pad, qpad)
