"""CrossMAE decoder: the tokens to reconstruct cross-attend to the visible encoder tokens.

Legend: ``b`` batch, ``n`` tokens in the full sequence, ``m`` context (visible) tokens,
``p`` predicted tokens (queries), ``k`` encoder feature maps, ``c`` decoder width,
``e`` encoder width, ``o`` output width per token.
Mask polarity: ``context_padding_mask`` / ``query_padding_mask`` True = padding slot.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._checks import (
    check_bool,
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_optional_bool,
    check_padding_mask,
)
from ..layers import _calls, backend
from ..layers.attention import CrossAttention, _heads, warn_trailing
from ..layers.blocks import CrossAttentionBlock
from ..layers.drop import drop_path_schedule
from ..layers.feature_maps import StackedLayerNorm, WeightedFeatureMaps
from ..masking.tokens import gather_tokens

__all__ = ["CrossMAEDecoder", "DecoderState", "build_pos_table"]


def build_pos_table(
    pos_embed: Union[str, Tensor, None], num_tokens: Optional[int], dim: int
) -> tuple[Optional[Tensor], Optional[nn.Parameter]]:
    """Resolve a decoder position-embedding option into ``(fixed_table, learned_table)``.

    ``"learned"`` → a trainable ``[n, c]`` table; a tensor ``[n, c]`` → a fixed buffer;
    ``None`` → no table (positions must be passed to ``forward``).
    """
    if pos_embed is None:
        return None, None
    if isinstance(pos_embed, str):
        if pos_embed != "learned":
            raise ValueError(
                f"pos_embed must be 'learned', a [n, c] tensor or None, got {pos_embed!r}"
            )
        n = check_int("num_tokens", num_tokens, minimum=1)
        param = nn.Parameter(torch.zeros(n, dim))
        nn.init.trunc_normal_(param, std=0.02)
        return None, param
    table = check_float_tensor("pos_embed", pos_embed, ndim=2)
    if table.shape[-1] != dim:
        raise ValueError(f"pos_embed has width {table.shape[-1]} but dim={dim}")
    return table.detach().clone(), None


def _plain_kv(blk: nn.Module) -> Optional[nn.Linear]:
    """The ``kv`` projection of ``blk`` when the block, its cross-attention and the
    projection are exactly crossmae's `CrossAttentionBlock`, `CrossAttention` and
    ``nn.Linear`` with plain parameters, none hooked or compiled; else None."""
    if type(blk) is not CrossAttentionBlock or _calls.hooked(blk) or _calls.compiled(blk):
        return None
    ca = blk._modules["cross_attn"]
    if type(ca) is not CrossAttention or _calls.hooked(ca) or _calls.compiled(ca):
        return None
    lin = ca._modules["kv"]
    if type(lin) is not nn.Linear or _calls.hooked(lin) or _calls.compiled(lin):
        return None
    for t in (lin.weight, lin.bias):
        if t is not None and type(t) is not nn.Parameter and type(t) is not Tensor:
            return None  # tensor subclasses (sharded, quantized) keep their own kernels
    return lin


def layer_keys_values(
    blocks: nn.ModuleList, context: Tensor, context_padding_mask: Optional[Tensor]
) -> Optional[list[tuple[Tensor, Tensor]]]:
    """Every block's cross-attention keys and values ``(k, v)``, each ``[b, h, m, d]``,
    from one GEMM, or None where the blocks must run their own projections.

    ``context`` is the decoder's prepared context: ``[b, m, e]`` shared by every layer
    (the projections' weights are concatenated: one ``[b m, e] x [e, depth 2c]`` GEMM) or
    ``[depth, b, m, e]``, one per layer (WFM: one batched GEMM). Padded context slots
    (``context_padding_mask`` True) are zeroed first, as each block's `CrossAttention`
    does. In an eager step every linear costs host time in the forward and the backward
    (casts, views, the gradient sum of a shared context), and the host is the bound.

    None when there are fewer than two blocks, when a block is not plain (`_plain_kv`), or
    when the projections differ in shape, bias, dtype or device (or a global module hook
    is registered)."""
    if len(blocks) < 2 or _calls.global_hooks():
        return None
    lins = []
    for blk in blocks:
        lin = _plain_kv(blk)
        if lin is None:
            return None
        lins.append(lin)
    w0, b0 = lins[0].weight, lins[0].bias
    for lin in lins[1:]:
        w = lin.weight
        if w.shape != w0.shape or w.dtype != w0.dtype or w.device != w0.device:
            return None
        if (lin.bias is None) != (b0 is None):
            return None
    depth, (two_c, e) = len(lins), w0.shape
    if context.shape[-1] != e or (context.ndim == 4 and context.shape[0] != depth):
        return None
    if context_padding_mask is not None:
        context = context.masked_fill(context_padding_mask[..., None], 0.0)
    b, m = context.shape[-3], context.shape[-2]
    biases = None if b0 is None else [cast(Tensor, lin.bias) for lin in lins]
    attns = [cast(CrossAttentionBlock, blk).cross_attn for blk in blocks]
    if context.ndim == 3:  # one context: [b m, e] x [e, depth 2c]
        weight = torch.cat([lin.weight for lin in lins])
        bias = None if biases is None else torch.cat(biases)
        kv = F.linear(context.reshape(b * m, e), weight, bias)
        heads = {(ca.num_heads, ca.head_dim) for ca in attns}
        if len(heads) == 1:
            # every layer's k and v split off in one go where they sit in memory, so the
            # backward stacks their gradients straight into the GEMM's layout (`_heads`)
            ((h, d),) = heads
            parts = _heads(kv.view(b, m, 2 * depth, h, d))
            return [(parts[2 * i], parts[2 * i + 1]) for i in range(depth)]
        layers = kv.view(b, m, depth, two_c).unbind(2)
    else:  # one context per layer: batched GEMM
        rows = context.reshape(depth, b * m, e)
        weight_t = torch.stack([lin.weight for lin in lins]).transpose(1, 2)
        if biases is None:
            kv = torch.bmm(rows, weight_t)
        else:
            kv = torch.baddbmm(torch.stack(biases)[:, None], rows, weight_t)
        layers = kv.view(depth, b, m, two_c).unbind(0)
    return [ca._split_kv(layer_kv) for ca, layer_kv in zip(attns, layers)]


class _QueryEmbeddings(nn.Module):
    """Mask token, position table and modality vector shared by both decoders (the attribute
    names ``mask_token``, ``pos_embed``, ``pos_table``, ``modality_embed`` are part of the
    state-dict layout)."""

    pos_table: Optional[Tensor]
    pos_embed: Optional[nn.Parameter]
    modality_embed: Optional[nn.Parameter]
    mask_token: nn.Parameter
    query_pos: Optional[nn.Module]

    def _init_queries(
        self,
        dim: int,
        pos_embed: Union[str, Tensor, None],
        num_tokens: Optional[int],
        modality_embed: bool,
        query_pos: Optional[nn.Module] = None,
    ) -> None:
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        if query_pos is not None:
            if not isinstance(query_pos, nn.Module):
                raise TypeError(
                    f"query_pos must be an nn.Module mapping ids [b, p] to [b, p, {dim}], "
                    f"got {type(query_pos).__name__}"
                )
            if pos_embed is not None:
                given = repr(pos_embed) if isinstance(pos_embed, str) else "a tensor"
                raise ValueError(
                    f"query_pos replaces the position table: pass pos_embed=None with it "
                    f"(got pos_embed={given})"
                )
            qdim = getattr(query_pos, "dim", dim)
            if qdim != dim:
                raise ValueError(f"query_pos.dim is {qdim} but the decoder's dim is {dim}")
        self.query_pos = query_pos
        fixed, learned = build_pos_table(pos_embed, num_tokens, dim)
        self.pos_embed = learned
        self.register_buffer("pos_table", fixed, persistent=False)
        self.modality_embed = nn.Parameter(torch.zeros(dim)) if modality_embed else None

    @staticmethod
    def _query_positions(query_pos: nn.Module, ids: Tensor, dim: int) -> Tensor:
        """``query_pos(ids)``, checked to be float ``[b, p, dim]`` (metadata only)."""
        out = query_pos(ids)
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise TypeError(
                f"query_pos must return a float tensor [b, p, c], got {type(out).__name__}"
                + (f" of dtype {out.dtype}" if isinstance(out, Tensor) else "")
            )
        if tuple(out.shape) != (*ids.shape, dim):
            raise ValueError(
                f"query_pos returned shape {tuple(out.shape)} for ids of shape "
                f"{tuple(ids.shape)}; it must return [b, p, {dim}]"
            )
        return out

    def _position_table(self, pos: Optional[Tensor]) -> Tensor:
        """``pos`` if given, else the learned or fixed table; ValueError when there is none."""
        if pos is not None and self.query_pos is not None:
            raise ValueError("pos was given but this decoder takes its positions from query_pos")
        if pos is not None:
            table = check_float_tensor("pos", pos)
            if table.ndim not in (2, 3):
                raise ValueError(
                    f"pos must have shape [n, c] or [b, n, c], got {tuple(table.shape)}"
                )
            return table
        own = self.pos_embed if self.pos_embed is not None else self.pos_table
        if own is None:
            raise ValueError("pos is required: this decoder was built with pos_embed=None")
        return own

    @property
    def num_positions(self) -> Optional[int]:
        """Token positions the decoder has queries for: its table's rows, or what its
        ``query_pos`` module covers (``num_tokens(max_time_steps)`` when it says); None when
        unknown (positions come with each call, or from a module of any size)."""
        if self.query_pos is not None:
            count = getattr(self.query_pos, "num_tokens", None)
            steps = getattr(self.query_pos, "max_time_steps", None)
            return int(count(steps)) if callable(count) and isinstance(steps, int) else None
        own = self.pos_embed if self.pos_embed is not None else self.pos_table
        return None if own is None else int(own.shape[-2])

    @property
    def out_dim(self) -> int:
        """Values predicted per token ``o``."""
        head: Any = self.head
        return int(head.out_features)


def _param_dtype_check(name: str, x: Tensor, dtype: torch.dtype, owner: str) -> None:
    """``x`` must have the decoder's dtype unless autocast is on (metadata only)."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(
        f"{name} has dtype {x.dtype} but the {owner}'s parameters are {dtype}: cast it with "
        f".to({dtype}), convert the module, or run under torch.autocast"
    )


