"""The short-key attention kernel (crossmae.layers._short): where the backend plans it, what
a call must be to run it, its fallback, its fake (meta) implementation, and, where
``triton`` is installed, the kernels themselves on the CPU through Triton's interpreter.

The kernel runs on CUDA only; tests/gpu/test_gpu_short.py checks it there against a float64
reference, inside models, compiled and captured in CUDA graphs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import crossmae as cm
from crossmae.layers import _short, backend
from crossmae.layers.attention import _attend
from crossmae.layers.backend import AttentionPlan, KernelRule, decide

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
SHORT_RULE = KernelRule(kernel="short", head_dim=32, max_keys=64, padded=False,
                        sdpa_backends=("efficient", "flash"))  # fmt: skip


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    backend.set_kernel_table(None)


@pytest.fixture
def triton_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_short, "_TRITON_SHIPPED", True)


@pytest.mark.usefixtures("triton_present")
@pytest.mark.parametrize(
    ("device", "dtype", "d", "keys", "dropout", "ok"),
    [
        ("cuda", BF16, 32, 50, 0.0, True),
        ("cuda", F16, 64, 128, 0.0, True),
        ("cuda", BF16, 16, 1, 0.0, True),
        ("cuda", BF16, 128, 64, 0.0, True),
        ("cuda", BF16, 32, 129, 0.0, False),  # more keys than one tile
        ("cuda", BF16, 32, None, 0.0, False),  # keys unknown
        ("cuda", BF16, 32, 0, 0.0, False),
        ("cuda", BF16, 48, 50, 0.0, False),  # not a power-of-two head dim
        ("cuda", BF16, 8, 50, 0.0, False),
        ("cuda", F32, 32, 50, 0.0, False),  # half precision only
        ("cuda", BF16, 32, 50, 0.1, False),  # no dropout
        ("cpu", BF16, 32, 50, 0.0, False),
    ],
)
def test_supports(device: str, dtype: torch.dtype, d: int, keys: Any, dropout: float,
                  ok: bool) -> None:  # fmt: skip
    assert _short.supports(device, dtype, d, keys, dropout) is ok


def test_supports_needs_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_short, "_TRITON_SHIPPED", False)
    assert not _short.supports("cuda", BF16, 32, 50, 0.0)
    assert _short.available() is False


def test_rule_plans_short_where_it_serves_else_its_sdpa_backends() -> None:
    backend.set_kernel_table([SHORT_RULE])
    plan = decide("cuda", BF16, 32, padded=False, keys=50, short_ok=True)
    assert plan == AttentionPlan("short", sdpa_backends=("efficient", "flash"))
    fallback = decide("cuda", BF16, 32, padded=False, keys=50, short_ok=False)
    assert fallback == AttentionPlan("sdpa", sdpa_backends=("efficient", "flash"))
    # outside the rule, off CUDA, padded: the rule does not decide
    assert decide("cuda", BF16, 32, padded=False, keys=65, short_ok=True).kernel == "sdpa"
    assert decide("cuda", BF16, 64, padded=False, keys=50, short_ok=True).kernel == "sdpa"
    assert decide("cpu", BF16, 32, padded=False, keys=50, short_ok=True).kernel == "sdpa"
    padded = decide("cuda", BF16, 32, padded=True, keys=50, varlen_ok=True, short_ok=True)
    assert padded.kernel == "varlen"
    assert decide("cuda", BF16, 32, padded=False, keys=50, fused=False).kernel == "manual"


def test_rule_without_padded_field_leaves_padded_calls_to_the_policy() -> None:
    """A ``short`` rule matching padded calls too (``padded=None``) never sends them to the
    short kernel, which takes no mask: the default policy decides."""
    backend.set_kernel_table([KernelRule(kernel="short", head_dim=32)])
    kw: dict[str, Any] = {"varlen_ok": False, "flex_ok": False, "short_ok": True}
    assert decide("cuda", BF16, 32, padded=True, keys=50, **kw).kernel == "sdpa_mask"
    assert decide("cuda", BF16, 32, padded=False, keys=50, **kw).kernel == "short"


@pytest.mark.usefixtures("triton_present")
def test_decide_asks_supports_when_not_told(monkeypatch: pytest.MonkeyPatch) -> None:
    backend.set_kernel_table([SHORT_RULE])
    asked: list[tuple[Any, ...]] = []
    real = _short.supports

    def spy(*a: Any) -> bool:
        asked.append(a)
        return real(*a)

    monkeypatch.setattr(_short, "supports", spy)
    assert decide("cuda", BF16, 32, padded=False, keys=50).kernel == "short"
    assert asked == [("cuda", BF16, 32, 50, 0.0)]
    assert decide("cuda", BF16, 32, padded=False, keys=50, dropout_p=0.1).kernel == "sdpa"
    assert decide("cuda", F32, 32, padded=False, keys=50).kernel == "sdpa"


def test_kernel_rule_short_checks() -> None:
    with pytest.raises(ValueError, match="unpadded calls only; got padded=True"):
        KernelRule(kernel="short", padded=True)
    with pytest.raises(
        ValueError, match=r"one of \('varlen', 'segmented', 'flex', 'sdpa_mask', 'short'\)"
    ):
        KernelRule(kernel="fast")
    assert KernelRule(kernel="short", padded=False).kernel == "short"
    assert "short" in backend.PLAN_KERNELS
    assert AttentionPlan("short").kernel == "short"


def _qkv(b: int, h: int, n: int, m: int, d: int, dtype: torch.dtype = F32) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=dtype) for s in (n, m, m))


def test_fits_reads_the_call() -> None:
    q, k, v = _qkv(2, 3, 5, 7, 32, BF16)
    assert not _short.fits(q, k, v, 0.0)  # CPU tensors: never
    real = _short.supports
    with pytest.MonkeyPatch.context() as mp:  # the shape rules, the device taken as CUDA
        mp.setattr(_short, "_TRITON_SHIPPED", True)
        mp.setattr(_short, "supports", lambda _dev, *rest: real("cuda", *rest))
        assert _short.fits(q, k, v, 0.0)
        assert not _short.fits(q, k, v, 0.1)
        assert not _short.fits(q.float(), k, v, 0.0)  # mixed dtypes
        assert not _short.fits(q, k[..., :16], v[..., :16], 0.0)  # head dims differ
        assert not _short.fits(q, k[:1], v[:1], 0.0)  # batch differs
        assert not _short.fits(q, k, v[:, :, :3], 0.0)  # k and v lengths differ
        assert not _short.fits(q[0], k[0], v[0], 0.0)  # not [b, h, n, d]
        big = torch.zeros(2, 3, 129, 32, dtype=BF16)
        assert not _short.fits(q, big, big, 0.0)
        # offsets past int32 (the kernels' index type): a view spanning 2**31 elements
        mq, mk, mv = (t.to("meta") for t in (q, k, v))
        assert _short.fits(mq, mk, mv, 0.0)
        wide = torch.empty_strided((2, 3, 5, 32), (2**31, 0, 0, 0), device="meta",
                                   dtype=BF16)  # fmt: skip
        assert _short._span(wide) > 2**31 - 1 and not _short.fits(wide, mk, mv, 0.0)
        assert _short._span(q) == q.numel()


def test_attend_with_a_short_plan_falls_back_where_the_call_does_not_fit() -> None:
    """On the CPU (and for any call the kernel cannot take) a ``short`` plan runs SDPA,
    restricted to the plan's backends: the result equals plain SDPA."""
    q, k, v = _qkv(2, 3, 5, 7, 32)
    want = F.scaled_dot_product_attention(q, k, v)
    plan = AttentionPlan("short", sdpa_backends=("math",))
    got = _attend(q, k, v, None, dropout_p=0.0, fused=True, plan=plan)
    torch.testing.assert_close(got, want)
    # with padding, a short plan (made for other inputs) takes the always-valid masked path
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    got = _attend(q, k, v, pad, dropout_p=0.0, fused=True, plan=plan)
    keep = ~pad[:, None, None, :]
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_eager_false_keeps_the_short_kernel_to_compiled_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan from a rule with ``eager=False``: eager calls run SDPA on the rule's
    backends, calls traced by torch.compile the short kernel; ``eager=True`` (the field's
    default) runs it in both. The kernel itself is replaced by a recorder here."""
    q, k, v = _qkv(2, 3, 5, 7, 32)
    ran: list[str] = []

    def fake_short(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ran.append("short")
        return torch.zeros_like(q)

    monkeypatch.setattr(_short, "fits", lambda *a: True)
    monkeypatch.setattr(_short, "short_attention", fake_short)
    compiled_only = AttentionPlan("short", sdpa_backends=("math",), eager=False)
    got = _attend(q, k, v, None, dropout_p=0.0, fused=True, plan=compiled_only)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v))
    assert ran == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _attend(q, k, v, None, dropout_p=0.0, fused=True, plan=compiled_only).any()
    assert ran == ["short"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    both = AttentionPlan("short", sdpa_backends=("math",))
    assert both.eager is True
    assert not _attend(q, k, v, None, dropout_p=0.0, fused=True, plan=both).any()
    assert ran == ["short", "short"]


def test_rule_eager_field_reaches_the_plan_and_is_checked() -> None:
    kw: dict[str, Any] = {"short_ok": True}
    backend.set_kernel_table([KernelRule(kernel="short", head_dim=32, padded=False, eager=False)])
    assert decide("cuda", BF16, 32, padded=False, keys=50, **kw).eager is False
    backend.set_kernel_table([KernelRule(kernel="short", head_dim=32, padded=False)])
    assert decide("cuda", BF16, 32, padded=False, keys=50, **kw).eager is True
    # the default table: both short rules are compiled-only
    backend.set_kernel_table(None)
    shorts = [r for r in backend.kernel_table() if r.kernel == "short"]
    assert len(shorts) == 2 and not any(r.eager for r in shorts)
    with pytest.raises(TypeError, match="KernelRule eager must be a bool, got 0"):
        KernelRule(kernel="short", eager=0)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"eager=False applies to kernel \('short', 'segmented'\) only"
    ):
        KernelRule(kernel="varlen", eager=False)
    with pytest.raises(
        ValueError, match=r"eager=False applies to kernel \('short', 'segmented'\) only"
    ):
        KernelRule(head_dim=32, eager=False)
    with pytest.raises(TypeError, match="AttentionPlan eager must be a bool"):
        AttentionPlan("short", eager=None)  # type: ignore[arg-type]


def test_models_under_a_short_rule_run_on_the_cpu() -> None:
    """A stack planning with a short rule on the CPU: nothing changes (the rule is for
    CUDA), so the default-table models keep their results."""
    backend.set_kernel_table([SHORT_RULE])
    torch.manual_seed(0)
    dec = cm.CrossMAEDecoder(64, 64, 1, 2, 6, num_tokens=196).eval()
    ctx = torch.randn(2, 50, 64)
    ids = torch.arange(49).expand(2, 49)
    got = dec(ctx, ids)
    backend.set_kernel_table(())
    torch.testing.assert_close(got, dec(ctx, ids))


def test_fake_implementation_shapes_and_layout() -> None:
    """The op's fake (meta) outputs, what torch.compile plans memory with: ``[b, h, n, d]``
    over ``[b, n, h, d]`` memory, a float32 log-sum-exp, gradients laid out like the
    forward's output; no kernel (and no triton) is needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 32, dtype=BF16)
        k = torch.empty(2, 3, 7, 32, dtype=BF16)
        o, lse = torch.ops.crossmae.short_attention(q, k, k, 0.5)
        assert o.shape == (2, 3, 5, 32) and o.dtype == BF16
        assert o.transpose(1, 2).is_contiguous()
        assert lse.shape == (6, 5) and lse.dtype == F32
        dq, dk, dv = torch.ops.crossmae.short_attention_backward(q, k, k, o, o, lse, 0.5)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
        assert dk.transpose(1, 2).is_contiguous()


