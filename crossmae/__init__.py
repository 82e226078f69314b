"""crossmae: padding-correct, fast Masked-Autoencoder building blocks for PyTorch.

Conventions (everywhere): tokens are ``[b, n, c]`` batch-first; every ``*_padding_mask`` is
bool ``[b, n]`` with **True = padding slot**; ``visible_mask`` True = seen by the encoder;
``predict_mask`` True = reconstruction target; ``ids_*`` are int64 indices into the full
sequence. See the docs' Conventions page.
"""

from __future__ import annotations

from ._config import set_fused_attn, use_fused_attn
from .layers import (
    Attention,
    Block,
    CrossAttention,
    CrossAttentionBlock,
    DropPath,
    Mlp,
    WeightedFeatureMaps,
    drop_path,
    padded_attention,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
    sincos_pos_embed_2d_from_coords,
)
from .masking import (
    MaskSplit,
    gather_tokens,
    lengths_to_padding_mask,
    mask_split_from_masks,
    padding_mask_to_lengths,
    random_masking,
    scatter_tokens,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "Attention",
    "Block",
    "CrossAttention",
    "CrossAttentionBlock",
    "DropPath",
    "MaskSplit",
    "Mlp",
    "WeightedFeatureMaps",
    "__version__",
    "drop_path",
    "gather_tokens",
    "lengths_to_padding_mask",
    "mask_split_from_masks",
    "padded_attention",
    "padding_mask_to_lengths",
    "random_masking",
    "scatter_tokens",
    "set_fused_attn",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_2d_from_coords",
    "use_fused_attn",
]
