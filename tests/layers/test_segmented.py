"""Segmented attention in crossmae's Triton kernels (crossmae.layers._segmented): which calls
it takes, its ops' fake shapes, the opt-in switch, and the kernels themselves in Triton's
interpreter on the CPU against a float64 softmax per segment (also through `_varlen`'s
padded and lockstep paths). tests/gpu/test_gpu_segmented.py runs them on CUDA.

Legend: ``tq`` / ``tk`` packed query / key rows, ``h`` heads, ``d`` head dim.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from crossmae.layers import _segmented, _varlen

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _call(tq: int = 7, tk: int = 9, h: int = 2, d: int = 16, dtype: torch.dtype = BF16) -> Any:
    q = torch.randn(tq, h, d, dtype=dtype)
    kv = torch.randn(tk, 2, h, d, dtype=dtype)
    cu = torch.tensor([0, 3, tq], dtype=torch.int32), torch.tensor([0, 4, tk], dtype=torch.int32)
    return q, kv[:, 0], kv[:, 1], *cu


def test_fits_reads_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, cu_q, cu_k = _call()
    assert not _segmented.fits(q, k, v, cu_q, cu_k)  # CPU tensors: never
    monkeypatch.setattr(_segmented, "_TRITON_SHIPPED", True)
    # the rules, with the device taken as CUDA
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    assert _segmented.fits(q, k, v, cu_q, cu_k)  # strided k, v views of one projection
    assert not _segmented.fits(q.float(), k, v, cu_q, cu_k)  # dtypes differ
    assert not _segmented.fits(q.float(), k.float(), v.float(), cu_q, cu_k)  # not half
    assert not _segmented.fits(q[..., :8], k[..., :8], v[..., :8], cu_q, cu_k)  # d = 8
    assert not _segmented.fits(q, k, v[:-1], cu_q, cu_k)  # k, v shapes differ
    assert not _segmented.fits(q.transpose(0, 2), k, v, cu_q, cu_k)  # d not unit stride
    assert not _segmented.fits(q, k, v, cu_q.long(), cu_k)  # int64 boundaries
    assert not _segmented.fits(q, k, v, cu_q, cu_k[:2])  # boundary counts differ
    assert not _segmented.fits(q, k, v, cu_q[:1], cu_k[:1])  # no segment
    wide_q, wide_k = torch.zeros(6, dtype=torch.int32), torch.zeros(6, dtype=torch.int32)
    assert not _segmented.fits(q, k, v, wide_q[::2], wide_k[::2])  # strided boundaries
    many = torch.zeros(_segmented.MAX_SEGMENTS + 2, dtype=torch.int32)
    assert not _segmented.fits(q, k, v, many, many)  # above the grid's limit
    monkeypatch.setattr(_segmented, "_TRITON_SHIPPED", False)
    assert not _segmented.fits(q, k, v, cu_q, cu_k) and not _segmented.available()


def test_fake_implementations_shapes() -> None:
    """What torch.compile plans memory with: contiguous outputs and gradients shaped like
    the inputs, the log-sum-exp ``[h, tq]`` in float32; no kernel, no triton needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v, cu_q, cu_k = _call(tq=7, tk=9, h=2, d=16)
        o, lse = torch.ops.crossmae.segmented_attention(q, k, v, cu_q, cu_k, 4, 5, 0.25)
        assert o.shape == q.shape and o.is_contiguous() and o.dtype == BF16
        assert lse.shape == (2, 7) and lse.dtype == F32
        dq, dk, dv = torch.ops.crossmae.segmented_attention_backward(
            q, k, v, o, o, lse, cu_q, cu_k, 4, 5, 0.25
        )
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert dk.is_contiguous() and dv.is_contiguous()


def test_use_for_varlen_swaps_the_packed_kernel_and_back() -> None:
    before = _varlen._VARLEN
    try:
        _segmented.use_for_varlen()
        assert _varlen._kernel() is _segmented.varlen_fn
        _segmented.use_for_varlen(False)
        assert _varlen._VARLEN is _varlen._UNLOADED
    finally:
        _varlen._VARLEN = before


