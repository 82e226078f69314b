"""Pretrain a tiny image CrossMAE on scikit-learn's digits, on a CPU, in about a minute.

Shows: an `ImageCrossMAE` built from a config with `build_image_crossmae`, trained with
CrossMAE's partial reconstruction (75% of the patches hidden, only 25% decoded and scored);
a reproducible validation loss (fixed-seed mask); `ImageCrossMAE.reconstruct`, which decodes
*every* hidden patch in one pass; and the same model with MAE's self-attention decoder
(``use_cross_attn=False``) trained on the same batches, with final losses and wall times
side by side.

Data: the 1797 8x8 digits shipped with scikit-learn (no download), upsampled to 16x16 and
cut into 2x2 patches (an 8x8 grid of 64 patches); 20% are held out for validation.

Run (needs the ``examples`` extra: ``pip install -e ".[examples]"``)::

    python examples/digits_crossmae.py            # full run, under 2 minutes on 2 CPU cores
    python examples/digits_crossmae.py --quick    # CI-sized smoke run, a few seconds
    python examples/digits_crossmae.py --steps 3000 --batch-size 64 --cuda

It writes ``reconstructions.png`` and ``loss.png`` under ``--out-dir`` (default
``examples/out/``) and returns the numbers it prints.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm import tqdm

import crossmae as cm
from crossmae.models import ImageCrossMAE, ImageCrossMAEConfig, build_image_crossmae

IMG, PATCH = 16, 2
CONFIG = ImageCrossMAEConfig(
    img_size=IMG, patch_size=PATCH, in_chans=1, embed_dim=64, depth=4, num_heads=4,
    decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
    mask_ratio=0.75, predict_ratio=0.25,
)  # fmt: skip


class Run(NamedTuple):
    model: ImageCrossMAE
    train_loss: list[float]
    val_steps: list[int]
    val_loss: list[float]
    seconds: float


def load_data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float ``[n, 1, 16, 16]`` in [0, 1], split (fixed seed) into train / val."""
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    imgs = F.interpolate(digits, size=(IMG, IMG), mode="bilinear", align_corners=False)
    order = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(0))
    n_val = len(imgs) // 5
    return imgs[order[n_val:]].to(device), imgs[order[:n_val]].to(device)


@torch.no_grad()
def val_loss(model: ImageCrossMAE, val: torch.Tensor) -> float:
    """Loss on the validation set under the same fixed-seed mask every time."""
    model.eval()
    loss = model(val, generator=torch.Generator().manual_seed(1234)).loss
    model.train()
    return float(loss)


def train(
    cfg: ImageCrossMAEConfig, name: str, data: tuple[torch.Tensor, ...], args: argparse.Namespace
) -> Run:
    torch.manual_seed(args.seed)
    train_x, val_x = data
    model = build_image_crossmae(cfg).to(train_x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)  # batches and masks: same for both decoders
    run = Run(model, [], [], [], 0.0)
    start = time.perf_counter()
    for step in (bar := tqdm(range(args.steps), desc=f"{name:>8}")):
        idx = torch.randint(len(train_x), (args.batch_size,), generator=gen)
        loss = model(train_x[idx.to(train_x.device)], generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run.train_loss.append(loss.item())
        if step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
            run.val_steps.append(step)
            run.val_loss.append(val_loss(model, val_x))
            bar.set_postfix(train=f"{loss.item():.4f}", val=f"{run.val_loss[-1]:.4f}")
    return run._replace(seconds=time.perf_counter() - start)


def plot(runs: dict[str, Run], val_x: torch.Tensor, baseline: float, out_dir: Path) -> None:
    # Encode a random 25% of the patches, then decode *all* hidden ones in one pass.
    x = val_x[:10]
    split = runs["CrossMAE"].model.random_split(
        len(x), generator=torch.Generator().manual_seed(7), device=x.device
    )
    visible = split.visible_mask[..., None].expand(-1, -1, PATCH * PATCH)
    visible = cm.unpatchify(visible, PATCH, IMG)  # bool [b, 1, H, W], True = seen
    rows = {"original": x, "visible (grey = hidden)": torch.where(visible, x, 0.5)}
    for name, run in runs.items():
        with torch.no_grad():
            rows[f"{name}: full reconstruction"] = run.model.eval().reconstruct(x, split)
    fig, axes = plt.subplots(len(rows), len(x), figsize=(len(x), 1.15 * len(rows)))
    for r, (label, imgs) in enumerate(rows.items()):
        axes[r, 0].set_title(label, loc="left", fontsize=8)
        for c in range(len(x)):
            axes[r, c].imshow(imgs[c, 0].clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].axis("off")
    fig.savefig(out_dir / "reconstructions.png", dpi=100, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        window = min(20, len(run.train_loss))
        smooth = torch.tensor(run.train_loss).unfold(0, window, 1).mean(1).numpy()  # running mean
        steps = range(window - 1, len(run.train_loss))
        ax.plot(steps, smooth, alpha=0.4, label=f"{name} train (running mean)")
        ax.plot(run.val_steps, run.val_loss, marker="o", ms=3, label=f"{name} validation")
    ax.axhline(baseline, color="grey", ls="--", label="predict the mean image")
    ax.set(
        xlabel="step", ylabel="masked MSE", yscale="log", title="digits: CrossMAE vs MAE decoder"
    )
    ax.legend()
    fig.savefig(out_dir / "loss.png", dpi=100, bbox_inches="tight")
    plt.close("all")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description="Pretrain a tiny CrossMAE (and an MAE) on digits.")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny model: 1 is best)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--quick", action="store_true", help="CI size: 30 steps")
    p.add_argument("--cuda", action="store_true", help="train on CUDA if available")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 30
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(device)
    runs = {
        "CrossMAE": train(CONFIG, "CrossMAE", data, args),
        "MAE": train(replace(CONFIG, use_cross_attn=False), "MAE", data, args),
    }
    baseline = (data[1] - data[0].mean(0)).square().mean().item()
    plot(runs, data[1], baseline, args.out_dir)

    results: dict[str, dict[str, float]] = {}
    print(
        f"\n{'decoder':<10}{'first loss':>11}{'final train':>13}{'final val':>11}{'time (s)':>10}"
    )
    for name, run in runs.items():
        last = run.train_loss[-min(20, len(run.train_loss)) :]  # mean of the last 20 steps
        r = results[name] = {
            "first_loss": run.train_loss[0], "final_train_loss": sum(last) / len(last),
            "first_val_loss": run.val_loss[0], "final_val_loss": run.val_loss[-1],
            "seconds": run.seconds,
        }  # fmt: skip
        cells = (r["first_loss"], r["final_train_loss"], r["final_val_loss"])
        print(f"{name:<10}{cells[0]:>11.4f}{cells[1]:>13.4f}{cells[2]:>11.4f}{r['seconds']:>10.1f}")
    print(f"(predicting the mean image scores {baseline:.4f}; validation mask seed fixed)")
    print(f"wrote {args.out_dir / 'reconstructions.png'}\n      {args.out_dir / 'loss.png'}")
    return results


if __name__ == "__main__":
    main()
