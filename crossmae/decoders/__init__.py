"""Decoders: CrossMAE (cross-attention from the tokens to predict) and MAE (self-attention)."""

from __future__ import annotations

from .cross import CrossMAEDecoder
from .mae import MAEDecoder
from .query_pos import SpatioTemporalQueryPos
from .together import decode_together

__all__ = ["CrossMAEDecoder", "MAEDecoder", "SpatioTemporalQueryPos", "decode_together"]
