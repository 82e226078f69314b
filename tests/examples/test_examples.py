"""Every runnable example, at its CI size (``--quick``), in a temporary directory.

Each test imports the example's ``main``, runs it in-process, and checks that it returns,
wrote its files (non-empty PNGs), printed finite losses and that its ``--quick`` claim held
(the example raises ``SystemExit(1)`` otherwise). The full-size claims (the README's
numbers) take a minute or more each and are checked by running the examples themselves;
here a too-short run shows that a failed claim exits with status 1. The whole file takes a
few seconds per example on 2 CPU cores.
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
    water = load_example("water_multimodal")
    results = water.main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert_png(tmp_path / "hydrograph.png")
    assert_png(tmp_path / "raster.png")
    modalities = ("precipitation", "soil_moisture", "temperature", "evaporation", "river_flow")
    assert set(results) == {*modalities, "nse_evaporation", "nse_river_flow"}
    assert all(math.isfinite(v) for v in results.values()), results
    for name in modalities:  # validation table: start and end loss, NSE for the series
        row = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        expected = 3 if name in water.SERIES else 2
        assert len(numbers(row)) == expected and all(map(math.isfinite, numbers(row))), row
    for name in water.SERIES:  # the --quick claim held, and is what was printed
        assert results[f"nse_{name}"] >= water.QUICK_MIN_NSE[name], results
    assert out.count("PASS: median NSE") == 1
    # training batches mix samples with and without river flow; every loss stays finite
    train = [numbers(line)[1] for line in out.splitlines() if line.startswith("step ")]
    assert train and all(map(math.isfinite, train)), out


def test_water_nse_matches_its_definition() -> None:
    """NSE per catchment over its scored days; unscored days and other catchments never
    count; a perfect reconstruction scores 1, the catchment's mean scores 0."""
    water = load_example("water_multimodal")
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(3, 2, 5, generator=g) * 10  # [b, sites, t]
    scored = torch.rand(3, 2, 5, generator=g) < 0.6
    scored[:, :, :2] = True  # at least 2 scored days per catchment
    rec = obs + torch.randn(3, 2, 5, generator=g)
    got = water.nse(obs, rec.masked_fill(~scored, 1e6), scored)  # unscored values ignored
    for s in range(2):
        o, r = obs[:, s][scored[:, s]], rec[:, s][scored[:, s]]
        want = 1 - ((r - o) ** 2).sum() / ((o - o.mean()) ** 2).sum()
        assert got[s].item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(water.nse(obs, obs, scored), torch.ones(2))
    mean = (obs * scored).sum((0, 2), keepdim=True) / scored.sum((0, 2), keepdim=True)
    assert torch.allclose(water.nse(obs, mean.expand_as(obs), scored), torch.zeros(2), atol=1e-6)
    one_day = torch.zeros_like(scored)
    one_day[0, 0, 0] = True
    assert water.nse(obs, rec, one_day).isnan().all()  # < 2 scored days: undefined


def test_custom_encoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    losses = load_example("custom_encoder").main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert losses and all(map(math.isfinite, losses)), losses
    assert (tmp_path / "custom_encoder_loss.txt").read_text().split() == [str(v) for v in losses]
    printed = [numbers(line)[1] for line in out.splitlines() if line.startswith("step ")]
    assert printed and all(map(math.isfinite, printed)), out
    assert sum(losses[-5:]) < sum(losses[:5])  # the --quick claim, which it printed
    assert "PASS: mean loss of the last 5 steps" in out


def test_custom_encoder_fails_loudly_when_its_claim_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One step cannot halve the loss: exit status 1."""
    with pytest.raises(SystemExit) as exc:
        load_example("custom_encoder").main(["--steps", "1", "--out-dir", str(tmp_path)])
    assert exc.value.code == 1
    assert "FAIL: mean loss of the last 1 steps" in capsys.readouterr().out


def test_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    load_example("quickstart").main()  # raises SystemExit if padding leaked
    out = capsys.readouterr().out
    assert "all decoder gradients finite: True" in out
    assert "loss unchanged with NaN written into every padded slot: True" in out
