"""Complete pre-training models: image CrossMAE and the multimodal (water) MAE, with their
configs, builders and presets."""

from __future__ import annotations

from .config import DecoderConfig, EncoderConfig, ImageCrossMAEConfig
from .factories import (
    PRESETS,
    build_crossmae_decoder,
    build_encoder,
    build_image_crossmae,
    build_mae_decoder,
    crossmae_vit_base,
    crossmae_vit_base_config,
    crossmae_vit_large,
    crossmae_vit_large_config,
    crossmae_vit_small,
    crossmae_vit_small_config,
)
from .image import ImageCrossMAE, ImageCrossMAEOutput
from .multimodal import (
    Modality,
    ModalityLoss,
    MultimodalMAE,
    MultimodalOutput,
    grouped_masking_fn,
    padding_wins,
    visible_site_mean,
)
from .official import OfficialLoadReport, load_official_crossmae_state_dict, official_key_for
from .water import WaterMAEConfig, build_water_mae, default_land_patches, water_mae_small

__all__ = [
    "PRESETS",
    "DecoderConfig",
    "EncoderConfig",
    "ImageCrossMAE",
    "ImageCrossMAEConfig",
    "ImageCrossMAEOutput",
    "Modality",
    "ModalityLoss",
    "MultimodalMAE",
    "MultimodalOutput",
    "OfficialLoadReport",
    "WaterMAEConfig",
    "build_crossmae_decoder",
    "build_encoder",
    "build_image_crossmae",
    "build_mae_decoder",
    "build_water_mae",
    "crossmae_vit_base",
    "crossmae_vit_base_config",
    "crossmae_vit_large",
    "crossmae_vit_large_config",
    "crossmae_vit_small",
    "crossmae_vit_small_config",
    "default_land_patches",
    "grouped_masking_fn",
    "load_official_crossmae_state_dict",
    "official_key_for",
    "padding_wins",
    "visible_site_mean",
    "water_mae_small",
]
