"""``enc(x, padding_mask, capacity=)`` on CUDA, for every packed kernel (``sdpa`` → the
segment-padded "dense" route, ``varlen``, ``flex``) in bf16 and fp16 autocast: the padded
forward's results on real slots, 0 in padding slots, finite gradients, batch independence.

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).

Legend: ``b`` batch, ``n`` tokens, ``c`` width. Polarity: ``padding_mask`` True = padding.
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import DEVICE, DTYPES, FWD_TOL, GPU, GRAD_TOL, rel_err, scattered_padding

import crossmae as cm
from crossmae.layers import backend

pytestmark = GPU

LENGTHS = [37, 0, 120, 5, 1, 64]  # sample 1 has no token at all
N, C, HEADS = 120, 64, 4  # head dim 16: every packed kernel takes it
CAPACITY = 256  # >= 227 real tokens
DEV_TYPE = torch.device(DEVICE).type


def _encoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "pre":
        enc = cm.TransformerEncoder(C, 2, HEADS, cond_dim=3)
        for f in enc.films or []:
            torch.nn.init.normal_(f.proj.weight, std=0.2)
    else:
        enc = cm.PostNormTransformerEncoder(C, 2, HEADS, cond_dim=3)
    return enc.to(DEVICE).eval()


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    pad = scattered_padding(LENGTHS, N, seed)
    x = torch.randn(len(LENGTHS), N, C, device=DEVICE, generator=g)
    cond = torch.randn(len(LENGTHS), 3, device=DEVICE, generator=g)
    return x, pad, cond


def _run(enc: torch.nn.Module, x, pad, cond, dtype, capacity):  # type: ignore[no-untyped-def]
    x = x.detach().requires_grad_(True)
    with torch.autocast(DEV_TYPE, dtype=dtype):
        out = enc(x, pad, cond=cond, return_layers="all", capacity=capacity)
    real = ~pad
    (out.tokens.float()[real].square().mean() + out.features.float()[:, real].mean()).backward()
    return out, x.grad


@pytest.mark.parametrize("kind", ["pre", "post"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_capacity_matches_the_padded_forward(kernel: str, dtype: torch.dtype, kind: str) -> None:
    enc = _encoder(kind)
    x, pad, cond = _inputs()
    with torch.autocast(DEV_TYPE, dtype=dtype):
        plan = backend.plan_for(x[0], C // HEADS, layout="packed")
    # packed rows never take flex (its partial blocks spread a NaN between segments): a
    # flex choice runs the segment-padded "dense" route
    expected = {"sdpa": "dense", "varlen": "varlen", "flex": "dense"}[kernel]
    assert plan.kernel == expected, (kernel, plan)
    ref, ref_grad = _run(enc, x, pad, cond, dtype, None)
    poisoned = x.masked_fill(pad[..., None], float("nan"))
    out, grad = _run(enc, poisoned, pad, cond, dtype, CAPACITY)
    real = ~pad
    assert out.tokens.shape == ref.tokens.shape and out.features.shape == ref.features.shape
    assert out.features.dtype == ref.features.dtype
    assert rel_err(out.tokens[real], ref.tokens[real]) < FWD_TOL[dtype]
    assert rel_err(out.features[:, real], ref.features[:, real]) < FWD_TOL[dtype]
    assert bool((out.tokens[pad] == 0).all()) and bool((out.features[:, pad] == 0).all())
    assert bool(grad.isfinite().all()) and bool((grad[pad] == 0).all())
    assert rel_err(grad[real], ref_grad[real]) < GRAD_TOL[dtype]


@pytest.mark.parametrize("kind", ["pre", "post"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_capacity_batch_independence(kernel: str, dtype: torch.dtype, kind: str) -> None:
    """Perturbing sample j's real tokens never moves sample i on the packed route."""
    enc = _encoder(kind)
    x, pad, cond = _inputs()
    with torch.no_grad(), torch.autocast(DEV_TYPE, dtype=dtype):
        out = enc(x, pad, cond=cond, capacity=CAPACITY).tokens
        x2 = x.clone()
        x2[2] = torch.randn(N, C, device=DEVICE)
        out2 = enc(x2, pad, cond=cond, capacity=CAPACITY).tokens
    for i in (0, 3, 4, 5):
        real = ~pad[i]
        assert rel_err(out2[i][real], out[i][real]) < 1e-3, f"sample {i} moved"
    assert rel_err(out2[2][~pad[2]], out[2][~pad[2]]) > 0


def test_capacity_compiles_fullgraph_on_cuda(kernel: str) -> None:
    enc = _encoder("pre")
    x, pad, cond = _inputs()
    compiled = torch.compile(enc, fullgraph=True)
    with torch.no_grad(), torch.autocast(DEV_TYPE, dtype=torch.bfloat16):
        ref = enc(x, pad, cond=cond).tokens
        out = compiled(x, pad, cond=cond, capacity=CAPACITY).tokens
    real = ~pad
    assert rel_err(out[real], ref[real]) < FWD_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES], ids=["fp32", "bf16", "fp16"])
def test_packed_nan_stays_in_its_sample(kernel: str, dtype: torch.dtype) -> None:
    """A NaN in one sample's real token never reaches another sample on the packed route,
    whatever kernel is chosen (flex once leaked it through shared 128-row blocks: 0 * NaN)."""
    enc = _encoder("pre")
    x, pad, cond = _inputs()
    x[0, int((~pad[0]).nonzero()[0])] = float("nan")  # a real token of sample 0
    with torch.no_grad(), torch.autocast(DEV_TYPE, dtype=dtype, enabled=dtype != torch.float32):
        out = enc(x, pad, cond=cond, capacity=CAPACITY).tokens
    others = out[1:][~pad[1:]]
    assert others.isfinite().all(), "a NaN crossed into another sample"
