"""Masked reconstruction losses that stay finite for any mix of empty and padded samples.

Legend: ``b`` batch, ``p`` predicted (decoded) token slots, ``d`` values per token (e.g.
pixels of a patch). Mask polarity: ``padding_mask`` True = padding slot (not scored, e.g.
`MaskSplit.predict_padding_mask`); ``valid_mask`` True = a valid target value (False for
missing data such as NaN placeholders or sea pixels).

Reduction order (``average="token"``, the default): per token, the mean squared error over
its valid values; per sample, the mean over its scored tokens (a token is scored when it is
not padding and has at least one valid value); per batch, the mean over the samples that
score at least one token. With ``average="value"`` a sample's loss is instead the mean over
all of its scored values (e.g. every real site of every scored series token counts once, so a
half-padded site group weighs by its real sites only). Values
at padded or invalid positions are removed with ``torch.where`` before any arithmetic, so
NaN/inf stored there never reaches the loss or its gradient, and empty samples or empty
batches give a loss of 0 with finite (zero) gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Optional, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from ._checks import check_float_tensor, check_int, check_padding_mask, check_ratio, check_tensor

__all__ = [
    "MaskedMSELoss",
    "masked_mse_loss",
    "norm_pix_target",
    "token_valid_mask_from_pixels",
    "weighted_sum_losses",
]

Reduction = Literal["mean", "none", "sum"]
_REDUCTIONS = ("mean", "none", "sum")
Average = Literal["token", "value"]
_AVERAGES = ("token", "value")


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
    average: Average = "token",
) -> Tensor:
    """Mean squared reconstruction error over the scored tokens of each sample.

    Per token: mean of ``(pred - target)**2`` over its valid values. Per sample
    (``average="token"``): the (weighted) sum of its token errors divided by its number of
    scored tokens; (``average="value"``): the (weighted) sum of the squared errors of its
    scored values divided by its number of scored values, so every valid value (e.g. every
    real site of a series token) counts once. Batch
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
        average: what a sample's loss averages over: ``"token"`` (default; each scored token
            counts once) or ``"value"`` (each scored value counts once). With
            ``weight [b, p]`` and ``"value"`` every value of a token carries its weight.

    Returns:
        Scalar, or ``[b]`` for ``reduction="none"``; float32 (float64 for float64 inputs).
        Padded or invalid positions may hold NaN/inf without changing the loss or gradients.

    Raises:
        TypeError: non-float ``pred``/``target``/``weight``, non-bool masks or a
            non-bool ``norm_pix``.
        ValueError: shapes not matching, ``eps <= 0``, an unknown ``reduction`` or
            ``average``.
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
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")

    dt = _compute_dtype(pred.dtype, target.dtype)
    # [b, p, d], True = scored value: valid and not padding (an expanded view where one
    # mask says it all: fewer launches, and eager steps wait for the host)
    masks = [m for m in (valid, None if pad is None else ~pad[..., None]) if m is not None]
    if not masks:
        scored_val = torch.ones(shape, dtype=torch.bool, device=pred.device)
    else:
        scored_val = (masks[0] if len(masks) == 1 else masks[0] & masks[1]).expand(shape)
    x = torch.where(scored_val, pred.to(dt), 0)
    y = torch.where(scored_val, target.to(dt), 0)
    if norm_pix:
        y = _normalize(y, scored_val, e)
    count = scored_val.sum(dim=-1)  # [b, p] scored values per token
    scored_tok = count > 0  # [b, p]
    n_tok = scored_tok.sum(dim=-1)  # [b]
    if average == "value":
        token_err = (x - y).square().sum(dim=-1)  # [b, p] summed, 0 where not scored
        if weight is not None and weight.ndim == 2:
            token_err = token_err * torch.where(scored_tok, weight.to(dt), 0)
        per_sample = token_err.sum(dim=-1) / count.sum(dim=-1).clamp(min=1)
    else:
        token_err = (x - y).square().sum(dim=-1) / count.clamp(min=1)  # 0 where not scored
        if weight is not None and weight.ndim == 2:
            token_err = token_err * torch.where(scored_tok, weight.to(dt), 0)
        per_sample = token_err.sum(dim=-1) / n_tok.clamp(min=1)
    if weight is not None and weight.ndim == 1:
        per_sample = per_sample * torch.where(n_tok > 0, weight.to(dt), 0)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    return total / (n_tok > 0).sum().clamp(min=1)


