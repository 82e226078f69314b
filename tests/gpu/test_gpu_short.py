"""The short-key Triton attention kernel on CUDA (crossmae.layers._short): against a float64
softmax (output and input gradients) over strided inputs and edge lengths, inside the
models under the default table (the profiler sees the Triton kernels, not SDPA's),
compiled (one graph) and captured in a CUDA graph.

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpu_helpers import DEVICE, GPU

import crossmae as cm
from crossmae.layers import _short, backend
from crossmae.layers.backend import KernelRule

pytestmark = [
    *GPU,
    pytest.mark.skipif(DEVICE != "cuda" or not _short.available(), reason="CUDA and triton"),
]
# the short kernel for every unpadded call it can take at head dims 32 and 64
SHORT_TABLE = [KernelRule(kernel="short", head_dim=d, max_keys=128, padded=False) for d in (32, 64)]


@pytest.fixture(autouse=True)
def _short_table() -> Iterator[None]:
    backend.set_kernel_table(SHORT_TABLE)
    yield
    backend.set_kernel_table(None)


CASES = [  # b, h, n, m, d: the image shapes, then the edges of one tile
    (4, 16, 147, 50, 32),
    (4, 12, 50, 50, 64),
    (3, 2, 1, 1, 16),
    (2, 3, 300, 128, 32),
    (2, 2, 65, 127, 128),
    (1, 8, 1110, 100, 16),
]


def _inputs(b: int, h: int, n: int, m: int, d: int, dtype: torch.dtype, fused: bool) -> Any:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    if fused:  # self-attention: strided views of one [b, n, 3, h, d] projection
        buf = torch.randn(b, n, 3, h, d, device=DEVICE, dtype=dtype, generator=g)
        return [buf[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3)]
    q = torch.randn(b, n, h, d, device=DEVICE, dtype=dtype, generator=g).transpose(1, 2)
    kv = torch.randn(b, m, 2, h, d, device=DEVICE, dtype=dtype, generator=g)
    return [t.detach().requires_grad_() for t in (q, kv[:, :, 0].transpose(1, 2),
                                                  kv[:, :, 1].transpose(1, 2))]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("b", "h", "n", "m", "d"), CASES)
def test_matches_float64_softmax(b: int, h: int, n: int, m: int, d: int,
                                 dtype: torch.dtype) -> None:  # fmt: skip
    fused = n == m
    q, k, v = _inputs(b, h, n, m, d, dtype, fused)
    assert _short.fits(q, k, v, 0.0)
    out = _short.short_attention(q, k, v)
    assert out.shape == (b, h, n, d) and out.dtype == dtype
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.softmax(ref[0] @ ref[1].transpose(-1, -2) / math.sqrt(d), -1) @ ref[2]
    grad = torch.randn_like(want)
    (want * grad).sum().backward()
    (out.double() * grad).sum().backward()
    # SDPA's own error at the same precision, the yardstick
    sq, sk, sv = (t.detach().requires_grad_() for t in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(sq, sk, sv)
    (sdpa.double() * grad).sum().backward()

    def err(a: torch.Tensor, r: torch.Tensor) -> float:
        return float((a.double() - r).abs().max() / r.abs().max().clamp_min(1))

    pairs = [(out, want), (q.grad, ref[0].grad), (k.grad, ref[1].grad), (v.grad, ref[2].grad)]
    sdpa_pairs = [(sdpa, want), (sq.grad, ref[0].grad), (sk.grad, ref[1].grad),
                  (sv.grad, ref[2].grad)]  # fmt: skip
    for (a, r), (s, _) in zip(pairs, sdpa_pairs):
        assert a is not None and s is not None and r is not None
        assert torch.isfinite(a).all()
        assert err(a, r) <= max(2 * err(s, r), 1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_models_run_it_under_a_short_rule_and_match_explicit_softmax() -> None:
    """The ViT encoder over 50 tokens (head dim 64) and the CrossMAE decoder (49 x 50, head
    dim 32): short rules send both to the short kernel, whose Triton kernels appear in the
    profile (and no SDPA kernel), and the results match the explicit-softmax path."""
    torch.manual_seed(0)
    enc = cm.TransformerEncoder(128, 2, 2).to(DEVICE)
    ref_enc = cm.TransformerEncoder(128, 2, 2, fused_attn=False).to(DEVICE)
    ref_enc.load_state_dict(enc.state_dict())
    dec = cm.CrossMAEDecoder(128, 64, 2, 2, 6, num_tokens=196).to(DEVICE)
    ref_dec = cm.CrossMAEDecoder(128, 64, 2, 2, 6, num_tokens=196, fused_attn=False).to(DEVICE)
    ref_dec.load_state_dict(dec.state_dict())
    x = torch.randn(8, 50, 128, device=DEVICE)
    ids = torch.rand(8, 196, device=DEVICE).argsort(1)[:, :49].sort(1).values

    def run(e: Any, d: Any, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = d(e(xx).tokens, ids)
        out.float().square().mean().backward()
        assert xx.grad is not None
        return out.detach().float(), xx.grad

    want, want_grad = run(ref_enc, ref_dec, amp=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got, got_grad = run(enc, dec, amp=True)
    names = {e.name for e in prof.events() if str(e.device_type).endswith("CUDA")}
    assert any(n.startswith("_fwd") for n in names) and any(n.startswith("_bwd") for n in names)
    assert not any("fmha" in n or "flash" in n or "cudnn" in n for n in names), names
    rel = float((got - want).abs().max() / want.abs().max())
    rel_grad = float((got_grad - want_grad).abs().max() / want_grad.abs().max())
    assert rel < 3e-2 and rel_grad < 6e-2, (rel, rel_grad)


def test_compiled_equals_eager_in_one_graph() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    dec = cm.CrossMAEDecoder(128, 64, 2, 2, 6, num_tokens=196).to(DEVICE)
    ctx = torch.randn(4, 50, 128, device=DEVICE)
    ids = torch.rand(4, 196, device=DEVICE).argsort(1)[:, :147].sort(1).values

    def step(f: Any) -> tuple[torch.Tensor, torch.Tensor]:
        c = ctx.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = f(c, ids)
        out.float().square().mean().backward()
        assert c.grad is not None
        return out.detach().float(), c.grad

    want, want_grad = step(dec)
    got, got_grad = step(torch.compile(dec, fullgraph=True))
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_grad, want_grad, atol=2e-3, rtol=5e-2)


def test_captured_in_a_cuda_graph() -> None:
    """The image model's whole step with the short kernel in its encoder and decoder,
    captured by `cm.capture_step`: replays train and stay finite."""
    torch.manual_seed(0)
    model = cm.build_image_crossmae(
        img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=2, decoder_embed_dim=64,
        decoder_depth=2, decoder_num_heads=2, mask_ratio=0.75,
    ).to(DEVICE)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    masks = torch.Generator(device=DEVICE).manual_seed(0)
    imgs = torch.randn(8, 3, 64, 64, device=DEVICE)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = model(imgs, generator=masks)
        out.loss.backward()
        opt.step()
        return out.loss.detach()

    replay, loss = cm.capture_step(step, optimizers=[opt], generators=[masks])
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        replay()
        losses.append(loss.clone())
    torch.cuda.synchronize()
    assert all(torch.isfinite(x) for x in losses)
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) > 0
