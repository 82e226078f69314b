"""Encoders over padded token sets."""

from __future__ import annotations

from .transformer import EncoderOutput, FiLM, TransformerEncoder, resolve_layer_indices

__all__ = ["EncoderOutput", "FiLM", "TransformerEncoder", "resolve_layer_indices"]
