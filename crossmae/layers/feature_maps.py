"""CrossMAE's inter-block attention: learned mixes of encoder feature maps.

Legend: ``k`` encoder feature maps, ``o`` decoder layers, ``b`` batch, ``n`` tokens,
``c`` width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import check_float_tensor, check_int

__all__ = ["StackedLayerNorm", "WeightedFeatureMaps"]


class WeightedFeatureMaps(nn.Module):
    """For each of ``num_outputs`` decoder layers, a learned linear mix of encoder features.

    ``out[j] = sum_i weight[j, i] * features[i]`` with an unconstrained weight (no softmax,
    no bias), computed as one matmul over all layers. The mix is initialised to the plain
    average (``weight = 1 / num_inputs``) so every decoder layer starts from the same,
    well-scaled context.

    Args:
        num_inputs: number of encoder feature maps ``k``.
        num_outputs: number of decoder layers ``o``.

    Parameters: ``linear.weight [o, k]`` (an ``nn.Linear(k, o, bias=False)``).

    Shapes:
        ``forward(features) -> [o, b, n, c]`` where ``features`` is a sequence of ``k``
        tensors ``[b, n, c]`` or one stacked tensor ``[k, b, n, c]``. Padding is irrelevant
        here (the mix is per token); padded tokens stay padded.
    """

    def __init__(self, num_inputs: int, num_outputs: int) -> None:
        super().__init__()
        self.num_inputs = check_int("num_inputs", num_inputs, minimum=1)
        self.num_outputs = check_int("num_outputs", num_outputs, minimum=1)
        self.linear = nn.Linear(num_inputs, num_outputs, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.linear.weight, 1.0 / self.num_inputs)

    def forward(self, features: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """Mix ``k`` encoder feature maps into ``o`` decoder contexts.

        ``out[j] = sum_i weight[j, i] * features[i]``, one matmul for all ``j``.

        Args:
            features: one stacked floating tensor ``[k, b, n, c]``, or a list/tuple of ``k``
                tensors ``[b, n, c]`` of one shape. Padding is irrelevant here (the mix is per
                token): padded tokens stay padded (their values are mixed like any other).

        Returns:
            ``[o, b, n, c]`` in the features' dtype (the autocast dtype under autocast); a
            stacked tensor of any shape ``[k, ...]`` gives ``[o, ...]``.
        """
        if isinstance(features, Tensor):
            stacked = features
            if stacked.ndim < 2:
                raise ValueError(
                    f"features must be [num_inputs, b, n, c], got shape {tuple(stacked.shape)}"
                )
        elif isinstance(features, (list, tuple)):
            if len(features) != self.num_inputs:
                raise ValueError(
                    f"features has {len(features)} tensors but num_inputs={self.num_inputs}"
                )
            for i, f in enumerate(features):
                if not isinstance(f, Tensor):
                    raise TypeError(f"features[{i}] must be a Tensor, got {type(f).__name__}")
                if f.shape != features[0].shape:
                    raise ValueError(
                        f"features[{i}] has shape {tuple(f.shape)} but features[0] has "
                        f"{tuple(features[0].shape)}"
                    )
            stacked = torch.stack(tuple(features), dim=0)
        else:
            raise TypeError(
                "features must be a Tensor [k, b, n, c] or a list/tuple of [b, n, c] tensors, "
                f"got {type(features).__name__}"
            )
        if not stacked.is_floating_point():
            raise TypeError(f"features must be floating point, got dtype {stacked.dtype}")
        if stacked.shape[0] != self.num_inputs:
            raise ValueError(
                f"features has {stacked.shape[0]} maps (shape {tuple(stacked.shape)}) but "
                f"num_inputs={self.num_inputs}"
            )
        rest = stacked.shape[1:]
        # One [o, k] @ [k, b*n*c] matmul for every decoder layer at once (autocast casts
        # both operands when enabled; otherwise the weight follows the features' dtype).
        weight = self.linear.weight.to(stacked.dtype)
        out = weight @ stacked.reshape(self.num_inputs, -1)
        return out.reshape(self.num_outputs, *rest)

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}, num_outputs={self.num_outputs}"


class StackedLayerNorm(nn.Module):
    """``num`` independent LayerNorms applied to a stack ``[num, ...,  c]`` in one kernel.

    Equivalent to ``torch.stack([norm_j(x[j]) for j in range(num)])`` with separate affine
    parameters per ``j`` (CrossMAE's one norm per decoder layer), but computed as one
    ``layer_norm`` plus one fused scale-and-shift instead of ``num`` launches.

    Args:
        num: number of stacked inputs (decoder layers).
        dim: normalized width ``c``.
        eps: LayerNorm epsilon.

    Parameters: ``weight [num, c]`` (ones), ``bias [num, c]`` (zeros).

    Shapes:
        ``forward(x [num, ..., c]) -> [num, ..., c]``.
    """

    def __init__(self, num: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num = check_int("num", num, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num, dim))
        self.bias = nn.Parameter(torch.zeros(num, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x[j]`` with the ``j``-th LayerNorm, for every ``j`` at once.

        Args:
            x: ``[num, ..., c]``, floating point: one slice per stacked norm.

        Returns:
            ``[num, ..., c]``: ``layer_norm(x[j]) * weight[j] + bias[j]`` for each ``j``.
        """
        x = check_float_tensor("x", x)
        if x.ndim < 2 or x.shape[0] != self.num or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have shape [{self.num}, ..., {self.dim}], got {tuple(x.shape)}"
            )
        y = torch.nn.functional.layer_norm(x, (self.dim,), eps=self.eps)
        view = (self.num,) + (1,) * (x.ndim - 2) + (self.dim,)
        return torch.addcmul(self.bias.view(view), y, self.weight.view(view))

    def extra_repr(self) -> str:
        return f"num={self.num}, dim={self.dim}, eps={self.eps}"
