"""Every layer under ``torch.compile(fullgraph=True, backend="eager")``, bf16 autocast and float64.

Legend: ``B`` batch, ``N`` tokens, ``Nq`` queries, ``Nk`` keys, ``D`` width.
Padding masks are True = padding; each masked case has a sample with zero
real keys and NaN stored in padded slots.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
from strategies import lengths_to_mask, poison_padding, randn
from torch import nn

from crossmae import (
    Attention,
    Block,
    CrossAttention,
    CrossAttentionBlock,
    DropPath,
    Mlp,
    WeightedFeatureMaps,
    gather_tokens,
    scatter_tokens,
)

B, N, NK, D, CD, H = 3, 7, 9, 16, 12, 4
Case = tuple[nn.Module, tuple[Any, ...], dict[str, Any], Optional[torch.Tensor]]


class _GatherScatter(nn.Module):
    """Wraps the token functions as a module so they go through the same checks."""

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, ids_padding_mask: torch.Tensor
    ) -> torch.Tensor:
        return scatter_tokens(gather_tokens(x, ids), ids, x.shape[1], padding_mask=ids_padding_mask)


def _x() -> torch.Tensor:
    return randn(1, B, N, D)


def _ctx() -> torch.Tensor:
    return randn(2, B, NK, CD)


def _pm(n: int) -> torch.Tensor:
    return lengths_to_mask([n, 0, max(n - 3, 1)], n)  # sample 1 has zero real tokens


def case_attention(fused: bool, masked: bool) -> Case:
    torch.manual_seed(0)
    m = Attention(D, H, qkv_bias=True, fused_attn=fused)
    if not masked:
        return m, (_x(),), {}, None
    pm = _pm(N)
    return m, (poison_padding(_x(), pm, 3, kind="nan"),), {"padding_mask": pm}, pm


def case_cross(fused: bool, masked: bool) -> Case:
    torch.manual_seed(0)
    m = CrossAttention(D, CD, H, qkv_bias=True, fused_attn=fused)
    if not masked:
        return m, (_x(), _ctx()), {}, None
    pm = _pm(NK)
    ctx = poison_padding(_ctx(), pm, 3, kind="mixed")
    return m, (_x(), ctx), {"context_padding_mask": pm}, None


def case_block(fused: bool, masked: bool) -> Case:
    torch.manual_seed(0)
    m = Block(D, H, mlp_ratio=2.0, qkv_bias=True, fused_attn=fused)
    if not masked:
        return m, (_x(),), {}, None
    pm = _pm(N)
    return m, (poison_padding(_x(), pm, 3, kind="nan"),), {"padding_mask": pm}, pm


def case_cab(fused: bool, masked: bool) -> Case:
    torch.manual_seed(0)
    m = CrossAttentionBlock(D, CD, H, mlp_ratio=2.0, self_attn=True, fused_attn=fused)
    if not masked:
        return m, (_x(), _ctx()), {}, None
    cpm, qpm = _pm(NK), _pm(N)
    kw = {"context_padding_mask": cpm, "query_padding_mask": qpm}
    args = (poison_padding(_x(), qpm, 4, kind="nan"), poison_padding(_ctx(), cpm, 3, kind="nan"))
    return m, args, kw, qpm


def case_wfm(fused: bool, masked: bool) -> Case:
    torch.manual_seed(0)
    return (
        WeightedFeatureMaps(3, 2),
        (torch.stack([randn(i, B, N, D) for i in range(3)]),),
        {},
        None,
    )


def case_mlp(fused: bool, masked: bool) -> Case:
    torch.manual_seed(0)
    return Mlp(D, hidden_features=2 * D, out_features=5), (_x(),), {}, None


def case_drop_path(fused: bool, masked: bool) -> Case:
    return DropPath(0.3), (_x(),), {}, None


def case_tokens(fused: bool, masked: bool) -> Case:
    ids = torch.tensor([[3, 0, 5], [0, 0, 0], [6, 1, 0]])
    ipm = torch.tensor([[False, False, False], [True, True, True], [False, False, True]])
    return _GatherScatter(), (_x(), ids, ipm), {}, None


BUILDERS: dict[str, Callable[[bool, bool], Case]] = {
    "attention": case_attention,
    "cross_attention": case_cross,
    "block": case_block,
    "cross_attention_block": case_cab,
    "weighted_feature_maps": case_wfm,
    "mlp": case_mlp,
    "drop_path": case_drop_path,
    "gather_scatter_tokens": case_tokens,
}
ATTN = {"attention", "cross_attention", "block", "cross_attention_block"}

COMPILE_CASES = [
    pytest.param(
        name,
        fused,
        masked,
        id=f"{name}-{'sdpa' if fused else 'manual'}-{'mask' if masked else 'nomask'}",
    )
    for name in BUILDERS
    for fused in ((False, True) if name in ATTN else (True,))
    for masked in ((False, True) if name in ATTN else (False,))
    if not (name in {"block", "cross_attention_block"} and not fused and not masked)
]

DTYPE_CASES = [
    pytest.param(
        name,
        fused,
        masked,
        id=f"{name}-{'sdpa' if fused else 'manual'}-{'mask' if masked else 'nomask'}",
    )
    for name in BUILDERS
    for fused in ((False, True) if name in ATTN else (True,))
    for masked in ((False, True) if name in ATTN else (False,))
]


def _real(out: torch.Tensor, pm: Optional[torch.Tensor]) -> torch.Tensor:
    return out if pm is None else out[~pm]


@pytest.mark.parametrize(("name", "fused", "masked"), COMPILE_CASES)
def test_compile_fullgraph(name: str, fused: bool, masked: bool) -> None:
    torch._dynamo.reset()
    m, args, kw, pm = BUILDERS[name](fused, masked)
    m.eval()
    with torch.no_grad():
        eager = m(*args, **kw)
        compiled = torch.compile(m, fullgraph=True, backend="eager")
        out = compiled(*args, **kw)
    assert out.shape == eager.shape
    torch.testing.assert_close(_real(out, pm), _real(eager, pm), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(_real(out, pm)).all()
    if name == "drop_path":  # training mode: random per-sample drop must also compile
        m.train()
        torch._dynamo.reset()
        out_t = torch.compile(m, fullgraph=True, backend="eager")(*args)
        assert out_t.shape == args[0].shape


@pytest.mark.parametrize(("name", "fused", "masked"), DTYPE_CASES)
def test_bf16_autocast(name: str, fused: bool, masked: bool) -> None:
    m, args, kw, pm = BUILDERS[name](fused, masked)
    m.eval()
    with torch.no_grad():
        ref = m(*args, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(*args, **kw)
    assert out.shape == ref.shape
    real = _real(out, pm).float()
    assert torch.isfinite(real).all()
    torch.testing.assert_close(real, _real(ref, pm).float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize(("name", "fused", "masked"), DTYPE_CASES)
def test_float64(name: str, fused: bool, masked: bool) -> None:
    m, args, kw, pm = BUILDERS[name](fused, masked)
    m.eval()
    with torch.no_grad():
        ref = m(*args, **kw)
        m64 = m.double()
        args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
        out = m64(*args64, **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(_real(out, pm), _real(ref, pm).double(), atol=1e-4, rtol=1e-4)
    assert torch.isfinite(_real(out, pm)).all()


@pytest.mark.parametrize("fused", [False, True])
def test_float64_gradients_finite_with_empty_rows(fused: bool) -> None:
    m, args, kw, pm = case_cab(fused, True)
    m = m.double()
    x, ctx = (a.double().requires_grad_(True) for a in args)
    out = m(x, ctx, **kw)
    assert pm is not None
    torch.where(pm[..., None], torch.zeros_like(out), out).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname
