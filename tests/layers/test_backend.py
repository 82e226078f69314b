"""The attention backend (crossmae.layers.backend): the policy table, the per-shape kernel
table, the plan handed from a stack to its blocks, and every kernel path on the CPU.

The CUDA kernels do not run here: the decision is tested from plain values (fake device
type and dtype), and the varlen / flex routes run on the CPU through a reference segment
kernel and the eager ``flex_attention`` (the same logic around the kernel as on CUDA).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

import crossmae as cm
from crossmae.decoders import CrossMAEDecoder
from crossmae.encoders import TransformerEncoder
from crossmae.layers import _flex, _segmented, _varlen, backend
from crossmae.layers.backend import AttentionPlan, KernelRule, decide
from tests.layers.test_varlen import reference_varlen
from tests.strategies import generator

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    backend.set_kernel_table(None)
    cm.set_padded_attention_kernel("auto")


@pytest.mark.parametrize(
    ("device", "dtype", "d", "padded", "layout", "kernel", "reorder"),
    [
        ("cuda", BF16, 64, True, "padded", "varlen", True),
        ("cuda", F16, 32, True, "padded", "varlen", True),
        ("cuda", BF16, 16, True, "padded", "varlen", True),
        ("cuda", BF16, 24, True, "padded", "varlen", True),  # a multiple of 8: flash head dim
        ("cuda", F32, 64, True, "padded", "sdpa_mask", False),  # the fix: no reordering in fp32
        ("cuda", F64, 64, True, "padded", "sdpa_mask", False),
        ("cuda", BF16, 12, True, "padded", "sdpa_mask", False),  # neither kernel takes d=12
        ("cuda", BF16, 512, True, "padded", "sdpa_mask", False),
        ("cuda", BF16, 64, False, "padded", "sdpa", False),
        ("cuda", F32, 64, False, "padded", "sdpa", False),
        ("cpu", BF16, 64, True, "padded", "sdpa_mask", False),
        ("cpu", F32, 64, False, "padded", "sdpa", False),
        ("cpu", F64, 8, True, "padded", "sdpa_mask", False),
        ("cuda", BF16, 64, True, "packed", "varlen", False),
        # no dense [t, t] mask, and no flex either: its partial blocks spread a NaN between
        # samples (0 * NaN), measured on the H200
        ("cuda", F32, 64, True, "packed", "dense", False),
        ("cuda", BF16, 12, True, "packed", "dense", False),
        ("cpu", BF16, 64, True, "packed", "dense", False),
        ("cpu", F32, 64, True, "packed", "dense", False),
    ],
)
def test_policy_table(
    device: str, dtype: torch.dtype, d: int, padded: bool, layout: str, kernel: str, reorder: bool
) -> None:
    if (kernel == "varlen" and not _varlen.varlen_available()) or (
        kernel == "flex" and not _flex.flex_available()
    ):
        pytest.skip("this torch build lacks the kernel")
    plan = decide(device, dtype, d, padded=padded, layout=layout)
    assert plan.kernel == kernel
    assert plan.reorder is reorder
    assert not plan.trailing
    assert plan.reordered().trailing and not plan.reordered().reorder


def test_policy_choice_dropout_and_unfused() -> None:
    assert decide("cuda", BF16, 64, padded=True, fused=False).kernel == "manual"
    assert decide("cuda", BF16, 64, padded=False, fused=False).kernel == "manual"
    # attention dropout: neither packed kernel takes it
    assert decide("cuda", BF16, 64, padded=True, dropout_p=0.1).kernel == "sdpa_mask"
    assert decide("cuda", BF16, 64, padded=True, choice="sdpa").kernel == "sdpa_mask"
    flex = decide("cuda", BF16, 64, padded=True, choice="flex", flex_ok=True)
    assert (flex.kernel, flex.reorder) == ("flex", False)
    assert decide("cuda", F32, 64, padded=True, choice="flex", flex_ok=True).kernel == "flex"
    no_varlen = decide("cuda", BF16, 64, padded=True, varlen_ok=False, flex_ok=True)
    assert no_varlen.kernel == "flex"
    assert decide("cuda", F32, 64, padded=True, varlen_ok=False, flex_ok=True).kernel == (
        "sdpa_mask"  # float32: no compile behind the user's back on the padded layout
    )
    packed = decide("cuda", BF16, 64, padded=True, layout="packed", choice="sdpa")
    assert packed.kernel == "dense"
    with pytest.raises(ValueError, match="layout"):
        decide("cuda", BF16, 64, padded=True, layout="ragged")


def test_varlen_missing_falls_back_to_flex_padded_and_segments_packed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_varlen, "varlen_available", lambda: False)
    monkeypatch.setattr(_flex, "flex_available", lambda: True)
    assert decide("cuda", BF16, 64, padded=True).kernel == "flex"
    assert decide("cuda", BF16, 64, padded=True, layout="packed").kernel == "dense"


def test_kernel_table_rules() -> None:
    backend.set_kernel_table(
        [
            KernelRule(kernel="sdpa_mask", head_dim=16, min_keys=4096),
            KernelRule(sdpa_backends=("cudnn", "flash"), head_dim=32, padded=False),
            KernelRule(kernel="flex", head_dim=128),
        ]
    )
    assert len(backend.kernel_table()) == 3
    kw: dict[str, Any] = {"varlen_ok": True, "flex_ok": True}
    assert decide("cuda", BF16, 16, padded=True, keys=7892, **kw).kernel == "sdpa_mask"
    assert decide("cuda", BF16, 16, padded=True, keys=100, **kw).kernel == "varlen"
    assert decide("cuda", BF16, 16, padded=True, **kw).kernel == "varlen"  # keys unknown
    plan = decide("cuda", BF16, 32, padded=False, **kw)
    assert (plan.kernel, plan.sdpa_backends) == ("sdpa", ("cudnn", "flash"))
    assert decide("cuda", BF16, 32, padded=True, **kw).kernel == "varlen"
    assert decide("cuda", BF16, 128, padded=True, **kw).kernel == "flex"
    # a rule's kernel that cannot serve the call, an explicit choice, and the CPU: default
    assert decide("cuda", BF16, 128, padded=True, varlen_ok=True, flex_ok=False).kernel == (
        "varlen"
    )
    assert decide("cuda", BF16, 128, padded=True, choice="sdpa", **kw).kernel == "sdpa_mask"
    assert decide("cpu", BF16, 32, padded=False, **kw).sdpa_backends is None
    backend.set_kernel_table(())
    assert decide("cuda", BF16, 16, padded=True, keys=7892, **kw).kernel == "varlen"


def test_default_table_by_head_dim_and_key_count() -> None:
    """The three default rules (measured on the H200), unpadded only: head dim 32 over at
    most 64 keys and head dim 64 over at most 64 keys to the short-key Triton kernel (else
    the memory-efficient kernel first); head dim 32 over 65 to 256 keys (the MAE
    decoder's 197) to cuDNN."""
    assert backend.kernel_table() == cm.DEFAULT_KERNEL_TABLE == backend.DEFAULT_KERNEL_TABLE
    kw: dict[str, Any] = {"varlen_ok": True, "flex_ok": True, "short_ok": True}
    short = decide("cuda", BF16, 32, padded=False, keys=50, **kw)
    # compiled-only: eager calls of these shapes run the memory-efficient kernel
    assert short == AttentionPlan(
        "short", sdpa_backends=("efficient", "flash", "cudnn"), eager=False
    )
    # where the short kernel cannot run (no triton, float32, dropout): those backends
    no_short = decide("cuda", BF16, 32, padded=False, keys=50, **{**kw, "short_ok": False})
    assert no_short == AttentionPlan("sdpa", sdpa_backends=("efficient", "flash", "cudnn"))
    assert decide("cuda", BF16, 64, padded=False, keys=50, **{**kw, "short_ok": False}) == (
        no_short
    )
    assert decide("cuda", BF16, 32, padded=False, keys=64, **kw) == short
    mid = AttentionPlan("sdpa", sdpa_backends=("cudnn", "flash", "efficient"))
    for keys in (65, 197, 256):
        assert decide("cuda", BF16, 32, padded=False, keys=keys, **kw) == mid
    # outside the rules: PyTorch's own choice
    assert decide("cuda", BF16, 32, padded=False, keys=257, **kw).sdpa_backends is None
    assert decide("cuda", BF16, 32, padded=False, **kw).sdpa_backends is None  # keys unknown
    assert decide("cuda", BF16, 64, padded=False, keys=50, **kw) == short  # the ViT-B encoder
    assert decide("cuda", BF16, 64, padded=False, keys=64, **kw) == short
    for keys in (65, 197):  # not measured at head dim 64: no rule
        assert decide("cuda", BF16, 64, padded=False, keys=keys, **kw).sdpa_backends is None
    for d in (16, 48, 128):  # other head dims: PyTorch's own choice
        assert decide("cuda", BF16, d, padded=False, keys=50, **kw).sdpa_backends is None
    assert decide("cuda", BF16, 32, padded=True, keys=50, **kw).kernel == "varlen"
    assert decide("cuda", BF16, 32, padded=True, keys=197, **kw).kernel == "varlen"
    assert decide("cuda", BF16, 64, padded=True, keys=50, **kw).kernel == "varlen"
    assert decide("cpu", BF16, 32, padded=False, keys=50, **kw).sdpa_backends is None
    backend.set_kernel_table(())  # no rule at all
    assert backend.kernel_table() == ()
    assert decide("cuda", BF16, 32, padded=False, keys=50, **kw).sdpa_backends is None
    backend.set_kernel_table(None)  # the default again
    assert decide("cuda", BF16, 32, padded=False, keys=50, **kw) == short


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kernel": "math"}, ValueError),
        ({"head_dim": 0}, ValueError),
        ({"min_keys": True}, ValueError),
        ({"padded": 1}, TypeError),
        ({"sdpa_backends": "flash"}, ValueError),
        ({"sdpa_backends": ("fast",)}, ValueError),
    ],
)
def test_kernel_rule_rejects_bad_fields(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        KernelRule(**kwargs)


def test_set_kernel_table_rejects_non_rules() -> None:
    with pytest.raises(TypeError, match="KernelRule"):
        backend.set_kernel_table([{"kernel": "flex"}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="sequence"):
        backend.set_kernel_table("flex")  # type: ignore[arg-type]


def test_compute_dtype_follows_autocast() -> None:
    x = torch.zeros(2, 3)
    assert backend.compute_dtype(x) == F32
    with torch.autocast("cpu", dtype=BF16):
        assert backend.compute_dtype(x) == BF16
        plan = backend.plan_for(x, 8, padding_mask=torch.zeros(2, 2, dtype=torch.bool))
    assert plan.kernel == "sdpa_mask"


def test_sdpa_backends_from_the_table_run_on_cpu() -> None:
    """A plan restricting SDPA to the math backend gives the default result."""
    g = generator(1)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    from crossmae.layers.attention import _attend

    out = _attend(
        q,
        k,
        v,
        None,
        dropout_p=0.0,
        fused=True,
        plan=AttentionPlan("sdpa", sdpa_backends=("math",)),
    )
    torch.testing.assert_close(out, ref)


# ---- every path of a stack on the CPU ------------------------------------------------------


def _force(monkeypatch: pytest.MonkeyPatch, route: str) -> list[int]:
    """Route every stack's plan onto ``route`` on the CPU; returns a call counter."""
    calls: list[int] = []
    if route == "varlen":

        def kernel(*args: Any) -> torch.Tensor:
            calls.append(1)
            return reference_varlen(*args)

        monkeypatch.setattr(_varlen, "supports", lambda *a: True)
        monkeypatch.setattr(_varlen, "_VARLEN", kernel)
    elif route == "segmented":
        # every varlen plan made segmented (the CPU has no kernel table lookup), the
        # segmented kernels replaced by the reference, torch's varlen_attn refusing to run
        def skernel(*args: Any) -> torch.Tensor:
            calls.append(1)
            return reference_varlen(*args)

        def flash(*args: Any) -> torch.Tensor:
            raise AssertionError("torch's varlen_attn ran on a segmented plan")

        real_decide = backend.decide

        def seg_decide(*args: Any, **kwargs: Any) -> AttentionPlan:
            plan = real_decide(*args, **kwargs)
            return replace(plan, segmented=True) if plan.kernel == "varlen" else plan

        monkeypatch.setattr(_varlen, "supports", lambda *a: True)
        monkeypatch.setattr(_varlen, "_VARLEN", flash)
        monkeypatch.setattr(_segmented, "varlen_fn", skernel)
        monkeypatch.setattr(backend, "decide", seg_decide)
    elif route == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        def fkernel(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(1)
            return flex_attention(*args, **kwargs)

        monkeypatch.setattr(_flex, "supports", lambda *a: True)
        monkeypatch.setattr(_flex, "compiled_flex", lambda: fkernel)
        cm.set_padded_attention_kernel("flex")
    return calls


@pytest.mark.parametrize("route", ["sdpa_mask", "varlen", "segmented", "flex"])
@pytest.mark.parametrize("wfm", [False, True])
def test_encoder_and_decoder_paths_agree_with_explicit_softmax(
    monkeypatch: pytest.MonkeyPatch, route: str, wfm: bool
) -> None:
    """Each kernel route, planned once per stack (the varlen route reorders once), gives the
    explicit-softmax results on real tokens, with NaN stored in padded slots."""
    g = generator(7)
    enc = TransformerEncoder(32, 2, 2).eval()
    dec = CrossMAEDecoder(
        32, 16, 2, 1, 5, num_tokens=9, self_attn=True, num_feature_maps=3 if wfm else None
    ).eval()
    enc_ref = TransformerEncoder(32, 2, 2, fused_attn=False).eval()
    enc_ref.load_state_dict(enc.state_dict())
    dec_ref = CrossMAEDecoder(
        32,
        16,
        2,
        1,
        5,
        num_tokens=9,
        self_attn=True,
        num_feature_maps=3 if wfm else None,
        fused_attn=False,
    ).eval()
    dec_ref.load_state_dict(dec.state_dict())
    x = torch.randn(3, 9, 32, generator=g)
    pad = torch.rand(3, 9, generator=g) < 0.4
    pad[0, 0] = True  # padding before real tokens: the reorder must handle it
    pad[2] = True
    x[pad] = float("nan")
    ids = torch.randint(0, 9, (3, 4), generator=g)
    qpad = torch.tensor([[False] * 4, [False, True, False, True], [True] * 4])
    with torch.no_grad():
        ref = enc_ref(x, pad, return_layers="all", include_input=True)
        ctx_ref = ref.features if wfm else ref.tokens
        pred_ref = dec_ref(ctx_ref, ids, context_padding_mask=pad, query_padding_mask=qpad)
        calls = _force(monkeypatch, route)
        out = enc(x, pad, return_layers="all", include_input=True)
        ctx = out.features if wfm else out.tokens
        pred = dec(ctx, ids, context_padding_mask=pad, query_padding_mask=qpad)
    if route != "sdpa_mask":
        assert calls, f"the {route} route was not taken"
    real = ~pad
    torch.testing.assert_close(out.tokens[real], ref.tokens[real], atol=1e-5, rtol=1e-5)
    assert out.features is not None and ref.features is not None
    torch.testing.assert_close(out.features[:, real], ref.features[:, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred[~qpad], pred_ref[~qpad], atol=1e-5, rtol=1e-5)
    assert pred.isfinite().all()


def test_packed_layout_never_plans_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with flex chosen process-wide, packed rows go to the segment-padded path: flex's
    partial blocks spread a NaN from one sample's real token to the others (H200, fp32)."""
    _force(monkeypatch, "flex")
    for dtype in (BF16, F32):
        plan = decide("cuda", dtype, 64, padded=True, layout="packed", varlen_ok=False)
        assert plan.kernel == "dense"


@pytest.mark.parametrize("route", ["dense", "varlen", "segmented"])
def test_packed_encoder_paths_agree(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    g = generator(3)
    enc = TransformerEncoder(32, 2, 2).eval()
    x = torch.randn(3, 7, 32, generator=g)
    pad = torch.tensor([[False] * 7, [False] * 3 + [True] * 4, [True] * 7])
    packed = cm.pack_tokens(x, pad, 16)
    with torch.no_grad():
        ref = enc(x, pad)
        calls = _force(monkeypatch, route)
        plan = backend.plan_for(packed.tokens, 16, layout="packed")
        assert (plan.kernel, plan.segmented) == (
            ("varlen", True) if route == "segmented" else (route, False)
        )
        out = enc.forward_packed(packed)
    if route != "dense":
        assert calls, f"the {route} route was not taken"
    tokens = cm.unpack_tokens(out.tokens, packed, 3)
    torch.testing.assert_close(tokens[~pad], ref.tokens[~pad], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["pre", "post"])
@pytest.mark.parametrize("route", ["dense", "varlen", "segmented"])
def test_capacity_encoder_paths_agree(
    monkeypatch: pytest.MonkeyPatch, route: str, kind: str
) -> None:
    """``forward(x, pad, capacity=)`` on each packed kernel route equals the padded forward on
    real slots (tokens and feature taps), with NaN stored in padding and 0 returned there."""
    g = generator(5)
    torch.manual_seed(0)
    enc: torch.nn.Module
    if kind == "pre":
        enc = TransformerEncoder(32, 2, 2).eval()
    else:
        enc = cm.PostNormTransformerEncoder(32, 2, 2, cond_dim=3).eval()
    cond = {"cond": torch.randn(3, 3, generator=g)} if kind == "post" else {}
    x = torch.randn(3, 7, 32, generator=g)
    pad = torch.tensor([[False] * 7, [True, False, True, False, False, True, True], [True] * 7])
    x = x.masked_fill(pad[..., None], float("nan"))
    with torch.no_grad():
        ref = enc(x, pad, return_layers="all", include_input=True, **cond)
        calls = _force(monkeypatch, route)
        out = enc(x, pad, return_layers="all", include_input=True, capacity=16, **cond)
    if route != "dense":
        assert calls, f"the {route} route was not taken"
    real = ~pad
    torch.testing.assert_close(out.tokens[real], ref.tokens[real], atol=1e-5, rtol=1e-5)
    assert out.features is not None and ref.features is not None
    torch.testing.assert_close(out.features[:, real], ref.features[:, real], atol=1e-5, rtol=1e-5)
    assert (out.tokens[pad] == 0).all() and (out.features[:, pad] == 0).all()


def test_stack_decides_once_and_reorders_only_for_varlen(monkeypatch: pytest.MonkeyPatch) -> None:
    """One plan per stack forward; the token reordering happens only when the plan asks."""
    decisions: list[AttentionPlan] = []
    real_decide = backend.decide

    def counting(*a: Any, **k: Any) -> AttentionPlan:
        plan = real_decide(*a, **k)
        decisions.append(plan)
        return plan

    def no_reorder(*a: Any, **k: Any) -> Any:
        raise AssertionError("tokens were reordered for a plan that does not need it")

    monkeypatch.setattr(backend, "decide", counting)
    monkeypatch.setattr(backend, "trailing_order", no_reorder)
    monkeypatch.setattr(backend, "real_first_permutation", no_reorder)
    enc = TransformerEncoder(16, 3, 2).eval()
    dec = CrossMAEDecoder(16, 8, 3, 2, 5, num_tokens=6).eval()
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [True, False, False, True, False, True]])
    with torch.no_grad():
        out = enc(x, pad)
        assert len(decisions) == 1 and decisions[0].kernel == "sdpa_mask"
        dec(out.tokens, torch.zeros(2, 3, dtype=torch.long), context_padding_mask=pad)
    assert len(decisions) == 2


def test_stack_computes_self_segments_once_for_its_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the packed route a padded stack reorders once and computes the kernel's segment
    boundaries once (`AttentionPlan.self_segments`): every block passes those same tensors
    to the kernel, and the tokens equal the masked route's."""
    enc = TransformerEncoder(16, 3, 2).eval()
    x = torch.randn(3, 7, 16, generator=generator(2))
    pad = torch.tensor([[False] * 7, [True, False, True, False, False, True, True], [True] * 7])
    x = x.masked_fill(pad[..., None], float("nan"))
    with torch.no_grad():
        ref = enc(x, pad).tokens
    _force(monkeypatch, "varlen")
    computed: list[torch.Tensor] = []
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_segments, real_kernel = _varlen.self_segments, _varlen._VARLEN

    def segments(padding_mask: torch.Tensor) -> torch.Tensor:
        computed.append(padding_mask)
        return real_segments(padding_mask)

    def kernel(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Any, cu_k: Any, *rest: Any
    ) -> Any:
        seen.append((cu_q, cu_k))
        return real_kernel(q, k, v, cu_q, cu_k, *rest)  # type: ignore[operator]

    monkeypatch.setattr(_varlen, "self_segments", segments)
    monkeypatch.setattr(_varlen, "_VARLEN", kernel)
    with torch.no_grad():
        out = enc(x, pad).tokens
        assert len(computed) == 1 and len(seen) == 3
        assert all(q is seen[0][0] and k is seen[0][0] for q, k in seen)
    real = ~pad
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_plan_self_segments_are_checked_and_not_compared() -> None:
    pad = torch.tensor([[False, True]])
    cu = _varlen.self_segments(pad)
    assert cu.tolist() == [0, 1, 2]
    plan = AttentionPlan("varlen", reorder=True).reordered(pad)
    assert plan.trailing and not plan.reorder and plan.self_segments is not None
    assert plan.self_segments[0] is pad and torch.equal(plan.self_segments[1], cu)
    assert plan == AttentionPlan("varlen", trailing=True)  # the tensors are not compared
    assert "self_segments" not in repr(plan)
    assert AttentionPlan("sdpa_mask", reorder=True).reordered(pad).self_segments is None
    with pytest.raises(TypeError, match="self_segments"):
        AttentionPlan("varlen", self_segments=(pad,))  # type: ignore[arg-type]

    def f(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        plan = backend.decide("cuda", BF16, 64, padded=True, varlen_ok=True)
        plan = plan.reordered(pad)  # a plan carrying tensors, built inside the graph
        assert plan.self_segments is not None
        return x * plan.self_segments[1][-1]

    x = torch.randn(3)
    out = torch.compile(f, fullgraph=True, backend="eager")(x, pad)
    torch.testing.assert_close(out, 2 * x)


def test_plan_mismatch_falls_back_to_a_valid_kernel() -> None:
    """A plan made for unpadded inputs, used with padding, still masks the padding."""
    attn = cm.CrossAttention(16, num_heads=2).eval()
    x = torch.randn(2, 3, 16)
    ctx = torch.randn(2, 5, 16)
    pad = torch.tensor([[False, False, True, True, True], [True] * 5])
    with torch.no_grad():
        ref = attn(x, ctx, pad)
        out = attn(x, ctx, pad, plan=AttentionPlan("sdpa"))
    torch.testing.assert_close(out, ref)


# ---- deprecated promise flags --------------------------------------------------------------


def test_trailing_flags_are_deprecated_and_ignored() -> None:
    g = generator(2)
    x = torch.randn(2, 5, 16, generator=g)
    ctx = torch.randn(2, 6, 16, generator=g)
    pad = torch.tensor([[False] * 5, [True, False, True, False, True]])
    cpad = torch.tensor([[False] * 6, [True, False, True, False, True, True]])
    ids = torch.zeros(2, 3, dtype=torch.long)
    attn = cm.Attention(16, 2).eval()
    block = cm.Block(16, 2).eval()
    cross = cm.CrossAttention(16, num_heads=2).eval()
    cblock = cm.CrossAttentionBlock(16, num_heads=2, self_attn=True).eval()
    enc = TransformerEncoder(16, 1, 2).eval()
    dec = CrossMAEDecoder(16, 16, 1, 2, 4, num_tokens=6).eval()
    cases = [
        (lambda **k: attn(x, pad, **k), "padding_is_trailing"),
        (lambda **k: block(x, pad, **k), "padding_is_trailing"),
        (lambda **k: cross(x, ctx, cpad, **k), "context_padding_is_trailing"),
        (lambda **k: cblock(x, ctx, cpad, pad, **k), "context_padding_is_trailing"),
        (lambda **k: cblock(x, ctx, cpad, pad, **k), "query_padding_is_trailing"),
        (lambda **k: enc(x, pad, **k).tokens, "padding_is_trailing"),
        (lambda **k: dec(ctx, ids, context_padding_mask=cpad, **k), "context_padding_is_trailing"),
    ]
    with torch.no_grad():
        for call, flag in cases:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ref = call()  # no warning without the flag
            for value in (False, True):
                with pytest.warns(FutureWarning, match=flag):
                    out = call(**{flag: value})
                torch.testing.assert_close(out, ref)  # a false promise changes nothing


def test_masked_rule_with_sdpa_backends_runs() -> None:
    backend.set_kernel_table([KernelRule(kernel="sdpa_mask", head_dim=8, sdpa_backends=("math",))])
    plan = decide("cuda", BF16, 8, padded=True, varlen_ok=True, flex_ok=True)
    assert (plan.kernel, plan.sdpa_backends, plan.reorder) == ("sdpa_mask", ("math",), False)
    attn = cm.CrossAttention(16, num_heads=2).eval()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    pad = torch.tensor([[False, False, True, True, True], [True] * 5])
    with torch.no_grad():
        torch.testing.assert_close(attn(x, ctx, pad, plan=plan), attn(x, ctx, pad))


def test_cuda_decisions_trace_as_one_graph() -> None:
    """The CUDA branches of the policy (lazy availability checks, the reordered plan, the
    SDPA backend context) trace without a graph break, so a compiled stack decides inside
    its graph."""

    def f(x: torch.Tensor) -> torch.Tensor:
        plan = backend.decide("cuda", BF16, 64, padded=True, varlen_ok=None)
        packed = backend.decide("cuda", F32, 64, padded=True, layout="packed")
        with backend.sdpa_context(("math",)):
            y = torch.nn.functional.scaled_dot_product_attention(x, x, x)
        with backend.sdpa_context(None):
            y = y + 1
        if plan.reordered().trailing and packed.kernel in ("flex", "dense"):
            return y * 2
        return y

    x = torch.randn(1, 2, 4, 8)
    out = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, f(x))


def test_cuda_decisions_never_look_up_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel availability is looked up once, at import: torch 2.11's compiler refuses to
    trace ``importlib.util.find_spec`` (its graph broke at every CUDA stack's plan, although
    the CPU trace above showed none), so planning must not call it."""
    import importlib.util

    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError(f"find_spec{a} called while planning")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    monkeypatch.setattr(_varlen, "_VARLEN", _varlen._UNLOADED)  # as before the first kernel call
    monkeypatch.setattr(_flex, "_LOADED", False)
    for dtype in (BF16, F32):
        for padded in (True, False):
            for layout in ("padded", "packed"):
                decide("cuda", dtype, 64, padded=padded, layout=layout)
    assert _varlen.varlen_available() == _varlen._VARLEN_SHIPPED
    assert _flex.flex_available() == _flex._FLEX_SHIPPED


def test_plan_with_sdpa_backends_compiles_fullgraph() -> None:
    attn = cm.CrossAttention(16, num_heads=2).eval()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    pad = torch.tensor([[False, False, True, True, True], [True] * 5])
    plan = AttentionPlan("sdpa_mask", sdpa_backends=("math",))
    with torch.no_grad():
        ref = attn(x, ctx, pad)
        out = torch.compile(attn, fullgraph=True, backend="eager")(x, ctx, pad, plan=plan)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("route", ["varlen", "segmented"])
def test_water_model_on_the_varlen_route_same_loss(
    monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """The water model's CUDA route (each stack planned once, keys reordered once per
    decoder for the packed kernel; its lockstep decoders in one packed call per layer)
    forced on the CPU gives the default route's losses, on torch's varlen kernel or on
    crossmae's segmented kernels (then every packed call runs them: torch's is never
    called)."""
    from tests.strategies import tiny_water_batch, tiny_water_model

    torch.manual_seed(0)
    model = tiny_water_model()
    inputs, static = tiny_water_batch(model.names, generator(11))
    with torch.no_grad():
        ref = model(inputs, static=static, generator=generator(5))
        calls = _force(monkeypatch, route)
        out = model(inputs, static=static, generator=generator(5))
    assert calls, f"the {route} route was not taken"
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=1e-5)
    for name in model.names:
        torch.testing.assert_close(
            out.sample_losses[name], ref.sample_losses[name], atol=1e-4, rtol=1e-5
        )


def test_postnorm_encoder_on_the_varlen_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The post-norm encoder plans once too: forced onto the varlen route (reordered once,
    taps restored) it gives the explicit-softmax results on real tokens."""
    from crossmae.encoders import PostNormTransformerEncoder

    g = generator(4)
    enc = PostNormTransformerEncoder(32, 2, 2).eval()
    ref = PostNormTransformerEncoder(32, 2, 2, fused_attn=False).eval()
    ref.load_state_dict(enc.state_dict())
    x = torch.randn(3, 9, 32, generator=g)
    pad = torch.rand(3, 9, generator=g) < 0.4
    pad[0, 0] = True
    pad[2] = True
    with torch.no_grad():
        want = ref(x, pad, return_layers="all", include_input=True)
        calls = _force(monkeypatch, "varlen")
        got = enc(x, pad, return_layers="all", include_input=True)
    assert calls, "the varlen route was not taken"
    real = ~pad
    torch.testing.assert_close(got.tokens[real], want.tokens[real], atol=1e-5, rtol=1e-5)
    assert got.features is not None and want.features is not None
    torch.testing.assert_close(got.features[:, real], want.features[:, real], atol=1e-5, rtol=1e-5)


def test_deprecated_trailing_flags_still_refuse_non_bools() -> None:
    x = torch.randn(1, 3, 16)
    with pytest.raises(TypeError, match="padding_is_trailing must be a bool"):
        cm.Attention(16, 2)(x, padding_is_trailing=1)
    with pytest.raises(TypeError, match="context_padding_is_trailing must be a bool"):
        cm.CrossAttention(16, num_heads=2)(x, x, context_padding_is_trailing="yes")


def test_mae_decoder_plans_once_and_follows_the_kernel_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The MAE decoder is a stack like the others: one plan per forward, and a kernel-table
    rule reaches its SDPA calls (0.1's loop called each block without a plan, so the table
    never applied there and PyTorch picked the kernel)."""
    from crossmae.decoders import MAEDecoder

    decisions: list[AttentionPlan] = []
    contexts: list[Any] = []
    real_decide, real_context = backend.decide, backend.sdpa_context

    def on_cuda(device_type: str, *a: Any, **k: Any) -> AttentionPlan:
        plan = real_decide("cuda", *a, **k)  # the CUDA policy, run on the CPU
        decisions.append(plan)
        return plan

    def recording(backends: Any) -> Any:
        contexts.append(backends)
        return real_context(("math",) if backends else None)

    monkeypatch.setattr(backend, "decide", on_cuda)
    monkeypatch.setattr(backend, "sdpa_context", recording)
    backend.set_kernel_table([KernelRule(head_dim=8, max_keys=6, sdpa_backends=("cudnn",))])
    dec = MAEDecoder(16, 16, 3, 2, 5, num_tokens=6).eval()
    ctx = torch.randn(2, 3, 16, generator=generator(2))
    ids = torch.tensor([[0, 2, 4], [5, 1, 3]])
    with torch.no_grad():
        dec(ctx, ids, ids)
    assert [p.sdpa_backends for p in decisions] == [("cudnn",)]
    assert contexts == [("cudnn",)] * 3  # every block, under the rule's backends
    decisions.clear()
    contexts.clear()
    backend.set_kernel_table([KernelRule(head_dim=8, max_keys=5, sdpa_backends=("cudnn",))])
    with torch.no_grad():
        dec(ctx, ids, ids)  # 6 keys: beyond the rule
    assert [p.sdpa_backends for p in decisions] == [None] and contexts == []


def test_mae_decoder_on_the_varlen_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a padded full sequence the MAE decoder's CUDA route (reordered once for the
    packed kernel, then restored) gives the explicit-softmax predictions."""
    from crossmae.decoders import MAEDecoder

    g = generator(6)
    dec = MAEDecoder(16, 16, 2, 2, 5, num_tokens=7).eval()
    ref = MAEDecoder(16, 16, 2, 2, 5, num_tokens=7, fused_attn=False).eval()
    ref.load_state_dict(dec.state_dict())
    ctx = torch.randn(3, 3, 16, generator=g)
    ids_keep = torch.tensor([[0, 2, 4], [6, 1, 3], [5, 4, 0]])
    ids_predict = torch.tensor([[1, 3, 5, 6], [0, 2, 4, 5], [1, 2, 3, 6]])
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 6] = pad[1, 0] = True  # never-visible, never-predicted slots
    pad[2, [1, 3]] = True
    query_pad = torch.tensor(
        [[False] * 3 + [True], [True] + [False] * 3, [True, False, True, False]]
    )
    with torch.no_grad():
        want = ref(ctx, ids_keep, ids_predict, padding_mask=pad, query_padding_mask=query_pad)
        calls = _force(monkeypatch, "varlen")
        got = dec(ctx, ids_keep, ids_predict, padding_mask=pad, query_padding_mask=query_pad)
    assert len(calls) == 2, "each block should take the packed kernel"
    real = ~query_pad
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_sdpa_context_settles_torch_s_own_priority_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first priority context (eager), one selection query lets PyTorch choose its
    own SDPA priority order: PyTorch does that lazily at the first selection of a process and
    overwrote the context's order (measured on the H200). Once per process, never while a
    CUDA graph records, never while compiling (no graph break, no guard)."""
    seen: list[str] = []
    real_settle = backend._settle_torch_priority
    monkeypatch.setattr(backend, "_settle_torch_priority", lambda device="cuda": seen.append("x"))
    q = torch.randn(1, 2, 4, 8)

    def f(x: torch.Tensor) -> torch.Tensor:
        with backend.sdpa_context(("math",)):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    want = f(q)
    assert seen == ["x"]  # eager: asked at every context (it returns at once after the first)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(q)
    assert seen == ["x"]  # compiling: not asked, and the graph did not break
    torch.testing.assert_close(got, want)
    with backend.sdpa_context(None):  # no backends: no context, nothing asked
        pass
    assert seen == ["x"]

    calls: list[int] = []
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: calls.append(1) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(backend, "_PRIORITY_SETTLED", False)
    real_settle(device="cpu")
    assert calls == [] and not backend._PRIORITY_SETTLED  # recording a graph: later
    capturing[0] = False
    for _ in range(2):
        real_settle(device="cpu")
    assert calls == [1] and backend._PRIORITY_SETTLED


def test_settling_without_cuda_marks_it_done(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: calls.append(1) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backend, "_PRIORITY_SETTLED", False)
    backend._settle_torch_priority()
    assert calls == [] and backend._PRIORITY_SETTLED


def _sdpa_state() -> tuple[list[bool], list[int]]:
    from torch.nn.attention import _backend_names

    flags = [getattr(torch._C, f"_get_{n}_sdp_enabled")() for n in _backend_names]
    return flags, list(torch._C._get_sdp_priority_order())


@pytest.mark.parametrize(
    "backends",
    [("math",), ("efficient", "flash", "cudnn"), ("cudnn", "flash", "efficient"), ("flash",)],
)
def test_eager_sdpa_context_sets_what_torch_s_context_sets(backends: tuple[str, ...]) -> None:
    """In eager mode `sdpa_context` takes a lighter path than ``sdpa_kernel(...,
    set_priority=True)`` (about 100 µs of host time per call saved): inside it the backend
    flags and the priority order are what torch's context sets; on exit, also after an
    exception and from a state that is not the default, every flag and the whole priority
    order are as before. Nested contexts unwind in order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend._FAST_SDPA is None:
        pytest.skip("this torch lacks the SDPA switches the light path sets")
    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    before = _sdpa_state()
    for start in ([], [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]):
        outer = sdpa_kernel(start, set_priority=True) if start else contextlib.nullcontext()
        with outer:
            with sdpa_kernel([names[b] for b in backends], set_priority=True):
                want = _sdpa_state()
            base = _sdpa_state()  # (torch's own exit may reorder the backends it disabled)
            ctx = backend.sdpa_context(backends)
            assert isinstance(ctx, backend._SdpaChoice)
            with ctx:
                got = _sdpa_state()
                with backend.sdpa_context(("math",)):
                    assert _sdpa_state()[1][0] == int(SDPBackend.MATH)
                assert _sdpa_state() == got
            assert got[0] == want[0]
            assert got[1][: len(backends)] == want[1][: len(backends)]
            assert sorted(got[1]) == sorted(base[1])
            assert _sdpa_state() == base
            with pytest.raises(RuntimeError, match="inside"):
                with backend.sdpa_context(backends):
                    raise RuntimeError("inside")
            assert _sdpa_state() == base
    assert _sdpa_state()[0] == before[0]


