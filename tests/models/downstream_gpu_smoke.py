"""Run once on a GPU (not collected by pytest): the downstream water model built from parts
(tests/models/test_downstream_model.py) at its real shapes, three bf16 training steps with
masks drawn on the CPU in the input layout, turned into splits in "data preparation", pinned
and moved with ``non_blocking=True``. Prints loss, finiteness, ms per step, parameters and
peak memory. Without CUDA it runs a tiny version (a syntax/wiring check).

Usage, from the repository root: ``python tests/models/downstream_gpu_smoke.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import test_downstream_model as t  # noqa: E402

TINY = dict(
    dim=32, decoder_dim=16, heads=4, depths=(1, 1, 1), decoder_depth=1, max_steps=4,
    image_size=(40, 30), num_land=6, num_sites=10, group=4,
)  # fmt: skip


def main() -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    full = dev == "cuda"
    torch.manual_seed(0)
    model = t.downstream_model(**({} if full else TINY)).to(dev)  # type: ignore[arg-type]
    steps, h, w, sites, group = (30, 290, 180, 604, 8) if full else (3, 40, 30, 10, 4)
    b, patches, grid = 4, -(-sites // group), (h // 10) * (w // 10)
    g = torch.Generator().manual_seed(0)
    x = {m: torch.randn(b, steps, h, w, generator=g) for m in t.RASTERS}
    x.update({m: torch.randn(b, sites, steps, generator=g) for m in t.SERIES})
    x["river_flow"][: b // 2] = float("nan")  # half the batch without river flow
    hidden = {m: torch.rand(b, steps, grid, generator=g) < 0.39 for m in t.RASTERS}
    hidden.update({m: torch.rand(b, patches, steps, generator=g) < 0.39 for m in t.SERIES})
    splits = model.splits_from_masks(hidden)  # data preparation, on the CPU
    splits = {
        k: (s.pin_memory() if full else s).to(dev, non_blocking=True) for k, s in splits.items()
    }
    x = {k: v.to(dev) for k, v in x.items()}
    static = torch.randn(b, sites, 11, generator=g).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ok = True
    for step in range(3):
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = model(x, static=static, splits=splits)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if full:
            torch.cuda.synchronize()
        finite = bool(torch.isfinite(out.loss))
        ok &= finite
        ms = 1e3 * (time.perf_counter() - t0)
        print(f"step {step}: loss {float(out.loss):.4f} finite {finite} {ms:.0f} ms")
    peak = torch.cuda.max_memory_allocated() / 2**30 if full else 0.0
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params:,}, peak memory {peak:.1f} GiB, batch {b}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
