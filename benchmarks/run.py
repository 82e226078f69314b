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
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import crossmae as cm
from crossmae.decoders import CrossMAEDecoder, MAEDecoder
from crossmae.encoders import TransformerEncoder

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
    for tag in modes:
        compiled = tag != "eager"
        mode = "reduce-overhead" if tag == "compiled-cudagraphs" else None
        mae = MAEDecoder(enc_dim, dim, depth, heads, 768, n).to(dev)
        fmae = torch.compile(mae, mode=mode) if compiled else mae
        for pr in (0.25, 0.75):
            p = int(n * pr)
            ids_pred = torch.rand(b, n, device=dev).argsort(1)[:, :p].sort(1).values
            cross = CrossMAEDecoder(enc_dim, dim, depth, heads, 768, num_tokens=n).to(dev)
            fcross = torch.compile(cross, mode=mode) if compiled else cross

            def step_cross() -> None:
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast(dev, dev.type == "cuda"):
                    out = fcross(ctx, ids_pred)
                out.float().square().mean().backward()

            def step_mae() -> None:
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast(dev, dev.type == "cuda"):
                    out = fmae(ctx[:, 1:], ids_keep, ids_pred)
                out.float().square().mean().backward()

            t_c = bench(step_cross, dev)
            t_m = bench(step_mae, dev)
            results[(tag, pr)] = t_m / t_c
            record("decoder", f"{tag} predict={pr} crossmae", ms=t_c)
            record("decoder", f"{tag} predict={pr} mae", ms=t_m, speedup_crossmae=t_m / t_c)


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


def section_water(dev: torch.device, small: bool, compile_: bool) -> None:
    from crossmae.models.water import water_mae_small

    log("\n## 3. water model at its default shapes (bf16 autocast, AdamW)")
    kw: dict[str, Any] = WATER_SMALL if small else {}
    model = water_mae_small(**kw).to(dev)
    cfg_t = 4 if small else 30
    h, w = (60, 40) if small else (290, 180)
    sites = 40 if small else 604
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    # Compiled: masks are drawn in data preparation (tokenize for the padding masks, then
    # make_splits, eager) and the forward is one graph given the splits.
    backend = os.environ.get("CROSSMAE_BENCH_BACKEND", "inductor")
    compiled = torch.compile(model, fullgraph=True, backend=backend) if compile_ else None
    for b, half_missing in ((8, False), (8, True), (16, False), (16, True)):
        if small and b == 16:
            continue
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

        def step_compiled() -> None:
            assert compiled is not None
            with torch.no_grad(), autocast(dev, dev.type == "cuda"):
                pads = {k: p for k, (_, p) in model.tokenize(inputs).items()}
            splits = model.make_splits(pads, generator=g)
            with autocast(dev, dev.type == "cuda"):
                out = compiled(inputs, static=static, splits=splits)
            out.loss.backward()
            bad.add_((~torch.isfinite(out.loss.detach())).long())
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps = [("eager", step_eager)] + ([("compiled", step_compiled)] if compile_ else [])
        for tag, step in steps:
            bad.zero_()
            name = f"{tag} batch={b} half_missing_river_flow={half_missing}"
            try:
                with peak_memory(dev) as mem:
                    ms = bench(step, dev, warmup=3 if tag == "compiled" else 2, iters=8)
                record(
                    "water",
                    name,
                    ms=ms,
                    samples_per_s=b / (ms * 1e-3),
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

    t_a = bench(run(x_eq, None), dev)
    t_b = bench(run(x_var, pad), dev)
    t_c = bench(run_packed, dev)
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


def section_ops(dev: torch.device, small: bool, compile_: bool) -> None:
    """Eager steps on the GPU are bounded by the host launching kernels one by one: the op
    count per training step is the deterministic measure of that bound (any device)."""
    from crossmae.models.water import water_mae_small

    log("\n## 5. aten ops per eager training step (forward + backward, bf16 autocast)")
    amp = autocast(dev, True)
    # water model at a small size: the op count does not depend on the sizes
    model = water_mae_small(**WATER_SMALL).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    inputs, static = water_batch(dev, 8, 4, (60, 40), 40, half_missing=True)

    def water() -> torch.Tensor:
        with autocast(dev, True):
            return model(inputs, static=static, generator=g).loss

    water()  # first call: lazy initialisation outside the count
    record("ops", "water_mae_small, 5 modalities, b=8", **count_ops(water))
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
}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cpu", action="store_true", help="CPU-sized variant (sections 1, 2, 4, 5)")
    ap.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    ap.add_argument("--json", default="", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    small = dev.type == "cpu"
    names = [s for s in args.only.split(",") if s] or (
        ["decoder", "image", "varlen", "ops"] if small else list(SECTIONS)
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    log(
        f"# crossmae benchmarks  torch {torch.__version__}  device "
        f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}  crossmae {cm.__version__}"
    )
    failures = 0
    for name in names:
        try:
            SECTIONS[name](dev, small, compile_=not args.no_compile and dev.type == "cuda")
        except Exception:  # one broken section must not hide the others
            failures += 1
            log(f"section {name} failed:\n{traceback.format_exc()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1, default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
