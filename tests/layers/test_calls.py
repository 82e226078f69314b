"""`call_part`: a block's disabled optional parts (plain ``nn.Identity``) are skipped, and
everything else, hooks included, runs exactly as a module call."""

from __future__ import annotations

import torch
from strategies import randn
from torch import nn

from crossmae import Block, CrossAttentionBlock, DropPath, Mlp
from crossmae.layers._calls import call_part, global_hooks, hooked


def test_plain_identity_is_skipped_and_returns_its_input() -> None:
    x = randn(0, 2, 3)
    ident = nn.Identity()
    ident.forward = None  # type: ignore[assignment]  # would raise if it were called
    assert call_part(ident, x) is x


def test_hooked_identity_subclass_and_other_parts_are_called() -> None:
    x = randn(0, 2, 3)
    ident = nn.Identity()
    ident.register_forward_hook(lambda mod, args, out: out * 2)
    torch.testing.assert_close(call_part(ident, x), 2 * x)
    assert hooked(ident)

    class Scaled(nn.Identity):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return 3 * t

    torch.testing.assert_close(call_part(Scaled(), x), 3 * x)
    drop = nn.Dropout(0.5).train()
    assert (call_part(drop, torch.ones(1000)) == 0).any()
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: out + 1)
    try:
        assert global_hooks()
        torch.testing.assert_close(call_part(nn.Identity(), x), x + 1)
    finally:
        handle.remove()
    assert not global_hooks()


def test_blocks_call_parts_set_after_construction() -> None:
    """A drop path or dropout set on a built block is called (and hooks on parts fire)."""
    torch.manual_seed(0)
    x = randn(1, 8, 5, 8)
    for blk in (Block(8, 2), CrossAttentionBlock(8, 8, num_heads=2)):
        args = (x,) if isinstance(blk, Block) else (x, x)
        blk.eval()
        base = blk(*args)
        blk.drop_path2 = DropPath(0.999)
        blk.train()
        dropped = blk(*args)
        # the second residual branch is dropped for (nearly) every sample, so the output
        # differs from the eval output, which keeps it
        assert not torch.allclose(dropped, base)
        blk.eval()
        seen: list[torch.Tensor] = []
        blk.drop_path1.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out))
        blk(*args)
        assert len(seen) == 1


def test_mlp_on_rows_keeps_leading_dimensions() -> None:
    torch.manual_seed(0)
    mlp = Mlp(6, 10, 4).double()
    for shape in ((6,), (3, 6), (2, 3, 6), (2, 1, 3, 6), (0, 6), (2, 0, 6)):
        x = randn(2, *shape, dtype=torch.float64)
        want = mlp.fc2(mlp.act(mlp.fc1(x)))
        got = mlp(x)
        assert got.shape == (*shape[:-1], 4)
        torch.testing.assert_close(got, want)
