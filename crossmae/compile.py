"""Regional compilation: ``torch.compile`` each transformer block of a model in place.

Compiling a whole model traces it end to end: one graph, the fewest host launches, but the
compile time grows with the model (the water model, 47 blocks over five modalities, takes
about 150 s on the H200 before its first step). Compiling the *blocks* instead reuses one
compiled graph for every block of the same shape (parameters are graph inputs), so compile
time follows the number of distinct block shapes (about 25 s for the water model), and
everything between the blocks (tokenizers, masking, losses) stays eager, so data-dependent
Python there (a ``generator=``, host-side checks) costs no graph break.

Measured on the H200 (water model, half the batch without river flow, bf16, full step):
B=16 202 ms eager, 154 ms with `compile_blocks`; B=64 625 vs 508 ms
(benchmarks/RESULTS.md, 2026-12-01).
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from .encoders.postnorm import PostNormBlock
from .layers.blocks import Block, CrossAttentionBlock

__all__ = ["BLOCK_TYPES", "compile_blocks"]

#: The block classes `compile_blocks` compiles by default.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block, CrossAttentionBlock, PostNormBlock)


def compile_blocks(
    model: nn.Module,
    *,
    types: Optional[tuple[type[nn.Module], ...]] = None,
    **compile_kwargs: Any,
) -> int:
    """Compile every block of ``model`` in place with ``Module.compile(**compile_kwargs)``.

    Args:
        model: any ``nn.Module`` holding crossmae blocks (a model, an encoder, a decoder).
        types: the module classes to compile (default `BLOCK_TYPES`: `Block`,
            `CrossAttentionBlock`, `PostNormBlock`); pass your own block classes to compile
            those too. A matching module's children are not visited again.
        **compile_kwargs: passed to ``torch.compile`` (``backend=``, ``mode=``,
            ``dynamic=``, ...).

    Returns:
        How many modules were compiled. ``model``'s parameters, ``state_dict`` and
        ``.to()`` are unchanged; call ``torch._dynamo.reset()`` to drop compiled code.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``types`` is not a non-empty tuple
            of ``nn.Module`` subclasses.
        ValueError: ``model`` holds no module of ``types`` (nothing would be compiled).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if types is None:
        types = BLOCK_TYPES
    if (
        not isinstance(types, tuple)
        or not types
        or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types)
    ):
        raise TypeError(f"types must be a non-empty tuple of nn.Module subclasses, got {types!r}")
    found: list[nn.Module] = []
    _collect(model, types, found)
    if not found:
        names = ", ".join(t.__name__ for t in types)
        raise ValueError(
            f"model ({type(model).__name__}) holds no module of types ({names}): nothing to "
            "compile; pass types= with your block classes, or torch.compile the model"
        )
    for mod in found:
        mod.compile(**compile_kwargs)
    return len(found)


def _collect(mod: nn.Module, types: tuple[type[nn.Module], ...], out: list[nn.Module]) -> None:
    """Matching modules, outermost first; a match's children are not searched."""
    if isinstance(mod, types):
        out.append(mod)
        return
    for child in mod.children():
        _collect(child, types, out)
