"""Builders that wire configured parts into models, and the named CrossMAE presets.

Builders are plain functions: they build every part from a config record and hand the
built parts to the module (torchtune style). Presets are zero-argument functions returning a
model (keyword arguments, when given, override fields of the preset's
`ImageCrossMAEConfig`); ``*_config`` companions return the record itself.

Presets (patch 16, image 224, MLP ratio 4, LayerNorm eps 1e-6, qkv bias, decoder depth 8;
pass ``decoder_depth=12`` for CrossMAE's deeper decoder):

==========================  =====  =====  =====  ===========  ===========
preset                      width  depth  heads  dec. width   dec. heads
==========================  =====  =====  =====  ===========  ===========
`crossmae_vit_small`        384    12     6      256          8
`crossmae_vit_base`         768    12     12     512          16
`crossmae_vit_large`        1024   24     16     512          16
==========================  =====  =====  =====  ===========  ===========

Build a large model without allocating memory on the ``meta`` device::

    with torch.device("meta"):
        model = crossmae_vit_large()
"""

from __future__ import annotations

from dataclasses import fields, replace
from functools import partial
from typing import Any, Callable, Optional, Union

import torch.nn as nn

from .._checks import check_int
from ..decoders.cross import CrossMAEDecoder
from ..decoders.mae import MAEDecoder
from ..encoders.transformer import TransformerEncoder, resolve_layer_indices
from ..layers.feature_maps import WeightedFeatureMaps
from ..layers.pos_embed import sincos_pos_embed_2d
from ..tokenizers.raster import PatchEmbed
from .config import DecoderConfig, EncoderConfig, ImageCrossMAEConfig
from .image import ImageCrossMAE

__all__ = [
    "PRESETS",
    "build_crossmae_decoder",
    "build_encoder",
    "build_image_crossmae",
    "build_mae_decoder",
    "crossmae_vit_base",
    "crossmae_vit_base_config",
    "crossmae_vit_large",
    "crossmae_vit_large_config",
    "crossmae_vit_small",
    "crossmae_vit_small_config",
]

IntPair = Union[int, tuple[int, int]]


def _layer_norm(eps: float) -> Callable[[int], nn.Module]:
    return partial(nn.LayerNorm, eps=eps)


def _check_type(name: str, value: object, cls: type) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


def build_encoder(config: EncoderConfig) -> TransformerEncoder:
    """A pre-norm ViT `TransformerEncoder` (LayerNorm with ``config.norm_eps``).

    Args:
        config: `EncoderConfig`.

    Returns:
        `TransformerEncoder` of width ``config.embed_dim``; its final norm is built only when
        ``config.final_norm``.
    """
    _check_type("config", config, EncoderConfig)
    return TransformerEncoder(
        config.embed_dim,
        config.depth,
        config.num_heads,
        config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop_path=config.drop_path,
        norm_layer=_layer_norm(config.norm_eps),
        final_norm=config.final_norm,
        fused_attn=config.fused_attn,
    )


def build_crossmae_decoder(
    config: DecoderConfig,
    *,
    context_dim: int,
    out_dim: int,
    grid_size: IntPair,
    num_feature_maps: Optional[int] = None,
) -> CrossMAEDecoder:
    """A `CrossMAEDecoder` with MAE's fixed 2D sin-cos query positions over a patch grid.

    Args:
        config: `DecoderConfig` (``use_cross_attn`` must be True).
        context_dim: encoder width ``e``.
        out_dim: values predicted per token (``ph * pw * C`` for images).
        grid_size: patch grid ``rows`` (square) or ``(rows, cols)``; the queries' fixed
            position table is ``sincos_pos_embed_2d(config.embed_dim, grid_size)``
            (a non-persistent buffer).
        num_feature_maps: number of encoder feature maps to mix (enables CrossMAE's weighted
            feature maps and one LayerNorm per decoder layer), or None.

    Returns:
        `CrossMAEDecoder` with ``mask_token``, ``wfm``/``dec_norms`` (feature weighting
        only), ``blocks``, ``norm`` and ``head``.
    """
    _check_type("config", config, DecoderConfig)
    if not config.use_cross_attn:
        raise ValueError(
            "build_crossmae_decoder needs config.use_cross_attn=True, got False "
            "(use build_mae_decoder)"
        )
    check_int("context_dim", context_dim, minimum=1)
    if num_feature_maps is not None:
        check_int("num_feature_maps", num_feature_maps, minimum=1)
    table = sincos_pos_embed_2d(config.embed_dim, grid_size)
    return CrossMAEDecoder(
        context_dim,
        config.embed_dim,
        config.depth,
        config.num_heads,
        out_dim,
        config.mlp_ratio,
        self_attn=config.self_attn,
        qkv_bias=config.qkv_bias,
        drop_path=config.drop_path,
        norm_layer=_layer_norm(config.norm_eps),
        num_feature_maps=num_feature_maps,
        num_tokens=table.shape[0],
        pos_embed=table,
        fused_attn=config.fused_attn,
    )


