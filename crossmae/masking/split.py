"""`MaskSplit` and MAE/CrossMAE-compatible random masking over padded token sets.

Legend: ``b`` batch, ``n`` tokens, ``k`` kept (visible) slots, ``p`` predicted slots.
Mask polarity: ``*_padding_mask`` True = padding slot; ``visible_mask`` True = the encoder
sees the token; ``predict_mask`` True = the token is a reconstruction target.

Every real token of a sample is exactly one of: kept (visible), predicted, or skipped
(hidden but not reconstructed, CrossMAE's partial reconstruction). Padding is never any.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .._checks import (
    check_generator,
    check_int,
    check_padding_mask,
    check_ratio,
    check_tensor,
)
from .tokens import gather_tokens

__all__ = ["MaskSplit", "mask_split_from_masks", "random_masking"]


class MaskSplit(NamedTuple):
    """Which tokens each sample keeps (encoder input) and predicts (decoder queries).

    Attributes:
        ids_keep: int64 ``[b, k]`` token indices the encoder sees, padded with 0.
        keep_padding_mask: bool ``[b, k]``, True = padding slot in ``ids_keep``.
        ids_predict: int64 ``[b, p]`` token indices to reconstruct (ascending), padded with 0.
        predict_padding_mask: bool ``[b, p]``, True = padding slot in ``ids_predict``.
        visible_mask: bool ``[b, n]``, True = the encoder sees this token.
        predict_mask: bool ``[b, n]``, True = this token is a reconstruction target.

    ``k`` and ``p`` are the largest per-sample counts in the batch.

    Splits made by crossmae are self-consistent by construction; one built or edited by
    hand must be too (distinct real ids in range, masks equal to the ids, no token both
    visible and predicted): see `validate`, which the entry points taking a split run
    whenever it is free (CPU tensors).
    """

    ids_keep: Tensor
    keep_padding_mask: Tensor
    ids_predict: Tensor
    predict_padding_mask: Tensor
    visible_mask: Tensor
    predict_mask: Tensor

    @property
    def num_keep(self) -> Tensor:
        """Visible tokens per sample, int64 ``[b]``."""
        return (~self.keep_padding_mask).sum(dim=1)

    @property
    def num_predict(self) -> Tensor:
        """Predicted tokens per sample, int64 ``[b]``."""
        return (~self.predict_padding_mask).sum(dim=1)

    # --- validation (issue 9): a split a user builds is checked here, never in forward ---
    def validate(self, num_tokens: Optional[int] = None) -> MaskSplit:
        """Check that this split is self-consistent; return it unchanged, or raise.

        Splits made by crossmae are valid by construction. A split built or edited by hand
        is checked by the public entry points that accept one (`ImageCrossMAE.forward`,
        ``MultimodalMAE(splits=...)``, `mask_missing_samples`, ...) whenever that is free:
        when its tensors are on the CPU and nothing is being compiled. On CUDA those entry
        points do not check values (that would sync with the device); call ``validate()``
        once in data preparation instead. It syncs, so keep it out of compiled code.

        The rules (each failure is a ``ValueError`` naming the field):

        - shapes and dtypes: ``ids_*`` integer ``[b, k]`` / ``[b, p]`` with their
          ``*_padding_mask`` of the same shape, ``visible_mask`` / ``predict_mask`` bool
          ``[b, n]``;
        - every id (padded slots included) lies in ``[0, n)``;
        - no real id repeats within a sample in ``ids_keep`` nor in ``ids_predict``;
        - ``visible_mask`` is exactly the set of real ``ids_keep`` and ``predict_mask``
          exactly the set of real ``ids_predict``;
        - no token is both visible and predicted.

        Args:
            num_tokens: ``n``, when the caller knows it (default ``visible_mask.shape[1]``).

        Returns:
            ``self``, so ``split = split.validate()`` chains.
        """
        if num_tokens is not None:
            check_int("num_tokens", num_tokens, minimum=0)
        _check_split_values(self, "split", num_tokens)
        return self

    def visible_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gather the visible tokens of ``x [b, n, ...]``.

        Returns ``(tokens [b, k, ...], keep_padding_mask [b, k])``; padded slots of
        ``tokens`` are zeroed so stray NaN in unused inputs cannot travel.
        """
        ids, pad = self._field_pair("ids_keep", "keep_padding_mask")
        out = gather_tokens(x, ids)
        return _zero_padded(out, pad), pad

    def predict_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gather the target tokens of ``x [b, n, ...]``: ``(tokens [b, p, ...], predict_padding_mask)``."""
        ids, pad = self._field_pair("ids_predict", "predict_padding_mask")
        out = gather_tokens(x, ids)
        return _zero_padded(out, pad), pad

    def _field_pair(self, ids_name: str, pad_name: str) -> tuple[Tensor, Tensor]:
        """``split.<ids_name>`` (integer ``[b, k]``) and ``split.<pad_name>`` (bool ``[b, k]``).

        Metadata checks only, so a hand-built or edited split fails with an error naming
        the field instead of deep inside a kernel.
        """
        ids, pad = getattr(self, ids_name), getattr(self, pad_name)
        for name, t in ((ids_name, ids), (pad_name, pad)):
            if not isinstance(t, Tensor):
                raise TypeError(f"split.{name} must be a torch.Tensor, got {type(t).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"split.{ids_name} must be an int64 index tensor, got {ids.dtype}")
        if pad.dtype != torch.bool:
            raise TypeError(
                f"split.{pad_name} must have dtype torch.bool (True = padding), got {pad.dtype}"
            )
        if ids.ndim != 2 or tuple(pad.shape) != tuple(ids.shape):
            raise ValueError(
                f"split.{ids_name} {tuple(ids.shape)} and split.{pad_name} "
                f"{tuple(pad.shape)} must both be [b, k]"
            )
        return ids, pad

    # -- travelling like a batch: to / pin_memory / collate / DataLoader workers ----------
    # A MaskSplit is a NamedTuple of tensors, so `torch.utils.data.default_collate` and the
    # DataLoader's pin-memory thread already recurse into it and keep its type, and it
    # pickles to and from worker processes. `collate` handles per-sample splits of unequal
    # widths, which stacking cannot.

    def to(self, device: Union[str, torch.device], *, non_blocking: bool = False) -> MaskSplit:
        """Move every field to ``device`` (``non_blocking=True`` overlaps the copy from
        pinned memory with compute, as for any batch tensor)."""
        if not isinstance(non_blocking, bool):
            raise TypeError(f"non_blocking must be a bool, got {non_blocking!r}")
        if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
            raise TypeError(
                f"device must be a str, torch.device or int, got {device!r} "
                f"({type(device).__name__})"
            )
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device {device!r} is not a device: {e}") from None
        return type(self)(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> MaskSplit:
        """Copy every field into page-locked memory (what ``DataLoader(pin_memory=True)``
        does to a batch), so ``.to("cuda", non_blocking=True)`` is asynchronous."""
        return type(self)(*(t.pin_memory() for t in self))

    @staticmethod
    def collate(splits: Sequence[MaskSplit]) -> MaskSplit:
        """Join per-sample or per-batch splits into one batch (data preparation).

        Each element is a split over the same ``n`` tokens, either batched (fields
        ``[b_i, ...]``) or one sample (fields without the batch dimension: ``ids_keep [k]``,
        ``visible_mask [n]``, ...). Widths ``k`` and ``p`` may differ: slots are re-padded
        to the largest (padded ids 0, padding masks True), keeping each sample's order. Use
        it as (part of) a DataLoader ``collate_fn``; splits of equal widths also go through
        `torch.utils.data.default_collate` (which stacks them).

        Returns:
            One `MaskSplit` with batch ``sum(b_i)`` (or the number of samples).
        """
        if isinstance(splits, MaskSplit) or not isinstance(splits, Sequence) or not splits:
            raise TypeError(
                f"splits must be a non-empty sequence of MaskSplit, got {type(splits).__name__}"
            )
        batched: list[MaskSplit] = []
        for i, sp in enumerate(splits):
            if not isinstance(sp, MaskSplit):
                raise TypeError(f"splits[{i}] must be a MaskSplit, got {type(sp).__name__}")
            one = sp.visible_mask.ndim == 1
            batched.append(MaskSplit(*(t[None] for t in sp)) if one else sp)
        n = batched[0].visible_mask.shape[-1]
        for i, sp in enumerate(batched):
            if sp.visible_mask.shape[-1] != n:
                raise ValueError(
                    f"splits[{i}] is over {sp.visible_mask.shape[-1]} tokens but splits[0] over {n}"
                )

        def join(ids_field: int, pad_field: int) -> tuple[Tensor, Tensor]:
            width = max(sp[ids_field].shape[1] for sp in batched)
            ids, pads = [], []
            for sp in batched:
                extra = width - sp[ids_field].shape[1]
                ids.append(torch.nn.functional.pad(sp[ids_field], (0, extra), value=0))
                pads.append(torch.nn.functional.pad(sp[pad_field], (0, extra), value=True))
            return torch.cat(ids), torch.cat(pads)

        ids_keep, keep_pad = join(0, 1)
        ids_predict, predict_pad = join(2, 3)
        visible = torch.cat([sp.visible_mask for sp in batched])
        predict = torch.cat([sp.predict_mask for sp in batched])
        return MaskSplit(ids_keep, keep_pad, ids_predict, predict_pad, visible, predict)


def _zero_padded(x: Tensor, pad: Tensor) -> Tensor:
    return x.masked_fill(pad.reshape(*pad.shape, *([1] * (x.ndim - 2))), 0)


def _ranks(order: Tensor) -> Tensor:
    """The inverse of the permutations ``order [..., n]`` along the last dim: the rank of
    every slot in its row's order."""
    src = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, src)


