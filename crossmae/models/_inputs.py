"""Argument checks shared by the models (private).

Legend: ``b`` batch, ``n`` tokens, ``k`` kept slots, ``p`` predicted slots.
Mask polarity: ``*_padding_mask`` True = padding slot.

Metadata only (shape, dtype, type) on the device: no check here syncs with it. The values of
a `MaskSplit` are checked too when that is free (CPU tensors, not compiling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_index_tensor, check_tensor
from ..masking.split import MaskSplit, _check_split_values, _split_is_host_checkable

__all__: list[str] = []


def _check_bool(name: str, value: object) -> Tensor:
    t = check_tensor(name, value)
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {t.dtype}")
    return t


def check_mask_split(
    name: str, split: object, batch: int, num_tokens: int, against: str
) -> MaskSplit:
    """Check every field of a `MaskSplit` named ``name`` over ``[batch, num_tokens]``.

    ``ids_*`` must be integer ``[b, k]`` / ``[b, p]`` tensors, the masks bool, the padding
    masks shaped like their ids and ``visible_mask`` / ``predict_mask`` ``[b, n]``; errors
    name the field (``split.ids_keep``) and what it was checked against (``against``).
    On CPU tensors (outside compilation) the values are checked as by `MaskSplit.validate`.
    """
    if not isinstance(split, MaskSplit):
        raise TypeError(f"{name} must be a MaskSplit, got {type(split).__name__}")
    for field in ("visible_mask", "predict_mask"):
        t = _check_bool(f"{name}.{field}", getattr(split, field))
        if tuple(t.shape) != (batch, num_tokens):
            raise ValueError(
                f"{name}.{field} has shape {tuple(t.shape)} but {against} needs "
                f"{(batch, num_tokens)} (batch, tokens)"
            )
    for ids_field, pad_field in (
        ("ids_keep", "keep_padding_mask"),
        ("ids_predict", "predict_padding_mask"),
    ):
        ids = check_index_tensor(f"{name}.{ids_field}", getattr(split, ids_field))
        pad = _check_bool(f"{name}.{pad_field}", getattr(split, pad_field))
        if ids.shape[0] != batch or tuple(pad.shape) != tuple(ids.shape):
            raise ValueError(
                f"{name}.{ids_field} {tuple(ids.shape)} and {name}.{pad_field} "
                f"{tuple(pad.shape)} must both be [{batch}, width] ({against} has batch {batch})"
            )
    if _split_is_host_checkable(split):  # free on the CPU; on CUDA see MaskSplit.validate
        _check_split_values(split, name, num_tokens)
    return split
