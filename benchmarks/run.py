"""crossmae benchmark suite: one command, one table, ratios measured in the same run.

    python benchmarks/run.py            # everything that fits the device (GPU: full sizes)
    python benchmarks/run.py --cpu      # CPU-sized variant of sections 1, 2, 4 and 5 (< 2 min)
    python benchmarks/run.py --only decoder,varlen --json out.json

Sections: 1 decoder only (CrossMAE vs MAE decoder), 2 image CrossMAE ViT-B/16 training
step, 3 water model at its real shapes, 4 variable-length cost, 5 aten ops per eager
training step (the host-launch bound), 0 attention kernels and packed-path correctness (GPU). Timings are medians over repeated runs (CUDA events on GPU);
targets are checked by reading ratios, never by timed unit tests.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/reference.py

import crossmae as cm
from crossmae.decoders import CrossMAEDecoder, MAEDecoder
from crossmae.encoders import TransformerEncoder
from crossmae.layers import backend

ROWS: list[dict[str, Any]] = []


def log(*a: Any) -> None:
    print(*a, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn: Callable[[], Any], dev: torch.device, *, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(dev: torch.device) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    yield out
    if dev.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30


def record(section: str, name: str, **kv: Any) -> None:
    row = {"section": section, "name": name, **kv}
    ROWS.append(row)
    log(f"  {section:8s} {name:48s} " + "  ".join(f"{k}={_fmt(v)}" for k, v in kv.items()))


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def autocast(dev: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16)


def matmul_ceiling(dev: torch.device) -> float:
    """bf16 dense matmul TFLOP/s measured now (the 'ceiling' shares are relative to)."""
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, dev, warmup=3, iters=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# --------------------------------------------------------------------------- 1. decoders
def section_decoder(dev: torch.device, small: bool, compile_: bool) -> None:
    log("\n## 1. decoder only, fwd+bwd (CrossMAE vs MAE decoder)")
    b = 256 if not small else 8
    enc_dim, dim, depth, heads, n = (768, 512, 8, 16, 196) if not small else (96, 64, 2, 4, 196)
    keep = int(n * 0.25)
    ctx = torch.randn(b, 1 + keep, enc_dim, device=dev, requires_grad=True)
    ids_keep = torch.rand(b, n, device=dev).argsort(1)[:, :keep]
    results = {}
    modes = ["eager", "compiled", "compiled-cudagraphs"] if compile_ else ["eager"]
    # env CROSSMAE_BENCH_DECODER_MODES / _RATIOS: a subset, e.g. "compiled-cudagraphs" / "0.25"
    wanted = [m for m in os.environ.get("CROSSMAE_BENCH_DECODER_MODES", "").split(",") if m]
    modes = [m for m in modes if not wanted or m in wanted]
    ratios = tuple(
        float(r) for r in os.environ.get("CROSSMAE_BENCH_DECODER_RATIOS", "0.25,0.75").split(",")
    )
    for tag in modes:
        compiled = tag != "eager"
        mode = "reduce-overhead" if tag == "compiled-cudagraphs" else None
        mae = MAEDecoder(enc_dim, dim, depth, heads, 768, n).to(dev)
        fmae = torch.compile(mae, mode=mode) if compiled else mae
        for pr in ratios:
            p = int(n * pr)
            ids_pred = torch.rand(b, n, device=dev).argsort(1)[:, :p].sort(1).values
            cross = CrossMAEDecoder(enc_dim, dim, depth, heads, 768, num_tokens=n).to(dev)
            fcross = torch.compile(cross, mode=mode) if compiled else cross

            # Gradients are dropped every step, as a training step's zero_grad does: a
            # CUDA-graphed backward writes them into graph memory that the next replay reuses.
            def step_cross() -> None:
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast(dev, dev.type == "cuda"):
                    out = fcross(ctx, ids_pred)
                out.float().square().mean().backward()
                cross.zero_grad(set_to_none=True)
                ctx.grad = None

            def step_mae(fn: Callable[..., torch.Tensor] = fmae, mod: nn.Module = mae) -> None:
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast(dev, dev.type == "cuda"):
                    out = fn(ctx[:, 1:], ids_keep, ids_pred)
                out.float().square().mean().backward()
                mod.zero_grad(set_to_none=True)
                ctx.grad = None

            def step_mae_as_mae() -> None:
                # MAE's own code lets PyTorch pick every SDPA kernel: the baseline runs
                # without crossmae's kernel table (an empty table while it traces and runs)
                table = backend.kernel_table()
                backend.set_kernel_table(())
                try:
                    step_mae()
                finally:
                    backend.set_kernel_table(table)

            t_c = bench(step_cross, dev)
            t_m = bench(step_mae_as_mae, dev)
            results[(tag, pr)] = t_m / t_c
            record("decoder", f"{tag} predict={pr} crossmae", ms=t_c)
            record("decoder", f"{tag} predict={pr} mae", ms=t_m, speedup_crossmae=t_m / t_c)
            if dev.type == "cuda":  # crossmae's MAEDecoder under its kernel table, for the record
                mae_t = MAEDecoder(enc_dim, dim, depth, heads, 768, n).to(dev)
                fmae_t = torch.compile(mae_t, mode=mode) if compiled else mae_t
                t_t = bench(lambda: step_mae(fmae_t, mae_t), dev)
                record("decoder", f"{tag} predict={pr} mae, crossmae kernel table", ms=t_t)


# --------------------------------------------------------------------------- 2. image model
def section_image(dev: torch.device, small: bool, compile_: bool) -> None:

    log("\n## 2. image CrossMAE ViT-B/16 full training step (bf16 autocast, fused AdamW)")
    b = 256 if not small else 4
    size = 224 if not small else 64
    ceiling = matmul_ceiling(dev)
    record("image", "bf16 matmul ceiling", tflops=ceiling)
    configs = {
        "predict0.25+wfm(all+input)": dict(
            predict_ratio=0.25, use_weighted_fm=True, use_input=True
        ),
        "predict0.25 no-wfm": dict(predict_ratio=0.25, use_weighted_fm=False),
        "predict0.75 no-wfm": dict(predict_ratio=0.75, use_weighted_fm=False),
        "mae-decoder": dict(use_cross_attn=False, predict_ratio=0.75, use_weighted_fm=False),
    }
    wanted = [c for c in args_image_configs().split(",") if c]
    if wanted:
        configs = {k: v for k, v in configs.items() if any(w in k for w in wanted)}
    extra = (
        {}
        if not small
        else dict(
            embed_dim=96,
            depth=2,
            num_heads=4,
            decoder_embed_dim=64,
            decoder_num_heads=4,
            decoder_depth=2,
        )
    )
    imgs = torch.randn(b, 3, size, size, device=dev)
    for compiled in [False, True] if compile_ else [False]:
        for name, kw in configs.items():
            _image_row(dev, imgs, b, name, {**kw, **extra}, size, compiled, ceiling)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _image_row(
    dev: torch.device,
    imgs: torch.Tensor,
    b: int,
    name: str,
    kw: dict[str, Any],
    size: int,
    compiled: bool,
    ceiling: float,
) -> None:
    from crossmae.models.factories import crossmae_vit_base

    torch.manual_seed(0)
    model = crossmae_vit_base(img_size=size, **kw).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    fwd = torch.compile(model) if compiled else model
    gen = torch.Generator(device=dev).manual_seed(0)

    def step() -> None:
        with autocast(dev, dev.type == "cuda"):
            out = fwd(imgs, generator=gen)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with peak_memory(dev) as mem:
        ms = bench(step, dev, warmup=3 if not compiled else 4, iters=10)
    flops = count_flops(step) if not compiled else ROWS_FLOPS.get(name)
    if not compiled and flops:
        ROWS_FLOPS[name] = flops
    row: dict[str, Any] = dict(ms=ms, img_per_s=b / (ms * 1e-3), **mem)
    if flops:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
        row["ceiling_share"] = row["tflops"] / ceiling
    record("image", f"{'compiled' if compiled else 'eager'} {name}", **row)


ROWS_FLOPS: dict[str, int] = {}


def args_image_configs() -> str:
    """Comma-separated substrings selecting image configs (env CROSSMAE_BENCH_IMAGE)."""
    import os

    return os.environ.get("CROSSMAE_BENCH_IMAGE", "")


# --------------------------------------------------------------------------- 3. water model
WATER_SMALL = dict(
    num_steps=4, image_size=(60, 40), num_land_patches=10, num_sites=40, embed_dim=32,
    decoder_dim=16, num_heads=4, decoder_num_heads=4,
)  # fmt: skip


def water_batch(
    dev: torch.device, b: int, t: int, hw: tuple[int, int], sites: int, half_missing: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random water-model inputs (3 rasters, 2 series) and static attributes; with
    ``half_missing`` the first half of the batch has no river flow at all."""
    inputs = {
        n: torch.randn(b, t, *hw, device=dev)
        for n in ("precipitation", "soil_moisture", "temperature")
    }
    inputs["evaporation"] = torch.randn(b, sites, t, device=dev)
    rf = torch.randn(b, sites, t, device=dev)
    if half_missing:
        rf[: b // 2] = float("nan")
    inputs["river_flow"] = rf
    return inputs, torch.randn(b, sites, 11, device=dev)


def water_batches(small: bool) -> list[tuple[int, bool]]:
    """Batches of section 3: env CROSSMAE_BENCH_WATER_BATCHES, e.g. ``8:1,64:1`` (batch :
    half missing river flow), default 8 and 16, each with and without river flow."""
    env = os.environ.get("CROSSMAE_BENCH_WATER_BATCHES", "")
    if env:
        out = []
        for item in env.split(","):
            b, _, half = item.partition(":")
            out.append((int(b), half.strip() in ("1", "true", "True")))
        return out
    return [(8, False), (8, True)] + ([] if small else [(16, False), (16, True)])


def section_water(dev: torch.device, small: bool, compile_: bool) -> None:
    from crossmae.models.water import water_mae_small

    log("\n## 3. water model at its default shapes (bf16 autocast, AdamW)")
    kw: dict[str, Any] = WATER_SMALL if small else {}
    model = water_mae_small(**kw).to(dev)
    cfg_t = 4 if small else 30
    h, w = (60, 40) if small else (290, 180)
    sites = 40 if small else 604
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    # Compiled: masks are drawn outside the compiled forward (`draw_splits`, eager) and the
    # forward is one graph given the splits.
    compile_backend = os.environ.get("CROSSMAE_BENCH_BACKEND", "inductor")
    # modes: eager, eager-unfused (decoders one by one), compiled, regional
    modes = os.environ.get("CROSSMAE_BENCH_WATER_MODES", "eager,compiled,regional").split(",")
    compiled = (
        torch.compile(model, fullgraph=True, backend=compile_backend)
        if compile_ and "compiled" in modes
        else None
    )
    regional: Optional[torch.nn.Module] = None
    if compile_ and "regional" in modes:
        regional = water_mae_small(**kw).to(dev)
        regional.load_state_dict(model.state_dict())
        log(f"regional compile: {cm.compile_blocks(regional, backend=compile_backend)} blocks")
        opt_r = torch.optim.AdamW(regional.parameters(), lr=1e-4, fused=dev.type == "cuda")
    for b, half_missing in water_batches(small):
        g = torch.Generator(device=dev).manual_seed(0)
        inputs, static = water_batch(dev, b, cfg_t, (h, w), sites, half_missing)
        bad = torch.zeros((), dtype=torch.int64, device=dev)  # no host sync per step

        def step_eager() -> None:
            with autocast(dev, dev.type == "cuda"):
                out = model(inputs, static=static, generator=g)
            out.loss.backward()
            bad.add_((~torch.isfinite(out.loss.detach())).long())
            opt.step()
            opt.zero_grad(set_to_none=True)

        def step_unfused() -> None:  # the decoders one by one (MultimodalMAE(fuse_decoders=False))
            model.fuse_decoders = False
            try:
                step_eager()
            finally:
                model.fuse_decoders = True

        def step_compiled() -> None:
            assert compiled is not None
            splits = model.draw_splits(inputs, generator=g)
            with autocast(dev, dev.type == "cuda"):
                out = compiled(inputs, static=static, splits=splits)
            out.loss.backward()
            bad.add_((~torch.isfinite(out.loss.detach())).long())
            opt.step()
            opt.zero_grad(set_to_none=True)

        def step_regional() -> None:
            assert regional is not None
            with autocast(dev, dev.type == "cuda"):
                out = regional(inputs, static=static, generator=g)
            out.loss.backward()
            bad.add_((~torch.isfinite(out.loss.detach())).long())
            opt_r.step()
            opt_r.zero_grad(set_to_none=True)

        steps = [("eager", step_eager)] if "eager" in modes else []
        if "eager-unfused" in modes:
            steps.append(("eager-unfused", step_unfused))
        if compiled is not None:
            steps.append(("compiled", step_compiled))
        if regional is not None:
            steps.append(("regional-compiled", step_regional))
        for tag, step in steps:
            bad.zero_()
            name = f"{tag} batch={b} half_missing_river_flow={half_missing}"
            try:
                with peak_memory(dev) as mem:
                    t0 = time.perf_counter()
                    step()  # first step (compiles in the compiled modes)
                    sync(dev)
                    first_s = time.perf_counter() - t0
                    ms = bench(step, dev, warmup=2, iters=8)
                record(
                    "water",
                    name,
                    ms=ms,
                    samples_per_s=b / (ms * 1e-3),
                    first_step_s=first_s,
                    nonfinite_steps=int(bad),
                    **mem,
                )
            except torch.cuda.OutOfMemoryError:
                record("water", name, ms="OOM")


# --------------------------------------------------------------------------- 4. variable length
def section_varlen(dev: torch.device, small: bool, compile_: bool) -> None:
    log("\n## 4. variable length: equal lengths vs lengths uniform in [N/4, N], same real tokens")
    b, n, dim, depth, heads = (8, 2048, 256, 4, 8) if not small else (4, 256, 64, 2, 4)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(n // 4, n + 1, (b,), generator=g)
    total = int(lengths.sum())
    equal = total // b
    enc = TransformerEncoder(dim, depth, heads).to(dev)
    x_eq = torch.randn(b, equal, dim, device=dev, requires_grad=True)
    x_var = torch.randn(b, n, dim, device=dev, requires_grad=True)
    pad = cm.lengths_to_padding_mask(lengths.to(dev), n)

    def run(x: torch.Tensor, p: Optional[torch.Tensor]) -> Callable[[], None]:
        def f() -> None:
            with autocast(dev, dev.type == "cuda"):
                out = enc(x, p).tokens
            out.float().square().mean().backward()

        return f

    capacity = -(-total // 128) * 128  # a bucket: real tokens rounded up to 128 rows

    def run_packed() -> None:
        packed = cm.pack_tokens(x_var, pad, capacity)
        with autocast(dev, dev.type == "cuda"):
            out = enc.forward_packed(packed).tokens
        out.float().square().mean().backward()

    def run_capacity() -> None:  # padded in, padded out: the encoder packs internally
        with autocast(dev, dev.type == "cuda"):
            out = enc(x_var, pad, capacity=capacity).tokens
        out.float().square().mean().backward()

    t_a = bench(run(x_eq, None), dev)
    t_b = bench(run(x_var, pad), dev)
    t_c = bench(run_packed, dev)
    t_d = bench(run_capacity, dev)
    record("varlen", f"encoder d={dim}x{depth} b={b} equal len={equal}", ms=t_a)
    record(
        "varlen",
        f"encoder lengths U[{n // 4},{n}] padded to {n}",
        ms=t_b,
        ratio_b_over_a=t_b / t_a,
        padded_share=1 - total / (b * n),
    )
    record(
        "varlen",
        f"same lengths packed (pack_tokens, capacity {capacity})",
        ms=t_c,
        ratio_c_over_a=t_c / t_a,
    )
    record(
        "varlen",
        f"padded to {n}, capacity {capacity} (enc(x, pad, capacity=))",
        ms=t_d,
        ratio_d_over_a=t_d / t_a,
    )


# --------------------------------------------------------------------------- 0. kernels (GPU)
def section_kernels(dev: torch.device, small: bool, compile_: bool) -> None:
    if dev.type != "cuda":
        return
    from crossmae.layers import _flex, _varlen

    log("\n## 0. attention kernels at the water model's shapes (bf16, fwd+bwd, B=8, 8 heads)")
    log(f"  varlen available: {_varlen.varlen_available()}, flex: {_flex.flex_available()}")
    b, h = 8, 8
    for name, nq, nk, d in (
        ("fusion self-attn", 7892, 7892, 32),
        ("decoder cross-attn", 1110, 7892, 16),
    ):
        q = torch.randn(b, h, nq, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, h, nk, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, h, nk, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        lengths = torch.randint(nk // 2, nk + 1, (b,), generator=torch.Generator().manual_seed(1))
        lengths[0] = 0
        kpad = cm.lengths_to_padding_mask(lengths.to(dev), nk)
        kpad = kpad[:, torch.randperm(nk, device=dev)]  # scattered padding, not only trailing
        qpad = kpad if nq == nk else None

        def fb(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def f() -> None:
                fn().float().sum().backward()

            return f

        t_none = bench(fb(lambda: F.scaled_dot_product_attention(q, k, v)), dev)
        empty = kpad.all(1)
        att = (~kpad | empty[:, None])[:, None, None, :]
        t_mask = bench(fb(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=att)), dev)
        row: dict[str, Any] = dict(unmasked_ms=t_none, bool_mask_ms=t_mask)
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=att
            ).masked_fill(empty[:, None, None, None], 0)
        real_q = torch.ones(b, nq, dtype=torch.bool, device=dev) if qpad is None else ~qpad
        kernels: dict[str, Callable[[], torch.Tensor]] = {}
        if _varlen.varlen_available():
            kernels["varlen"] = lambda: _varlen.varlen_attend(q, k, v, kpad, qpad)
        if _flex.can_use_flex(q, 0.0):
            kernels["flex"] = lambda: _flex.flex_attend(q, k, v, kpad)
        for kname, fn in kernels.items():
            row[f"{kname}_ms"] = bench(fb(fn), dev)
            with torch.no_grad():
                out = fn().float().masked_fill(empty[:, None, None, None], 0)
            diff = (out - ref).permute(0, 2, 1, 3)[real_q].abs().max()
            row[f"{kname}_max_abs_err"] = float(diff)
            row[f"{kname}_finite"] = bool(torch.isfinite(out).all())
        record("kernels", name, **row)


# --------------------------------------------------------------------------- 7. small heads
#: (name, queries, keys, head dim) at the water model's shapes (B=8, 8 heads)
#: (name, queries, keys, head dim[, batch, heads]): the water model's two attention shapes
#: (B=8, 8 heads), and the image CrossMAE decoder's cross-attention (49 queries over 50 keys,
#: B=256, 16 heads), where tiny sequences may favour the explicit (math) kernel.
SMALLHEAD_SHAPES: tuple[tuple[Any, ...], ...] = (
    ("fusion self-attn", 7892, 7892, 32),
    ("decoder cross-attn", 1110, 7892, 16),
    ("image decoder cross-attn", 49, 50, 32, 256, 16),
    ("image decoder cross-attn p0.75", 147, 50, 32, 256, 16),
    ("image MAE decoder self-attn", 197, 197, 32, 256, 16),
    ("image encoder self-attn", 50, 50, 64, 256, 12),
)
#: flex_attention (BLOCK_M, BLOCK_N) tried; env CROSSMAE_BENCH_FLEX_BLOCKS="128x128,64x64"
FLEX_BLOCKS = ((128, 128), (128, 64), (64, 64))


def flex_blocks() -> tuple[tuple[int, int], ...]:
    env = os.environ.get("CROSSMAE_BENCH_FLEX_BLOCKS", "")
    if not env:
        return FLEX_BLOCKS
    return tuple((int(a), int(b)) for a, b in (p.split("x") for p in env.split(",") if p))


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def f() -> None:
        fn().float().sum().backward()

    return f


def _try_bench(fn: Callable[[], None], dev: torch.device) -> Any:
    try:
        return bench(fn, dev, warmup=3, iters=10)
    except Exception as e:  # a backend refusing the shape is a result, not a failure
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def section_smallhead(dev: torch.device, small: bool, compile_: bool) -> None:
    """Flash, cuDNN, memory-efficient, varlen and flex (block sizes) at the water model's
    attention shapes, fwd+bwd; the fastest per shape as `KernelRule` lines; and the five
    decoders' cross-attention over the same keys fused into one call (heads or batch)."""
    from crossmae.layers import _flex, _segmented, _varlen

    log("\n## 7. small-head attention at the water model's shapes (fwd+bwd)")
    cuda = dev.type == "cuda"
    b0, h0, div = (8, 8, 1) if not small else (2, 2, 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    sdpa = ("flash", "cudnn", "efficient", "math") if cuda else ("math",)
    suggestions: list[str] = []
    # env CROSSMAE_BENCH_SMALLHEAD: shapes whose name starts with one of these, e.g. "image"
    only = [x for x in os.environ.get("CROSSMAE_BENCH_SMALLHEAD", "").split(",") if x]
    for name, nq, nk, d, *bh in SMALLHEAD_SHAPES:
        if only and not any(name.startswith(x) for x in only):
            continue
        b, h = bh if bh and not small else (b0, h0)
        nq, nk = max(nq // div, 8), max(nk // div, 8)
        g = torch.Generator().manual_seed(1)
        q, k, v = (
            torch.randn(b, h, n, d, generator=g).to(dev, dtype).requires_grad_()
            for n in (nq, nk, nk)
        )
        lengths = torch.randint(nk // 2, nk + 1, (b,), generator=g)
        lengths[0] = 0  # one sample without any key
        kpad = cm.lengths_to_padding_mask(lengths.to(dev), nk)
        kpad = kpad[:, torch.randperm(nk, generator=g).to(dev)]  # scattered padding
        qpad = kpad if nq == nk else None
        empty = kpad.all(1)
        att = (~kpad | empty[:, None])[:, None, None, :]
        label = f"{name} {nq}x{nk} d={d} b={b} h={h}"
        unmasked: dict[str, Any] = {}
        padded: dict[str, Any] = {}
        for be in sdpa:

            def plain(be: str = be) -> torch.Tensor:
                with backend.sdpa_context((be,)):
                    return F.scaled_dot_product_attention(q, k, v)

            def masked(be: str = be) -> torch.Tensor:
                with backend.sdpa_context((be,)):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=att)

            unmasked[be] = _try_bench(_fwd_bwd(plain), dev)
            padded[f"sdpa_mask[{be}]"] = _try_bench(_fwd_bwd(masked), dev)
        if cuda and _varlen.varlen_available():
            padded["varlen"] = _try_bench(
                _fwd_bwd(lambda: _varlen.varlen_attend(q, k, v, kpad, qpad)), dev
            )
        if cuda and _segmented.available():  # crossmae's Triton kernels, same segments
            padded["segmented"] = _try_bench(
                _fwd_bwd(
                    lambda: _varlen.varlen_attend(q, k, v, kpad, qpad, kernel=_segmented.varlen_fn)
                ),
                dev,
            )
        if cuda and _flex.can_use_flex(q, 0.0):
            from torch.nn.attention.flex_attention import flex_attention

            compiled_flex = torch.compile(flex_attention, dynamic=False)
            for bm, bn in flex_blocks():
                opts = {"BLOCK_M": bm, "BLOCK_N": bn}

                def flex(opts: dict[str, int] = opts) -> torch.Tensor:
                    def kern(*a: Any, **kw: Any) -> torch.Tensor:
                        return compiled_flex(*a, kernel_options=opts, **kw)  # type: ignore[no-any-return]

                    return _flex.flex_attend(q, k, v, kpad, kernel=kern)

                padded[f"flex[{bm}x{bn}]"] = _try_bench(_fwd_bwd(flex), dev)
        for be, ms in unmasked.items():
            record("smallhead", f"{label} unmasked sdpa[{be}]", ms=ms)
        for kname, ms in padded.items():
            record("smallhead", f"{label} padded {kname}", ms=ms)
        best_u = _fastest(unmasked)
        best_p = _fastest(padded)
        if best_u:
            suggestions.append(
                f"KernelRule(head_dim={d}, min_keys={max(nk // 2, 1)}, max_keys={nk * 2}, "
                f"padded=False, sdpa_backends=({best_u!r},))"
            )
        if best_p:
            kernel = best_p.split("[")[0]
            extra = ""
            if kernel == "sdpa_mask":
                extra = f", sdpa_backends=({best_p.split('[')[1].rstrip(']')!r},)"
            suggestions.append(
                f"KernelRule(kernel={kernel!r}, head_dim={d}, min_keys={max(nk // 2, 1)}, "
                f"max_keys={nk * 2}, padded=True{extra})"
            )
        if not name.startswith("image"):  # five decoders share keys in the water model only
            _fusion_rows(dev, label, q, k, v, kpad, att, cuda and _varlen.varlen_available())
        if cuda and _segmented.available() and os.environ.get("CROSSMAE_BENCH_SEGMENTED_SWEEP"):
            _segmented_sweep(dev, label, q, k, v, kpad, qpad)
    for line in suggestions:
        log(f"  suggested rule: {line}")


#: tiles (block_m, block_n, num_warps, num_stages) the segmented kernels' sweep tries, per
#: kernel (env CROSSMAE_BENCH_SEGMENTED_SWEEP=1 in section smallhead)
SEGMENTED_SWEEP: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "FWD_CONFIG": ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                   (128, 32, 4, 3), (64, 128, 4, 3), (128, 64, 8, 4)),
    "BWD_Q_CONFIG": ((64, 32, 4, 2), (128, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2),
                     (128, 16, 4, 2)),
    "BWD_KV_CONFIG": ((32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2),
                      (16, 128, 4, 2)),
}  # fmt: skip


def _segmented_sweep(
    dev: torch.device, label: str, q: Any, k: Any, v: Any, kpad: Any, qpad: Any
) -> None:
    """Time crossmae's segmented kernels at one shape under every tile of `SEGMENTED_SWEEP`,
    one kernel's tile at a time (the others at their defaults): the forward alone for
    ``FWD_CONFIG``, forward and backward for the backward's two kernels."""
    from crossmae.layers import _segmented, _segmented_kernels, _varlen

    d = q.shape[-1]

    def fwd() -> torch.Tensor:
        return _varlen.varlen_attend(q, k, v, kpad, qpad, kernel=_segmented.varlen_fn)

    def fwd_only() -> None:
        with torch.no_grad():
            fwd()

    for table, tiles in SEGMENTED_SWEEP.items():
        configs = getattr(_segmented_kernels, table)
        default = configs[d]
        for tile in tiles:
            configs[d] = tile
            ms = _try_bench(fwd_only if table == "FWD_CONFIG" else _fwd_bwd(fwd), dev)
            mark = " (default)" if tile == default else ""
            record("smallhead", f"{label} segmented {table} {tile}{mark}", ms=ms)
        configs[d] = default


def _fastest(times: dict[str, Any]) -> Optional[str]:
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    return min(ok, key=lambda k: ok[k]) if ok else None


def _fusion_rows(
    dev: torch.device,
    label: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kpad: torch.Tensor,
    att: torch.Tensor,
    varlen: bool,
) -> None:
    """Five decoders' attention over the same keys (own projections, so own k/v): five
    calls, or one call with the five stacked along heads or along the batch."""
    from crossmae.layers import _segmented, _varlen

    if q.shape[2] == k.shape[2]:
        return  # self-attention: nothing to fuse
    qs = [q.detach().clone().requires_grad_() for _ in range(5)]
    ks = [k.detach().clone().requires_grad_() for _ in range(5)]
    vs = [v.detach().clone().requires_grad_() for _ in range(5)]

    def five(fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: torch.stack([fn(a, b_, c, kpad, att) for a, b_, c in zip(qs, ks, vs)])

    def heads(fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: fn(torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1), kpad, att)

    def batch(fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: fn(
            torch.cat(qs, 0), torch.cat(ks, 0), torch.cat(vs, 0), kpad.repeat(5, 1),
            att.repeat(5, 1, 1, 1),
        )  # fmt: skip

    kinds: dict[str, Callable[..., torch.Tensor]] = {
        "sdpa unmasked": lambda a, b_, c, p, m: F.scaled_dot_product_attention(a, b_, c),
        "sdpa_mask": lambda a, b_, c, p, m: F.scaled_dot_product_attention(a, b_, c, attn_mask=m),
    }
    if varlen:
        kinds["varlen"] = lambda a, b_, c, p, m: _varlen.varlen_attend(a, b_, c, p)
    if varlen and _segmented.available():
        kinds["segmented"] = lambda a, b_, c, p, m: _varlen.varlen_attend(
            a, b_, c, p, kernel=_segmented.varlen_fn
        )
    for kname, fn in kinds.items():
        row = {
            "five_calls_ms": _try_bench(_fwd_bwd(five(fn)), dev),
            "fused_heads_ms": _try_bench(_fwd_bwd(heads(fn)), dev),
            "fused_batch_ms": _try_bench(_fwd_bwd(batch(fn)), dev),
        }
        record("smallhead", f"{label} x5 decoders {kname}", **row)


# --------------------------------------------------------------------------- 8. CUDA graphs
GRAPH_MODES = (
    "eager", "compiled", "reduce-overhead", "graph-eager", "graph-compiled", "graph-regional"
)  # fmt: skip


def graph_modes() -> tuple[str, ...]:
    """Modes of section 8 (env CROSSMAE_BENCH_GRAPH_MODES, comma-separated)."""
    env = [m for m in os.environ.get("CROSSMAE_BENCH_GRAPH_MODES", "").split(",") if m]
    bad = [m for m in env if m not in GRAPH_MODES]
    if bad:
        raise ValueError(f"CROSSMAE_BENCH_GRAPH_MODES: unknown {bad}; choose from {GRAPH_MODES}")
    return tuple(env) or GRAPH_MODES


def water_loss_fn(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], static: torch.Tensor
) -> Callable[[Any, torch.Generator], torch.Tensor]:
    """``loss_of(f, g)`` for section 8's water steps. ``f`` is ``model`` itself (eager, or
    blocks compiled in place): it draws its masks from ``g``. Any other ``f`` (a
    ``torch.compile`` of the whole model) gets splits drawn eagerly by
    ``model.draw_splits(inputs, generator=g)``: dynamo cannot trace a generator, and every
    draw inside the compiled forward would break its graph."""

    def loss_of(f: Any, g: torch.Generator) -> torch.Tensor:
        if f is model:
            return f(inputs, static=static, generator=g).loss  # type: ignore[no-any-return]
        splits = model.draw_splits(inputs, generator=g)  # type: ignore[operator]
        return f(inputs, static=static, splits=splits).loss  # type: ignore[no-any-return]

    return loss_of


def graph_water_batches() -> tuple[int, ...]:
    """Water batch sizes of section 8 (env CROSSMAE_BENCH_GRAPH_WATER_BATCHES, e.g. "8,16")."""
    raw = os.environ.get("CROSSMAE_BENCH_GRAPH_WATER_BATCHES", "8")
    try:
        out = tuple(int(b) for b in raw.split(",") if b)
    except ValueError:
        out = ()
    if not out or any(b < 2 or b % 2 for b in out):
        raise ValueError(
            f"CROSSMAE_BENCH_GRAPH_WATER_BATCHES: even batch sizes >= 2, e.g. '8,16'; got {raw!r}"
        )
    return out


def section_cudagraph(dev: torch.device, small: bool, compile_: bool) -> None:
    """The whole training step in CUDA graphs (issue 11 item 3): image model (predict 0.25
    + WFM, B=256) and water model (B=8, half missing river flow), each as eager, compiled,
    ``torch.compile(mode="reduce-overhead")`` and one captured CUDA graph of the whole step
    (eager forward, whole-model compiled forward, or ``graph-regional``: every block compiled
    by ``cm.compile_blocks``, the rest eager; AdamW ``capturable=True, fused=True``; masks
    drawn from a device generator inside the graph)."""
    if dev.type != "cuda":
        log("\n## 8. CUDA graphs: GPU only (the CPU test checks the step is sync-free)")
        return
    from crossmae.models import grouped_masking_fn
    from crossmae.models.factories import crossmae_vit_base
    from crossmae.models.water import water_mae_small

    log("\n## 8. whole training step in CUDA graphs (bf16 autocast, fused AdamW)")
    amp = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16, cache_enabled=False)
    wanted = os.environ.get("CROSSMAE_BENCH_GRAPH", "image,water").split(",")
    workloads: list[tuple[str, Callable[[], tuple[torch.nn.Module, Callable[..., Any]]]]] = []
    if "image" in wanted:
        imgs = torch.randn(256, 3, 224, 224, device=dev)

        def image() -> tuple[torch.nn.Module, Callable[..., Any]]:
            m = crossmae_vit_base(predict_ratio=0.25, use_weighted_fm=True, use_input=True)
            return m, lambda f, g: f(imgs, generator=g).loss

        workloads.append(("image predict0.25+wfm b=256", image))
    for wb in graph_water_batches() if "water" in wanted else ():
        inputs, static = water_batch(dev, wb, 30, (290, 180), 604, half_missing=True)

        def water(
            inputs: Any = inputs, static: Any = static
        ) -> tuple[torch.nn.Module, Callable[..., Any]]:
            m = water_mae_small()
            for mod in m.modalities.values():  # host-known split widths: no sync, static
                mod.masking = grouped_masking_fn(0.39, static_shape=True)
            return m, water_loss_fn(m, inputs, static)

        workloads.append((f"water b={wb} half_missing", water))
    for wname, build in workloads:
        for mode in graph_modes():
            torch._dynamo.reset()
            torch.manual_seed(0)
            model, loss_of = build()
            model = model.to(dev).train()
            graph = mode.startswith("graph")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graph)
            if mode in ("compiled", "graph-compiled"):
                fwd: Any = torch.compile(model)
            elif mode == "reduce-overhead":
                fwd = torch.compile(model, mode="reduce-overhead")
            else:
                if mode == "graph-regional":
                    log(f"{wname}: compile_blocks compiled {cm.compile_blocks(model)} blocks")
                fwd = model
            gen = torch.Generator(device=dev).manual_seed(0)
            bad = torch.zeros((), dtype=torch.int64, device=dev)

            def step(fwd: Any = fwd, opt: Any = opt, loss_of: Any = loss_of) -> None:
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with amp():
                    loss = loss_of(fwd, gen)
                loss.backward()
                bad.add_((~torch.isfinite(loss.detach())).long())
                opt.step()
                if not graph:
                    opt.zero_grad(set_to_none=True)

            try:
                with peak_memory(dev) as mem:
                    run = step
                    if graph:
                        run, _ = cm.capture_step(step, optimizers=[opt], generators=[gen])
                    bad.zero_()
                    ms = bench(run, dev, warmup=3, iters=10)
                record("cudagraph", f"{wname} {mode}", ms=ms, nonfinite_steps=int(bad), **mem)
            except Exception as e:
                log(traceback.format_exc(limit=6))
                record("cudagraph", f"{wname} {mode}", ms=f"error: {type(e).__name__}: {e}"[:160])
            torch.cuda.empty_cache()
    torch._dynamo.reset()


# --------------------------------------------------------------------------- 6. reference
REFERENCE_DIR: Optional[str] = None


def _image_extra(small: bool) -> dict[str, Any]:
    if not small:
        return {}
    return dict(
        embed_dim=96, depth=2, num_heads=4, decoder_embed_dim=64, decoder_num_heads=4,
        decoder_depth=2,
    )  # fmt: skip


def ref_rounds() -> int:
    """Eager rounds of section 6 (env CROSSMAE_BENCH_REF_ROUNDS, default 3)."""
    raw = os.environ.get("CROSSMAE_BENCH_REF_ROUNDS", "3")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"CROSSMAE_BENCH_REF_ROUNDS: a positive integer, got {raw!r}")
    return int(raw)


def reference_schedule(index: int, compiled: bool, rounds: int) -> tuple[tuple[str, bool], ...]:
    """Section 6's order for image config ``index``: ``(side, fresh)`` per timing, where
    ``fresh`` means the side is built (and compiled) just before it.

    Eager: both sides rebuilt every round, alternating, crossmae first. Compiled: each side
    compiled once (a second compile would double the cost), both kept, then timed in
    ``rounds`` alternating rounds. Compiled steps without CUDA graphs are bound by the
    host, whose speed drifts within a process (RESULTS.md, session 8: one compiled model
    took 30-34 ms from one timing to the next), so the rounds spread the drift over both
    sides and the compile order alternates with the config (crossmae first for even
    ``index``); every round keeps that order."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    pair = ("crossmae", "reference")
    if compiled and index % 2 == 1:
        pair = ("reference", "crossmae")
    return tuple((side, not compiled or r == 0) for r in range(rounds) for side in pair)


def section_reference(dev: torch.device, small: bool, compile_: bool) -> None:
    """crossmae and the reference CrossMAE/MAE code (``--reference DIR``) in one process:
    the three image configurations of issue 11, eager and compiled, bf16 autocast, fused
    AdamW, B=256 ViT-B/16, ``torch._dynamo.reset()`` before every eager model and before
    every compiled pair; sides timed in alternating rounds (`reference_schedule`)."""
    import reference as ref

    from crossmae.models.factories import crossmae_vit_base

    if REFERENCE_DIR is None:
        raise ValueError("section 'reference' needs --reference DIR")
    modules = ref.load_reference(REFERENCE_DIR)
    log("\n## 6. side by side with the reference code (same process, bf16, fused AdamW)")
    b = 256 if not small else 2
    size = 224 if not small else 64
    imgs = torch.randn(b, 3, size, size, device=dev)
    fused = dev.type == "cuda"
    wanted = [c for c in args_image_configs().split(",") if c]
    ref_modes = os.environ.get("CROSSMAE_BENCH_REF_MODES", "eager,compiled").split(",")
    known = ("eager", "compiled", "reduce-overhead", "graph-compiled")
    bad = [m for m in ref_modes if m not in known]
    if bad:
        raise ValueError(f"CROSSMAE_BENCH_REF_MODES: unknown {bad}; choose from {known}")
    if compile_ and "graph-compiled" in ref_modes and dev.type != "cuda":
        raise ValueError(
            f"CROSSMAE_BENCH_REF_MODES=graph-compiled captures CUDA graphs: it needs a CUDA "
            f"device, got {dev}"
        )
    for tag in ref_modes if compile_ else ["eager"]:
        compiled = tag != "eager"
        mode = "reduce-overhead" if tag == "reduce-overhead" else None
        # graph-compiled: crossmae compiled and its whole step (AdamW included) in one CUDA
        # graph; the reference cannot be captured whole (its decoder's masked_select syncs
        # with the host), so it runs its fastest capturable form, reduce-overhead
        whole = tag == "graph-compiled"

        def make_side(
            side: str, cfg: Any, compiled: bool = compiled, mode: Any = mode, whole: bool = whole
        ) -> Any:
            """One side's training step (model, fused AdamW, compiled when asked). With
            ``whole``: crossmae's step is captured with the optimizer in one CUDA graph by
            `cm.capture_step` (AdamW ``capturable=True``; masks from the default CUDA
            generator, which CUDA graphs advance on every replay), the reference's runs
            under ``reduce-overhead``."""
            capture = whole and side == "crossmae"
            if whole and side == "reference":
                mode = "reduce-overhead"
            if side == "crossmae":
                model = crossmae_vit_base(img_size=size, **cfg.crossmae, **_image_extra(small))
            else:
                model = ref.build_reference(modules, cfg)
            model = model.to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, capturable=capture)
            fwd = torch.compile(model, mode=mode) if compiled else model
            if side == "crossmae":
                # Masks from the global RNG, as the reference draws them (a generator=
                # argument is a graph break under torch.compile: dynamo cannot trace it).

                def step() -> None:
                    # a captured step needs autocast's cast cache off (capture_step's doc)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=not capture):
                        out = fwd(imgs)
                    out.loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

            else:
                step = ref.reference_step(model, fwd, opt, imgs, cfg, torch.bfloat16)
            if capture:
                step, _ = cm.capture_step(step, optimizers=[opt])
            if mode == "reduce-overhead":
                inner = step

                def step(inner: Callable[[], None] = inner) -> None:
                    torch.compiler.cudagraph_mark_step_begin()
                    inner()

            return step

        for k, cfg in enumerate(ref.IMAGE_CONFIGS):
            if wanted and not any(w in cfg.name for w in wanted):
                continue
            times: dict[str, list[float]] = {"crossmae": [], "reference": []}
            steps: dict[str, Callable[[], None]] = {}
            if compiled:
                torch._dynamo.reset()  # once per config: both compiled sides stay alive
            # reduce-overhead: one round (alternating two graphed models would re-record).
            # graph-compiled: one round, each side built, timed and freed (with a dynamo
            # reset) before the other: its first run, with the reference's reduce-overhead
            # graphs still alive, died in crossmae's capture (RESULTS.md, session 16)
            rounds = 1 if mode == "reduce-overhead" or whole else ref_rounds()
            alone = not compiled or whole  # each side fresh, and freed after its timing
            for side, fresh in reference_schedule(k, compiled and not whole, rounds):
                if fresh and alone:
                    torch._dynamo.reset()
                # the peak includes the build: a captured step allocates its graph's memory
                # while it is captured, before its first timing
                with peak_memory(dev) as mem:
                    if fresh:
                        torch.manual_seed(0)
                        steps[side] = make_side(side, cfg)
                    warm = (4 if compiled else 3) if fresh else 1
                    times[side].append(bench(steps[side], dev, warmup=warm, iters=10))
                record("reference", f"{tag} {cfg.name} {side}", ms=times[side][-1], **mem)
                if alone:
                    del steps[side]  # eager: a fresh model every round
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            med = {name: statistics.median(v) for name, v in times.items()}
            record(
                "reference",
                f"{tag} {cfg.name} ratio",
                speedup_crossmae=med["reference"] / med["crossmae"],
                rounds=len(times["crossmae"]),
                crossmae_ms=med["crossmae"],
                reference_ms=med["reference"],
            )
    torch._dynamo.reset()


# --------------------------------------------------------------------------- 5. op counts
_VIEW_OPS = {
    "view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "reshape", "detach", "alias", "split", "split_with_sizes", "unbind", "slice", "select",
    "as_strided", "_reshape_alias", "lift_fresh",
}  # fmt: skip


def count_ops(fwd: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Aten ops dispatched by one forward (``fwd`` returns the loss) and its backward, and
    how many of them are not views (about one kernel launch each in eager mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"fwd": 0, "fwd_kernels": 0, "bwd": 0, "bwd_kernels": 0}
    phase = ["fwd"]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            counts[phase[0]] += 1
            if func.overloadpacket.__name__ not in _VIEW_OPS:
                counts[phase[0] + "_kernels"] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        loss = fwd()
        phase[0] = "bwd"
        loss.backward()
    return counts


class _StandIn(torch.autograd.Function):
    """The packed kernel's stand-in for op counts: one op forward (``q.clone()``); its
    backward hands q, k and v a gradient each (three ops, as the kernel's backward has
    about that many), so everything upstream of the keys is counted too."""

    @staticmethod
    def forward(ctx, q, k, v, *rest):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(k, v)
        ctx.rest = len(rest)
        return q.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        k, v = ctx.saved_tensors
        return (grad.clone(), torch.zeros_like(k), torch.zeros_like(v), *([None] * ctx.rest))


@contextlib.contextmanager
def cuda_route(dev: torch.device) -> Iterator[None]:
    """Off-CUDA, plan the packed kernel for padded attention as CUDA does and run a stand-in
    for it (`_StandIn`: one op forward, three backward), so op counts follow the CUDA
    route; on CUDA, nothing."""
    from crossmae.layers import _varlen

    if dev.type == "cuda":
        yield
        return
    saved = (_varlen.supports, _varlen._VARLEN)
    _varlen.supports = lambda device_type, dtype, head_dim, dropout_p: dropout_p == 0.0  # type: ignore[assignment]
    _varlen._VARLEN = _StandIn.apply
    try:
        yield
    finally:
        _varlen.supports, _varlen._VARLEN = saved


def section_ops(dev: torch.device, small: bool, compile_: bool) -> None:
    """Eager steps on the GPU are bounded by the host launching kernels one by one: the op
    count per training step is the deterministic measure of that bound (any device)."""
    from crossmae.models.water import water_mae_small

    log("\n## 5. aten ops per eager training step (forward + backward, bf16 autocast)")
    amp = autocast(dev, True)
    # water model at a small size: the op count does not depend on the sizes, but it does
    # on the depths, so these stay the real model's (whatever WATER_SMALL says)
    sizes = {k: v for k, v in WATER_SMALL.items() if not k.endswith("_depth")}
    model = water_mae_small(**sizes).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    inputs, static = water_batch(dev, 8, 4, (60, 40), 40, half_missing=True)

    def water() -> torch.Tensor:
        # a training step's backward starts from no gradient (zero_grad(set_to_none=True)):
        # accumulating into the previous call's would add one op per parameter
        model.zero_grad(set_to_none=True)
        with autocast(dev, True):
            return model(inputs, static=static, generator=g).loss

    water()  # first call: lazy initialisation outside the count
    record("ops", "water_mae_small, 5 modalities, b=8", **count_ops(water))
    # The CUDA route (packed kernel for padded attention), decoders in lockstep and one by
    # one; off-CUDA a stand-in replaces the kernel (`_StandIn`), so the count follows CUDA.
    with cuda_route(dev):
        for fuse in (True, False):
            model.fuse_decoders = fuse
            water()
            tag = "lockstep decoders" if fuse else "decoders one by one"
            record("ops", f"water_mae_small, packed route, {tag}", **count_ops(water))
        model.fuse_decoders = True
    n = 196
    ctx = torch.randn(8, 1 + 49, 96, device=dev, requires_grad=True)
    ids_keep = torch.rand(8, n, device=dev).argsort(1)[:, :49]
    ids_pred = torch.rand(8, n, device=dev).argsort(1)[:, :49].sort(1).values
    cross = CrossMAEDecoder(96, 64, 8, 4, 768, num_tokens=n).to(dev)
    mae = MAEDecoder(96, 64, 8, 4, 768, n).to(dev)

    def cross_step() -> torch.Tensor:
        with amp:
            return cross(ctx, ids_pred).float().square().mean()

    def mae_step() -> torch.Tensor:
        with amp:
            return mae(ctx[:, 1:], ids_keep, ids_pred).float().square().mean()

    record("ops", "CrossMAE decoder 8 blocks, predict 0.25", **count_ops(cross_step))
    record("ops", "MAE decoder 8 blocks, predict 0.25", **count_ops(mae_step))


SECTIONS = {
    "kernels": section_kernels,
    "decoder": section_decoder,
    "varlen": section_varlen,
    "water": section_water,
    "image": section_image,
    "ops": section_ops,
    "reference": section_reference,
    "smallhead": section_smallhead,
    "cudagraph": section_cudagraph,
}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cpu", action="store_true", help="CPU-sized variant (sections 1, 2, 4, 5)")
    ap.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    ap.add_argument(
        "--reference",
        default="",
        metavar="DIR",
        help="folder with the reference CrossMAE code (models_cross.py, ...): adds section "
        "'reference' (crossmae vs the reference in this process)",
    )
    ap.add_argument("--markdown", default="", help="also write the rows as a markdown table here")
    args = ap.parse_args(argv)
    global REFERENCE_DIR
    if args.reference:
        import reference as ref

        REFERENCE_DIR = ref.check_reference_dir(args.reference)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    small = dev.type == "cpu"
    default = (
        ["decoder", "image", "varlen", "ops"]
        if small
        else [n for n in SECTIONS if n != "reference"]
    )
    names = [s for s in args.only.split(",") if s] or default
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    if REFERENCE_DIR is not None and "reference" not in names:
        names.append("reference")
    if "reference" in names and REFERENCE_DIR is None:
        ap.error("section 'reference' needs --reference DIR")
    torch.backends.cuda.matmul.allow_tf32 = True
    varlen = varlen_from_env()
    if varlen == "segmented":
        from crossmae.layers import _segmented

        _segmented.use_for_varlen()
        log("packed attention on crossmae's segmented Triton kernels (CROSSMAE_BENCH_VARLEN)")
    rules = kernel_rules_from_env()
    if rules is not None:
        cm.set_kernel_table(rules)
        log(f"kernel table (CROSSMAE_BENCH_KERNEL_RULES): {rules}")
    if varlen == "flash":
        cm.set_kernel_table(without_segmented(cm.kernel_table()))
        log("packed attention on torch's flash varlen kernel (CROSSMAE_BENCH_VARLEN=flash)")
    import torch._inductor.config as inductor_config

    options = inductor_options_from_env()
    if mix_order_reduction_from_env() is False:
        options["triton.mix_order_reduction"] = False
        log("inductor triton.mix_order_reduction off (CROSSMAE_BENCH_MIX_ORDER_REDUCTION=0)")
    if options:
        log(f"inductor options for every compile: {options}")
    log(
        f"# crossmae benchmarks  torch {torch.__version__}  device "
        f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}  crossmae {cm.__version__}"
    )
    log(f"SDPA priority order (PyTorch's, for every call outside a kernel rule): {sdpa_order(dev)}")
    failures = 0
    with inductor_config.patch(options):  # torch's settings are back afterwards
        for name in names:
            try:
                SECTIONS[name](dev, small, compile_=not args.no_compile and dev.type == "cuda")
            except Exception:  # one broken section must not hide the others
                failures += 1
                log(f"section {name} failed:\n{traceback.format_exc()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(rows_markdown(ROWS))
    return 1 if failures else 0


def varlen_from_env() -> str:
    """Env CROSSMAE_BENCH_VARLEN: ``segmented`` sends every packed (varlen) attention call
    of every section through crossmae's segmented Triton kernels (`_segmented`, eager
    calls too); ``flash`` sends every one to torch's ``varlen_attn`` (the kernel table
    without its ``kernel="segmented"`` rules); unset (``""``): the kernel table decides."""
    raw = os.environ.get("CROSSMAE_BENCH_VARLEN", "")
    if raw not in ("", "flash", "segmented"):
        raise ValueError(f"CROSSMAE_BENCH_VARLEN must be 'flash' or 'segmented', got {raw!r}")
    return raw


def without_segmented(rules: Sequence[cm.KernelRule]) -> tuple[cm.KernelRule, ...]:
    """``rules`` less those naming ``kernel="segmented"``."""
    return tuple(r for r in rules if r.kernel != "segmented")


def mix_order_reduction_from_env() -> Optional[bool]:
    """Env CROSSMAE_BENCH_MIX_ORDER_REDUCTION: ``0`` turns inductor's mix-order reduction
    off (its LayerNorm backward then needs no final ATen sum over partial rows), ``1``
    leaves it on; unset: None (torch's default)."""
    raw = os.environ.get("CROSSMAE_BENCH_MIX_ORDER_REDUCTION", "")
    if raw not in ("", "0", "1"):
        raise ValueError(f"CROSSMAE_BENCH_MIX_ORDER_REDUCTION must be 0 or 1, got {raw!r}")
    return None if raw == "" else raw == "1"


def sdpa_order(dev: torch.device) -> list[str]:
    """PyTorch's SDPA backend priority order, after letting PyTorch settle its own choice
    on ``dev`` (it picks it lazily at the first selection of a process; the reference
    code and any call outside a kernel rule use it)."""
    from torch.nn.attention import SDPBackend

    if dev.type == "cuda":
        backend._settle_torch_priority()
    return [SDPBackend(int(i)).name.lower() for i in torch._C._get_sdp_priority_order()]


def inductor_options_from_env() -> dict[str, Any]:
    """Env CROSSMAE_BENCH_INDUCTOR: a JSON object of inductor settings applied to every
    compile of the run (dotted names of ``torch._inductor.config``), e.g.
    ``{"coordinate_descent_tuning": true, "triton.mix_order_reduction": false}``; unset:
    ``{}`` (see `parse_inductor_options`)."""
    return parse_inductor_options(os.environ.get("CROSSMAE_BENCH_INDUCTOR", ""))


def parse_inductor_options(raw: str, source: str = "CROSSMAE_BENCH_INDUCTOR") -> dict[str, Any]:
    """Inductor settings from the JSON object ``raw`` (``""``: none), checked against
    ``torch._inductor.config``: an unknown name is a ValueError, a value of another type
    than the setting's a TypeError, both naming ``source`` and the setting (an integer is
    taken for a float setting)."""
    if not raw:
        return {}
    options = json.loads(raw)
    if not isinstance(options, dict):
        raise TypeError(f"{source} must be a JSON object, got {raw!r}")
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"{source}: {key!r} is not an inductor setting")
        current = known[key]
        if isinstance(current, float) and type(value) is int:
            value = options[key] = float(value)
        if current is not None and (
            not isinstance(value, type(current))
            or (isinstance(value, bool) and not isinstance(current, bool))
        ):
            raise TypeError(
                f"{source}: {key!r} takes a {type(current).__name__} "
                f"(now {current!r}), got {value!r}"
            )
    return dict(options)


