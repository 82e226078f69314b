"""`crossmae.capture_step`: a whole training step in one CUDA graph. Its arguments are
checked before any work (here, on any machine); the capture itself runs on the GPU
(tests/gpu/test_gpu_capture.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import crossmae as cm


def _opt(**kw: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **kw)


def _never() -> None:
    raise AssertionError("step ran although the arguments were wrong")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": 3}, TypeError, "step must be a callable"),
        ({"optimizers": _opt()}, TypeError, "optimizers must be a sequence"),
        ({"optimizers": [torch.nn.Linear(2, 2)]}, TypeError, r"optimizers\[0\] must be"),
        ({"optimizers": [_opt(capturable=False)]}, ValueError, r"optimizers\[0\].*capturable"),
        ({"generators": torch.Generator()}, TypeError, "generators must be a sequence"),
        ({"generators": [3]}, TypeError, r"generators\[0\] must be a torch.Generator"),
        ({"generators": [torch.Generator()]}, ValueError, r"generators\[0\] is on cpu"),
        ({"warmup": 2.0}, TypeError, "warmup must be an int"),
        ({"warmup": True}, TypeError, "warmup must be an int"),
        ({"warmup": 0}, ValueError, "warmup must be >= 1"),
    ],
)
def test_argument_errors_before_any_work(kwargs: dict[str, Any], error: type, match: str) -> None:
    args: dict[str, Any] = {"step": _never, **kwargs}
    with pytest.raises(error, match=match):
        cm.capture_step(args.pop("step"), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_without_cuda_a_clear_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cm.capture_step(_never, optimizers=[_opt(capturable=True)])


def test_optimizers_without_a_capturable_option_are_accepted_until_cuda() -> None:
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    expected = RuntimeError if not torch.cuda.is_available() else None
    if expected is None:
        pytest.skip("on CUDA the GPU tests capture for real")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cm.capture_step(_never, optimizers=[sgd])
