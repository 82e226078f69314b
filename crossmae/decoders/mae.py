"""MAE-style decoder (self-attention over the whole sequence), for comparison with CrossMAE.

Legend: ``b`` batch, ``n`` tokens in the full sequence, ``m`` visible tokens, ``p`` predicted
tokens, ``e`` encoder width, ``c`` decoder width, ``o`` output width.
Mask polarity: every ``*_padding_mask`` True = padding slot.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import check_float_tensor, check_index_tensor, check_int, check_padding_mask
from ..layers.blocks import Block
from ..layers.drop import drop_path_schedule
from ..masking.tokens import gather_tokens, scatter_tokens
from .cross import _QueryEmbeddings

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
        pos_embed: ``"learned"``, a fixed ``[n, c]`` table, or None (pass ``pos``).
        modality_embed: add a learned ``[c]`` vector to every token.
        fused_attn: see `Attention`.

    Shapes:
        ``forward(context [b, m, e], ids_keep [b, m], ids_predict [b, p], *,
        context_padding_mask [b, m] | None, query_padding_mask [b, p] | None,
        padding_mask [b, n] | None, pos [n, c] | [b, n, c] | None) -> [b, p, o]``.
        ``context_padding_mask`` marks padded visible slots (never scattered);
        ``padding_mask`` marks padding in the full sequence (never a key).
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
    ) -> None:
        super().__init__()
        self.context_dim = check_int("context_dim", context_dim, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.num_tokens = check_int("num_tokens", num_tokens, minimum=0)
        self.embed = nn.Linear(context_dim, dim)
        self._init_queries(dim, pos_embed, num_tokens, modality_embed)
        rates = drop_path_schedule(drop_path, depth)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
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
        ctx = check_float_tensor("context", context, ndim=3)
        ids_keep = check_index_tensor("ids_keep", ids_keep)
        ids_predict = check_index_tensor("ids_predict", ids_predict)
        b, n = ctx.shape[0], self.num_tokens
        if tuple(ids_keep.shape) != tuple(ctx.shape[:2]):
            raise ValueError(
                f"ids_keep has shape {tuple(ids_keep.shape)} but context has {tuple(ctx.shape)}"
            )
        cpad = check_padding_mask(
            "context_padding_mask", context_padding_mask, ids_keep.shape, "ids_keep"
        )
        check_padding_mask(
            "query_padding_mask", query_padding_mask, ids_predict.shape, "ids_predict"
        )
        pad = check_padding_mask("padding_mask", padding_mask, (b, n), "(b, num_tokens)")
        x = self.embed(ctx)
        if cpad is not None:
            x = x.masked_fill(cpad[..., None], 0.0)
        visible = scatter_tokens(x, ids_keep, n, padding_mask=cpad)  # [b n c], 0 elsewhere
        hit = scatter_tokens(
            torch.ones_like(ids_keep, dtype=x.dtype)[..., None], ids_keep, n, padding_mask=cpad
        )
        full = visible + (1 - hit) * self.mask_token.to(x.dtype)
        table = self._position_table(pos)
        full = full + table.to(full.dtype)
        if self.modality_embed is not None:
            full = full + self.modality_embed
        for blk in self.blocks:
            full = blk(full, pad)
        out = self.head(self.norm(full))
        return gather_tokens(out, ids_predict)
