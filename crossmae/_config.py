"""Process-wide switches (read once, at module construction)."""

from __future__ import annotations

import os

__all__ = ["set_fused_attn", "use_fused_attn"]

_FUSED_ATTN: bool = os.environ.get("CROSSMAE_FUSED_ATTN", "1") not in ("0", "false", "False")


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