def test_sdpa_context_is_torch_s_own_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``torch.compile`` the context is torch's ``sdpa_kernel`` (the one dynamo traces)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not isinstance(backend.sdpa_context(("math",)), backend._SdpaChoice)


def test_default_table_sends_head_dims_16_and_32_to_the_segmented_kernels() -> None:
    """The two padded rules of the default table (the water model's head dims): padded
    calls get the varlen plan on crossmae's segmented kernels, reordered, eager calls
    included; packed-layout calls too (no key count: the rules have no key range); other
    head dims, kernels that cannot serve the call, and explicit choices keep the policy."""
    kw: dict[str, Any] = {"varlen_ok": True, "flex_ok": True, "segmented_ok": True}
    seg = AttentionPlan("varlen", reorder=True, segmented=True)
    for d in (16, 32):
        for keys in (None, 50, 7892):
            assert decide("cuda", BF16, d, padded=True, keys=keys, **kw) == seg
        assert decide("cuda", F16, d, padded=True, **kw) == seg
        packed = decide("cuda", BF16, d, padded=True, layout="packed", **kw)
        assert packed == AttentionPlan("varlen", segmented=True)
        # the segmented kernels cannot serve it (no triton, float32, dropout): flash varlen
        no_seg = {**kw, "segmented_ok": False}
        assert decide("cuda", BF16, d, padded=True, **no_seg) == AttentionPlan(
            "varlen", reorder=True
        )
        assert decide("cuda", BF16, d, padded=True, layout="packed", **no_seg) == (
            AttentionPlan("varlen")
        )
        # nor torch's varlen: the rule does not apply (the segmented plan rides on varlen's)
        assert decide("cuda", BF16, d, padded=True, **{**kw, "varlen_ok": False}).kernel == "flex"
        assert decide("cuda", BF16, d, padded=True, choice="varlen", **kw) == (
            AttentionPlan("varlen", reorder=True)
        )
        assert decide("cuda", BF16, d, padded=True, choice="sdpa", **kw).kernel == "sdpa_mask"
        assert not decide("cpu", BF16, d, padded=True, **kw).segmented
        assert not decide("cuda", BF16, d, padded=False, keys=50, **kw).segmented
    for d in (64, 128, 24):
        assert not decide("cuda", BF16, d, padded=True, **kw).segmented
        assert not decide("cuda", BF16, d, padded=True, layout="packed", **kw).segmented
    assert decide("cuda", BF16, 16, padded=True, dropout_p=0.1, varlen_ok=False, flex_ok=False) == (
        AttentionPlan("sdpa_mask")
    )
    # the plan survives the stack's reordering
    assert seg.reordered().segmented and seg.reordered().trailing


