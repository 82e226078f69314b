"""Fixtures of the reliability audit: the outcome recorder and a one-thread torch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from reliability_helpers import Recorder


@pytest.fixture
def rec(request: pytest.FixtureRequest) -> Recorder:
    """Records ``{callable, tried, outcome, ok, test}`` rows (JSON lines appended to the file
    named by ``CROSSMAE_RELIABILITY_OUT``, when set)."""
    return Recorder(request.node.nodeid)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add synchronisation on a busy 2-core machine.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
