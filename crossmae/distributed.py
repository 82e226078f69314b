"""Losses that mean the same under data parallelism as on one device.

crossmae's batch losses average over the samples that have something to score (a sample
with no target, e.g. no river flow before 1989, is left out of the mean). Under DDP or
FSDP2 every rank averages over its *own* such samples and the gradients are then averaged
over ranks, so when ranks hold different shares of scored samples the step differs from the
same global batch on one device. The functions here divide by the **global** number of
scored samples instead (one `all_reduce` of a count: a collective, not a host sync), so the
loss and its gradient equal the one-device ones for any split of the batch over ranks.

Without an initialized process group (or with world size 1) they reduce to the ordinary
per-batch mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_float_tensor

__all__ = ["global_multimodal_loss", "global_sample_mean"]


def _world(group: Optional[Any]) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def global_sample_mean(
    per_sample: Tensor, scored: Tensor, *, group: Optional[Any] = None
) -> Tensor:
    """Mean of ``per_sample`` over the scored samples of the **global** batch.

    Returns ``world * per_sample.sum() / N``, where ``N`` is the number of scored samples
    summed over the ranks of ``group``. Data-parallel wrappers average gradients over
    ranks, so the gradient equals that of ``sum / N`` over the global batch on one device,
    and the mean of this value over ranks is that one-device loss.

    Args:
        per_sample: float ``[b]``, this rank's per-sample losses (0 where nothing is
            scored), e.g. `MultimodalOutput.sample_losses[name]` or
            ``masked_mse_loss(..., reduction="none")``.
        scored: bool ``[b]``, True = the sample has at least one scored value.
        group: process group (default: the world).

    Returns:
        Scalar tensor; 0 (with zero gradients) when no rank has a scored sample.
    """
    x = check_float_tensor("per_sample", per_sample, ndim=1)
    if not isinstance(scored, Tensor) or scored.dtype != torch.bool:
        what = f"dtype {scored.dtype}" if isinstance(scored, Tensor) else type(scored).__name__
        raise TypeError(f"scored must be a bool tensor [b], got {what}")
    if tuple(scored.shape) != tuple(x.shape):
        raise ValueError(
            f"scored has shape {tuple(scored.shape)} but per_sample has {tuple(x.shape)}"
        )
    count = scored.sum().to(x.dtype)
    world = _world(group)
    if world > 1:
        count = count.detach().clone()
        dist.all_reduce(count, group=group)
    return x.sum() * world / count.clamp(min=1)


def global_multimodal_loss(
    output: Any, weights: Mapping[str, float], *, group: Optional[Any] = None
) -> Tensor:
    """``sum_m weights[m] * global_sample_mean(...)`` over the modalities of a
    `MultimodalOutput` (one count all-reduce per modality).

    On one device this equals ``output.loss`` when ``weights`` are the modalities' loss
    weights; under DDP/FSDP2 it equals the one-device loss of the global batch.

    Args:
        output: a `crossmae.MultimodalOutput` (its ``sample_losses``, ``target_valid`` and
            ``splits`` are used).
        weights: modality name → loss weight (every modality of ``output``).
        group: process group (default: the world).
    """
    fields = ("sample_losses", "target_valid", "splits")
    if not all(isinstance(getattr(output, f, None), Mapping) for f in fields):
        raise TypeError(
            f"output must be a crossmae.MultimodalOutput (with {', '.join(fields)}), got "
            f"{type(output).__name__}"
        )
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"weights must be a mapping of modality name to weight, got {type(weights).__name__}"
        )
    names = list(output.sample_losses)
    for name in names:
        w = weights.get(name, 0.0)
        try:
            float(w)
        except (TypeError, ValueError):
            raise TypeError(f"weights[{name!r}] must be a number, got {w!r}") from None
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"weights has no entry for modalities {missing} (got {list(weights)})")
    total: Optional[Tensor] = None
    for name in names:
        split = output.splits[name]
        valid = output.target_valid[name]
        scored = (~split.predict_padding_mask[..., None] & valid).flatten(1).any(dim=1)
        term = float(weights[name]) * global_sample_mean(
            output.sample_losses[name], scored, group=group
        )
        total = term if total is None else total + term
    if total is None:
        raise ValueError("output has no modality")
    return total