class DecoderState(NamedTuple):
    """What `CrossMAEDecoder.prepare` hands to the blocks.

    Attributes:
        queries: ``[b, p, c]`` queries (the blocks' input).
        context: ``[b, m, e]`` or per-layer ``[depth, b, m, e]`` contexts in the compute
            dtype, padded tokens finite (zeroed before the WFM mix and the norms); reordered
            when ``plan.trailing``.
        context_padding_mask: bool ``[b, m]`` (True = padding) matching ``context``'s order,
            or None.
        query_padding_mask: bool ``[b, p]`` or None.
        plan: the cross-attention `AttentionPlan` of every block.
        query_plan: the self-attention plan (None without self-attention).
    """

    queries: Tensor
    context: Tensor
    context_padding_mask: Optional[Tensor]
    query_padding_mask: Optional[Tensor]
    plan: backend.AttentionPlan
    query_plan: Optional[backend.AttentionPlan]


class CrossMAEDecoder(_QueryEmbeddings):
    """Stack of `CrossAttentionBlock` s decoding only the tokens to reconstruct.

    Queries are ``mask_token + pos[ids_predict] (+ modality embedding)``; keys/values are the
    encoder's visible tokens. With ``num_feature_maps`` set, the context of decoder layer
    ``j`` is ``dec_norms[j](WFM(features)[j])`` (CrossMAE's inter-block attention, one
    `WeightedFeatureMaps` matmul and one batched norm for all layers); otherwise every layer
    attends to the same context (normalize it in the encoder).

    Args:
        context_dim: encoder width ``e``.
        dim: decoder width ``c``.
        depth: number of decoder blocks.
        num_heads: attention heads.
        out_dim: prediction width ``o`` per token (e.g. ``patch**2 * channels``).
        mlp_ratio: MLP hidden width multiple.
        self_attn: self-attention among queries in every block (honours
            ``query_padding_mask``).
        qkv_bias: bias on q/kv projections.
        drop_path: stochastic depth, linear from 0 to this value.
        norm_layer: norm constructor (called with ``dim``).
        num_feature_maps: number ``k`` of encoder feature maps to mix (enables WFM), or None.
        num_tokens: length ``n`` of the full sequence (needed for ``pos_embed="learned"``).
        pos_embed: ``"learned"``, a fixed ``[n, c]`` table (e.g. `sincos_pos_embed_2d`), or
            None (then pass ``pos`` to ``forward``, or give ``query_pos``).
        modality_embed: add a learned ``[c]`` vector to every query.
        fused_attn: see `CrossAttention`.
        drop: dropout after every attention projection and inside every MLP (training
            only).
        attn_drop: dropout on the attention weights (training only).
        query_pos: a query-position module (see `crossmae.decoders.query_pos`): an
            ``nn.Module`` mapping int64 ids ``[b, p]`` to ``[b, p, c]``, e.g.
            `SpatioTemporalQueryPos`; then queries are ``mask_token + query_pos(ids_predict)
            (+ modality embedding)``. Needs ``pos_embed=None``; None (default): the table.

    Shapes:
        ``forward(context, ids_predict [b, p], *, context_padding_mask [b, m] | None,
        query_padding_mask [b, p] | None, pos [n, c] | [b, n, c] | None) -> [b, p, o]``
        where ``context`` is ``[b, m, e]`` (no WFM) or ``[k, b, m, e]`` (WFM).
        Outputs at padded query slots are finite and meaningless. A sample with no real
        context token still gets finite predictions (from the queries alone). ``context``
        must have the decoder's dtype (any float dtype under autocast); ``pos`` may be any
        float dtype (it is cast). The attention kernel and key layout are decided once per
        forward (`crossmae.layers.backend`); ``context_padding_is_trailing`` is deprecated
        and ignored.
    """

    def __init__(
        self,
        context_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        mlp_ratio: float = 4.0,
        *,
        self_attn: bool = False,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        num_feature_maps: Optional[int] = None,
        num_tokens: Optional[int] = None,
        pos_embed: Union[str, Tensor, None] = "learned",
        modality_embed: bool = False,
        fused_attn: Optional[bool] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        query_pos: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        check_bool("self_attn", self_attn)
        check_bool("qkv_bias", qkv_bias)
        check_bool("modality_embed", modality_embed)
        check_optional_bool("fused_attn", fused_attn)
        self.context_dim = check_int("context_dim", context_dim, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.depth = check_int("depth", depth, minimum=1)
        check_int("out_dim", out_dim, minimum=1)
        if num_feature_maps is not None:
            check_int("num_feature_maps", num_feature_maps, minimum=1)
        self._init_queries(dim, pos_embed, num_tokens, modality_embed, query_pos)
        self.num_feature_maps = num_feature_maps
        self.wfm: Optional[WeightedFeatureMaps] = None
        self.dec_norms: Optional[StackedLayerNorm] = None
        if num_feature_maps is not None:
            self.wfm = WeightedFeatureMaps(num_feature_maps, depth)
            self.dec_norms = StackedLayerNorm(depth, context_dim)
        rates = drop_path_schedule(drop_path, depth)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(
                dim,
                context_dim,
                num_heads,
                mlp_ratio,
                self_attn=self_attn,
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

    def queries(self, ids_predict: Tensor, pos: Optional[Tensor] = None) -> Tensor:
        """Build the queries ``[b, p, c]`` for the tokens at ``ids_predict``.

        Args:
            ids_predict: int64 ``[b, p]`` token ids (padded slots hold a valid id, e.g. 0).
            pos: optional ``[n, c]`` or ``[b, n, c]`` position table (only without
                ``query_pos`` and when the decoder has no table of its own).

        Returns:
            ``mask_token + positions(ids_predict) (+ modality_embed)``, ``[b, p, c]``.
        """
        ids = check_index_tensor("ids_predict", ids_predict)
        if self.query_pos is not None:
            if pos is not None:
                raise ValueError("pos was given but this decoder takes positions from query_pos")
            qp = self._query_positions(self.query_pos, ids, self.dim)
            q = qp.to(self.mask_token.dtype) + self.mask_token
            return q if self.modality_embed is None else q + self.modality_embed
        table = self._position_table(pos)
        if table.shape[-1] != self.dim or (table.ndim == 3 and table.shape[0] != ids.shape[0]):
            raise ValueError(
                f"pos must be [n, {self.dim}] or [{ids.shape[0]}, n, {self.dim}] (dim={self.dim}, "
                f"batch {ids.shape[0]}), got {tuple(table.shape)}"
            )
        if table.ndim == 2:
            q = torch.nn.functional.embedding(ids, table)  # [b, p, c]; cheap backward
        else:
            q = gather_tokens(table, ids)
        q = q.to(self.mask_token.dtype) + self.mask_token
        if self.modality_embed is not None:
            q = q + self.modality_embed
        return q

    def _check_context(self, context: object) -> Tensor:
        """``context`` is ``[b, m, e]`` (no WFM) or ``[k, b, m, e]`` (WFM), in the decoder's
        dtype (any float dtype under autocast)."""
        if self.wfm is None:
            ctx = check_float_tensor("context", context)
            if ctx.ndim != 3 or ctx.shape[-1] != self.context_dim:
                raise ValueError(
                    f"context must have shape [b, m, {self.context_dim}] (context_dim="
                    f"{self.context_dim}), got {tuple(ctx.shape)}"
                )
        else:
            ctx = check_float_tensor("context", context)
            k = self.num_feature_maps
            if ctx.ndim != 4 or ctx.shape[0] != k or ctx.shape[-1] != self.context_dim:
                raise ValueError(
                    f"context must have shape [{k}, b, m, {self.context_dim}] "
                    f"(num_feature_maps={k} stacked encoder feature maps of width "
                    f"context_dim={self.context_dim}), got {tuple(ctx.shape)}"
                )
        _param_dtype_check("context", ctx, self.mask_token.dtype, "decoder")
        return ctx

    def contexts(self, context: Tensor) -> Tensor:
        """Per-layer contexts ``[depth, b, m, e]`` (WFM) or the context ``[b, m, e]`` as is."""
        ctx = self._check_context(context)
        if self.wfm is None or self.dec_norms is None:
            return ctx
        return self.dec_norms(self.wfm(ctx))

    def forward(
        self,
        context: Tensor,
        ids_predict: Tensor,
        *,
        context_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        context_padding_is_trailing: Optional[bool] = None,
    ) -> Tensor:
        """Predict the tokens at ``ids_predict`` from the visible encoder tokens.

        Args:
            context: float ``[b, m, e]`` encoder tokens (no WFM) or ``[k, b, m, e]`` stacked
                feature maps (WFM), in the decoder's dtype (any float dtype under autocast).
            ids_predict: int64 ``[b, p]`` ids of the tokens to reconstruct (padded slots hold
                a valid id, e.g. 0).
            context_padding_mask: optional bool ``[b, m]``, **True = padding** (never a
                key; NaN stored there never reaches an output). A sample with no real key
                still gets finite predictions (from its queries alone).
            query_padding_mask: optional bool ``[b, p]``, **True = padding** query slot
                (its output is finite and meaningless; it is never a key of the optional
                self-attention among queries).
            pos: optional position table ``[n, c]`` or ``[b, n, c]`` (any float dtype), only
                for a decoder built with ``pos_embed=None`` and no ``query_pos``.
            context_padding_is_trailing: deprecated and ignored (FutureWarning): the
                attention backend decides the key layout once per forward.

        Returns:
            ``[b, p, o]`` predictions.
        """
        if context_padding_is_trailing is not None:
            warn_trailing("context_padding_is_trailing", context_padding_is_trailing)
        st = self.prepare(
            context,
            ids_predict,
            context_padding_mask=context_padding_mask,
            query_padding_mask=query_padding_mask,
            pos=pos,
        )
        return self.decode(st)

    def decode(self, state: DecoderState) -> Tensor:
        """The blocks, final norm and head over the state from `prepare` → ``[b, p, o]``.

        When every block is crossmae's own `CrossAttentionBlock` (no subclass, hook or
        compiled module on the way), every layer's key/value projection runs as one GEMM
        (`layer_keys_values`); the results equal calling the blocks one by one up to
        rounding."""
        x = state.queries
        kvs = layer_keys_values(self.blocks, state.context, state.context_padding_mask)
        if kvs is not None:
            for blk, (k, v) in zip(self.blocks, kvs):
                x = cast(CrossAttentionBlock, blk)._forward_kv(
                    x,
                    k,
                    v,
                    state.context_padding_mask,
                    state.query_padding_mask,
                    state.plan,
                    state.query_plan,
                )
            return self.predict(x)
        for j, blk in enumerate(self.blocks):
            layer_ctx = state.context[j] if state.context.ndim == 4 else state.context
            x = blk(
                x,
                layer_ctx,
                state.context_padding_mask,
                state.query_padding_mask,
                plan=state.plan,
                query_plan=state.query_plan,
            )
        return self.predict(x)

    def predict(self, x: Tensor) -> Tensor:
        """The last step of `forward`: final norm and head of the decoded queries
        ``[b, p, c]`` → predictions ``[b, p, o]``."""
        return cast(Tensor, self.head(self.norm(x)))

    def prepare(
        self,
        context: Tensor,
        ids_predict: Tensor,
        *,
        context_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
    ) -> DecoderState:
        """Everything `forward` does before its blocks (arguments as in `forward`, checked
        here): the queries, the per-layer contexts (padding finite, moved to the end of
        every row when the plan asks) and the attention plans, as a `DecoderState`. Used
        by callers that run the blocks of several decoders together."""
        return self._prepare(
            context,
            ids_predict,
            context_padding_mask=context_padding_mask,
            query_padding_mask=query_padding_mask,
            pos=pos,
        )

    def _prepare(
        self,
        context: Tensor,
        ids_predict: Tensor,
        *,
        context_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        reuse: Optional[DecoderState] = None,
    ) -> DecoderState:
        """`prepare`; with ``reuse``, another decoder's state prepared from the **same**
        ``context`` and ``context_padding_mask``: where neither decoder mixes feature maps
        and both plan the same attention, its prepared context is this decoder's too (the
        same tensor, computed once for both)."""
        raw = self._check_context(context)
        ids = check_index_tensor("ids_predict", ids_predict)
        b, m = raw.shape[-3], raw.shape[-2]
        if ids.shape[0] != b:
            raise ValueError(
                f"ids_predict has batch {ids.shape[0]} (shape {tuple(ids.shape)}) but context "
                f"has batch {b} (shape {tuple(raw.shape)})"
            )
        cpad = check_padding_mask("context_padding_mask", context_padding_mask, (b, m), "context")
        qpad = check_padding_mask(
            "query_padding_mask", query_padding_mask, ids.shape, "ids_predict [b, p]"
        )
        x = self.queries(ids, pos)
        first = cast(CrossAttentionBlock, self.blocks[0])
        plan = backend.plan_for(
            x,
            first.cross_attn.head_dim,
            padding_mask=cpad,
            dropout_p=first.cross_attn.attn_drop if self.training else 0.0,
            fused=first.cross_attn.fused_attn,
            keys=m,
        )
        query_plan = None
        if first.has_self_attn:
            query_plan = backend.plan_for(
                x,
                first.self_attn.head_dim,
                padding_mask=qpad,
                dropout_p=first.self_attn.attn_drop if self.training else 0.0,
                fused=first.self_attn.fused_attn,
            )
        if (
            reuse is not None
            and self.wfm is None
            and reuse.context.ndim == 3
            and reuse.context.shape[-1] == raw.shape[-1]
            and (reuse.context_padding_mask is None) == (cpad is None)
            and reuse.plan == (plan.reordered() if cpad is not None and plan.reorder else plan)
        ):
            return DecoderState(
                x, reuse.context, reuse.context_padding_mask, qpad, reuse.plan, query_plan
            )
        if cpad is not None:
            # Zeroed once, before the WFM mix and the per-layer norms: padded slots then stay
            # finite in every layer's context, and a NaN stored there gets a zero gradient
            # (zeroing after the norms would leave their backward 0 · NaN).
            raw = raw.masked_fill(cpad[..., None], 0.0)
        ctx = self.contexts(raw)
        # Under autocast every layer's kv projection would cast the (float32) context again:
        # cast it once here instead.
        if torch.is_autocast_enabled(ctx.device.type):
            ctx = ctx.to(torch.get_autocast_dtype(ctx.device.type))
        if cpad is not None and plan.reorder:
            # Key order is irrelevant to attention: move padding to the end of every row
            # once, so the packed CUDA path needs no per-layer reordering copy.
            perm = backend.real_first_permutation(cpad)
            ctx = backend.reorder_tokens(ctx, perm, ctx.ndim - 2)
            cpad = torch.gather(cpad, 1, perm)
            plan = plan.reordered()
        return DecoderState(x, ctx, cpad, qpad, plan, query_plan)
