"""Where the GPU waits for the host: idle gaps of a profiled step, by launch site.

A step whose GPU-busy share is below 100% leaves the device idle between kernels. Every
such gap ends when the host launches the next kernel, so the Python frames around that
launch say which code the host was busy in while the device waited. `analyze_gaps` reads a
Chrome trace written by ``torch.profiler`` (``prof.export_chrome_trace``, recorded with
``with_stack=True`` for Python frames) and sums the idle time per launch site::

    python benchmarks/profile_step.py image-mae --gaps          # prints the gap table

Rows are labelled by the innermost frames of the launching thread whose file matches
``frames`` (crossmae, the reference code, the benchmarks by default); a launch from a
thread without such frames (autograd's backward thread, the optimizer's kernels) is
labelled by the innermost CPU op around it (``backward: aten::mm``).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
DEFAULT_FRAMES = r"crossmae/|models_cross|models_mae|transformer_utils|timm/|benchmarks/"


@dataclass(frozen=True)
class GapRow:
    """Idle device time ended by launches from one site.

    Fields:
        site: launch site label (innermost matching Python frames, or the CPU op).
        gaps: how many gaps it ended.
        idle_us: their total length, microseconds.
    """

    site: str
    gaps: int
    idle_us: float


@dataclass(frozen=True)
class GapReport:
    """`analyze_gaps`' result.

    Fields:
        window_us: first device event's start to the last one's end.
        busy_us: union of device event intervals inside the window.
        idle_us: ``window_us - busy_us``.
        counted_us: idle time in gaps of at least ``min_gap_us`` (what ``rows`` split).
        rows: per launch site, largest ``idle_us`` first.
    """

    window_us: float
    busy_us: float
    idle_us: float
    counted_us: float
    rows: tuple[GapRow, ...]


class _Intervals:
    """Nested events of one host thread, queried for the ones enclosing a timestamp."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        events.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        self.events = events
        self.starts = [float(e["ts"]) for e in events]
        self.ends = [s + float(e.get("dur", 0.0)) for s, e in zip(self.starts, events)]
        self.parent: list[int] = []
        stack: list[int] = []
        for i, s in enumerate(self.starts):  # events on one thread nest: a stack sweep
            while stack and self.ends[stack[-1]] <= s:
                stack.pop()
            self.parent.append(stack[-1] if stack else -1)
            stack.append(i)

    def enclosing(self, ts: float) -> list[dict[str, Any]]:
        """Events with ``start <= ts < end``, innermost first."""
        i = bisect.bisect_right(self.starts, ts) - 1
        while i >= 0 and self.ends[i] <= ts:
            i = self.parent[i]
        out = []
        while i >= 0:
            out.append(self.events[i])
            i = self.parent[i]
        return out


def _short(name: str) -> str:
    """``/long/path/crossmae/layers/attention.py(477): forward`` -> ``layers/attention.py(477):
    forward`` (the part after the last ``crossmae/`` or ``benchmarks/``)."""
    for root in ("crossmae/", "benchmarks/"):
        if root in name:
            return name.rsplit(root, 1)[-1]
    return name.rsplit("/", 1)[-1]


