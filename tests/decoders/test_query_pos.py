"""Decoder query positions as an injected module, and `SpatioTemporalQueryPos`.

Legend: ``B`` batch, ``P`` queries, ``L`` slots per step, ``G`` grid patches, ``T`` steps,
``C`` decoder width, ``E`` encoder width. Padding masks: True = padding.
"""

from __future__ import annotations

import pytest
import torch
from strategies import lengths_to_mask, poison_padding, randn
from torch import nn

from crossmae import (
    CrossMAEDecoder,
    MAEDecoder,
    RasterTokenizer,
    SpatioTemporalQueryPos,
    sincos_pos_embed_1d,
)

C, E, H = 8, 12, 2


def test_values_follow_the_documented_id_layout() -> None:
    qp = SpatioTemporalQueryPos(5, C, 4)
    ids = torch.tensor([[0, 4, 5, 19], [7, 0, 13, 2]])
    out = qp(ids)
    time = sincos_pos_embed_1d(C, 4)
    for b in range(2):
        for j in range(4):
            t, patch = divmod(int(ids[b, j]), 5)
            torch.testing.assert_close(out[b, j], qp.spatial[patch] + time[t])
    assert out.shape == (2, 4, C)
    assert [n for n, _ in qp.named_parameters()] == ["spatial"]
    assert list(qp.state_dict()) == ["spatial"]


def test_patch_index_maps_slots_to_grid_rows() -> None:
    index = torch.tensor([2, 5, 6])  # 3 valid patches of a 9-patch grid
    qp = SpatioTemporalQueryPos(9, C, 3, patch_index=index)
    assert qp.tokens_per_step == 3 and qp.num_tokens(2) == 6
    ids = torch.tensor([[0, 1, 2, 3, 8]])
    out = qp(ids)
    time = sincos_pos_embed_1d(C, 3)
    rows, steps = [2, 5, 6, 2, 6], [0, 0, 0, 1, 2]
    for j in range(5):
        torch.testing.assert_close(out[0, j], qp.spatial[rows[j]] + time[steps[j]])


def test_matches_raster_tokenizer_numbering() -> None:
    """Ids of RasterTokenizer (n = t·Lv + v) reach the grid row of their valid patch."""
    valid = torch.tensor([1, 0, 1, 0, 1, 0, 0, 0, 1]).bool()  # 4 of the 3x3 grid's patches
    tok = RasterTokenizer(C, 2, 6, valid_patch_mask=valid)
    qp = SpatioTemporalQueryPos(9, C, 5, patch_index=tok.valid_patch_index)
    t_index, patch_index = tok.token_positions(5)
    ids = torch.arange(tok.num_tokens(5))[None]
    expected = qp.spatial[patch_index] + sincos_pos_embed_1d(C, 5)[t_index]
    torch.testing.assert_close(qp(ids)[0], expected)


def test_run_time_steps_up_to_the_maximum() -> None:
    qp = SpatioTemporalQueryPos(4, C, 6)
    short = qp(torch.arange(2 * 4)[None])  # 2 steps
    long = qp(torch.arange(6 * 4)[None])  # 6 steps
    torch.testing.assert_close(long[:, :8], short)  # same positions for the shared steps
    assert qp.num_tokens(6) == 24
    with pytest.raises(ValueError, match="exceeds max_time_steps=6"):
        qp.num_tokens(7)
    with pytest.raises(IndexError):
        qp(torch.tensor([[6 * 4]]))  # step 6 is beyond the table (CPU: index error)


def test_time_table_override_and_checks() -> None:
    table = randn(0, 3, C)
    qp = SpatioTemporalQueryPos(2, C, 3, time_table=table)
    torch.testing.assert_close(qp(torch.tensor([[5]]))[0, 0], qp.spatial[1] + table[2])
    with pytest.raises(ValueError, match="time_table must have shape"):
        SpatioTemporalQueryPos(2, C, 4, time_table=table)
    with pytest.raises(ValueError, match=r"patch_index values must lie in \[0, num_patches=4\)"):
        SpatioTemporalQueryPos(4, C, 3, patch_index=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="patch_index must be an int64"):
        SpatioTemporalQueryPos(4, C, 3, patch_index=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="dim must be even"):
        SpatioTemporalQueryPos(4, 7, 3)
    with pytest.raises(TypeError, match="ids must be an int64"):
        qp(torch.zeros(1, 2))


def _cross(query_pos: nn.Module, **kw: object) -> CrossMAEDecoder:
    return CrossMAEDecoder(E, C, 2, H, 5, pos_embed=None, query_pos=query_pos, **kw)  # type: ignore[arg-type]


