"""Layers: attention, blocks, feature maps, MLP, stochastic depth, position embeddings."""

from __future__ import annotations

from .attention import Attention, CrossAttention, packed_attention, padded_attention
from .blocks import Block, CrossAttentionBlock
from .drop import DropPath, drop_path, drop_path_schedule
from .feature_maps import StackedLayerNorm, WeightedFeatureMaps
from .mlp import Mlp
from .packing import PackedTokens, pack_tokens, packed_segment_ids, unpack_tokens
from .pos_embed import sincos_pos_embed_1d, sincos_pos_embed_2d, sincos_pos_embed_2d_from_coords

__all__ = [
    "Attention",
    "Block",
    "CrossAttention",
    "CrossAttentionBlock",
    "DropPath",
    "Mlp",
    "PackedTokens",
    "StackedLayerNorm",
    "WeightedFeatureMaps",
    "drop_path",
    "drop_path_schedule",
    "pack_tokens",
    "packed_attention",
    "packed_segment_ids",
    "padded_attention",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_2d_from_coords",
    "unpack_tokens",
]
