"""Padded attention through ``flex_attention`` with a block-sparse mask (no host sync).

Legend: ``b`` batch, ``h`` heads, ``n`` query slots, ``m`` key slots, ``d`` head dim,
``K`` key blocks of ``BLOCK`` slots, ``Q`` query blocks.

The fallback of the CUDA fast path where ``torch.nn.attention.varlen`` is missing (torch
< 2.10) or cannot serve a call. The block mask is built straight from the padding flags,
without a dense ``[b, n, m]`` mask and without sorting the tokens: a key block whose slots
are all real is *full* (no mask evaluated), one with some real slots is *partial* (the mask
``~padding[b, kv]`` is evaluated inside the kernel), one with none is skipped. Every query
block of a sample shares its key-block lists (the mask depends on the key only). Shapes
are static and nothing syncs, so the path compiles with ``fullgraph=True`` and can be
captured in a CUDA graph.

In eager mode ``flex_attention`` has no fused kernel (it falls back to a reference that
materializes the scores), so the fast path calls one ``torch.compile``-d instance, built
on first use; inside a compiled model the call is traced into the model's graph.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import segment_index

__all__: list[str] = []

BLOCK = 128  # flex_attention's default block size (query and key)

FlexFn = Callable[..., Tensor]


# ``flex_attention`` and ``BlockMask``, imported on first use (importing them pulls in
# ``torch._dynamo``, which ``import crossmae`` must not pay).
_LOADED = False
_FLEX: Optional[FlexFn] = None
_BLOCK_MASK: Any = None
_HAS_SEQ_LENGTHS = False
_COMPILED: Optional[FlexFn] = None


def _load() -> None:
    global _LOADED, _FLEX, _BLOCK_MASK, _HAS_SEQ_LENGTHS
    if _LOADED:
        return
    _LOADED = True
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:  # torch < 2.5
        return
    _FLEX, _BLOCK_MASK = flex_attention, BlockMask
    _HAS_SEQ_LENGTHS = "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters


# Looked up once, at import, without importing it (``find_spec`` cannot be traced by
# torch.compile: asking it at every plan broke every CUDA stack's graph).
try:
    _FLEX_SHIPPED = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
except (ImportError, ValueError):  # pragma: no cover - exotic builds
    _FLEX_SHIPPED = False


def flex_available() -> bool:
    """Whether this torch build ships ``torch.nn.attention.flex_attention`` (looked up at
    import, without importing it)."""
    if _LOADED:
        return _FLEX is not None
    return _FLEX_SHIPPED


def supports(device_type: str, dtype: torch.dtype, head_dim: int, dropout_p: float) -> bool:
    """Whether the compiled flex kernel can serve a call with these properties: CUDA,
    floating point, no attention dropout, head dim a power of two in [16, 256] (what every
    torch >= 2.5 flex kernel accepts)."""
    d = head_dim
    return (
        device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
        and dropout_p == 0.0
        and 16 <= d <= 256
        and d & (d - 1) == 0
        and flex_available()
    )


def can_use_flex(q: Tensor, dropout_p: float) -> bool:
    """Whether the compiled flex kernel can serve this call (see `supports`)."""
    return supports("cuda" if q.is_cuda else q.device.type, q.dtype, q.shape[-1], dropout_p)


def compiled_flex() -> FlexFn:
    """The process-wide ``torch.compile``-d ``flex_attention`` (built on first use); while
    ``torch.compile`` traces a model, the plain function (the model's compile covers it)."""
    global _COMPILED
    _load()
    if _FLEX is None:
        raise RuntimeError("flex_attention is not available in this torch build (torch < 2.5)")
    if torch.compiler.is_compiling():
        return _FLEX
    if _COMPILED is None:
        # Static shapes: one compile per (b, h, n, m, d). Automatic dynamic shapes were tried
        # and inductor's CPU flex template fails to build for them (torch 2.13). Padded
        # lengths are fixed by a model's config, so few shapes occur; past dynamo's
        # recompile limit a call runs the eager flex_attention instead.
        _COMPILED = torch.compile(_FLEX, dynamic=False)
    return _COMPILED


def _block_lists(flags: Tensor) -> tuple[Tensor, Tensor]:
    """For ``flags [b Q K]`` (key block ``K`` selected for query block ``Q``): the number of
    selected key blocks ``[b 1 Q]`` and their indices, selected first (stable), ``[b 1 Q K]``
    (int32, the layout of ``BlockMask.from_kv_blocks``)."""
    counts = flags.sum(dim=2, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.uint8), dim=2, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), order[:, None].contiguous()


