"""GEMM parameters cast to the autocast dtype once per block and forward (private).

Under autocast every ``nn.Linear`` call casts its weight and its bias to the autocast
dtype (two kernels), and the backward casts their gradients back (two more). In eager mode,
where the host issuing the kernels bounds the step, that is a third of an image CrossMAE
step's launches. Inside a `precasting` forward the linears of one block (those under one
item of a ``ModuleList`` / ``ModuleDict``; outside any, those of one module) are cast
together by one multi-tensor copy the first time one of them runs, and their gradients cast back by one
multi-tensor copy. The values are autocast's own casts, so results are bit-identical; the
gradients reach the parameters when the block's backward is done, so distributed data
parallel keeps overlapping its reductions with the backward.

Call sites run a linear as ``linear(mod, x)`` instead of ``mod(x)``. Outside such a forward,
under ``torch.compile``, for a linear that is not exactly ``nn.Linear``, has hooks or
parameters that are not plain float32 tensors, ``mod(x)`` runs unchanged.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import Any, Callable, Optional, TypeVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__: list[str] = []

WeightBias = tuple[Tensor, Optional[Tensor]]


def hooked(mod: nn.Module) -> bool:
    """Forward or backward hooks on ``mod`` (a stacked run, or a linear on `precasting` casts, calls
    no module's ``forward``, so it would bypass them)."""
    return bool(
        mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
        or mod._backward_pre_hooks
    )  # fmt: skip


def global_hooks() -> bool:
    """Module hooks registered for every module (``register_module_forward_hook`` ...)."""
    g = nn.modules.module
    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(bool(getattr(g, n, None)) for n in names)


class _Cast(torch.autograd.Function):
    """Tensors of one dtype and device → their casts to ``dtype``: one multi-tensor copy
    each way (the gradients back to the parameters' dtype, in their own layout, as
    autocast's cast backward gives them)."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *params: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.src_dtype = params[0].dtype
        outs = [torch.empty_like(p, dtype=dtype) for p in params]
        torch._foreach_copy_(outs, list(params))
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        have = [i for i, g in enumerate(grads) if g is not None]
        out: list[Optional[Tensor]] = [None] * (len(grads) + 1)
        if have:
            src = [grads[i] for i in have]
            dst = [torch.empty_like(g, dtype=ctx.src_dtype) for g in src]  # type: ignore[arg-type]
            torch._foreach_copy_(dst, src)  # type: ignore[arg-type]
            for i, d in zip(have, dst):
                out[i + 1] = d
        return tuple(out)


class _Casts:
    """The eligible linears under one root, in blocks, cast lazily block by block."""

    def __init__(self, blocks: list[list[nn.Linear]], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.blocks = blocks
        self.where: dict[int, tuple[int, int]] = {
            id(m): (i, j) for i, blk in enumerate(blocks) for j, m in enumerate(blk)
        }
        self.done: list[Optional[list[WeightBias]]] = [None] * len(blocks)

    def get(self, mod: nn.Module) -> Optional[WeightBias]:
        at = self.where.get(id(mod))
        if at is None:
            return None
        i, j = at
        done = self.done[i]
        if done is None:
            done = self.done[i] = self._cast(self.blocks[i])
        return done[j]

    def _cast(self, blk: list[nn.Linear]) -> list[WeightBias]:
        flat: list[Tensor] = []
        for m in blk:
            flat.append(m._parameters["weight"])  # type: ignore[arg-type]
            b = m._parameters.get("bias")
            if b is not None:
                flat.append(b)
        outs = iter(_Cast.apply(self.dtype, *flat))  # type: ignore[no-untyped-call]
        got: list[WeightBias] = []
        for m in blk:
            w = next(outs)
            got.append((w, None if m._parameters.get("bias") is None else next(outs)))
        return got


_ACTIVE: ContextVar[Optional[_Casts]] = ContextVar("crossmae_precast", default=None)


def _eligible(m: nn.Linear, device: torch.device) -> bool:
    if hooked(m):
        return False
    for t in (m._parameters.get("weight"), m._parameters.get("bias")):
        if t is None:
            continue
        if type(t) is not nn.Parameter and type(t) is not Tensor:
            return False  # tensor subclasses (sharded, quantized) keep their own casts
        if t.dtype != torch.float32 or t.device != device:
            return False
    return m._parameters.get("weight") is not None


def _blocks(root: nn.Module, device: torch.device) -> list[list[nn.Linear]]:
    """Eligible linears under ``root`` grouped by block: everything under one item of a
    ``ModuleList`` / ``ModuleDict`` is one block; outside any, a module's own linears are
    one (a model's heads and embeddings: each cast only if it runs). Compiled modules are
    skipped (their graphs cast inside)."""
    blocks: list[list[nn.Linear]] = []

    def visit(mod: nn.Module, blk: Optional[list[nn.Linear]]) -> None:
        if blk is None:  # outside any list item: this module's own linears are a block
            blk = []
            blocks.append(blk)
            inside = False
        else:
            inside = True
        for child in mod._modules.values():
            if child is None or getattr(child, "_compiled_call_impl", None) is not None:
                continue
            if type(child) is nn.Linear:
                if _eligible(child, device):
                    blk.append(child)
            elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                for item in child._modules.values():
                    if item is None or getattr(item, "_compiled_call_impl", None) is not None:
                        continue
                    own = blk if inside else []
                    if own is not blk:
                        blocks.append(own)
                    if type(item) is nn.Linear:
                        if _eligible(item, device):
                            own.append(item)
                    else:
                        visit(item, own)
            else:
                visit(child, blk if inside else None)

    visit(root, None)
    return [b for b in blocks if b]


def _start(root: nn.Module) -> Optional[_Casts]:
    """The casts for a forward of ``root``, or None where `precasting` does not apply."""
    if _ACTIVE.get() is not None or global_hooks():
        return None
    device: Optional[torch.device] = None
    for p in root.parameters():
        device = p.device
        break
    if device is None or not torch.is_autocast_enabled(device.type):
        return None
    dtype = torch.get_autocast_dtype(device.type)
    if dtype == torch.float32 or torch._C._are_functorch_transforms_active():
        return None
    return _Casts(_blocks(root, device), dtype)


F_ = TypeVar("F_", bound=Callable[..., Any])


def precasting(forward: F_) -> F_:
    """Decorate a module's ``forward``: within it, `linear` runs the module's eligible
    linears on casts made once per block (see the module docstring). A no-op under
    ``torch.compile``, without autocast on the parameters' device, with global module hooks,
    and inside another `precasting` forward (whose casts apply)."""

    @functools.wraps(forward)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return forward(self, *args, **kwargs)
        casts = _start(self)
        if casts is None:
            return forward(self, *args, **kwargs)
        token = _ACTIVE.set(casts)
        try:
            return forward(self, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return cast(F_, wrapper)


def weight_bias(mod: nn.Linear) -> WeightBias:
    """``mod``'s weight and bias as a GEMM should take them: the block's casts inside
    a `precasting` forward, else the parameters themselves."""
    if not torch.compiler.is_compiling():
        casts = _ACTIVE.get()
        if casts is not None:
            got = casts.get(mod)
            if got is not None:
                return got
    return mod.weight, mod.bias


def linear(mod: nn.Module, x: Tensor) -> Tensor:
    """``mod(x)``, on the block's casts when ``mod`` is an eligible linear inside a
    `precasting` forward (the same values autocast computes, fewer launches)."""
    if not torch.compiler.is_compiling():
        casts = _ACTIVE.get()
        if casts is not None:
            got = casts.get(mod)
            if got is not None:
                return F.linear(x, got[0], got[1])
    out: Tensor = mod(x)
    return out
