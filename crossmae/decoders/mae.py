"""MAE-style decoder (self-attention over the whole sequence), for comparison with CrossMAE.

Legend: ``b`` batch, ``n`` tokens in the full sequence, ``m`` visible tokens, ``p`` predicted
tokens, ``e`` encoder width, ``c`` decoder width, ``o`` output width.
Mask polarity: every ``*_padding_mask`` True = padding slot.
"""

from __future__ import annotations

from typing import Callable, Optional, Union, cast

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import (
    check_bool,
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_optional_bool,
    check_padding_mask,
)
from ..layers import backend
from ..layers.blocks import Block
from ..layers.drop import drop_path_schedule
from ..masking.tokens import _check_unique_ids, gather_tokens
from .cross import _param_dtype_check, _QueryEmbeddings

__all__ = ["MAEDecoder"]


class MAEDecoder(_QueryEmbeddings):
    """MAE's decoder: embed visible tokens, scatter them among mask tokens, self-attend.

    Every position of the full sequence is decoded (that is MAE's cost); the predictions at
    ``ids_predict`` are returned so it is a drop-in for `CrossMAEDecoder`.

    Args:
        context_dim: encoder width ``e``.
        dim: decoder width ``c``.
        depth: number of `Block` s.
        num_heads: attention heads.
        out_dim: prediction width ``o``.
        num_tokens: full sequence length ``n``.
        mlp_ratio: MLP hidden width multiple.
        qkv_bias: bias on qkv.
        drop_path: stochastic depth, linear from 0 to this value.
        norm_layer: norm constructor.
        pos_embed: ``"learned"``, a fixed ``[n, c]`` table, or None (pass ``pos``, or give
            ``query_pos``).
        modality_embed: add a learned ``[c]`` vector to every token.
        fused_attn: see `Attention`.
        drop: dropout after every attention projection and inside every MLP (training
            only).
        attn_drop: dropout on the attention weights (training only).
        query_pos: a query-position module (see `crossmae.decoders.query_pos`) mapping int64
            ids ``[b, n]`` to ``[b, n, c]``; it gives the positions of all ``n`` tokens
            (ids ``0..n-1``). Needs ``pos_embed=None``; None (default): the table.

    Shapes:
        ``forward(context [b, m, e], ids_keep [b, m], ids_predict [b, p], *,
        context_padding_mask [b, m] | None, query_padding_mask [b, p] | None,
        padding_mask [b, n] | None, pos [n, c] | [b, n, c] | None) -> [b, p, o]``.
        Real ``ids_keep`` must be distinct within a sample: a repeat is refused on CPU
        tensors (``ValueError``); on CUDA it cannot be checked without a sync and the
        repeated tokens are summed at their position (value and gradient agree, as in
        `crossmae.scatter_tokens`), never mixed with the mask token.
        ``context_padding_mask`` marks padded visible slots (never scattered);
        ``padding_mask`` marks padding in the full sequence (never a key). ``context`` must
        have the decoder's dtype (any float dtype under autocast); ``pos`` is cast to it.
        Real ``ids_keep`` must be distinct and in ``[0, n)``: an id out of range is not
        checked on the host (that would sync) and the scatter kernel raises.
    """

    def __init__(
        self,
        context_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        num_tokens: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        pos_embed: Union[str, Tensor, None] = "learned",
        modality_embed: bool = False,
        fused_attn: Optional[bool] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        query_pos: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        check_bool("qkv_bias", qkv_bias)
        check_bool("modality_embed", modality_embed)
        check_optional_bool("fused_attn", fused_attn)
        self.context_dim = check_int("context_dim", context_dim, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.depth = check_int("depth", depth, minimum=1)
        check_int("out_dim", out_dim, minimum=1)
        self.num_tokens = check_int("num_tokens", num_tokens, minimum=0)
        self.embed = nn.Linear(context_dim, dim)
        self._init_queries(dim, pos_embed, num_tokens, modality_embed, query_pos)
        rates = drop_path_schedule(drop_path, depth)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=r,
                norm_layer=norm_layer,
                fused_attn=fused_attn,
            )
            for r in rates
        )
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(
        self,
        context: Tensor,
        ids_keep: Tensor,
        ids_predict: Tensor,
        *,
        context_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
    ) -> Tensor:
        """Decode the full sequence (visible tokens among mask tokens), return ``ids_predict``'s.

        Args:
            context: float ``[b, m, e]`` visible encoder tokens, in the decoder's dtype (any
                float dtype under autocast).
            ids_keep: int64 ``[b, m]`` token ids of the visible tokens (distinct in each
                row; padded slots hold a valid id, e.g. 0).
            ids_predict: int64 ``[b, p]`` ids of the tokens to return.
            context_padding_mask: optional bool ``[b, m]``, **True = padding** visible slot
                (never scattered: NaN stored there never reaches an output).
            query_padding_mask: optional bool ``[b, p]``, **True = padding** (checked; those
                outputs are finite and meaningless).
            padding_mask: optional bool ``[b, n]``, **True = padding** in the full sequence
                (never a key).
            pos: optional ``[n, c]`` or ``[b, n, c]`` table, only for a decoder built with
                ``pos_embed=None`` and no ``query_pos``.

        Returns:
            ``[b, p, o]`` predictions at ``ids_predict``.
        """
        ctx = check_float_tensor("context", context)
        if ctx.ndim != 3 or ctx.shape[-1] != self.context_dim:
            raise ValueError(
                f"context must have shape [b, m, {self.context_dim}] (context_dim="
                f"{self.context_dim}), got {tuple(ctx.shape)}"
            )
        _param_dtype_check("context", ctx, self.mask_token.dtype, "decoder")
        ids_keep = check_index_tensor("ids_keep", ids_keep)
        ids_predict = check_index_tensor("ids_predict", ids_predict)
        b, n = ctx.shape[0], self.num_tokens
        if tuple(ids_keep.shape) != tuple(ctx.shape[:2]):
            raise ValueError(
                f"ids_keep has shape {tuple(ids_keep.shape)} but context has {tuple(ctx.shape)}"
            )
        if ids_predict.shape[0] != b:
            raise ValueError(
                f"ids_predict has batch {ids_predict.shape[0]} (shape "
                f"{tuple(ids_predict.shape)}) but context has batch {b}"
            )
        cpad = check_padding_mask(
            "context_padding_mask", context_padding_mask, ids_keep.shape, "ids_keep"
        )
        check_padding_mask(
            "query_padding_mask", query_padding_mask, ids_predict.shape, "ids_predict"
        )
        pad = check_padding_mask("padding_mask", padding_mask, (b, n), "(b, num_tokens)")
        if self.query_pos is not None:
            if pos is not None:
                raise ValueError("pos was given but this decoder takes positions from query_pos")
            all_ids = torch.arange(n, device=ctx.device).expand(b, n)
            table = self._query_positions(self.query_pos, all_ids, self.dim)
        else:
            table = self._position_table(pos)
        if (table.ndim == 2 and tuple(table.shape) != (n, self.dim)) or (
            table.ndim == 3 and tuple(table.shape) != (b, n, self.dim)
        ):
            raise ValueError(
                f"pos must have shape [{n}, {self.dim}] or [{b}, {n}, {self.dim}] (num_tokens="
                f"{n}, dim={self.dim}, batch {b}), got {tuple(table.shape)}"
            )
        _check_unique_ids(ids_keep, n, cpad, "ids_keep")
        x = self.embed(ctx)
        # Scatter the visible tokens among mask tokens. An additive scatter: padded slots are
        # zeroed and sent to token 0 (adding 0 changes nothing), real ids are unique (refused
        # on the CPU otherwise; on CUDA repeats sum, as in `scatter_tokens`), so the sum is
        # exact, and an id out of [0, n) is an index error of the kernel, never silently
        # dropped. A position gets the mask token only where nothing real landed.
        idx = ids_keep.long()
        weight = torch.ones_like(idx, dtype=x.dtype)
        if cpad is not None:
            x = x.masked_fill(cpad[..., None], 0.0)
            idx = idx.masked_fill(cpad, 0)
            weight = weight.masked_fill(cpad, 0.0)
        visible = x.new_zeros(b, n, x.shape[-1])  # [b n c], 0 where nothing is visible
        hit = x.new_zeros(b, n)  # [b n], 1 at visible tokens
        if n > 0:  # (with n = 0 every visible slot must be padding: nothing to place)
            visible = visible.scatter_add(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)
            hit = hit.scatter_add(1, idx, weight)
        full = torch.where(hit[..., None] > 0, visible, self.mask_token.to(x.dtype))
        full = full + table.to(full.dtype)
        if self.modality_embed is not None:
            full = full + self.modality_embed
        # The attention plan, decided once for every block (the kernel table applies here as
        # in every other stack); the packed kernel gets trailing padding, reordered once.
        attn = cast(Block, self.blocks[0]).attn
        plan = backend.plan_for(
            full,
            attn.head_dim,
            padding_mask=pad,
            dropout_p=attn.attn_drop if self.training else 0.0,
            fused=attn.fused_attn,
        )
        full, block_pad, plan, perm = backend.order_for(plan, full, pad)
        for blk in self.blocks:
            full = blk(full, block_pad, plan=plan)
        if perm is not None:
            full, _ = backend.restore_order(perm, full)
        out = self.head(self.norm(full))
        return gather_tokens(out, ids_predict)
