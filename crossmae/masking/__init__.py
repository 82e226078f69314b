"""Masking: keep/predict splits, strategies, and token gather/scatter."""

from __future__ import annotations

from .split import MaskSplit, mask_split_from_masks, random_masking
from .strategies import (
    channel_masking,
    chunk_masking,
    grouped_random_masking,
    mask_missing_samples,
    modality_dropout,
    tail_masking,
    time_step_masking,
    tube_masking,
)
from .tokens import gather_tokens, lengths_to_padding_mask, padding_mask_to_lengths, scatter_tokens

__all__ = [
    "MaskSplit",
    "channel_masking",
    "chunk_masking",
    "gather_tokens",
    "grouped_random_masking",
    "lengths_to_padding_mask",
    "mask_missing_samples",
    "mask_split_from_masks",
    "modality_dropout",
    "padding_mask_to_lengths",
    "random_masking",
    "scatter_tokens",
    "tail_masking",
    "time_step_masking",
    "tube_masking",
]
