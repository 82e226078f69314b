"""Structured masking strategies: per-step, whole-step, chunk, forecast, channel, tube, modality.

Legend: ``b`` batch, ``t`` time steps, ``l`` locations (patches) per step, ``c`` channels,
``s`` steps per chunk, ``n`` tokens, ``k`` kept (visible) slots, ``p`` predicted slots.

Token layout for time-resolved data: **time-major**, token index ``= step * num_locations +
location`` (``n = t * l``), i.e. ``rearrange(tokens, "b (t l) d -> b t l d")`` recovers the
grid. `channel_masking` uses the same layout with channels in place of steps (``n = c * l``).

Mask polarity: ``padding_mask`` True = padding slot (never visible, never predicted);
``missing`` True = the modality has no data for that sample; in the returned `MaskSplit`,
``visible_mask`` True = the encoder sees the token, ``predict_mask`` True = reconstruct it.

Every strategy draws a *unit* (a token, a step, a chunk of steps, a channel or a location)
and uses the counts of `random_masking` over the real units of each group: with ``u`` real
units, ``u_keep = int(u * (1 - mask_ratio))``, ``u_skip = int(u * (mask_ratio -
predict_ratio))`` and ``u_predict = u - u_keep - u_skip`` (float64, as Python evaluates
them). A unit is real when at least one of its tokens is real. Real units are ordered by
``noise`` ascending (stable): the first ``u_keep`` are visible, the last ``u_predict`` are
predicted, the ones in between are skipped (hidden and not reconstructed). Every token of a
unit shares its unit's role, except padded tokens, which are never selected.

The returned ``ids_keep`` / ``ids_predict`` are in ascending token order (time-major order
for time-resolved data), unlike `random_masking`, whose ``ids_keep`` follows the noise.
Without ``padding_mask`` the output widths are known in advance and nothing syncs with the
device (except `chunk_masking` when ``num_steps`` is not a multiple of ``chunk_size``); with
it, one host sync sizes the outputs.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from einops import rearrange, repeat
from torch import Tensor

from .._checks import (
    check_generator,
    check_int,
    check_padding_mask,
    check_ratio,
    check_tensor,
)
from .split import (
    MaskSplit,
    _ascending_ids,
    _check_split_values,
    _ranks,
    _resolve_device,
    _split_is_host_checkable,
    mask_split_from_masks,
    uniform_noise,
)

__all__ = [
    "channel_masking",
    "chunk_masking",
    "grouped_random_masking",
    "mask_missing_samples",
    "modality_dropout",
    "tail_masking",
    "time_step_masking",
    "tube_masking",
]

Device = Union[str, torch.device]


# --------------------------------------------------------------------------- helpers


def _check_ratios(mask_ratio: float, predict_ratio: Optional[float]) -> tuple[float, float]:
    mr = check_ratio("mask_ratio", mask_ratio)
    if not 0.0 <= mr < 1.0:
        raise ValueError(f"mask_ratio must satisfy 0 <= mask_ratio < 1, got {mask_ratio!r}")
    if predict_ratio is None:
        return mr, mr
    pr = check_ratio("predict_ratio", predict_ratio)
    if not 0.0 < pr <= mr:
        raise ValueError(
            f"predict_ratio must satisfy 0 < predict_ratio <= mask_ratio ({mask_ratio!r}), "
            f"got {predict_ratio!r}"
        )
    return mr, pr


def _check_noise(noise: Optional[Tensor], shape: tuple[int, ...], against: str) -> Optional[Tensor]:
    if noise is None:
        return None
    noise = check_tensor("noise", noise)
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but {against} needs shape {shape}")
    return noise


def _py_counts(units: int, mr: float, pr: float) -> tuple[int, int]:
    """``(u_keep, u_predict)`` for ``units`` real units, the formula of `random_masking`."""
    n_keep = int(units * (1 - mr))
    n_skip = int(units * (mr - pr))
    return n_keep, units - n_keep - n_skip


def _unit_roles(noise: Tensor, real: Tensor, mr: float, pr: float) -> tuple[Tensor, Tensor]:
    """Visible and predicted units of each group.

    Args:
        noise: float ``[..., u]`` ordering scores (small = keep), one row per group.
        real: bool ``[..., u]``, True = the unit holds at least one real token.

    Returns:
        ``(visible [..., u], predicted [..., u])``, disjoint, both False on non-real units.
    """
    order = torch.argsort(noise, dim=-1, stable=True)
    # Real units first (in noise order), padding last, whatever the noise values are.
    pad_sorted = torch.gather(~real, -1, order)
    order = torch.gather(order, -1, torch.argsort(pad_sorted.to(torch.uint8), dim=-1, stable=True))
    ranks = _ranks(order)
    n_real = real.sum(dim=-1)
    n_real_f = n_real.to(torch.float64)
    n_keep = torch.floor(n_real_f * (1 - mr)).long()
    n_skip = torch.floor(n_real_f * (mr - pr)).long()
    n_pred = n_real - n_keep - n_skip
    visible = ranks < n_keep[..., None]
    predicted = (ranks >= (n_real - n_pred)[..., None]) & real
    return visible, predicted


def _grouped_unpadded(noise: Tensor, mr: float, pr: float) -> MaskSplit:
    """`grouped_random_masking` without padding, from ``noise [b, t, l]``: every step has
    the same counts, so the split is sorted slices of each step's shuffle (about a third
    of the general path's launches; the same split)."""
    b, t, l_ = noise.shape
    keep_l, pred_l = _py_counts(l_, mr, pr)
    first_pred = l_ - pred_l
    order = torch.argsort(noise, dim=-1, stable=True)  # [b t l]
    ranks = _ranks(order)
    offsets = torch.arange(t, device=noise.device)[:, None] * l_  # step s starts at s * l
    # ascending within each step, steps in order: ascending time-major token order
    ids_keep = (order[..., :keep_l].sort(dim=-1).values + offsets).reshape(b, t * keep_l)
    ids_pred = (order[..., first_pred:].sort(dim=-1).values + offsets).reshape(b, t * pred_l)
    return MaskSplit(
        ids_keep,
        torch.zeros(ids_keep.shape, dtype=torch.bool, device=noise.device),
        ids_pred,
        torch.zeros(ids_pred.shape, dtype=torch.bool, device=noise.device),
        (ranks < keep_l).reshape(b, t * l_),
        (ranks >= first_pred).reshape(b, t * l_),
    )


