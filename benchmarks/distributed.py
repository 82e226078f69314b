"""Data-parallel equivalence, checkpoint resume and scaling of the image and water models.

    # CPU (gloo), tiny models: the checks the test suite runs
    python benchmarks/distributed.py --model image --strategy fsdp --steps 4 --json a.json
    torchrun --nproc_per_node=2 benchmarks/distributed.py --model image --strategy fsdp \\
        --steps 4 --json b.json
    # two GPUs (nccl), real shapes, bf16 autocast
    torchrun --nproc_per_node=2 benchmarks/distributed.py --model water --size real \\
        --strategy ddp --steps 20 --global-batch 8 --json water2.json

Every step draws one **global** batch and its masks from ``--seed`` and the step number, and
rank ``r`` of ``W`` trains on rows ``[r*b, (r+1)*b)`` with ``b = global_batch / W``. So a run
on one process and a run on ``W`` processes see the same samples and the same masks, and
their per-step global losses (the mean of the ranks' losses) must agree: that is what
``--json`` records, with the step times and the peak memory.

``--save-at K --ckpt DIR`` saves model and optimizer after step ``K`` with
``torch.distributed.checkpoint`` (a sharded checkpoint under FSDP2); ``--resume DIR`` loads
it (on any number of processes) and continues from step ``K + 1``, so its first loss must
equal the uninterrupted run's loss at step ``K + 1``. ``--time`` drops the equality setup
and measures throughput at a fixed per-rank batch (``--batch-size``).

Without ``torchrun`` the script runs as a single process (world size 1, same code path).
The water model's half-missing batches: samples ``0, 2, 4, ...`` of every global batch have
no river flow (all NaN), so every rank sees a mix for any even per-rank batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import crossmae as cm
from crossmae.distributed import global_multimodal_loss
from crossmae.models import ImageCrossMAEConfig, build_image_crossmae
from crossmae.models.water import water_mae_small

WATER_TINY = dict(
    num_steps=4, image_size=(60, 40), num_land_patches=10, num_sites=40, embed_dim=32,
    decoder_dim=16, num_heads=4, decoder_num_heads=4,
)  # fmt: skip
RASTERS = ("precipitation", "soil_moisture", "temperature")


def _init_single_process_env() -> None:
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


# ----------------------------------------------------------------------------- models
def build_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)  # identical initial weights on every rank (FSDP2 needs it)
    if args.model == "image":
        if args.size == "real":
            return cm.crossmae_vit_base()
        cfg = ImageCrossMAEConfig(
            img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
        )  # fmt: skip
        return build_image_crossmae(cfg)
    return water_mae_small(**(WATER_TINY if args.size == "tiny" else {}))


def shard_units(model: nn.Module) -> Iterator[nn.Module]:
    """The blocks FSDP2 shards one by one (each an all-gather / reduce-scatter unit)."""
    for name, module in model.named_modules():
        if name.endswith(".blocks") and isinstance(module, nn.ModuleList):
            yield from module


def wrap(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for unit in list(shard_units(model)):
        fully_shard(unit)
    fully_shard(model)
    return model


# ----------------------------------------------------------------------------- data
def _gen(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + step)


def image_batch(args: argparse.Namespace, step: int, n: int) -> tuple[Tensor, cm.MaskSplit]:
    g = _gen(args.seed, step)
    size = 224 if args.size == "real" else 32
    patches = (size // (16 if args.size == "real" else 8)) ** 2
    imgs = torch.randn(n, 3, size, size, generator=g)
    split = cm.random_masking(n, patches, 0.75, predict_ratio=0.25, generator=g)
    return imgs, split


def water_batch(args: argparse.Namespace, step: int, n: int) -> tuple[dict[str, Tensor], Tensor]:
    g = _gen(args.seed, step)
    t, (h, w), sites = (4, (60, 40), 40) if args.size == "tiny" else (30, (290, 180), 604)
    inputs = {k: torch.randn(n, t, h, w, generator=g) for k in RASTERS}
    inputs["evaporation"] = torch.randn(n, sites, t, generator=g)
    flow = torch.randn(n, sites, t, generator=g)
    flow[0::2] = float("nan")  # half of every batch has no river flow at all
    inputs["river_flow"] = flow
    return inputs, torch.randn(n, sites, 11, generator=g)


def slice_split(split: cm.MaskSplit, rows: slice, device: torch.device) -> cm.MaskSplit:
    return type(split)(*(f[rows].to(device) for f in split))


def make_step_inputs(
    args: argparse.Namespace, model: nn.Module, step: int, rank: int, world: int, b: int,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """This rank's share of the global batch of ``step``, masks drawn on the global batch."""
    rows = slice(rank * b, (rank + 1) * b)
    if args.model == "image":
        imgs, split = image_batch(args, step, world * b)
        return {"imgs": imgs[rows].to(device), "split": slice_split(split, rows, device)}
    inputs, static = water_batch(args, step, world * b)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with torch.no_grad():
        tokenized = inner.tokenize({k: v.to(device) for k, v in inputs.items()})
        pads = {k: v[1] for k, v in tokenized.items()}
        splits = inner.make_splits(pads, generator=_gen(args.seed + 1, step))
    return {
        "inputs": {k: v[rows].to(device) for k, v in inputs.items()},
        "static": static[rows].to(device),
        "splits": {k: slice_split(s, rows, device) for k, s in splits.items()},
    }


