"""A small multimodal hydrology MAE (`water_mae_small`) on synthetic but plausible data.

The data: daily weather over an irregular island (a land mask; sea pixels are NaN) from
1987 to 1990: random rain cells with orographic enhancement, temperature from a seasonal
cycle and a lapse rate, potential evaporation from temperature, soil moisture from a bucket
per pixel. Catchments are disks on the island; each turns its mean rainfall into river flow
with a conceptual rainfall-runoff model (a soil store feeding a linear reservoir) whose
parameters come from its static attributes (area, slope, soil depth, permeability, clay...).
River flow is missing (all NaN) for every window that starts before 1989.

The linear reservoir drains 5-50% of its water a day, so a day's rain reaches the river
over several days (lag-1 autocorrelation of daily flow 0.67-0.93 across the catchments).

The model sees three rasters ``[b, t, H, W]`` (10x10-pixel patches over land), two
catchment series ``[b, sites, t]`` (evaporation, river flow; 4 catchments per token) and
11 static attributes per catchment ``[b, sites, 11]``; 39% of every modality's tokens are
hidden and reconstructed. It trains on 8-day windows inside 1988-1989 (so half of them
have no river flow: the ``missing`` flag and the NaN placeholders both remove a sample's
flow tokens, and the loss stays finite) and is tested on the consecutive 8-day windows of
1990, which it never saw, under one fixed mask.

The metric is the one hydrologists use, the Nash-Sutcliffe efficiency (NSE: 1 is perfect,
0 is no better than the catchment's own mean), per catchment over its hidden days of 1990
in physical units (m³/s, mm/day), reported as the median over the 24 catchments for each
series modality. The claim: median NSE >= 0.5 for river flow and >= 0.7 for evaporation
(measured at the defaults: see the README); the script exits with status 1 otherwise.
``hydrograph.png`` shows one catchment's flow over 96 days of 1990 with the reconstructed
hidden days, ``raster.png`` a soil-moisture reconstruction.

Run (in a clone, with the ``examples`` extra)::

    python examples/water_multimodal.py            # 500 steps of 32, ~1.5 min on 2 CPU cores
    python examples/water_multimodal.py --quick    # CI size: 40 steps of 16, a weaker claim

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

H, W, PATCH, T, SITES, GROUP, SITE = 40, 30, 10, 8, 24, 4, 5
RASTERS, SERIES = ("precipitation", "soil_moisture", "temperature"), ("evaporation", "river_flow")
STEPS, QUICK_STEPS, QUICK_BATCH = 500, 40, 16
# z-scored data, so each modality counts alike; river flow (the target a hydrologist cares
# about, and the hardest) counts 4 times.
LOSS_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)
# The claim: median Nash-Sutcliffe efficiency over the catchments, on the hidden days of 1990.
MIN_NSE = {"evaporation": 0.7, "river_flow": 0.5}
# --quick (CI): a weaker claim, still better than each catchment's own mean for river flow.
QUICK_MIN_NSE = {"evaporation": 0.5, "river_flow": 0.0}


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
    # 1/day: steep and permeable catchments react fast, and a day's rain drains over days
    k = (0.05 + 5 * slope + 0.25 * perm).clamp(max=0.5)
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
        q = k * reservoir
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


def series_on_days(out: MultimodalOutput, name: str, values: Tensor) -> Tensor:
    """``values [b, p, GROUP]`` at the predicted tokens of a series -> ``[b, SITES, T]``
    (0 at tokens that were not predicted)."""
    full = full_tokens(out._replace(preds={**out.preds, name: values}), name, T * SITES // GROUP)
    return rearrange(full, "b (t p) g -> b (p g) t", p=SITES // GROUP)


def hidden_series(
    out: MultimodalOutput, name: str, stats: dict[str, tuple[float, float]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Observed and reconstructed values of a series on its hidden, scored days, in physical
    units: ``obs, rec [b, SITES, T]`` and ``scored [b, SITES, T]`` (True = hidden and
    observed, i.e. a value the loss scored)."""
    mean, std = stats[name]
    obs, rec = (
        series_on_days(out, name, z.float()) * std + mean
        for z in (out.targets[name], out.preds[name])
    )
    if name == "river_flow":  # undo the log1p
        obs, rec = obs.expm1(), rec.expm1()
    scored = series_on_days(out, name, out.target_valid[name].float()) > 0.5
    return obs, rec, scored