def _build_split(vis: Tensor, pred: Tensor, widths: Optional[tuple[int, int]]) -> MaskSplit:
    """`MaskSplit` from disjoint token masks; ``widths`` = ``(k, p)`` when known (no sync)."""
    n_keep = vis.sum(dim=1)
    n_pred = pred.sum(dim=1)
    if widths is None:
        if vis.shape[0] == 0:
            widths = (0, 0)
        else:
            # One host sync sizes both outputs: data preparation (a model's own masking
            # inside forward passes static widths on CUDA: `grouped_masking_fn`).
            wk, wp = torch.stack((n_keep.amax(), n_pred.amax())).tolist()
            widths = (int(wk), int(wp))
    ids_keep, keep_pad = _ascending_ids(vis, n_keep, widths[0])
    ids_predict, predict_pad = _ascending_ids(pred, n_pred, widths[1])
    return MaskSplit(ids_keep, keep_pad, ids_predict, predict_pad, vis, pred)


def _grid_args(
    batch_size: int, num_steps: int, num_locations: int, steps_name: str, locations_name: str
) -> tuple[int, int, int]:
    b = check_int("batch_size", batch_size, minimum=0)
    t = check_int(steps_name, num_steps, minimum=0)
    l_ = check_int(locations_name, num_locations, minimum=0)
    return b, t, l_


def _real_grid(pad: Optional[Tensor], b: int, t: int, l_: int, dev: torch.device) -> Tensor:
    """bool ``[b, t, l]``, True = real token."""
    if pad is None:
        return torch.ones(b, t, l_, dtype=torch.bool, device=dev)
    real: Tensor = rearrange(~pad.to(dev), "b (t l) -> b t l", t=t, l=l_)
    return real


