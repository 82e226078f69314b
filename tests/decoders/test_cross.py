"""CrossMAEDecoder: every layer's key/value projection in one GEMM (`layer_keys_values`).

Legend: ``B`` batch, ``P`` queries, ``M`` context tokens, ``E`` context width, ``C``
decoder width, ``K`` feature maps. Polarity: ``*_padding_mask`` True = padding.

The fused projection must give what the blocks give when each runs its own ``kv`` (up to
rounding; float64 here), gradients included, with and without feature-map mixing, q/kv
bias, self-attention among queries and padding (NaN stored in padded slots included). It
must step aside wherever calling the blocks matters: hooks, subclasses, a single block.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import lengths_to_mask, poison_padding, randn, seeds
from torch import nn

from crossmae import CrossAttentionBlock, CrossMAEDecoder
from crossmae.decoders.cross import layer_keys_values

E, C, H, OUT, N = 12, 8, 2, 5, 16


def _decoder(seed: int, depth: int = 3, wfm: bool = False, **kw: Any) -> CrossMAEDecoder:
    torch.manual_seed(seed)
    k = {"num_feature_maps": 4} if wfm else {}
    return CrossMAEDecoder(E, C, depth, H, OUT, num_tokens=N, **k, **kw).double()


def _block_by_block(
    dec: CrossMAEDecoder,
    ctx: torch.Tensor,
    ids: torch.Tensor,
    cpad: Optional[torch.Tensor],
    qpad: Optional[torch.Tensor],
) -> torch.Tensor:
    """Independent route: `prepare`, then every block called as a module, then `predict`."""
    st_ = dec.prepare(ctx, ids, context_padding_mask=cpad, query_padding_mask=qpad)
    x = st_.queries
    for j, blk in enumerate(dec.blocks):
        layer_ctx = st_.context[j] if st_.context.ndim == 4 else st_.context
        x = blk(x, layer_ctx, st_.context_padding_mask, st_.query_padding_mask, plan=st_.plan,
                query_plan=st_.query_plan)  # fmt: skip
    return dec.predict(x)


def _inputs(seed: int, b: int, m: int, p: int, wfm: bool, padded: bool) -> tuple[Any, ...]:
    ctx = randn(seed, *((4,) if wfm else ()), b, m, E, dtype=torch.float64)
    ids = torch.randint(0, N, (b, p), generator=torch.Generator().manual_seed(seed))
    cpad = qpad = None
    if padded:
        g = torch.Generator().manual_seed(seed + 1)
        cpad = lengths_to_mask(torch.randint(0, m + 1, (b,), generator=g).tolist(), m)
        qpad = lengths_to_mask(torch.randint(0, p + 1, (b,), generator=g).tolist(), p)
        flat = ctx.movedim(0, -2) if wfm else ctx  # poison along [B, M]
        flat = poison_padding(flat.reshape(b, m, -1), cpad, seed).reshape(flat.shape)
        ctx = flat.movedim(-2, 0) if wfm else flat
    return ctx, ids, cpad, qpad


@settings(max_examples=20, deadline=None)
@given(
    seed=seeds(),
    b=st.integers(1, 3),
    m=st.integers(1, 6),
    p=st.integers(1, 5),
    wfm=st.booleans(),
    padded=st.booleans(),
    bias=st.booleans(),
    self_attn=st.booleans(),
)
def test_fused_projection_equals_block_by_block(
    seed: int, b: int, m: int, p: int, wfm: bool, padded: bool, bias: bool, self_attn: bool
) -> None:
    dec = _decoder(seed % 1000, wfm=wfm, qkv_bias=bias, self_attn=self_attn)
    ctx, ids, cpad, qpad = _inputs(seed, b, m, p, wfm, padded)
    st_ = dec.prepare(ctx, ids, context_padding_mask=cpad, query_padding_mask=qpad)
    assert layer_keys_values(dec.blocks, st_.context, st_.context_padding_mask) is not None
    leaves = [ctx.clone().requires_grad_(True) for _ in range(2)]
    fused = dec(leaves[0], ids, context_padding_mask=cpad, query_padding_mask=qpad)
    fused_grads = torch.autograd.grad(fused.square().sum(), [leaves[0], *dec.parameters()])
    ref = _block_by_block(dec, leaves[1], ids, cpad, qpad)
    ref_grads = torch.autograd.grad(ref.square().sum(), [leaves[1], *dec.parameters()])
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(fused).all()
    for got, want in zip(fused_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        assert torch.isfinite(got).all()  # NaN stored in padded context slots stays out


def test_each_block_keeps_its_own_heads() -> None:
    """A block of another head count (same widths) gets its keys split by its own heads."""
    dec = _decoder(0)
    torch.manual_seed(1)
    dec.blocks[1] = CrossAttentionBlock(C, E, num_heads=4, qkv_bias=True).double()
    ctx, ids, cpad, qpad = _inputs(3, 2, 5, 4, False, True)
    st_ = dec.prepare(ctx, ids, context_padding_mask=cpad)
    kvs = layer_keys_values(dec.blocks, st_.context, st_.context_padding_mask)
    assert kvs is not None and [k.shape[1] for k, _ in kvs] == [H, 4, H]
    torch.testing.assert_close(
        dec(ctx, ids, context_padding_mask=cpad, query_padding_mask=qpad),
        _block_by_block(dec, ctx, ids, cpad, qpad),
        rtol=1e-10,
        atol=1e-12,
    )


def test_hooks_subclasses_and_single_blocks_run_the_blocks() -> None:
    ctx, ids, cpad, _ = _inputs(5, 2, 4, 3, False, True)

    def fused(dec: CrossMAEDecoder) -> bool:
        st_ = dec.prepare(ctx, ids, context_padding_mask=cpad)
        return layer_keys_values(dec.blocks, st_.context, st_.context_padding_mask) is not None

    dec = _decoder(0)
    assert fused(dec)
    assert not fused(_decoder(0, depth=1))
    # a hook on a block, its attention or its projection runs, so the blocks run
    for target in (dec.blocks[1], dec.blocks[1].cross_attn, dec.blocks[1].cross_attn.kv):
        calls: list[int] = []
        handle = target.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        assert not fused(dec)
        dec(ctx, ids, context_padding_mask=cpad)
        assert calls == [1]
        handle.remove()
    assert fused(dec)
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not fused(dec)
    finally:
        handle.remove()

    class Mine(CrossAttentionBlock):
        pass

    torch.manual_seed(0)
    dec.blocks[2] = Mine(C, E, num_heads=H).double()
    assert not fused(dec)


def test_fused_projection_is_one_gemm_for_a_shared_context() -> None:
    """Without feature-map mixing every layer reads one context: one ``addmm`` for all
    their keys and values, not one per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            self.n += func.overloadpacket is torch.ops.aten.addmm
            return func(*args, **(kwargs or {}))

    dec = _decoder(0, depth=4)
    ctx, ids, _, _ = _inputs(1, 2, 5, 3, False, False)
    with Count() as c:
        dec(ctx, ids)
    # per layer q, proj, fc1, fc2; the head; one kv GEMM for the four layers
    assert c.n == 4 * 4 + 1 + 1
    dec.blocks[0].register_forward_pre_hook(lambda *a: None)
    with Count() as c:
        dec(ctx, ids)
    assert c.n == 5 * 4 + 1


@pytest.mark.parametrize("wfm", [False, True])
def test_fused_projection_under_autocast_and_compile(wfm: bool) -> None:
    torch.manual_seed(0)
    k = {"num_feature_maps": 4} if wfm else {}
    dec = CrossMAEDecoder(E, C, 2, H, OUT, num_tokens=N, **k)
    ctx, ids, cpad, qpad = _inputs(2, 2, 5, 3, wfm, True)
    ctx = ctx.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dec(ctx, ids, context_padding_mask=cpad, query_padding_mask=qpad)
        want = _block_by_block(dec, ctx, ids, cpad, qpad)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    compiled = torch.compile(dec, fullgraph=True, backend="eager")
    out = compiled(ctx, ids, context_padding_mask=cpad, query_padding_mask=qpad)
    torch.testing.assert_close(
        out, dec(ctx, ids, context_padding_mask=cpad, query_padding_mask=qpad)
    )
