"""Data-parallel CrossMAE pretraining on random images, under ``torchrun``: DDP or FSDP2.

    torchrun --standalone --nproc_per_node=2 examples/ddp_pretrain.py --strategy ddp --steps 3
    torchrun --standalone --nproc_per_node=2 examples/ddp_pretrain.py --strategy fsdp --steps 3

Backend gloo on CPU, nccl on CUDA. Every rank builds the same model (same seed), reads its
own shard of the data (`DistributedSampler`) and draws its own masks (a generator seeded by
its rank). At the end each rank prints ``rank R: loss=... checksum=...``; the checksums of
the full parameters must agree across ranks and the loss must be finite, else the script
exits non-zero.
"""

from __future__ import annotations

import argparse
import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from crossmae.models import ImageCrossMAE, ImageCrossMAEConfig, build_image_crossmae


class PretrainLoss(nn.Module):
    """The training objective, ``images [b, C, H, W] -> scalar loss``: what each rank runs.

    The model's own output also carries ``pred``, a view of the decoder head's output. The
    root module that FSDP2 wraps returns only the loss, a fresh tensor: FSDP2 hooks every
    output that needs a gradient, and warns about views among them, since an in-place op on
    a view would bypass the hook (and with it the backward all-gather).
    """

    def __init__(self, model: ImageCrossMAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.model(images, generator=generator).loss


def wrap(model: ImageCrossMAE, strategy: str) -> nn.Module:
    """``PretrainLoss(model)`` under DDP or FSDP2: ``module(images, generator) -> loss``."""
    if strategy == "ddp":
        # broadcasts rank 0's weights at construction
        return DistributedDataParallel(PretrainLoss(model))
    try:
        from torch.distributed.fsdp import fully_shard  # public since torch 2.6
    except ImportError as err:
        raise SystemExit(f"--strategy fsdp needs torch >= 2.6, found {torch.__version__}") from err
    for block in [*model.encoder.blocks, *model.decoder.blocks]:
        fully_shard(block)  # one all-gather / reduce-scatter unit per block
    root = PretrainLoss(model)
    fully_shard(root)  # the rest: patch embedding, cls token, decoder norms and head
    return root  # FSDP2 shards in place: the same modules, their parameters now DTensors


def checksum(model: nn.Module) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p  # FSDP2: gather the shards
        total += full.detach().double().sum().cpu()
    return float(total)


def train(args: argparse.Namespace, device: torch.device) -> None:
    """Train, then check that every rank holds the same parameters (raises if not)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # identical initial weights on every rank (FSDP2 needs it)
    cfg = ImageCrossMAEConfig(
        img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
        decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
    )  # fmt: skip
    model = wrap(build_image_crossmae(cfg).to(device), args.strategy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    images = torch.randn(world * args.batch_size * args.steps, 3, 32, 32)  # same everywhere
    data = TensorDataset(images)
    sampler: DistributedSampler[tuple[Tensor, ...]] = DistributedSampler(
        data, world, rank, seed=args.seed
    )  # a different shard per rank
    loader = DataLoader(data, args.batch_size, sampler=sampler)
    masks = torch.Generator().manual_seed(args.seed + 1000 * (rank + 1))  # per-rank masks

    sampler.set_epoch(0)
    loss = torch.zeros(())
    for step, (x,) in enumerate(loader):
        if step == args.steps:
            break
        loss = model(x.to(device), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces / FSDP2 reduce-scatters the gradients here
        opt.step()

    ours = torch.tensor([checksum(model)], dtype=torch.float64, device=device)
    every = [torch.empty_like(ours) for _ in range(world)]
    dist.all_gather(every, ours)
    for r in range(world):  # one rank at a time, so that lines never interleave
        if r == rank:
            print(f"rank {rank}: loss={loss.item():.6f} checksum={ours.item()!r}", flush=True)
        dist.barrier()
    if any(not torch.equal(t, ours) for t in every):
        raise SystemExit(f"rank {rank}: parameters differ across ranks: {every}")
    if not (torch.isfinite(loss) and torch.isfinite(ours).all()):
        raise SystemExit(f"rank {rank}: non-finite loss {loss.item()} or checksum {ours.item()}")


def main() -> None:
    parser = argparse.ArgumentParser(description="CrossMAE pretraining under torchrun")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="collective timeout, s")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    try:
        train(args, device)
    finally:
        # The model, optimizer and any pending communication work are gone once train()
        # returns; collect them now, while the interpreter is fully alive, then tear the
        # process group down. Backend work objects that outlive the interpreter can abort
        # the process at exit (seen with gloo + FSDP2 under load).
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