def kernel_rules_from_env() -> Optional[list[cm.KernelRule]]:
    """`KernelRule` s from env CROSSMAE_BENCH_KERNEL_RULES, a JSON list of their keyword
    arguments, e.g. ``[{"head_dim": 32, "max_keys": 64, "padded": false,
    "sdpa_backends": ["math"]}]`` (to time a kernel table end to end); ``[]`` times
    without any rule, unset (None) with `cm.DEFAULT_KERNEL_TABLE`."""
    raw = os.environ.get("CROSSMAE_BENCH_KERNEL_RULES", "")
    if not raw:
        return None
    items = json.loads(raw)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"CROSSMAE_BENCH_KERNEL_RULES must be a JSON list of objects, got {raw!r}")
    return [
        cm.KernelRule(**{k: tuple(v) if isinstance(v, list) else v for k, v in i.items()})
        for i in items
    ]


def rows_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as one markdown table per section (columns: the union of their keys)."""
    out: list[str] = []
    for section in dict.fromkeys(r["section"] for r in rows):
        sub = [r for r in rows if r["section"] == section]
        keys = list(dict.fromkeys(k for r in sub for k in r if k not in ("section", "name")))
        out.append(f"### {section}\n")
        out.append("| case | " + " | ".join(keys) + " |")
        out.append("| --- |" + " ---: |" * len(keys))
        for r in sub:
            cells = [_fmt(r[k]) if k in r else "" for k in keys]
            out.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
