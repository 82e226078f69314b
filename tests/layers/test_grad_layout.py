"""The fused projections' gradients reach their GEMM without an extra copy.

Legend: ``b`` batch, ``n`` tokens, ``m`` context tokens, ``c`` width, ``h`` heads.

q, k and v (or k and v) are views of one projection output. The backward of splitting them
apart stacks their gradients into one tensor; taken where the parts sit in memory, that tensor
is already the projection's layout and goes to the GEMM's backward as is. Taken after the heads
are transposed, it would be copied once more (a ``clone`` per attention call, the size of the
projection). These tests count the copies the backward dispatches, so a layout that brings the
second copy back fails; the values are checked against a route that owns its copies.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crossmae import Attention, CrossAttention, CrossAttentionBlock, CrossMAEDecoder

_COPIES = {"clone", "copy_", "stack", "cat", "contiguous"}


class _Copies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _COPIES:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _backward_copies(loss_fn: Callable[[], torch.Tensor]) -> Counter[str]:
    loss = loss_fn()
    with _Copies() as mode:
        loss.backward()
    return mode.ops


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


def test_self_attention_backward_stacks_qkv_once() -> None:
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=True, fused_attn=True).double()
    x = _x(3, 5, 8)
    ops = _backward_copies(lambda: attn(x).square().sum())
    assert ops == Counter(stack=1), ops


def test_packed_self_attention_backward_stacks_qkv_once() -> None:
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, fused_attn=True).double()
    x = _x(7, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    ops = _backward_copies(lambda: attn.forward_packed(x, cu, 4).square().sum())
    assert ops == Counter(stack=1), ops


def test_cross_attention_backward_stacks_kv_once() -> None:
    torch.manual_seed(0)
    ca = CrossAttention(8, 6, num_heads=2, qkv_bias=True).double()
    x, ctx = _x(2, 4, 8), _x(2, 5, 6, seed=1)
    ops = _backward_copies(lambda: ca(x, ctx).square().sum())
    assert ops == Counter(stack=1), ops


def _heads_reference(proj: torch.Tensor, h: int) -> list[torch.Tensor]:
    """The split as it was: heads transposed first, then split (a copy in the backward)."""
    b, n, sc = proj.shape
    s = 3 if sc % 3 == 0 and sc // 3 % h == 0 else 2
    return list(proj.view(b, n, s, h, sc // s // h).permute(2, 0, 3, 1, 4).unbind(0))


def test_split_views_and_gradients_equal_the_transpose_first_split() -> None:
    from crossmae.layers.attention import _heads

    proj = _x(2, 5, 24)
    got = _heads(proj.view(2, 5, 3, 2, 4))
    want = _heads_reference(proj, 2)
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and g_.stride() == w_.stride()
        assert g_.data_ptr() == w_.data_ptr()
    w = [_x(*t.shape, seed=i + 3) for i, t in enumerate(got)]
    (g1,) = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(got, w)), proj)
    (g2,) = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(want, w)), proj)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("wfm", [False, True])
def test_decoder_fused_projection_backward_copies(wfm: bool) -> None:
    """Shared context: every layer's k and v split off the one GEMM at once (one stack). One
    context per layer (WFM): each layer's k and v, then the layers (depth + 1 stacks). No
    clone either way."""
    depth = 3
    torch.manual_seed(0)
    k = {"num_feature_maps": 2} if wfm else {}
    dec = CrossMAEDecoder(6, 8, depth, 2, 5, num_tokens=10, **k).double()
    ctx = _x(*((2,) if wfm else ()), 2, 4, 6)
    ids = torch.tensor([[0, 3, 5], [1, 2, 9]])
    ops = _backward_copies(lambda: dec(ctx, ids).square().sum())
    # (a WFM decoder's stacked weights hand each layer's weight its gradient by a copy_ of
    # weight size; no activation-sized copy is allowed)
    assert ops["clone"] == 0 and ops["stack"] == (depth + 1 if wfm else 1), ops


def test_decoder_with_per_block_heads_splits_each_layer() -> None:
    """Blocks with different head counts: the layers are split first, then each layer's k
    and v (depth + 1 stacks), and still no clone."""
    torch.manual_seed(0)
    dec = CrossMAEDecoder(6, 8, 2, 2, 5, num_tokens=10).double()
    dec.blocks[1] = CrossAttentionBlock(8, 6, num_heads=4, qkv_bias=True).double()
    ctx = _x(2, 4, 6)
    ids = torch.tensor([[0, 3], [1, 9]])
    ops = _backward_copies(lambda: dec(ctx, ids).square().sum())
    assert ops["clone"] == 0 and ops["stack"] == 3, ops
