"""Decoder options for downstream models: dropout, attention dropout, q/kv bias.

Legend: ``B`` batch, ``P`` queries, ``M`` keys, ``C`` decoder width, ``E`` encoder width.
"""

from __future__ import annotations

import pytest
import torch
from strategies import lengths_to_mask, randn
from torch import nn

from crossmae import CrossMAEDecoder, MAEDecoder

C, E, H = 8, 12, 2


def _decoders(**kw: object) -> list[nn.Module]:
    return [
        CrossMAEDecoder(E, C, 2, H, 5, num_tokens=10, **kw),  # type: ignore[arg-type]
        MAEDecoder(E, C, 2, H, 5, 10, **kw),  # type: ignore[arg-type]
    ]


def test_options_reach_every_block() -> None:
    for dec in _decoders(drop=0.1, attn_drop=0.2, qkv_bias=False):
        for blk in dec.blocks:
            attn = blk.cross_attn if hasattr(blk, "cross_attn") else blk.attn
            assert attn.attn_drop == 0.2
            assert isinstance(attn.proj_drop, nn.Dropout) and attn.proj_drop.p == 0.1
            assert isinstance(blk.mlp.drop1, nn.Dropout) and blk.mlp.drop1.p == 0.1
            projections = [attn.q, attn.kv] if hasattr(attn, "q") else [attn.qkv]
            assert all(p.bias is None for p in projections)
            assert isinstance(blk.mlp.act, nn.GELU)


def test_defaults_unchanged() -> None:
    for dec in _decoders():
        for blk in dec.blocks:
            attn = blk.cross_attn if hasattr(blk, "cross_attn") else blk.attn
            assert attn.attn_drop == 0.0 and isinstance(attn.proj_drop, nn.Identity)
            assert isinstance(blk.mlp.drop1, nn.Identity)
    # no new state-dict keys for the default configuration
    keys = set(CrossMAEDecoder(E, C, 2, H, 5, num_tokens=10).state_dict())
    assert not any(k.startswith("query_pos") for k in keys)


def test_dropout_only_while_training() -> None:
    torch.manual_seed(0)
    cross, mae = _decoders(drop=0.3, attn_drop=0.3, qkv_bias=False)
    ctx = randn(0, 2, 4, E)
    ids = torch.tensor([[1, 2], [3, 0]])
    keep = torch.tensor([[0, 4, 5, 6], [1, 2, 7, 8]])
    cpm = lengths_to_mask([4, 2], 4)
    for dec, args in ((cross, (ctx, ids)), (mae, (ctx, keep, ids))):
        dec.train()
        a = dec(*args, context_padding_mask=cpm)
        b = dec(*args, context_padding_mask=cpm)
        assert not torch.allclose(a, b)
        dec.eval()
        with torch.no_grad():
            torch.testing.assert_close(
                dec(*args, context_padding_mask=cpm),
                dec(*args, context_padding_mask=cpm),
                rtol=0,
                atol=0,
            )


def test_bad_dropout() -> None:
    with pytest.raises(ValueError, match="attn_drop"):
        CrossMAEDecoder(E, C, 2, H, 5, num_tokens=10, attn_drop=1.5)
    with pytest.raises(ValueError, match="drop"):
        MAEDecoder(E, C, 2, H, 5, 10, drop=-0.1)
