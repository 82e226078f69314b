"""Tests for `MultimodalMAE` as wired by `build_water_mae`: every switch of `WaterMAEConfig`
builds and trains one step, the preset has the water model's shapes, bad configs and bad
calls are a ValueError / TypeError.

Tiny model (see tests/models/test_water_properties.py): 3 steps, 40x30 rasters in 10x10
patches (6 land), 10 sites in groups of 4, width 32, one layer per encoder, two fusion layers.
Legend: ``b`` batch, ``s`` sites, ``t`` steps, ``a`` static attributes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from strategies import generator, randn
from torch import Tensor, nn

from crossmae.decoders import CrossMAEDecoder, MAEDecoder
from crossmae.models.multimodal import Modality, MultimodalMAE
from crossmae.models.water import WaterMAEConfig, build_water_mae, water_mae_small
from crossmae.tokenizers.raster import RasterTokenizer

RASTERS = ("precipitation", "soil_moisture", "temperature")
SERIES = ("evaporation", "river_flow")
NAMES = RASTERS + SERIES
TINY: dict[str, Any] = dict(
    num_steps=3,
    image_size=(40, 30),
    num_land_patches=6,
    num_sites=10,
    group_size=4,
    embed_dim=32,
    num_heads=4,
    decoder_dim=16,
    decoder_num_heads=4,
    decoder_depth=2,
    raster_depth=1,
    series_depth=1,
    fusion_depth=2,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def modality(model: MultimodalMAE, name: str) -> Modality:
    mod = model.modalities[name]
    assert isinstance(mod, Modality)
    return mod


def tiny(**overrides: Any) -> MultimodalMAE:
    torch.manual_seed(0)
    return water_mae_small(**{**TINY, **overrides})


def batch(b: int = 3, seed: int = 1) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Inputs with NaN gaps, one sample without river flow, padded sites; static [b, s, a]."""
    g = generator(seed)
    x = {m: randn(g, b, 3, 40, 30) for m in RASTERS}
    x.update({m: randn(g, b, 10, 3) for m in SERIES})
    x["precipitation"][0, 1, :7, :5] = float("nan")
    x["evaporation"][1, 2] = float("nan")
    x["river_flow"][0] = float("nan")  # no river flow at all for sample 0
    spm = torch.zeros(b, 10, dtype=torch.bool)
    spm[-1, 7:] = True
    return x, randn(g, b, 10, 11), spm


