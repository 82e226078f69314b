"""Golden state-dict keys (and shapes) of the `water_mae_small` preset: renames are caught."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from crossmae.models import water_mae_small

GOLDEN = Path(__file__).parent.parent / "data" / "state_dict_keys_water_mae_small.txt"


_CACHE: dict[str, torch.nn.Module] = {}


def _model():  # type: ignore[no-untyped-def]
    if "m" not in _CACHE:  # the real default sizes (about 30M parameters), built once
        _CACHE["m"] = water_mae_small()
    return _CACHE["m"]


def _lines() -> list[str]:
    model = _model()
    return [f"{k} {tuple(v.shape)}" for k, v in sorted(model.state_dict().items())]


def test_water_preset_state_dict_keys_golden() -> None:
    lines = _lines()
    if os.environ.get("CROSSMAE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text("\n".join(lines) + "\n")
    expected = GOLDEN.read_text().splitlines()
    missing = sorted(set(expected) - set(lines))
    extra = sorted(set(lines) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]} ... extra {extra[:5]} ..."
    assert lines == expected


def test_water_preset_has_the_reference_structure() -> None:
    model = _model()
    assert model.names == [
        "precipitation",
        "soil_moisture",
        "temperature",
        "evaporation",
        "river_flow",
    ]
    weights = [model.modalities[n].loss_weight for n in model.names]
    assert weights == [100.0, 10.0, 10.0, 1.0, 1.0]
    enc_depths = [len(model.modalities[n].encoder.blocks) for n in model.names]
    assert enc_depths == [6, 6, 6, 4, 4]
    assert model.fusion is not None and len(model.fusion.blocks) == 1
    for n in model.names:
        dec = model.modalities[n].decoder
        assert dec.dim == 128 and len(dec.blocks) == 4
