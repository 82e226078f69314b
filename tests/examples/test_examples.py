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

import crossmae as cm

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


def assert_table(out: str, decoders: tuple[str, ...]) -> None:
    """One row per decoder: first, final train, final val loss, ratio, seconds, all finite."""
    for name in decoders:
        rows = [line for line in out.splitlines() if line.startswith(f"{name} ")]
        assert len(rows) == 1, out
        assert len(numbers(rows[0])) == 5 and all(map(math.isfinite, numbers(rows[0]))), rows


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """Examples may set torch's thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_digits_crossmae(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digits = load_example("digits_crossmae")
    results = digits.main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert_png(tmp_path / "reconstructions.png")
    assert_png(tmp_path / "loss.png")
    assert str(tmp_path / "reconstructions.png") in out
    assert_table(out, ("CrossMAE",))
    assert set(results) == {"CrossMAE"}
    assert all(math.isfinite(v) for v in results["CrossMAE"].values()), results
    cross = results["CrossMAE"]
    assert cross["final_train_loss"] < cross["first_loss"]
    assert cross["final_val_loss"] < cross["first_val_loss"]
    # the printed verdict is the --quick claim, and it holds
    assert cross["val_over_baseline"] <= digits.QUICK_MAX_RATIO
    assert f"PASS: CrossMAE validation loss = {cross['val_over_baseline']:.3f} x" in out


def test_digits_fails_loudly_when_its_claim_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two steps cannot reach the claim: the script must exit with status 1, not print.
    (With ``--compare-mae``: the MAE decoder trains too and gets its row in the table.)"""
    argv = ["--steps", "2", "--compare-mae", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        load_example("digits_crossmae").main(argv)
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "FAIL: CrossMAE validation loss" in out
    assert_table(out, ("CrossMAE", "MAE"))
    assert_png(tmp_path / "reconstructions.png")


def test_digits_baseline_is_the_mean_image_on_the_scored_patches() -> None:
    digits = load_example("digits_crossmae")
    model = digits.build_image_crossmae(digits.CONFIG)
    train, val = digits.load_data(torch.device("cpu"))
    val = val[:32]
    split = digits.val_split(model, len(val), val.device)
    assert torch.equal(split.predict_mask, ~split.visible_mask)  # every hidden patch scored
    hidden = cm.unpatchify(
        split.predict_mask[..., None].expand(-1, -1, digits.PATCH**2).float(),
        digits.PATCH,
        digits.IMG,
    ).bool()  # [b, 1, H, W]
    err = (val - train.mean(0)).square()
    per_sample = (err * hidden).sum((1, 2, 3)) / hidden.sum((1, 2, 3))
    expected = per_sample.mean().item()
    assert digits.mean_image_baseline(model, train, val) == pytest.approx(expected, rel=1e-5)


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
