"""Builders are the configuration (issue 10 item 4): `build_water_mae` and
`build_image_crossmae` are plain functions of flat keyword arguments (a 0.1 config record
still works and gives the same model), short enough to copy and edit; presets are
zero-argument functions."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import crossmae as cm

TINY_WATER: dict[str, Any] = dict(
    num_steps=2, image_size=(40, 30), num_land_patches=6, num_sites=10, group_size=4,
    embed_dim=32, num_heads=4, decoder_dim=16, decoder_num_heads=4, decoder_depth=1,
    raster_depth=1, series_depth=1,
)  # fmt: skip
TINY_IMAGE: dict[str, Any] = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16,
    decoder_depth=1, decoder_num_heads=4,
)  # fmt: skip


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("build", "record", "tiny"),
    [
        (cm.build_water_mae, cm.WaterMAEConfig, TINY_WATER),
        (cm.build_image_crossmae, cm.ImageCrossMAEConfig, TINY_IMAGE),
    ],
)
def test_keywords_and_records_build_the_same_model(build: Any, record: Any, tiny: Any) -> None:
    torch.manual_seed(0)
    flat = build(**tiny)
    torch.manual_seed(0)
    old = build(record(**tiny))
    assert same_state(flat, old)
    with pytest.raises(TypeError, match="either config or keyword"):
        build(record(**tiny), num_heads=2)


@pytest.mark.parametrize("build", [cm.build_water_mae, cm.build_image_crossmae])
def test_builders_are_short(build: Any) -> None:
    lines = inspect.getsource(build).splitlines()
    assert len(lines) <= 130, f"{build.__name__} has {len(lines)} lines (signature included)"


@pytest.mark.parametrize("preset", ["water_mae_small", *cm.models.PRESETS])
def test_presets_take_no_arguments(preset: str) -> None:
    device = "cpu" if preset == "water_mae_small" else "meta"  # (the land mask needs data)
    with torch.device(device):
        model = getattr(cm, preset)()
    assert sum(p.numel() for p in model.parameters()) > 0


def test_water_builder_wires_modality_options() -> None:
    model = cm.build_water_mae(**TINY_WATER, loss_weights=(5.0, 1.0, 1.0, 2.0, 3.0))
    weights = {n: m.loss_weight for n, m in model.modalities.items()}  # type: ignore[union-attr]
    assert weights == {
        "precipitation": 5.0, "soil_moisture": 1.0, "temperature": 1.0,
        "evaporation": 2.0, "river_flow": 3.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="loss_weights"):
        cm.build_water_mae(**TINY_WATER, loss_weights=(1.0,))


def test_builders_take_any_encoder() -> None:
    """The builders accept any `Encoder` part: a post-norm encoder for every water modality
    and the fusion, a foreign encoder for the image model."""
    calls: list[tuple[str, int, Any]] = []

    def post_norm(name: str, depth: int, cond_dim: Any) -> torch.nn.Module:
        calls.append((name, depth, cond_dim))
        return cm.PostNormTransformerEncoder(32, depth, 4, cond_dim=cond_dim)

    torch.manual_seed(0)
    model = cm.build_water_mae(**TINY_WATER, encoder_fn=post_norm)
    assert [c[0] for c in calls] == [*model.names, "fusion"]
    assert dict((c[0], c[2]) for c in calls)["river_flow"] == 32  # FiLM on the static token
    for name in model.names:
        assert isinstance(model.modalities[name].encoder, cm.PostNormTransformerEncoder)  # type: ignore[union-attr]
    g = torch.Generator().manual_seed(0)
    x = {m: torch.randn(2, 2, 40, 30, generator=g) for m in model.names[:3]}
    x.update({m: torch.randn(2, 10, 2, generator=g) for m in model.names[3:]})
    out = model(x, static=torch.randn(2, 10, 11, generator=g))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    enc = cm.TransformerEncoder(32, 2, 4, final_norm=False)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    image = cm.build_image_crossmae(**TINY_IMAGE, encoder=enc)
    assert image.encoder is enc
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())  # kept
    with pytest.raises(TypeError, match="encoder"):
        cm.build_image_crossmae(**TINY_IMAGE, encoder=torch.nn.Linear(2, 2))
