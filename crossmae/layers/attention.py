"""Multi-head self- and cross-attention that is exact under padding.

Legend: ``b`` batch, ``h`` heads, ``n`` query tokens, ``m`` key tokens, ``d`` head dim,
``c`` channels (``h * d``).

Mask polarity: every ``*_padding_mask`` here is bool ``[b, m]`` with **True = padding**
(ignored as a key). SDPA's boolean ``attn_mask`` has the opposite polarity (True = attend);
the conversion happens in one place, `_attend`.

Guarantees (tested in ``tests/layers/test_attention.py``):

* padded key slots are zeroed before they are projected, so NaN/inf stored there never
  reaches a real output or any gradient (``0 * NaN`` cannot happen);
* a row with zero real keys returns exactly zero with finite gradients, on every torch
  version (the row attends to its zeroed keys and the result is then masked out);
* without a padding mask no mask is passed to SDPA, so the flash kernel can run.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .._checks import (
    check_bool,
    check_divisible,
    check_float_tensor,
    check_int,
    check_module_dtype,
    check_optional_bool,
    check_padding_mask,
    check_probability,
    check_same_device,
    check_tensor,
)
from .._config import use_fused_attn
from . import _short, _varlen, backend
from ._calls import call_part
from ._flex import can_use_flex, flex_attend, flex_packed
from ._varlen import can_use_varlen, varlen_attend
from .packing import segment_index

__all__ = ["Attention", "CrossAttention", "packed_attention", "padded_attention"]


def select_padded_kernel(q: Tensor, dropout_p: float) -> str:
    """Which fused kernel serves one attention call with padding for ``q`` when no stack
    handed a plan: ``"varlen"``, ``"flex"`` or ``"sdpa"`` (`backend.decide`'s policy)."""
    plan = backend.decide(
        q.device.type,
        q.dtype,
        q.shape[-1],
        padded=True,
        dropout_p=dropout_p,
        varlen_ok=can_use_varlen(q, dropout_p),
        flex_ok=can_use_flex(q, dropout_p),
    )
    return "sdpa" if plan.kernel == "sdpa_mask" else plan.kernel


def warn_trailing(name: str, value: object) -> None:
    """The deprecated ``*_padding_is_trailing`` keywords: a real bool (TypeError otherwise,
    as every flag) and a FutureWarning; the value is ignored."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    warnings.warn(
        f"{name} is deprecated and ignored: the attention backend (crossmae.layers.backend) "
        "decides the token layout once per stack; it will be removed in 0.3",
        FutureWarning,
        stacklevel=3,
    )


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    *,
    dropout_p: float,
    fused: bool,
    query_padding_mask: Optional[Tensor] = None,
    plan: Optional[backend.AttentionPlan] = None,
) -> Tensor:
    """Attention of ``q [b h n d]`` over ``k, v [b h m d]`` whose padded keys are finite.

    The one place where crossmae's polarity (True = padding) becomes a kernel's. The kernel
    is ``plan.kernel`` when a stack handed its `AttentionPlan` (decided once per stack
    forward, see `crossmae.layers.backend`), else `select_padded_kernel` for this call:
    no padding → SDPA without a mask (flash/cuDNN can run), or crossmae's short-key
    Triton kernel where the plan says ``"short"`` and the call fits it; padding → packed
    variable-length attention (`_varlen`), ``flex_attention`` with a block-sparse mask
    (`_flex`), or SDPA with a boolean ``[b, 1, 1, m]`` mask; the explicit softmax path when
    ``fused`` is False. ``query_padding_mask`` (self-attention) only lets the packed path
    skip padded queries; results are the same either way. ``plan.trailing``: padding is
    trailing in every row, which saves the packed path a reordering copy.
    """
    if key_padding_mask is None:
        if not fused or (plan is not None and plan.kernel == "manual"):
            return _manual_attention(q, k, v, None, dropout_p)
        if (
            plan is not None
            and plan.kernel == "short"
            and (plan.eager or torch.compiler.is_compiling())
            and _short.fits(q, k, v, dropout_p)
        ):
            return _short.short_attention(q, k, v)
        if plan is not None and plan.sdpa_backends:
            with backend.sdpa_context(plan.sdpa_backends):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # Rows with no real key attend to every (finite, zeroed) key and are zeroed afterwards:
    # no fully masked softmax row ever exists, whatever kernel or torch version runs.
    empty = key_padding_mask.all(dim=-1)  # [b]
    if not fused:
        kernel = "manual"
    elif plan is not None:
        kernel = plan.kernel
        if kernel in ("sdpa", "dense", "short") or (
            kernel in ("varlen", "flex") and dropout_p > 0.0
        ):
            kernel = "sdpa_mask"  # a plan made for other inputs: the always-valid choice
    else:
        kernel = select_padded_kernel(q, dropout_p)
    trailing = plan is not None and plan.trailing
    if kernel == "flex":
        out = flex_attend(q, k, v, key_padding_mask)
        return out.masked_fill(empty[:, None, None, None], 0.0)
    if kernel == "varlen":
        segments = None  # the stack's boundaries, for self-attention over this very mask
        if plan is not None and plan.self_segments is not None:
            seg_mask, cu = plan.self_segments
            segments = cu if seg_mask is key_padding_mask else None
        out = varlen_attend(
            q,
            k,
            v,
            key_padding_mask,
            query_padding_mask,
            keys_sorted=trailing,
            queries_sorted=trailing,
            segments=segments,
            kernel=backend.packed_kernel(plan),
        )
        # zeroed in the kernel's memory order (b n h d), so `b h n d -> b n (h d)` after
        # this stays a view: no copy before the output projection
        out = out.transpose(1, 2).masked_fill(empty[:, None, None, None], 0.0)
        return out.transpose(1, 2)
    attend = ~key_padding_mask | empty[:, None]  # [b m], True = attend (SDPA polarity)
    attend = attend[:, None, None, :]  # [b 1 1 m]
    if kernel == "manual":
        out = _manual_attention(q, k, v, attend, dropout_p)
    elif plan is not None and plan.sdpa_backends:
        with backend.sdpa_context(plan.sdpa_backends):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p)
    return out.masked_fill(empty[:, None, None, None], 0.0)


def _manual_attention(
    q: Tensor, k: Tensor, v: Tensor, attend: Optional[Tensor], dropout_p: float
) -> Tensor:
    scale = q.shape[-1] ** -0.5
    scores = (q * scale) @ k.transpose(-2, -1)  # [b h n m]
    if attend is not None:
        scores = scores.masked_fill(~attend, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights.to(v.dtype) @ v


def padded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    *,
    dropout_p: float = 0.0,
    fused: Optional[bool] = None,
) -> Tensor:
    """Scaled dot-product attention that ignores padded keys exactly.

    Args:
        q: queries ``[b, h, n, d]``.
        k: keys ``[b, h, m, d]``.
        v: values ``[b, h, m, d]``.
        key_padding_mask: bool ``[b, m]``, **True = padding** (ignored as a key), or None.
        dropout_p: attention dropout probability (applied as given; pass 0 in eval).
        fused: use ``F.scaled_dot_product_attention`` (default: the process-wide switch,
            see `set_fused_attn`) or the explicit softmax path.

    ``q``, ``k`` and ``v`` must share one floating dtype (a ``TypeError`` otherwise; nothing
    is cast).

    Returns:
        ``[b, h, n, d]``. Rows whose sample has no real key are exactly 0. Padded keys and
        values are zeroed first, so NaN/inf stored there cannot reach the output.
    """
    check_optional_bool("fused", fused)
    check_float_tensor("q", q, ndim=4)
    check_float_tensor("k", k, ndim=4)
    check_float_tensor("v", v, ndim=4)
    if k.shape != v.shape[:-1] + k.shape[-1:] or q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q, k, v must be [b, h, n, d], [b, h, m, d], [b, h, m, dv]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    _check_same_dtype(q, k, v)
    check_probability("dropout_p", dropout_p)
    pad = check_padding_mask(
        "key_padding_mask", key_padding_mask, (k.shape[0], k.shape[2]), "k [b, h, m, d]"
    )
    if pad is not None:
        p4 = pad[:, None, :, None]
        k = k.masked_fill(p4, 0.0)
        v = v.masked_fill(p4, 0.0)
    return _attend(
        q, k, v, pad, dropout_p=dropout_p, fused=use_fused_attn() if fused is None else fused
    )


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    fused: Optional[bool] = None,
) -> Tensor:
    """Attention within the segments of a packed layout (see `pack_tokens`).

    Args:
        q: queries ``[t, h, d]`` (packed rows), floating point.
        k: keys ``[t, h, d]`` (same shape, dtype and device as ``q``).
        v: values ``[t, h, d]`` (same shape, dtype and device as ``q``).
        cu_seqlens: int32 (or int64) ``[s + 1]`` segment boundaries, first entry 0, last
            entry ``t`` (the values are checked off-GPU only: on CUDA that would sync).
        max_seqlen: an int ``>= 1``, an upper bound of every segment's length (used by the
            CUDA kernel).
        fused: use the packed CUDA kernels / SDPA (default: `use_fused_attn`) or the explicit
            softmax path.

    Returns:
        ``[t, h, d]``: every row attends to the rows of its own segment only. On CUDA in half
        precision this is ``torch.nn.attention.varlen`` (no mask, no padding; unless
        `set_padded_attention_kernel` chose another kernel); elsewhere each segment attends
        through a zero-padded ``[s, L]`` layout with a key padding mask (rows of different
        segments never meet, so a NaN in one segment stays there).

    Raises:
        TypeError: non-tensor or non-float ``q``/``k``/``v``, mixed dtypes, non-integer
            ``cu_seqlens``, non-int ``max_seqlen``.
        ValueError: shapes other than the above, ``max_seqlen < 1``, devices that differ.
    """
    check_optional_bool("fused", fused)
    _check_packed_qkv(q, k, v)
    cu_seqlens = _check_cu_seqlens(cu_seqlens, q)
    check_int("max_seqlen", max_seqlen, minimum=1)
    # The packed policy of the backend: varlen where it serves, else the segment-padded path
    # (never flex: its partial blocks would spread a NaN between segments, 0 * NaN).
    plan = backend.decide(
        q.device.type,
        backend.compute_dtype(q),
        q.shape[-1],
        padded=True,
        layout="packed",
        fused=use_fused_attn() if fused is None else fused,
    )
    return _packed_attend(q, k, v, cu_seqlens, max_seqlen, plan.kernel, plan)


def _packed_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    kernel: str,
    plan: Optional[backend.AttentionPlan] = None,
) -> Tensor:
    """`packed_attention` with the kernel decided (``"varlen"``, ``"flex"``, ``"dense"``
    or ``"manual"``; ``plan`` picks the varlen function, see `backend.packed_kernel`);
    inputs already checked."""
    if kernel == "varlen":
        fn = backend.packed_kernel(plan) or _varlen._kernel()
        if fn is not None:
            cu32 = cu_seqlens.to(torch.int32)  # the kernel's index dtype (no-op for int32)
            return fn(q, k, v, cu32, cu32, max_seqlen, max_seqlen)
    if kernel == "flex":
        return flex_packed(q, k, v, cu_seqlens)
    return _segment_attend(q, k, v, cu_seqlens, max_seqlen, fused=kernel != "manual")


def _segment_attend(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, fused: bool
) -> Tensor:
    """Packed attention through the padded layout, where neither packed kernel exists
    (off-CUDA, or head dims they refuse): segment ``i``'s rows go to slots ``[i, 0..len)``
    of a zero ``[s, L]`` layout (``s`` segments, ``L`` their longest length), attend there
    with a key padding mask (`_attend`) and come back. Rows of different segments never
    meet, not even as a 0 weight times a value, so a NaN in one sample stays in it (one
    block-diagonal ``[t, t]`` softmax would spread it: ``0 · NaN``), and the cost is the
    padded layout's ``O(s · L²)``, not ``O(t²)``."""
    t, h = q.shape[:2]
    s = cu_seqlens.shape[0] - 1
    if t == 0 or s == 0:
        return q.new_zeros(t, h, v.shape[-1])
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]  # [s]
    longest = max(max_seqlen, 1)
    if not q.is_cuda and not torch.compiler.is_compiling():
        longest = max(int(lengths.max()), 1)  # free off-GPU: the exact bound, not the given one
    else:
        torch._assert_async(
            lengths.max() <= longest, "packed attention: a segment is longer than max_seqlen"
        )
    rows = torch.arange(t, device=q.device)
    seg = segment_index(cu, t)  # segment of every row
    slot = seg * longest + (rows - cu[seg])  # its place in the [s, L] layout (unique)
    key_pad = torch.arange(longest, device=q.device)[None, :] >= lengths[:, None]  # [s L]

    def padded(a: Tensor) -> Tensor:
        out = a.new_zeros(s * longest, *a.shape[1:]).index_copy(0, slot, a)
        return rearrange(out, "(s l) h d -> s h l d", s=s)

    plan = backend.AttentionPlan("sdpa_mask" if fused else "manual")
    out = _attend(padded(q), padded(k), padded(v), key_pad, dropout_p=0.0, fused=fused, plan=plan)
    return rearrange(out, "s h l d -> (s l) h d")[slot]


