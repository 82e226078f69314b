"""Checkpoints: ``state_dict`` round trips and the checked-in compatibility checkpoints.

* Round trip: for every image preset (tiny, see ``reliability_helpers.IMAGE_PRESETS``, and
  the decoder/feature-map variants) and the tiny water model (every variant), the
  ``state_dict`` goes through ``torch.save`` / ``torch.load(weights_only=True)`` into a
  freshly built model with a *different* seed, loads with ``strict=True``, and the outputs on
  a fixed input are bitwise identical. One case uses the exact override set of the brief
  (``crossmae_vit_small(img_size=32, patch_size=8, depth=2, decoder_depth=2)``, full width).
* Compatibility: every ``tests/data/checkpoints/<name>.pt`` (written by
  ``tests/reliability/make_checkpoints.py``) loads strictly into the model its ``.json``
  describes and reproduces the stored output summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from make_checkpoints import CHECKPOINTS, DATA, SIZE_LIMIT, summarize
from reliability_helpers import (
    IMAGE_PRESETS,
    IMAGE_VARIANTS,
    WATER_VARIANTS,
    Recorder,
    build_image,
    build_water,
    close,
    gen,
    images,
    rand,
    water_inputs,
    water_static,
)

import crossmae as cm


def _roundtrip(model: torch.nn.Module, fresh: torch.nn.Module, path: Path) -> torch.nn.Module:
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh.load_state_dict(state, strict=True)
    return fresh


def _image_output(model: cm.ImageCrossMAE) -> Any:
    split = cm.random_masking(
        2, model.num_patches, 0.75, predict_ratio=0.25, noise=rand(2, model.num_patches, seed=11)
    )
    with torch.no_grad():
        return model(
            images()
            if model.img_size == (16, 16)
            else torch.randn(2, 3, *model.img_size, generator=gen(1)),
            split=split,
        )


def _water_output(model: cm.MultimodalMAE) -> Any:
    with torch.no_grad():
        return model(
            water_inputs(),
            static=water_static(),
            generator=gen(0),
            missing={"river_flow": torch.tensor([False, True])},
        )


IMAGE_CASES = [
    (p, v)
    for p in IMAGE_PRESETS
    for v in (("default",) if p != "crossmae_vit_small" else tuple(IMAGE_VARIANTS))
]


@pytest.mark.parametrize(
    ("preset", "variant"), IMAGE_CASES, ids=[f"{p}-{v}" for p, v in IMAGE_CASES]
)
def test_image_state_dict_round_trip(
    preset: str, variant: str, tmp_path: Path, rec: Recorder
) -> None:
    model = build_image(preset, seed=0, **IMAGE_VARIANTS[variant])
    fresh = build_image(preset, seed=1, **IMAGE_VARIANTS[variant])
    before = _image_output(fresh)
    loaded = _roundtrip(model, fresh, tmp_path / "ckpt.pt")
    assert not torch.equal(before.pred, _image_output(model).pred), (
        "the fresh model was not different"
    )
    close(_image_output(loaded), _image_output(model), rtol=0, atol=0)
    rec.check(
        preset,
        f"state_dict round trip, torch.save / torch.load(weights_only=True), variant {variant}",
        True,
        "loads strict into a freshly seeded model; identical outputs",
    )


def test_preset_round_trip_at_full_width(tmp_path: Path, rec: Recorder) -> None:
    def build(seed: int) -> cm.ImageCrossMAE:
        torch.manual_seed(seed)
        return cm.crossmae_vit_small(img_size=32, patch_size=8, depth=2, decoder_depth=2).eval()

    loaded = _roundtrip(build(0), build(1), tmp_path / "ckpt.pt")
    close(_image_output(loaded), _image_output(build(0)), rtol=0, atol=0)
    rec.check(
        "crossmae_vit_small",
        "state_dict round trip at full width: img_size=32, patch_size=8, depth=2, decoder_depth=2",
        True,
        "loads strict; identical outputs",
    )


@pytest.mark.parametrize("variant", sorted(WATER_VARIANTS))
def test_water_state_dict_round_trip(variant: str, tmp_path: Path, rec: Recorder) -> None:
    model = build_water(seed=0, **WATER_VARIANTS[variant])
    loaded = _roundtrip(model, build_water(seed=1, **WATER_VARIANTS[variant]), tmp_path / "ckpt.pt")
    close(_water_output(loaded), _water_output(model), rtol=0, atol=0)
    rec.check(
        "water_mae_small",
        f"state_dict round trip, torch.save / torch.load(weights_only=True), variant {variant}",
        True,
        "loads strict into a freshly seeded model; identical outputs",
    )


def _rebuild(meta: dict[str, Any]) -> torch.nn.Module:
    factory: Callable[..., torch.nn.Module] = getattr(cm, meta["builder"])
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["overrides"].items()}
    torch.manual_seed(12345)  # anything but the seed that wrote the checkpoint
    return factory(**overrides).eval()


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checked_in_checkpoint_still_loads_and_reproduces(name: str, rec: Recorder) -> None:
    pt, js = DATA / f"{name}.pt", DATA / f"{name}.json"
    assert pt.stat().st_size < SIZE_LIMIT
    meta = json.loads(js.read_text())
    model = _rebuild(meta)
    tried = f"checked-in checkpoint tests/data/checkpoints/{name}.pt (written by crossmae {meta['written_by']['crossmae']})"
    try:
        model.load_state_dict(torch.load(pt, weights_only=True), strict=True)
    except Exception as e:  # a renamed/removed/added parameter breaks old checkpoints
        rec.check(
            meta["builder"], tried, False, "", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        )
        return
    got = summarize(CHECKPOINTS[name]["forward"](model))
    want = meta["expected"]
    assert sorted(got) == sorted(want), f"outputs {sorted(got)} vs stored {sorted(want)}"
    problems = []
    for key, w in want.items():
        g = got[key]
        if g["shape"] != w["shape"]:
            problems.append(f"{key}: shape {g['shape']} vs {w['shape']}")
            continue
        for stat in ("sum", "abs_sum"):
            if abs(g[stat] - w[stat]) > 1e-4 * abs(w[stat]) + 1e-4:
                problems.append(f"{key}.{stat}: {g[stat]:.6g} vs {w[stat]:.6g}")
        head_g, head_w = torch.tensor(g["head"]), torch.tensor(w["head"])
        if not torch.allclose(head_g, head_w, rtol=1e-4, atol=1e-5):
            problems.append(
                f"{key}.head: max difference {float((head_g - head_w).abs().max()):.3g}"
            )
    rec.check(
        meta["builder"],
        tried,
        not problems,
        "loads strict; reproduces the stored output",
        "; ".join(problems),
    )


def test_checkpoint_files_are_small() -> None:
    for name in CHECKPOINTS:
        assert (DATA / f"{name}.pt").stat().st_size < SIZE_LIMIT, name
