"""The multimodal hydrology MAE (rasters over a land mask + catchment series), as a preset.

Default shapes follow the downstream water model: three rasters ``[b, 30, 290, 180]`` cut
into 10x10 patches (522 per step, 94 of them land), two catchment series over 604 sites
grouped 8 per patch (76 patches) with 11 static attributes per site, encoders of width 256
(6 layers for rasters, 4 FiLM-conditioned layers for series, plus one static token), one
fusion layer, and five CrossMAE decoders of width 128 x 4 layers; loss weights
100/10/10/1/1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..decoders.cross import CrossMAEDecoder
from ..decoders.mae import MAEDecoder
from ..encoders.transformer import LayerSelection, TransformerEncoder, resolve_layer_indices
from ..layers.pos_embed import sincos_pos_embed_2d_from_coords
from ..tokenizers.raster import RasterTokenizer, raster_position_embedding
from ..tokenizers.series import SeriesTokenizer, StaticToken
from .config import _bool, _float, _int, _pair
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
        o = "WaterMAEConfig"
        for f in ("raster_names", "series_names", "loss_weights"):
            value = getattr(self, f)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise TypeError(f"{o}.{f} must be a tuple, got {value!r}")
            object.__setattr__(self, f, tuple(value))
        names = self.raster_names + self.series_names
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"{o} modality names must be non-empty strings, got {name!r}")
        if not names:
            raise ValueError(f"{o}.raster_names and {o}.series_names are both empty")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"{o}: modality names must be unique, got {names} (repeated: {dupes})")
        if len(self.loss_weights) != len(names):
            raise ValueError(
                f"{o}.loss_weights has {len(self.loss_weights)} entries but there are "
                f"{len(names)} modalities ({names})"
            )
        for i, w in enumerate(self.loss_weights):
            if _float(o, f"loss_weights[{i}]", w) < 0:
                raise ValueError(f"{o}.loss_weights[{i}] must be >= 0, got {w!r}")
        for f in (
            "num_steps",
            "num_sites",
            "group_size",
            "num_static",
            "embed_dim",
            "num_heads",
            "raster_depth",
            "series_depth",
            "decoder_dim",
            "decoder_depth",
            "decoder_num_heads",
        ):
            _int(o, f, getattr(self, f))
        _int(o, "fusion_depth", self.fusion_depth, minimum=0)
        # token width: divisible into heads, even (sin-cos time embedding of the tokenizers)
        if self.embed_dim % self.num_heads != 0 or self.embed_dim % 2 != 0:
            raise ValueError(
                f"{o}.embed_dim must be even and divisible by {o}.num_heads "
                f"({self.num_heads}), got {self.embed_dim}"
            )
        # decoder width: divisible into heads, a multiple of 4 (2D sin-cos query positions)
        if self.decoder_dim % self.decoder_num_heads != 0 or self.decoder_dim % 4 != 0:
            raise ValueError(
                f"{o}.decoder_dim must be a multiple of 4 and divisible by "
                f"{o}.decoder_num_heads ({self.decoder_num_heads}), got {self.decoder_dim}"
            )
        image = _pair(o, "image_size", self.image_size)
        patch = _pair(o, "patch_size", self.patch_size)
        object.__setattr__(self, "image_size", image)
        object.__setattr__(self, "patch_size", patch)
        if image[0] % patch[0] != 0 or image[1] % patch[1] != 0:
            raise ValueError(f"{o}.image_size {image} is not divisible by {o}.patch_size {patch}")
        num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
        if self.valid_patch_mask is None:
            land = _int(o, "num_land_patches", self.num_land_patches)
            if land > num_patches:
                raise ValueError(
                    f"{o}.num_land_patches ({land}) must be <= the {num_patches} patches of "
                    f"the {image[0] // patch[0]}x{image[1] // patch[1]} grid (image_size "
                    f"{image}, patch_size {patch})"
                )
        elif not isinstance(self.valid_patch_mask, torch.Tensor):
            raise TypeError(
                f"{o}.valid_patch_mask must be a bool tensor [{num_patches}] or None, got "
                f"{type(self.valid_patch_mask).__name__}"
            )
        if _float(o, "mlp_ratio", self.mlp_ratio) <= 0:
            raise ValueError(f"{o}.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        dp = _float(o, "drop_path", self.drop_path)
        if not 0.0 <= dp < 1.0:
            raise ValueError(f"{o}.drop_path must be in [0, 1), got {self.drop_path!r}")
        mr = _float(o, "mask_ratio", self.mask_ratio)
        if not 0.0 <= mr < 1.0:
            raise ValueError(f"{o}.mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        if self.predict_ratio is not None:
            pr = _float(o, "predict_ratio", self.predict_ratio)
            if not 0.0 < pr <= mr:
                raise ValueError(
                    f"{o}.predict_ratio must satisfy 0 < predict_ratio <= mask_ratio "
                    f"({self.mask_ratio!r}), got {self.predict_ratio!r}"
                )
        for f in ("use_cross_attn", "decoder_self_attn", "use_weighted_fm", "use_input"):
            _bool(o, f, getattr(self, f))
        if self.use_weighted_fm and self.fusion_depth == 0:
            raise ValueError(f"{o}: use_weighted_fm=True needs fusion_depth >= 1, got 0")
        if self.use_weighted_fm:
            layers = self.fm_layers
            if isinstance(layers, list):
                object.__setattr__(self, "fm_layers", tuple(layers))
            resolve_layer_indices(self.fm_layers, self.fusion_depth, "fm_layers")


def _series_positions(dim: int, t_index: Tensor, loc_index: Tensor) -> Tensor:
    """Fixed decoder positions of series tokens: 2D sin-cos of (step, patch index)."""
    return sincos_pos_embed_2d_from_coords(dim, torch.stack([t_index, loc_index], dim=-1))


_DEFAULTS = WaterMAEConfig()

EncoderFn = Callable[[str, int, Optional[int]], nn.Module]
"""``encoder_fn(name, depth, cond_dim) -> Encoder``: builds one encoder of the water model."""


def build_water_mae(
    config: Optional[WaterMAEConfig] = None,
    *,
    raster_names: tuple[str, ...] = _DEFAULTS.raster_names,
    series_names: tuple[str, ...] = _DEFAULTS.series_names,
    loss_weights: tuple[float, ...] = _DEFAULTS.loss_weights,
    num_steps: int = 30,
    image_size: tuple[int, int] = (290, 180),
    patch_size: tuple[int, int] = (10, 10),
    valid_patch_mask: Optional[Tensor] = None,
    num_land_patches: int = 94,
    num_sites: int = 604,
    group_size: int = 8,
    num_static: int = 11,
    embed_dim: int = 256,
    num_heads: int = 8,
    raster_depth: int = 6,
    series_depth: int = 4,
    fusion_depth: int = 1,
    decoder_dim: int = 128,
    decoder_depth: int = 4,
    decoder_num_heads: int = 8,
    mlp_ratio: float = 4.0,
    mask_ratio: float = 0.39,
    predict_ratio: Optional[float] = None,
    use_cross_attn: bool = True,
    decoder_self_attn: bool = False,
    use_weighted_fm: bool = False,
    fm_layers: LayerSelection = "all",
    use_input: bool = False,
    drop_path: float = 0.0,
    encoder_fn: Optional[EncoderFn] = None,
) -> MultimodalMAE:
    """Wire tokenizers, encoders, fusion and decoders for the water model (a plain function:
    copy it and swap a part to change the architecture; the parts check their arguments).

    Keyword arguments are the configuration (defaults: the water model, see the module
    docstring and `WaterMAEConfig`, whose fields they mirror). A `WaterMAEConfig` may be
    passed instead (0.1 style); then no keyword argument may be given.

    ``encoder_fn(name, depth, cond_dim) -> Encoder`` builds the encoder of each modality
    (``name``; ``cond_dim`` is ``embed_dim`` for the FiLM-conditioned series encoders, else
    None) and the fusion (``name="fusion"``); any `crossmae.Encoder` of width ``embed_dim``
    fits, e.g. ``PostNormTransformerEncoder``. Default: pre-norm `TransformerEncoder`.

    Inputs of the built model: rasters ``[b, t, H, W]`` (NaN = missing, ``t <= num_steps``),
    series ``[b, sites, t]`` (NaN = missing, e.g. river flow before 1989),
    ``static=[b, sites, a]`` and optionally ``site_padding_mask=[b, sites]`` (True = padding
    site).
    """
    if config is not None:
        if not isinstance(config, WaterMAEConfig):
            raise TypeError(
                f"config must be a WaterMAEConfig or None, got {type(config).__name__}; pass "
                "keyword arguments (build_water_mae(num_steps=4, ...)) or a WaterMAEConfig"
            )
        given = {k: v for k, v in locals().items() if k in _FIELDS and _differs(v, _FIELDS[k])}
        if given:
            raise TypeError(
                f"pass either config or keyword arguments, not both (got {sorted(given)})"
            )
        return build_water_mae(**{f: getattr(config, f) for f in _FIELDS}, encoder_fn=encoder_fn)
    names = tuple(raster_names) + tuple(series_names)
    if len(tuple(loss_weights)) != len(names):
        raise ValueError(
            f"loss_weights has {len(tuple(loss_weights))} entries but there are {len(names)} "
            f"modalities ({names})"
        )
    weights = dict(zip(names, loss_weights))
    if valid_patch_mask is None:
        grid = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
        valid_patch_mask = default_land_patches(grid, num_land_patches)
    fm_count = None
    if use_weighted_fm:
        fm_count = len(resolve_layer_indices(fm_layers, fusion_depth, "fm_layers")) + int(use_input)
    masking = grouped_masking_fn(mask_ratio, predict_ratio)

    def encoder(name: str, depth: int, cond_dim: Optional[int] = None) -> nn.Module:
        if encoder_fn is not None:
            return encoder_fn(name, depth, cond_dim)
        final_norm = not (name == "fusion" and use_weighted_fm)
        return TransformerEncoder(
            embed_dim, depth, num_heads, mlp_ratio, drop_path=0.0 if name == "fusion" else drop_path,
            cond_dim=cond_dim, final_norm=final_norm,
        )  # fmt: skip

    def decoder(out_dim: int, pos: Tensor) -> CrossMAEDecoder | MAEDecoder:
        if use_cross_attn:
            return CrossMAEDecoder(
                embed_dim, decoder_dim, decoder_depth, decoder_num_heads, out_dim, mlp_ratio,
                self_attn=decoder_self_attn, drop_path=drop_path, num_feature_maps=fm_count,
                pos_embed=pos, modality_embed=True,
            )  # fmt: skip
        return MAEDecoder(
            embed_dim, decoder_dim, decoder_depth, decoder_num_heads, out_dim,
            num_tokens=pos.shape[0], mlp_ratio=mlp_ratio, drop_path=drop_path, pos_embed=pos,
            modality_embed=True,
        )  # fmt: skip

    modalities: dict[str, Modality] = {}
    for name in raster_names:
        tok = RasterTokenizer(
            embed_dim, patch_size, image_size, valid_patch_mask=valid_patch_mask,
            spatial_embed="learned", modality_embed=True,
        )  # fmt: skip
        # queries know (step, row, col) like the tokens: the tokenizer's sin-cos formula
        pos = raster_position_embedding(decoder_dim, tok.patch_coords, num_steps)
        modalities[name] = Modality(
            tok, encoder(name, raster_depth), decoder(patch_size[0] * patch_size[1], pos),
            masking=masking, loss_weight=weights[name], num_steps=num_steps,
        )  # fmt: skip
    for name in series_names:
        stok = SeriesTokenizer(embed_dim, num_sites, group_size=group_size, modality_embed=True)
        pos = _series_positions(decoder_dim, *stok.token_positions(num_steps))
        modalities[name] = Modality(
            stok, encoder(name, series_depth, cond_dim=embed_dim), decoder(group_size, pos),
            masking=masking, static_token=StaticToken(num_static, embed_dim, per_site=True),
            loss_weight=weights[name], num_steps=num_steps,
        )  # fmt: skip
    fusion = encoder("fusion", fusion_depth) if fusion_depth > 0 else None
    return MultimodalMAE(
        modalities, fusion, use_weighted_fm=use_weighted_fm, fm_layers=fm_layers,
        use_input=use_input,
    )  # fmt: skip


_FIELDS = {f.name: f.default for f in fields(WaterMAEConfig)}


def _differs(value: object, default: object) -> bool:
    if isinstance(value, Tensor) or isinstance(default, Tensor):
        return value is not default
    return bool(value != default)


def water_mae_small(**overrides: Any) -> MultimodalMAE:
    """The water model's default configuration (see module docstring); fields of
    `WaterMAEConfig` may be overridden, e.g. ``water_mae_small(num_steps=4)``."""
    return build_water_mae(replace(WaterMAEConfig(), **overrides))
