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
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers import _calls, _stacked, _varlen, backend
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
    compiled = _calls.compiled(mod)
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
        if (st.plan.segmented, st.plan.eager) != (states[0].plan.segmented, states[0].plan.eager):
            return False  # one call runs one kernel
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

    In lockstep, decoders of one shape (the same stock blocks layer by layer: widths,
    heads, norms, GELU, biases; no self-attention; dropout and drop path inert; the same
    number of queries) also run **stacked** in eager mode: their parameters are stacked by
    one multi-tensor copy per forward, and every step of a block is one batched op for all
    of them (layer norms, batched GEMMs, residuals) instead of one op per decoder. Without
    feature-map mixing they share one prepared context and its kv projections are one
    GEMM. The arithmetic per decoder is the same up to rounding; gradients reach every
    decoder's own parameters. A hook on any module of a decoder's blocks, a hook
    registered for every module, or compilation (which fuses those ops already) keeps the
    per-decoder steps.

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
    states: list[DecoderState] = []
    for i, (dec, ids, qp) in enumerate(zip(decoders, ids_predict, qpads)):
        try:
            # the first decoder's prepared context serves every decoder that would
            # compute the same one (no feature-map mix, the same plan): computed once
            st = dec._prepare(
                context,
                ids,
                context_padding_mask=context_padding_mask,
                query_padding_mask=qp,
                reuse=states[0] if states else None,
            )
        except (TypeError, ValueError) as e:
            raise type(e)(f"decoders[{i}]: {e}") from e
        states.append(st)
    if len(decoders) == 1 or not _shares_kernel(decoders, states):
        return [dec.decode(st) for dec, st in zip(decoders, states)]
    return _lockstep(decoders, states)


def _lockstep(decoders: Sequence[CrossMAEDecoder], states: Sequence[DecoderState]) -> list[Tensor]:
    """Every layer: each decoder's steps before the cross-attention and its projections,
    one packed kernel call for all, then each decoder's projection, residual and MLP.
    Decoders of one shape (`_stack_parts`) run those steps stacked, as one batched op each."""
    cpad = states[0].context_padding_mask
    assert cpad is not None  # _shares_kernel
    # Every decoder reordered the same mask with the same stable permutation: one mask.
    key_lengths = (~cpad).sum(dim=1)
    empty = (key_lengths == 0)[:, None, None]  # [b 1 1]: samples with no real key
    runs = [_StackedRun(decoders, states, *grp) for grp in _stack_groups(decoders, states)]
    stacked = {i for run in runs for i in run.index}
    singles = [i for i in range(len(decoders)) if i not in stacked]
    # one layout for every layer, the boundaries computed once; a run's decoders are
    # consecutive calls, so its outputs are one view of the packed result
    order = [i for run in runs for i in run.index] + singles
    counts = [states[i].queries.shape[1] for i in order]
    # a decoder with no real query in a sample (a modality it lacks) skips that sample's keys
    qpads = [states[i].query_padding_mask for i in order]
    segments = _varlen.together_segments(counts, cpad.shape[1], key_lengths, query_padding=qpads)
    xs = {i: states[i].queries for i in singles}
    for j in range(len(decoders[0].blocks)):
        qs, ks, vs = [], [], []
        for run in runs:
            run_q, run_k, run_v = run.before(j)
            qs += run_q
            ks += run_k
            vs += run_v
        for i in singles:
            blk, st = cast(CrossAttentionBlock, decoders[i].blocks[j]), states[i]
            ca = blk.cross_attn
            before = getattr(blk, STEPS_ATTR, (before_step, after_step))[0]
            ctx = st.context[j] if st.context.ndim == 4 else st.context
            xs[i], q, kv = before(blk, xs[i], st.query_padding_mask, st.query_plan, ctx)
            qs.append(q.unflatten(-1, (ca.num_heads, ca.head_dim)))  # [b p h d]
            # [b m 2 h d] → k, v by unbind (one stack backward, no zero-filled gradients)
            k, v = kv.unflatten(-1, (2, ca.num_heads, ca.head_dim)).unbind(2)
            ks.append(k)
            vs.append(v)
        out = _varlen.together_packed(
            qs, ks, vs, key_lengths, segments=segments, kernel=backend.packed_kernel(states[0].plan)
        )
        off = 0
        for run in runs:
            off = run.after(j, out, off, empty)
        for i in singles:
            blk = cast(CrossAttentionBlock, decoders[i].blocks[j])
            after = getattr(blk, STEPS_ATTR, (before_step, after_step))[1]
            b, p = xs[i].shape[:2]
            attended = out[off : off + b * p].view(b, p, out.shape[1] * out.shape[2])
            attended = attended.masked_fill(empty, 0.0)
            off += b * p
            xs[i] = after(blk, xs[i], attended)
    for run in runs:
        for i, x in zip(run.index, run.x.unbind(0)):
            xs[i] = x
    return [dec.predict(xs[i]) for i, dec in enumerate(decoders)]


