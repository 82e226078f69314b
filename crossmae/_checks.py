"""Argument checks shared by every public callable.

Every check raises ``ValueError`` or ``TypeError`` naming the argument and the offending
value, and only looks at metadata (shape, dtype, device) so it never syncs with the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

__all__: list[str] = []


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value: object, ndim: Optional[int] = None) -> Tensor:
    t = check_tensor(name, value)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_module_dtype(name: str, value: Tensor, dtype: torch.dtype, module: str) -> None:
    """Check that ``value`` has the dtype of the parameters it meets (``dtype``).

    Skipped while autocast is enabled for ``value``'s device and both dtypes are ones autocast
    casts (float32/float16/bfloat16; it never touches float64). Nothing is cast here.
    """
    if value.dtype != dtype and not (
        value.dtype in _AUTOCAST_DTYPES
        and dtype in _AUTOCAST_DTYPES
        and torch.is_autocast_enabled(value.device.type)
    ):
        raise TypeError(
            f"{name} has dtype {value.dtype} but {module} has parameters of dtype {dtype}; "
            f"cast one of them (e.g. `{name}.to({dtype})` or `module.to({value.dtype})`) or "
            "run under torch.autocast (which casts float32/float16/bfloat16, never float64)"
        )


def check_index_tensor(name: str, value: object, ndim: int = 2) -> Tensor:
    t = check_tensor(name, value)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 index tensor, got dtype {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_padding_mask(
    name: str, mask: Optional[Tensor], expected: Sequence[int], against: str
) -> Optional[Tensor]:
    """Check a ``*_padding_mask`` (bool, True = padding) against the shape it must have."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must have dtype torch.bool (True = padding), got {mask.dtype}; "
            "convert explicitly, e.g. `mask.bool()` or `lengths_to_padding_mask(lengths)`"
        )
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but {against} needs shape {tuple(expected)}"
        )
    return mask


def check_same_device(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(
            f"{name} is on device {value.device} but {ref_name} is on device {ref.device}"
        )


def check_int(name: str, value: object, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_int_pair(name: str, value: object, axes: str = "(rows, cols)") -> tuple[int, int]:
    """An int or a pair of ints, each >= 1, as a pair (``axes`` names the two in the error)."""
    if isinstance(value, int) and not isinstance(value, bool):
        v = check_int(name, value, minimum=1)
        return v, v
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (
            check_int(f"{name}[0]", value[0], minimum=1),
            check_int(f"{name}[1]", value[1], minimum=1),
        )
    raise TypeError(f"{name} must be an int or a pair of ints {axes}, got {value!r}")


def check_ratio(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    """``ValueError`` unless ``value`` is a multiple of ``by`` (e.g. a width and its heads),
    naming both arguments: the one rule behind every layer and config record that splits a
    width into heads."""
    if value % by != 0:
        raise ValueError(f"{name} ({value}) must be divisible by {by_name} ({by})")


def check_probability(name: str, value: object) -> float:
    v = check_ratio(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v


def check_bool(name: str, value: object) -> bool:
    """Refuse anything but a real ``bool`` (``"False"``, ``0``, ``None`` would read as a flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_optional_bool(name: str, value: object) -> Optional[bool]:
    """As :func:`check_bool`, but ``None`` (meaning "decide automatically") is accepted."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or None, got {value!r} ({type(value).__name__})")
    return value


def check_generator(name: str, value: object) -> Optional[torch.Generator]:
    """Refuse anything but a ``torch.Generator`` or ``None`` (e.g. a seed given as ``5``)."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None, got {value!r} ({type(value).__name__}); "
            "for a seed, pass `torch.Generator().manual_seed(seed)`"
        )
    return value