def build_mae_decoder(
    config: DecoderConfig,
    *,
    context_dim: int,
    out_dim: int,
    grid_size: IntPair,
) -> MAEDecoder:
    """An MAE self-attention `MAEDecoder` with a fixed 2D sin-cos table over a patch grid.

    Args:
        config: `DecoderConfig` (``self_attn`` is irrelevant: MAE's decoder always
            self-attends over the whole sequence).
        context_dim: encoder width ``e``.
        out_dim: values predicted per token.
        grid_size: patch grid ``rows`` or ``(rows, cols)``.

    Returns:
        `MAEDecoder` over ``rows * cols`` tokens.
    """
    _check_type("config", config, DecoderConfig)
    check_int("context_dim", context_dim, minimum=1)
    table = sincos_pos_embed_2d(config.embed_dim, grid_size)
    return MAEDecoder(
        context_dim,
        config.embed_dim,
        config.depth,
        config.num_heads,
        out_dim,
        table.shape[0],
        config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop_path=config.drop_path,
        norm_layer=_layer_norm(config.norm_eps),
        pos_embed=table,
        fused_attn=config.fused_attn,
    )


def build_image_crossmae(
    config: Optional[ImageCrossMAEConfig] = None,
    *,
    img_size: IntPair = 224,
    patch_size: IntPair = 16,
    in_chans: int = 3,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    decoder_embed_dim: int = 512,
    decoder_depth: int = 8,
    decoder_num_heads: int = 16,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    norm_eps: float = 1e-6,
    drop_path: float = 0.0,
    decoder_drop_path: float = 0.0,
    mask_ratio: float = 0.75,
    predict_ratio: float = 0.25,
    norm_pix_loss: bool = False,
    use_cross_attn: bool = True,
    decoder_self_attn: bool = False,
    use_weighted_fm: bool = True,
    fm_layers: Union[str, int, tuple[int, ...]] = "all",
    use_input: bool = False,
    fused_attn: Optional[bool] = None,
    encoder: Optional[nn.Module] = None,
) -> ImageCrossMAE:
    """Wire and initialize (MAE's scheme) an `ImageCrossMAE` (defaults: CrossMAE ViT-B/16).

    A plain function: copy it and swap a part to change the architecture; each part checks
    its own arguments. Keyword arguments mirror `ImageCrossMAEConfig`'s fields; a config
    may be passed instead (0.1 style), then no keyword argument may be given.

    Wiring: `PatchEmbed` (``proj`` of shape ``[e, C, ph, pw]``) → ViT `TransformerEncoder`
    (final norm only without feature weighting) → `CrossMAEDecoder` (``use_cross_attn``) or
    `MAEDecoder`, with MAE's fixed 2D sin-cos query positions. With ``use_weighted_fm`` the
    CrossMAE decoder mixes the encoder blocks ``fm_layers`` (± the input) per decoder layer;
    the MAE decoder gets one learned mix (``WeightedFeatureMaps(f, 1)``) and a LayerNorm.

    ``encoder``: any `crossmae.Encoder` of width ``embed_dim`` (e.g. the timm adapter of the
    how-to) used instead of the ViT `TransformerEncoder` (``depth`` must then be its depth;
    with ``use_weighted_fm`` it must not apply an unused final norm). A given encoder keeps
    its weights (e.g. pretrained ones); every other part gets MAE's initialization.

    Returns:
        A freshly initialized `ImageCrossMAE` (on the current default device; use
        ``with torch.device("meta"):`` to build without allocating).
    """
    if config is not None:
        _check_type("config", config, ImageCrossMAEConfig)
        given = {k: v for k, v in locals().items() if k in _FIELDS and v != _FIELDS[k]}
        if given:
            raise TypeError(
                f"pass either config or keyword arguments, not both (got {sorted(given)})"
            )
        return build_image_crossmae(**{f: getattr(config, f) for f in _FIELDS}, encoder=encoder)
    norm = _layer_norm(norm_eps)
    patch_embed = PatchEmbed(embed_dim, patch_size, img_size, in_chans=in_chans)
    grid = patch_embed.grid_size
    assert grid is not None  # PatchEmbed was given img_size
    taps = resolve_layer_indices(fm_layers, depth, "fm_layers") if use_weighted_fm else None
    num_maps = None if taps is None else len(taps) + int(use_input)
    encoder_given = encoder
    if encoder is None:
        encoder = TransformerEncoder(
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path,
            norm_layer=norm, final_norm=not use_weighted_fm, fused_attn=fused_attn,
        )  # fmt: skip
    table = sincos_pos_embed_2d(decoder_embed_dim, grid)
    patch_dim = patch_embed.patch_size[0] * patch_embed.patch_size[1] * in_chans
    decoder: Union[CrossMAEDecoder, MAEDecoder]
    feature_mix, feature_norm = None, None
    if use_cross_attn:
        decoder = CrossMAEDecoder(
            embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, patch_dim,
            mlp_ratio, self_attn=decoder_self_attn, qkv_bias=qkv_bias,
            drop_path=decoder_drop_path, norm_layer=norm, num_feature_maps=num_maps,
            num_tokens=table.shape[0], pos_embed=table, fused_attn=fused_attn,
        )  # fmt: skip
    else:
        decoder = MAEDecoder(
            embed_dim, decoder_embed_dim, decoder_depth, decoder_num_heads, patch_dim,
            table.shape[0], mlp_ratio, qkv_bias=qkv_bias, drop_path=decoder_drop_path,
            norm_layer=norm, pos_embed=table, fused_attn=fused_attn,
        )  # fmt: skip
        if num_maps is not None:
            feature_mix, feature_norm = WeightedFeatureMaps(num_maps, 1), norm(embed_dim)
    model = ImageCrossMAE(
        patch_embed, encoder, decoder, img_size=img_size, patch_size=patch_size,
        in_chans=in_chans, mask_ratio=mask_ratio, predict_ratio=predict_ratio,
        norm_pix_loss=norm_pix_loss, fm_layers=taps, use_input=use_input and taps is not None,
        feature_mix=feature_mix, feature_norm=feature_norm,
    )  # fmt: skip
    own_state = {} if encoder_given is None else encoder_given.state_dict()
    kept = {k: v.clone() for k, v in own_state.items() if not v.is_meta}
    model.initialize_weights()
    if encoder_given is not None and kept:
        encoder_given.load_state_dict(kept, strict=False)
    return model


