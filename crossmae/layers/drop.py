"""Stochastic depth: drop whole residual branches per sample while training."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import check_bool, check_float_tensor, check_probability

__all__ = ["DropPath", "drop_path", "drop_path_schedule"]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Zero the whole of ``x[i]`` with probability ``drop_prob`` per sample ``i``.

    Kept samples are scaled by ``1 / (1 - drop_prob)`` so the expectation is unchanged.
    Identity when ``drop_prob == 0`` or ``training`` is False.

    Shapes:
        ``x [b, ...] -> [b, ...]``, ``x`` floating point.
    """
    check_bool("training", training)
    x = check_float_tensor("x", x)
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension [b, ...], got a scalar (shape ())")
    check_probability("drop_prob", drop_prob)
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep_mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * keep_mask.div_(keep)


def drop_path_schedule(drop_path: float, depth: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 (first block) to ``drop_path`` (last).

    The usual ViT schedule; ``depth`` rates, all 0 when ``drop_path == 0``.
    """
    check_probability("drop_path", drop_path)
    return [drop_path * i / max(depth - 1, 1) for i in range(depth)]


class DropPath(nn.Module):
    """Module form of `drop_path`; identity in eval mode.

    Args:
        drop_prob: probability of dropping a sample's branch, in ``[0, 1)``.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        """Stochastic depth: in training, zero each sample's ``x`` with probability ``drop_prob``.

        Kept samples are scaled by ``1 / (1 - drop_prob)``; in eval mode (or with
        ``drop_prob=0``) this is the identity.

        Args:
            x: ``[b, ...]``, any shape whose first dimension is the batch ``b``.

        Returns:
            ``[b, ...]``, same shape and dtype as ``x``.
        """
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