def _step_split(
    b: int,
    t: int,
    l_: int,
    chunk: int,
    noise: Tensor,
    pad: Optional[Tensor],
    mr: float,
    pr: float,
    static: bool,
) -> MaskSplit:
    """Whole chunks of ``chunk`` consecutive steps share a role; ``noise`` is ``[b, chunks]``."""
    dev = noise.device
    num_chunks = noise.shape[1]
    real_tok = _real_grid(pad, b, t, l_, dev)
    real_step = real_tok.any(dim=2)  # [b, t]
    extra = num_chunks * chunk - t
    real_step_padded = torch.cat((real_step, real_step.new_zeros(b, extra)), dim=1)  # [b, c*s]
    real_chunk = rearrange(real_step_padded, "b (c s) -> b c s", s=chunk).any(dim=2)
    vis_c, pred_c = _unit_roles(noise, real_chunk, mr, pr)

    def to_tokens(units: Tensor) -> Tensor:
        steps = repeat(units, "b c -> b (c s)", s=chunk)[:, :t]
        tokens: Tensor = repeat(steps, "b t -> b t l", l=l_) & real_tok
        return rearrange(tokens, "b t l -> b (t l)")

    widths = None
    if static:
        keep_c, pred_c_n = _py_counts(num_chunks, mr, pr)
        widths = (keep_c * chunk * l_, pred_c_n * chunk * l_)
    return _build_split(to_tokens(vis_c), to_tokens(pred_c), widths)


# --------------------------------------------------------------------------- strategies


def grouped_random_masking(
    batch_size: int,
    num_steps: int,
    num_locations: int,
    mask_ratio: float,
    *,
    predict_ratio: Optional[float] = None,
    padding_mask: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Device] = None,
    static_shape: bool = False,
) -> MaskSplit:
    """Exact-count random masking within every (sample, time step) group.

    Each step of each sample hides the same share of its own real locations, with the counts
    of `random_masking` applied to the ``u`` real locations of that step. This is the water
    model's mask: 94 land patches per step, hide 37 → ``mask_ratio=0.39`` (or ``37 / 94``)
    gives ``int(94 * 0.61) = 57`` visible per step. Beware float boundaries: ``h / u`` does
    not always hide exactly ``h`` (``int(10 * (1 - 0.8)) == 1``); a ratio strictly inside
    the interval is safe. With one step it equals `random_masking` for the same noise (same
    masks).

    Args:
        batch_size: ``b``.
        num_steps: ``t``.
        num_locations: ``l`` (tokens per step; sequence length ``n = t * l``, time-major).
        mask_ratio: share of each step's real locations hidden, ``0 <= mask_ratio < 1``.
        predict_ratio: share of each step's real locations reconstructed,
            ``0 < predict_ratio <= mask_ratio``; default ``mask_ratio``.
        padding_mask: bool ``[b, n]``, True = padding (never selected; e.g. sea patches).
        noise: float ``[b, n]`` ordering scores (small = keep), ranked within each step.
        generator: RNG for the default uniform noise.
        device: device of the result (default: that of ``padding_mask``/``noise``, else CPU).
        static_shape: with ``padding_mask``, size ``k``/``p`` by the largest counts any
            padding can give (computed on the host from ``l`` and the ratios) instead of the
            batch's largest counts: no host sync and the same shapes every step (CUDA
            graphs); the extra slots are padding. Without ``padding_mask`` shapes are
            always static.

    Returns:
        `MaskSplit` over ``n`` tokens; ids in ascending (time-major) token order.

    Raises:
        ValueError: ratios out of range or shapes not matching ``(batch_size, n)``.
        TypeError: wrong argument types.
    """
    check_generator("generator", generator)
    b, t, l_ = _grid_args(batch_size, num_steps, num_locations, "num_steps", "num_locations")
    mr, pr = _check_ratios(mask_ratio, predict_ratio)
    n = t * l_
    pad = check_padding_mask("padding_mask", padding_mask, (b, n), "(batch_size, t * l)")
    noise = _check_noise(noise, (b, n), "(batch_size, t * l)")
    dev = _resolve_device(device, pad, noise, generator)
    if noise is None:
        noise = uniform_noise((b, n), generator, dev)
    noise_g = rearrange(noise.to(dev), "b (t l) -> b t l", t=t, l=l_)
    if pad is None:
        return _grouped_unpadded(noise_g, mr, pr)
    real = _real_grid(pad, b, t, l_, dev)
    vis, pred = _unit_roles(noise_g, real, mr, pr)
    widths = None
    if static_shape:
        # Counts for u real locations of a step, u <= l: keep is monotone in u, predict is
        # not quite (floors), so take the maximum over every u.
        keep_l = _py_counts(l_, mr, pr)[0]
        pred_l = max(_py_counts(u, mr, pr)[1] for u in range(l_ + 1))
        widths = (t * keep_l, t * pred_l)
    return _build_split(
        rearrange(vis, "b t l -> b (t l)"), rearrange(pred, "b t l -> b (t l)"), widths
    )