def token_valid_mask_from_pixels(
    pixel_valid_mask: Tensor,
    patch_size: Union[int, tuple[int, int]],
    ids: Tensor,
    *,
    patch_index: Optional[Tensor] = None,
    in_chans: int = 1,
) -> Tensor:
    """Element-level ``valid_mask`` for the loss of raster tokens, from a pixel map.

    Turns a per-pixel validity map (e.g. a land mask) into the ``[b, p, ph*pw*c]`` element
    mask `masked_mse_loss` takes, for the tokens at ``ids``. Tokens are numbered time-major
    as `RasterTokenizer` numbers them: ``id = t · L + slot``, where slot ``v`` of a step is
    grid patch ``patch_index[v]`` (row-major, ``k = row · gw + col``), and ``L`` is the
    length of ``patch_index`` (default every patch of the grid). Element order within a
    token is ``(p q c)``: pixels row-major, channels last (a pixel's flag repeats for its
    ``c`` channels). Metadata checks only; an id out of range is an index error of the
    gather kernel (not checked on the host).

    Args:
        pixel_valid_mask: bool, **True = valid pixel**: ``[H, W]`` (one map for every sample
            and step), ``[b, H, W]`` (per sample) or ``[b, t, H, W]`` (per sample and step).
        patch_size: ``ph`` or ``(ph, pw)``; ``H`` and ``W`` must be divisible by it.
        ids: int64 ``[b, p]`` token ids (e.g. `MaskSplit.ids_predict`; padded slots hold a
            valid id).
        patch_index: optional int64 ``[L]``: the grid patch of each slot (e.g.
            `RasterTokenizer.valid_patch_index`); default ``arange(gh * gw)``.
        in_chans: channels ``c`` per pixel.

    Returns:
        Bool ``[b, p, ph * pw * c]``, True = the value is valid (to be AND-ed with any other
        validity, e.g. finiteness, and passed as ``valid_mask``).

    Raises:
        TypeError: non-bool map, non-int ids or patch sizes.
        ValueError: ranks or sizes that do not fit, or ``ids`` whose batch does not match.
    """
    m = check_tensor("pixel_valid_mask", pixel_valid_mask)
    if m.dtype != torch.bool:
        raise TypeError(
            f"pixel_valid_mask must have dtype torch.bool (True = valid), got {m.dtype}"
        )
    if m.ndim not in (2, 3, 4):
        raise ValueError(
            f"pixel_valid_mask must be [H, W], [b, H, W] or [b, t, H, W], got {tuple(m.shape)}"
        )
    if isinstance(patch_size, int) and not isinstance(patch_size, bool):
        ph = pw = check_int("patch_size", patch_size, minimum=1)
    elif isinstance(patch_size, tuple) and len(patch_size) == 2:
        ph = check_int("patch_size[0]", patch_size[0], minimum=1)
        pw = check_int("patch_size[1]", patch_size[1], minimum=1)
    else:
        raise TypeError(f"patch_size must be an int or a pair (ph, pw), got {patch_size!r}")
    h, w = m.shape[-2], m.shape[-1]
    if h % ph != 0 or w % pw != 0:
        raise ValueError(
            f"pixel_valid_mask spatial size {(h, w)} is not divisible by patch_size {(ph, pw)}"
        )
    c = check_int("in_chans", in_chans, minimum=1)
    ids_t = check_tensor("ids", ids)
    if ids_t.dtype not in (torch.int64, torch.int32) or ids_t.ndim != 2:
        raise TypeError(
            f"ids must be an int64 tensor [b, p], got dtype {ids_t.dtype} and shape "
            f"{tuple(ids_t.shape)}"
        )
    b, p = ids_t.shape
    if m.ndim >= 3 and m.shape[0] != b:
        raise ValueError(
            f"pixel_valid_mask has batch {m.shape[0]} (shape {tuple(m.shape)}) but ids has "
            f"batch {b}"
        )
    patches = rearrange(m, "... (h p) (w q) -> ... (h w) (p q)", p=ph, q=pw)  # [..., G, k]
    if patch_index is not None:
        index = check_tensor("patch_index", patch_index)
        if index.dtype not in (torch.int64, torch.int32) or index.ndim != 1:
            raise TypeError(
                f"patch_index must be an int64 tensor [L], got dtype {index.dtype} and shape "
                f"{tuple(index.shape)}"
            )
        patches = patches.index_select(-2, index.to(patches.device, torch.int64))
    per_step, k = patches.shape[-2], patches.shape[-1]
    ids_l = ids_t.long()
    if m.ndim == 4:  # [b, t, L, k]: the id is the flat (t, slot) index
        flat = rearrange(patches, "b t l k -> b (t l) k")
        out = torch.gather(flat, 1, ids_l[..., None].expand(b, p, k))
    else:
        slot = torch.remainder(ids_l, per_step)
        if m.ndim == 2:  # [L, k]
            out = patches[slot]
        else:  # [b, L, k]
            out = torch.gather(patches, 1, slot[..., None].expand(b, p, k))
    return out.repeat_interleave(c, dim=-1) if c > 1 else out


