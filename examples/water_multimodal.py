"""A small multimodal hydrology MAE (`water_mae_small`) on synthetic but plausible data.

The data: daily weather over an irregular island (a land mask; sea pixels are NaN) from
1987 to 1990: random rain cells with orographic enhancement, temperature from a seasonal
cycle and a lapse rate, potential evaporation from temperature, soil moisture from a bucket
per pixel. Catchments are disks on the island; each turns its mean rainfall into river flow
with a conceptual rainfall-runoff model (a soil store feeding a linear reservoir) whose
parameters come from its static attributes (area, slope, soil depth, permeability, clay...).
River flow is missing (all NaN) for every window that starts before 1989.

The model sees three rasters ``[b, t, H, W]``, two catchment series ``[b, sites, t]``
(evaporation, river flow) and 11 static attributes per catchment ``[b, sites, 11]``; 40% of
every step's tokens are hidden and reconstructed. Shows: batches that mix samples with and
without river flow give finite losses (the ``missing`` flag and the NaN placeholders both
remove a sample's flow tokens); per-modality losses on a validation set under a fixed mask;
a hydrograph (observed vs reconstructed flow on the hidden days of one catchment) and a
raster reconstruction. After the default 100 steps the smooth fields (temperature, soil
moisture, evaporation) are reconstructed well; rain cells and river flow need much longer.

Run (needs the ``examples`` extra)::

    python examples/water_multimodal.py            # 100 steps, ~35 s on a CPU
    python examples/water_multimodal.py --quick    # CI size

Writes ``hydrograph.png`` and ``raster.png`` under ``--out-dir`` (default ``examples/out/``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from einops import rearrange
from torch import Tensor

import crossmae as cm
from crossmae.models import MultimodalOutput, water_mae_small

H, W, PATCH, T, SITES, GROUP, SITE = 40, 30, 5, 8, 24, 4, 5
RASTERS, SERIES = ("precipitation", "soil_moisture", "temperature"), ("evaporation", "river_flow")


def simulate(days: int, g: torch.Generator) -> dict[str, Tensor]:
    """Daily fields from 1987-01-01: rasters ``[days, H, W]``, series ``[days, SITES]``."""
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    r = torch.hypot((yy - H / 2) / (0.42 * H), (xx - W / 2) / (0.42 * W))
    theta = torch.atan2(yy - H / 2, xx - W / 2)
    shore = 1 + 0.22 * torch.sin(3 * theta + 1) + 0.12 * torch.cos(5 * theta)
    land = r < shore
    elev = (1 - r / shore).clamp(min=0) * 1500  # m, highest in the middle
    # catchments: disks around random land pixels, with attributes
    cells = torch.nonzero(land & (r < 0.8 * shore))
    centre = cells[torch.randperm(len(cells), generator=g)[:SITES]].float() + 0.5
    radius = 1.5 + 2.5 * torch.rand(SITES, generator=g)
    dist = torch.hypot(yy[None] - centre[:, 0, None, None], xx[None] - centre[:, 1, None, None])
    member = ((dist <= radius[:, None, None]) & land).float()  # [sites H W]
    member = member / member.sum((1, 2), keepdim=True)
    gy, gx = torch.gradient(elev, spacing=5000.0)  # 5 km pixels
    slope = (member * torch.hypot(gy, gx)).sum((1, 2))
    soil_depth = 300 + 900 * torch.rand(SITES, generator=g)  # mm
    perm, forest, clay = torch.rand(3, SITES, generator=g) * torch.tensor([[1.0], [1.0], [0.5]])
    capacity = 0.3 * soil_depth  # mm of water the soil store holds
    k = 0.05 + 20 * slope + 0.2 * perm  # 1/day, steep and permeable catchments react fast
    area = math.pi * radius**2 * 25  # km2
    precip = torch.zeros(days, H, W)
    temp = torch.zeros(days, H, W)
    soil = torch.full((H, W), 80.0)
    sm = torch.zeros(days, H, W)
    store, reservoir = 0.5 * capacity, torch.zeros(SITES)
    flow, evap = torch.zeros(days, SITES), torch.zeros(days, SITES)
    anomaly = 0.0
    for d in range(days):
        season = math.sin(2 * math.pi * (d % 365 - 105) / 365)
        anomaly = 0.8 * anomaly + 1.5 * float(torch.randn(1, generator=g))
        temp[d] = 12 + 9 * season - 6.5e-3 * elev + anomaly
        for _ in range(int(torch.poisson(torch.tensor(1.2 - 0.6 * season), generator=g))):
            cy, cx, size, depth = torch.rand(4, generator=g) * torch.tensor([H, W, 6, 30])
            cell = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size + 2) ** 2))
            precip[d] += depth * cell * (1 + elev / 1000)  # mm/day, orographic uplift
        pet = 0.2 * (temp[d] + 5).clamp(min=0)  # mm/day, from temperature
        soil = (soil + precip[d] - pet * soil / 150).clamp(0, 150)
        sm[d] = soil / 150
        p_c, pet_c = (member * precip[d]).sum((1, 2)), (member * pet).sum((1, 2))
        wet = (store / capacity).clamp(0, 1)
        runoff = p_c * wet ** (1 + 4 * clay)  # HBV-style effective rainfall
        evap[d] = pet_c * wet
        store = (store + p_c - runoff - evap[d]).clamp(min=0)
        reservoir = reservoir + runoff + (store - capacity).clamp(min=0)
        store = store.clamp(max=capacity)
        q = k.clamp(max=0.9) * reservoir
        reservoir = reservoir - q
        flow[d] = q * area / 86.4  # mm/day over the area -> m3/s
    sea = ~land
    static = torch.stack(
        [area, (member * elev).sum((1, 2)), slope, soil_depth, perm, forest, clay,
         (member * precip.mean(0)).sum((1, 2)), (member * temp.mean(0)).sum((1, 2)),
         centre[:, 0], centre[:, 1]], dim=-1,
    )  # fmt: skip
    return {
        "precipitation": precip.masked_fill(sea, math.nan),
        "soil_moisture": sm.masked_fill(sea, math.nan),
        "temperature": temp.masked_fill(sea, math.nan),
        "evaporation": evap, "river_flow": flow, "land": land,
        "static": (static - static.mean(0)) / static.std(0),
    }  # fmt: skip


def normalize(data: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
    """z-score every modality in place (precipitation and flow after log1p); return stats."""
    stats = {}
    for name in RASTERS + SERIES:
        x = data[name].log1p() if name in ("precipitation", "river_flow") else data[name]
        finite = x[x.isfinite()]
        stats[name] = (finite.mean().item(), finite.std().item())
        data[name] = (x - stats[name][0]) / stats[name][1]
    return stats


def batch(data: dict[str, Tensor], starts: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Windows of T days: inputs, static ``[b, sites, 11]`` and the "before 1989" flag."""
    days = starts[:, None] + torch.arange(T)
    inputs = {n: data[n][days] for n in RASTERS}  # [b t H W]
    inputs.update({n: data[n][days].transpose(1, 2) for n in SERIES})  # [b sites t]
    before_1989 = starts < 2 * 365
    inputs["river_flow"] = inputs["river_flow"].masked_fill(before_1989[:, None, None], math.nan)
    return inputs, data["static"].expand(len(starts), -1, -1), before_1989


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description="Train water_mae_small on synthetic hydrology.")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny model: 1 is best)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--quick", action="store_true", help="CI size: 10 steps")
    p.add_argument("--cuda", action="store_true", help="train on CUDA if available")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 10
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)  # data and batches
    mask_gen = torch.Generator(device).manual_seed(args.seed)  # masks: on the model's device
    data = simulate(4 * 365, g)  # 1987..1990; 1987 is spin-up
    stats = normalize(data)
    valid = cm.valid_patches_from_mask(data["land"], PATCH)  # True = land patch
    model = water_mae_small(
        image_size=(H, W), patch_size=(PATCH, PATCH), valid_patch_mask=valid, num_steps=T,
        num_sites=SITES, group_size=GROUP, embed_dim=64, num_heads=4, raster_depth=2,
        series_depth=2, decoder_dim=32, decoder_depth=2, decoder_num_heads=4,
        loss_weights=(1.0,) * 5,  # the data are z-scored, so every modality counts alike
    ).to(device)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    starts = torch.arange(365, 4 * 365 - T)
    val_starts = starts[torch.randperm(len(starts), generator=g)[:32]]

    def evaluate() -> tuple[MultimodalOutput, dict[str, Tensor], Tensor]:
        inputs, static, missing = batch(data, val_starts)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            out = model.eval()(
                inputs, static=static.to(device), missing={"river_flow": missing.to(device)},
                generator=torch.Generator(device).manual_seed(1234),  # same mask every time
            )  # fmt: skip
        model.train()
        return out, inputs, missing

    first = {k: v.item() for k, v in evaluate()[0].losses.items()}
    for step in range(args.steps):
        b_starts = starts[torch.randint(len(starts), (args.batch_size,), generator=g)]
        inputs, static, missing = batch(data, b_starts)
        out = model(
            {k: v.to(device) for k, v in inputs.items()}, static=static.to(device),
            missing={"river_flow": missing.to(device)}, generator=mask_gen,
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step % max(args.steps // 5, 1) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {out.loss.item():.4f}  "
                  f"({int(missing.sum())}/{len(missing)} samples without river flow)")  # fmt: skip

    out, inputs, missing = evaluate()
    print(f"\n{'validation loss':<16}{'start':>9}{'end':>9}")
    for name, loss in out.losses.items():
        print(f"{name:<16}{first[name]:>9.4f}{loss.item():>9.4f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(out, inputs, missing, stats, valid, args.out_dir)
    print(f"wrote {args.out_dir / 'hydrograph.png'}\n      {args.out_dir / 'raster.png'}")
    return {name: loss.item() for name, loss in out.losses.items()}


def full_tokens(out: MultimodalOutput, name: str, n: int) -> Tensor:
    """Predictions pasted back into the full token sequence ``[b, n, values]`` (0 elsewhere)."""
    split = out.splits[name]
    return cm.scatter_tokens(
        out.preds[name], split.ids_predict, n, padding_mask=split.predict_padding_mask
    )


def plot(
    out: MultimodalOutput,
    inputs: dict[str, Tensor],
    missing: Tensor,
    stats: dict[str, tuple[float, float]],
    valid: Tensor,
    out_dir: Path,
) -> None:
    """Hydrograph of catchment SITE and soil moisture on day 1, for the first validation window
    that has river flow."""
    i, groups, lv = int(torch.nonzero(~missing)[0]), SITES // GROUP, int(valid.sum())
    pred = rearrange(full_tokens(out, "river_flow", T * groups), "b (t p) g -> b (p g) t", p=groups)
    hidden = rearrange(out.splits["river_flow"].predict_mask, "b (t p) -> b p t", p=groups)
    hidden, days = hidden[i, SITE // GROUP].cpu(), torch.arange(T).numpy()
    mean, std = stats["river_flow"]  # undo the z-score and the log1p
    obs, rec = (
        (z[i, SITE].cpu() * std + mean).expm1().numpy() for z in (inputs["river_flow"], pred)
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(days, obs, "k-", label="observed")
    ax.plot(days[~hidden], obs[~hidden], "ko", label="observed, visible")
    ax.plot(days[hidden], rec[hidden], "rs", label="reconstructed (hidden days)")
    ax.set(xlabel="day of window", ylabel="river flow (m³/s)", title=f"catchment {SITE}")
    ax.legend(fontsize=8)
    fig.savefig(out_dir / "hydrograph.png", dpi=100, bbox_inches="tight")

    def image(land_patches: Tensor) -> Tensor:  # [Lv, k] of one step -> [H, W], sea NaN
        grid = torch.full((valid.numel(), PATCH * PATCH), math.nan)
        grid[valid] = land_patches.float()
        return cm.unpatchify(grid[None, None], PATCH, (H, W), layout="bthw")[0, 0]

    name = "soil_moisture"  # tokens n = t * Lv + v over the Lv land patches, time-major
    pred = rearrange(full_tokens(out, name, T * lv), "b (t v) k -> b t v k", v=lv)[i, 0].cpu()
    hid = rearrange(out.splits[name].predict_mask, "b (t v) -> b t v", v=lv)[i, 0, :, None].cpu()
    truth = cm.patchify(inputs[name][i : i + 1, :1].cpu(), PATCH, layout="bthw")[0, 0, valid]
    panels = {
        "observed": image(truth),
        "visible (grey = hidden)": image(truth.masked_fill(hid, math.nan)),
        "reconstruction": image(torch.where(hid, pred, truth)),
    }
    grey = image(torch.where(hid, 1.0, math.nan).expand_as(truth)).numpy()
    lo, hi = (
        panels["observed"].nanquantile(0.02).item(),
        panels["observed"].nanquantile(0.98).item(),
    )
    fig, axes = plt.subplots(1, 3, figsize=(9, 4))
    for ax, (title, img) in zip(axes, panels.items()):
        ax.imshow(img.numpy(), cmap="YlGnBu", vmin=lo, vmax=hi)
        if title.startswith("visible"):
            ax.imshow(grey, cmap="Greys", vmin=0, vmax=3)  # NaN stays transparent
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("soil moisture (z-score), day 1 of the window; white = sea (not tokenized)")
    fig.savefig(out_dir / "raster.png", dpi=100, bbox_inches="tight")
    plt.close("all")


if __name__ == "__main__":
    main()