def test_segmented_supports_and_rules_with_key_ranges_or_compiled_only() -> None:
    assert not _segmented.supports("cpu", BF16, 16, 0.0)
    assert not _segmented.supports("cuda", F32, 16, 0.0)
    assert not _segmented.supports("cuda", BF16, 24, 0.0)
    assert not _segmented.supports("cuda", BF16, 16, 0.1)
    assert _segmented.supports("cuda", F16, 64, 0.0) == _segmented.available()
    backend.set_kernel_table(
        [KernelRule(kernel="segmented", head_dim=16, min_keys=1024, padded=True, eager=False)]
    )
    kw: dict[str, Any] = {"varlen_ok": True, "flex_ok": True, "segmented_ok": True}
    plan = decide("cuda", BF16, 16, padded=True, keys=7892, **kw)
    assert plan == AttentionPlan("varlen", reorder=True, segmented=True, eager=False)
    assert not decide("cuda", BF16, 16, padded=True, keys=100, **kw).segmented
    # packed calls have no key count: a rule with a key range never matches them
    assert not decide("cuda", BF16, 16, padded=True, layout="packed", **kw).segmented


def test_packed_kernel_follows_the_plan_and_its_eager_choice() -> None:
    """`backend.packed_kernel`: torch's kernel (None) unless the plan is segmented; a
    compiled-only segmented plan hands eager calls torch's kernel and traced calls the
    segmented one."""
    assert backend.packed_kernel(None) is None
    assert backend.packed_kernel(AttentionPlan("varlen")) is None
    on = AttentionPlan("varlen", segmented=True)
    assert backend.packed_kernel(on) is _segmented.varlen_fn
    traced_only = AttentionPlan("varlen", segmented=True, eager=False)
    assert backend.packed_kernel(traced_only) is None
    seen: list[bool] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(backend.packed_kernel(traced_only) is _segmented.varlen_fn)
        return x + 1

    torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    assert seen == [True]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "words"),
    [
        (KernelRule, {"kernel": "segmented", "padded": False}, ValueError, ("segmented", "False")),
        (KernelRule, {"kernel": "varlen", "eager": False}, ValueError, ("eager", "'varlen'")),
        (KernelRule, {"kernel": "segmented", "eager": 0}, TypeError, ("eager", "0")),
        (AttentionPlan, {"kernel": "sdpa_mask", "segmented": True}, ValueError, ("'sdpa_mask'",)),
        (
            AttentionPlan,
            {"kernel": "dense", "segmented": True},
            ValueError,
            ("segmented", "'dense'"),
        ),
        (AttentionPlan, {"kernel": "varlen", "segmented": 1}, TypeError, ("segmented", "1")),
    ],
)
def test_segmented_fields_are_checked(
    cls: type, kwargs: dict[str, Any], error: type, words: tuple[str, ...]
) -> None:
    """`KernelRule` (padded calls only; an eager choice for the Triton kernels) and
    `AttentionPlan` (``segmented`` with ``"varlen"`` only, a bool) name field and value."""
    with pytest.raises(error) as info:
        cls(**kwargs)
    assert all(w in str(info.value) for w in words)
    assert KernelRule(kernel="segmented", eager=False).eager is False  # compiled-only is fine


