"""benchmarks/gaps.py: device idle time split by the launch site that ended each gap."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.test_benchmarks_perf import _load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gaps() -> ModuleType:
    return _load("_crossmae_gaps", ROOT / "benchmarks" / "gaps.py")


def _x(cat: str, name: str, ts: float, dur: float, tid: int = 1, **args: Any) -> dict[str, Any]:
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur,
            "args": args}  # fmt: skip


def _trace() -> dict[str, Any]:
    # Host thread 1: a forward in crossmae/layers/attention.py inside crossmae/layers/blocks.py
    # launches kernels 1 and 2; thread 2 (autograd, no Python frames) launches kernel 3
    # inside aten::mm. Device: k1 [100, 110), k2 [150, 160) (gap 40 after k1), k3 [160,
    # 170) back to back, overlapping memcpy [165, 168), k4 [300, 301) (gap 130).
    ev = [
        _x("python_function", "/x/crossmae/layers/blocks.py(120): forward", 0, 1000),
        _x("python_function", "/x/crossmae/layers/attention.py(477): forward", 10, 200),
        _x("python_function", "torch/nn/modules/module.py(1750): _call_impl", 11, 150),
        _x("cpu_op", "aten::linear", 20, 5),
        _x("cuda_runtime", "cudaLaunchKernel", 21, 2, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 140, 2, correlation=2),
        _x("cpu_op", "aten::mm", 150, 20, tid=2),
        _x("cuda_runtime", "cudaLaunchKernel", 155, 2, tid=2, correlation=3),
        _x("cpu_op", "aten::add", 280, 30, tid=2),
        _x("cuda_runtime", "cudaLaunchKernel", 290, 2, tid=2, correlation=4),
        _x("kernel", "k1", 100, 10, tid=7, correlation=1),
        _x("kernel", "k2", 150, 10, tid=7, correlation=2),
        _x("kernel", "k3", 160, 10, tid=7, correlation=3),
        _x("gpu_memcpy", "m", 165, 3, tid=8, correlation=99),
        _x("kernel", "k4", 300, 1, tid=7, correlation=4),
        {"ph": "i", "name": "instant", "ts": 5},
    ]
    return {"traceEvents": ev}


def test_idle_time_and_attribution(gaps: ModuleType) -> None:
    rep = gaps.analyze_gaps(_trace())
    assert rep.window_us == pytest.approx(201.0)
    assert rep.busy_us == pytest.approx(31.0)  # 10 + 10 + 10 + 1; the memcpy overlaps k3
    assert rep.idle_us == pytest.approx(170.0)
    assert rep.counted_us == pytest.approx(170.0)
    by_site = {r.site: (r.gaps, r.idle_us) for r in rep.rows}
    assert by_site == {
        "layers/attention.py(477): forward < layers/blocks.py(120): forward": (1, 40.0),
        "backward/optimizer: aten::add": (1, 130.0),
    }
    assert rep.rows[0].site == "backward/optimizer: aten::add"  # largest first
    one = gaps.analyze_gaps(_trace(), depth=1)
    assert {r.site for r in one.rows} == {
        "layers/attention.py(477): forward",
        "backward/optimizer: aten::add",
    }


def test_short_gaps_are_idle_but_not_attributed(gaps: ModuleType) -> None:
    rep = gaps.analyze_gaps(_trace(), min_gap_us=50.0)
    assert rep.idle_us == pytest.approx(170.0)
    assert rep.counted_us == pytest.approx(130.0)
    assert [r.site for r in rep.rows] == ["backward/optimizer: aten::add"]


def test_frames_filter_and_missing_launch(gaps: ModuleType) -> None:
    tr = _trace()
    rep = gaps.analyze_gaps(tr, frames=r"blocks\.py")
    assert any(r.site == "layers/blocks.py(120): forward" for r in rep.rows)
    tr["traceEvents"] = [
        e
        for e in tr["traceEvents"]
        if (e.get("args") or {}).get("correlation") != 4 or e.get("cat") == "kernel"
    ]
    rep = gaps.analyze_gaps(tr)
    assert any(r.site == "(launch not in trace)" for r in rep.rows)


def test_empty_and_bad_input(gaps: ModuleType, tmp_path: Path) -> None:
    rep = gaps.analyze_gaps({"traceEvents": []})
    assert (rep.window_us, rep.idle_us, rep.rows) == (0.0, 0.0, ())
    with pytest.raises(ValueError, match="traceEvents"):
        gaps.analyze_gaps({"events": []})
    with pytest.raises(ValueError, match="min_gap_us"):
        gaps.analyze_gaps(_trace(), min_gap_us=-1.0)
    with pytest.raises(ValueError, match="depth"):
        gaps.analyze_gaps(_trace(), depth=0)
    with pytest.raises(ValueError, match="steps"):
        gaps.gap_table(rep, 0)
    bad = tmp_path / "list.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match="not a Chrome trace"):
        gaps.load_trace(str(bad))


def test_table_and_cli(
    gaps: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = gaps.gap_table(gaps.analyze_gaps(_trace()), steps=2)
    assert "device idle 0.09 ms per step (85% of the profiled window)" in text
    assert "| `backward/optimizer: aten::add` | 0.5 | 0.065 |" in text
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace()))
    assert gaps.main([str(path), "--steps", "1"]) == 0
    assert "aten::add" in capsys.readouterr().out


def test_a_real_cpu_trace_parses(gaps: ModuleType, tmp_path: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from crossmae.layers.blocks import Block

    blk = Block(16, 2)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        blk(torch.randn(2, 4, 16)).sum().backward()
    path = tmp_path / "t.json"
    prof.export_chrome_trace(str(path))
    trace = gaps.load_trace(str(path))
    names = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "python_function"]
    assert any("crossmae/layers/blocks.py" in n for n in names)  # the frame names it matches
    assert gaps.analyze_gaps(trace).window_us == 0.0  # no device on the CPU
