"""The default kernel table on CUDA: every rule's SDPA backend runs where the table sends
it (kernel names from the profiler) and gives the explicit-softmax float32 results,
forward and input gradients, eager and compiled.

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).

Legend: ``b`` batch, ``n`` tokens, ``m`` keys, ``p`` queries, ``c`` width.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any, Callable

import pytest
import torch
from gpu_helpers import DEVICE, FWD_TOL, GPU, GRAD_TOL, rel_err
from torch import nn

import crossmae as cm
from crossmae.decoders import CrossMAEDecoder, MAEDecoder
from crossmae.encoders import TransformerEncoder
from crossmae.layers import _short, backend

pytestmark = GPU

DEV_TYPE = torch.device(DEVICE).type
BF16 = torch.bfloat16
# kernel-name fragments of the SDPA backends in the profiler's CUDA kernel list
KERNEL_NAMES = {"efficient": "fmha_cutlass", "cudnn": "cudnn", "flash": "flash"}


def _encoder(dim: int, fused: bool) -> nn.Module:
    return TransformerEncoder(dim, 1, 2, fused_attn=fused)


def _mae(fused: bool) -> nn.Module:
    return MAEDecoder(64, 64, 1, 2, 6, num_tokens=197, fused_attn=fused)


def _cross(fused: bool) -> nn.Module:
    return CrossMAEDecoder(64, 64, 1, 2, 6, num_tokens=196, fused_attn=fused)


def _run(kind: str, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if kind == "encoder":
        return mod(x).tokens  # type: ignore[no-any-return]
    b = x.shape[0]
    g = torch.Generator().manual_seed(3)
    if kind == "mae":  # 50 visible of 197, all 147 others predicted
        order = torch.rand(b, 197, generator=g).argsort(1).to(x.device)
        keep, pred = order[:, :50], order[:, 50:].sort(1).values
        return mod(x, keep, pred)  # type: ignore[no-any-return]
    ids = torch.rand(b, 196, generator=g).argsort(1)[:, :49].sort(1).values.to(x.device)
    return mod(x, ids)  # type: ignore[no-any-return]


# (name, builder, kind, tokens of x, the backend the default table sends the eager call to;
# its short rules are compiled-only, so eager calls of their shapes run memory-efficient)
CASES: list[tuple[str, Callable[[bool], nn.Module], str, int, str]] = [
    ("encoder d32 n50", lambda f: _encoder(64, f), "encoder", 50, "efficient"),
    ("encoder d32 n197", lambda f: _encoder(64, f), "encoder", 197, "cudnn"),
    ("encoder d64 n50", lambda f: _encoder(128, f), "encoder", 50, "efficient"),
    ("MAE decoder d32 197x197", _mae, "mae", 50, "cudnn"),
    ("CrossMAE decoder d32 49x50", _cross, "cross", 50, "efficient"),
]


def _pair(build: Callable[[bool], nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fused = build(True).to(DEVICE).train()
    ref = build(False).to(DEVICE).train()
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _input(n: int, c: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, n, c, generator=g).to(DEVICE).requires_grad_()


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, amp: bool) -> Any:
    x.grad = None
    with torch.autocast(DEV_TYPE, dtype=BF16, enabled=amp):
        out = fn(x)
    out.float().square().mean().backward()
    assert x.grad is not None
    return out.detach().float(), x.grad.detach().clone()


@pytest.mark.parametrize(
    ("name", "build", "kind", "n", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_default_rule_runs_its_backend_and_matches_explicit_softmax(
    name: str,
    build: Callable[[bool], nn.Module],
    kind: str,
    n: int,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend.set_kernel_table(None)
    fused, ref = _pair(build)
    c = 64 if kind != "encoder" else fused.dim  # type: ignore[attr-defined]
    x = _input(n, c)
    asked: list[Any] = []
    real_context = backend.sdpa_context

    def recording(backends: Any) -> Any:
        asked.append(backends)
        return real_context(backends)

    monkeypatch.setattr(backend, "sdpa_context", recording)
    want, want_grad = _fwd_bwd(lambda t: _run(kind, ref, t), x, amp=False)
    if DEV_TYPE == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got, got_grad = _fwd_bwd(lambda t: _run(kind, fused, t), x, amp=True)
        names = [e.name for e in prof.events() if str(e.device_type).endswith("CUDA")]
        assert asked and all(a is not None and a[0] == expected for a in asked), asked
        assert any(KERNEL_NAMES[expected] in k for k in names), (
            f"{name}: no {expected} kernel among {sorted(set(names))[:40]}"
        )
    else:  # the CPU dry run: no rule applies off CUDA
        got, got_grad = _fwd_bwd(lambda t: _run(kind, fused, t), x, amp=True)
        assert asked == []
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    assert rel_err(got, want) < FWD_TOL[BF16], name
    assert rel_err(got_grad, want_grad) < GRAD_TOL[BF16], name


def test_compiled_mae_decoder_under_the_table_equals_eager() -> None:
    """The MAE decoder plans inside its compiled graph: the cuDNN rule (197 keys at head
    dim 32) traces, and the compiled step equals the eager one."""
    backend.set_kernel_table(None)
    torch._dynamo.reset()
    fused, _ = _pair(_mae)
    x = _input(50, 64)
    want, want_grad = _fwd_bwd(lambda t: _run("mae", fused, t), x, amp=True)
    compiled = torch.compile(fused, fullgraph=True)
    got, got_grad = _fwd_bwd(lambda t: _run("mae", compiled, t), x, amp=True)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_grad, want_grad, atol=2e-3, rtol=5e-2)
    assert cm.DEFAULT_KERNEL_TABLE == backend.kernel_table()


@pytest.mark.parametrize("kind", ["encoder", "cross"])
def test_compiled_models_run_the_short_kernel_under_the_default_table(kind: str) -> None:
    """Compiled, the default table's compiled-only short rules send the ViT encoder over
    50 tokens (head dim 64) and the CrossMAE decoder (49 x 50, head dim 32) to crossmae's
    Triton kernels (no SDPA kernel in the profile), matching the explicit softmax."""
    if DEV_TYPE != "cuda" or not _short.available():
        pytest.skip("the short kernel needs CUDA and triton")
    backend.set_kernel_table(None)
    torch._dynamo.reset()
    fused, ref = _pair(_cross if kind == "cross" else (lambda f: _encoder(128, f)))
    x = _input(50, 64 if kind == "cross" else 128)
    want, want_grad = _fwd_bwd(lambda t: _run(kind, ref, t), x, amp=False)
    compiled = torch.compile(fused, fullgraph=True)
    _fwd_bwd(lambda t: _run(kind, compiled, t), x, amp=True)  # compiles outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got, got_grad = _fwd_bwd(lambda t: _run(kind, compiled, t), x, amp=True)
    names = {e.name for e in prof.events() if str(e.device_type).endswith("CUDA")}
    assert any(n.startswith("_fwd") for n in names) and any(n.startswith("_bwd") for n in names)
    assert not any(KERNEL_NAMES[b] in n for b in ("efficient", "cudnn", "flash") for n in names)
    assert rel_err(got, want) < FWD_TOL[BF16] and rel_err(got_grad, want_grad) < GRAD_TOL[BF16]
    torch._dynamo.reset()


_FIRST_CALL = """
import torch
import crossmae as cm
from crossmae.encoders import TransformerEncoder

