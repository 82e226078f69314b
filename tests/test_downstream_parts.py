"""The downstream water model's encoders and decoders, expressed with crossmae parts.

Parameter-count arithmetic against the original (26,449,212 parameters, configuration
d=256, 8 heads, raster encoders 6 layers, series encoders 4 (FiLM on 11 attributes), one
fusion layer, decoders d=128 x 4 layers without q/kv bias, 522 raster / 76 series patches,
94 land patches, 30 steps, 8 catchments per group, no WFM). Built on the meta device: only
shapes are needed.

Per part of the original (a post-norm layer of width d has 12·d² + 13·d parameters):

* raster encoder: Linear(100→256) 25,856 + spatial 94·256 24,064 + 6 layers 4,738,560 + LN 512
* series encoder: Linear(1→256) 512 + spatial 76·256 19,456 + 4 FiLM Tanh(Linear(11→512))
  24,576 + 4 layers 3,159,040 + LN 512 + static token Linear(11→256) 3,072
* fusion: 1 layer 789,760 + LN 512; modality tokens 5·256 + 5·128
* raster decoder: mask token 128 + spatial 522·128 66,816 + 4 blocks 922,624 + LN 256 + head
  Linear(128→100) 12,900; series decoder: the same with spatial 76·128, head Linear(128→8)
"""

from __future__ import annotations

import torch

from crossmae import CrossMAEDecoder, PostNormTransformerEncoder, SpatioTemporalQueryPos

ORIGINAL = 26_449_212
D, DD, HEADS, T = 256, 128, 8, 30


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _decoder(num_patches: int, out_dim: int, patch_index: torch.Tensor | None) -> CrossMAEDecoder:
    return CrossMAEDecoder(
        D,
        DD,
        4,
        HEADS,
        out_dim,
        qkv_bias=False,
        drop=0.1,
        attn_drop=0.1,
        pos_embed=None,
        modality_embed=True,
        query_pos=SpatioTemporalQueryPos(num_patches, DD, T, patch_index=patch_index),
    )


def test_downstream_encoders_and_decoders_parameter_count() -> None:
    land = torch.arange(0, 522, 522 // 94)[:94]  # any 94 valid patches: counts only
    with torch.device("meta"):
        raster_enc = PostNormTransformerEncoder(D, 6, HEADS)
        series_enc = PostNormTransformerEncoder(D, 4, HEADS, proj_drop=0.0, cond_dim=11)
        fusion = PostNormTransformerEncoder(D, 1, HEADS)
        raster_dec = _decoder(522, 100, land)
        series_dec = _decoder(76, 8, None)
    # each part against the original's arithmetic (module docstring)
    assert _n(raster_enc) == 6 * (12 * D * D + 13 * D) + 2 * D == 4_739_072
    assert _n(series_enc) == 4 * (12 * D * D + 13 * D) + 4 * (11 * 2 * D + 2 * D) + 2 * D
    assert _n(fusion) == 789_760 + 512
    # decoders: the original's + its decoder modality token (here modality_embed, 128)
    assert _n(raster_dec) == 1_002_724 + DD
    assert _n(series_dec) == 933_768 + DD
    # what the tokenizers hold in the original: value projections, learned spatial tables
    # and encoder modality tokens (the static token's Linear(11 -> 256) too)
    raster_tok = (100 * D + D) + 94 * D + D
    series_tok = (1 * D + D) + 76 * D + D + (11 * D + D)
    total = (
        3 * (_n(raster_enc) + raster_tok + _n(raster_dec))
        + 2 * (_n(series_enc) + series_tok + _n(series_dec))
        + _n(fusion)
    )
    print(
        f"downstream architecture from crossmae parts: {total:,} parameters (original {ORIGINAL:,})"
    )
    assert total == ORIGINAL
