"""The ``flex_attention`` fallback of the CUDA fast path, checked on CPU.

Three layers of evidence, none needing a GPU:

* the block masks built from padding flags / segment boundaries are decoded back into an
  element-level mask with a slow loop (test only) and compared with the intended mask:
  every listed block is right, no needed block is missing, "full" blocks are truly full;
* ``flex_attention`` itself, eager (a dense reference) and compiled by inductor for the CPU
  (the real block-sparse kernel), against crossmae's explicit-softmax path;
* the dispatcher: its policy table, the process-wide switch and its validation, and the
  modules forced onto the flex route (NaN in padded slots, samples without keys).

The CPU build of flex_attention has no backward; gradients are checked by
``benchmarks/gpu_check.py`` on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossmae as cm
from crossmae.layers import _flex, attention
from tests.strategies import generator, seeds

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
B = _flex.BLOCK


@pytest.fixture(autouse=True)
def _quiet_eager_flex() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        yield


@pytest.fixture(autouse=True)
def _restore_kernel_choice() -> Iterator[None]:
    before = cm.padded_attention_kernel()
    yield
    cm.set_padded_attention_kernel(before)


def decode(bm: object, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-level ``allowed [b n m]`` of a BlockMask, and ``full_ok``: whether every block
    listed as full really needs no mask (the mask_mod is True on all of it)."""
    kv_num, kv_idx = bm.kv_num_blocks, bm.kv_indices  # type: ignore[attr-defined]
    full_num, full_idx = bm.full_kv_num_blocks, bm.full_kv_indices  # type: ignore[attr-defined]
    mask_mod = bm.mask_mod  # type: ignore[attr-defined]
    b, _, q_blocks = kv_num.shape
    allowed = torch.zeros(b, n, m, dtype=torch.bool)
    full_ok = True
    for bi in range(b):
        for qi in range(q_blocks):
            rows = torch.arange(qi * B, min((qi + 1) * B, n))
            partial = kv_idx[bi, 0, qi, : kv_num[bi, 0, qi]].tolist()
            full = full_idx[bi, 0, qi, : full_num[bi, 0, qi]].tolist()
            assert not set(partial) & set(full), "a block listed as partial and full"
            assert len(set(partial)) == len(partial) and len(set(full)) == len(full)
            for j in partial + full:
                cols = torch.arange(j * B, min((j + 1) * B, m))
                if len(rows) == 0 or len(cols) == 0:
                    continue
                mod = mask_mod(torch.tensor(bi), torch.tensor(0), rows[:, None], cols[None, :])
                if j in full:
                    full_ok &= bool(mod.all())
                    allowed[bi, rows[:, None], cols[None, :]] = True
                else:
                    allowed[bi, rows[:, None], cols[None, :]] = mod
    return allowed, torch.tensor(full_ok)


@st.composite
def padding_cases(draw):  # type: ignore[no-untyped-def]
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 300))
    m = draw(st.integers(1, 420))
    kind = draw(st.sampled_from(["random", "trailing", "blocks", "empty", "none"]))
    return b, n, m, kind, draw(seeds())