def chunk_masking(
    batch_size: int,
    num_steps: int,
    num_locations: int,
    mask_ratio: float,
    *,
    chunk_size: int,
    predict_ratio: Optional[float] = None,
    padding_mask: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Device] = None,
) -> MaskSplit:
    """Hide contiguous chunks of ``chunk_size`` time steps (all locations of those steps).

    Steps are cut into ``num_chunks = ceil(t / chunk_size)`` aligned chunks
    ``[0, s), [s, 2s), ...`` (the last may be shorter). Chunks are the units: the counts of
    `random_masking` apply to the real chunks of each sample (a chunk is real when it holds
    a real token), so ``mask_ratio`` is the share of chunks hidden.

    Args:
        batch_size: ``b``.
        num_steps: ``t``.
        num_locations: ``l`` (``n = t * l``, time-major).
        mask_ratio: share of real chunks hidden, ``0 <= mask_ratio < 1``.
        chunk_size: steps per chunk ``s >= 1``.
        predict_ratio: share of real chunks reconstructed, ``0 < predict_ratio <= mask_ratio``;
            default ``mask_ratio``.
        padding_mask: bool ``[b, n]``, True = padding (never selected).
        noise: float ``[b, num_chunks]`` ordering scores (small = keep).
        generator: RNG for the default uniform noise.
        device: device of the result (default: that of ``padding_mask``/``noise``, else CPU).

    Returns:
        `MaskSplit` over ``n`` tokens; ids in ascending token order.

    Raises:
        ValueError: ratios out of range, ``chunk_size < 1``, or shapes not matching.
        TypeError: wrong argument types.
    """
    check_generator("generator", generator)
    b, t, l_ = _grid_args(batch_size, num_steps, num_locations, "num_steps", "num_locations")
    s = check_int("chunk_size", chunk_size, minimum=1)
    mr, pr = _check_ratios(mask_ratio, predict_ratio)
    n = t * l_
    num_chunks = math.ceil(t / s)
    pad = check_padding_mask("padding_mask", padding_mask, (b, n), "(batch_size, t * l)")
    noise = _check_noise(noise, (b, num_chunks), "(batch_size, ceil(num_steps / chunk_size))")
    dev = _resolve_device(device, pad, noise, generator)
    if noise is None:
        noise = uniform_noise((b, num_chunks), generator, dev)
    static = pad is None and t % s == 0
    return _step_split(b, t, l_, s, noise.to(dev), pad, mr, pr, static)


def _leading_unit_masking(
    batch_size: int,
    num_units: int,
    num_locations: int,
    mask_ratio: float,
    predict_ratio: Optional[float],
    padding_mask: Optional[Tensor],
    noise: Optional[Tensor],
    generator: Optional[torch.Generator],
    device: Optional[Device],
    *,
    units: tuple[str, str],
) -> MaskSplit:
    """Whole units of the leading axis (steps, channels) of a ``[units, locations]`` grid.

    ``units`` = (argument name, its symbol) so errors name what the caller passed.
    """
    arg, sym = units
    b, u, l_ = _grid_args(batch_size, num_units, num_locations, arg, "num_locations")
    mr, pr = _check_ratios(mask_ratio, predict_ratio)
    pad = check_padding_mask("padding_mask", padding_mask, (b, u * l_), f"(batch_size, {sym} * l)")
    noise = _check_noise(noise, (b, u), f"(batch_size, {arg})")
    dev = _resolve_device(device, pad, noise, generator)
    if noise is None:
        noise = uniform_noise((b, u), generator, dev)
    return _step_split(b, u, l_, 1, noise.to(dev), pad, mr, pr, pad is None)


