"""Stacked encoders on CUDA (`crossmae.encoders._together`): equal to each encoder alone
on the real kernels, in bf16 and fp16 autocast, unpadded (cuDNN/flash SDPA over ``g * b``
samples) and padded (the packed kernel, keys reordered once for every stacked sample).

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from gpu_helpers import DEVICE, DTYPES, FWD_TOL, GPU, GRAD_TOL, rel_err, scattered_padding

import crossmae as cm
from crossmae.encoders import _together

pytestmark = GPU

LENGTHS = [37, 0, 120, 5, 1, 64]  # sample 1 has no real token
N, C, HEADS = 120, 64, 2  # head dim 32 (the water encoders')


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_stacked_encoders_equal_each_alone(dtype: torch.dtype, padded: bool) -> None:
    torch.manual_seed(0)
    encs = [cm.TransformerEncoder(C, 2, HEADS, cond_dim=5).to(DEVICE).eval() for _ in range(3)]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    b = len(LENGTHS)
    xs = [torch.randn(b, N, C, device=DEVICE, generator=g) for _ in encs]
    conds = [torch.randn(b, 5, device=DEVICE, generator=g) for _ in encs]
    pads: list[Optional[torch.Tensor]] = [None] * 3
    if padded:
        pads = [scattered_padding(LENGTHS, N, s).to(DEVICE) for s in range(3)]

    def run(stacked: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
            if stacked:
                parts = [_together.encoder_parts(e) for e in encs]
                assert all(p is not None for p in parts)
                outs = [o.tokens for o in _together.encode_stacked(
                    encs, [p[1:] for p in parts if p is not None], xs, pads, conds)]  # fmt: skip
            else:
                outs = [e(x, p, cond=c).tokens for e, x, p, c in zip(encs, xs, pads, conds)]
        real = [torch.ones(b, N, dtype=torch.bool, device=DEVICE) if p is None else ~p
                for p in pads]  # fmt: skip
        loss = sum(o.float()[r].square().mean() for o, r in zip(outs, real))
        grads = []
        for e in encs:
            gs = torch.autograd.grad(loss, list(e.parameters()), retain_graph=True)  # type: ignore[arg-type]
            grads.append(torch.cat([x.flatten() for x in gs]))
        return [o[r] for o, r in zip(outs, real)], grads

    ref, ref_grads = run(False)
    got, got_grads = run(True)
    for o, r in zip(got, ref):
        assert torch.isfinite(o).all()
        assert rel_err(o, r) < FWD_TOL[dtype]
    for gr, r in zip(got_grads, ref_grads):
        assert torch.isfinite(gr).all()
        assert rel_err(gr, r) < GRAD_TOL[dtype]
