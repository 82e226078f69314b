"""Tests for the config records, builders and presets (presets are built on ``meta``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from crossmae.decoders import CrossMAEDecoder, MAEDecoder
from crossmae.encoders import TransformerEncoder
from crossmae.models import (
    PRESETS,
    DecoderConfig,
    EncoderConfig,
    ImageCrossMAE,
    ImageCrossMAEConfig,
    build_crossmae_decoder,
    build_encoder,
    build_image_crossmae,
    build_mae_decoder,
    crossmae_vit_base,
    crossmae_vit_base_config,
    crossmae_vit_large,
    crossmae_vit_small,
)

DATA = Path(__file__).resolve().parent.parent / "data"


def on_meta(fn: Callable[..., ImageCrossMAE], **kwargs: Any) -> ImageCrossMAE:
    with torch.device("meta"):
        return fn(**kwargs)


def count(model: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def vit_block(d: int) -> int:
    return 12 * d * d + 13 * d  # norms, qkv (bias), proj, fc1, fc2 at mlp ratio 4


def cross_block(d: int, e: int) -> int:
    return 10 * d * d + 2 * d * e + 13 * d  # norm1, q, kv, proj, norm2, fc1, fc2


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_state_dict_keys_golden(name: str) -> None:
    model = on_meta(PRESETS[name])
    keys = sorted(model.state_dict())
    path = DATA / f"state_dict_keys_{name}.txt"
    if os.environ.get("CROSSMAE_UPDATE_GOLDEN") == "1":
        path.write_text("\n".join(keys) + "\n")
    assert keys == path.read_text().split(), f"state-dict keys of {name} changed"


@pytest.mark.parametrize(
    ("fn", "dims"),
    [
        (crossmae_vit_small, (384, 12, 256, 8)),
        (crossmae_vit_base, (768, 12, 512, 8)),
        (crossmae_vit_large, (1024, 24, 512, 8)),
    ],
)
def test_preset_parameter_counts(fn: Callable[..., ImageCrossMAE], dims: tuple[int, ...]) -> None:
    e, depth, d, dec_depth = dims
    model = on_meta(fn)
    patch = e * 3 * 16 * 16 + e
    encoder = patch + e + depth * vit_block(e)  # + cls token
    assert count(model.patch_embed) + model.cls_token.numel() + count(model.encoder) == encoder
    decoder = (
        d  # mask token
        + dec_depth * depth  # wfm over every encoder block
        + 2 * dec_depth * e  # one norm per decoder layer
        + dec_depth * cross_block(d, e)
        + 2 * d  # final norm
        + d * 768
        + 768  # head to 16 * 16 * 3 values
    )
    assert count(model.decoder) == decoder
    assert count(model) == encoder + decoder


def test_vit_base_encoder_is_85_8m() -> None:
    model = on_meta(crossmae_vit_base)
    enc = count(model.patch_embed) + model.cls_token.numel() + count(model.encoder)
    assert enc == 85_645_824
    # with MAE's fixed position table (a buffer here) it is the familiar 85.8M
    assert round((enc + model.pos_embed.numel()) / 1e6, 1) == 85.8
    assert model.pos_embed.shape == (1, 197, 768)


def test_preset_structure() -> None:
    model = on_meta(crossmae_vit_large)
    assert model.pos_embed.device.type == "meta"
    assert isinstance(model.encoder.norm, torch.nn.Identity)  # WFM: no final norm
    assert isinstance(model.decoder, CrossMAEDecoder)
    assert len(model.encoder.blocks) == 24 and len(model.decoder.blocks) == 8
    assert model.decoder.wfm is not None and model.decoder.wfm.linear.weight.shape == (8, 24)
    assert model.decoder.dec_norms is not None
    assert model.decoder.dec_norms.weight.shape == (8, 1024)
    enc_blk: Any = model.encoder.blocks[0]
    dec_blk: Any = model.decoder.blocks[0]
    assert enc_blk.norm1.eps == 1e-6
    assert enc_blk.attn.qkv.bias is not None
    assert dec_blk.cross_attn.kv.weight.shape == (1024, 1024)
    small: Any = on_meta(crossmae_vit_small)
    assert small.decoder.blocks[0].cross_attn.num_heads == 8
    assert small.encoder.blocks[0].attn.num_heads == 6


def test_decoder_depth_12_and_overrides() -> None:
    model: Any = on_meta(crossmae_vit_base, decoder_depth=12)
    assert len(model.decoder.blocks) == 12
    assert model.decoder.wfm is not None and model.decoder.wfm.linear.weight.shape == (12, 12)
    plain = on_meta(crossmae_vit_small, use_weighted_fm=False)
    assert isinstance(plain.encoder.norm, torch.nn.LayerNorm)
    assert "encoder.norm.weight" in plain.state_dict()
    mae = on_meta(crossmae_vit_small, use_cross_attn=False)
    assert isinstance(mae.decoder, MAEDecoder)
    with pytest.raises(TypeError):
        crossmae_vit_base(not_a_field=1)


def test_presets_are_zero_argument() -> None:
    for fn in PRESETS.values():
        model = on_meta(fn)
        assert isinstance(model, ImageCrossMAE)


# --------------------------------------------------------------------------- configs
def test_config_defaults_and_derived() -> None:
    cfg = ImageCrossMAEConfig()
    assert (cfg.img_size, cfg.patch_size, cfg.in_chans) == (224, 16, 3)
    assert (cfg.mask_ratio, cfg.predict_ratio, cfg.norm_pix_loss) == (0.75, 0.25, False)
    assert cfg.grid_size == (14, 14) and cfg.num_patches == 196 and cfg.patch_dim == 768
    assert cfg.num_feature_maps == 12 and cfg.fm_layer_indices == tuple(range(12))
    assert cfg.encoder == EncoderConfig(final_norm=False)
    assert cfg.decoder == DecoderConfig()
    assert replace_cfg(cfg, use_input=True).num_feature_maps == 13
    assert replace_cfg(cfg, fm_layers=[-1, 0]).fm_layer_indices == (0, 11)
    assert replace_cfg(cfg, use_weighted_fm=False).num_feature_maps is None
    assert replace_cfg(cfg, img_size=(224, 160)).grid_size == (14, 10)
    base = crossmae_vit_base_config()
    assert base.embed_dim == 768 and base.decoder_embed_dim == 512


def replace_cfg(cfg: ImageCrossMAEConfig, **kw: Any) -> ImageCrossMAEConfig:
    return dataclasses.replace(cfg, **kw)


def test_configs_are_frozen_and_hashable() -> None:
    cfg = ImageCrossMAEConfig(fm_layers=[0, 1], img_size=[224, 224])  # type: ignore[arg-type]
    assert cfg.fm_layers == (0, 1) and cfg.img_size == (224, 224)
    hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depth = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"img_size": 225}, "img_size", ValueError),
        ({"patch_size": 0}, "patch_size", ValueError),
        ({"embed_dim": 770}, "embed_dim", ValueError),
        ({"num_heads": 5}, "num_heads", ValueError),
        ({"decoder_embed_dim": 100, "decoder_num_heads": 3}, "decoder_embed_dim", ValueError),
        ({"depth": 0}, "depth", ValueError),
        ({"decoder_depth": 1.5}, "decoder_depth", TypeError),
        ({"mask_ratio": 1.0}, "mask_ratio", ValueError),
        ({"predict_ratio": 0.8}, "predict_ratio", ValueError),
        ({"predict_ratio": 0.0}, "predict_ratio", ValueError),
        ({"fm_layers": [12]}, "fm_layers", ValueError),
        ({"fm_layers": "last"}, "fm_layers", ValueError),
        ({"fm_layers": [0, 0]}, "fm_layers", ValueError),
        ({"fm_layers": [0.5]}, "fm_layers", TypeError),
        ({"use_input": 1}, "use_input", TypeError),
        ({"mlp_ratio": 0}, "mlp_ratio", ValueError),
        ({"norm_eps": -1.0}, "norm_eps", ValueError),
        ({"drop_path": 1.0}, "drop_path", ValueError),
        ({"mask_ratio": float("nan")}, "mask_ratio", ValueError),
    ],
)
def test_config_validation(kwargs: dict[str, Any], field: str, error: type) -> None:
    with pytest.raises(error, match=field):
        ImageCrossMAEConfig(**kwargs)


def test_part_config_validation() -> None:
    with pytest.raises(ValueError, match=r"EncoderConfig\.embed_dim"):
        EncoderConfig(embed_dim=30, num_heads=3)
    with pytest.raises(TypeError, match=r"DecoderConfig\.self_attn"):
        DecoderConfig(self_attn="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"EncoderConfig\.fused_attn"):
        EncoderConfig(fused_attn=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- builders
def test_part_builders() -> None:
    enc = build_encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=4, final_norm=False))
    assert isinstance(enc, TransformerEncoder) and isinstance(enc.norm, torch.nn.Identity)
    dcfg = DecoderConfig(embed_dim=16, depth=3, num_heads=2, self_attn=True)
    dec = build_crossmae_decoder(
        dcfg, context_dim=32, out_dim=12, grid_size=(2, 3), num_feature_maps=2
    )
    assert dec.pos_table is not None and dec.pos_table.shape == (6, 16)
    assert dec.blocks[0].has_self_attn and dec.wfm is not None
    assert "pos_table" not in dec.state_dict()
    mae = build_mae_decoder(dcfg, context_dim=32, out_dim=12, grid_size=2)
    assert mae.num_tokens == 4
    with pytest.raises(ValueError, match="use_cross_attn"):
        build_crossmae_decoder(
            dataclasses.replace(dcfg, use_cross_attn=False),
            context_dim=32,
            out_dim=12,
            grid_size=2,
        )
    with pytest.raises(TypeError, match="config"):
        build_encoder(DecoderConfig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config"):
        build_image_crossmae(EncoderConfig())  # type: ignore[arg-type]


def test_non_square_images() -> None:
    cfg = ImageCrossMAEConfig(
        img_size=(32, 48),
        patch_size=8,
        in_chans=1,
        embed_dim=16,
        depth=1,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    model = build_image_crossmae(cfg)
    x = torch.randn(2, 1, 32, 48)
    out = model(x)
    assert out.pred.shape == (2, 6, 64)  # 24 patches, predict 25%
    rec = model.reconstruct(x, out.split)
    assert rec.shape == x.shape
