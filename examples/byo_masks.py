"""Bring your own masks: the downstream water model's collate layout, in miniature.

The masks are drawn in the data pipeline (here: the DataLoader's ``collate_fn``), one per
(sample, step), in each modality's *input layout* and with MAE's polarity (True = hidden):

* rasters ``[B, T, gh*gw]`` over the **full** patch grid; one mask shared by the three
  rasters, hiding the same number of land patches at every (sample, step); cells over the
  sea are not tokens and are ignored;
* series ``[B, P, T]`` over site groups (patches of ``group_size`` sites) x steps.

The train loop moves only tensors to the device and hands the masks to
``MultimodalMAE.forward(hidden_masks=...)``. Tokenizer padding wins over the masks: the
samples without river flow (all NaN, "before 1989") get no river-flow token at all.

Claim checked at the end (exit status 1 otherwise): every hidden cell was hidden from the
encoder and every other real token was visible, samples without river flow had no
river-flow token, and the loss fell while training on these masks.

Run: ``python examples/byo_masks.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import crossmae as cm

RASTERS = ("precipitation", "soil_moisture", "temperature")
SERIES = ("evaporation", "river_flow")
T, IMAGE, PATCH, LAND = 4, (40, 30), 10, 6  # 4x3 patch grid, 6 land patches
SITES, GROUP, ATTRS = 12, 4, 11  # 3 site groups
GRID = (IMAGE[0] // PATCH) * (IMAGE[1] // PATCH)
GROUPS = -(-SITES // GROUP)


class Catchments(Dataset[dict[str, Tensor]]):
    """Synthetic samples: smooth rasters ``[T, H, W]``, series ``[S, T]``, static ``[S, a]``;
    every third sample has no river flow (NaN)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(n, 1, 4, 3, generator=g)
        grid = torch.nn.functional.interpolate(base, size=IMAGE, mode="bilinear")
        self.rasters = {
            m: grid.expand(n, T, *IMAGE) + 0.1 * i for i, m in enumerate(RASTERS)
        }  # [n T H W]
        self.series = {m: torch.randn(n, SITES, 1, generator=g).expand(n, SITES, T) for m in SERIES}
        self.series["river_flow"] = self.series["river_flow"].clone()
        self.series["river_flow"][::3] = float("nan")
        self.static = torch.randn(n, SITES, ATTRS, generator=g)

    def __len__(self) -> int:
        return self.static.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {m: self.rasters[m][i] for m in RASTERS}
        item.update({m: self.series[m][i] for m in SERIES})
        item["static"] = self.static[i]
        return item


def make_collate(land: Tensor, hide: int, seed: int):  # type: ignore[no-untyped-def]
    """A collate_fn stacking samples and drawing the masks (True = hidden): per (sample,
    step), ``hide`` of the land patches (shared by the rasters) and half the site groups."""
    g = torch.Generator().manual_seed(seed)
    land_ids = land.nonzero().squeeze(1)

    def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch = torch.utils.data.default_collate(items)
        b = batch["static"].shape[0]
        order = torch.rand(b, T, land_ids.numel(), generator=g).argsort(dim=-1)
        raster = torch.zeros(b, T, GRID, dtype=torch.bool)  # [B, T, gh*gw]
        raster[..., land_ids] = order < hide  # hide the first `hide` land patches drawn
        batch["mask:raster"] = raster
        series = torch.rand(b, GROUPS, T, generator=g).argsort(dim=1) < GROUPS // 2  # [B, P, T]
        batch["mask:series"] = series
        return batch

    return collate


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="CI size (fewer steps)")
    args = parser.parse_args(argv)
    steps = 25 if args.quick else args.steps
    torch.manual_seed(0)
    land = cm.models.default_land_patches(GRID, LAND)
    model = cm.water_mae_small(
        num_steps=T, image_size=IMAGE, patch_size=(PATCH, PATCH), valid_patch_mask=land,
        num_sites=SITES, group_size=GROUP, embed_dim=32, num_heads=4, decoder_dim=16,
        decoder_num_heads=4, decoder_depth=1, raster_depth=1, series_depth=1,
    )  # fmt: skip
    loader = DataLoader(
        Catchments(8), batch_size=4, shuffle=False, collate_fn=make_collate(land, 2, seed=1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    device = torch.device("cpu")
    losses: list[float] = []
    ok_masks = ok_missing = True
    while len(losses) < steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # tensors only
            hidden = {m: batch["mask:raster"] for m in RASTERS}
            hidden.update({m: batch["mask:series"] for m in SERIES})
            x = {m: batch[m] for m in RASTERS + SERIES}
            out = model(x, static=batch["static"], hidden_masks=hidden)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
            pads = {m: p for m, (_, p) in model.tokenize(x).items()}
            for m in RASTERS + SERIES:
                tok = model.modalities[m].tokenizer
                h = tok.layout_to_tokens(hidden[m])  # type: ignore[operator]
                ok_masks &= bool(torch.equal(out.splits[m].visible_mask, ~h & ~pads[m]))
            no_flow = torch.isnan(x["river_flow"]).all(dim=(1, 2))
            flow = out.splits["river_flow"]
            ok_missing &= not bool((flow.visible_mask | flow.predict_mask)[no_flow].any())
            if len(losses) >= steps:
                break
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss over the first 5 steps {first:.4f}, over the last 5 {last:.4f}")
    print(f"hidden cells hidden, other real tokens visible: {ok_masks}")
    print(f"no river-flow token for samples without river flow: {ok_missing}")
    claim = ok_masks and ok_missing and last < first
    print("claim holds" if claim else "CLAIM FAILED")
    return 0 if claim else 1


if __name__ == "__main__":
    sys.exit(main())
