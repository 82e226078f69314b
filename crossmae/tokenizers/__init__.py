"""Tokenizers: rasters with a valid-patch (land) mask, multi-site series, static attributes."""

from __future__ import annotations

from .raster import (
    PatchEmbed,
    RasterTokenizer,
    patchify,
    raster_position_embedding,
    unpatchify,
    valid_patches_from_mask,
)
from .series import SeriesTokenizer, StaticToken, append_tokens

__all__ = [
    "PatchEmbed",
    "RasterTokenizer",
    "SeriesTokenizer",
    "StaticToken",
    "append_tokens",
    "patchify",
    "raster_position_embedding",
    "unpatchify",
    "valid_patches_from_mask",
]