def _from_blocks(full: Tensor, partial: Tensor, mask_mod: Any, n: int, m: int) -> Any:
    _load()
    if _BLOCK_MASK is None:
        raise RuntimeError("flex_attention is not available in this torch build (torch < 2.5)")
    kv_num, kv_idx = _block_lists(partial)
    full_num, full_idx = _block_lists(full)
    kwargs: dict[str, Any] = {"seq_lengths": (n, m)} if _HAS_SEQ_LENGTHS else {}
    return _BLOCK_MASK.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, **kwargs
    )


def padding_block_mask(key_padding_mask: Tensor, n: int) -> Any:
    """A ``BlockMask`` letting every one of ``n`` queries attend to the real keys of its
    sample; ``key_padding_mask`` is bool ``[b, m]``, True = padding."""
    b, m = key_padding_mask.shape
    k_blocks = -(-m // BLOCK)
    q_blocks = -(-n // BLOCK)
    # Pad the flags to whole blocks (the tail counts as padding), so the mask can be read
    # at any key index of a block.
    pad = F.pad(key_padding_mask, (0, k_blocks * BLOCK - m), value=True)
    real = (~pad).view(b, k_blocks, BLOCK).sum(dim=2)
    full = (real == BLOCK)[:, None, :].expand(b, q_blocks, k_blocks)
    partial = ((real > 0) & (real < BLOCK))[:, None, :].expand(b, q_blocks, k_blocks)

    def real_key(b_idx: Tensor, h_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ~pad[b_idx, kv_idx]

    return _from_blocks(full, partial, real_key, n, m)


def segment_block_mask(cu_seqlens: Tensor, t: int) -> Any:
    """A ``BlockMask`` over ``t`` packed rows where each row attends to the rows of its own
    segment (``cu_seqlens [s + 1]``, int32/int64, first entry 0, last entry ``t``).

    Key block ``j`` is listed for query block ``i`` when it overlaps the rows of the
    segments that block ``i`` touches, and is full when both blocks lie in one segment."""
    blocks = -(-t // BLOCK)
    rows = torch.arange(blocks * BLOCK, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # segment of every row; the tail past t gets an id of its own (no real row matches it)
    seg = segment_index(cu_seqlens, blocks * BLOCK).to(rows.dtype)
    seg_blocks = seg.view(blocks, BLOCK)
    first, last = seg_blocks[:, 0], seg_blocks[:, -1]  # segments are ascending in a block
    bounds = F.pad(cu_seqlens, (0, 1), value=blocks * BLOCK)  # segment s: [bounds[s], bounds[s+1])
    lo = bounds[first] // BLOCK  # [Q] first key block that block i can see
    hi = -(-bounds[last + 1] // BLOCK)  # [Q] one past the last
    j = torch.arange(blocks, device=cu_seqlens.device, dtype=lo.dtype)
    listed = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])  # [Q K]
    one_seg = first[:, None] == seg_blocks[None, :, 0]  # key block starts in the same segment
    full = listed & one_seg & (first == last)[:, None] & (first == last)[None, :]

    def same_segment(b_idx: Tensor, h_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return seg[q_idx] == seg[kv_idx]

    return _from_blocks(full[None], (listed & ~full)[None], same_segment, t, t)


def flex_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    *,
    kernel: Optional[FlexFn] = None,
) -> Tensor:
    """Attention of ``q [b h n d]`` over the real keys of ``k, v [b h m d]``.

    ``key_padding_mask``: bool ``[b, m]``, True = padding. Rows of samples with no real key
    come out as zeros (the caller zeroes them anyway). ``kernel`` replaces the compiled
    ``flex_attention`` (the CPU tests pass the eager one).
    """
    fn = kernel if kernel is not None else compiled_flex()
    block_mask = padding_block_mask(key_padding_mask, q.shape[2])
    out = fn(q, k, v, block_mask=block_mask)
    assert isinstance(out, Tensor)
    return out


def flex_packed(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, kernel: Optional[FlexFn] = None
) -> Tensor:
    """Attention of packed rows ``q, k, v [t h d]`` within their segments (see
    `segment_block_mask`); ``kernel`` as in `flex_attend`."""
    fn = kernel if kernel is not None else compiled_flex()
    t = q.shape[0]
    qh, kh, vh = (a.transpose(0, 1)[None] for a in (q, k, v))  # [1 h t d]
    out = fn(qh, kh, vh, block_mask=segment_block_mask(cu_seqlens, t))
    assert isinstance(out, Tensor)
    return out[0].transpose(0, 1)
