"""Masked reconstruction losses that stay finite for any mix of empty and padded samples.

Legend: ``b`` batch, ``p`` predicted (decoded) token slots, ``d`` values per token (e.g.
pixels of a patch). Mask polarity: ``padding_mask`` True = padding slot (not scored, e.g.
`MaskSplit.predict_padding_mask`); ``valid_mask`` True = a valid target value (False for
missing data such as NaN placeholders or sea pixels).

Reduction order: per token, the mean squared error over its valid values; per sample, the
mean over its scored tokens (a token is scored when it is not padding and has at least one
valid value); per batch, the mean over the samples that score at least one token. Values
at padded or invalid positions are removed with ``torch.where`` before any arithmetic, so
NaN/inf stored there never reaches the loss or its gradient, and empty samples or empty
batches give a loss of 0 with finite (zero) gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from ._checks import check_float_tensor, check_padding_mask, check_ratio, check_tensor

__all__ = ["MaskedMSELoss", "masked_mse_loss", "norm_pix_target", "weighted_sum_losses"]

Reduction = Literal["mean", "none", "sum"]
_REDUCTIONS = ("mean", "none", "sum")


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32 (bf16/fp16 inputs are reduced in float32), float64 when given."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _check_valid_mask(valid_mask: Optional[Tensor], shape: tuple[int, ...]) -> Optional[Tensor]:
    """``valid_mask`` of shape ``shape`` or ``shape[:-1]``; returned broadcastable to ``shape``."""
    if valid_mask is None:
        return None
    v = check_tensor("valid_mask", valid_mask)
    if v.dtype != torch.bool:
        raise TypeError(f"valid_mask must have dtype torch.bool (True = valid), got {v.dtype}")
    if tuple(v.shape) == shape:
        return v
    if tuple(v.shape) == shape[:-1]:
        return v[..., None]
    raise ValueError(
        f"valid_mask has shape {tuple(v.shape)} but the target needs shape {shape} or {shape[:-1]}"
    )


def _check_eps(eps: object) -> float:
    e = check_ratio("eps", eps)
    if e <= 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    return e


def _normalize(target: Tensor, valid: Tensor, eps: float) -> Tensor:
    """Per-token normalisation of ``target [..., d]`` over its ``valid [..., d]`` values."""
    t = torch.where(valid, target, 0)
    count = valid.sum(dim=-1, keepdim=True)
    mean = t.sum(dim=-1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, t - mean, 0)
    # Unbiased variance as torch.var (MAE's norm_pix_loss); a single valid value gives var 0.
    var = centered.square().sum(dim=-1, keepdim=True) / (count - 1).clamp(min=1)
    return centered / torch.sqrt(var + eps)


def norm_pix_target(
    target: Tensor, valid_mask: Optional[Tensor] = None, eps: float = 1e-6
) -> Tensor:
    """Normalise each token of a target to zero mean and unit variance (MAE ``norm_pix_loss``).

    ``out = (target - mean) / sqrt(var + eps)`` with the mean and the unbiased variance taken
    over the token's valid values only (a token with one valid value has variance 0).

    Args:
        target: float ``[..., d]`` (e.g. ``[b, p, d]``), one token per row of ``d`` values.
        valid_mask: bool ``[..., d]`` or ``[...]`` (one flag per token), True = valid value;
            default all valid.
        eps: added to the variance, ``> 0``.

    Returns:
        Float ``[..., d]`` in ``target``'s dtype (computed in at least float32); invalid
        positions hold 0, whatever ``target`` stored there (NaN included).

    Raises:
        TypeError: ``target`` not floating point or ``valid_mask`` not bool.
        ValueError: ``target`` with no dimensions, shapes not matching, or ``eps <= 0``.
    """
    target = check_float_tensor("target", target)
    if target.ndim < 1:
        raise ValueError(f"target must have shape [..., d], got {tuple(target.shape)}")
    shape = tuple(target.shape)
    valid = _check_valid_mask(valid_mask, shape)
    e = _check_eps(eps)
    t = target.to(_compute_dtype(target.dtype))
    full = torch.ones_like(t, dtype=torch.bool) if valid is None else valid.expand(shape)
    return _normalize(t, full, e).to(target.dtype)


def masked_mse_loss(
    pred: Tensor,
    target: Tensor,
    *,
    padding_mask: Optional[Tensor] = None,
    valid_mask: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    norm_pix: bool = False,
    eps: float = 1e-6,
    reduction: Reduction = "mean",
) -> Tensor:
    """Mean squared reconstruction error over the scored tokens of each sample.

    Per token: mean of ``(pred - target)**2`` over its valid values. Per sample: the
    (weighted) sum of its token errors divided by its number of scored tokens. Batch
    (``"mean"``): the (weighted) sum of per-sample losses divided by the number of samples
    with at least one scored token. A sample with nothing to score contributes 0 and is not
    counted; a batch with nothing to score gives 0 with zero gradients (the graph is kept,
    so ``backward()`` works). No host sync; works under autocast and ``torch.compile``.

    Weights are plain multipliers and do not enter the denominators: ``weight [b, p]``
    scales each token's error, ``weight [b]`` scales each sample's loss (in every
    reduction). A weight of 0 removes a contribution but still counts in the mean; use
    ``padding_mask``/``valid_mask`` to exclude tokens from the denominators.

    Args:
        pred: float ``[b, p, d]`` decoder predictions.
        target: float ``[b, p, d]`` targets (e.g. from `MaskSplit.predict_tokens`).
        padding_mask: bool ``[b, p]``, True = padding slot (not scored).
        valid_mask: bool ``[b, p, d]`` or ``[b, p]``, True = valid target value; a token
            with no valid value is not scored.
        weight: float ``[b]`` (per sample) or ``[b, p]`` (per token).
        norm_pix: normalise each target token over its valid values first (`norm_pix_target`).
        eps: variance epsilon of ``norm_pix``, ``> 0``.
        reduction: ``"mean"`` (scalar), ``"sum"`` (scalar, sum of per-sample losses) or
            ``"none"`` (per-sample losses ``[b]``, 0 for samples with nothing to score).

    Returns:
        Scalar, or ``[b]`` for ``reduction="none"``; float32 (float64 for float64 inputs).
        Padded or invalid positions may hold NaN/inf without changing the loss or gradients.

    Raises:
        TypeError: non-float ``pred``/``target``/``weight``, non-bool masks or a
            non-bool ``norm_pix``.
        ValueError: shapes not matching, ``eps <= 0`` or an unknown ``reduction``.
    """
    pred = check_float_tensor("pred", pred, ndim=3)
    target = check_float_tensor("target", target, ndim=3)
    shape = tuple(pred.shape)
    if tuple(target.shape) != shape:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but pred has shape {shape} ([b, p, d])"
        )
    b, p = shape[0], shape[1]
    pad = check_padding_mask("padding_mask", padding_mask, (b, p), "pred [b, p, d]")
    valid = _check_valid_mask(valid_mask, shape)
    if weight is not None:
        weight = check_float_tensor("weight", weight)
        if tuple(weight.shape) not in ((b,), (b, p)):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)} but pred {shape} needs shape "
                f"{(b,)} (per sample) or {(b, p)} (per token)"
            )
    if not isinstance(norm_pix, bool):
        raise TypeError(f"norm_pix must be a bool, got {norm_pix!r} ({type(norm_pix).__name__})")
    e = _check_eps(eps)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")

    dt = _compute_dtype(pred.dtype, target.dtype)
    scored_val = torch.ones(shape, dtype=torch.bool, device=pred.device)
    if valid is not None:
        scored_val = scored_val & valid
    if pad is not None:
        scored_val = scored_val & ~pad[..., None]
    x = torch.where(scored_val, pred.to(dt), 0)
    y = torch.where(scored_val, target.to(dt), 0)
    if norm_pix:
        y = _normalize(y, scored_val, e)
    count = scored_val.sum(dim=-1)  # [b, p] scored values per token
    token_err = (x - y).square().sum(dim=-1) / count.clamp(min=1)  # 0 where not scored
    scored_tok = count > 0  # [b, p]
    if weight is not None and weight.ndim == 2:
        token_err = token_err * torch.where(scored_tok, weight.to(dt), 0)
    n_tok = scored_tok.sum(dim=-1)  # [b]
    per_sample = token_err.sum(dim=-1) / n_tok.clamp(min=1)
    if weight is not None and weight.ndim == 1:
        per_sample = per_sample * torch.where(n_tok > 0, weight.to(dt), 0)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    return total / (n_tok > 0).sum().clamp(min=1)


class MaskedMSELoss(nn.Module):
    """Module form of `masked_mse_loss` (options fixed at construction).

    Args:
        norm_pix: normalise each target token over its valid values first.
        eps: variance epsilon of ``norm_pix``, ``> 0``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample ``[b]``).

    Shapes: ``forward(pred [b, p, d], target [b, p, d], *, padding_mask [b, p] (True =
    padding), valid_mask [b, p, d] or [b, p] (True = valid), weight [b] or [b, p])``.
    """

    def __init__(
        self, *, norm_pix: bool = False, eps: float = 1e-6, reduction: Reduction = "mean"
    ) -> None:
        super().__init__()
        if not isinstance(norm_pix, bool):
            raise TypeError(f"norm_pix must be a bool, got {norm_pix!r}")
        self.eps = _check_eps(eps)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.norm_pix = norm_pix
        self.reduction: Reduction = reduction

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        *,
        padding_mask: Optional[Tensor] = None,
        valid_mask: Optional[Tensor] = None,
        weight: Optional[Tensor] = None,
    ) -> Tensor:
        """See `masked_mse_loss`."""
        return masked_mse_loss(
            pred,
            target,
            padding_mask=padding_mask,
            valid_mask=valid_mask,
            weight=weight,
            norm_pix=self.norm_pix,
            eps=self.eps,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"norm_pix={self.norm_pix}, eps={self.eps}, reduction={self.reduction!r}"


def weighted_sum_losses(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Total loss ``sum(weights[name] * losses[name])`` (e.g. per-modality losses).

    The two mappings must have exactly the same keys, so a misspelt name cannot silently
    drop a loss. Summed in the order of ``losses``.

    Args:
        losses: name → loss tensor (typically scalars; all must broadcast together).
        weights: name → finite real weight.

    Returns:
        The weighted sum, a tensor.

    Raises:
        ValueError: ``losses`` empty, a key in one mapping but not the other (named), or a
            non-finite weight.
        TypeError: a loss that is not a tensor or a weight that is not a real number.
    """
    if not isinstance(losses, Mapping):
        raise TypeError(f"losses must be a mapping name -> Tensor, got {type(losses).__name__}")
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> float, got {type(weights).__name__}")
    if len(losses) == 0:
        raise ValueError("losses is empty: nothing to sum")
    for key in losses:
        if key not in weights:
            raise ValueError(
                f"losses has key {key!r} with no weight; weights has keys {sorted(weights)}"
            )
    for key in weights:
        if key not in losses:
            raise ValueError(
                f"weights has key {key!r} with no loss; losses has keys {sorted(losses)}"
            )
    terms = [
        check_tensor(f"losses[{key!r}]", loss) * check_ratio(f"weights[{key!r}]", weights[key])
        for key, loss in losses.items()
    ]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
