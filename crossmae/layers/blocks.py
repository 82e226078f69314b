"""Pre-norm Transformer blocks: self-attention (`Block`) and CrossMAE's `CrossAttentionBlock`.

Legend: ``b`` batch, ``n`` query tokens, ``m`` context tokens, ``c`` width.
Mask polarity: ``*_padding_mask`` bool, **True = padding**.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn
from torch import Tensor

from .._checks import (
    check_bool,
    check_optional_bool,
    check_padding_mask,
    check_probability,
    check_ratio,
)
from ._calls import call_part
from .attention import Attention, CrossAttention, _check_cross_inputs, _check_tokens, warn_trailing
from .backend import AttentionPlan
from .drop import DropPath
from .mlp import Mlp

__all__ = ["Block", "CrossAttentionBlock"]


def _hidden(dim: int, mlp_ratio: float) -> int:
    r = check_ratio("mlp_ratio", mlp_ratio)
    if r <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
    return max(1, int(dim * r))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        dim: token width ``c``.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: bias on the ``qkv`` projection.
        drop: dropout after the attention projection and inside the MLP (training only).
        attn_drop: dropout on attention weights (training only).
        drop_path: stochastic-depth probability for both residual branches.
        act_layer: MLP activation constructor.
        norm_layer: norm constructor, called as ``norm_layer(dim)``.
        fused_attn: see `Attention`.

    Shapes:
        ``forward(x [b, n, c], padding_mask [b, n] | None, *, plan=None) -> [b, n, c]``;
        True = padding; ``plan`` is the stack's `AttentionPlan` (see `Attention`;
        ``padding_is_trailing`` is deprecated and ignored).
        Padded tokens are zeroed on entry, so their outputs are finite (and meaningless) and
        never influence real tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        fused_attn: Optional[bool] = None,
    ) -> None:
        super().__init__()
        check_bool("qkv_bias", qkv_bias)
        check_optional_bool("fused_attn", fused_attn)
        check_probability("drop_path", drop_path)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            fused_attn=fused_attn,
        )
        self.drop_path1: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, _hidden(dim, mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path2: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        padding_is_trailing: Optional[bool] = None,
        plan: Optional[AttentionPlan] = None,
    ) -> Tensor:
        """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

        Args:
            x: tokens ``[b, n, c]``, floating point, of the module's dtype (any float dtype
                under autocast).
            padding_mask: bool ``[b, n]``, True = padding, or None (no padding). Padded tokens
                are zeroed on entry and never influence real tokens; their outputs are finite
                and meaningless.
            padding_is_trailing: deprecated, ignored; FutureWarning (the layout is
                the plan's).
            plan: the stack's `AttentionPlan` for the attention (see `Attention`); None decides
                for this call.

        Returns:
            ``[b, n, c]``.
        """
        if padding_is_trailing is not None:
            warn_trailing("padding_is_trailing", padding_is_trailing)
        x = _check_tokens("x", x, self.attn.dim, "dim", self.attn.qkv.weight.dtype)
        if padding_mask is not None:
            check_padding_mask("padding_mask", padding_mask, x.shape[:2], "x [b, n, c]")
            x = x.masked_fill(padding_mask[..., None], 0.0)
        attn = self.attn(self.norm1(x), padding_mask, plan=plan)
        x = x + call_part(self.drop_path1, attn)
        return x + call_part(self.drop_path2, self.mlp(self.norm2(x)))

    def forward_packed(
        self,
        x: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        *,
        plan: Optional[AttentionPlan] = None,
    ) -> Tensor:
        """The same block over a packed layout ``x [t, c]`` (see `pack_tokens`); stochastic
        depth is per row here, not per sample. ``plan``: the stack's packed-layout plan."""
        x = _check_tokens("x", x, self.attn.dim, "dim", self.attn.qkv.weight.dtype, ndim=2)
        attn = self.attn.forward_packed(self.norm1(x), cu_seqlens, max_seqlen, plan=plan)
        x = x + call_part(self.drop_path1, attn)
        return x + call_part(self.drop_path2, self.mlp(self.norm2(x)))


class CrossAttentionBlock(nn.Module):
    """CrossMAE decoder block: queries attend to a (padded) context.

    ``x + self_attn(norm0(x))`` among the queries (only with ``self_attn=True``), then
    ``x + cross_attn(norm1(x), context)``, then ``x + mlp(norm2(x))``. The context is used
    as given: normalize it beforehand (e.g. with the decoder's per-layer norms).

    Args:
        dim: query width ``c``.
        context_dim: context width (default ``dim``).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        self_attn: add self-attention among the queries (``norm0``, ``self_attn``).
        qkv_bias: bias on the q/kv/qkv projections.
        drop: dropout after attention projections and inside the MLP (training only).
        attn_drop: dropout on attention weights (training only).
        drop_path: stochastic-depth probability for every residual branch.
        act_layer: MLP activation constructor.
        norm_layer: norm constructor, called as ``norm_layer(dim)``.
        fused_attn: see `CrossAttention`.

    Shapes:
        ``forward(x [b, n, c], context [b, m, context_dim], context_padding_mask [b, m] | None,
        query_padding_mask [b, n] | None) -> [b, n, c]``. Both masks: True = padding.
        ``query_padding_mask`` only matters for the self-attention among queries (padded
        queries are never keys there); padded queries are zeroed on entry so their outputs
        are finite. ``plan`` / ``query_plan``: the stack's `AttentionPlan` for the
        cross-attention / the self-attention among queries (None: decided per call); the
        ``*_padding_is_trailing`` keywords are deprecated and ignored.
    """

    def __init__(
        self,
        dim: int,
        context_dim: Optional[int] = None,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        *,
        self_attn: bool = False,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        fused_attn: Optional[bool] = None,
    ) -> None:
        super().__init__()
        check_bool("self_attn", self_attn)
        check_bool("qkv_bias", qkv_bias)
        check_optional_bool("fused_attn", fused_attn)
        check_probability("drop_path", drop_path)
        self.has_self_attn = bool(self_attn)
        if self.has_self_attn:
            self.norm0 = norm_layer(dim)
            self.self_attn = Attention(
                dim,
                num_heads,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop,
                proj_drop=drop,
                fused_attn=fused_attn,
            )
            self.drop_path0: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm1 = norm_layer(dim)
        self.cross_attn = CrossAttention(
            dim,
            context_dim,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            fused_attn=fused_attn,
        )
        self.drop_path1: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, _hidden(dim, mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path2: nn.Module = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        *,
        context_padding_is_trailing: Optional[bool] = None,
        query_padding_is_trailing: Optional[bool] = None,
        plan: Optional[AttentionPlan] = None,
        query_plan: Optional[AttentionPlan] = None,
    ) -> Tensor:
        """CrossMAE decoder block: optional query self-attention, cross-attention, MLP.

        Args:
            x: queries ``[b, n, c]``, floating point, of the module's dtype (any float dtype
                under autocast).
            context: ``[b, m, context_dim]``, used as given (normalize it beforehand).
            context_padding_mask: bool ``[b, m]``, True = padding, or None. Padded context
                tokens are never keys of the cross-attention.
            query_padding_mask: bool ``[b, n]``, True = padding, or None. Padded queries are
                zeroed on entry and are never keys of the self-attention among queries (only
                with ``self_attn=True``); their outputs are finite and meaningless.
            context_padding_is_trailing: deprecated, ignored; FutureWarning (the layout is
                the plan's).
            query_padding_is_trailing: deprecated, ignored; FutureWarning (the layout is
                the plan's).
            plan: the stack's `AttentionPlan` for the cross-attention; None decides per call.
            query_plan: the stack's `AttentionPlan` for the self-attention among queries; None
                decides per call.

        Returns:
            ``[b, n, c]``: one output per query.
        """
        if context_padding_is_trailing is not None:
            warn_trailing("context_padding_is_trailing", context_padding_is_trailing)
        if query_padding_is_trailing is not None:
            warn_trailing("query_padding_is_trailing", query_padding_is_trailing)
        x, context, _ = _check_cross_inputs(self.cross_attn, x, context, context_padding_mask)
        if query_padding_mask is not None:
            check_padding_mask("query_padding_mask", query_padding_mask, x.shape[:2], "x [b, n, c]")
        x = self.before_cross(x, query_padding_mask, query_plan)
        ca = self.cross_attn(
            self.norm1(x),
            context,
            context_padding_mask,
            plan=plan,
        )
        return self.after_cross(x, ca)

    def _forward_kv(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        context_padding_mask: Optional[Tensor],
        query_padding_mask: Optional[Tensor],
        plan: Optional[AttentionPlan],
        query_plan: Optional[AttentionPlan],
    ) -> Tensor:
        """`forward` with the cross-attention's keys and values ``k, v [b, h, m, d]`` given
        (a decoder that projects every layer's context in one GEMM); inputs as its caller
        checked them."""
        x = self.before_cross(x, query_padding_mask, query_plan)
        ca = self.cross_attn._attend_kv(self.norm1(x), k, v, context_padding_mask, plan=plan)
        return self.after_cross(x, ca)

    def before_cross(
        self,
        x: Tensor,
        query_padding_mask: Optional[Tensor] = None,
        query_plan: Optional[AttentionPlan] = None,
    ) -> Tensor:
        """The steps of `forward` before the cross-attention (inputs already checked):
        padded queries zeroed, then the optional self-attention among queries. The
        cross-attention then reads ``norm1`` of the result."""
        if query_padding_mask is not None:
            x = x.masked_fill(query_padding_mask[..., None], 0.0)
        if self.has_self_attn:
            sa = self.self_attn(self.norm0(x), query_padding_mask, plan=query_plan)
            x = x + call_part(self.drop_path0, sa)
        return x

    def after_cross(self, x: Tensor, cross: Tensor) -> Tensor:
        """The steps of `forward` after the cross-attention: its residual (``cross``, the
        output of ``cross_attn``) and the MLP."""
        x = x + call_part(self.drop_path1, cross)
        return x + call_part(self.drop_path2, self.mlp(self.norm2(x)))