def nse(obs: Tensor, rec: Tensor, scored: Tensor) -> Tensor:
    """Nash-Sutcliffe efficiency of each catchment over its scored days ``[SITES]``:
    ``1 - sum (rec - obs)^2 / sum (obs - mean obs)^2`` (1 = perfect, 0 = no better than the
    catchment's mean over those days; NaN for a catchment with fewer than 2 scored days)."""
    w = scored.float()
    n = w.sum((0, 2))
    obs_mean = (obs * w).sum((0, 2)) / n.clamp(min=1)
    err = ((rec - obs) ** 2 * w).sum((0, 2))
    var = ((obs - obs_mean[None, :, None]) ** 2 * w).sum((0, 2))
    return torch.where(n >= 2, 1 - err / var, torch.nan)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Train, evaluate on 1990, plot, print, and check the claim (``SystemExit(1)`` if not)."""
    p = argparse.ArgumentParser(description="Train water_mae_small on synthetic hydrology.")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny model: 1 is best)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"CI size: {QUICK_STEPS} steps of {QUICK_BATCH}, weaker claim",
    )
    p.add_argument("--cuda", action="store_true", help="train on CUDA if available")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size = QUICK_STEPS, QUICK_BATCH
    claim = QUICK_MIN_NSE if args.quick else MIN_NSE
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
        loss_weights=LOSS_WEIGHTS,
    ).to(device)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    # Train on windows inside 1988-1989 (river flow from 1989 on), test on 1990: consecutive
    # windows, so the hydrograph is a continuous stretch of days the model never trained on.
    train_starts = torch.arange(365, 3 * 365 - T + 1)
    val_starts = torch.arange(3 * 365, 4 * 365 - T + 1, T)

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
        b_starts = train_starts[torch.randint(len(train_starts), (args.batch_size,), generator=g)]
        inputs, static, missing = batch(data, b_starts)
        out = model(
            {k: v.to(device) for k, v in inputs.items()}, static=static.to(device),
            missing={"river_flow": missing.to(device)}, generator=mask_gen,
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        if step % max(args.steps // 5, 1) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {out.loss.item():.4f}  "
                  f"({int(missing.sum())}/{len(missing)} samples without river flow)")  # fmt: skip

    out, inputs, missing = evaluate()
    print(
        f"\n{'1990, hidden tokens':<20}{'loss at start':>14}{'loss at end':>12}{'median NSE':>12}"
    )
    results = {}
    for name, loss in out.losses.items():
        score = ""
        if name in SERIES:
            per_site = nse(*hidden_series(out, name, stats))
            results[f"nse_{name}"] = per_site.nanmedian().item()
            score = f"{results[f'nse_{name}']:>12.3f}"
        results[name] = loss.item()
        print(f"{name:<20}{first[name]:>14.4f}{loss.item():>12.4f}{score}")
    print(
        f"(NSE: per catchment over its hidden days of 1990, in m³/s and mm/day; median of {SITES})"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(out, inputs, stats, valid, args.out_dir)
    print(f"wrote {args.out_dir / 'hydrograph.png'}\n      {args.out_dir / 'raster.png'}")
    ok = all(results[f"nse_{name}"] >= claim[name] for name in SERIES)
    verdict = "PASS" if ok else "FAIL"
    wanted = ", ".join(f"{name} >= {claim[name]}" for name in SERIES)
    got = ", ".join(f"{name} {results[f'nse_{name}']:.3f}" for name in SERIES)
    print(
        f"{verdict}: median NSE on the hidden days of 1990: {got} (claim{' (--quick)' if args.quick else ''}: {wanted})"
    )
    if not ok:
        raise SystemExit(1)
    return results


def full_tokens(out: MultimodalOutput, name: str, n: int) -> Tensor:
    """Predictions pasted back into the full token sequence ``[b, n, values]`` (0 elsewhere)."""
    split = out.splits[name]
    return cm.scatter_tokens(
        out.preds[name], split.ids_predict, n, padding_mask=split.predict_padding_mask
    )


def plot(
    out: MultimodalOutput,
    inputs: dict[str, Tensor],
    stats: dict[str, tuple[float, float]],
    valid: Tensor,
    out_dir: Path,
) -> None:
    """Hydrograph of catchment SITE over the first 12 validation windows (96 consecutive days
    of 1990), and soil moisture on day 1 of the first window."""
    i, lv = 0, int(valid.sum())
    obs, rec, scored = (
        x[:12, SITE].flatten().cpu() for x in hidden_series(out, "river_flow", stats)
    )
    mean, std = stats["river_flow"]
    truth = (inputs["river_flow"][:12, SITE].flatten().cpu() * std + mean).expm1()
    days = torch.arange(len(truth)).numpy()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(days, truth.numpy(), "k-", lw=1, label="observed")
    ax.plot(days[scored], rec[scored].numpy(), "rs", ms=4, label="reconstructed (hidden days)")
    ax.plot(days[scored], obs[scored].numpy(), "k.", ms=4, label="observed on those days")
    score = nse(obs[None, None], rec[None, None], scored[None, None]).item()
    ax.set(
        xlabel="day of 1990", ylabel="river flow (m³/s)",
        title=f"catchment {SITE}, 1990 (never trained on): NSE on the hidden days {score:.2f}",
    )  # fmt: skip
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
