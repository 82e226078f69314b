"""Two-layer perceptron used inside every Transformer block.

Shapes: ``b`` batch, ``n`` tokens, ``c`` channels.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn
from torch import Tensor

from .._checks import (
    check_bool,
    check_float_tensor,
    check_int,
    check_module_dtype,
    check_probability,
)
from ._calls import call_part

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """``fc1 -> act -> drop -> fc2 -> drop``, applied to the last dimension.

    Args:
        in_features: input width.
        hidden_features: hidden width (default ``in_features``).
        out_features: output width (default ``in_features``).
        act_layer: activation constructor (called with no arguments).
        drop: dropout probability after the activation and after ``fc2`` (training only).
        bias: whether both linear layers have a bias.

    Shapes:
        ``forward(x [..., in_features]) -> [..., out_features]``; ``x`` floating point, of
        the parameters' dtype (any float dtype under autocast). The activation and dropout
        see the rows ``[r, hidden_features]``, ``r`` the product of the leading dimensions.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_bool("bias", bias)
        check_int("in_features", in_features, minimum=1)
        hidden = in_features if hidden_features is None else hidden_features
        out = in_features if out_features is None else out_features
        check_int("hidden_features", hidden, minimum=1)
        check_int("out_features", out, minimum=1)
        check_probability("drop", drop)
        self.fc1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = act_layer()
        self.drop1: nn.Module = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, out, bias=bias)
        self.drop2: nn.Module = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``fc1 -> act -> drop -> fc2 -> drop`` on the last dimension.

        Args:
            x: ``[..., in_features]``, floating point, of the parameters' dtype (any float
                dtype under autocast).

        Returns:
            ``[..., out_features]``.
        """
        x = check_float_tensor("x", x)
        if x.ndim == 0 or x.shape[-1] != self.fc1.in_features:
            raise ValueError(
                f"x must have shape [..., {self.fc1.in_features}] (in_features="
                f"{self.fc1.in_features}), got {tuple(x.shape)}"
            )
        check_module_dtype("x", x, self.fc1.weight.dtype, "the module")
        # Rows [r, c]: a linear over more dimensions views its input to two and back, which
        # costs host time on every call (eager steps are bound by the host), twice per
        # linear in the backward too. One view in, one out.
        rows = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
        h = call_part(self.drop1, self.act(self.fc1(rows)))
        out = call_part(self.drop2, self.fc2(h))
        return out if x.ndim == 2 else out.view(*x.shape[:-1], out.shape[-1])
