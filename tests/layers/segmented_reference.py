"""The float64 reference of segmented attention, shared by the interpreter test
(tests/layers/test_segmented.py) and the CUDA test (tests/gpu/test_gpu_segmented.py).

Legend: ``tq`` / ``tk`` packed query / key rows, ``h`` heads, ``d`` head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bounds(lengths: list[int]) -> Tensor:
    """int32 segment boundaries ``[0, l_0, l_0 + l_1, ...]`` of per-segment row counts."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def reference(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor) -> Tensor:
    """Softmax attention within every segment of ``q [tq, h, d]`` over ``k, v [tk, h, d]``
    (in ``q``'s dtype, differentiable); rows of a segment without keys are 0."""
    outs = []
    for i in range(len(cu_q) - 1):
        a, b, c, e = (int(x) for x in (cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]))
        if b == a:
            continue
        if e == c:
            outs.append(q[a:b] * 0)
            continue
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[c:e]) / math.sqrt(q.shape[-1])
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[c:e]))
    return torch.cat(outs)
