"""The multimodal hydrology MAE (rasters over a land mask + catchment series), as a preset.

Default shapes follow the downstream water model: three rasters ``[b, 30, 290, 180]`` cut
into 10x10 patches (522 per step, 94 of them land), two catchment series over 604 sites
grouped 8 per patch (76 patches) with 11 static attributes per site, encoders of width 256
(6 layers for rasters, 4 FiLM-conditioned layers for series, plus one static token), one
fusion layer, and five CrossMAE decoders of width 128 x 4 layers; loss weights
100/10/10/1/1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor

from .._checks import check_int, check_probability
from ..decoders.cross import CrossMAEDecoder
from ..decoders.mae import MAEDecoder
from ..encoders.transformer import LayerSelection, TransformerEncoder, resolve_layer_indices
from ..layers.pos_embed import sincos_pos_embed_2d_from_coords
from ..tokenizers.raster import RasterTokenizer, raster_position_embedding
from ..tokenizers.series import SeriesTokenizer, StaticToken
from .multimodal import Modality, MultimodalMAE, grouped_masking_fn

__all__ = ["WaterMAEConfig", "build_water_mae", "default_land_patches", "water_mae_small"]


def default_land_patches(num_patches: int = 522, num_land: int = 94, seed: int = 0) -> Tensor:
    """A fixed pseudo-random valid-patch mask (bool ``[num_patches]``, True = land).

    Stand-in for a real land mask with the right count; pass your own ``valid_patch_mask``.
    """
    n = check_int("num_patches", num_patches, minimum=1)
    k = check_int("num_land", num_land, minimum=0)
    if k > n:
        raise ValueError(f"num_land ({k}) must be <= num_patches ({n})")
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:k]] = True
    return mask


@dataclass(frozen=True)
class WaterMAEConfig:
    """Configuration of `build_water_mae` (defaults: the water model's real config).

    ``mask_ratio=0.39`` reproduces the water model's counts with crossmae's formula
    ``n_keep = int(n * (1 - mask_ratio))``: 57 of 94 land patches visible per step (37 hidden)
    and 46 of 76 series patches (the original code hid ``int(n * 0.4)``).

    Switches: ``use_cross_attn`` (False → MAE-style decoders), ``decoder_self_attn``,
    ``use_weighted_fm`` (decoders mix the fusion layers ``fm_layers``, plus the fusion input
    with ``use_input``).
    """

    raster_names: tuple[str, ...] = ("precipitation", "soil_moisture", "temperature")
    series_names: tuple[str, ...] = ("evaporation", "river_flow")
    loss_weights: tuple[float, ...] = (100.0, 10.0, 10.0, 1.0, 1.0)
    num_steps: int = 30
    image_size: tuple[int, int] = (290, 180)
    patch_size: tuple[int, int] = (10, 10)
    valid_patch_mask: Optional[Tensor] = field(default=None, compare=False)
    num_land_patches: int = 94
    num_sites: int = 604
    group_size: int = 8
    num_static: int = 11
    embed_dim: int = 256
    num_heads: int = 8
    raster_depth: int = 6
    series_depth: int = 4
    fusion_depth: int = 1
    decoder_dim: int = 128
    decoder_depth: int = 4
    decoder_num_heads: int = 8
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.39
    predict_ratio: Optional[float] = None
    use_cross_attn: bool = True
    decoder_self_attn: bool = False
    use_weighted_fm: bool = False
    fm_layers: LayerSelection = "all"
    use_input: bool = False
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        n_mod = len(self.raster_names) + len(self.series_names)
        if len(self.loss_weights) != n_mod:
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries but there are {n_mod} "
                f"modalities ({self.raster_names + self.series_names})"
            )
        names = self.raster_names + self.series_names
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        for f in ("num_steps", "num_sites", "group_size", "num_static", "embed_dim"):
            check_int(f, getattr(self, f), minimum=1)
        for f in ("num_heads", "raster_depth", "series_depth", "decoder_dim", "decoder_depth"):
            check_int(f, getattr(self, f), minimum=1)
        check_int("fusion_depth", self.fusion_depth, minimum=0)
        check_probability("mask_ratio", self.mask_ratio)
        if self.use_weighted_fm and self.fusion_depth == 0:
            raise ValueError("use_weighted_fm=True needs fusion_depth >= 1")
        if self.use_weighted_fm:
            resolve_layer_indices(self.fm_layers, self.fusion_depth)


def _series_positions(dim: int, t_index: Tensor, loc_index: Tensor) -> Tensor:
    """Fixed decoder positions of series tokens: 2D sin-cos of (step, patch index)."""
    return sincos_pos_embed_2d_from_coords(dim, torch.stack([t_index, loc_index], dim=-1))


def _decoder(
    cfg: WaterMAEConfig, out_dim: int, pos: Tensor, fm_count: Optional[int]
) -> CrossMAEDecoder | MAEDecoder:
    if cfg.use_cross_attn:
        return CrossMAEDecoder(
            cfg.embed_dim,
            cfg.decoder_dim,
            cfg.decoder_depth,
            cfg.decoder_num_heads,
            out_dim,
            cfg.mlp_ratio,
            self_attn=cfg.decoder_self_attn,
            drop_path=cfg.drop_path,
            num_feature_maps=fm_count,
            pos_embed=pos,
            modality_embed=True,
        )
    return MAEDecoder(
        cfg.embed_dim,
        cfg.decoder_dim,
        cfg.decoder_depth,
        cfg.decoder_num_heads,
        out_dim,
        num_tokens=pos.shape[0],
        mlp_ratio=cfg.mlp_ratio,
        drop_path=cfg.drop_path,
        pos_embed=pos,
        modality_embed=True,
    )


def build_water_mae(config: Optional[WaterMAEConfig] = None) -> MultimodalMAE:
    """Wire tokenizers, encoders, fusion and decoders for the water model.

    Inputs of the built model: rasters ``[b, t, H, W]`` (NaN = missing), series
    ``[b, sites, t]`` (NaN = missing, e.g. river flow before 1989), ``static=[b, sites, a]``
    and optionally ``site_padding_mask=[b, sites]`` (True = padding site).
    """
    cfg = config or WaterMAEConfig()
    gh = cfg.image_size[0] // cfg.patch_size[0]
    gw = cfg.image_size[1] // cfg.patch_size[1]
    valid = cfg.valid_patch_mask
    if valid is None:
        valid = default_land_patches(gh * gw, cfg.num_land_patches)
    fm_count: Optional[int] = None
    if cfg.use_weighted_fm:
        fm_count = len(resolve_layer_indices(cfg.fm_layers, cfg.fusion_depth)) + int(cfg.use_input)
    mask_fn = grouped_masking_fn(cfg.mask_ratio, cfg.predict_ratio)
    modalities: dict[str, Modality] = {}
    weights = dict(zip(cfg.raster_names + cfg.series_names, cfg.loss_weights))
    for name in cfg.raster_names:
        tok = RasterTokenizer(
            cfg.embed_dim,
            cfg.patch_size,
            cfg.image_size,
            valid_patch_mask=valid,
            spatial_embed="learned",
            modality_embed=True,
        )
        enc = TransformerEncoder(
            cfg.embed_dim,
            cfg.raster_depth,
            cfg.num_heads,
            cfg.mlp_ratio,
            drop_path=cfg.drop_path,
            final_norm=True,
        )
        out_dim = cfg.patch_size[0] * cfg.patch_size[1]
        modalities[name] = Modality(
            tok,
            enc,
            # queries know (step, row, col) like the tokens: the tokenizer's sin-cos formula
            _decoder(
                cfg,
                out_dim,
                raster_position_embedding(cfg.decoder_dim, tok.patch_coords, cfg.num_steps),
                fm_count,
            ),
            masking=mask_fn,
            loss_weight=weights[name],
            num_steps=cfg.num_steps,
        )
    for name in cfg.series_names:
        stok = SeriesTokenizer(
            cfg.embed_dim, cfg.num_sites, group_size=cfg.group_size, modality_embed=True
        )
        t_idx, p_idx = stok.token_positions(cfg.num_steps)
        enc = TransformerEncoder(
            cfg.embed_dim,
            cfg.series_depth,
            cfg.num_heads,
            cfg.mlp_ratio,
            drop_path=cfg.drop_path,
            final_norm=True,
            cond_dim=cfg.embed_dim,
        )
        modalities[name] = Modality(
            stok,
            enc,
            _decoder(
                cfg, cfg.group_size, _series_positions(cfg.decoder_dim, t_idx, p_idx), fm_count
            ),
            masking=mask_fn,
            static_token=StaticToken(cfg.num_static, cfg.embed_dim, per_site=True),
            loss_weight=weights[name],
            num_steps=cfg.num_steps,
        )
    fusion = None
    if cfg.fusion_depth > 0:
        fusion = TransformerEncoder(
            cfg.embed_dim,
            cfg.fusion_depth,
            cfg.num_heads,
            cfg.mlp_ratio,
            final_norm=not cfg.use_weighted_fm,
        )
    return MultimodalMAE(
        modalities,
        fusion,
        use_weighted_fm=cfg.use_weighted_fm,
        fm_layers=cfg.fm_layers,
        use_input=cfg.use_input,
    )


def water_mae_small(**overrides: Any) -> MultimodalMAE:
    """The water model's default configuration (see module docstring); fields of
    `WaterMAEConfig` may be overridden, e.g. ``water_mae_small(num_steps=4)``."""
    return build_water_mae(replace(WaterMAEConfig(), **overrides))
