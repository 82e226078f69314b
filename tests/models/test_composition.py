"""Open composition (issue 10 items 1 and 3): parts are checked by protocol, not class; any
part satisfying its protocol works, also when swapped in after construction; a part gets only
its protocol's arguments; feature taps from each modality's own encoder; fewer time steps at
run time than the model is built for.

Tiny water model (tests/strategies.py `tiny_water_model`, 3 steps, width 32) and a tiny image
CrossMAE (32x32 images, 8x8 patches, width 32). Legend: ``b`` batch, ``n`` tokens, ``e`` width.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from strategies import tiny_water_batch, tiny_water_model
from torch import Tensor, nn

import crossmae as cm
from crossmae.encoders.transformer import EncoderOutput, LayerSelection
from crossmae.models.multimodal import Modality, MultimodalMAE

NAMES = ("precipitation", "soil_moisture", "temperature", "evaporation", "river_flow")


class ForeignEncoder(nn.Module):
    """Not a crossmae class: wraps one and records every call's keyword arguments. Its
    ``forward`` takes exactly the protocol's arguments (no ``**kwargs``), so a composite
    passing anything else fails."""

    def __init__(self, inner: cm.TransformerEncoder) -> None:
        super().__init__()
        self.inner = inner
        self.dim = inner.dim
        self.depth = inner.depth
        self.calls: list[dict[str, Any]] = []

    def forward(
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        return_layers: LayerSelection = None,
        include_input: bool = False,
    ) -> EncoderOutput:
        self.calls.append({"return_layers": return_layers, "include_input": include_input})
        return self.inner(
            tokens, padding_mask, return_layers=return_layers, include_input=include_input
        )


class ConditionedForeignEncoder(ForeignEncoder):
    """As `ForeignEncoder`, with ``cond_dim``: it is passed ``cond=``."""

    def __init__(self, inner: cm.TransformerEncoder) -> None:
        super().__init__(inner)
        self.cond_dim = inner.cond_dim

    def forward(  # type: ignore[override]
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        cond: Optional[Tensor] = None,
        return_layers: LayerSelection = None,
        include_input: bool = False,
    ) -> EncoderOutput:
        self.calls.append({"cond": cond})
        return self.inner(
            tokens, padding_mask, cond=cond, return_layers=return_layers,
            include_input=include_input,
        )  # fmt: skip


def mod(model: MultimodalMAE, name: str) -> Modality:
    m = model.modalities[name]
    assert isinstance(m, Modality)
    return m


def test_crossmae_parts_satisfy_the_protocols() -> None:
    model = tiny_water_model()
    for name in NAMES:
        m = mod(model, name)
        assert isinstance(m.encoder, cm.Encoder)
        assert isinstance(m.tokenizer, cm.Tokenizer)
        assert isinstance(m.decoder, cm.QueryDecoder)
    mae = cm.MAEDecoder(32, 16, 1, 4, 8, num_tokens=4)
    assert isinstance(mae, cm.SequenceDecoder) and not isinstance(mae, cm.QueryDecoder)
    assert not isinstance(nn.Linear(2, 2), cm.Encoder)


def test_swapped_foreign_encoders_get_only_protocol_arguments() -> None:
    torch.manual_seed(0)
    model = tiny_water_model()
    g = torch.Generator().manual_seed(1)
    x, static = tiny_water_batch(NAMES, g)
    with torch.no_grad():
        ref = model(x, static=static, generator=torch.Generator().manual_seed(0))
    plain = ForeignEncoder(mod(model, "precipitation").encoder)  # type: ignore[arg-type]
    conditioned = ConditionedForeignEncoder(mod(model, "evaporation").encoder)  # type: ignore[arg-type]
    fusion = ForeignEncoder(model.fusion)  # type: ignore[arg-type]
    mod(model, "precipitation").encoder = plain
    mod(model, "evaporation").encoder = conditioned
    model.fusion = fusion
    with torch.no_grad():
        got = model(x, static=static, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.loss, ref.loss)
    assert plain.calls and all("cond" not in c for c in plain.calls)
    assert conditioned.calls and all(c["cond"] is not None for c in conditioned.calls)
    assert fusion.calls


def test_swaps_are_checked() -> None:
    model = tiny_water_model()
    m = mod(model, "precipitation")
    with pytest.raises(TypeError, match="encoder"):
        m.encoder = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="decoder"):
        m.decoder = nn.Identity()
    with pytest.raises(TypeError, match="tokenizer"):
        m.tokenizer = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="fusion"):
        model.fusion = nn.Linear(2, 2)
    # an object with the attributes but the wrong forward keywords is no Encoder
    with pytest.raises(TypeError, match="encoder"):
        m.encoder = m.decoder


def tiny_image() -> cm.ImageCrossMAE:
    torch.manual_seed(0)
    return cm.crossmae_vit_small(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4,
    ).eval()  # fmt: skip


def test_image_model_takes_a_foreign_encoder() -> None:
    model = tiny_image()
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(imgs, generator=torch.Generator().manual_seed(1))
    foreign = ForeignEncoder(model.encoder)  # type: ignore[arg-type]
    model.encoder = foreign
    with torch.no_grad():
        got = model(imgs, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got.loss, ref.loss)
    assert foreign.calls and foreign.calls[0]["return_layers"] == (0, 1)
    with pytest.raises(ValueError, match="width"):
        model.encoder = cm.TransformerEncoder(16, 2, 4, final_norm=False)
    with pytest.raises(ValueError, match="cond_dim"):
        model.encoder = cm.TransformerEncoder(32, 2, 4, final_norm=False, cond_dim=3)
    with pytest.raises(TypeError, match="decoder"):
        model.decoder = nn.Identity()


def test_feature_maps_from_each_modality_encoder() -> None:
    """``Modality(fm_layers=...)``: decoders mix the layers of every modality's own encoder
    (concatenated over modalities) plus the fused keys; every parameter gets a gradient."""
    torch.manual_seed(0)
    base = tiny_water_model()
    mods = {}
    for name in NAMES:
        m = mod(base, name)
        dec = m.decoder
        assert isinstance(dec, cm.CrossMAEDecoder) and dec.pos_table is not None
        new_dec = cm.CrossMAEDecoder(
            32, 16, 1, 4, dec.out_dim, num_feature_maps=2 + 1, pos_embed=dec.pos_table
        )
        enc = cm.TransformerEncoder(32, 2, 4, cond_dim=m.encoder.cond_dim)  # type: ignore[arg-type]
        mods[name] = Modality(
            m.tokenizer, enc, new_dec, masking=m.masking, static_token=m.static_token,
            num_steps=3, fm_layers=(0, 1),
        )  # fmt: skip
    model = MultimodalMAE(mods, base.fusion)
    assert model.num_feature_maps == 3
    g = torch.Generator().manual_seed(2)
    x, static = tiny_water_batch(NAMES, g)
    out = model(x, static=static, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []
    with pytest.raises(ValueError, match="feature taps"):
        MultimodalMAE({**mods, "precipitation": mod(base, "precipitation")}, base.fusion)


def test_fewer_steps_at_run_time() -> None:
    """A model built for 3 steps runs 1 or 2 steps (its query positions are indexed by token),
    and refuses 4."""
    torch.manual_seed(0)
    model = tiny_water_model()
    g = torch.Generator().manual_seed(3)
    x, static = tiny_water_batch(NAMES, g)
    for steps in (1, 2):
        short = {k: (v[:, :steps] if v.ndim == 4 else v[..., :steps]) for k, v in x.items()}
        out = model(short, static=static, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss)
        assert out.splits["precipitation"].visible_mask.shape == (2, steps * 6)
    longer = {
        k: torch.cat([v, v[:, :1] if v.ndim == 4 else v[..., :1]], dim=1 if v.ndim == 4 else -1)
        for k, v in x.items()
    }
    with pytest.raises(ValueError, match="num_steps=3"):
        model(longer, static=static)


def test_encoder_conditioned_on_raw_attributes_of_visible_patches() -> None:
    """``cond_fn=visible_site_mean(g)``: the FiLM input is the raw static attributes, per
    patch the mean over real sites, averaged over the visible patches."""
    from crossmae.models.multimodal import visible_site_mean

    torch.manual_seed(0)
    base = tiny_water_model()
    m = mod(base, "evaporation")
    enc = cm.TransformerEncoder(32, 1, 4, cond_dim=11)
    seen: list[Tensor] = []
    enc.register_forward_pre_hook(lambda _m, a, kw: seen.append(kw["cond"]), with_kwargs=True)
    mods = {
        "evaporation": Modality(
            m.tokenizer,
            enc,
            m.decoder,
            masking=m.masking,
            static_token=m.static_token,
            num_steps=3,
            cond_fn=visible_site_mean(4),
        )
    }
    model = MultimodalMAE(mods, None)
    g = torch.Generator().manual_seed(4)
    x = {"evaporation": torch.randn(2, 12, 3, generator=g)}
    static = torch.randn(2, 12, 11, generator=g)
    spm = torch.zeros(2, 12, dtype=torch.bool)
    spm[1, 6:] = True  # sample 1: sites 6..11 are padding (patch 2 empty, patch 1 half)
    static[1, 6:] = float("nan")  # whatever padding sites hold is ignored
    out = model(x, static=static, site_padding_mask=spm, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    cond = seen[0]
    vis = out.splits["evaporation"].visible_mask.reshape(2, 3, 3).any(dim=1)  # [b, P]
    for i in range(2):
        rows = []
        for p in vis[i].nonzero().flatten().tolist():
            sites = [s for s in range(4 * p, 4 * p + 4) if not spm[i, s]]
            if sites:
                rows.append(static[i, sites].mean(dim=0))
        expect = torch.stack(rows).mean(dim=0) if rows else torch.zeros(11)
        torch.testing.assert_close(cond[i], expect)


def test_modality_loss_options_reach_the_loss() -> None:
    """``Modality(loss=ModalityLoss(...))``: the pixel land mask removes values from the
    raster loss (a NaN-free change at a masked pixel leaves it unchanged), ``average="value"``
    is the per-site series loss."""
    from crossmae.models.multimodal import ModalityLoss

    torch.manual_seed(0)
    base = tiny_water_model()
    m = mod(base, "precipitation")
    tok = m.tokenizer
    sea = torch.zeros(40, 30, dtype=torch.bool)
    sea[:, :5] = True  # the first 5 pixel columns are sea
    loss = ModalityLoss(
        pixel_valid_mask=~sea,
        patch_size=10,
        patch_index=tok.valid_patch_index,  # type: ignore[arg-type]
    )
    masked = Modality(tok, m.encoder, m.decoder, masking=m.masking, num_steps=3, loss=loss)
    model = MultimodalMAE({"precipitation": masked}, None).eval()
    g = torch.Generator().manual_seed(5)
    x = {"precipitation": torch.randn(2, 3, 40, 30, generator=g)}
    with torch.no_grad():
        ref = model(x, generator=torch.Generator().manual_seed(0))
        x2 = {"precipitation": x["precipitation"].clone()}
        x2["precipitation"][..., :5] += 100.0  # change only sea pixels (targets there)
        got = model(x2, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(ref.targets["precipitation"], got.targets["precipitation"])
    # predictions change too (the sea pixels are encoder input), so compare against the
    # loss recomputed without the sea values
    valid = cm.losses.token_valid_mask_from_pixels(
        ~sea,
        10,
        got.splits["precipitation"].ids_predict,
        patch_index=tok.valid_patch_index,  # type: ignore[arg-type]
    )
    want = cm.masked_mse_loss(
        got.preds["precipitation"], got.targets["precipitation"],
        padding_mask=got.splits["precipitation"].predict_padding_mask,
        valid_mask=valid & got.target_valid["precipitation"],
    )  # fmt: skip
    torch.testing.assert_close(got.losses["precipitation"], want)
    with pytest.raises(ValueError, match="average"):
        ModalityLoss(average="site")