def test_lockstep_decoders_share_a_call_only_on_one_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoders whose plans differ in the packed kernel (segmented or not) cannot share one
    packed call: `decode_together` runs them one by one, with the same results."""
    from crossmae.decoders import together

    g = generator(2)
    decs = [CrossMAEDecoder(32, 16, 2, 1, 5, num_tokens=9).eval() for _ in range(2)]
    ctx = torch.randn(3, 9, 32, generator=g)
    pad = torch.rand(3, 9, generator=g) < 0.3
    ids = [torch.randint(0, 9, (3, 4), generator=g) for _ in range(2)]
    with torch.no_grad():
        want = [d(ctx, i, context_padding_mask=pad) for d, i in zip(decs, ids)]
    calls = _force(monkeypatch, "segmented")
    real = together._shares_kernel
    verdicts: list[bool] = []
    mix = [False]

    def mixed(decoders: Any, states: Any) -> bool:
        states = list(states)
        if mix[0]:
            states[1] = states[1]._replace(plan=replace(states[1].plan, segmented=False))
        verdicts.append(real(decoders, states))
        return verdicts[-1]

    monkeypatch.setattr(together, "_shares_kernel", mixed)
    monkeypatch.setattr(_varlen, "_VARLEN", reference_varlen)  # the unsegmented decoder's
    for m in (False, True):
        mix[0] = m
        calls.clear()
        with torch.no_grad():
            got = together.decode_together(decs, ctx, ids, context_padding_mask=pad)
        assert calls  # the segmented kernel ran (one shared call, or each decoder's own)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert verdicts == [True, False]
