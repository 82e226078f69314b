"""Shared pytest configuration: hypothesis profiles and torch determinism.

Profiles (select with the environment variable ``HYPOTHESIS_PROFILE``):

* ``dev`` (default): few examples, fast local runs.
* ``ci``: more examples, derandomized (reproducible in CI), prints reproduction blobs.
"""

from __future__ import annotations

import os

# inductor (tests/layers/test_flex.py compiles flex_attention for the CPU) compiles in this
# process: no pool of compile workers to start, outlive a test or oversubscribe 2 cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch
from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "dev",
    max_examples=15,
    deadline=None,
    suppress_health_check=_SUPPRESS,
)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    print_blob=True,
    # CI must be reproducible: the same examples on every run (the dev profile explores).
    derandomize=True,
    suppress_health_check=_SUPPRESS,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(2)
torch.manual_seed(0)