def forward_loss(
    model: Callable[..., Any], batch: dict[str, Any], weights: Optional[dict[str, float]]
) -> Tensor:
    """The step's loss; with ``weights`` the water loss is normalised over the global batch."""
    if "imgs" in batch:
        return model(batch["imgs"], split=batch["split"]).loss
    out = model(batch["inputs"], static=batch["static"], splits=batch["splits"])
    return out.loss if weights is None else global_multimodal_loss(out, weights)


# ----------------------------------------------------------------------------- checkpoint
def save(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def load(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


# ----------------------------------------------------------------------------- main loop
def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.time:
        b = args.batch_size
    else:
        if args.global_batch % world:
            raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world}")
        b = args.global_batch // world
    model = build_model(args).to(device)
    model = wrap(model, args.strategy, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    start = 1
    if args.resume:
        load(model, opt, args.resume)
        start = args.save_at + 1
    fwd: Callable[..., Any] = torch.compile(model) if args.compile else model
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    weights = None
    if args.model == "water" and args.loss == "global":
        weights = {k: float(m.loss_weight) for k, m in inner.modalities.items()}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    losses: list[float] = []
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(start, args.steps + 1):
        # Timed runs reuse one batch (data preparation is not what is measured).
        batch = make_step_inputs(
            args, model, 1 if args.time else step, rank, world, b, device
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with amp:
            loss = forward_loss(fwd, batch, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        global_loss = loss.detach().float().reshape(1)
        dist.all_reduce(global_loss)  # sum of the ranks' means; equal shares -> / world
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(global_loss) / world)
        if args.save_at and step == args.save_at and args.ckpt:
            save(model, opt, args.ckpt)
    warm = times[min(3, len(times) - 1) :]
    out = {
        "model": args.model, "size": args.size, "strategy": args.strategy, "world": world,
        "per_rank_batch": b, "compile": args.compile, "loss": args.loss, "first_step": start, "losses": losses,
        "step_ms_median": statistics.median(warm),
        "samples_per_s": world * b / (statistics.median(warm) / 1e3),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else None,
    }  # fmt: skip
    del model, opt, fwd
    return out


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["image", "water"], default="image")
    p.add_argument("--size", choices=["tiny", "real"], default="tiny")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--steps", type=int, default=4, help="last step number (from 1)")
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="per rank, with --time")
    p.add_argument("--time", action="store_true", help="throughput at a fixed per-rank batch")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--loss", choices=["global", "local"], default="global",
        help="water: normalise by the global number of scored samples, or per rank",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--ckpt", default="")
    p.add_argument("--resume", default="", help="checkpoint saved with --save-at/--ckpt")
    p.add_argument("--json", default="", help="rank 0 writes the result here")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.resume and not args.save_at:
        p.error("--resume needs --save-at (the step the checkpoint was saved after)")

    _init_single_process_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    try:
        result = run(args, device)
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f)
        # Every rank done with every collective before any tears its group down: a rank
        # whose peer had already closed its gloo connections could abort at exit
        # ("terminate called without an active exception", seen in CI after training had
        # finished on both ranks).
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
