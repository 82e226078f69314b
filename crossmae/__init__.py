"""crossmae: padding-correct, fast Masked-Autoencoder building blocks for PyTorch.

Conventions (everywhere): tokens are ``[b, n, c]`` batch-first; every ``*_padding_mask`` is
bool ``[b, n]`` with **True = padding slot**; ``visible_mask`` True = seen by the encoder;
``predict_mask`` True = reconstruction target; ``ids_*`` are int64 indices into the full
sequence. See the docs' Conventions page.
"""

from __future__ import annotations

from ._config import set_fused_attn, use_fused_attn
from .decoders import CrossMAEDecoder, MAEDecoder
from .encoders import EncoderOutput, FiLM, TransformerEncoder
from .layers import (
    Attention,
    Block,
    CrossAttention,
    CrossAttentionBlock,
    DropPath,
    Mlp,
    StackedLayerNorm,
    WeightedFeatureMaps,
    drop_path,
    padded_attention,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
    sincos_pos_embed_2d_from_coords,
)
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

__version__ = "0.1.0.dev0"

__all__ = [
    "Attention",
    "Block",
    "CrossAttention",
    "CrossAttentionBlock",
    "CrossMAEDecoder",
    "DropPath",
    "EncoderOutput",
    "FiLM",
    "MAEDecoder",
    "MaskSplit",
    "MaskedMSELoss",
    "Mlp",
    "PatchEmbed",
    "RasterTokenizer",
    "SeriesTokenizer",
    "StackedLayerNorm",
    "StaticToken",
    "TransformerEncoder",
    "WeightedFeatureMaps",
    "__version__",
    "append_tokens",
    "channel_masking",
    "chunk_masking",
    "drop_path",
    "gather_tokens",
    "grouped_random_masking",
    "lengths_to_padding_mask",
    "mask_missing_samples",
    "mask_split_from_masks",
    "masked_mse_loss",
    "modality_dropout",
    "norm_pix_target",
    "padded_attention",
    "padding_mask_to_lengths",
    "patchify",
    "random_masking",
    "raster_position_embedding",
    "scatter_tokens",
    "set_fused_attn",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_2d_from_coords",
    "tail_masking",
    "time_step_masking",
    "tube_masking",
    "unpatchify",
    "use_fused_attn",
    "valid_patches_from_mask",
    "weighted_sum_losses",
]
