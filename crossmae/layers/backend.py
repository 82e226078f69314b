"""The attention backend: one decision per stack forward, handed to the blocks as a plan.

Legend: ``b`` batch, ``h`` heads, ``n`` query slots, ``m`` key slots, ``d`` head dim,
``t`` packed rows. Mask polarity: ``*_padding_mask`` True = padding.

Every attention call of crossmae runs one of these kernels (`AttentionPlan.kernel`):

* ``"sdpa"``: ``F.scaled_dot_product_attention`` without a mask (no padding; flash/cuDNN);
* ``"sdpa_mask"``: SDPA with a boolean ``[b, 1, 1, m]`` key mask (padding; never dense);
* ``"varlen"``: ``torch.nn.attention.varlen`` over packed segments (CUDA, half precision);
  it needs padding at the end of every row, so a stack planned for it reorders its tokens
  once (`AttentionPlan.reorder`) and tells its blocks (`AttentionPlan.trailing`). With
  `AttentionPlan.segmented` the packed segments run crossmae's own Triton kernels
  (`_segmented`: head dims 16 to 128, written for the small ones flash pads) instead of
  torch's flash kernel; the kernel table picks them per head dim (``kernel="segmented"``);
* ``"flex"``: ``flex_attention`` with a block-sparse mask built from the padding (CUDA);
* ``"dense"``: packed rows only, where neither packed kernel serves (off-CUDA): every
  segment attends through a zero-padded ``[segments, longest]`` layout with SDPA and a key
  mask (no ``[t, t]`` mask; rows of different segments never meet);
* ``"short"``: unpadded calls whose keys fit one tile (``m <= 128``; CUDA, half precision,
  no dropout, head dim 16/32/64/128): crossmae's own Triton kernel (`_short`), one program
  per query block forward and per ``(b, h)`` backward, where the fused SDPA kernels spend
  most of their time on setup at such lengths; the plan's ``sdpa_backends`` serve any call
  it cannot take;
* ``"manual"``: the explicit softmax path (``fused_attn=False``; float64 gradcheck).

`decide` is the pure policy (device type, dtype, head dim, padding, layout, dropout and the
kernel table, all plain values, so it is tested on any machine); `plan_for` reads those
values from a tensor once per stack forward (the dtype under autocast is the autocast
dtype: that is what the attention kernels see). The process-wide kernel choice
(`set_padded_attention_kernel`) and the per-shape table (`set_kernel_table`) are read
there, at each forward. Kernels are imported on first use, never at ``import crossmae``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Optional, cast

import torch
from torch import Tensor

from .._config import padded_attention_kernel, use_fused_attn
from . import _flex, _segmented, _short, _varlen

__all__ = [
    "DEFAULT_KERNEL_TABLE",
    "SDPA_BACKENDS",
    "AttentionPlan",
    "KernelRule",
    "decide",
    "kernel_table",
    "plan_for",
    "sdpa_context",
    "set_kernel_table",
]

PLAN_KERNELS = ("sdpa", "sdpa_mask", "varlen", "flex", "dense", "short", "manual")
#: Kernels a `KernelRule` may name: the padded ones (``"segmented"``: ``"varlen"`` on
#: crossmae's segmented Triton kernels), and ``"short"`` for unpadded calls.
RULE_KERNELS = ("varlen", "segmented", "flex", "sdpa_mask", "short")
#: Rule kernels with an eager choice (`KernelRule.eager`): crossmae's Triton kernels.
_TRITON_RULE_KERNELS = ("short", "segmented")
#: SDPA backends a `KernelRule` may list for unmasked calls (names of
#: ``torch.nn.attention.SDPBackend``, lower case).
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
_LAYOUTS = ("padded", "packed")
_HALF = (torch.float16, torch.bfloat16)
# sdpa_kernel(..., set_priority=True) exists from torch 2.6 (read once: traceable constant)
_SDPA_PRIORITY = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)


@dataclass(frozen=True)
class AttentionPlan:
    """How a stack's attention runs (see the module docs for the kernel names).

    Fields:
        kernel: one of ``"sdpa"``, ``"sdpa_mask"``, ``"varlen"``, ``"flex"``, ``"dense"``,
            ``"short"``, ``"manual"``.
        reorder: the stack should move padding to the end of every row once before its
            blocks (only for ``"varlen"`` over a padded layout).
        trailing: padding is known to be at the end of every row (set by the stack after it
            reordered, via `reordered`); the blocks then skip their own reordering copy.
        sdpa_backends: for ``"sdpa"`` / ``"sdpa_mask"``, the SDPA backends to restrict the
            call to, in order (from the kernel table), or None for PyTorch's own choice;
            for ``"short"``, those of a call the short kernel cannot take.
        eager: for ``"short"`` and a ``segmented`` plan, whether calls outside
            ``torch.compile`` run crossmae's Triton kernel too (False: only calls traced by
            ``torch.compile`` do; eager calls run ``sdpa_backends``, or torch's flash
            varlen kernel).
        segmented: for ``"varlen"``, run the packed segments on crossmae's segmented
            Triton kernels (`_segmented`) instead of torch's ``varlen_attn``; a call they
            cannot take (see ``_segmented.fits``) still runs ``varlen_attn``.
        self_segments: ``(padding_mask, cu_seqlens)`` set by `order_for` after reordering:
            the packed kernel's segment boundaries for self-attention over exactly that
            (trailing) ``padding_mask`` tensor, computed once per stack forward instead of
            once per block. A block uses them only when it is given that same mask object;
            any other call computes its own. Not compared, not shown.
    """

    kernel: str
    reorder: bool = False
    trailing: bool = False
    sdpa_backends: Optional[tuple[str, ...]] = None
    self_segments: Optional[tuple[Tensor, Tensor]] = field(default=None, compare=False, repr=False)
    eager: bool = True
    segmented: bool = False

    def __post_init__(self) -> None:
        # Plain-value checks (no tensor): free, and traceable by torch.compile.
        if not isinstance(self.kernel, str) or self.kernel not in PLAN_KERNELS:
            raise ValueError(
                f"AttentionPlan kernel must be one of {PLAN_KERNELS}, got {self.kernel!r}"
            )
        for name in ("reorder", "trailing", "eager", "segmented"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"AttentionPlan {name} must be a bool, got {v!r}")
        if self.segmented and self.kernel != "varlen":
            raise ValueError(
                "AttentionPlan segmented=True applies to kernel='varlen' only, got "
                f"kernel={self.kernel!r}"
            )
        b = self.sdpa_backends
        if b is not None and (not isinstance(b, tuple) or not all(x in SDPA_BACKENDS for x in b)):
            raise ValueError(
                f"AttentionPlan sdpa_backends must be None or a tuple of {SDPA_BACKENDS}, got {b!r}"
            )
        seg = self.self_segments
        if seg is not None and not (
            isinstance(seg, tuple) and len(seg) == 2 and all(isinstance(t, Tensor) for t in seg)
        ):
            raise TypeError(
                "AttentionPlan self_segments must be None or a (padding_mask, cu_seqlens) pair "
                f"of tensors, got {type(seg).__name__}"
            )

    def reordered(self, padding_mask: Optional[Tensor] = None) -> AttentionPlan:
        """This plan after the stack moved padding to the end of every row; with the
        reordered ``padding_mask``, the packed kernel's self-attention segments over it are
        computed here, once, for every block (`self_segments`)."""
        segments = None
        if padding_mask is not None and self.kernel == "varlen":
            segments = (padding_mask, _varlen.self_segments(padding_mask))
        return replace(self, reorder=False, trailing=True, self_segments=segments)


@dataclass(frozen=True)
class KernelRule:
    """One row of the per-shape kernel table (`set_kernel_table`); None matches anything.

    Fields:
        kernel: for padded calls, ``"varlen"``, ``"segmented"`` (the packed path on
            crossmae's segmented Triton kernels: a ``"varlen"`` plan with ``segmented``;
            it also serves packed-layout calls, which have no key count, so only rules
            without a key range match them), ``"flex"`` or ``"sdpa_mask"``; for unpadded
            ones, ``"short"`` (crossmae's Triton kernel for at most 128 keys). Used where
            the kernel can serve the call, else the default policy (and ``sdpa_backends``)
            applies; None keeps the default policy.
        head_dim: match calls of this head dim ``d``.
        min_keys: match calls with at least this many key slots ``m``.
        max_keys: match calls with at most this many key slots ``m``.
        padded: match only padded (True) or only unpadded (False) calls.
        sdpa_backends: the SDPA backends to use, in order (from `SDPA_BACKENDS`), e.g.
            ``("cudnn", "flash")``: for unpadded calls, and for padded ones with
            ``kernel="sdpa_mask"``.
        eager: with ``kernel="short"`` or ``"segmented"``, whether eager calls run
            crossmae's Triton kernel too (default True). False keeps it to calls traced by
            ``torch.compile``, where its launches cost nothing on the host per step
            (compiled code, CUDA graphs); eager calls then run ``sdpa_backends`` (short) or
            torch's flash varlen kernel (segmented). A Triton launch from Python costs more
            host time than an SDPA call, which an eager step bound by the host pays in full.
    """

    kernel: Optional[str] = None
    head_dim: Optional[int] = None
    min_keys: Optional[int] = None
    max_keys: Optional[int] = None
    padded: Optional[bool] = None
    sdpa_backends: Optional[tuple[str, ...]] = None
    eager: bool = True

    def __post_init__(self) -> None:
        if self.kernel is not None and self.kernel not in RULE_KERNELS:
            raise ValueError(
                f"KernelRule kernel must be one of {RULE_KERNELS} or None, got {self.kernel!r}"
            )
        if self.kernel == "short" and self.padded is True:
            raise ValueError(
                "KernelRule kernel='short' serves unpadded calls only; got padded=True"
            )
        if self.kernel == "segmented" and self.padded is False:
            raise ValueError(
                "KernelRule kernel='segmented' serves padded and packed calls only; got "
                "padded=False"
            )
        for name in ("head_dim", "min_keys", "max_keys"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"KernelRule {name} must be an int >= 1 or None, got {v!r}")
        if self.min_keys is not None and self.max_keys is not None:
            if self.min_keys > self.max_keys:
                raise ValueError(
                    f"KernelRule min_keys={self.min_keys} exceeds max_keys={self.max_keys}: "
                    "the rule could never match"
                )
        if self.padded is not None and not isinstance(self.padded, bool):
            raise TypeError(f"KernelRule padded must be a bool or None, got {self.padded!r}")
        if not isinstance(self.eager, bool):
            raise TypeError(f"KernelRule eager must be a bool, got {self.eager!r}")
        if not self.eager and self.kernel not in _TRITON_RULE_KERNELS:
            raise ValueError(
                f"KernelRule eager=False applies to kernel {_TRITON_RULE_KERNELS} only, got "
                f"kernel={self.kernel!r}"
            )
        if self.sdpa_backends is not None:
            if isinstance(self.sdpa_backends, str) or not all(
                b in SDPA_BACKENDS for b in self.sdpa_backends
            ):
                raise ValueError(
                    f"KernelRule sdpa_backends must be a tuple of {SDPA_BACKENDS}, got "
                    f"{self.sdpa_backends!r}"
                )
            object.__setattr__(self, "sdpa_backends", tuple(self.sdpa_backends))

    def matches(self, head_dim: int, keys: Optional[int], padded: bool) -> bool:
        """Whether this rule applies to a call (``keys`` None: unknown, range rules skip)."""
        if self.head_dim is not None and head_dim != self.head_dim:
            return False
        if self.padded is not None and padded != self.padded:
            return False
        if self.min_keys is not None and (keys is None or keys < self.min_keys):
            return False
        return not (self.max_keys is not None and (keys is None or keys > self.max_keys))


DEFAULT_KERNEL_TABLE: tuple[KernelRule, ...] = (
    KernelRule(
        kernel="short",
        head_dim=32,
        max_keys=64,
        padded=False,
        sdpa_backends=("efficient", "flash", "cudnn"),
        eager=False,
    ),
    KernelRule(
        head_dim=32,
        min_keys=65,
        max_keys=256,
        padded=False,
        sdpa_backends=("cudnn", "flash", "efficient"),
    ),
    KernelRule(
        kernel="short",
        head_dim=64,
        max_keys=64,
        padded=False,
        sdpa_backends=("efficient", "flash", "cudnn"),
        eager=False,
    ),
    KernelRule(kernel="segmented", head_dim=16, padded=True),
    KernelRule(kernel="segmented", head_dim=32, padded=True),
)
"""The kernel table crossmae starts with (``set_kernel_table(None)`` restores it). Three
rules for unpadded attention and two for padded and packed attention, measured on the
H200 (benchmarks/RESULTS.md; fwd+bwd in isolation, bf16, b=256 for the image shapes):

- Head dim 32 over at most 64 keys: crossmae's short-key Triton kernel (`_short`), else
  the memory-efficient SDPA kernel first. This is the CrossMAE decoder's cross-attention
  (49 or 147 queries x 50 keys, 16 heads). GPU time per call, 2026-12-03: 0.47 / 0.56 ms
  against memory-efficient 0.57 / 0.85, cuDNN 0.62 / 0.84 and flash 0.74 / 1.05. Among
  SDPA's kernels the memory-efficient one won at 49 queries and tied cuDNN at 147
  (sessions 7 to 9).
- Head dim 32 over 65 to 256 keys: cuDNN first. This is the MAE decoder's self-attention
  (197 x 197): cuDNN 1.25 ms, flash 1.53, memory-efficient 2.89. The efficient kernel
  that wins at 50 keys takes twice flash's time here, so the first rule stops at 64 keys.
- Head dim 64 over at most 64 keys: the short kernel, else memory-efficient first. This is
  the ViT-B encoder over its visible tokens (50 x 50, 12 heads): 0.33 ms against 0.38
  (memory-efficient), 0.42 (cuDNN), 0.62 (flash). (It stops at 64 keys: longer sequences
  were not measured at this head dim.)

The short kernel needs ``triton`` and takes no mask and no dropout; every other call of
those shapes runs the rule's SDPA backends. With both short rules the predict 0.75 image
step with CUDA graphs went from 37.1-37.8 to 35.9 ms, and captured whole (`capture_step`)
to 33.9 ms. Both short rules are compiled-only (``eager=False``): in eager mode each call
pays Triton's Python launch, and the eager image steps lost to it (2026-12-03, against
the reference: predict 0.25 1.47x -> 1.20x, MAE decoder 1.21x -> 1.11x), so eager calls of
those shapes run the memory-efficient SDPA kernel. A rule with ``eager=True`` (the
field's default) sends eager calls to the short kernel too.

- Padded or packed attention at head dims 16 and 32: the packed path on crossmae's
  segmented Triton kernels (`_segmented`) instead of torch's flash varlen kernel, which
  runs head dim 16 padded to 32. These are the multimodal water model's attention calls
  (encoders and fusion at 32, decoders at 16). Fwd+bwd at its shapes (b=8, h=8,
  2026-12-03): the decoders' cross-attention (1110 x 7892, d=16) 2.23 ms on both, the
  five decoders in one call 4.86 against 6.41 ms; the fusion self-attention (7892 tokens,
  d=32) 7.97 against 8.49 ms. The whole water step at B=16 compiled and captured: 99.9
  against 118.1 ms. Eager calls run them too (``eager=True``): unlike the short kernel's
  many tiny calls, these are few and long, and the eager water step at B=8 took 90.3
  against 91.1 ms (108.2 against 110.7 in a noisier pair).

Everything else: PyTorch's SDPA choice and the policy of `decide`. The rules apply on every
CUDA device; each lists all three fused backends, so a GPU without one still runs a valid
kernel, but its fastest one may differ from the H200's: the benchmark section
``smallhead`` prints the rules its measurements support on the GPU at hand.
"""
_TABLE: tuple[KernelRule, ...] = DEFAULT_KERNEL_TABLE


def set_kernel_table(rules: Optional[Sequence[KernelRule]]) -> None:
    """Replace the per-shape kernel table, process-wide (read at every stack forward).

    The first rule that matches a call decides (``kernel`` for padded calls,
    ``sdpa_backends`` for unpadded ones). ``None`` restores `DEFAULT_KERNEL_TABLE`; ``()``
    leaves no rule (PyTorch's SDPA choice and the default policy for every call).

    Raises:
        TypeError: ``rules`` is not None nor a sequence of `KernelRule`.
    """
    global _TABLE
    if rules is None:
        _TABLE = DEFAULT_KERNEL_TABLE
        return
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(
            f"rules must be None or a sequence of KernelRule, got {type(rules).__name__}"
        )
    for r in rules:
        if not isinstance(r, KernelRule):
            raise TypeError(f"rules must hold KernelRule objects, got {type(r).__name__}")
    _TABLE = tuple(rules)


def kernel_table() -> tuple[KernelRule, ...]:
    """The current per-shape kernel table (see `set_kernel_table`)."""
    return _TABLE


def _lookup(head_dim: int, keys: Optional[int], padded: bool) -> Optional[KernelRule]:
    for rule in _TABLE:
        if rule.matches(head_dim, keys, padded):
            return rule
    return None


def decide(
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    *,
    padded: bool,
    layout: str = "padded",
    dropout_p: float = 0.0,
    fused: bool = True,
    keys: Optional[int] = None,
    choice: Optional[str] = None,
    varlen_ok: Optional[bool] = None,
    flex_ok: Optional[bool] = None,
    short_ok: Optional[bool] = None,
    segmented_ok: Optional[bool] = None,
) -> AttentionPlan:
    """The attention policy, from plain values (no tensor needed).

    Args:
        device_type: ``"cuda"``, ``"cpu"``, ...
        dtype: the dtype the attention kernel sees (the autocast dtype under autocast).
        head_dim: ``d``.
        padded: whether the keys carry padding (ignored for ``layout="packed"``).
        layout: ``"padded"`` (``[b, h, n, d]`` with a key padding mask) or ``"packed"``
            (``[t, h, d]`` rows in segments, see `pack_tokens`).
        dropout_p: attention dropout of the call (the packed kernels take none).
        fused: False selects the explicit softmax path.
        keys: key slots ``m`` (for range rules of the kernel table), or None.
        choice: the kernel choice (default: `padded_attention_kernel`).
        varlen_ok / flex_ok / short_ok / segmented_ok: whether those kernels can serve
            the call (default: asked of ``_varlen.supports`` / ``_flex.supports`` /
            ``_short.supports`` / ``_segmented.supports``).

    Returns:
        The `AttentionPlan`. On CUDA in float32 the padded layout gets ``"sdpa_mask"``
        (no reordering); the packed layout gets ``"varlen"`` where it serves, else
        ``"dense"`` (segment-padded, never a ``[t, t]`` mask, never ``"flex"``: see the
        comment in the code).
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if not fused:
        return AttentionPlan("manual")
    if choice is None:
        choice = padded_attention_kernel()
    if varlen_ok is None:
        varlen_ok = _varlen.supports(device_type, dtype, head_dim, dropout_p)
    if flex_ok is None:
        flex_ok = _flex.supports(device_type, dtype, head_dim, dropout_p)
    if layout == "packed":
        # Never flex here: its partial blocks weigh other segments' rows by an exact 0, and
        # 0 * NaN is NaN, so a NaN in one sample's real token reached every sample sharing a
        # 128-row block (measured on the H200, float32). The segment-padded path keeps
        # segments apart.
        if choice in ("auto", "varlen") and varlen_ok:
            rule = _lookup(head_dim, None, True) if device_type == "cuda" else None
            eager = _segmented_eager(
                rule, choice, segmented_ok, (device_type, dtype, head_dim, dropout_p)
            )
            if eager is not None:
                return AttentionPlan("varlen", segmented=True, eager=eager)
            return AttentionPlan("varlen")
        return AttentionPlan("dense")
    if not padded:
        rule = _lookup(head_dim, keys, False) if device_type == "cuda" else None
        backends = rule.sdpa_backends if rule else None
        if rule is not None and rule.kernel == "short":
            if short_ok is None:
                short_ok = _short.supports(device_type, dtype, head_dim, keys, dropout_p)
            if short_ok:
                return AttentionPlan("short", sdpa_backends=backends, eager=rule.eager)
        return AttentionPlan("sdpa", sdpa_backends=backends)
    rule = _lookup(head_dim, keys, True) if device_type == "cuda" else None
    if rule is not None and rule.kernel is not None and choice == "auto":
        # ("short" takes no mask: a rule naming it leaves padded calls to the policy)
        eager = _segmented_eager(
            rule, choice, segmented_ok, (device_type, dtype, head_dim, dropout_p)
        )
        if eager is not None and varlen_ok:
            return AttentionPlan("varlen", reorder=True, segmented=True, eager=eager)
        ok = {"varlen": varlen_ok, "flex": flex_ok, "sdpa_mask": True}.get(rule.kernel, False)
        if ok:
            backends = rule.sdpa_backends if rule.kernel == "sdpa_mask" else None
            return AttentionPlan(
                rule.kernel, reorder=rule.kernel == "varlen", sdpa_backends=backends
            )
    if choice in ("auto", "varlen") and varlen_ok:
        return AttentionPlan("varlen", reorder=True)
    half = dtype in _HALF
    if (choice == "flex" or (choice == "auto" and half)) and flex_ok:
        return AttentionPlan("flex")
    return AttentionPlan("sdpa_mask")


def _segmented_eager(
    rule: Optional[KernelRule],
    choice: str,
    segmented_ok: Optional[bool],
    call: tuple[str, torch.dtype, int, float],
) -> Optional[bool]:
    """The ``eager`` choice of a segmented plan where ``rule`` names the segmented kernels
    and they can serve the ``(device_type, dtype, head_dim, dropout_p)`` call under the
    ``"auto"`` choice (``segmented_ok`` None: asked of ``_segmented.supports``); else None."""
    if rule is None or rule.kernel != "segmented" or choice != "auto":
        return None
    ok = _segmented.supports(*call) if segmented_ok is None else segmented_ok
    return rule.eager if ok else None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention kernels see for activations ``x``: the autocast dtype while
    autocast is on for ``x``'s device (and ``x`` is floating point), else ``x.dtype``."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def plan_for(
    x: Tensor,
    head_dim: int,
    *,
    padding_mask: Optional[Tensor] = None,
    layout: str = "padded",
    dropout_p: float = 0.0,
    fused: Optional[bool] = None,
    keys: Optional[int] = None,
) -> AttentionPlan:
    """`decide` for the activations ``x`` of a stack (metadata only, no sync).

    Args:
        x: the stack's input (its device and compute dtype are read).
        head_dim: ``d`` of the stack's attention.
        padding_mask: the key padding mask (True = padding) or None.
        layout: ``"padded"`` or ``"packed"``.
        dropout_p: attention dropout while training (0 in eval).
        fused: see `set_fused_attn` (default: the process-wide switch).
        keys: key slots ``m`` (default: ``x.shape[-2]`` for the padded layout).
    """
    if keys is None and layout == "padded" and x.ndim >= 2:
        keys = x.shape[-2]
    return decide(
        x.device.type,
        compute_dtype(x),
        head_dim,
        padded=padding_mask is not None,
        layout=layout,
        dropout_p=dropout_p,
        fused=use_fused_attn() if fused is None else fused,
        keys=keys,
    )


def packed_kernel(plan: Optional[AttentionPlan]) -> Optional[_varlen.VarlenFn]:
    """The packed kernel a ``"varlen"`` plan's calls run: crossmae's segmented Triton
    kernels (`_segmented.varlen_fn`) for a ``segmented`` plan (eager calls only with
    ``plan.eager``), else None (torch's ``varlen_attn``). Plain values: free to trace."""
    if plan is None or not plan.segmented:
        return None
    if plan.eager or torch.compiler.is_compiling():
        return _segmented.varlen_fn
    return None


def trailing_order(x: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Move the padding of every row of ``x [b, n, ...]`` (mask ``[b, n]``, True = padding)
    to its end, stably: returns ``(x, padding_mask, perm)`` reordered, ``perm [b, n]``
    int64 (undo with `restore_order`). Attention is permutation-equivariant over keys."""
    perm = _varlen.real_first_permutation(padding_mask)
    return _varlen.take_tokens(x, perm, 1), torch.gather(padding_mask, 1, perm), perm


def real_first_permutation(padding_mask: Tensor) -> Tensor:
    """Per-row stable permutation ``[b, n]`` putting real slots (False) first."""
    return _varlen.real_first_permutation(padding_mask)


def reorder_tokens(x: Tensor, perm: Tensor, dim: int) -> Tensor:
    """``x`` reordered along token dim ``dim`` by ``perm [b, n]`` (batch at ``dim - 1``)."""
    return _varlen.take_tokens(x, perm, dim)


def order_for(
    plan: AttentionPlan, x: Tensor, padding_mask: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor], AttentionPlan, Optional[Tensor]]:
    """A stack's block inputs under its ``plan``: ``(x, padding_mask, plan, perm)``. Where
    the plan asks to reorder (the packed kernel over a padded layout), padding moves to the
    end of every row once (`trailing_order`), the plan is marked trailing and ``perm``
    undoes it (`restore_order`); otherwise everything is returned as given, ``perm`` None."""
    if padding_mask is None or not plan.reorder:
        return x, padding_mask, plan, None
    x, padding_mask, perm = trailing_order(x, padding_mask)
    return x, padding_mask, plan.reordered(padding_mask), perm


def restore_order(
    perm: Tensor, x: Tensor, features: Optional[Tensor] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """Undo `trailing_order` on ``x [b, n, c]`` and ``features [k, b, n, c]``."""
    inv = _varlen.inverse_permutation(perm)
    x = _varlen.take_tokens(x, inv, 1)
    if features is not None:
        features = _varlen.take_tokens(features, inv, 2)
    return x, features


def sdpa_context(backends: Optional[tuple[str, ...]]) -> contextlib.AbstractContextManager[Any]:
    """A context restricting SDPA to ``backends`` (names from `SDPA_BACKENDS`, in order of
    priority where torch supports it), or a no-op context for None / ``()``.

    While compiling this is ``torch.nn.attention.sdpa_kernel`` (dynamo traces it). In eager
    mode it is `_SdpaChoice`, the same switches set directly, for less host time per call."""
    if not backends:
        return contextlib.nullcontext()
    eager = not torch.compiler.is_compiling()  # (folded away while tracing: no guard)
    if eager and _FAST_SDPA is not None:
        _settle_torch_priority()
        return _SdpaChoice(backends)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    chosen = [names[b] for b in backends]
    if _SDPA_PRIORITY:
        if eager:
            _settle_torch_priority()
        return sdpa_kernel(chosen, set_priority=True)  # the context dynamo traces
    return sdpa_kernel(chosen)


class _SdpaSwitches(NamedTuple):
    """torch's own SDPA switches (``torch._C``), as ``sdpa_kernel`` sets them."""

    gets: tuple[Callable[[], bool], ...]  # each backend flag's getter
    sets: tuple[Callable[[bool], None], ...]  # ... and setter
    flag_ids: tuple[int, ...]  # each flag's backend id in the priority order
    ids: dict[str, int]  # our backend names → priority ids
    get_order: Callable[[], list[int]]
    set_order: Callable[[list[int]], None]


def _sdpa_switches() -> Optional[_SdpaSwitches]:
    """The switches, or None where this torch lacks one of them (then ``sdpa_kernel``
    itself runs)."""
    try:
        from torch.nn.attention import SDPBackend, _backend_names

        flags = tuple(_backend_names.items())
        found = _SdpaSwitches(
            gets=tuple(getattr(torch._C, f"_get_{n}_sdp_enabled") for n, _ in flags),
            sets=tuple(getattr(torch._C, f"_set_sdp_use_{n}") for n, _ in flags),
            flag_ids=tuple(int(getattr(SDPBackend, v)) for _, v in flags),
            ids={
                name: int(getattr(SDPBackend, member))
                for name, member in (
                    ("flash", "FLASH_ATTENTION"),
                    ("cudnn", "CUDNN_ATTENTION"),
                    ("efficient", "EFFICIENT_ATTENTION"),
                    ("math", "MATH"),
                )
            },
            get_order=torch._C._get_sdp_priority_order,
            set_order=torch._C._set_sdp_priority_order,
        )
    except (ImportError, AttributeError):
        return None
    return found


# None also before torch 2.6 (no priority order): then `sdpa_kernel` runs
_FAST_SDPA = _sdpa_switches() if _SDPA_PRIORITY else None
_CHOICES: dict[tuple[str, ...], tuple[tuple[bool, ...], tuple[int, ...]]] = {}


class _SdpaChoice:
    """``sdpa_kernel(backends, set_priority=True)`` in eager mode, without its Python layers
    (about 100 µs per call on the H200's host, where an eager step is bound by the host).

    Enter: only ``backends`` enabled, first in the priority order in their order, the
    other backends after them as before. Exit: every flag and the priority order exactly
    as they were."""

    __slots__ = ("_order", "_saved", "_want")

    def __init__(self, backends: tuple[str, ...]) -> None:
        want = _CHOICES.get(backends)
        if want is None:
            sw = cast(_SdpaSwitches, _FAST_SDPA)
            ids = tuple(sw.ids[b] for b in backends)
            want = _CHOICES[backends] = (tuple(f in ids for f in sw.flag_ids), ids)
        self._want = want

    def __enter__(self) -> None:
        sw = cast(_SdpaSwitches, _FAST_SDPA)
        self._saved = [get() for get in sw.gets]
        self._order = sw.get_order()
        on, ids = self._want
        for put, flag in zip(sw.sets, on):
            put(flag)
        sw.set_order([*ids, *(p for p in self._order if p not in ids)])

    def __exit__(self, *exc: object) -> None:
        sw = cast(_SdpaSwitches, _FAST_SDPA)
        for put, flag in zip(sw.sets, self._saved):
            put(flag)
        sw.set_order(self._order)


_PRIORITY_SETTLED = False


def _settle_torch_priority(device: str = "cuda") -> None:
    """Let PyTorch choose its own SDPA priority order before a context sets one (once per
    process, eager only).

    PyTorch picks its default order lazily, at the first kernel selection of the process
    (cuDNN first on recent GPUs), and writes it over whatever order is set at that moment.
    Measured on the H200 (torch 2.11): the first SDPA call inside an efficient-first
    ``sdpa_kernel(..., set_priority=True)`` ran cuDNN. Leaving the context then restored the
    order from before that first call, so PyTorch's own cuDNN-first default was lost for
    the rest of the process, outside crossmae too. One host-side selection query on an
    empty tensor (no kernel runs) before the first context settles PyTorch's choice first.
    """
    global _PRIORITY_SETTLED
    if _PRIORITY_SETTLED:
        return
    if not torch.cuda.is_available():
        _PRIORITY_SETTLED = True  # no CUDA kernel selection to settle
        return
    if torch.cuda.is_current_stream_capturing():
        return  # not while a CUDA graph records; a later call settles it
    _PRIORITY_SETTLED = True
    probe = torch.empty(1, 1, 1, 8, device=device, dtype=torch.float16)
    try:
        torch._fused_sdp_choice(probe, probe, probe)
    except RuntimeError:  # a build without the fused kernels: nothing to settle
        pass
