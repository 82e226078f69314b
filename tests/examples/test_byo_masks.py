"""examples/byo_masks.py at its CI size: masks drawn in the collate_fn, in the input layout,
reach the model as given; the example checks its claim and returns 0 only when it holds."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "byo_masks.py"


def test_byo_masks_example(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("_example_byo_masks", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = module.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "claim holds" in out
    first, last = (float(v) for v in re.findall(r"\d+\.\d+", out)[:2])
    assert last < first
    # the masks the collate_fn draws have the downstream layout
    land = torch.zeros(module.GRID, dtype=torch.bool)
    land[:3] = True
    batch = module.make_collate(land, 2, seed=0)([module.Catchments(2)[i] for i in range(2)])
    assert batch["mask:raster"].shape == (2, module.T, module.GRID)
    assert batch["mask:series"].shape == (2, module.GROUPS, module.T)
    assert not batch["mask:raster"][..., 3:].any()  # sea cells are never drawn
    assert (batch["mask:raster"].sum(-1) == 2).all()  # exact count per (sample, step)
