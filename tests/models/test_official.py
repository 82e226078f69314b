"""Tests for loading official CrossMAE state dicts.

The fake official checkpoints are made by renaming our own model's keys the official way
with a mapping written here independently of `crossmae.models.official`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import Tensor

from crossmae.layers import sincos_pos_embed_2d
from crossmae.masking import random_masking
from crossmae.models import (
    ImageCrossMAE,
    ImageCrossMAEConfig,
    OfficialLoadReport,
    build_image_crossmae,
    load_official_crossmae_state_dict,
    official_key_for,
)

CFG = ImageCrossMAEConfig(
    img_size=32,
    patch_size=8,
    in_chans=3,
    embed_dim=32,
    depth=2,
    num_heads=4,
    decoder_embed_dim=24,
    decoder_depth=3,
    decoder_num_heads=4,
)


def official_from(model: ImageCrossMAE) -> dict[str, Tensor]:
    """Rename our keys to the official CrossMAE names (independent inverse mapping)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        if key in ("cls_token",) or key.startswith("patch_embed."):
            out[key] = value
        elif key.startswith("encoder.blocks."):
            out[key[len("encoder.") :]] = value
        elif key.startswith("encoder.norm."):
            out[key[len("encoder.") :]] = value
        elif key == "decoder.mask_token":
            out["mask_token"] = value
        elif key.startswith("decoder.blocks."):
            out["decoder_blocks." + key[len("decoder.blocks.") :]] = value
        elif key == "decoder.wfm.linear.weight":
            out["wfm.linear.weight"] = value
        elif key.startswith("decoder.dec_norms."):
            kind = key.rsplit(".", 1)[1]
            for j in range(value.shape[0]):
                out[f"dec_norms.{j}.{kind}"] = value[j].clone()
        elif key.startswith("decoder.norm."):
            out["decoder_norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("decoder.head."):
            out["decoder_pred." + key.rsplit(".", 1)[1]] = value
        else:
            raise AssertionError(f"test mapping does not know {key}")
    # MAE/CrossMAE fixed tables: [1, 1 + N, dim] with a zero cls row
    for name, dim in (("pos_embed", CFG.embed_dim), ("decoder_pos_embed", CFG.decoder_embed_dim)):
        grid = sincos_pos_embed_2d(dim, 4)
        out[name] = torch.cat([torch.zeros(1, dim), grid])[None]
    return out


def perturbed(model: ImageCrossMAE, seed: int) -> ImageCrossMAE:
    """Give every parameter distinct random values (so rows/orders are really tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def fresh(cfg: ImageCrossMAEConfig = CFG, seed: int = 0) -> ImageCrossMAE:
    torch.manual_seed(seed)
    return build_image_crossmae(cfg)


def outputs_equal(a: ImageCrossMAE, b: ImageCrossMAE) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    split = random_masking(2, 16, 0.75, predict_ratio=0.25, generator=torch.Generator())
    a.eval()
    b.eval()
    with torch.no_grad():
        oa, ob = a(x, split=split), b(x, split=split)
    assert torch.equal(oa.pred, ob.pred)
    assert torch.equal(oa.loss, ob.loss)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"decoder_self_attn": True},
        {"use_input": True},
        {"fm_layers": (-1,)},
        {"use_weighted_fm": False},
    ],
)
def test_roundtrip_gives_identical_outputs(overrides: dict[str, Any]) -> None:
    cfg = replace(CFG, **overrides)
    src = perturbed(fresh(cfg, 0), seed=11)
    official = official_from(src)
    dst = fresh(cfg, 1)
    loaded, report = load_official_crossmae_state_dict(official, dst)
    assert loaded is dst
    assert report.ok and report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == ["decoder_pos_embed", "pos_embed"]
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    outputs_equal(src, dst)


def test_dec_norm_rows_land_in_stacked_norm() -> None:
    src = perturbed(fresh(), seed=3)
    official = official_from(src)
    official["dec_norms.2.weight"] = torch.full((32,), 7.0)
    official["dec_norms.0.bias"] = torch.full((32,), -3.0)
    dst, _ = load_official_crossmae_state_dict(official, fresh(seed=1))
    norms: Any = dst.decoder.dec_norms
    assert norms is not None
    assert torch.equal(norms.weight[2], torch.full((32,), 7.0))
    assert torch.equal(norms.bias[0], torch.full((32,), -3.0))
    assert torch.equal(norms.weight[1], official["dec_norms.1.weight"])


def test_checkpoint_wrapper_and_config_target() -> None:
    src = perturbed(fresh(), seed=4)
    ckpt = {"model": official_from(src), "epoch": 399, "optimizer": {"state": {}}}
    model, report = load_official_crossmae_state_dict(ckpt, CFG)
    assert isinstance(model, ImageCrossMAE) and report.ok
    assert any("'model'" in n for n in report.notes)
    outputs_equal(src, model)
    ddp = {"module." + k: v for k, v in official_from(src).items()}
    model2, report2 = load_official_crossmae_state_dict(ddp, CFG)
    assert report2.ok and any("module." in n for n in report2.notes)
    outputs_equal(src, model2)


def test_rename_only_without_model() -> None:
    src = perturbed(fresh(), seed=5)
    mapped, report = load_official_crossmae_state_dict(official_from(src))
    assert isinstance(report, OfficialLoadReport) and report.ok
    assert sorted(report.ignored) == ["decoder_pos_embed", "pos_embed"]  # verified tables
    ours = src.state_dict()
    assert sorted(mapped) == sorted(ours)
    for k in ours:
        assert torch.equal(mapped[k], ours[k]), k
    dst = fresh(seed=2)
    dst.load_state_dict(mapped)
    outputs_equal(src, dst)


def test_missing_and_unexpected_keys_are_reported() -> None:
    src = perturbed(fresh(), seed=6)
    official = official_from(src)
    del official["decoder_blocks.1.cross_attn.kv.weight"]
    del official["dec_norms.1.bias"]
    official["decoder_embed.weight"] = torch.zeros(24, 32)
    official["blocks.7.attn.qkv.weight"] = torch.zeros(96, 32)
    with pytest.raises(ValueError, match=r"decoder_blocks\.1\.cross_attn\.kv\.weight") as err:
        load_official_crossmae_state_dict(official, fresh(seed=1))
    assert "decoder_embed.weight" in str(err.value) and "dec_norms.1.bias" in str(err.value)
    dst: Any = fresh(seed=1)
    kept = dst.decoder.blocks[1].cross_attn.kv.weight.detach().clone()
    _, report = load_official_crossmae_state_dict(official, dst, strict=False)
    assert sorted(report.missing) == ["dec_norms.1.bias", "decoder_blocks.1.cross_attn.kv.weight"]
    assert sorted(report.unexpected) == ["blocks.7.attn.qkv.weight", "decoder_embed.weight"]
    assert not report.ok
    assert torch.equal(dst.decoder.blocks[1].cross_attn.kv.weight, kept)  # left as it was
    assert torch.equal(
        dst.decoder.blocks[0].cross_attn.kv.weight,
        official["decoder_blocks.0.cross_attn.kv.weight"],
    )
    # without a model only gaps in the stacked norms are detectable, and only names
    # that fit no official pattern are unexpected (block 7 is a well-formed name)
    mapped, rep = load_official_crossmae_state_dict(official, strict=False)
    assert rep.missing == ["dec_norms.1.bias"]
    assert "decoder.dec_norms.bias" not in mapped
    assert rep.unexpected == ["decoder_embed.weight"]
    assert "encoder.blocks.7.attn.qkv.weight" in mapped
    with pytest.raises(ValueError, match=r"decoder_embed\.weight"):
        load_official_crossmae_state_dict(official)


def test_strict_raises_before_loading() -> None:
    src = perturbed(fresh(), seed=7)
    official = official_from(src)
    official["extra"] = torch.zeros(1)
    dst = fresh(seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match="extra"):
        load_official_crossmae_state_dict(official, dst)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k])


def test_shape_mismatch_names_the_key() -> None:
    official = official_from(fresh())
    official["blocks.0.mlp.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight"):
        load_official_crossmae_state_dict(official, fresh(seed=1), strict=False)
    official = official_from(fresh())
    official["dec_norms.2.weight"] = torch.zeros(31)
    with pytest.raises(ValueError, match=r"dec_norms\.2\.weight"):
        load_official_crossmae_state_dict(official, fresh(seed=1), strict=False)
    official = official_from(fresh())
    official["pos_embed"] = torch.zeros(1, 10, 32)
    with pytest.raises(ValueError, match="pos_embed"):
        load_official_crossmae_state_dict(official, fresh(seed=1), strict=False)


def test_fixed_table_mismatch_is_reported() -> None:
    official = official_from(fresh())
    official["decoder_pos_embed"] = official["decoder_pos_embed"] + 0.5
    with pytest.raises(ValueError, match="decoder_pos_embed"):
        load_official_crossmae_state_dict(official, fresh(seed=1))
    _, report = load_official_crossmae_state_dict(official, fresh(seed=1), strict=False)
    assert report.mismatched == ["decoder_pos_embed"] and report.ignored == ["pos_embed"]
    # a table without the cls row is accepted too
    official = official_from(fresh())
    official["pos_embed"] = official["pos_embed"][:, 1:]
    _, report = load_official_crossmae_state_dict(official, fresh(seed=1))
    assert "pos_embed" in report.ignored


def test_architecture_mismatch_is_reported() -> None:
    official = official_from(perturbed(fresh(replace(CFG, decoder_self_attn=True)), 1))
    _, report = load_official_crossmae_state_dict(official, fresh(seed=1), strict=False)
    assert report.unexpected and all(
        ".norm0." in k or ".self_attn." in k for k in report.unexpected
    )


def test_bad_arguments() -> None:
    official = official_from(fresh())
    with pytest.raises(ValueError, match="use_cross_attn"):
        load_official_crossmae_state_dict(official, replace(CFG, use_cross_attn=False))
    with pytest.raises(ValueError, match="MAEDecoder"):
        load_official_crossmae_state_dict(official, fresh(replace(CFG, use_cross_attn=False)))
    with pytest.raises(TypeError, match="model"):
        load_official_crossmae_state_dict(official, "vit_base")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="state_dict"):
        load_official_crossmae_state_dict([1, 2])  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="cls_token"):
        load_official_crossmae_state_dict({"cls_token": [0.0]})


def test_official_key_for() -> None:
    assert official_key_for("decoder.head.weight") == ["decoder_pred.weight"]
    assert official_key_for("encoder.blocks.3.attn.qkv.bias") == ["blocks.3.attn.qkv.bias"]
    assert official_key_for("decoder.dec_norms.weight", decoder_depth=2) == [
        "dec_norms.0.weight",
        "dec_norms.1.weight",
    ]
    with pytest.raises(ValueError, match=r"decoder\.embed\.weight"):
        official_key_for("decoder.embed.weight")