def make_padding(b: int, m: int, kind: str, seed: int) -> torch.Tensor:
    g = generator(seed)
    if kind == "random":
        pad = torch.rand(b, m, generator=g) < torch.rand(b, 1, generator=g)
    elif kind == "trailing":
        lengths = torch.randint(0, m + 1, (b, 1), generator=g)
        pad = torch.arange(m)[None, :] >= lengths
    elif kind == "blocks":  # whole aligned blocks of padding next to whole real blocks
        pad = (torch.arange(m)[None, :] // B % 2 == 1).expand(b, m).clone()
        pad[:, : min(m, 5)] = True
    elif kind == "empty":
        pad = torch.ones(b, m, dtype=torch.bool)
    else:
        pad = torch.zeros(b, m, dtype=torch.bool)
    return pad


@settings(max_examples=25)
@given(padding_cases())
def test_padding_block_mask_decodes_to_the_real_keys(case) -> None:  # type: ignore[no-untyped-def]
    b, n, m, kind, seed = case
    pad = make_padding(b, m, kind, seed)
    bm = _flex.padding_block_mask(pad, n)
    allowed, full_ok = decode(bm, n, m)
    assert bool(full_ok), "a block listed as full holds padding"
    assert torch.equal(allowed, (~pad)[:, None, :].expand(b, n, m))
    # block sparsity: a block with no real key is never visited
    real_blocks = (~torch.nn.functional.pad(pad, (0, -m % B), value=True)).view(b, -1, B).any(2)
    visited = bm.kv_num_blocks[:, 0, 0] + bm.full_kv_num_blocks[:, 0, 0]
    assert torch.equal(visited.long(), real_blocks.sum(1))


@st.composite
def segment_cases(draw):  # type: ignore[no-untyped-def]
    lengths = draw(
        st.lists(
            st.one_of(st.integers(0, 5), st.integers(100, 300), st.sampled_from([B, 2 * B])),
            min_size=1,
            max_size=5,
        )
    )
    if sum(lengths) == 0:
        lengths[0] = 1
    return lengths


@settings(max_examples=25)
@given(segment_cases(), st.sampled_from([torch.int32, torch.int64]))
def test_segment_block_mask_decodes_to_block_diagonal(lengths, dtype) -> None:  # type: ignore[no-untyped-def]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(dtype)
    t = int(cu[-1])
    bm = _flex.segment_block_mask(cu, t)
    allowed, full_ok = decode(bm, t, t)
    assert bool(full_ok), "a block listed as full crosses a segment boundary"
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    assert torch.equal(allowed[0], seg[:, None] == seg[None, :])


@given(padding_cases(), st.booleans())
def test_flex_attend_matches_explicit_softmax(case, self_attn: bool) -> None:  # type: ignore[no-untyped-def]
    b, n, m, kind, seed = case
    if self_attn:
        m = n
    pad = make_padding(b, m, kind, seed)
    g = generator(seed)
    q = torch.randn(b, 2, n, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, 2, m, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k0, v0 = (a.masked_fill(pad[:, None, :, None], 0.0) for a in (k, v))
    out = _flex.flex_attend(q, k0, v0, pad, kernel=flex_attention)
    ref = cm.padded_attention(q, k, v, pad, fused=False)
    has_keys = ~pad.all(1)
    torch.testing.assert_close(out[has_keys], ref[has_keys])
    assert out.isfinite().all()


def test_compiled_cpu_kernel_is_block_sparse_and_exact() -> None:
    """inductor's CPU flex kernel walks the block lists (a wrong list gives wrong numbers)."""
    g = generator(11)
    b, n, m = 4, 130, 300
    pad = torch.rand(b, m, generator=g) < 0.5
    pad[1] = True  # no key at all
    pad[2, :256] = True  # a single real key in the last block
    pad[2, 260] = False
    pad[3] = True
    pad[3, B : 2 * B] = False  # one full block only
    q = torch.randn(b, 2, n, 16, generator=g)
    k, v = (torch.randn(b, 2, m, 16, generator=g) for _ in range(2))
    k[pad[:, None, :, None].expand_as(k)] = float("nan")  # the caller zeroes padded slots
    k0, v0 = (a.masked_fill(pad[:, None, :, None], 0.0) for a in (k, v))
    out = _flex.flex_attend(q, k0, v0, pad, kernel=_flex.compiled_flex())
    ref = cm.padded_attention(q, k, v, pad, fused=False)
    has_keys = ~pad.all(1)
    torch.testing.assert_close(out[has_keys], ref[has_keys], atol=2e-6, rtol=2e-5)
    # packed rows with segments that straddle blocks, an empty segment and whole blocks
    lengths = [5, 300, 0, 129, 128, 2]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    t = int(cu[-1])
    qp, kp, vp = (torch.randn(t, 2, 16, generator=g) for _ in range(3))
    out_p = _flex.flex_packed(qp, kp, vp, cu, kernel=_flex.compiled_flex())
    ref_p = cm.packed_attention(qp, kp, vp, cu, max(lengths), fused=False)
    torch.testing.assert_close(out_p, ref_p, atol=2e-6, rtol=2e-5)


def _policy(monkeypatch: pytest.MonkeyPatch, varlen_ok: bool, flex_ok: bool) -> None:
    monkeypatch.setattr(attention, "can_use_varlen", lambda q, p: varlen_ok)
    monkeypatch.setattr(attention, "can_use_flex", lambda q, p: flex_ok)


@pytest.mark.parametrize(
    ("choice", "dtype", "varlen_ok", "flex_ok", "expected"),
    [
        ("auto", torch.bfloat16, True, True, "varlen"),
        ("auto", torch.bfloat16, False, True, "flex"),
        ("auto", torch.float16, False, False, "sdpa"),
        ("auto", torch.float32, False, True, "sdpa"),  # fp32: no compile behind the user's back
        ("varlen", torch.bfloat16, True, True, "varlen"),
        ("varlen", torch.bfloat16, False, True, "sdpa"),
        ("flex", torch.bfloat16, True, True, "flex"),
        ("flex", torch.float32, True, True, "flex"),
        ("flex", torch.bfloat16, True, False, "sdpa"),
        ("sdpa", torch.bfloat16, True, True, "sdpa"),
    ],
)
def test_kernel_policy(
    monkeypatch: pytest.MonkeyPatch,
    choice: str,
    dtype: torch.dtype,
    varlen_ok: bool,
    flex_ok: bool,
    expected: str,
) -> None:
    _policy(monkeypatch, varlen_ok, flex_ok)
    cm.set_padded_attention_kernel(choice)
    assert cm.padded_attention_kernel() == choice
    q = torch.zeros(1, 1, 2, 16, dtype=dtype)
    assert attention.select_padded_kernel(q, 0.0) == expected


def test_cpu_never_takes_a_cuda_kernel() -> None:
    q = torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)
    assert not _flex.can_use_flex(q, 0.0)
    for choice in cm.PADDED_ATTENTION_KERNELS:
        cm.set_padded_attention_kernel(choice)
        assert attention.select_padded_kernel(q, 0.0) == "sdpa"


def test_can_use_flex_head_dims_and_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeCuda:
        is_cuda = True
        dtype = torch.bfloat16

        def __init__(self, d: int) -> None:
            self.shape = (1, 1, 4, d)

    ok = [_flex.can_use_flex(FakeCuda(d), 0.0) for d in (8, 16, 24, 32, 64, 128, 256, 512)]  # type: ignore[arg-type]
    assert ok == [False, True, False, True, True, True, True, False]
    assert not _flex.can_use_flex(FakeCuda(64), 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (1, TypeError, "kernel must be a str"),
        (None, TypeError, "kernel must be a str"),
        ("Flex", ValueError, "'Flex'"),
        ("math", ValueError, "'math'"),
    ],
)
def test_set_kernel_rejects_bad_input(bad: object, error: type, words: str) -> None:
    before = cm.padded_attention_kernel()
    with pytest.raises(error, match=words):
        cm.set_padded_attention_kernel(bad)  # type: ignore[arg-type]
    assert cm.padded_attention_kernel() == before


