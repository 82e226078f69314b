"""What the raster and series tokenizers share: a linear projection plus learned vectors."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from .._checks import check_int, check_tensor

__all__: list[str] = []


def _time_embed_positions(
    time_positions: Union[Tensor, int], batch: Optional[int] = None
) -> Tensor:
    """Validate time positions: an int ``t`` (arange) or a real tensor ``[t]`` / ``[b, t]``."""
    if isinstance(time_positions, int) and not isinstance(time_positions, bool):
        return torch.arange(check_int("time_positions", time_positions, minimum=1))
    tp = check_tensor("time_positions", time_positions)
    if tp.dtype == torch.bool or tp.is_complex():
        raise TypeError(f"time_positions must be a real int or float tensor, got {tp.dtype}")
    if tp.ndim not in (1, 2) or (batch is not None and tp.ndim == 2 and tp.shape[0] != batch):
        want = "[t] or [b, t]" if batch is None else f"[t] or [{batch}, t]"
        raise ValueError(f"time_positions must have shape {want}, got {tuple(tp.shape)}")
    return tp


def _check_time_positions(time_positions: object, batch: int, num_steps: int) -> None:
    """Entry-point check of a tokenizer's ``time_positions`` against ``x``'s batch and steps.

    Run before any work (the projection included), so a wrong tensor fails first.
    """
    if time_positions is None:
        return
    tp = _time_embed_positions(time_positions, batch)  # type: ignore[arg-type]
    if tp.shape[-1] != num_steps:
        raise ValueError(
            f"time_positions has shape {tuple(tp.shape)} but x has {num_steps} steps "
            f"(expected [{num_steps}] or [{batch}, {num_steps}])"
        )


class _ProjectedTokenizer(nn.Module):
    """Base of the tokenizers: ``proj`` (Linear), optional ``spatial_pos_embed`` and
    ``modality_embed`` parameters, and their initialisation."""

    proj: nn.Linear
    spatial_pos_embed: Optional[nn.Parameter]
    modality_embed: Optional[nn.Parameter]
    embed_dim: int
    # Each tokenizer defines ``_position_4d(time_positions, num_steps, batch)``: the spatial +
    # time embedding ``[b or 1, t, locations, d]``.
    _position_4d: Callable[[Optional[Tensor], int, int], Tensor]

    def _flat_position_embedding(
        self, num_steps: Optional[int], time_positions: Optional[Tensor], num_locations: int
    ) -> Tensor:
        """Time-major ``[t*locations, d]`` (``[b, t*locations, d]`` for ``[b, t]`` positions)."""
        tp = None if time_positions is None else _time_embed_positions(time_positions)
        if num_steps is None:
            if tp is None:
                raise ValueError("position_embedding needs num_steps or time_positions")
            t = tp.shape[-1]
        else:
            t = check_int("num_steps", num_steps, minimum=1)
        batch = tp.shape[0] if tp is not None and tp.ndim == 2 else 1
        pos = self._position_4d(tp, t, batch)
        pos = pos.expand(batch, t, num_locations, self.embed_dim)
        out: Tensor = rearrange(pos, "b t l d -> b (t l) d")
        if tp is None or tp.ndim == 1:
            out = out[0]
        # a fresh tensor: the forward's tables may be shared ones (`steps_table`)
        return out.clone() if out._is_view() else out

    def reset_parameters(self) -> None:
        """Xavier-uniform ``proj`` (zero bias); truncated normal (std 0.02) learned vectors."""
        nn.init.xavier_uniform_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        if self.spatial_pos_embed is not None:
            nn.init.trunc_normal_(self.spatial_pos_embed, std=0.02)
        if self.modality_embed is not None:
            nn.init.trunc_normal_(self.modality_embed, std=0.02)
