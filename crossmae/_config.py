"""Process-wide switches: the fused-attention default and the padded-attention kernel."""

from __future__ import annotations

import os

__all__ = [
    "PADDED_ATTENTION_KERNELS",
    "padded_attention_kernel",
    "set_fused_attn",
    "set_padded_attention_kernel",
    "use_fused_attn",
]

_FUSED_ATTN: bool = os.environ.get("CROSSMAE_FUSED_ATTN", "1") not in ("0", "false", "False")

#: The names `set_padded_attention_kernel` accepts.
PADDED_ATTENTION_KERNELS = ("auto", "varlen", "flex", "sdpa")


def set_fused_attn(enable: bool = True) -> None:
    """Choose, process-wide, whether attention modules built from now on use the fused path.

    ``True`` (the default) runs attention through ``F.scaled_dot_product_attention`` (and the
    packed variable-length kernels on CUDA); ``False`` uses the explicit softmax path, which
    is useful for float64 gradcheck and for checking the fused kernels. Modules read the
    switch once, in ``__init__``; pass ``fused_attn=`` to a module to override it. The
    environment variable ``CROSSMAE_FUSED_ATTN=0`` sets the initial value.
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {enable!r}")
    global _FUSED_ATTN
    _FUSED_ATTN = enable


def use_fused_attn() -> bool:
    """Return the current process-wide fused-attention switch (see `set_fused_attn`)."""
    return _FUSED_ATTN


def _check_kernel(name: str, kernel: object) -> str:
    if not isinstance(kernel, str):
        raise TypeError(f"{name} must be a str, one of {PADDED_ATTENTION_KERNELS}; got {kernel!r}")
    if kernel not in PADDED_ATTENTION_KERNELS:
        raise ValueError(f"{name} must be one of {PADDED_ATTENTION_KERNELS}, got {kernel!r}")
    from .layers import _flex, _varlen  # here: the layers import this module

    if kernel == "varlen" and not _varlen.varlen_available():
        raise ValueError(
            f"{name}='varlen' needs torch.nn.attention.varlen (torch >= 2.10); this torch "
            "does not have it"
        )
    if kernel == "flex" and not _flex.flex_available():
        raise ValueError(
            f"{name}='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); this "
            "torch does not have it"
        )
    return kernel


def set_padded_attention_kernel(kernel: str = "auto") -> None:
    """Choose, process-wide, the kernel for fused attention over *padded* keys on CUDA.

    Applies to calls with a padding mask on the fused path (`set_fused_attn`), on CUDA:

    * ``"auto"`` (default): in half precision, packed variable-length attention
      (``torch.nn.attention.varlen``, torch >= 2.10) where it can serve the call, else
      ``flex_attention`` with a block-sparse mask built from the padding; in float32, or
      where neither applies, SDPA with a boolean mask (the memory-efficient kernel);
    * ``"varlen"`` / ``"flex"``: that kernel wherever it can serve the call, else SDPA with
      a boolean mask;
    * ``"sdpa"``: always SDPA with a boolean mask.

    On the CPU, and without padding, nothing changes: the padded path is SDPA with a
    boolean mask, the unpadded one SDPA without a mask. Read at each call (no rebuild
    needed). The environment variable ``CROSSMAE_PADDED_KERNEL`` sets the initial value.

    Raises:
        TypeError: ``kernel`` is not a str.
        ValueError: an unknown name, or a kernel this torch build lacks.
    """
    global _PADDED_KERNEL
    _PADDED_KERNEL = _check_kernel("kernel", kernel)


def padded_attention_kernel() -> str:
    """Return the current padded-attention kernel choice (see `set_padded_attention_kernel`)."""
    return _PADDED_KERNEL


_PADDED_KERNEL: str = os.environ.get("CROSSMAE_PADDED_KERNEL", "auto")
if _PADDED_KERNEL not in PADDED_ATTENTION_KERNELS:
    raise ValueError(
        f"environment variable CROSSMAE_PADDED_KERNEL must be one of "
        f"{PADDED_ATTENTION_KERNELS}, got {_PADDED_KERNEL!r}"
    )
