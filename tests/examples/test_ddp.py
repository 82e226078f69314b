"""examples/ddp_pretrain.py under torchrun: 2 CPU processes (gloo), DDP and FSDP2.

Each run must exit 0 within its timeout, every rank must print a finite loss, and the ranks'
parameter checksums must be identical. Only loopback addresses are used.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "ddp_pretrain.py"
TIMEOUT_S = 120
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


def _launch(strategy: str) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(SCRIPT), "--strategy", strategy, "--steps", "3", "--timeout", "60",
    ]  # fmt: skip
    # A new session, so that on timeout the launcher *and* its workers can be killed.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{strategy}: no result within {TIMEOUT_S} s\n{out}")
    assert proc.returncode == 0, f"{strategy}: exit code {proc.returncode}\n{out}"
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_train_and_agree(strategy: str) -> None:
    if strategy == "fsdp" and not _has_fully_shard():
        pytest.skip(f"FSDP2 (fully_shard) needs torch >= 2.6, found {torch.__version__}")
    out = _launch(strategy)
    found = {int(r): (float(loss), checksum) for r, loss, checksum in LINE.findall(out)}
    assert sorted(found) == [0, 1], f"{strategy}: expected one line per rank\n{out}"
    for rank, (loss, _) in found.items():
        assert math.isfinite(loss), f"{strategy}: rank {rank} loss {loss}\n{out}"
    checksums = {checksum for _, checksum in found.values()}
    assert len(checksums) == 1, f"{strategy}: parameters differ across ranks: {found}\n{out}"
    assert math.isfinite(float(checksums.pop()))