def test_short_plan_traces_in_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning with a short rule inside a compiled function: no graph break."""
    monkeypatch.setattr(_short, "_TRITON_SHIPPED", True)
    backend.set_kernel_table([SHORT_RULE])

    def f(x: torch.Tensor) -> torch.Tensor:
        plan = backend.decide("cuda", BF16, 32, padded=False, keys=50)
        return x * 2 if plan.kernel == "short" else x

    x = torch.randn(3)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), x * 2)


_INTERPRET = """
import math, torch
from crossmae.layers import _short
cases = [(2, 3, 147, 50, 32, torch.float16, True), (1, 2, 50, 50, 64, torch.float16, True),
         (2, 1, 5, 1, 16, torch.float16, False), (1, 2, 70, 128, 32, torch.float32, False),
         (1, 1, 33, 17, 128, torch.float16, False)]
worst = 0.0
for b, h, n, m, d, dt, fused_qkv in cases:
    g = torch.Generator().manual_seed(0)
    if fused_qkv:  # strided views of one [b, n, 3, h, d] projection, as the models pass
        buf = torch.randn(b, n, 3, h, d, generator=g, dtype=dt)
        q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))
        m = n
    else:
        q = torch.randn(b, h, n, d, generator=g, dtype=dt)
        k, v = (torch.randn(b, h, m, d, generator=g, dtype=dt) for _ in range(2))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = _short.short_attention(q, k, v)
    assert o.shape == (b, h, n, d) and o.dtype == dt
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.softmax(r[0] @ r[1].transpose(-1, -2) / math.sqrt(d), -1) @ r[2]
    gout = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (want * gout).sum().backward()
    (o.double() * gout).sum().backward()
    errs = [(o.double() - want).abs().max()] + [
        (a.grad.double() - x.grad).abs().max() / x.grad.abs().max().clamp_min(1)
        for a, x in zip((q, k, v), r)]
    worst = max(worst, max(float(e) for e in errs))
    # the custom op (what torch.compile sees) gives the eager path's results exactly
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    o2 = _short._short_attention(q2, k2, v2, 1 / math.sqrt(d))[0]
    (o2.double() * gout).sum().backward()
    assert torch.equal(o2, o) and o2.stride() == o.stride()
    assert all(torch.equal(a.grad, c.grad) for a, c in zip((q, k, v), (q2, k2, v2)))
print(worst)
"""


def test_kernels_in_triton_s_interpreter() -> None:
    """The Triton kernels themselves, on the CPU (``TRITON_INTERPRET=1``), against a
    float64 softmax: output and the three input gradients, strided inputs, one key, 128
    keys, head dims 16 to 128, float16 and float32; the custom op (what torch.compile
    sees) and the eager autograd function agree exactly. Needs ``triton`` (not a dependency of
    crossmae: the CUDA tests run the same kernels compiled)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_INTERPRET)],
        capture_output=True, text=True, timeout=600, check=True, env=env, cwd=root,
    )  # fmt: skip
    worst = float(out.stdout.strip().splitlines()[-1])
    assert math.isfinite(worst) and worst < 5e-3, out.stdout