def _check_same_dtype(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k and v must share one dtype (no silent promotion or kernel error)."""
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; q, k and v must share "
                "one dtype (cast explicitly)"
            )


def _check_packed_qkv(q: object, k: object, v: object) -> None:
    """Packed ``q, k, v``: float ``[t, h, d]``, one shape, one dtype, one device."""
    qt = check_float_tensor("q", q, ndim=3)
    kt = check_float_tensor("k", k, ndim=3)
    vt = check_float_tensor("v", v, ndim=3)
    for name, t in (("k", kt), ("v", vt)):
        if t.shape != qt.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but q has shape {tuple(qt.shape)}; packed "
                "q, k, v must all be [t, h, d] with the same t, h and d"
            )
        check_same_device(name, t, "q", qt)
    _check_same_dtype(qt, kt, vt)


def _check_cu_seqlens(cu_seqlens: object, q: Tensor) -> Tensor:
    """int32/int64 ``[s + 1]`` boundaries from 0 to ``t`` (values checked off-GPU only)."""
    cu = check_tensor("cu_seqlens", cu_seqlens)
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 (or int64) tensor, got dtype {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens must have shape [s + 1] (s >= 0), got {tuple(cu.shape)}")
    check_same_device("cu_seqlens", cu, "q", q)
    if not cu.is_cuda and not torch.compiler.is_compiling():
        # Off-GPU reading two values costs nothing; on CUDA it would sync, so it is skipped.
        first, last, t = int(cu[0]), int(cu[-1]), q.shape[0]
        if first != 0 or last != t:
            raise ValueError(
                f"cu_seqlens must run from 0 to the {t} packed rows of q, got first entry "
                f"{first} and last entry {last}"
            )
    return cu


def _check_heads(dim: int, num_heads: int) -> int:
    check_int("dim", dim, minimum=1)
    check_int("num_heads", num_heads, minimum=1)
    check_divisible("dim", dim, "num_heads", num_heads)
    return dim // num_heads


def _check_tokens(
    name: str, x: object, width: int, width_name: str, dtype: torch.dtype, ndim: int = 3
) -> Tensor:
    """Tokens ``[b, n, width]`` (``[t, width]`` with ``ndim=2``) of the modules' dtype
    ``dtype`` (any float dtype under autocast). Metadata only."""
    t = check_float_tensor(name, x, ndim=ndim)
    if t.shape[-1] != width:
        raise ValueError(
            f"{name} has last dimension {t.shape[-1]} (shape {tuple(t.shape)}) but the module "
            f"was built with {width_name}={width}"
        )
    check_module_dtype(name, t, dtype, "the module")
    return t


def _check_cross_inputs(
    attn: CrossAttention, x: object, context: object, context_padding_mask: Optional[Tensor]
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The checks of `CrossAttention.forward` (shared with `CrossAttentionBlock`)."""
    xt = _check_tokens("x", x, attn.dim, "dim", attn.q.weight.dtype)
    ct = _check_tokens("context", context, attn.context_dim, "context_dim", attn.kv.weight.dtype)
    if ct.shape[0] != xt.shape[0]:
        raise ValueError(
            f"x and context must have the same batch size, got x {tuple(xt.shape)} and "
            f"context {tuple(ct.shape)}"
        )
    pad = check_padding_mask(
        "context_padding_mask", context_padding_mask, ct.shape[:2], "context [b, m, c]"
    )
    return xt, ct, pad


def _heads(proj: Tensor) -> tuple[Tensor, ...]:
    """The heads ``[b, h, n, d]`` (views) of a fused projection viewed as ``[b, n, s, h, d]``
    (``s`` = 3 for q, k, v; 2 for k, v).

    The split is taken where the ``s`` parts sit in memory (dimension 2), and the heads are
    transposed after it. The backward of that split stacks the parts' gradients into a
    ``[b, n, s, h, d]`` tensor, which is already the projection's layout; split after the
    transpose (as ``permute(2, 0, 3, 1, 4).unbind(0)``), the stacked gradient would be copied
    a second time to make it so. The views, and so the forward, are the same either way.
    """
    return tuple(t.transpose(1, 2) for t in proj.unbind(2))


class Attention(nn.Module):
    """Multi-head self-attention over a padded token set.

    Args:
        dim: token width ``c``.
        num_heads: number of heads ``h`` (must divide ``dim``).
        qkv_bias: bias on the fused ``qkv`` projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection (training only).
        fused_attn: use SDPA (True) or the explicit softmax path (False); default: the
            process-wide switch `set_fused_attn`, read once here.

    Parameters: ``qkv`` (Linear ``c -> 3c``, order q, k, v, heads split as ``(h d)``),
    ``proj`` (Linear ``c -> c``). Scale ``d ** -0.5``.

    Shapes:
        ``forward(x [b, n, c], padding_mask [b, n] | None) -> [b, n, c]``;
        ``padding_mask`` True = padding: such tokens are ignored as keys, and their own
        outputs are finite but meaningless. ``plan``: the `AttentionPlan` a stack decided
        for this forward (`crossmae.layers.backend.plan_for`); None decides for this call.
        ``padding_is_trailing`` is deprecated and ignored (FutureWarning): the layout is the
        plan's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: Optional[bool] = None,
    ) -> None:
        super().__init__()
        check_bool("qkv_bias", qkv_bias)
        check_optional_bool("fused_attn", fused_attn)
        self.head_dim = _check_heads(dim, num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = check_probability("attn_drop", attn_drop)
        check_probability("proj_drop", proj_drop)
        self.fused_attn: bool = use_fused_attn() if fused_attn is None else bool(fused_attn)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop: nn.Module = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        padding_is_trailing: Optional[bool] = None,
        plan: Optional[backend.AttentionPlan] = None,
    ) -> Tensor:
        """Multi-head self-attention of ``x`` over itself.

        Args:
            x: tokens ``[b, n, c]``, floating point, of the module's dtype (any float dtype
                under autocast).
            padding_mask: bool ``[b, n]``, True = padding, or None (no padding). Padded tokens
                are zeroed on entry and never act as keys; their own outputs are finite but
                meaningless.
            padding_is_trailing: deprecated, ignored; FutureWarning (the layout is
                the plan's).
            plan: the `AttentionPlan` a stack decided for this forward
                (`crossmae.layers.backend.plan_for`); None decides for this call.

        Returns:
            ``[b, n, c]`` in the input's dtype (the autocast dtype under autocast).
        """
        if padding_is_trailing is not None:
            warn_trailing("padding_is_trailing", padding_is_trailing)
        x = _check_tokens("x", x, self.dim, "dim", self.qkv.weight.dtype)
        pad = check_padding_mask("padding_mask", padding_mask, x.shape[:2], "x [b, n, c]")
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        # (b n) (three h d) -> three b h n d, as native views: einops' parsing costs host
        # time on every call, and eager steps are bound by the host. The projections run on
        # rows [b n, c]: a linear over [b, n, c] views to two dimensions and back, which
        # costs host time in the forward and the backward.
        b, n, c = x.shape
        qkv = self.qkv(x.reshape(b * n, c))
        q, k, v = _heads(qkv.view(b, n, 3, self.num_heads, self.head_dim))
        out = _attend(
            q,
            k,
            v,
            pad,
            dropout_p=self.attn_drop if self.training else 0.0,
            fused=self.fused_attn,
            query_padding_mask=pad,
            plan=plan,
        )
        out = self.proj(out.transpose(1, 2).reshape(b * n, c))  # b h n d -> (b n) (h d)
        return call_part(self.proj_drop, out).view(b, n, c)

    def forward_packed(
        self,
        x: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        *,
        plan: Optional[backend.AttentionPlan] = None,
    ) -> Tensor:
        """Self-attention within the segments of a packed layout (see `pack_tokens`).

        ``x [t, c]`` packed rows, ``cu_seqlens`` int32 segment boundaries, ``max_seqlen`` an
        upper bound of the segment lengths → ``[t, c]``. Attention dropout is not applied on
        this path. ``plan``: a packed-layout `AttentionPlan` from the stack, or None.
        """
        x = _check_tokens("x", x, self.dim, "dim", self.qkv.weight.dtype, ndim=2)
        # unbind where the three sit in memory: its backward then stacks the gradients
        # straight into the projection's layout (see `_heads`)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(1)
        if plan is None:
            out = packed_attention(q, k, v, cu_seqlens, max_seqlen, fused=self.fused_attn)
        else:
            cu = _check_cu_seqlens(cu_seqlens, q)
            kernel = plan.kernel if self.fused_attn else "manual"
            out = _packed_attend(q, k, v, cu, max_seqlen, kernel, plan)
        return call_part(self.proj_drop, self.proj(out.flatten(1)))  # t h d -> t (h d)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, fused_attn={self.fused_attn}"


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x``, keys and values from ``context``.

    This is CrossMAE's decoder attention: the queries are the tokens to reconstruct, the
    context is the (padded) set of visible encoder tokens.

    Args:
        dim: query width ``c`` (also the attention and output width).
        context_dim: context width (default ``dim``).
        num_heads: number of heads ``h`` (must divide ``dim``).
        qkv_bias: bias on ``q`` and ``kv``.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection (training only).
        fused_attn: use SDPA (True) or the explicit softmax path (False); default: the
            process-wide switch `set_fused_attn`, read once here.

    Parameters: ``q`` (Linear ``c -> c``), ``kv`` (Linear ``context_dim -> 2c``; first half
    k, second half v, heads split as ``(h d)``), ``proj`` (Linear ``c -> c`` with bias).
    Scale ``d ** -0.5``.

    Shapes:
        ``forward(x [b, n, c], context [b, m, context_dim], context_padding_mask [b, m] | None)
        -> [b, n, c]``; ``context_padding_mask`` True = padding (ignored as a key). A sample
        with no real context token gets exactly 0 from the attention (then ``proj``'s bias).
        ``plan``: the `AttentionPlan` a stack decided (None: decided for this call);
        ``context_padding_is_trailing`` is deprecated and ignored (FutureWarning).
    """

    def __init__(
        self,
        dim: int,
        context_dim: Optional[int] = None,
        num_heads: int = 8,
        *,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: Optional[bool] = None,
    ) -> None:
        super().__init__()
        check_bool("qkv_bias", qkv_bias)
        check_optional_bool("fused_attn", fused_attn)
        self.head_dim = _check_heads(dim, num_heads)
        self.context_dim = dim if context_dim is None else context_dim
        check_int("context_dim", self.context_dim, minimum=1)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = check_probability("attn_drop", attn_drop)
        check_probability("proj_drop", proj_drop)
        self.fused_attn: bool = use_fused_attn() if fused_attn is None else bool(fused_attn)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(self.context_dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop: nn.Module = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_padding_mask: Optional[Tensor] = None,
        *,
        context_padding_is_trailing: Optional[bool] = None,
        plan: Optional[backend.AttentionPlan] = None,
    ) -> Tensor:
        """Multi-head cross-attention: queries from ``x``, keys and values from ``context``.

        Args:
            x: queries ``[b, n, c]``, floating point, of the module's dtype (any float dtype
                under autocast).
            context: keys/values source ``[b, m, context_dim]``, same batch ``b`` as ``x``.
            context_padding_mask: bool ``[b, m]``, True = padding, or None (no padding). Padded
                context tokens are never keys; a sample with no real context token gets exactly
                0 from the attention (then ``proj``'s bias).
            context_padding_is_trailing: deprecated, ignored; FutureWarning (the layout is
                the plan's).
            plan: the `AttentionPlan` a stack decided for this forward; None decides for this
                call.

        Returns:
            ``[b, n, c]``: one output per query.
        """
        if context_padding_is_trailing is not None:
            warn_trailing("context_padding_is_trailing", context_padding_is_trailing)
        x, context, pad = _check_cross_inputs(self, x, context, context_padding_mask)
        if pad is not None:
            context = context.masked_fill(pad[..., None], 0.0)
        b, m = context.shape[:2]
        # projection on rows (see `Attention.forward`)
        kv = self.kv(context.reshape(b * m, self.context_dim)).view(b, m, 2 * self.dim)
        return self._attend_kv(x, *self._split_kv(kv), pad, plan=plan)

    def _split_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values ``[b, h, m, d]`` (views) of a ``kv`` projection output
        ``[b, m, 2c]`` (first half k, second half v, heads split as ``(h d)``)."""
        b, m = kv.shape[:2]
        k, v = _heads(kv.view(b, m, 2, self.num_heads, self.head_dim))
        return k, v

    def _attend_kv(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        context_padding_mask: Optional[Tensor] = None,
        *,
        plan: Optional[backend.AttentionPlan] = None,
    ) -> Tensor:
        """`forward` after the key/value projection: queries from ``x [b, n, c]``, keys and
        values ``k, v [b, h, m, d]`` given (e.g. the `_split_kv` of every layer's ``kv``
        projection, computed in one GEMM). Inputs are not checked: the caller's
        ``forward`` did (``context_padding_mask`` True = padding, its keys finite)."""
        b, n, c = x.shape
        q = self.q(x.reshape(b * n, c)).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = _attend(
            q,
            k,
            v,
            context_padding_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            fused=self.fused_attn,
            plan=plan,
        )
        return self.output(out.transpose(1, 2).reshape(b * n, c)).view(b, n, c)  # (b n) (h d)

    def output(self, attended: Tensor) -> Tensor:
        """The output projection (and its dropout) of the attended values ``[..., c]``, heads
        merged as ``(h d)``: the last step of `forward`, for callers that run the attention
        itself elsewhere (e.g. several decoders sharing one kernel call)."""
        if attended.ndim == 2:
            return call_part(self.proj_drop, self.proj(attended))
        rows = attended.reshape(-1, attended.shape[-1])  # on rows (see `Attention.forward`)
        out = call_part(self.proj_drop, self.proj(rows))
        return out.view(*attended.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, context_dim={self.context_dim}, num_heads={self.num_heads}, "
            f"fused_attn={self.fused_attn}"
        )
