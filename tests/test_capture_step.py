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


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on a machine without CUDA: counts replays."""

    def __init__(self) -> None:
        self.replays = 0
        self.generators: list[torch.Generator] = []

    def register_generator_state(self, g: torch.Generator) -> None:
        self.generators.append(g)

    def replay(self) -> None:
        self.replays += 1


def _fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: type("S", (), {"wait_stream": _noop})())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda: type("S", (), {"wait_stream": _noop})()
    )
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())


def _noop(*_: Any) -> None:
    return None


def test_the_replay_keeps_the_step_and_what_it_holds_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CUDA graph holds raw addresses: the replay must keep the step's closure (model,
    optimizer, compiled kernels) alive, else a step built in a function that returns only
    the replay would replay into freed memory (it crashed the benchmark, session 17)."""
    import gc
    import weakref

    _fake_cuda(monkeypatch)
    calls: list[str] = []

    def build() -> tuple[Any, weakref.ref[torch.nn.Module], weakref.ref[Any]]:
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step() -> torch.Tensor:
            calls.append("step")
            loss = model(torch.ones(1, 2)).sum()
            loss.backward()
            opt.step()
            return loss.detach()

        replay, _ = cm.capture_step(step, optimizers=[opt], warmup=2)
        return replay, weakref.ref(model), weakref.ref(opt)

    replay, model_ref, opt_ref = build()
    gc.collect()
    assert calls == ["step"] * 3  # two warm-up steps, then the capture
    assert model_ref() is not None and opt_ref() is not None
    replay()
    replay()
    assert replay.graph.replays == 2 and calls == ["step"] * 3  # replays do not run step
    assert "1 optimizer(s)" in repr(replay)
    del replay
    gc.collect()
    assert model_ref() is None and opt_ref() is None  # nothing beyond the replay's life
