"""Decoder query positions as an injected module (token ids in, position vectors out).

A *query-position module* is any ``nn.Module`` with an int attribute ``dim`` whose
``forward(ids)`` maps int64 token ids ``[b, p]`` (indices into the modality's token
sequence, as `MaskSplit.ids_predict`) to float positions ``[b, p, dim]``. Pass one as
``query_pos=`` to `CrossMAEDecoder` or `MAEDecoder` (with ``pos_embed=None``); the decoder
adds its mask token (and modality vector) to what it returns. It is a submodule, so its
parameters are trained with the decoder and appear under ``query_pos.`` in the state dict.

`SpatioTemporalQueryPos` is the ready one for time-major token sequences (token
``n = t·L + slot``, as `RasterTokenizer` and `SeriesTokenizer` number them): a learned
spatial table over every grid patch plus a fixed sin-cos embedding of the time step, for
any number of steps up to ``max_time_steps``, chosen at run time.

Legend: ``b`` batch, ``p`` queried tokens, ``L`` token slots per step, ``G`` rows of the
spatial table (grid patches), ``T`` steps built for, ``c`` width.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import check_float_tensor, check_index_tensor, check_int, check_tensor
from ..layers.pos_embed import sincos_pos_embed_1d

__all__ = ["SpatioTemporalQueryPos"]


class SpatioTemporalQueryPos(nn.Module):
    """Learned spatial table over all grid patches + fixed sin-cos of the time step.

    **Token id layout:** ``id = t · L + slot`` (time-major), ``t`` the step in
    ``[0, max_time_steps)``, ``slot`` in ``[0, L)`` the token's place within its step. The
    spatial row of a slot is ``patch_index[slot]`` (a grid patch in ``[0, num_patches)``); by
    default ``patch_index`` is the identity and ``L = num_patches``, i.e.
    ``id = t · num_patches + patch``. ``position(id) = spatial[patch_index[id % L]] +
    time_table[id // L]``.

    * Series (`SeriesTokenizer`, 76 site groups): ``SpatioTemporalQueryPos(76, c, 30)``; ids
      are ``t · 76 + p``.
    * Rasters over a land mask (`RasterTokenizer` numbers only its ``Lv`` valid patches,
      ``n = t · Lv + v``): ``SpatioTemporalQueryPos(522, c, 30,
      patch_index=tokenizer.valid_patch_index)``: the learned table covers all 522 grid
      patches (the downstream model's choice), ids are the tokenizer's.

    The number of steps is whatever the ids say, up to ``max_time_steps``: the same module
    serves 10 or 30 steps. Ids are not range-checked on the host (that would sync): an id
    at or beyond ``max_time_steps · L`` is an index error of the lookup kernel. Padded
    query slots hold id 0 (a valid id), so their positions are finite.

    Args:
        num_patches: rows ``G`` of the learned spatial table (grid patches).
        dim: width ``c`` (even, for the sin-cos time embedding).
        max_time_steps: largest number of steps ``T`` (rows of the time table).
        patch_index: optional int64 ``[L]``, spatial row of each slot (each in
            ``[0, num_patches)``); default ``arange(num_patches)``.
        time_table: optional float ``[T, c]`` fixed time embedding used instead of
            `sincos_pos_embed_1d` (``[sin ω_i t, cos ω_i t]`` halves); e.g. an interleaved
            ``sin, cos, sin, ...`` table to match another implementation exactly.
        init_std: std of the normal initialisation of the spatial table.

    Parameters: ``spatial [G, c]``. Buffers (not in the state dict): ``time_table [T, c]``,
    ``patch_index [L]``.
    """

    time_table: Tensor
    patch_index: Tensor

    def __init__(
        self,
        num_patches: int,
        dim: int,
        max_time_steps: int,
        *,
        patch_index: Optional[Tensor] = None,
        time_table: Optional[Tensor] = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_patches = check_int("num_patches", num_patches, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.max_time_steps = check_int("max_time_steps", max_time_steps, minimum=1)
        if patch_index is None:
            index = torch.arange(num_patches)
        else:
            index = check_tensor("patch_index", patch_index)
            if index.dtype not in (torch.int64, torch.int32) or index.ndim != 1:
                raise TypeError(
                    f"patch_index must be an int64 tensor [L], got dtype {index.dtype} and "
                    f"shape {tuple(index.shape)}"
                )
            if index.numel() == 0:
                raise ValueError("patch_index is empty: it must name at least one patch")
            lo, hi = int(index.min()), int(index.max())  # construction time: a sync is fine
            if lo < 0 or hi >= num_patches:
                raise ValueError(
                    f"patch_index values must lie in [0, num_patches={num_patches}), got "
                    f"range [{lo}, {hi}]"
                )
            index = index.detach().to(torch.int64).cpu().clone()
        self.tokens_per_step = int(index.numel())
        if time_table is None:
            if dim % 2 != 0:
                raise ValueError(f"dim must be even for the sin-cos time embedding, got {dim}")
            table = sincos_pos_embed_1d(dim, max_time_steps, dtype=torch.float32)
        else:
            table = check_float_tensor("time_table", time_table, ndim=2)
            if tuple(table.shape) != (max_time_steps, dim):
                raise ValueError(
                    f"time_table must have shape [max_time_steps, dim] = "
                    f"{(max_time_steps, dim)}, got {tuple(table.shape)}"
                )
            table = table.detach().clone()
        self.spatial = nn.Parameter(torch.empty(num_patches, dim))
        nn.init.normal_(self.spatial, std=init_std)
        self.register_buffer("time_table", table, persistent=False)
        self.register_buffer("patch_index", index, persistent=False)

    def num_tokens(self, num_steps: int) -> int:
        """Length ``num_steps · L`` of a token sequence of ``num_steps`` steps.

        Raises ValueError when ``num_steps`` is not in ``[1, max_time_steps]``.
        """
        t = check_int("num_steps", num_steps, minimum=1)
        if t > self.max_time_steps:
            raise ValueError(
                f"num_steps={t} exceeds max_time_steps={self.max_time_steps} this module "
                "was built for"
            )
        return t * self.tokens_per_step

    def forward(self, ids: Tensor) -> Tensor:
        """Positions of the tokens at ``ids``.

        Args:
            ids: int64 ``[b, p]`` token ids ``t · L + slot`` (padded slots may hold any valid
                id, e.g. 0; their positions are finite and meaningless).

        Returns:
            ``[b, p, c]`` in the spatial table's dtype: ``spatial[patch_index[id % L]] +
            time_table[id // L]``.
        """
        ids = check_index_tensor("ids", ids).long()
        per_step = self.tokens_per_step
        slot = torch.remainder(ids, per_step)
        step = torch.div(ids, per_step, rounding_mode="floor")
        rows = self.patch_index[slot]
        spatial = nn.functional.embedding(rows, self.spatial)
        time = nn.functional.embedding(step, self.time_table.to(self.spatial.dtype))
        return spatial + time

    def extra_repr(self) -> str:
        return (
            f"num_patches={self.num_patches}, dim={self.dim}, "
            f"max_time_steps={self.max_time_steps}, tokens_per_step={self.tokens_per_step}"
        )
