"""Structurally identical `TransformerEncoder` s over equally shaped inputs, run stacked.

Legend: ``g`` encoders, ``b`` batch, ``n`` tokens, ``c`` width, ``a`` conditioning width.
Mask polarity: True = padding slot.

A multimodal model with several modalities of one kind (e.g. three rasters on one land
mask) has one encoder per modality, each of the same architecture and each seeing
``[b, n, c]`` visible tokens. Run one after the other, every op of every block launches
once per encoder, and eager steps are bound by the host issuing them. Stacked, the inputs
are one ``[g, b, n, c]`` tensor, the parameters are stacked once per forward
(`crossmae.layers._stacked`), norms, linears, residuals and FiLM run as one batched op
each, and the attention is **one** call over ``g * b`` samples under one plan. The result
equals each encoder run alone up to rounding (private: `MultimodalMAE` uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers import _calls, _stacked, backend
from ..layers.attention import Attention, _attend, _heads
from ..layers.blocks import Block
from .transformer import EncoderOutput, FiLM, TransformerEncoder

__all__: list[str] = []

Params = _stacked.Params

#: A block's parameters in a stacked run, in this order (None where absent).
_SLOTS = ("norm1.weight", "norm1.bias", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
          "norm2.weight", "norm2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")  # fmt: skip
_SLOT = {name: i for i, name in enumerate(_SLOTS)}


def _block_parts(blk: nn.Module) -> Optional[tuple[tuple[object, ...], Params]]:
    """``(key, parameters in _SLOTS order)`` of a stock `Block` (attention, MLP, norms,
    linears and GELU exactly crossmae's / PyTorch's, dropouts inert, no attention dropout
    in training, no hooks, not compiled in place), or None."""
    if type(blk) is not Block or _calls.hooked(blk) or _calls.compiled(blk):
        return None
    got = _stacked.block_parts(blk, "attn", Attention, ("qkv", "proj"))
    if got is None:
        return None
    attn = cast(Attention, got[2])
    if attn.training and attn.attn_drop > 0:
        return None
    return (*got[0], attn.num_heads, attn.fused_attn), got[1]


def encoder_parts(
    enc: nn.Module,
) -> Optional[tuple[tuple[object, ...], list[Params], list[Params], Params]]:
    """``(key, block params, FiLM params, final-norm params)`` of a stock
    `TransformerEncoder` that can run stacked (every block per `_block_parts`, FiLMs and
    the final norm stock, no hooks anywhere, nothing compiled in place), or None. Encoders
    with equal keys compute the same function of their own parameters."""
    if type(enc) is not TransformerEncoder or _calls.hooked(enc) or _calls.compiled(enc):
        return None
    blocks = enc.blocks
    if _calls.hooked(blocks) or not len(blocks):
        return None
    keys: list[object] = []
    params: list[Params] = []
    for blk in blocks:
        got = _block_parts(blk)
        if got is None:
            return None
        keys.append(got[0])
        params.append(got[1])
    films: list[Params] = []
    film_list = enc.films
    if film_list is not None:
        if _calls.hooked(film_list):
            return None
        for film in film_list:
            if type(film) is not FiLM or _calls.hooked(film):
                return None
            got = _stacked.parts((film._modules["proj"],), (), None)
            if got is None:
                return None
            keys.append(("film", *got[0]))
            films.append(got[1])
    norm = enc._modules["norm"]
    norm_params: Params = []
    if type(norm) is nn.Identity and norm is not None and not _calls.hooked(norm):
        keys.append("identity")
    else:
        got = _stacked.parts((norm,), (), None)
        if got is None:
            return None
        keys.append(got[0])
        norm_params = got[1]
    return (enc.dim, tuple(keys)), params, films, norm_params


def may_stack() -> bool:
    """Stacked runs are for eager mode without hooks for every module: compiled kernels
    fuse the per-encoder ops already (and the traced graph keeps its shape)."""
    return not torch.compiler.is_compiling() and not _calls.global_hooks()


def encode_stacked(
    encoders: Sequence[TransformerEncoder],
    parts: Sequence[tuple[list[Params], list[Params], Params]],
    tokens: Sequence[Tensor],
    padding_masks: Sequence[Optional[Tensor]],
    conds: Sequence[Optional[Tensor]],
) -> list[EncoderOutput]:
    """``[enc(x, pad, cond=c) for ...]`` as one stacked computation (no feature taps).

    The caller checked that the encoders share one `encoder_parts` key (``parts``: their
    block, FiLM and final-norm parameters), that the inputs share one shape ``[b, n, c]``
    (``c`` the encoders' width) and dtype, that the padding masks are all None or all
    ``[b, n]`` bool, and the conds all None (no FiLM) or all ``[b, a]``."""
    first = encoders[0]
    g = len(encoders)
    b, n, c = tokens[0].shape
    x = torch.stack(list(tokens))  # [g b n c]
    pad: Optional[Tensor] = None
    if padding_masks[0] is not None:
        pad = torch.stack([cast(Tensor, p) for p in padding_masks]).view(g * b, n)
        x = x.masked_fill(pad.view(g, b, n, 1), 0.0)
    xf = x.view(g * b, n, c)
    # one plan and one key layout for all g * b samples, decided as each encoder would
    xf, block_pad, plan, perm = backend.order_for(first._plan(xf, pad, "padded"), xf, pad)
    depth = len(parts[0][0])
    dev = xf.device.type
    # every parameter stacked once per forward; norm1 → qkv and norm2 → fc1 folded
    blocks = _stacked.Stack(
        [pp[0] for pp in parts],
        folds=[(_SLOT["norm1.weight"], _SLOT["norm1.bias"], _SLOT["qkv.weight"], _SLOT["qkv.bias"]),
               (_SLOT["norm2.weight"], _SLOT["norm2.bias"], _SLOT["fc1.weight"], _SLOT["fc1.bias"])],
        gemms=[(_SLOT[n + ".weight"], _SLOT[n + ".bias"]) for n in ("qkv", "proj", "fc1", "fc2")],
        device_type=dev,
    )  # fmt: skip
    films = None
    if parts[0][1]:
        films = _stacked.Stack([pp[1] for pp in parts], folds=[], gemms=[(0, 1)], device_type=dev)
    norm = _stacked.Stack([[pp[2]] for pp in parts], folds=[], gemms=[], device_type=dev)

    cond: Optional[Tensor] = None
    if conds[0] is not None and first.films is not None and len(first.films):
        dtype = cast(FiLM, first.films[0]).proj.weight.dtype
        cond = torch.stack([cast(Tensor, cc) for cc in conds]).to(dtype)  # [g b a]
    blk0 = cast(Block, first.blocks[0])
    heads, hd = blk0.attn.num_heads, blk0.attn.head_dim
    rows = b * n
    h_pad = None if block_pad is None else block_pad.view(g, rows, 1)
    y = xf.view(g, rows, c)
    for j in range(depth):
        blk = cast(Block, first.blocks[j])
        if h_pad is not None:
            y = y.masked_fill(h_pad, 0.0)  # padded tokens zeroed on entry, as in `Block`
        eps1 = cast(nn.LayerNorm, blk.norm1).eps
        h = F.layer_norm(y, (c,), None, None, eps1)
        qkv = _stacked.linear(h, *blocks.gemm(j, _SLOT["qkv.weight"]))  # norm1 folded in
        q, key, v = _heads(qkv.view(g * b, n, 3, heads, hd))
        att = _attend(q, key, v, block_pad, dropout_p=0.0, fused=blk.attn.fused_attn,
                      query_padding_mask=block_pad, plan=plan)  # fmt: skip
        att = att.transpose(1, 2).reshape(g, rows, c)  # (g b) h n d -> g (b n) (h d)
        y = y + _stacked.linear(att, *blocks.gemm(j, _SLOT["proj.weight"]))
        eps2 = cast(nn.LayerNorm, blk.norm2).eps
        h = F.layer_norm(y, (c,), None, None, eps2)
        h = _stacked.linear(h, *blocks.gemm(j, _SLOT["fc1.weight"]))  # norm2 folded in
        h = F.gelu(h, approximate=cast(nn.GELU, blk.mlp.act).approximate)
        y = y + _stacked.linear(h, *blocks.gemm(j, _SLOT["fc2.weight"]))
        if cond is not None and films is not None:
            mod = _stacked.linear(cond, *films.gemm(j, 0))  # [g b 2c]
            scale, shift = mod.unsqueeze(2).chunk(2, dim=-1)  # [g b 1 c]
            yv = y.view(g, b, n, c)
            y = torch.addcmul(yv + shift, yv, scale).view(g, rows, c)
    if perm is not None:
        yf, _ = backend.restore_order(perm, y.view(g * b, n, c))
        y = yf.view(g, rows, c)
    if type(first.norm) is not nn.Identity:
        y = _stacked.layer_norm(
            y, norm.get(0, 0), norm.get(0, 1), cast(nn.LayerNorm, first.norm).eps
        )
    out = y.view(g, b, n, c)
    return [EncoderOutput(out[i], padding_masks[i], None) for i in range(g)]
