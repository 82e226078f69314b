"""Decoders: CrossMAE (cross-attention from the tokens to predict) and MAE (self-attention)."""

from __future__ import annotations

from .cross import CrossMAEDecoder, DecoderState
from .mae import MAEDecoder
from .query_pos import SpatioTemporalQueryPos
from .together import decode_together

__all__ = [
    "CrossMAEDecoder",
    "DecoderState",
    "MAEDecoder",
    "SpatioTemporalQueryPos",
    "decode_together",
]