# an efficient-first SDPA rule (the default table sends this shape to crossmae's own kernel)
cm.set_kernel_table([cm.KernelRule(head_dim=32, max_keys=64, padded=False,
                                   sdpa_backends=("efficient", "flash", "cudnn"))])
enc = TransformerEncoder(64, 1, 2).cuda()
x = torch.randn(8, 50, 64, device="cuda", requires_grad=True)
acts = [torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=acts) as prof:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = enc(x).tokens
    out.float().sum().backward()
    torch.cuda.synchronize()
names = {e.name for e in prof.events() if str(e.device_type).endswith("CUDA")}
print("efficient" if any("fmha_cutlass" in n for n in names) else sorted(names))
q = torch.randn(1, 1, 8, 32, device="cuda", dtype=torch.bfloat16)
torch.nn.functional.scaled_dot_product_attention(q, q, q)
print(list(torch._C._get_sdp_priority_order()))
"""

_BARE = """
import torch
q = torch.randn(1, 1, 8, 32, device="cuda", dtype=torch.bfloat16)
torch.nn.functional.scaled_dot_product_attention(q, q, q)
print(list(torch._C._get_sdp_priority_order()))
"""


@pytest.mark.skipif(DEV_TYPE != "cuda", reason="a fresh CUDA process")
def test_first_call_of_a_process_follows_the_table_and_keeps_torch_s_order() -> None:
    """In a fresh process the very first SDPA call, inside the table's efficient-first
    context, runs the memory-efficient kernel (PyTorch picks its default order lazily at the
    first selection and used to write it over the context's), and PyTorch's own priority
    order afterwards is the one a process without crossmae gets."""

    def run(code: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return out.stdout.strip().splitlines()

    first = run(_FIRST_CALL)
    bare = run(_BARE)
    assert first[0] == "efficient", first[0]
    assert first[-1] == bare[-1]
