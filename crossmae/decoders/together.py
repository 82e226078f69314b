"""Several CrossMAE decoders over one context, decoded in lockstep.

Legend: ``b`` batch, ``m`` context tokens, ``p_i`` tokens decoder ``i`` predicts, ``c``
decoder width, ``h`` heads, ``d`` head dim. Mask polarity: True = padding slot.

A multimodal model has one decoder per modality, and all of them cross-attend to the same
fused keys. Run one after the other, every layer of every decoder pays its own attention
call. `decode_together` runs them layer by layer instead: at layer ``j`` every decoder
projects its queries and its keys/values, then **one** packed variable-length kernel call
serves all of them (segments per decoder and sample), then every decoder finishes its
block. The results equal running each decoder alone on every real query row (same
parameters, same arithmetic per segment); only the number of kernel launches changes (and, while training with dropout or
drop path, the order in which random masks are drawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, cast

import torch
from torch import Tensor

from ..layers import _varlen
from ..layers.attention import CrossAttention
from ..layers.backend import AttentionPlan
from ..layers.blocks import CrossAttentionBlock
from .cross import CrossMAEDecoder, DecoderState

__all__ = ["decode_together"]


#: Attribute `compile_blocks` sets on a `CrossAttentionBlock`: its compiled lockstep steps
#: (``(before, after)``, compiled versions of `before_step` / `after_step`).
STEPS_ATTR = "_crossmae_lockstep_steps"


def before_step(
    blk: CrossAttentionBlock,
    x: Tensor,
    query_padding_mask: Optional[Tensor],
    query_plan: Optional[AttentionPlan],
    context: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """A block's lockstep step before the shared kernel call: ``(x, q, kv)``, the queries
    after `CrossAttentionBlock.before_cross`, their projection ``q [b, p, c]`` and the
    context's ``kv [b, m, 2c]``."""
    x = blk.before_cross(x, query_padding_mask, query_plan)
    ca = blk.cross_attn
    return x, ca.q(blk.norm1(x)), ca.kv(context)


def after_step(blk: CrossAttentionBlock, x: Tensor, attended: Tensor) -> Tensor:
    """A block's lockstep step after the shared kernel call: output projection of the
    attended values ``[b, p, c]``, residual and MLP."""
    return blk.after_cross(x, blk.cross_attn.output(attended))


def _hooked(mod: torch.nn.Module) -> bool:
    """Forward hooks, or a ``Module.compile`` without compiled lockstep steps: what a
    lockstep run, calling the steps of ``forward`` itself, would bypass."""
    compiled = getattr(mod, "_compiled_call_impl", None) is not None
    if compiled and getattr(mod, STEPS_ATTR, None) is not None:
        compiled = False  # `compile_blocks` compiled its lockstep steps too
    return compiled or bool(mod._forward_hooks or mod._forward_pre_hooks)


def _stock(dec: CrossMAEDecoder) -> bool:
    """Whether ``dec`` runs exactly crossmae's decoder and blocks (no overridden forward, no
    hooks anywhere a lockstep run would bypass them)."""
    if type(dec).forward is not CrossMAEDecoder.forward or _hooked(dec):
        return False
    for blk in dec.blocks:
        if type(blk).forward is not CrossAttentionBlock.forward or _hooked(blk):
            return False
        ca = cast(CrossAttentionBlock, blk).cross_attn
        if type(ca).forward is not CrossAttention.forward or _hooked(ca):
            return False
    return True


def _shares_kernel(decoders: Sequence[CrossMAEDecoder], states: Sequence[DecoderState]) -> bool:
    """Whether the decoders can share one packed call per layer: same depth and heads, every
    plan the packed kernel over trailing padding (one context means one compute dtype:
    each decoder checks the context's dtype against its own)."""
    first = cast(CrossAttentionBlock, decoders[0].blocks[0]).cross_attn
    for dec, st in zip(decoders, states):
        ca = cast(CrossAttentionBlock, dec.blocks[0]).cross_attn
        if len(dec.blocks) != len(decoders[0].blocks):
            return False
        if (ca.num_heads, ca.head_dim) != (first.num_heads, first.head_dim):
            return False
        if st.plan.kernel != "varlen" or not st.plan.trailing:
            return False
        if dec.training and ca.attn_drop > 0.0:  # the packed kernel takes no dropout
            return False
        if st.context_padding_mask is None:
            return False
    return True