# ----------------------------------------------------------------------------- stacked runs

#: Order of a block's parameters in a stacked run (None where a part has no bias etc.).
_SLOTS = ("norm1.weight", "norm1.bias", "q.weight", "q.bias", "kv.weight", "kv.bias",
          "proj.weight", "proj.bias", "norm2.weight", "norm2.bias", "fc1.weight", "fc1.bias",
          "fc2.weight", "fc2.bias")  # fmt: skip
_SLOT = {name: i for i, name in enumerate(_SLOTS)}

Params = _stacked.Params


def _block_parts(blk: nn.Module) -> Optional[tuple[tuple[object, ...], Params]]:
    """``(key, parameters in _SLOTS order)``: what two blocks must share to run stacked
    (`crossmae.layers._stacked.parts`), or None when ``blk`` cannot: crossmae's own block,
    attention and MLP (no subclass, no self-attention, no hooks), no compiled lockstep
    steps."""
    if type(blk) is not CrossAttentionBlock or getattr(blk, STEPS_ATTR, None) is not None:
        return None
    if blk.has_self_attn or _calls.hooked(blk):
        return None
    got = _stacked.block_parts(blk, "cross_attn", CrossAttention, ("q", "kv", "proj"))
    if got is None:
        return None
    return (*got[0], cast(CrossAttention, got[2]).num_heads), got[1]


def _stack_parts(
    dec: CrossMAEDecoder, st: DecoderState
) -> Optional[tuple[tuple[object, ...], list[Params]]]:
    """``(key, per-block parameters)``; decoders with equal keys run their blocks stacked:
    the same block structure layer by layer, the same number of queries, and one shared
    context tensor (or none shared)."""
    keys, params = [], []
    for blk in dec.blocks:
        parts = _block_parts(blk)
        if parts is None:
            return None
        keys.append(parts[0])
        params.append(parts[1])
    if _calls.hooked(dec.blocks):
        return None
    shared = id(st.context) if st.context.ndim == 3 else None
    return (tuple(keys), st.queries.shape[1:], st.queries.dtype, shared), params


def _stack_groups(
    decoders: Sequence[CrossMAEDecoder], states: Sequence[DecoderState]
) -> list[tuple[list[int], list[list[Params]]]]:
    """The decoders that run stacked, grouped by `_stack_parts` key (two or more per
    group), with their parameters. None in eager mode under hooks for every module, or
    while compiling (compiled kernels fuse the per-decoder ops already; the captured graph
    keeps its shape)."""
    if torch.compiler.is_compiling() or _calls.global_hooks():
        return []
    groups: dict[tuple[object, ...], tuple[list[int], list[list[Params]]]] = {}
    for i, (dec, st) in enumerate(zip(decoders, states)):
        parts = _stack_parts(dec, st)
        if parts is not None:
            grp = groups.setdefault(parts[0], ([], []))
            grp[0].append(i)
            grp[1].append(parts[1])
    return [grp for grp in groups.values() if len(grp[0]) > 1]


