"""Every runnable example, at its CI size (``--quick``), in a temporary directory.

Each test imports the example's ``main``, runs it in-process, and checks that it returns,
wrote its files (non-empty PNGs) and printed finite losses. The whole file takes a few
seconds per example on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path.name} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{path.name} is not a real PNG"


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(_NUM, line)]


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """Examples may set torch's thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_digits_crossmae(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = load_example("digits_crossmae").main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert_png(tmp_path / "reconstructions.png")
    assert_png(tmp_path / "loss.png")
    assert str(tmp_path / "reconstructions.png") in out
    # the side-by-side table: one row per decoder, every printed number finite
    for name in ("CrossMAE", "MAE"):
        rows = [line for line in out.splitlines() if line.startswith(f"{name} ")]
        assert len(rows) == 1, out
        assert len(numbers(rows[0])) == 4 and all(map(math.isfinite, numbers(rows[0])))
        assert all(math.isfinite(v) for v in results[name].values()), results[name]
    cross = results["CrossMAE"]
    assert cross["final_train_loss"] < cross["first_loss"]
    assert cross["final_val_loss"] < cross["first_val_loss"]


def test_digits_validation_loss_is_reproducible(tmp_path: Path) -> None:
    digits = load_example("digits_crossmae")
    model = digits.build_image_crossmae(digits.CONFIG)
    _, val = digits.load_data(torch.device("cpu"))
    assert digits.val_loss(model, val[:64]) == digits.val_loss(model, val[:64])


def test_water_multimodal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    losses = load_example("water_multimodal").main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert_png(tmp_path / "hydrograph.png")
    assert_png(tmp_path / "raster.png")
    modalities = ("precipitation", "soil_moisture", "temperature", "evaporation", "river_flow")
    assert set(losses) == set(modalities)
    assert all(math.isfinite(v) for v in losses.values()), losses
    for name in modalities:  # validation table: start and end loss per modality
        row = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert len(numbers(row)) == 2 and all(map(math.isfinite, numbers(row))), row
    # training batches mix samples with and without river flow; every loss stays finite
    train = [numbers(line)[1] for line in out.splitlines() if line.startswith("step ")]
    assert train and all(map(math.isfinite, train)), out


def test_custom_encoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    losses = load_example("custom_encoder").main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert losses and all(map(math.isfinite, losses)), losses
    assert (tmp_path / "custom_encoder_loss.txt").read_text().split() == [str(v) for v in losses]
    printed = [numbers(line)[1] for line in out.splitlines() if line.startswith("step ")]
    assert printed and all(map(math.isfinite, printed)), out
