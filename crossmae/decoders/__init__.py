"""Decoders: CrossMAE (cross-attention from the tokens to predict) and MAE (self-attention)."""

from __future__ import annotations

from .cross import CrossMAEDecoder
from .mae import MAEDecoder

__all__ = ["CrossMAEDecoder", "MAEDecoder"]