def train_step(model: MultimodalMAE) -> tuple[float, float]:
    """One AdamW step on `batch`; returns the loss before and after (same masks)."""
    x, static, spm = batch()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(x, static=static, site_padding_mask=spm, generator=generator(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    for m in NAMES:
        assert torch.isfinite(out.losses[m]) and out.losses[m].item() > 0, m
        assert torch.isfinite(out.preds[m]).all(), m
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "the optimizer step changed no parameter"
    again = model(x, static=static, site_padding_mask=spm, generator=generator(0))
    assert torch.isfinite(again.loss)
    return out.loss.item(), again.loss.item()


# --------------------------------------------------------------------------- switches
SWITCHES = list(itertools.product([True, False], repeat=4))


@pytest.mark.parametrize(("cross", "self_attn", "wfm", "use_input"), SWITCHES)
def test_every_switch_combination_builds_and_trains(
    cross: bool, self_attn: bool, wfm: bool, use_input: bool
) -> None:
    model = tiny(
        use_cross_attn=cross, decoder_self_attn=self_attn, use_weighted_fm=wfm, use_input=use_input
    )
    assert model.names == list(NAMES)
    assert model.use_weighted_fm == wfm
    assert model.fusion is not None
    # With feature weighting the fusion's final norm is not applied (one norm per layer).
    assert isinstance(model.fusion.norm, nn.Identity) == wfm
    for m in NAMES:
        dec = model.modalities[m].decoder
        assert isinstance(dec, CrossMAEDecoder if cross else MAEDecoder), m
        if isinstance(dec, CrossMAEDecoder):
            assert (dec.wfm is not None) == wfm, m
            if dec.wfm is not None:
                maps = TINY["fusion_depth"] + int(use_input)
                assert tuple(dec.wfm.linear.weight.shape) == (TINY["decoder_depth"], maps)
            for blk in dec.blocks:
                assert blk.has_self_attn == self_attn, m
    train_step(model)
    x, static, spm = batch()
    model.zero_grad(set_to_none=True)
    model(x, static=static, site_padding_mask=spm, generator=generator(0)).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == [], f"parameters that never reach the loss: {unused}"


@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("use_input", [True, False])
@pytest.mark.parametrize(("fm_layers", "taps"), [("all", 2), (-1, 1), ((0,), 1), ((0, -1), 2)])
def test_feature_map_selection_trains(
    cross: bool, use_input: bool, fm_layers: Any, taps: int
) -> None:
    model = tiny(
        use_cross_attn=cross, use_weighted_fm=True, fm_layers=fm_layers, use_input=use_input
    )
    for m in NAMES:
        dec = model.modalities[m].decoder
        if isinstance(dec, CrossMAEDecoder):
            assert dec.wfm is not None
            assert dec.wfm.num_inputs == taps + int(use_input), m
    train_step(model)


def test_fusion_layers_after_the_last_tap_get_no_gradient() -> None:
    """Documented consequence of tapping only fusion layer 0: layer 1 never reaches the
    loss; every other parameter does."""
    model = tiny(use_weighted_fm=True, fm_layers=(0,))
    x, static, spm = batch()
    model(x, static=static, site_padding_mask=spm, generator=generator(0)).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("fusion.blocks.1."):
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None, name


def test_no_fusion_layer_trains() -> None:
    model = tiny(fusion_depth=0)
    assert model.fusion is None
    train_step(model)


# --------------------------------------------------------------------------- preset
def test_default_preset_has_the_water_model_shapes() -> None:
    """`build_water_mae()` = the downstream model: 94 land patches x 30 steps, 604 sites in
    76 groups of 8, 11 static attributes, loss weights 100/10/10/1/1."""
    cfg = WaterMAEConfig()
    model = build_water_mae(cfg)
    assert model.names == list(NAMES)
    weights = [model.modalities[m].loss_weight for m in NAMES]
    assert weights == [100.0, 10.0, 10.0, 1.0, 1.0]
    for m in RASTERS:
        tok: Any = model.modalities[m].tokenizer
        assert tok.num_patches == 522 and tok.num_valid_patches == 94
        assert tok.num_tokens(30) == 30 * 94
    for m in SERIES:
        tok = model.modalities[m].tokenizer
        assert tok.num_patches == 76 and tok.group_size == 8
        mod = model.modalities[m]
        assert isinstance(mod, Modality) and mod.static_token is not None
        assert mod.static_token.num_attributes == 11
        assert mod.encoder.cond_dim == 256 and len(mod.encoder.blocks) == 4
    precip = model.modalities["precipitation"]
    assert isinstance(precip, Modality) and len(precip.encoder.blocks) == 6
    assert model.fusion is not None and len(model.fusion.blocks) == 1
    dec = model.modalities["river_flow"].decoder
    assert isinstance(dec, CrossMAEDecoder) and dec.dim == 128 and len(dec.blocks) == 4


def test_default_preset_hides_37_of_94_land_patches_per_step() -> None:
    """REFERENCE: the water model's mask hides 37 of the 94 land patches of every step, so
    57 x 30 = 1710 encoder tokens and 37 x 30 = 1110 queries per raster modality."""
    model = build_water_mae()
    pads = {m: torch.zeros(2, 30 * (94 if m in RASTERS else 76), dtype=torch.bool) for m in NAMES}
    splits = model.make_splits(pads, generator=generator(0))
    for m in RASTERS:
        assert splits[m].num_keep.tolist() == [1710, 1710], m
        assert splits[m].num_predict.tolist() == [1110, 1110], m


def test_default_preset_raster_tokens_use_a_learned_spatial_embedding() -> None:
    """REFERENCE: raster token = Linear(100 -> 256) + *learned* spatial embedding of the
    patch + sin-cos of the time step + a modality embedding."""
    model = build_water_mae()
    for m in RASTERS:
        tok = modality(model, m).tokenizer
        assert isinstance(tok, RasterTokenizer)
        assert (tok.proj.in_features, tok.proj.out_features) == (100, 256), m
        assert tok.time_embed_kind == "sincos" and tok.modality_embed is not None, m
        assert tok.spatial_embed_kind == "learned", m
        assert tok.spatial_pos_embed is not None and tok.spatial_pos_embed.shape == (94, 256)


def test_weighted_feature_maps_override() -> None:
    model = water_mae_small(**{**TINY, "use_weighted_fm": True, "use_input": True})
    dec = model.modalities["temperature"].decoder
    assert isinstance(dec, CrossMAEDecoder) and dec.wfm is not None
    assert dec.wfm.num_inputs == TINY["fusion_depth"] + 1


# --------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_weights=(100.0, 10.0, 10.0, 1.0)),
        dict(loss_weights=(1.0,) * 6),
        dict(loss_weights=()),
        dict(raster_names=("precipitation",)),  # 4 modalities, 5 weights
        dict(use_weighted_fm=True, fusion_depth=0),
        dict(use_weighted_fm=True, fusion_depth=2, fm_layers=(2,)),
        dict(use_weighted_fm=True, fusion_depth=2, fm_layers=(-3,)),
        dict(use_weighted_fm=True, fusion_depth=2, fm_layers=()),
        dict(use_weighted_fm=True, fusion_depth=2, fm_layers="last"),
        dict(series_names=("evaporation", "precipitation")),  # duplicate name
        dict(num_steps=0),
        dict(embed_dim=0),
        dict(decoder_depth=0),
        dict(fusion_depth=-1),
        dict(mask_ratio=1.5),
        dict(mask_ratio=-0.1),
    ],
    ids=repr,
)
def test_bad_config_is_a_value_error(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        WaterMAEConfig(**overrides)
    with pytest.raises(ValueError):
        water_mae_small(**{**TINY, **overrides})


def test_bad_predict_ratio_is_a_value_error() -> None:
    """``predict_ratio > mask_ratio`` is refused, at build time or at the latest when masks
    are drawn (never silently accepted)."""
    x, static, spm = batch()
    with pytest.raises(ValueError, match="predict_ratio"):
        model = tiny(mask_ratio=0.4, predict_ratio=0.6)
        model(x, static=static, site_padding_mask=spm, generator=generator(0))


# --------------------------------------------------------------------------- bad calls
def test_multimodal_constructor_checks() -> None:
    model = tiny()
    mods: dict[str, Modality] = {}
    for m in NAMES:
        mod = model.modalities[m]
        assert isinstance(mod, Modality)
        mods[m] = mod
    with pytest.raises(ValueError, match="modalities"):
        MultimodalMAE({})
    with pytest.raises(ValueError, match="use_weighted_fm"):
        MultimodalMAE(mods, None, use_weighted_fm=True)
    with pytest.raises(TypeError, match="Modality"):
        MultimodalMAE({"x": nn.Linear(2, 2)})  # type: ignore[dict-item]
    mod = mods["precipitation"]
    with pytest.raises(TypeError, match="encoder"):
        Modality(mod.tokenizer, nn.Identity(), mod.decoder)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decoder"):
        Modality(mod.tokenizer, mod.encoder, nn.Identity())  # type: ignore[arg-type]


def test_forward_argument_checks() -> None:
    model = tiny()
    x, static, spm = batch()
    without = {m: v for m, v in x.items() if m != "river_flow"}
    with pytest.raises(ValueError, match="river_flow"):
        model(without, static=static)
    with pytest.raises(ValueError, match="snow"):
        model({**x, "snow": x["precipitation"]}, static=static)
    with pytest.raises(ValueError, match="static"):
        model(x)
    with pytest.raises(ValueError, match="site_padding_mask"):
        model(x, static=static, site_padding_mask=spm[:, :9])
    with pytest.raises(ValueError):
        model(x, static=static[:, :, :10])  # 10 attributes, 11 expected
    with pytest.raises(ValueError):
        model({**x, "temperature": x["temperature"][:, :, :30]}, static=static)
    with pytest.raises(ValueError):
        model(x, static=static, missing={"river_flow": torch.zeros(2, dtype=torch.bool)})
    with pytest.raises(TypeError):
        model(x, static=static, missing={"river_flow": torch.zeros(3)})