class MaskedMSELoss(nn.Module):
    """Module form of `masked_mse_loss` (options fixed at construction).

    Args:
        norm_pix: normalise each target token over its valid values first.
        eps: variance epsilon of ``norm_pix``, ``> 0``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample ``[b]``).
        average: ``"token"`` (each scored token counts once in its sample's mean) or
            ``"value"`` (each scored value counts once, e.g. per real site).

    Shapes: ``forward(pred [b, p, d], target [b, p, d], *, padding_mask [b, p] (True =
    padding), valid_mask [b, p, d] or [b, p] (True = valid), weight [b] or [b, p])``.
    """

    def __init__(
        self,
        *,
        norm_pix: bool = False,
        eps: float = 1e-6,
        reduction: Reduction = "mean",
        average: Average = "token",
    ) -> None:
        super().__init__()
        if not isinstance(norm_pix, bool):
            raise TypeError(f"norm_pix must be a bool, got {norm_pix!r}")
        self.eps = _check_eps(eps)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        self.norm_pix = norm_pix
        self.reduction: Reduction = reduction
        self.average: Average = average

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        *,
        padding_mask: Optional[Tensor] = None,
        valid_mask: Optional[Tensor] = None,
        weight: Optional[Tensor] = None,
    ) -> Tensor:
        """Masked MSE with the options fixed at construction (see `masked_mse_loss`).

        Args:
            pred: float ``[b, p, d]`` predictions.
            target: float ``[b, p, d]`` targets.
            padding_mask: optional bool ``[b, p]``, **True = padding** slot (not scored).
            valid_mask: optional bool ``[b, p, d]`` or ``[b, p]``, **True = valid** value.
            weight: optional float ``[b]`` (per sample) or ``[b, p]`` (per token).

        Returns:
            Scalar, or ``[b]`` with ``reduction="none"``.
        """
        return masked_mse_loss(
            pred,
            target,
            padding_mask=padding_mask,
            valid_mask=valid_mask,
            weight=weight,
            norm_pix=self.norm_pix,
            eps=self.eps,
            reduction=self.reduction,
            average=self.average,
        )

    def extra_repr(self) -> str:
        return (
            f"norm_pix={self.norm_pix}, eps={self.eps}, reduction={self.reduction!r}, "
            f"average={self.average!r}"
        )


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
