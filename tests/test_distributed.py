"""benchmarks/distributed.py on CPU processes (gloo): data-parallel runs equal one process.

What is checked, on the tiny image and water models:
- the per-step global loss of 2 ranks (DDP or FSDP2) equals one process at the same global
  batch with the same samples and masks;
- a distributed checkpoint saved under FSDP2 on 2 ranks resumes on 1 process (FSDP2) and on
  2 ranks (DDP) with the uninterrupted run's next-step losses;
- the water model trains with ranks whose samples all miss river flow (no "unused
  parameters" error, finite losses).
Ranks are started the way ``torchrun`` starts them, each in its own process session, and
killed at the timeout, so nothing can keep the test waiting.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distributed.py"
TIMEOUT_S = 180

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="launcher uses POSIX sessions"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world: int, args: list[str], tmp_path: Path, tag: str) -> dict[str, object]:
    """Run ``world`` ranks of the script to completion; rank 0's JSON result."""
    port = str(_free_port())
    out_json = tmp_path / f"{tag}.json"
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(
            CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world), PYTHONWARNINGS="ignore",
        )  # fmt: skip
        env.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
        log = tmp_path / f"{tag}_rank{rank}.log"
        with log.open("wb") as f:
            cmd = [sys.executable, str(SCRIPT), *args, "--json", str(out_json)]
            procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            )  # fmt: skip
        logs.append(log)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = "".join(f"--- rank {r}\n{log.read_text(errors='replace')}" for r, log in enumerate(logs))
    codes = [p.returncode for p in procs]
    assert codes == [0] * world, f"{tag}: exit codes {codes}\n{text}"
    result: dict[str, object] = json.loads(out_json.read_text())
    assert result["world"] == world
    return result


def _close(a: object, b: object, rtol: float = 1e-5) -> bool:
    assert isinstance(a, list) and isinstance(b, list)
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol) for x, y in zip(a, b))


def test_image_fsdp_two_ranks_equal_one_and_checkpoint_resumes(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    ckpt = str(tmp_path / "ckpt")
    common = ["--model", "image", "--steps", "4", "--global-batch", "4", "--save-at", "2"]
    two = run_ranks(2, [*common, "--strategy", "fsdp", "--ckpt", ckpt], tmp_path, "fsdp2")
    one = run_ranks(1, [*common, "--strategy", "fsdp"], tmp_path, "fsdp1")
    assert _close(two["losses"], one["losses"]), (two["losses"], one["losses"])
    resumed_one = run_ranks(
        1, [*common, "--strategy", "fsdp", "--resume", ckpt], tmp_path, "resume1"
    )
    resumed_two = run_ranks(
        2, [*common, "--strategy", "ddp", "--resume", ckpt], tmp_path, "resume2"
    )
    tail = two["losses"][2:]  # type: ignore[index]
    assert resumed_one["first_step"] == 3
    assert _close(resumed_one["losses"], tail), (resumed_one["losses"], tail)
    assert _close(resumed_two["losses"], tail), (resumed_two["losses"], tail)


def test_water_ddp_with_ranks_missing_river_flow_equals_one_process(tmp_path: Path) -> None:
    # Global batch 2 on 2 ranks: rank 0's only sample has no river flow at all, so the
    # per-rank mean (out.loss) weights river flow differently from one process; the
    # globally normalised loss (crossmae.distributed) equals it.
    common = ["--model", "water", "--steps", "3", "--global-batch", "2", "--strategy", "ddp"]
    two = run_ranks(2, common, tmp_path, "water2")
    one = run_ranks(1, common, tmp_path, "water1")
    assert all(math.isfinite(x) for x in two["losses"])  # type: ignore[attr-defined]
    assert _close(two["losses"], one["losses"], rtol=1e-4), (two["losses"], one["losses"])
    local = run_ranks(2, [*common, "--loss", "local"], tmp_path, "water2_local")
    assert local["losses"][0] != pytest.approx(one["losses"][0], rel=1e-3)  # type: ignore[index]


def test_global_losses_without_process_group_are_the_batch_means() -> None:
    import torch

    from crossmae.distributed import global_multimodal_loss, global_sample_mean
    from tests.strategies import tiny_water_batch, tiny_water_model

    per = torch.tensor([0.5, 0.0, 2.0], requires_grad=True)
    scored = torch.tensor([True, False, True])
    got = global_sample_mean(per, scored)
    assert got.item() == pytest.approx(1.25)
    got.backward()
    assert per.grad is not None and per.grad.tolist() == [0.5, 0.5, 0.5]
    none = global_sample_mean(torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.bool))
    assert none.item() == 0.0
    with pytest.raises(TypeError, match="scored"):
        global_sample_mean(per, scored.int())
    with pytest.raises(ValueError, match="scored"):
        global_sample_mean(per, scored[:2])

    model = tiny_water_model()
    inputs, static = tiny_water_batch(model.names, torch.Generator().manual_seed(0))
    out = model(inputs, static=static, generator=torch.Generator().manual_seed(1))
    weights = {k: float(m.loss_weight) for k, m in model.modalities.items()}
    assert global_multimodal_loss(out, weights).item() == pytest.approx(out.loss.item())
    with pytest.raises(ValueError, match="weights"):
        global_multimodal_loss(out, {})
