"""Structurally identical modules run as one batched computation (private).

Legend: ``g`` modules stacked, ``r`` rows (tokens of all samples), ``c`` input width,
``o`` output width.

Several copies of one architecture with their own parameters (e.g. the per-modality
decoders of a multimodal model, decoded in lockstep) launch one kernel per op per copy in
eager mode, where the host issuing the kernels is the bound. Stacked, the copies' tokens
are one ``[g, r, c]`` tensor, their parameters stacked along ``g`` (one multi-tensor copy
for all of them, `stack_params`), and every op runs once for all copies: a layer norm as
one normalization (its per-copy affine folded into the linear it feeds, `fold`, or one
op of its own), linears as one batched GEMM. The arithmetic per copy is the same up
to rounding (a batched GEMM instead of ``g`` GEMMs, the affine applied to the weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._calls import hooked
from .drop import DropPath
from .mlp import Mlp

__all__: list[str] = []

Params = list[Optional[Tensor]]

_DROPS = (nn.Identity, nn.Dropout, DropPath)


def parts(
    weighted: Sequence[Optional[nn.Module]],
    inert: Sequence[Optional[nn.Module]],
    act: Optional[nn.Module],
) -> Optional[tuple[tuple[object, ...], Params]]:
    """``(key, params)`` of one block for a stacked run, or None when it cannot run
    stacked. ``weighted``: its norms and linears in a fixed order, each exactly
    ``nn.LayerNorm`` (over one dim) or ``nn.Linear``; ``params``: their weight and bias
    (None where absent) in that order. ``inert``: its dropouts and drop paths, each
    ``nn.Identity`` or a stock dropout / drop path in eval mode. ``act``: exactly
    ``nn.GELU`` (None: no activation in the block). No module may have hooks; parameters must be plain tensors of one dtype
    and device. Blocks with equal keys have the same shapes, epsilons and activation."""
    key: list[object] = []
    if act is not None:
        if type(act) is not nn.GELU or hooked(act):
            return None
        key.append(act.approximate)
    params: Params = []
    kinds = set()
    for part in weighted:
        if part is None or hooked(part):
            return None
        w, b = part._parameters.get("weight"), part._parameters.get("bias")
        if type(part) is nn.Linear and w is not None:
            key.append(("linear", *w.shape, b is None))
        elif type(part) is nn.LayerNorm and len(part.normalized_shape) == 1:
            key.append(("norm", part.eps, w is None, b is None))
        else:
            return None
        for t in (w, b):
            params.append(t)
            if t is not None:
                if type(t) is not nn.Parameter and type(t) is not Tensor:
                    return None  # tensor subclasses (sharded, quantized) keep their kernels
                kinds.add((t.dtype, t.device))
    for d in inert:
        if d is None or hooked(d):
            return None
        if type(d) is not nn.Identity and (type(d) not in _DROPS or d.training):
            return None
    if len(kinds) != 1:
        return None
    key.append(kinds.pop())
    return tuple(key), params


def block_parts(
    blk: nn.Module, attn_name: str, attn_cls: type, attn_linears: Sequence[str]
) -> Optional[tuple[tuple[object, ...], Params, nn.Module]]:
    """`parts` of a pre-norm block ``norm1 → <attn_name> → norm2 → mlp`` (crossmae's
    `Block` and `CrossAttentionBlock` layout): its attention exactly ``attn_cls`` and its
    MLP exactly `Mlp`, neither hooked. Returns ``(key, params, attention)``, the params in
    the order norm1, ``attn_linears``, norm2, fc1, fc2 (weight, bias each), or None.

    Submodules are read from ``_modules`` directly: this runs once per block and forward,
    and ``nn.Module.__getattr__`` would cost most of its time."""
    sub = blk._modules
    attn, mlp = sub[attn_name], sub["mlp"]
    if type(attn) is not attn_cls or type(mlp) is not Mlp or attn is None or mlp is None:
        return None
    if hooked(attn) or hooked(mlp):
        return None
    a, m = attn._modules, mlp._modules
    got = parts(
        (sub["norm1"], *(a[n] for n in attn_linears), sub["norm2"], m["fc1"], m["fc2"]),
        (sub["drop_path1"], sub["drop_path2"], a["proj_drop"], m["drop1"], m["drop2"]),
        m["act"],
    )
    return None if got is None else (got[0], got[1], attn)


class _StackParams(torch.autograd.Function):
    """``K`` groups of ``g`` same-shaped tensors → ``K`` tensors ``[g, ...]``: one
    multi-tensor copy forward; the backward hands every input its slice of the stacked
    gradient (a view: no kernel, made contiguous where the gradient is not)."""

    @staticmethod
    def forward(ctx: Any, g: int, *flat: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.g = g
        firsts = flat[::g]
        numels = [t.numel() * g for t in firsts]
        buf = torch.empty(sum(numels), dtype=flat[0].dtype, device=flat[0].device)
        outs = [v.view(g, *t.shape) for v, t in zip(torch.split(buf, numels), firsts)]
        torch._foreach_copy_([v for o in outs for v in o.unbind(0)], list(flat))
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        g = ctx.g
        out: list[Optional[Tensor]] = [None]
        for grad in grads:
            if grad is None:
                out.extend([None] * g)
            else:
                out.extend(grad.contiguous().unbind(0))
        return tuple(out)


def stack_params(groups: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """``groups[k]``: ``g`` tensors of one shape (one per module) → ``[g, *shape]`` each,
    differentiable. Every tensor must share one dtype and device (callers check)."""
    g = len(groups[0])
    flat = [t for grp in groups for t in grp]
    return list(_StackParams.apply(g, *flat))  # type: ignore[no-untyped-call]


class _AffineLayerNorm(torch.autograd.Function):
    """``layer_norm(x) * weight + bias`` with per-module ``weight``/``bias [g, 1, c]``:
    saves what a fused layer norm saves (input, mean, rstd) instead of the normalized
    activations, and recomputes them in the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        h, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        return torch.addcmul(bias, h, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, mean, rstd, weight = ctx.saved_tensors
        reduce = tuple(range(1, grad.ndim - 1))  # every axis but the module and the width
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            h = (x - mean) * rstd
            grad_w = (grad * h).sum(dim=reduce, keepdim=True)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=reduce, keepdim=True)
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad * weight, x, [x.shape[-1]], mean, rstd, None, None, [True, False, False]
            )[0]
        return grad_x, grad_w, grad_b, None


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Per-module layer norms of ``x [g, r, c]``: one normalization over ``c``, then every
    module's affine (``weight``/``bias`` ``[g, c]`` or None) in one op; with both, the
    normalized activations are recomputed in the backward instead of kept."""
    if weight is not None and bias is not None:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.float32  # what autocast runs layer norms in
        elif x.dtype == weight.dtype:
            dtype = x.dtype
        else:
            dtype = torch.promote_types(x.dtype, weight.dtype)
        return cast(
            Tensor,
            _AffineLayerNorm.apply(  # type: ignore[no-untyped-call]
                x.to(dtype), weight[:, None].to(dtype), bias[:, None].to(dtype), eps
            ),
        )
    h = F.layer_norm(x, x.shape[-1:], None, None, eps)
    if weight is None:
        return h if bias is None else h + bias[:, None]
    return h * weight[:, None]


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Per-module linears of ``x [g, r, c]`` with ``weight [g, o, c]``, ``bias [g, o]`` or
    None: one batched GEMM → ``[g, r, o]``."""
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))


