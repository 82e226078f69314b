"""The downstream water model (REFERENCE.md, "The downstream model's exact choices") as one
`MultimodalMAE`, built by passing parts (issue 10 item 3).

Every choice on that list is a part or a composite option here:

* post-norm encoder layers, ReLU feed-forward of width 4·d, dropout 0.1
  (`PostNormTransformerEncoder`), raster 6 layers, series 4, fusion 1, then LayerNorm;
* series FiLM ``x = γ·LN(x + f(x)) + β`` with ``Tanh(Linear(11 → 2d))`` per layer from the
  **raw** static attributes averaged over the sample's visible patches (``cond_dim=11`` and
  ``Modality(cond_fn=visible_site_mean(8))``);
* series tokens: the mean of a patch's real catchments → ``Linear(1 → d)``
  (``SeriesTokenizer(group_reduce="mean")``), and a static token ``Linear(11 → d)`` of the
  attributes averaged over the real catchments (``StaticToken(missing_flags=False)``);
* learned spatial embedding per patch + sin-cos of the step + a modality embedding; decoder
  queries from an injected module (`SpatioTemporalQueryPos`: learned table over all 522 / 76
  patches + sin-cos step);
* decoders: cross-attention without q/kv bias, dropout 0.1 (``drop``, ``attn_drop``);
* any number of steps up to ``max_time_steps`` at run time;
* losses: series averaged per real site (``ModalityLoss(average="value")``), rasters over a
  pixel land mask (``ModalityLoss(pixel_valid_mask=...)``);
* masks from the data loader (``hidden_masks``), per (sample, step).

The full-size model is counted (26,449,212 parameters in the original); a small one with
the same wiring trains a step.

Legend: ``b`` batch, ``s`` sites, ``t`` steps, ``P`` site groups, ``d`` width.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import crossmae as cm
from crossmae.models.multimodal import Modality, ModalityLoss, MultimodalMAE, visible_site_mean

ORIGINAL = 26_449_212
RASTERS = ("precipitation", "soil_moisture", "temperature")
SERIES = ("evaporation", "river_flow")


def downstream_model(
    *,
    dim: int = 256,
    decoder_dim: int = 128,
    heads: int = 8,
    depths: tuple[int, int, int] = (6, 4, 1),
    decoder_depth: int = 4,
    max_steps: int = 30,
    image_size: tuple[int, int] = (290, 180),
    patch: int = 10,
    num_land: int = 94,
    num_sites: int = 604,
    group: int = 8,
    attrs: int = 11,
) -> MultimodalMAE:
    """The downstream architecture, wired from parts (defaults: its real sizes)."""
    grid = (image_size[0] // patch) * (image_size[1] // patch)
    land = cm.models.default_land_patches(grid, num_land)
    pixels = land.reshape(image_size[0] // patch, image_size[1] // patch)
    pixel_land = pixels.repeat_interleave(patch, 0).repeat_interleave(patch, 1)  # [H, W]
    masking = cm.models.grouped_masking_fn(0.39)

    def decoder(num_patches: int, out_dim: int, index: Optional[Tensor]) -> cm.CrossMAEDecoder:
        qpos = cm.SpatioTemporalQueryPos(num_patches, decoder_dim, max_steps, patch_index=index)
        return cm.CrossMAEDecoder(
            dim, decoder_dim, decoder_depth, heads, out_dim, qkv_bias=False, drop=0.1,
            attn_drop=0.1, pos_embed=None, modality_embed=True, query_pos=qpos,
        )  # fmt: skip

    modalities: dict[str, Modality] = {}
    for name, weight in zip(RASTERS, (100.0, 10.0, 10.0)):
        tok = cm.RasterTokenizer(
            dim, patch, image_size, valid_patch_mask=land, spatial_embed="learned",
            modality_embed=True,
        )  # fmt: skip
        loss = ModalityLoss(
            pixel_valid_mask=pixel_land, patch_size=patch, patch_index=tok.valid_patch_index
        )
        modalities[name] = Modality(
            tok, cm.PostNormTransformerEncoder(dim, depths[0], heads),
            decoder(grid, patch * patch, tok.valid_patch_index), masking=masking,
            loss_weight=weight, num_steps=max_steps, loss=loss,
        )  # fmt: skip
    for name in SERIES:
        stok = cm.SeriesTokenizer(
            dim, num_sites, group_size=group, modality_embed=True, group_reduce="mean"
        )
        modalities[name] = Modality(
            stok, cm.PostNormTransformerEncoder(dim, depths[1], heads, proj_drop=0.0, cond_dim=attrs),
            decoder(stok.num_patches, group, None), masking=masking,
            static_token=cm.StaticToken(attrs, dim, per_site=True, missing_flags=False), num_steps=max_steps,
            loss=ModalityLoss(average="value"), cond_fn=visible_site_mean(group),
        )  # fmt: skip
    return MultimodalMAE(modalities, cm.PostNormTransformerEncoder(dim, depths[2], heads))


def test_downstream_parameter_count() -> None:
    model = downstream_model()
    total = sum(p.numel() for p in model.parameters())
    print(
        f"downstream water model from crossmae parts: {total:,} parameters (original {ORIGINAL:,})"
    )
    assert total == ORIGINAL


def test_downstream_wiring_trains_with_loader_masks() -> None:
    """The same wiring at a small size: masks from the 'loader' in the input layout, fewer
    steps than built, samples without river flow, padding sites; one step, every parameter
    reached, finite gradients."""
    torch.manual_seed(0)
    model = downstream_model(
        dim=32, decoder_dim=16, heads=4, depths=(2, 2, 1), decoder_depth=1, max_steps=4,
        image_size=(40, 30), num_land=6, num_sites=10, group=4,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    b, t = 3, 3  # 3 of the 4 steps the model is built for
    x = {m: torch.randn(b, t, 40, 30, generator=g) for m in RASTERS}
    x.update({m: torch.randn(b, 10, t, generator=g) for m in SERIES})
    x["river_flow"][0] = float("nan")  # "before 1989"
    spm = torch.zeros(b, 10, dtype=torch.bool)
    spm[2, 7:] = True
    static = torch.randn(b, 10, 11, generator=g)
    hidden = {m: torch.rand(b, t, 12, generator=g) < 0.4 for m in RASTERS}
    hidden.update({m: torch.rand(b, 3, t, generator=g) < 0.4 for m in SERIES})
    out = model(x, static=static, site_padding_mask=spm, hidden_masks=hidden)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert not out.splits["river_flow"].visible_mask[0].any()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
