"""Masking: keep/predict splits, strategies, and token gather/scatter."""

from __future__ import annotations

from .split import MaskSplit, mask_split_from_masks, random_masking
from .tokens import gather_tokens, lengths_to_padding_mask, padding_mask_to_lengths, scatter_tokens

__all__ = [
    "MaskSplit",
    "gather_tokens",
    "lengths_to_padding_mask",
    "mask_split_from_masks",
    "padding_mask_to_lengths",
    "random_masking",
    "scatter_tokens",
]
