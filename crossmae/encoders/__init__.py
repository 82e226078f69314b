"""Encoders over padded token sets."""

from __future__ import annotations

from .film import FiLMProjection, visible_patch_mean
from .postnorm import PostNormBlock, PostNormTransformerEncoder
from .transformer import EncoderOutput, FiLM, TransformerEncoder, resolve_layer_indices

__all__ = [
    "EncoderOutput",
    "FiLM",
    "FiLMProjection",
    "PostNormBlock",
    "PostNormTransformerEncoder",
    "TransformerEncoder",
    "resolve_layer_indices",
    "visible_patch_mean",
]