def time_step_masking(
    batch_size: int,
    num_steps: int,
    num_locations: int,
    mask_ratio: float,
    *,
    predict_ratio: Optional[float] = None,
    padding_mask: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Device] = None,
) -> MaskSplit:
    """Hide whole time steps: a random subset of each sample's steps, all locations.

    Steps are the units: the counts of `random_masking` apply to the real steps of each
    sample (a step is real when it holds a real token). Equal to `chunk_masking` with
    ``chunk_size=1``.

    Args:
        batch_size: ``b``.
        num_steps: ``t``.
        num_locations: ``l`` (``n = t * l``, time-major).
        mask_ratio: share of real steps hidden, ``0 <= mask_ratio < 1``.
        predict_ratio: share of real steps reconstructed, ``0 < predict_ratio <= mask_ratio``;
            default ``mask_ratio``.
        padding_mask: bool ``[b, n]``, True = padding (never selected).
        noise: float ``[b, t]`` ordering scores (small = keep).
        generator: RNG for the default uniform noise.
        device: device of the result (default: that of ``padding_mask``/``noise``, else CPU).

    Returns:
        `MaskSplit` over ``n`` tokens; ids in ascending token order.

    Raises:
        ValueError: ratios out of range or shapes not matching.
        TypeError: wrong argument types.
    """
    check_generator("generator", generator)
    return _leading_unit_masking(
        batch_size,
        num_steps,
        num_locations,
        mask_ratio,
        predict_ratio,
        padding_mask,
        noise,
        generator,
        device,
        units=("num_steps", "t"),
    )


def tail_masking(
    batch_size: int,
    num_steps: int,
    num_locations: int,
    mask_ratio: float,
    *,
    predict_ratio: Optional[float] = None,
    padding_mask: Optional[Tensor] = None,
    device: Optional[Device] = None,
) -> MaskSplit:
    """Forecast masking: the first real steps are visible, the last ones hidden.

    Deterministic (no noise). With ``u`` real steps in a sample (a step is real when it
    holds a real token), the first ``int(u * (1 - mask_ratio))`` real steps are visible and
    the last ``u_predict`` real steps are predicted (counts of `random_masking`); when
    ``predict_ratio < mask_ratio`` the skipped steps are the ones right after the visible
    history, so the targets are the far end of the window.

    Args:
        batch_size: ``b``.
        num_steps: ``t``.
        num_locations: ``l`` (``n = t * l``, time-major; ``l = 1`` masks single tokens).
        mask_ratio: share of real steps hidden, ``0 <= mask_ratio < 1``.
        predict_ratio: share of real steps reconstructed, ``0 < predict_ratio <= mask_ratio``;
            default ``mask_ratio``.
        padding_mask: bool ``[b, n]``, True = padding (never selected).
        device: device of the result (default: that of ``padding_mask``, else CPU).

    Returns:
        `MaskSplit` over ``n`` tokens; ids in ascending token order.

    Raises:
        ValueError: ratios out of range or shapes not matching.
        TypeError: wrong argument types.
    """
    b, t, l_ = _grid_args(batch_size, num_steps, num_locations, "num_steps", "num_locations")
    mr, pr = _check_ratios(mask_ratio, predict_ratio)
    n = t * l_
    pad = check_padding_mask("padding_mask", padding_mask, (b, n), "(batch_size, t * l)")
    dev = _resolve_device(device, pad, None, None)
    noise = torch.arange(t, dtype=torch.float64, device=dev).expand(b, t)
    return _step_split(b, t, l_, 1, noise, pad, mr, pr, pad is None)


def channel_masking(
    batch_size: int,
    num_channels: int,
    num_locations: int,
    mask_ratio: float,
    *,
    predict_ratio: Optional[float] = None,
    padding_mask: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Device] = None,
) -> MaskSplit:
    """Hide whole channels per sample (every location of a hidden channel).

    Layout: channel-major, token index ``= channel * num_locations + location``
    (``n = c * l``; ``rearrange(x, "b c l d -> b (c l) d")``). Channels are the units: the
    counts of `random_masking` apply to each sample's real channels (a channel is real when
    it holds a real token).

    Args:
        batch_size: ``b``.
        num_channels: ``c``.
        num_locations: ``l`` (tokens per channel).
        mask_ratio: share of real channels hidden, ``0 <= mask_ratio < 1``.
        predict_ratio: share of real channels reconstructed,
            ``0 < predict_ratio <= mask_ratio``; default ``mask_ratio``.
        padding_mask: bool ``[b, n]``, True = padding (never selected).
        noise: float ``[b, c]`` ordering scores (small = keep).
        generator: RNG for the default uniform noise.
        device: device of the result (default: that of ``padding_mask``/``noise``, else CPU).

    Returns:
        `MaskSplit` over ``n`` tokens; ids in ascending token order.

    Raises:
        ValueError: ratios out of range or shapes not matching.
        TypeError: wrong argument types.
    """
    check_generator("generator", generator)
    return _leading_unit_masking(
        batch_size,
        num_channels,
        num_locations,
        mask_ratio,
        predict_ratio,
        padding_mask,
        noise,
        generator,
        device,
        units=("num_channels", "c"),
    )