def decode_together(
    decoders: Sequence[CrossMAEDecoder],
    context: Tensor,
    ids_predict: Sequence[Tensor],
    *,
    context_padding_mask: Optional[Tensor] = None,
    query_padding_masks: Optional[Sequence[Optional[Tensor]]] = None,
) -> list[Tensor]:
    """Run several `CrossMAEDecoder` s over one context; equal to calling each one.

    ``decode_together(decs, ctx, ids, context_padding_mask=cpad, query_padding_masks=qpads)``
    returns ``[decs[i](ctx, ids[i], context_padding_mask=cpad,
    query_padding_mask=qpads[i]) for i ...]`` on every real query row. Padded query rows
    are finite and meaningless on both routes, and may differ: in lockstep, a decoder
    whose queries are all padding in a sample attends there to one key only, which skips
    that sample's work. Where the attention backend plans the packed
    variable-length kernel for every decoder (CUDA, half precision, padded context, no
    attention dropout) and the decoders have the same depth and heads, each layer makes
    one kernel call for all decoders instead of one per decoder. Otherwise, or when a
    decoder, block or attention module has forward hooks, an overridden ``forward`` or was
    compiled in place with ``Module.compile``, all of which a lockstep run would bypass,
    the decoders simply run one after the other. Blocks compiled by `compile_blocks` keep
    lockstep: it compiles their lockstep steps too (shared by every block of one shape).

    While training with ``drop``/``drop_path`` (attention dropout rules the packed kernel
    out), a lockstep run draws the same random masks in another order (layer by layer
    instead of decoder by decoder): the same distribution, not the same numbers as the
    one-by-one run for a given seed.

    Args:
        decoders: a non-empty sequence of `CrossMAEDecoder` (each with its own parameters,
            WFM and position table).
        context: the shared context, ``[b, m, e]`` or stacked feature maps ``[k, b, m, e]``
            (each decoder checks it as in its ``forward``).
        ids_predict: one int64 ``[b, p_i]`` tensor per decoder.
        context_padding_mask: bool ``[b, m]``, True = padding, or None.
        query_padding_masks: one bool ``[b, p_i]`` mask (or None) per decoder, or None.

    Returns:
        One ``[b, p_i, o_i]`` prediction tensor per decoder, in order.

    Raises:
        TypeError: ``decoders`` holds something that is not a `CrossMAEDecoder`;
            ``ids_predict`` / ``query_padding_masks`` are not sequences.
        ValueError: the sequences differ in length from ``decoders``, or it is empty; every
            decoder's own argument errors, as in its ``forward``.
    """
    if isinstance(decoders, (torch.nn.Module, str)) or not isinstance(decoders, Sequence):
        raise TypeError(
            f"decoders must be a sequence of CrossMAEDecoder, got {type(decoders).__name__}"
        )
    if not decoders:
        raise ValueError("decoders must hold at least one CrossMAEDecoder, got an empty sequence")
    for i, dec in enumerate(decoders):
        if not isinstance(dec, CrossMAEDecoder):
            raise TypeError(f"decoders[{i}] must be a CrossMAEDecoder, got {type(dec).__name__}")
    if isinstance(ids_predict, Tensor) or not isinstance(ids_predict, Sequence):
        raise TypeError(
            f"ids_predict must be a sequence of one [b, p] tensor per decoder, got "
            f"{type(ids_predict).__name__}"
        )
    qpads: Sequence[Optional[Tensor]]
    if query_padding_masks is None:
        qpads = [None] * len(decoders)
    elif isinstance(query_padding_masks, Tensor) or not isinstance(query_padding_masks, Sequence):
        raise TypeError(
            f"query_padding_masks must be None or a sequence of one mask (or None) per "
            f"decoder, got {type(query_padding_masks).__name__}"
        )
    else:
        qpads = query_padding_masks
    for name, seq in (("ids_predict", ids_predict), ("query_padding_masks", qpads)):
        if len(seq) != len(decoders):
            raise ValueError(
                f"{name} has {len(seq)} entries but there are {len(decoders)} decoders"
            )
    if not all(_stock(d) for d in decoders):
        return [
            dec(context, ids, context_padding_mask=context_padding_mask, query_padding_mask=qp)
            for dec, ids, qp in zip(decoders, ids_predict, qpads)
        ]
    states = []
    for i, (dec, ids, qp) in enumerate(zip(decoders, ids_predict, qpads)):
        try:
            st = dec.prepare(
                context, ids, context_padding_mask=context_padding_mask, query_padding_mask=qp
            )
        except (TypeError, ValueError) as e:
            raise type(e)(f"decoders[{i}]: {e}") from e
        states.append(st)
    if len(decoders) == 1 or not _shares_kernel(decoders, states):
        return [dec.decode(st) for dec, st in zip(decoders, states)]
    return _lockstep(decoders, states)


def _lockstep(decoders: Sequence[CrossMAEDecoder], states: Sequence[DecoderState]) -> list[Tensor]:
    """Every layer: each decoder's steps before the cross-attention and its projections,
    one packed kernel call for all, then each decoder's projection, residual and MLP."""
    cpad = states[0].context_padding_mask
    assert cpad is not None  # _shares_kernel
    # Every decoder reordered the same mask with the same stable permutation: one mask.
    key_lengths = (~cpad).sum(dim=1)
    empty = (key_lengths == 0)[:, None, None]  # [b 1 1]: samples with no real key
    # one layout for every layer: the boundaries are computed once
    counts = [st.queries.shape[1] for st in states]
    # a decoder with no real query in a sample (a modality it lacks) skips that sample's keys
    qpads = [st.query_padding_mask for st in states]
    segments = _varlen.together_segments(counts, cpad.shape[1], key_lengths, query_padding=qpads)
    xs = [st.queries for st in states]
    for j in range(len(decoders[0].blocks)):
        blocks = [cast(CrossAttentionBlock, dec.blocks[j]) for dec in decoders]
        qs, ks, vs = [], [], []
        for i, (blk, st) in enumerate(zip(blocks, states)):
            ca = blk.cross_attn
            before = getattr(blk, STEPS_ATTR, (before_step, after_step))[0]
            ctx = st.context[j] if st.context.ndim == 4 else st.context
            xs[i], q, kv = before(blk, xs[i], st.query_padding_mask, st.query_plan, ctx)
            qs.append(q.unflatten(-1, (ca.num_heads, ca.head_dim)))  # [b p h d]
            kv = kv.unflatten(-1, (2, ca.num_heads, ca.head_dim))  # [b m 2 h d]
            ks.append(kv[:, :, 0])
            vs.append(kv[:, :, 1])
        outs = _varlen.varlen_together(qs, ks, vs, key_lengths, segments=segments)
        for i, (blk, out) in enumerate(zip(blocks, outs)):
            after = getattr(blk, STEPS_ATTR, (before_step, after_step))[1]
            attended = out.flatten(-2).masked_fill(empty, 0.0)  # [b p (h d)]
            xs[i] = after(blk, xs[i], attended)
    return [dec.predict(x) for dec, x in zip(decoders, xs)]