def test_set_kernel_refuses_a_kernel_this_torch_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from crossmae.layers import _varlen

    monkeypatch.setattr(_flex, "flex_available", lambda: False)
    monkeypatch.setattr(_varlen, "varlen_available", lambda: False)
    with pytest.raises(ValueError, match=r"kernel='flex' needs .*torch >= 2\.5"):
        cm.set_padded_attention_kernel("flex")
    with pytest.raises(ValueError, match=r"kernel='varlen' needs .*torch >= 2\.10"):
        cm.set_padded_attention_kernel("varlen")
    cm.set_padded_attention_kernel("sdpa")  # always there


def test_environment_variable_sets_and_is_checked() -> None:
    code = "import crossmae; print(crossmae.padded_attention_kernel())"
    env = dict(os.environ, CROSSMAE_PADDED_KERNEL="sdpa")
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "sdpa", ok.stderr
    env["CROSSMAE_PADDED_KERNEL"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "CROSSMAE_PADDED_KERNEL" in bad.stderr and "'fastest'" in bad.stderr


@pytest.mark.parametrize("self_attn", [False, True])
def test_modules_forced_onto_flex_agree(monkeypatch: pytest.MonkeyPatch, self_attn: bool) -> None:
    """CrossAttentionBlock (optionally with self-attention) dispatched to the flex route
    (eager kernel): NaN in padded context slots, a sample without keys. Packed attention
    stays off flex even then (its partial blocks would spread a NaN between segments)."""
    calls: list[int] = []

    def kernel(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return flex_attention(*args, **kwargs)

    g = generator(5)
    block = cm.CrossAttentionBlock(32, 24, 2, self_attn=self_attn).eval()
    x = torch.randn(3, 5, 32, generator=g)
    ctx = torch.randn(3, 7, 24, generator=g)
    cpad = torch.tensor([[False] * 7, [False, True] * 3 + [True], [True] * 7])
    ctx[cpad] = float("nan")
    qpad = torch.tensor([[False] * 5, [False, True, False, True, True], [False] * 5])
    with torch.no_grad():
        ref = block(x, ctx, cpad, qpad)
        monkeypatch.setattr(attention, "select_padded_kernel", lambda q, p: "flex")
        monkeypatch.setattr(_flex, "compiled_flex", lambda: kernel)
        out = block(x, ctx, cpad, qpad)
        block_calls = len(calls)
        cu = torch.tensor([0, 3, 3, 10])
        qkv = torch.randn(3, 10, 2, 16, generator=g)
        qkv[:, 0] = float("nan")  # a NaN in the first segment's first row
        packed = cm.packed_attention(*qkv, cu, 7)
    assert block_calls >= 1, "the flex route was not taken"
    assert len(calls) == block_calls, "packed attention must not take the flex route"
    assert packed[3:].isfinite().all(), "a NaN left its segment"
    real = ~qpad
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert out.isfinite().all()
    torch.testing.assert_close(
        packed[3:], cm.packed_attention(*qkv, cu, 7, fused=False)[3:], atol=1e-6, rtol=1e-6
    )


def test_flex_route_traces_as_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile(fullgraph=True) the block mask is built in the graph and the plain
    flex_attention is traced (no nested compile, no graph break)."""
    g = generator(9)
    attn = cm.CrossAttention(32, num_heads=2).eval()
    x = torch.randn(2, 5, 32, generator=g)
    ctx = torch.randn(2, 140, 32, generator=g)
    cpad = torch.rand(2, 140, generator=g) < 0.5
    cpad[1] = True
    explicit = cm.CrossAttention(32, num_heads=2, fused_attn=False).eval()
    explicit.load_state_dict(attn.state_dict())

    def nested_compile(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the process-wide compiled flex was called while tracing")

    monkeypatch.setattr(attention, "select_padded_kernel", lambda q, p: "flex")
    monkeypatch.setattr(_flex, "_COMPILED", nested_compile)
    with torch.no_grad():
        ref = explicit(x, ctx, cpad)
        compiled = torch.compile(attn, fullgraph=True, backend="eager")
        out = compiled(x, ctx, cpad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]) + attn.proj.bias)  # no key: 0 @ W + b