def tube_masking(
    batch_size: int,
    num_steps: int,
    num_locations: int,
    mask_ratio: float,
    *,
    predict_ratio: Optional[float] = None,
    padding_mask: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Device] = None,
) -> MaskSplit:
    """Tube masking: one spatial mask per sample, repeated at every time step.

    Locations are the units (one noise value per location, shared by all steps): the
    counts of `random_masking` apply to each sample's real locations (a location is real
    when it holds a real token at some step). A location's role is the same at every step;
    its padded tokens are simply never selected.

    Args:
        batch_size: ``b``.
        num_steps: ``t``.
        num_locations: ``l`` (``n = t * l``, time-major).
        mask_ratio: share of real locations hidden, ``0 <= mask_ratio < 1``.
        predict_ratio: share of real locations reconstructed,
            ``0 < predict_ratio <= mask_ratio``; default ``mask_ratio``.
        padding_mask: bool ``[b, n]``, True = padding (never selected).
        noise: float ``[b, l]`` ordering scores (small = keep).
        generator: RNG for the default uniform noise.
        device: device of the result (default: that of ``padding_mask``/``noise``, else CPU).

    Returns:
        `MaskSplit` over ``n`` tokens; ids in ascending token order.

    Raises:
        ValueError: ratios out of range or shapes not matching.
        TypeError: wrong argument types.
    """
    check_generator("generator", generator)
    b, t, l_ = _grid_args(batch_size, num_steps, num_locations, "num_steps", "num_locations")
    mr, pr = _check_ratios(mask_ratio, predict_ratio)
    n = t * l_
    pad = check_padding_mask("padding_mask", padding_mask, (b, n), "(batch_size, t * l)")
    noise = _check_noise(noise, (b, l_), "(batch_size, num_locations)")
    dev = _resolve_device(device, pad, noise, generator)
    if noise is None:
        noise = uniform_noise((b, l_), generator, dev)
    real_tok = _real_grid(pad, b, t, l_, dev)
    vis_l, pred_l = _unit_roles(noise.to(dev), real_tok.any(dim=1), mr, pr)

    def to_tokens(units: Tensor) -> Tensor:
        tokens: Tensor = repeat(units, "b l -> b t l", t=t) & real_tok
        return rearrange(tokens, "b t l -> b (t l)")

    widths = None
    if pad is None:
        keep_l, pred_l_n = _py_counts(l_, mr, pr)
        widths = (t * keep_l, t * pred_l_n)
    return _build_split(to_tokens(vis_l), to_tokens(pred_l), widths)


# --------------------------------------------------------------------------- modalities


SplitLike = Union[MaskSplit, tuple[Tensor, Tensor]]


def _as_split(split: object) -> MaskSplit:
    if isinstance(split, MaskSplit):
        if _split_is_host_checkable(split):  # free on the CPU; see MaskSplit.validate
            _check_split_values(split, "split")
        return split
    if isinstance(split, tuple) and len(split) == 2:
        return mask_split_from_masks(split[0], split[1])
    raise TypeError(
        "split must be a MaskSplit or a (visible_mask, predict_mask) pair, "
        f"got {type(split).__name__}"
    )


def _check_missing(name: str, missing: object, b: int) -> Tensor:
    m = check_tensor(name, missing)
    if m.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = missing), got {m.dtype}")
    if tuple(m.shape) != (b,):
        raise ValueError(f"{name} has shape {tuple(m.shape)} but the split needs shape {(b,)}")
    return m


def _used_width(pad: Tensor) -> Tensor:
    """One past the last non-padding slot of any row of ``pad [b, k]`` (int64 scalar)."""
    if pad.numel() == 0:
        return torch.zeros((), dtype=torch.long, device=pad.device)
    pos = torch.arange(1, pad.shape[1] + 1, device=pad.device).expand_as(pad)
    return torch.where(pad, 0, pos).amax()