_FIELDS = {f.name: f.default for f in fields(ImageCrossMAEConfig)}


def crossmae_vit_small_config(**overrides: Any) -> ImageCrossMAEConfig:
    """CrossMAE ViT-S/16: width 384, 12 blocks, 6 heads; decoder 256 wide, 8 heads, 8 blocks.

    Keyword arguments override `ImageCrossMAEConfig` fields.
    """
    base = ImageCrossMAEConfig(
        embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_num_heads=8
    )
    return replace(base, **overrides)


def crossmae_vit_base_config(**overrides: Any) -> ImageCrossMAEConfig:
    """CrossMAE ViT-B/16: width 768, 12 blocks, 12 heads; decoder 512 wide, 16 heads, 8 blocks.

    Keyword arguments override `ImageCrossMAEConfig` fields.
    """
    base = ImageCrossMAEConfig(
        embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_num_heads=16
    )
    return replace(base, **overrides)


def crossmae_vit_large_config(**overrides: Any) -> ImageCrossMAEConfig:
    """CrossMAE ViT-L/16: width 1024, 24 blocks, 16 heads; decoder 512 wide, 16 heads, 8 blocks.

    Keyword arguments override `ImageCrossMAEConfig` fields.
    """
    base = ImageCrossMAEConfig(
        embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_num_heads=16
    )
    return replace(base, **overrides)


def crossmae_vit_small(**overrides: Any) -> ImageCrossMAE:
    """`build_image_crossmae` (`crossmae_vit_small_config` (``**overrides``))."""
    return build_image_crossmae(crossmae_vit_small_config(**overrides))


def crossmae_vit_base(**overrides: Any) -> ImageCrossMAE:
    """`build_image_crossmae` (`crossmae_vit_base_config` (``**overrides``))."""
    return build_image_crossmae(crossmae_vit_base_config(**overrides))


def crossmae_vit_large(**overrides: Any) -> ImageCrossMAE:
    """`build_image_crossmae` (`crossmae_vit_large_config` (``**overrides``))."""
    return build_image_crossmae(crossmae_vit_large_config(**overrides))


#: Preset name → zero-argument builder.
PRESETS: dict[str, Callable[..., ImageCrossMAE]] = {
    "crossmae_vit_small": crossmae_vit_small,
    "crossmae_vit_base": crossmae_vit_base,
    "crossmae_vit_large": crossmae_vit_large,
}