def fold(
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
) -> tuple[Tensor, Optional[Tensor]]:
    """A norm's affine folded into the linear it feeds: ``(weight * norm_weight, weight @
    norm_bias + bias)``, for any leading dims (``[..., c]`` norm, ``[..., o, c]`` /
    ``[..., o]`` linear). The shift is a product and a sum in the parameters' dtype (a
    matmul would be autocast's, and cast)."""
    w = weight if norm_weight is None else weight * norm_weight[..., None, :]
    if norm_bias is not None:
        shift = (weight * norm_bias[..., None, :]).sum(dim=-1)
        bias = shift if bias is None else bias + shift
    return w, bias


class Stack:
    """The parameters of ``g`` modules of ``depth`` layers each, stacked once per forward.

    ``params[i][j]``: module ``i``'s layer-``j`` parameters in a fixed slot order (None
    where absent, the same in every module). ``folds``: ``(norm weight, norm bias, linear
    weight, linear bias)`` slot quadruples whose norm feeds that linear (`fold`).
    ``gemms``: the weight / bias slots of every linear. Where every layer has the same
    shapes (the usual stack), each slot is one ``[depth, g, ...]`` tensor: the folds and,
    under autocast, the casts of the GEMM operands then run once for all layers, not once
    per layer (the same casts autocast would make, made earlier)."""

    def __init__(
        self,
        params: Sequence[Sequence[Params]],
        folds: Sequence[tuple[int, int, int, int]],
        gemms: Sequence[tuple[int, int]],
        device_type: str,
    ) -> None:
        g, depth, slots = len(params), len(params[0]), len(params[0][0])
        first = params[0]
        present = [k for k in range(slots) if first[0][k] is not None]
        uniform = all(
            (first[j][k] is None) == (first[0][k] is None)
            and (
                first[j][k] is None
                or cast(Tensor, first[j][k]).shape == cast(Tensor, first[0][k]).shape
            )
            for j in range(depth)
            for k in range(slots)
        )
        self.depth = depth
        # slot k → [depth, g, ...] (uniform) or per layer [g, ...]
        self._t: dict[tuple[int, int], Tensor] = {}
        if uniform:
            groups = [[cast(Tensor, params[i][j][k]) for j in range(depth) for i in range(g)]
                      for k in present]  # fmt: skip
            flat = stack_params(groups) if groups else []
            self._all = {k: t.view(depth, g, *t.shape[1:]) for k, t in zip(present, flat)}
        else:
            where = [(j, k) for j in range(depth) for k in range(slots) if first[j][k] is not None]
            flat = stack_params([[cast(Tensor, params[i][j][k]) for i in range(g)]
                                 for j, k in where]) if where else []  # fmt: skip
            self._t = dict(zip(where, flat))
            self._all = {}
        self.uniform = uniform
        amp = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else None
        )
        self._gemm: dict[tuple[int, int], tuple[Tensor, Optional[Tensor]]] = {}
        folded = {q[2]: q for q in folds}
        for wk, bk in gemms:
            for j in range(1 if uniform else depth):
                w, b = self._raw(j, wk), self._raw(j, bk)
                if w is None:
                    continue
                if wk in folded:
                    nw, nb = self._raw(j, folded[wk][0]), self._raw(j, folded[wk][1])
                    w, b = fold(nw, nb, w, b)
                if amp is not None and w.dtype != torch.float64:  # autocast skips float64
                    w = w.to(amp)
                    b = None if b is None else b.to(amp)
                self._gemm[(j, wk)] = (w, b)

    def _raw(self, j: int, k: int) -> Optional[Tensor]:
        """Slot ``k`` of layer ``j`` (all layers ``[depth, g, ...]`` when uniform)."""
        return self._all.get(k) if self.uniform else self._t.get((j, k))

    def get(self, j: int, k: int) -> Optional[Tensor]:
        """Layer ``j``'s slot ``k`` as ``[g, ...]``, or None where absent."""
        t = self._raw(j, k)
        return t if t is None or not self.uniform else t[j]

    def gemm(self, j: int, weight_slot: int) -> tuple[Tensor, Optional[Tensor]]:
        """Layer ``j``'s linear at ``weight_slot``: ``(weight [g, o, c], bias [g, o] | None)``,
        folded with its norm where it has one, in the autocast dtype under autocast."""
        w, b = self._gemm[(0 if self.uniform else j, weight_slot)]
        if self.uniform:
            return w[j], None if b is None else b[j]
        return w, b