def test_cross_decoder_uses_injected_positions() -> None:
    torch.manual_seed(0)
    qp = SpatioTemporalQueryPos(6, C, 4)
    dec = _cross(qp, modality_embed=True).eval()
    ids = torch.tensor([[0, 7, 23], [3, 3, 0]])
    q = dec.queries(ids)
    torch.testing.assert_close(q, qp(ids) + dec.mask_token + dec.modality_embed)
    keys = [k for k in dec.state_dict() if k.startswith("query_pos.")]
    assert keys == ["query_pos.spatial"]
    assert dec.pos_embed is None and dec.pos_table is None
    # padding guarantees hold through the injected module
    cpm = lengths_to_mask([4, 0], 4)
    qpm = lengths_to_mask([3, 1], 3)
    ctx = randn(1, 2, 4, E)
    with torch.no_grad():
        clean = dec(ctx, ids, context_padding_mask=cpm, query_padding_mask=qpm)
        bad = dec(
            poison_padding(ctx, cpm, 2, kind="nan"),
            ids,
            context_padding_mask=cpm,
            query_padding_mask=qpm,
        )
    torch.testing.assert_close(bad[~qpm], clean[~qpm], rtol=0, atol=0)
    assert torch.isfinite(bad).all()
    # any module mapping ids -> [b, p, c] works, e.g. a plain embedding table
    emb = nn.Embedding(30, C)
    dec2 = _cross(emb)
    torch.testing.assert_close(dec2.queries(ids), emb(ids) + dec2.mask_token)


def test_mae_decoder_uses_injected_positions() -> None:
    torch.manual_seed(0)
    n = 8
    qp = SpatioTemporalQueryPos(4, C, 2)
    dec = MAEDecoder(E, C, 1, H, 5, n, pos_embed=None, query_pos=qp).eval()
    ref = MAEDecoder(E, C, 1, H, 5, n, pos_embed=None).eval()
    own = {k: v for k, v in dec.state_dict().items() if not k.startswith("query_pos.")}
    ref.load_state_dict(own)
    ctx = randn(2, 2, 3, E)
    ids_keep = torch.tensor([[0, 5, 2], [7, 1, 0]])
    ids_pred = torch.tensor([[1, 3], [4, 6]])
    kpm = lengths_to_mask([3, 2], 3)
    with torch.no_grad():
        out = dec(ctx, ids_keep, ids_pred, context_padding_mask=kpm)
        expected = ref(
            ctx, ids_keep, ids_pred, context_padding_mask=kpm, pos=qp(torch.arange(n)[None])[0]
        )
    torch.testing.assert_close(out, expected)


def test_injection_errors() -> None:
    qp = SpatioTemporalQueryPos(6, C, 4)
    with pytest.raises(ValueError, match="pass pos_embed=None"):
        CrossMAEDecoder(E, C, 1, H, 5, num_tokens=24, query_pos=qp)
    with pytest.raises(ValueError, match="pass pos_embed=None"):
        MAEDecoder(E, C, 1, H, 5, 24, query_pos=qp)
    with pytest.raises(ValueError, match=r"query_pos\.dim is 16"):
        _cross(SpatioTemporalQueryPos(6, 16, 4))
    with pytest.raises(TypeError, match=r"query_pos must be an nn\.Module"):
        _cross(lambda ids: ids)  # type: ignore[arg-type]
    dec = _cross(qp)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="takes positions from query_pos"):
        dec(randn(0, 2, 4, E), ids, pos=randn(1, 24, C))

    class Wrong(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, C + 1)

    with pytest.raises(ValueError, match=r"it must return \[b, p, 8\]"):
        _cross(Wrong())(randn(0, 2, 4, E), ids)


def test_compile_autocast_float64() -> None:
    torch.manual_seed(0)
    dec = _cross(SpatioTemporalQueryPos(6, C, 4), drop=0.1, attn_drop=0.1, qkv_bias=False)
    dec.eval()
    ids = torch.tensor([[0, 7, 23], [3, 3, 0]])
    cpm = lengths_to_mask([4, 0], 4)
    ctx = randn(1, 2, 4, E)
    with torch.no_grad():
        eager = dec(ctx, ids, context_padding_mask=cpm)
        torch._dynamo.reset()
        compiled = torch.compile(dec, fullgraph=True, backend="eager")(
            ctx, ids, context_padding_mask=cpm
        )
        torch.testing.assert_close(compiled, eager)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = dec(ctx, ids, context_padding_mask=cpm)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), eager, atol=0.1, rtol=0.05)
    dec64 = dec.double()
    out64 = dec64(ctx.double(), ids, context_padding_mask=cpm)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), eager, atol=1e-5, rtol=1e-4)