def _first_slots(order: Tensor, counts: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """First ``counts[i]`` entries of each row of ``order``, padded to ``width`` with 0."""
    ids = order[:, :width]
    pad = torch.arange(width, device=order.device)[None, :] >= counts[:, None]
    return ids.masked_fill(pad, 0), pad


def _ascending_ids(selected: Tensor, counts: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Indices of True entries of ``selected [b, n]`` in ascending order, padded to ``width``."""
    order = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)
    return _first_slots(order, counts, width)


def _max_count(counts: Tensor) -> int:
    # Output widths depend on the data: one host sync, in data preparation, never in forward.
    return int(counts.max()) if counts.numel() > 0 else 0


def random_masking(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    predict_ratio: Optional[float] = None,
    padding_mask: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> MaskSplit:
    """Per-sample random keep / predict / skip split, MAE- and CrossMAE-compatible.

    For a sample with ``n`` real tokens (``num_tokens`` when ``padding_mask`` is None):
    ``n_keep = int(n * (1 - mask_ratio))``, ``n_skip = int(n * (mask_ratio - predict_ratio))``,
    ``n_predict = n - n_keep - n_skip`` (float64, exactly as Python evaluates them). Real
    tokens are ordered by ``noise`` ascending (stable); the first ``n_keep`` are kept (in that
    order, as MAE's ``ids_keep``), the last ``n_predict`` are predicted (ascending index).

    Args:
        batch_size: ``b``.
        num_tokens: ``n`` (padded length).
        mask_ratio: share of real tokens hidden from the encoder, ``0 <= mask_ratio < 1``.
        predict_ratio: share of *all* real tokens reconstructed (CrossMAE's
            ``kept_mask_ratio``), ``0 < predict_ratio <= mask_ratio``; default ``mask_ratio``.
        padding_mask: bool ``[b, n]``, True = padding (never selected).
        noise: float ``[b, n]`` ordering scores (small = keep); default uniform noise.
        generator: RNG for the default noise.
        device: device of the result (default: that of ``padding_mask``/``noise``, else CPU).

    Returns:
        `MaskSplit`. With ``padding_mask`` the widths ``k``/``p`` are the largest per-sample
        counts, which needs one host sync; without it no sync happens.

    Raises:
        ValueError: ratios out of range, or shapes/devices of ``padding_mask``/``noise``
            not matching ``(batch_size, num_tokens)``.
    """
    check_generator("generator", generator)
    b = check_int("batch_size", batch_size, minimum=0)
    n = check_int("num_tokens", num_tokens, minimum=0)
    mr = check_ratio("mask_ratio", mask_ratio)
    if not 0.0 <= mr < 1.0:
        raise ValueError(f"mask_ratio must satisfy 0 <= mask_ratio < 1, got {mask_ratio!r}")
    if predict_ratio is None:
        pr = mr
    else:
        pr = check_ratio("predict_ratio", predict_ratio)
        if not 0.0 < pr <= mr:
            raise ValueError(
                f"predict_ratio must satisfy 0 < predict_ratio <= mask_ratio ({mask_ratio!r}), "
                f"got {predict_ratio!r}"
            )
    pad = check_padding_mask("padding_mask", padding_mask, (b, n), "(batch_size, num_tokens)")
    if noise is not None:
        noise = check_tensor("noise", noise)
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
        if tuple(noise.shape) != (b, n):
            raise ValueError(
                f"noise has shape {tuple(noise.shape)} but (batch_size, num_tokens) is {(b, n)}"
            )
    dev = _resolve_device(device, pad, noise, generator)
    if noise is None:
        noise = uniform_noise((b, n), generator, dev)
    noise = noise.to(dev)

    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    if pad is None:
        # Every sample has the same counts: the split is slices of the shuffle, with about
        # half the launches of the padded path (eager steps wait for the host here, before
        # the first kernel of the step that is worth waiting for).
        n_keep_i = int(n * (1 - mr))
        n_skip_i = int(n * (mr - pr))
        n_pred_i = n - n_keep_i - n_skip_i
        first_pred = n - n_pred_i
        ranks = _ranks(ids_shuffle)
        return MaskSplit(
            ids_shuffle[:, :n_keep_i],
            torch.zeros((b, n_keep_i), dtype=torch.bool, device=dev),
            ids_shuffle[:, first_pred:].sort(dim=1).values,  # ascending index
            torch.zeros((b, n_pred_i), dtype=torch.bool, device=dev),
            ranks < n_keep_i,
            ranks >= first_pred,
        )
    pad = pad.to(dev)
    # Real tokens first (in noise order), padding last, whatever the noise values are.
    pad_sorted = torch.gather(pad, 1, ids_shuffle)
    ids_shuffle = torch.gather(
        ids_shuffle, 1, torch.argsort(pad_sorted.to(torch.uint8), dim=1, stable=True)
    )
    real = (~pad).sum(dim=1)
    real_f = real.to(torch.float64)
    n_keep = torch.floor(real_f * (1 - mr)).long()
    n_skip = torch.floor(real_f * (mr - pr)).long()
    n_pred = real - n_keep - n_skip
    width_keep, width_pred = _max_count(n_keep), _max_count(n_pred)

    ranks = _ranks(ids_shuffle)
    visible_mask = ranks < n_keep[:, None]
    predict_mask = (ranks >= (real - n_pred)[:, None]) & (ranks < real[:, None])
    ids_keep, keep_pad = _first_slots(ids_shuffle, n_keep, width_keep)
    ids_predict, predict_pad = _ascending_ids(predict_mask, n_pred, width_pred)
    return MaskSplit(ids_keep, keep_pad, ids_predict, predict_pad, visible_mask, predict_mask)


def uniform_noise(
    shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device
) -> Tensor:
    """Uniform noise on ``device``, drawn from ``generator`` on the generator's own device.

    A CPU generator with CUDA data is fine (the noise is drawn on the CPU, then moved), so
    the same seed gives the same masks on every device.
    """
    check_generator("generator", generator)
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _resolve_device(
    device: Optional[Union[str, torch.device]],
    pad: Optional[Tensor],
    noise: Optional[Tensor],
    generator: Optional[torch.Generator],
) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a valid torch device") from e
    if pad is not None:
        return pad.device
    if noise is not None:
        return noise.device
    if generator is not None:
        return generator.device
    return torch.device("cpu")


class _DenseSplit(MaskSplit):
    """A `MaskSplit` drawn by crossmae's own masking without any padding: every sample
    keeps, and predicts, the same number of tokens (no padding slot). Models given one run
    its attention unmasked, as for their own draws (`ImageCrossMAE.random_split`,
    `MultimodalMAE.draw_splits` make them). Moving it (``to``, ``pin_memory``) or stacking
    copies of it keeps the mark; an edited copy (``_replace``) is a plain `MaskSplit`.
    Built from fields that hold a padding slot (``default_collate`` stacking it with a
    padded split, say) it is a plain `MaskSplit` wherever that is free to see (CPU
    tensors, not compiling)."""

    __slots__ = ()

    def __new__(cls, *fields: Tensor) -> MaskSplit:  # type: ignore[misc]
        split = super().__new__(cls, *fields)
        if _split_is_host_checkable(split) and bool(
            split.keep_padding_mask.any() or split.predict_padding_mask.any()
        ):
            return MaskSplit(*split)
        return split

    def _replace(self, /, **changes: Any) -> MaskSplit:  # type: ignore[override]
        return MaskSplit(*self)._replace(**changes)


def mask_split_from_masks(
    visible_mask: Tensor,
    predict_mask: Tensor,
    *,
    padding_mask: Optional[Tensor] = None,
) -> MaskSplit:
    """Build a `MaskSplit` from boolean token masks (for custom masking strategies).

    Args:
        visible_mask: bool ``[b, n]``, True = the encoder sees the token.
        predict_mask: bool ``[b, n]``, True = reconstruct the token. Must not overlap
            ``visible_mask``.
        padding_mask: bool ``[b, n]``, True = padding; padded tokens are dropped from both
            masks (a padded slot is never visible nor predicted).

    Returns:
        `MaskSplit` whose ``ids_keep`` and ``ids_predict`` are in ascending token order.

    Raises:
        ValueError: shapes differ, or a token is both visible and predicted (checked on the
            host: this function is for data preparation, not for compiled forward code).
    """
    vis = check_tensor("visible_mask", visible_mask)
    if vis.dtype != torch.bool or vis.ndim != 2:
        raise TypeError(
            f"visible_mask must be a bool [b, n] tensor, got {vis.dtype} {tuple(vis.shape)}"
        )
    pred = check_padding_mask("predict_mask", predict_mask, vis.shape, "visible_mask")
    if pred is None:
        raise TypeError("predict_mask must be a bool [b, n] tensor, got None")
    pad = check_padding_mask("padding_mask", padding_mask, vis.shape, "visible_mask")
    if pad is not None:
        vis = vis & ~pad
        pred = pred & ~pad
    if bool((vis & pred).any()):
        raise ValueError("visible_mask and predict_mask overlap: a token cannot be both")
    return _split_from_disjoint_masks(vis, pred)


def _split_from_disjoint_masks(vis: Tensor, pred: Tensor) -> MaskSplit:
    n_keep = vis.sum(dim=1)
    n_pred = pred.sum(dim=1)
    ids_keep, keep_pad = _ascending_ids(vis, n_keep, _max_count(n_keep))
    ids_predict, predict_pad = _ascending_ids(pred, n_pred, _max_count(n_pred))
    return MaskSplit(ids_keep, keep_pad, ids_predict, predict_pad, vis, pred)


# --- validation (issue 9): the rules of `MaskSplit.validate`, shared by the entry points ---
def _split_is_host_checkable(split: MaskSplit) -> bool:
    """Whether checking ``split``'s values is free: every field on the CPU, not compiling."""
    return not torch.compiler.is_compiling() and all(
        isinstance(t, Tensor) and t.device.type == "cpu" for t in split
    )


def _bad_rows(bad: Tensor, limit: int = 4) -> str:
    rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(dim=1)).flatten()[:limit]
    return ", ".join(str(int(i)) for i in rows)


def _check_split_values(split: object, name: str, num_tokens: Optional[int] = None) -> None:
    """`MaskSplit.validate`'s checks (metadata, then values; the value checks sync)."""
    if not isinstance(split, MaskSplit):
        raise TypeError(f"{name} must be a MaskSplit, got {type(split).__name__}")
    for field in ("visible_mask", "predict_mask"):
        t = getattr(split, field)
        if not isinstance(t, Tensor) or t.dtype != torch.bool or t.ndim != 2:
            what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}.{field} must be a bool [b, n] tensor, got {what}")
    b, n = split.visible_mask.shape
    if num_tokens is not None and n != num_tokens:
        raise ValueError(
            f"{name}.visible_mask has {n} tokens but num_tokens={num_tokens} were expected"
        )
    if tuple(split.predict_mask.shape) != (b, n):
        raise ValueError(
            f"{name}.predict_mask has shape {tuple(split.predict_mask.shape)} but "
            f"{name}.visible_mask has {(b, n)}"
        )
    for ids_field, pad_field, mask_field in (
        ("ids_keep", "keep_padding_mask", "visible_mask"),
        ("ids_predict", "predict_padding_mask", "predict_mask"),
    ):
        ids, pad = split._field_pair(ids_field, pad_field)
        mask = getattr(split, mask_field)
        if ids.shape[0] != b:
            raise ValueError(
                f"{name}.{ids_field} has batch {ids.shape[0]} but {name}.{mask_field} has {b}"
            )
        outside = (ids < 0) | (ids >= n)
        if bool(outside.any()):
            raise ValueError(
                f"{name}.{ids_field} holds ids outside [0, {n}) (padded slots must hold a "
                f"valid index such as 0), in sample(s) {_bad_rows(outside)}"
            )
        real = ~pad
        counts = torch.zeros(b, n, dtype=torch.long, device=ids.device)
        counts = counts.scatter_add(1, ids.long(), real.long())
        if bool((counts > 1).any()):
            raise ValueError(
                f"{name}.{ids_field} repeats a real id within a sample (sample(s) "
                f"{_bad_rows(counts > 1)}); flag extra slots in {name}.{pad_field}"
            )
        if not torch.equal(counts == 1, mask):
            raise ValueError(
                f"{name}.{mask_field} disagrees with the real slots of {name}.{ids_field} "
                f"(sample(s) {_bad_rows((counts == 1) != mask)}): it must be True exactly at "
                "those ids"
            )
    both = split.visible_mask & split.predict_mask
    if bool(both.any()):
        raise ValueError(
            f"{name}.visible_mask and {name}.predict_mask overlap: a token is both visible "
            f"and predicted (sample(s) {_bad_rows(both)})"
        )