def analyze_gaps(
    trace: dict[str, Any],
    *,
    min_gap_us: float = 5.0,
    frames: str = DEFAULT_FRAMES,
    depth: int = 2,
) -> GapReport:
    """Device idle time of a Chrome trace, split by the launch site that ended each gap.

    Args:
        trace: the parsed JSON of ``torch.profiler``'s ``export_chrome_trace``.
        min_gap_us: gaps shorter than this are idle time but not attributed (launch
            latency between back-to-back kernels).
        frames: regular expression; Python frames whose name matches it label a site.
        depth: how many matching frames (innermost first) make a label.

    Returns:
        A `GapReport` (all zero if the trace holds no device events).

    Raises:
        ValueError: ``trace`` has no ``traceEvents`` list, or ``min_gap_us < 0``, or
            ``depth < 1``.
    """
    events = trace.get("traceEvents") if isinstance(trace, dict) else None
    if not isinstance(events, list):
        raise ValueError("trace must be a Chrome trace dict with a 'traceEvents' list")
    if not min_gap_us >= 0:
        raise ValueError(f"min_gap_us must be >= 0, got {min_gap_us!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth!r}")
    pattern = re.compile(frames)
    device, launches = [], {}
    py: dict[Any, list[dict[str, Any]]] = {}
    ops: dict[Any, list[dict[str, Any]]] = {}
    for e in events:
        if not isinstance(e, dict) or e.get("ph") != "X" or "ts" not in e:
            continue
        cat = e.get("cat", "")
        if cat in DEVICE_CATS:
            device.append(e)
        elif cat in LAUNCH_CATS:
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = e
        elif cat == "python_function":
            py.setdefault((e.get("pid"), e.get("tid")), []).append(e)
        elif cat == "cpu_op":
            ops.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    if not device:
        return GapReport(0.0, 0.0, 0.0, 0.0, ())
    py_idx = {k: _Intervals(v) for k, v in py.items()}
    op_idx = {k: _Intervals(v) for k, v in ops.items()}
    device.sort(key=lambda e: float(e["ts"]))
    start = float(device[0]["ts"])
    busy_until = start + float(device[0].get("dur", 0.0))
    busy = busy_until - start
    idle = counted = 0.0
    sites: dict[str, list[float]] = {}
    for e in device[1:]:
        ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
        if ts > busy_until:
            gap = ts - busy_until
            idle += gap
            if gap >= min_gap_us:
                counted += gap
                label = _site(e, launches, py_idx, op_idx, pattern, depth)
                acc = sites.setdefault(label, [0.0, 0.0])
                acc[0] += 1
                acc[1] += gap
            busy += dur
            busy_until = ts + dur
        elif ts + dur > busy_until:
            busy += ts + dur - busy_until
            busy_until = ts + dur
    rows = tuple(
        GapRow(site, int(n), us)
        for site, (n, us) in sorted(sites.items(), key=lambda kv: -kv[1][1])
    )
    return GapReport(busy_until - start, busy, idle, counted, rows)


def _site(
    kernel: dict[str, Any],
    launches: dict[Any, dict[str, Any]],
    py_idx: dict[Any, _Intervals],
    op_idx: dict[Any, _Intervals],
    pattern: re.Pattern[str],
    depth: int,
) -> str:
    corr = (kernel.get("args") or {}).get("correlation")
    launch = launches.get(corr)
    if launch is None:
        return "(launch not in trace)"
    key, ts = (launch.get("pid"), launch.get("tid")), float(launch["ts"])
    if key in py_idx:
        names = [f["name"] for f in py_idx[key].enclosing(ts) if pattern.search(f["name"])]
        if names:
            return " < ".join(_short(n) for n in names[:depth])
    op = op_idx[key].enclosing(ts) if key in op_idx else []
    where = "host" if key in py_idx else "backward/optimizer"
    return f"{where}: {op[0]['name']}" if op else f"{where}: {launch.get('name', '?')}"


def gap_table(report: GapReport, steps: int, rows: int = 15) -> str:
    """Markdown: idle share and the top ``rows`` launch sites, per step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    share = report.idle_us / report.window_us if report.window_us > 0 else 0.0
    lines = [
        f"device idle {report.idle_us / 1e3 / steps:.2f} ms per step ({share:.0%} of the "
        f"profiled window); {report.counted_us / 1e3 / steps:.2f} ms in gaps attributed below",
        "",
        "| launch site ending the gap | gaps / step | idle ms / step |",
        "| --- | ---: | ---: |",
    ]
    for r in report.rows[:rows]:
        site = r.site.replace("|", "/")
        site = site if len(site) <= 110 else site[:107] + "..."
        lines.append(f"| `{site}` | {r.gaps / steps:.1f} | {r.idle_us / 1e3 / steps:.3f} |")
    return "\n".join(lines) + "\n"


def load_trace(path: str) -> dict[str, Any]:
    """Read a Chrome trace file."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a Chrome trace (top level is {type(data).__name__})")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="Chrome trace JSON from torch.profiler")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps in the trace")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--min-gap-us", type=float, default=5.0)
    args = ap.parse_args(argv)
    report = analyze_gaps(load_trace(args.trace), min_gap_us=args.min_gap_us)
    print(gap_table(report, args.steps, args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
