"""crossmae: padding-correct, fast Masked-Autoencoder building blocks for PyTorch.

Conventions (everywhere): tokens are ``[b, n, c]`` batch-first; every ``*_padding_mask`` is
bool ``[b, n]`` with **True = padding slot**; ``visible_mask`` True = seen by the encoder;
``predict_mask`` True = reconstruction target; ``ids_*`` are int64 indices into the full
sequence. See the docs' Conventions page.
"""

from __future__ import annotations

import warnings as _warnings

with _warnings.catch_warnings():
    # Without NumPy, torch's import warns "Failed to initialize NumPy"; a top-level
    # `import torch` never shows it, but a first import from inside a package (here) would.
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch as _torch  # noqa: F401

from ._config import (
    PADDED_ATTENTION_KERNELS,
    padded_attention_kernel,
    set_fused_attn,
    set_padded_attention_kernel,
    use_fused_attn,
)
from .decoders import CrossMAEDecoder, MAEDecoder
from .encoders import EncoderOutput, FiLM, TransformerEncoder
from .layers import (
    Attention,
    Block,
    CrossAttention,
    CrossAttentionBlock,
    DropPath,
    Mlp,
    PackedTokens,
    StackedLayerNorm,
    WeightedFeatureMaps,
    drop_path,
    pack_tokens,
    packed_attention,
    padded_attention,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
    sincos_pos_embed_2d_from_coords,
    unpack_tokens,
)
from .layers.backend import AttentionPlan, KernelRule, kernel_table, set_kernel_table
from .losses import MaskedMSELoss, masked_mse_loss, norm_pix_target, weighted_sum_losses
from .masking import (
    MaskSplit,
    channel_masking,
    chunk_masking,
    gather_tokens,
    grouped_random_masking,
    lengths_to_padding_mask,
    mask_missing_samples,
    mask_split_from_masks,
    modality_dropout,
    padding_mask_to_lengths,
    random_masking,
    scatter_tokens,
    tail_masking,
    time_step_masking,
    tube_masking,
)
from .models import (
    DecoderConfig,
    EncoderConfig,
    ImageCrossMAE,
    ImageCrossMAEConfig,
    ImageCrossMAEOutput,
    Modality,
    MultimodalMAE,
    MultimodalOutput,
    OfficialLoadReport,
    WaterMAEConfig,
    build_crossmae_decoder,
    build_encoder,
    build_image_crossmae,
    build_mae_decoder,
    build_water_mae,
    crossmae_vit_base,
    crossmae_vit_base_config,
    crossmae_vit_large,
    crossmae_vit_large_config,
    crossmae_vit_small,
    crossmae_vit_small_config,
    load_official_crossmae_state_dict,
    water_mae_small,
)
from .tokenizers import (
    PatchEmbed,
    RasterTokenizer,
    SeriesTokenizer,
    StaticToken,
    append_tokens,
    patchify,
    raster_position_embedding,
    unpatchify,
    valid_patches_from_mask,
)

__version__ = "0.1.0"

__all__ = [
    "PADDED_ATTENTION_KERNELS",
    "Attention",
    "AttentionPlan",
    "Block",
    "CrossAttention",
    "CrossAttentionBlock",
    "CrossMAEDecoder",
    "DecoderConfig",
    "DropPath",
    "EncoderConfig",
    "EncoderOutput",
    "FiLM",
    "ImageCrossMAE",
    "ImageCrossMAEConfig",
    "ImageCrossMAEOutput",
    "KernelRule",
    "MAEDecoder",
    "MaskSplit",
    "MaskedMSELoss",
    "Mlp",
    "Modality",
    "MultimodalMAE",
    "MultimodalOutput",
    "OfficialLoadReport",
    "PackedTokens",
    "PatchEmbed",
    "RasterTokenizer",
    "SeriesTokenizer",
    "StackedLayerNorm",
    "StaticToken",
    "TransformerEncoder",
    "WaterMAEConfig",
    "WeightedFeatureMaps",
    "__version__",
    "append_tokens",
    "build_crossmae_decoder",
    "build_encoder",
    "build_image_crossmae",
    "build_mae_decoder",
    "build_water_mae",
    "channel_masking",
    "chunk_masking",
    "crossmae_vit_base",
    "crossmae_vit_base_config",
    "crossmae_vit_large",
    "crossmae_vit_large_config",
    "crossmae_vit_small",
    "crossmae_vit_small_config",
    "drop_path",
    "gather_tokens",
    "grouped_random_masking",
    "kernel_table",
    "lengths_to_padding_mask",
    "load_official_crossmae_state_dict",
    "mask_missing_samples",
    "mask_split_from_masks",
    "masked_mse_loss",
    "modality_dropout",
    "norm_pix_target",
    "pack_tokens",
    "packed_attention",
    "padded_attention",
    "padded_attention_kernel",
    "padding_mask_to_lengths",
    "patchify",
    "random_masking",
    "raster_position_embedding",
    "scatter_tokens",
    "set_fused_attn",
    "set_kernel_table",
    "set_padded_attention_kernel",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_2d_from_coords",
    "tail_masking",
    "time_step_masking",
    "tube_masking",
    "unpack_tokens",
    "unpatchify",
    "use_fused_attn",
    "valid_patches_from_mask",
    "water_mae_small",
    "weighted_sum_losses",
]
