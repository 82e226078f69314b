"""The downstream water model (REFERENCE.md, "The downstream model's exact choices") as one
`MultimodalMAE`, built by passing parts (issue 10 item 3).

Every choice on that list is a part or a composite option here:

* post-norm encoder layers, ReLU feed-forward of width 4·d, dropout 0.1
  (`PostNormTransformerEncoder`), raster 6 layers, series 4, fusion 1, then LayerNorm;
* series FiLM ``x = γ·LN(x + f(x)) + β`` with ``Tanh(Linear(11 → 2d))`` per layer from the
  **raw** static attributes averaged over the sample's visible patches (``cond_dim=11`` and
  ``Modality(cond_fn=visible_site_mean(8))``);
* series tokens: the mean of a patch's real catchments → ``Linear(1 → d)``, and a static
  token ``Linear(11 → d)``: the user's own tokenizer and static token below, which crossmae
  accepts through the `Tokenizer` protocol (crossmae's `SeriesTokenizer` projects the 8
  values plus their missing flags instead, ``Linear(16 → d)``);
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

import math
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

import crossmae as cm
from crossmae.models.multimodal import Modality, ModalityLoss, MultimodalMAE, visible_site_mean

ORIGINAL = 26_449_212
RASTERS = ("precipitation", "soil_moisture", "temperature")
SERIES = ("evaporation", "river_flow")


class MeanSeriesTokenizer(nn.Module):
    """The downstream series tokens: per (step, site group) the mean of its observed real
    sites → ``Linear(1 → d)``, + learned spatial + sin-cos step + modality. A token with no
    observed site is padding (True)."""

    def __init__(self, dim: int, num_sites: int, group_size: int) -> None:
        super().__init__()
        self.dim, self.num_sites, self.group_size = dim, num_sites, group_size
        self.num_patches = math.ceil(num_sites / group_size)
        self.proj = nn.Linear(1, dim)
        self.spatial = nn.Parameter(torch.randn(self.num_patches, dim) * 0.02)
        self.modality = nn.Parameter(torch.randn(dim) * 0.02)

    def _grouped(self, x: Tensor, site_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        observed = torch.isfinite(x)  # [b s t]
        if site_padding_mask is not None:
            observed = observed & ~site_padding_mask[..., None]
        fill = self.num_patches * self.group_size - self.num_sites
        values = torch.where(observed, x, x.new_zeros(()))
        values = nn.functional.pad(values, (0, 0, 0, fill))
        observed = nn.functional.pad(observed, (0, 0, 0, fill), value=False)
        pattern = "b (p g) t -> b t p g"
        return (
            rearrange(values, pattern, g=self.group_size),
            rearrange(observed, pattern, g=self.group_size),
        )

    def forward(
        self, x: Tensor, site_padding_mask: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        values, observed = self._grouped(x, site_padding_mask)
        mean = values.sum(-1) / observed.sum(-1).clamp(min=1).to(values.dtype)  # [b t P]
        steps = torch.arange(x.shape[-1], device=x.device)
        time = cm.sincos_pos_embed_1d(self.dim, steps)[:, None, :]  # [t 1 d]
        h = self.proj(mean[..., None]) + self.spatial + time + self.modality
        pad = ~observed.any(dim=-1)
        return rearrange(h, "b t p d -> b (t p) d"), rearrange(pad, "b t p -> b (t p)")

    def targets(
        self, x: Tensor, site_padding_mask: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        values, observed = self._grouped(x, site_padding_mask)
        pattern = "b t p g -> b (t p) g"
        return rearrange(values, pattern), rearrange(observed, pattern)

    def layout_to_tokens(self, values: Tensor) -> Tensor:
        return values.transpose(1, 2).flatten(1, 2)  # [b P t ...] -> [b (t P) ...]

    def num_tokens(self, num_steps: int) -> int:
        return num_steps * self.num_patches


class RawStaticToken(nn.Module):
    """``Linear(11 → d)`` of the sample's static attributes averaged over its real sites."""

    per_site = True

    def __init__(self, num_attributes: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(num_attributes, dim)

    def forward(
        self, static: Tensor, site_padding_mask: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        real = torch.isfinite(static)
        if site_padding_mask is not None:
            real = real & ~site_padding_mask[..., None]
        values = torch.where(real, static, static.new_zeros(()))
        mean = values.sum(1) / real.sum(1).clamp(min=1).to(values.dtype)
        token = self.proj(mean)[:, None]
        return token, torch.zeros(token.shape[:2], dtype=torch.bool, device=token.device)


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
        stok = MeanSeriesTokenizer(dim, num_sites, group)
        modalities[name] = Modality(
            stok, cm.PostNormTransformerEncoder(dim, depths[1], heads, proj_drop=0.0, cond_dim=attrs),
            decoder(stok.num_patches, group, None), masking=masking,
            static_token=RawStaticToken(attrs, dim), num_steps=max_steps,
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