class _StackedRun:
    """Decoders of one `_stack_parts` key decoded as one: queries ``[g, b, p, c]``, every block's
    parameters stacked once per forward (`crossmae.layers._stacked`), one batched op per
    step of the block, and the decoders' kv projections as one GEMM over their shared
    context (where they share one)."""

    def __init__(
        self,
        decoders: Sequence[CrossMAEDecoder],
        states: Sequence[DecoderState],
        index: list[int],
        params: list[list[Params]],
    ) -> None:
        self.index = index
        self.decoders = [decoders[i] for i in index]
        self.states = [states[i] for i in index]
        first = self.states[0]
        self.g = len(index)
        self.b, self.p, self.c = first.queries.shape
        self.x = torch.stack([st.queries for st in self.states])  # [g b p c]
        pads = [st.query_padding_mask for st in self.states]
        self.qpad: Optional[Tensor] = None
        if any(q is not None for q in pads):
            none = torch.zeros_like(next(q for q in pads if q is not None))
            self.qpad = torch.stack([none if q is None else q for q in pads])[..., None]
        self.shared = first.context.ndim == 3  # one context object for all (`_stack_parts`)
        # every parameter stacked once; norm1 → q and norm2 → fc1 folded
        self.stack = _stacked.Stack(
            params,
            folds=[(_SLOT["norm1.weight"], _SLOT["norm1.bias"], _SLOT["q.weight"], _SLOT["q.bias"]),
                   (_SLOT["norm2.weight"], _SLOT["norm2.bias"], _SLOT["fc1.weight"], _SLOT["fc1.bias"])],
            gemms=[(_SLOT[n + ".weight"], _SLOT[n + ".bias"]) for n in ("q", "kv", "proj", "fc1", "fc2")],
            device_type=first.queries.device.type,
        )  # fmt: skip
        blk = cast(CrossAttentionBlock, self.decoders[0].blocks[0])
        self.heads, self.head_dim = blk.cross_attn.num_heads, blk.cross_attn.head_dim

    def _gemm(self, j: int, name: str) -> tuple[Tensor, Optional[Tensor]]:
        return self.stack.gemm(j, _SLOT[name + ".weight"])

    def before(self, j: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Layer ``j`` up to the shared kernel call: every decoder's ``q [b p h d]`` and
        ``k, v [b m h d]``."""
        blk = cast(CrossAttentionBlock, self.decoders[0].blocks[j])
        g, b, p, c = self.g, self.b, self.p, self.c
        if self.qpad is not None:
            self.x = self.x.masked_fill(self.qpad, 0.0)
        h = F.layer_norm(
            self.x.view(g, b * p, c), (c,), None, None, cast(nn.LayerNorm, blk.norm1).eps
        )
        q = _stacked.linear(h, *self._gemm(j, "q"))  # norm1's affine folded in
        qs = list(q.view(g, b, p, self.heads, self.head_dim).unbind(0))
        if self.shared:
            ctx = self.states[0].context
            w, bias = self._gemm(j, "kv")
            kv = F.linear(ctx, w.flatten(0, 1), None if bias is None else bias.flatten())
            # views by unbind: their backward is one stack, where indexing would fill a
            # zero gradient of the whole projection per view and add them up
            k_all, v_all = kv.view(*kv.shape[:-1], g, 2, self.heads, self.head_dim).unbind(3)
            ks, vs = list(k_all.unbind(2)), list(v_all.unbind(2))  # [b m h d] each
        else:
            ks, vs = [], []
            for i, st in enumerate(self.states):
                ctx = st.context[j] if st.context.ndim == 4 else st.context
                w, bias = self._gemm(j, "kv")
                kv_i = F.linear(ctx, w[i], _at(bias, i))
                k_i, v_i = kv_i.view(*kv_i.shape[:-1], 2, self.heads, self.head_dim).unbind(2)
                ks.append(k_i)
                vs.append(v_i)
        return qs, ks, vs

    def after(self, j: int, out: Tensor, off: int, empty: Tensor) -> int:
        """Layer ``j`` after the shared call: ``out`` the packed kernel output, this run's
        rows from ``off``; returns the offset after them."""
        blk = cast(CrossAttentionBlock, self.decoders[0].blocks[j])
        g, b, p, c = self.g, self.b, self.p, self.c
        rows = g * b * p
        attended = out[off : off + rows].view(g, b, p, c).masked_fill(empty, 0.0)
        y = _stacked.linear(attended.view(g, b * p, c), *self._gemm(j, "proj"))
        x = self.x + y.view(g, b, p, c)
        h = F.layer_norm(x.view(g, b * p, c), (c,), None, None, cast(nn.LayerNorm, blk.norm2).eps)
        h = _stacked.linear(h, *self._gemm(j, "fc1"))  # norm2's affine folded in
        h = F.gelu(h, approximate=cast(nn.GELU, blk.mlp.act).approximate)
        h = _stacked.linear(h, *self._gemm(j, "fc2"))
        self.x = x + h.view(g, b, p, c)
        return off + rows


def _at(t: Optional[Tensor], i: int) -> Optional[Tensor]:
    return None if t is None else t[i]
