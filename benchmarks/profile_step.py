"""Profile one training step (decoder-only or water model) and print the top kernels/ops."""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from crossmae.decoders import CrossMAEDecoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["decoder", "water"])
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.what == "decoder":
        b, n = 256, 196
        ctx = torch.randn(b, 50, 768, device=dev, requires_grad=True)
        ids = torch.rand(b, n, device=dev).argsort(1)[:, :49].sort(1).values
        dec = CrossMAEDecoder(768, 512, 8, 16, 768, num_tokens=n).to(dev)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = dec(ctx, ids)
            out.float().square().mean().backward()
    else:
        from crossmae.models.water import water_mae_small

        model = water_mae_small().to(dev)
        b = 8
        inputs = {
            k: torch.randn(b, 30, 290, 180, device=dev)
            for k in ("precipitation", "soil_moisture", "temperature")
        }
        inputs["evaporation"] = torch.randn(b, 604, 30, device=dev)
        inputs["river_flow"] = torch.randn(b, 604, 30, device=dev)
        static = torch.randn(b, 604, 11, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(inputs, static=static, generator=g)
            out.loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60
        )
    )
    print(
        prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)
    )


if __name__ == "__main__":
    main()
