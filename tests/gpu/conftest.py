"""Fixtures of the GPU selection (``python -m pytest -m gpu``, tests/gpu).

The ``kernel`` fixture runs a test once per padded-attention kernel this torch offers on
CUDA (``sdpa`` with a boolean mask, ``varlen``, ``flex``), chosen with
`crossmae.set_padded_attention_kernel`, and restores ``"auto"`` afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from gpu_helpers import DEVICE, KERNELS, kernel_available

import crossmae as cm


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each padded-attention kernel in turn (skipped where this torch lacks it)."""
    name = str(request.param)
    if not kernel_available(name):
        pytest.skip(f"no {name} kernel here (this torch on {DEVICE})")
    cm.set_padded_attention_kernel(name)
    try:
        yield name
    finally:
        cm.set_padded_attention_kernel("auto")


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    # compiled state left by one module must not leak into the next
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