def test_varlen_fn_hands_calls_it_cannot_take_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.attention.varlen as tv

    seen: list[tuple[Any, ...]] = []

    def fake_varlen(*args: Any) -> torch.Tensor:
        seen.append(args)
        return torch.zeros_like(args[0])

    monkeypatch.setattr(tv, "varlen_attn", fake_varlen)
    q, k, v, cu_q, cu_k = _call()
    out = _segmented.varlen_fn(q, k, v, cu_q, cu_k, 4, 5)  # CPU: not for the kernels
    assert out.shape == q.shape and len(seen) == 1 and seen[0][5:] == (4, 5)


_INTERPRET = """
import math, torch
from crossmae.layers import _segmented, _varlen
from tests.layers.segmented_reference import bounds, reference

worst = 0.0
# (query rows per segment, key rows per segment, heads, head dim, dtype): empty segments
# both ways, several query and key blocks, one key, head dims 16 to 128
cases = [([5, 0, 70, 3], [9, 4, 0, 130], 2, 16, torch.float16),
         ([33, 1], [64, 65], 3, 32, torch.float16),
         ([300, 2, 0], [200, 0, 7], 2, 16, torch.float32),
         ([0, 17], [5, 1], 1, 64, torch.float16),
         ([4], [3], 1, 128, torch.float16)]
g = torch.Generator().manual_seed(0)
for _ in range(6):  # random layouts: 1-5 segments of 0-150 query and key rows each
    s = int(torch.randint(1, 6, (1,), generator=g))
    lq = torch.randint(0, 151, (s,), generator=g).tolist()
    lk = torch.randint(0, 151, (s,), generator=g).tolist()
    lq[0] = max(lq[0], 1)  # at least one query row
    cases.append((lq, lk, 2, (16, 32)[int(torch.randint(0, 2, (1,), generator=g))], torch.float16))
for lq, lk, h, d, dt in cases:
    cu_q, cu_k = bounds(lq), bounds(lk)
    q = torch.randn(sum(lq), h, d, generator=g, dtype=dt)
    kv = torch.randn(sum(lk), 2, h, d, generator=g, dtype=dt)  # strided views, as projected
    k, v = kv[:, 0], kv[:, 1]
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    o = _segmented.segmented_attention(*ins, cu_q, cu_k, max(lq), max(lk))
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference(*r, cu_q, cu_k)
    gout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (want * gout).sum().backward()
    (o.double() * gout).sum().backward()
    errs = [(o.double() - want).abs().max()] + [
        (a.grad.double() - x.grad).abs().max() / x.grad.abs().max().clamp_min(1)
        for a, x in zip(ins, r)]
    worst = max(worst, max(float(e) for e in errs))
    # the custom op (what torch.compile sees) gives the eager path's results exactly
    ins2 = [t.detach().requires_grad_() for t in (q, k, v)]
    o2 = _segmented._segmented_attention(*ins2, cu_q, cu_k, max(lq), max(lk), 1 / math.sqrt(d))[0]
    (o2.double() * gout).sum().backward()
    assert torch.equal(o2, o)
    assert all(torch.equal(a.grad, c.grad) for a, c in zip(ins, ins2))

# the incoming gradient in any layout: expanded (from a sum) and permuted
lq, lk = [40, 0, 7], [30, 5, 70]
cu_q = torch.tensor([0, 40, 40, 47], dtype=torch.int32)
cu_k = torch.tensor([0, 30, 35, 105], dtype=torch.int32)
q = torch.randn(47, 2, 16, generator=g, dtype=torch.float16)
k, v = (torch.randn(105, 2, 16, generator=g, dtype=torch.float16) for _ in range(2))
for make_grad in (lambda o: o.float().sum(), lambda o: (o.float().transpose(0, 2).contiguous().transpose(0, 2) * 1.5).sum()):
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    o = _segmented.segmented_attention(*ins, cu_q, cu_k, 40, 70)
    make_grad(o).backward()
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    make_grad(reference(*r, cu_q, cu_k)).backward()
    for a, x in zip(ins, r):
        worst = max(worst, float((a.grad.double() - x.grad).abs().max() / x.grad.abs().max().clamp_min(1)))
gout = torch.randn(47, 16, 2, generator=g, dtype=torch.float16).transpose(1, 2)  # d-stride 2
ins = [t.detach().requires_grad_() for t in (q, k, v)]
_segmented.segmented_attention(*ins, cu_q, cu_k, 40, 70).backward(gout)
r = [t.detach().double().requires_grad_() for t in (q, k, v)]
reference(*r, cu_q, cu_k).backward(gout.double())
for a, x in zip(ins, r):
    worst = max(worst, float((a.grad.double() - x.grad).abs().max() / x.grad.abs().max().clamp_min(1)))

# through _varlen: a padded batch (real + dummy segments per sample) and the lockstep
# path of several calls over one key layout, against masked softmax
kernel = lambda q, k, v, cq, ck, mq, mk: _segmented.segmented_attention(q, k, v, cq, ck, mq, mk)
b, h, n, m, d = 3, 2, 20, 70, 16
q = torch.randn(b, h, n, d, generator=g, dtype=torch.float16)
k, v = (torch.randn(b, h, m, d, generator=g, dtype=torch.float16) for _ in range(2))
pad = torch.arange(m)[None, :] >= torch.tensor([70, 9, 33])[:, None]
k, v = k.masked_fill(pad[:, None, :, None], 0), v.masked_fill(pad[:, None, :, None], 0)
got = _varlen.varlen_attend(q, k, v, pad, kernel=kernel)
keep = ~pad[:, None, None, :]
want = torch.softmax((q.double() @ k.double().transpose(-1, -2) / 4).masked_fill(~keep, -math.inf), -1) @ v.double()
worst = max(worst, float((got.double() - want).abs().max()))
qs = [torch.randn(b, c, h, d, generator=g, dtype=torch.float16) for c in (5, 5, 12)]
ks = [torch.randn(b, m, h, d, generator=g, dtype=torch.float16) for _ in qs]
vs = [torch.randn(b, m, h, d, generator=g, dtype=torch.float16) for _ in qs]
lengths = torch.tensor([70, 9, 33])
outs = _varlen.varlen_together(qs, ks, vs, lengths, kernel=kernel)
for qq, kk, vv, oo in zip(qs, ks, vs, outs):
    s = torch.einsum("bqhd,bkhd->bhqk", qq.double(), kk.double()) / 4
    s = s.masked_fill(pad[:, None, None, :], -math.inf)
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vv.double())
    worst = max(worst, float((oo.double() - ref).abs().max()))
print(worst)
"""


def test_kernels_in_triton_s_interpreter() -> None:
    """The Triton kernels on the CPU (``TRITON_INTERPRET=1``) against a float64 softmax
    per segment: output and the three input gradients, segments without queries or keys,
    several blocks of each, strided keys and values, incoming gradients expanded (from a
    sum) or with a strided head dim, head dims 16 to 128, float16 and
    float32, six random layouts (the interpreter mishandles bfloat16, for the short kernels too; the CUDA tests
    cover it); the custom op and the eager autograd function agree exactly; `_varlen`'s
    padded and lockstep paths give the masked softmax with these kernels. Needs
    ``triton`` and a NumPy the interpreter can read segment bounds with (< 2.4: the
    interpreter turns one-element arrays into loop bounds with ``int()``)."""
    pytest.importorskip("triton")
    np = pytest.importorskip("numpy")
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip(
            f"Triton's interpreter needs numpy < 2.4 for runtime loop bounds, got {np.__version__}"
        )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(_INTERPRET)],
        capture_output=True, text=True, timeout=600, check=False, env=env, cwd=root,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.strip().splitlines()[-1])
    assert math.isfinite(worst) and worst < 5e-3, out.stdout
