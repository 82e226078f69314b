"""Calling a block's optional parts without paying for the ones that do nothing.

An eager training step is bound by the host issuing it (benchmarks/RESULTS.md), and every
``nn.Module`` call costs a few µs of Python. A block's optional parts (stochastic depth,
dropout) are ``nn.Identity`` when disabled: `call_part` returns the input itself for a
plain ``nn.Identity`` exactly when calling it would (no hook registered on it or globally),
and calls any other module. A part replaced later (``block.drop_path1 = DropPath(0.1)``)
or given a hook is called as usual.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor
from torch.nn.modules import module as _module

__all__: list[str] = []


def hooked(mod: nn.Module) -> bool:
    """Forward or backward hooks on ``mod`` (what running its steps without calling it
    would bypass)."""
    return bool(
        mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
        or mod._backward_pre_hooks
    )  # fmt: skip


def global_hooks() -> bool:
    """Module hooks registered for every module (``register_module_forward_hook`` ...)."""
    return bool(
        _module._global_forward_hooks or _module._global_forward_pre_hooks
        or _module._global_backward_hooks or _module._global_backward_pre_hooks
    )  # fmt: skip


def compiled(mod: nn.Module) -> bool:
    """Whether ``mod`` was compiled in place (``Module.compile``): running its steps
    without calling it would bypass the compiled code."""
    return getattr(mod, "_compiled_call_impl", None) is not None


def call_part(part: nn.Module, x: Tensor) -> Tensor:
    """``part(x)``; a plain ``nn.Identity`` without hooks is skipped (it returns ``x``)."""
    if type(part) is nn.Identity and not hooked(part) and not global_hooks():
        return x
    out: Tensor = part(x)
    return out