def mask_missing_samples(split: SplitLike, missing: Tensor) -> MaskSplit:
    """Remove every token of the samples whose modality is missing.

    A sample flagged in ``missing`` keeps no visible token and predicts none (there is no
    data to reconstruct); the other samples are returned unchanged (flags act per sample,
    never through a batch-level reduction). Slot order is preserved. Off-GPU (outside
    ``torch.compile``), trailing columns that became padding in every sample are trimmed so
    ``k``/``p`` stay the largest counts; on CUDA and while compiling the widths are kept
    (trimming would need a host sync and change shapes from step to step).

    Args:
        split: a `MaskSplit` over ``n`` tokens, or a pair ``(visible_mask [b, n],
            predict_mask [b, n])`` (True = visible / predicted).
        missing: bool ``[b]``, True = the modality is missing for that sample.

    Returns:
        A new `MaskSplit`; flagged rows have all-False ``visible_mask``/``predict_mask`` and
        all-True ``keep_padding_mask``/``predict_padding_mask`` (their ids are 0).

    Raises:
        TypeError: ``split`` or ``missing`` of the wrong type or dtype.
        ValueError: ``missing`` not of shape ``[b]``.
    """
    sp = _as_split(split)
    b = sp.visible_mask.shape[0]
    gone = _check_missing("missing", missing, b).to(sp.visible_mask.device)
    return _drop_rows(sp, gone)


def _drop_rows(sp: MaskSplit, gone: Tensor) -> MaskSplit:
    keep_pad = sp.keep_padding_mask | gone[:, None]
    pred_pad = sp.predict_padding_mask | gone[:, None]
    ids_keep = sp.ids_keep.masked_fill(keep_pad, 0)
    ids_pred = sp.ids_predict.masked_fill(pred_pad, 0)
    vis = sp.visible_mask & ~gone[:, None]
    pred = sp.predict_mask & ~gone[:, None]
    if vis.is_cuda or torch.compiler.is_compiling():
        return MaskSplit(ids_keep, keep_pad, ids_pred, pred_pad, vis, pred)  # static, no sync
    # Trim the columns that are now padding in every row (free off-GPU).
    wk, wp = (int(w) for w in torch.stack((_used_width(keep_pad), _used_width(pred_pad))).tolist())
    ids_keep, keep_pad = ids_keep[:, :wk], keep_pad[:, :wk]
    ids_pred, pred_pad = ids_pred[:, :wp], pred_pad[:, :wp]
    return MaskSplit(ids_keep, keep_pad, ids_pred, pred_pad, vis, pred)


def modality_dropout(
    split: SplitLike,
    missing: Optional[Tensor] = None,
    *,
    drop_prob: float = 0.0,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> MaskSplit:
    """Fully mask a modality for some samples: the missing ones and/or a random share.

    A sample is dropped when ``missing`` flags it (no data) or, with ``drop_prob > 0``,
    when its ``noise`` value is ``< drop_prob`` (random modality dropout, drawn per sample).
    A dropped sample has no visible token and no target (see `mask_missing_samples`); the
    decision for one sample never depends on another sample.

    Args:
        split: a `MaskSplit` over ``n`` tokens, or ``(visible_mask [b, n], predict_mask
            [b, n])`` (True = visible / predicted).
        missing: bool ``[b]``, True = the modality is missing for that sample; default none.
        drop_prob: probability of dropping a present sample, ``0 <= drop_prob <= 1``.
        noise: float ``[b]`` uniform scores for the random drop (default drawn with
            ``generator``, only when ``drop_prob > 0``).
        generator: RNG for the default noise.

    Returns:
        A new `MaskSplit` (as `mask_missing_samples`).

    Raises:
        TypeError: arguments of the wrong type or dtype.
        ValueError: ``drop_prob`` outside ``[0, 1]`` or shapes not matching ``[b]``.
    """
    check_generator("generator", generator)
    sp = _as_split(split)
    b = sp.visible_mask.shape[0]
    dev = sp.visible_mask.device
    p = check_ratio("drop_prob", drop_prob)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_prob must satisfy 0 <= drop_prob <= 1, got {drop_prob!r}")
    gone = torch.zeros(b, dtype=torch.bool, device=dev)
    if missing is not None:
        gone = gone | _check_missing("missing", missing, b).to(dev)
    noise = _check_noise(noise, (b,), "the split's batch")
    if noise is not None or p > 0.0:
        if noise is None:
            noise = uniform_noise((b,), generator, dev)
        gone = gone | (noise.to(dev) < p)
    return _drop_rows(sp, gone)
