"""examples/ddp_pretrain.py on 2 CPU processes (gloo), DDP and FSDP2.

The two ranks are started here the way ``torchrun`` starts them (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` on loopback), each in its own process
session with its output in a file: on a timeout both are killed and nothing can keep the
test waiting on a pipe. Each run must exit 0 within its timeout, every rank must print a
finite loss, and the ranks' parameter checksums must be identical.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "ddp_pretrain.py"
TIMEOUT_S = 120
WORLD = 2
_NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
LINE = re.compile(rf"rank (\d+): loss=({_NUM}) checksum=({_NUM})")

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="launcher test uses POSIX sessions"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo even on a GPU machine
    env["OMP_NUM_THREADS"] = "1"
    env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    return env


def _launch(strategy: str, tmp_path: Path) -> str:
    """Run both ranks to completion (or kill them at the timeout); their output, rank 0 first."""
    port = str(_free_port())
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    for rank in range(WORLD):
        env = _env()
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD), GROUP_RANK="0", MASTER_PORT=port,
        )  # fmt: skip
        log = tmp_path / f"{strategy}_rank{rank}.log"
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), "--strategy", strategy, "--steps", "3",
                     "--timeout", "60"],
                    cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            )  # fmt: skip
        logs.append(log)
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(
        f"--- rank {r} (exit {p.returncode})\n{log.read_text(errors='replace')}"
        for r, (p, log) in enumerate(zip(procs, logs))
    )
    if timed_out:
        pytest.fail(f"{strategy}: no result within {TIMEOUT_S} s\n{out}")
    codes = [p.returncode for p in procs]
    assert codes == [0] * WORLD, f"{strategy}: exit codes {codes}\n{out}"
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_train_and_agree(strategy: str, tmp_path: Path) -> None:
    if strategy == "fsdp" and not _has_fully_shard():
        pytest.skip(f"FSDP2 (fully_shard) needs torch >= 2.6, found {torch.__version__}")
    out = _launch(strategy, tmp_path)
    found = {int(r): (float(loss), checksum) for r, loss, checksum in LINE.findall(out)}
    assert sorted(found) == [0, 1], f"{strategy}: expected one line per rank\n{out}"
    for rank, (loss, _) in found.items():
        assert math.isfinite(loss), f"{strategy}: rank {rank} loss {loss}\n{out}"
    checksums = {checksum for _, checksum in found.values()}
    assert len(checksums) == 1, f"{strategy}: parameters differ across ranks: {found}\n{out}"
    assert math.isfinite(float(checksums.pop()))
    # the example's FSDP2 root returns only the loss: no "returned a view tensor" warning
    assert "returned a view tensor" not in out, out
