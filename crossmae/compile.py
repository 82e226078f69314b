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

from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.nn as nn

from .decoders import together
from .encoders.postnorm import PostNormBlock
from .layers.blocks import Block, CrossAttentionBlock

__all__ = ["BLOCK_TYPES", "capture_step", "compile_blocks"]

T = TypeVar("T")

#: The block classes `compile_blocks` compiles by default.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block, CrossAttentionBlock, PostNormBlock)


def compile_blocks(
    model: nn.Module,
    *,
    types: Optional[tuple[type[nn.Module], ...]] = None,
    **compile_kwargs: Any,
) -> int:
    """Compile every block of ``model`` in place with ``Module.compile(**compile_kwargs)``.

    A `CrossAttentionBlock` also gets its lockstep steps compiled (the parts of its forward
    before and after the attention kernel), so decoders run by `decode_together` (e.g. a
    `MultimodalMAE`'s) keep sharing one attention call per layer.

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
    steps: Optional[tuple[Callable[..., Any], Callable[..., Any]]] = None
    for mod in found:
        mod.compile(**compile_kwargs)
        if isinstance(mod, CrossAttentionBlock):
            if steps is None:  # compiled once: every block of one shape shares the graphs
                steps = (
                    torch.compile(together.before_step, **compile_kwargs),
                    torch.compile(together.after_step, **compile_kwargs),
                )
            setattr(mod, together.STEPS_ATTR, steps)
    return len(found)


def _collect(mod: nn.Module, types: tuple[type[nn.Module], ...], out: list[nn.Module]) -> None:
    """Matching modules, outermost first; a match's children are not searched."""
    if isinstance(mod, types):
        out.append(mod)
        return
    for child in mod.children():
        _collect(child, types, out)


def capture_step(
    step: Callable[[], T],
    *,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    generators: Sequence[torch.Generator] = (),
    warmup: int = 3,
) -> tuple[Callable[[], None], T]:
    """Capture a whole training step (forward, backward, optimizer) in one CUDA graph.

    The recipe of the compile how-to as one call: ``step`` runs ``warmup`` times on a side
    stream (lazy state, cuBLAS workspaces, optimizer state), then once under
    ``torch.cuda.graph``. Before every warm-up step and before the capture, each optimizer
    drops its gradients (``zero_grad(set_to_none=True)``), so the captured backward writes
    them afresh; each generator is registered with the graph, so every replay draws new
    random numbers (e.g. new masks) from it.

    ``step`` must be capturable: static shapes, no host sync (crossmae's models are, with
    masks from a device generator and static split widths), optimizers built with
    ``capturable=True`` where they have the option, autocast with ``cache_enabled=False``,
    and inputs read from tensors the caller refills in place before each replay.

    Args:
        step: the training step, called with no argument; what it returns (e.g. the loss,
            detached) is captured too and refreshed by every replay.
        optimizers: the optimizers ``step`` steps (their gradients are reset as above).
        generators: CUDA generators ``step`` draws from (registered with the graph).
        warmup: warm-up steps before the capture (an int ``>= 1``).

    Returns:
        ``(replay, output)``: ``replay()`` runs the captured step once (one launch);
        ``output`` is the captured return value of ``step``, updated in place by each replay.
        ``replay`` keeps ``step`` (and so whatever its closure holds: the model, a compiled
        model's kernels), the optimizers and the generators alive while it lives, so the
        step may be built in a function that returns only the replay; ``replay.graph`` is
        the `torch.cuda.CUDAGraph`.

    Raises:
        TypeError: ``step`` is not callable; ``optimizers`` / ``generators`` hold something
            else than optimizers / generators; ``warmup`` is not an int.
        ValueError: ``warmup < 1``; a generator not on a CUDA device; an optimizer built
            with ``capturable=False``.
        RuntimeError: CUDA is not available.
    """
    if not callable(step):
        raise TypeError(f"step must be a callable taking no argument, got {type(step).__name__}")
    if isinstance(optimizers, torch.optim.Optimizer) or not isinstance(optimizers, Sequence):
        raise TypeError(
            f"optimizers must be a sequence of torch.optim.Optimizer, got "
            f"{type(optimizers).__name__}"
        )
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizers[{i}] must be a torch.optim.Optimizer, got {type(opt).__name__}"
            )
        for group in opt.param_groups:
            if group.get("capturable", True) is False:
                raise ValueError(
                    f"optimizers[{i}] ({type(opt).__name__}) was built with capturable=False; "
                    "build it with capturable=True to step it inside a CUDA graph"
                )
    if isinstance(generators, torch.Generator) or not isinstance(generators, Sequence):
        raise TypeError(
            f"generators must be a sequence of torch.Generator, got {type(generators).__name__}"
        )
    for i, g in enumerate(generators):
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generators[{i}] must be a torch.Generator, got {type(g).__name__}")
        if g.device.type != "cuda":
            raise ValueError(
                f"generators[{i}] is on {g.device}; a CUDA graph can only register CUDA "
                "generators (torch.Generator(device='cuda'))"
            )
    if isinstance(warmup, bool) or not isinstance(warmup, int):
        raise TypeError(f"warmup must be an int, got {warmup!r}")
    if warmup < 1:
        raise ValueError(
            f"warmup must be >= 1 (lazy state must exist before capture), got {warmup}"
        )
    if not torch.cuda.is_available():
        raise RuntimeError("capture_step needs a CUDA device: torch.cuda.is_available() is False")

    if generators and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise RuntimeError(
            f"torch {torch.__version__} cannot register generators with a CUDA graph "
            "(CUDAGraph.register_generator_state); upgrade torch or draw from the default one"
        )

    def reset() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            reset()
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    reset()
    with torch.cuda.graph(graph):
        output = step()
    return _Replay(graph, step, optimizers, generators), output


class _Replay:
    """The replay `capture_step` returns: calling it replays the graph. It holds the step
    and its optimizers and generators, so what the graph reads and writes (the model's
    parameters, the optimizer state, the compiled kernels the step's closure holds) lives
    as long as the replay does: a CUDA graph keeps raw device addresses and kernel handles,
    and replaying it after they were freed crashes the process."""

    __slots__ = ("generators", "graph", "optimizers", "step")

    def __init__(
        self,
        graph: torch.cuda.CUDAGraph,
        step: Callable[[], Any],
        optimizers: Sequence[torch.optim.Optimizer],
        generators: Sequence[torch.Generator],
    ) -> None:
        self.graph = graph
        self.step = step
        self.optimizers = tuple(optimizers)
        self.generators = tuple(generators)

    def __call__(self) -> None:
        self.graph.replay()

    def __repr__(self) -> str:
        return (
            f"capture_step replay (step={getattr(self.step, '__qualname__', self.step)!r}, "
            f"{len(self.optimizers)} optimizer(s), {len(self.generators)} generator(s))"
        )
