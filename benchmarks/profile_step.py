"""Profile full training steps and write, per workload, the top kernels and the GPU-busy
share of the step (profiler self device time / step time) as a markdown table.

    python benchmarks/profile_step.py image water --compile --out $OUT/profiles
    python benchmarks/profile_step.py decoder                # eager, prints the tables
    python benchmarks/profile_step.py image image-mae --reference .reference/CrossMAE

Workloads: ``image`` (CrossMAE ViT-B/16, B=256, predict 0.25 + WFM over 12 blocks and the
input, fused AdamW), ``image-075`` (predict 0.75, no WFM), ``image-mae`` (the MAE decoder),
``water`` (the water model, B=8 or ``--water-batch``, half the batch without river flow,
AdamW), ``decoder`` (CrossMAE decoder only, ViT-B widths, B=256, predict 0.25). All under
bf16 autocast. ``--cpu`` runs tiny versions on the CPU (for the tests: the tables then
show CPU time, not device time). ``--reference DIR`` profiles the reference CrossMAE/MAE
model of every image workload right after crossmae's (same process, same inputs; see
reference.py). Every profile ends with the step's device time by kernel family (GEMM,
attention, norms, elementwise, ...), so two profiles compare family by family, and with the
rate of the GEMM family: the matmul FLOPs of one eager step (`count_matmul_flops`) over its
time, against a bf16 matmul measured in the same process (`matmul_ceiling`).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile

WORKLOADS = ("image", "image-075", "image-mae", "water", "decoder")
WATER_BATCH = 8  # the water workload's batch (``--water-batch``); half of it without river flow

# crossmae_vit_base keyword arguments of the image workloads; the index is the matching
# configuration in reference.IMAGE_CONFIGS.
IMAGE_WORKLOADS: dict[str, tuple[dict[str, Any], int]] = {
    "image": (dict(predict_ratio=0.25, use_weighted_fm=True, use_input=True), 0),
    "image-075": (dict(predict_ratio=0.75, use_weighted_fm=False), 1),
    "image-mae": (dict(use_cross_attn=False, predict_ratio=0.75, use_weighted_fm=False), 2),
}

# Kernel families, first match wins (names of CUDA kernels; on the CPU, aten op names).
FAMILIES: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|cudnn|attention|sdpa|efficient|_efficient_attention"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("norm", r"layer_?norm|LayerNorm|rms_?norm"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|matmul|addmm|\bmm\b|linear|conv|wgrad|dgrad"),
    ("fused (triton)", r"^triton_"),
    ("reduction", r"reduce|sum|mean|norm_kernel"),
    ("copy / gather / cat", r"copy|cat|gather|scatter|index|clone|contiguous|fill|masked"),
    ("elementwise", r"elementwise|vectorized|unrolled|gelu|softmax|mul|add"),
)


def family(name: str) -> str:
    """The kernel family of kernel (or op) ``name`` (see `FAMILIES`; else ``other``)."""
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return fam
    return "other"


def workload(
    what: str, dev: torch.device, small: bool
) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    """``(model, args, kwargs)`` of one forward of workload ``what`` (also used by
    graph_breaks.py). The image model draws masks from the global RNG (as the reference
    code does: a ``generator=`` is a graph break under torch.compile); the water model
    from a device generator."""
    from crossmae.decoders import CrossMAEDecoder

    if what == "decoder":
        b, n, e, c, depth, heads = (
            (256, 196, 768, 512, 8, 16) if not small else (4, 16, 32, 16, 2, 2)
        )
        ctx = torch.randn(b, 1 + n // 4, e, device=dev, requires_grad=True)
        ids = torch.rand(b, n, device=dev).argsort(1)[:, : n // 4].sort(1).values
        model: torch.nn.Module = CrossMAEDecoder(e, c, depth, heads, 768, num_tokens=n).to(dev)
        return model, (ctx, ids), {}
    if what in IMAGE_WORKLOADS:
        from crossmae.models.factories import crossmae_vit_base

        extra: dict[str, Any] = {}
        b, size = 256, 224
        if small:
            b, size = 2, 32
            extra = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=2)  # fmt: skip
        model = crossmae_vit_base(img_size=size, **IMAGE_WORKLOADS[what][0], **extra).to(dev)
        return model, (torch.randn(b, 3, size, size, device=dev),), {}
    if what == "water":
        from crossmae.models.water import water_mae_small

        kw: dict[str, Any] = {}
        b, t, hw, sites = WATER_BATCH, 30, (290, 180), 604
        if small:
            kw = dict(num_steps=3, image_size=(40, 30), num_land_patches=6, num_sites=12,
                      group_size=4, embed_dim=32, num_heads=4, decoder_dim=16,
                      decoder_num_heads=4, decoder_depth=1, raster_depth=1, series_depth=1)  # fmt: skip
            b, t, hw, sites = 2, 3, (40, 30), 12
        model = water_mae_small(**kw).to(dev)
        inputs = {
            k: torch.randn(b, t, *hw, device=dev)
            for k in ("precipitation", "soil_moisture", "temperature")
        }
        inputs["evaporation"] = torch.randn(b, sites, t, device=dev)
        flow = torch.randn(b, sites, t, device=dev)
        flow[: b // 2] = float("nan")
        inputs["river_flow"] = flow
        static = torch.randn(b, sites, 11, device=dev)
        g = torch.Generator(device=dev).manual_seed(0)
        return model, (inputs,), {"static": static, "generator": g}
    raise ValueError(f"unknown workload {what!r}; choose from {WORKLOADS}")


def _on_path() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


def _reference_module() -> Any:
    _on_path()
    import reference

    return reference


GRAPHS = ("eager", "regional", "compiled")


def build_graphed(what: str, dev: torch.device, small: bool, graph: str) -> Callable[[], Any]:
    """The water training step captured in one CUDA graph (`crossmae.capture_step`), with
    an eager forward (``graph="eager"``), every block compiled first (``"regional"``,
    `crossmae.compile_blocks`) or the whole model compiled (``"compiled"``, splits drawn
    outside it by ``draw_splits``); masks from the workload's device generator with static
    split widths, capturable fused AdamW. Returns the replay."""
    import crossmae as cm
    from crossmae.models import grouped_masking_fn

    if what != "water":
        raise ValueError(f"--graph profiles the water workload only, not {what!r}")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    model, args, kwargs = workload(what, dev, small)
    for mod in model.modalities.values():  # type: ignore[union-attr]
        mod.masking = grouped_masking_fn(0.39, static_shape=True)
    if graph == "regional":
        cm.compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=True)
    gen = kwargs["generator"]
    compiled = torch.compile(model) if graph == "compiled" else None

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False):
            if compiled is None:
                loss = model(*args, **kwargs).loss
            else:  # a generator inside the compiled forward would break its graph
                splits = model.draw_splits(args[0], generator=gen)  # type: ignore[operator]
                loss = compiled(*args, static=kwargs["static"], splits=splits).loss
        loss.backward()
        opt.step()

    replay, _ = cm.capture_step(step, optimizers=[opt], generators=[gen])
    return replay


def build(
    what: str, dev: torch.device, small: bool, reference_dir: Optional[str] = None
) -> Callable[[], Any]:
    """A zero-argument training step of workload ``what`` (see `workload`); with
    ``reference_dir``, of the reference model of image workload ``what`` instead (B=256
    at 224 px; no small version)."""
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    if reference_dir is not None:
        if what not in IMAGE_WORKLOADS:
            raise ValueError(f"--reference profiles image workloads only, not {what!r}")
        ref = _reference_module()
        cfg = ref.IMAGE_CONFIGS[IMAGE_WORKLOADS[what][1]]
        net = ref.build_reference(ref.load_reference(reference_dir), cfg).to(dev)
        opt_r = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev.type == "cuda")
        imgs = torch.randn(256, 3, 224, 224, device=dev)

        def ref_loss(f: Any) -> torch.Tensor:
            with ref.reference_autocast(torch.bfloat16):
                out = f(imgs, **cfg.forward_kwargs)
            return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[no-any-return]

        return _step(net, opt_r, ref_loss, amp)
    model, args, kwargs = workload(what, dev, small)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    if what == "decoder":
        ctx = args[0]

        def loss_fn(f: Any) -> torch.Tensor:
            ctx.grad = None  # a graphed backward must not accumulate into graph memory
            return f(*args).float().square().mean()  # type: ignore[no-any-return]

    else:

        def loss_fn(f: Any) -> torch.Tensor:
            return f(*args, **kwargs).loss  # type: ignore[no-any-return]

    return _step(model, opt, loss_fn, amp)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Any, amp: Any) -> Any:
    holder: dict[str, Any] = {"f": model, "graphed": False}

    def step() -> None:
        if holder["graphed"]:
            torch.compiler.cudagraph_mark_step_begin()
        with amp:
            loss = loss_fn(holder["f"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.holder = holder  # type: ignore[attr-defined]
    return step


def count_matmul_flops(step: Callable[[], Any]) -> tuple[float, float]:
    """FLOPs of one eager call of ``step``, split into ``(gemm, attention)``: matmuls and
    convolutions (the GEMM family's work), and the attention kernels' own matmuls, as
    `torch.utils.flop_counter` counts them (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return split_flops(fc.get_flop_counts().get("Global", {}))


def split_flops(counts: dict[Any, int]) -> tuple[float, float]:
    """``(gemm, attention)`` FLOPs of a flop counter's per-op counts (attention ops by name:
    flash, memory-efficient, cuDNN and math SDPA kernels, forward and backward)."""
    gemm = attn = 0.0
    for op, flops in counts.items():
        if "attention" in str(op):
            attn += flops
        else:
            gemm += flops
    return gemm, attn


_CEILING: dict[str, float] = {}


def matmul_ceiling(dev: torch.device) -> float:
    """bf16 dense matmul TFLOP/s measured on ``dev`` now (8192² on CUDA; once per process)."""
    if dev.type not in _CEILING:
        n = 8192 if dev.type == "cuda" else 512
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for _ in range(3):
            a @ b
        sync()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
        _CEILING[dev.type] = 2 * n**3 / statistics.median(times) / 1e12
    return _CEILING[dev.type]


def _self_device_us(evt: Any) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def _kernel_times(prof: Any, dev: torch.device, steps: int) -> list[tuple[str, float]]:
    """``(name, ms per step)`` of every device kernel, largest first (CUDA: kernel events
    only, user annotations mirrored on the GPU timeline excluded, so nothing counts twice;
    CPU: self CPU time of the ops)."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    if dev.type == "cuda":
        for e in prof.events():
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue
            if e.name.startswith("ProfilerStep"):
                continue
            totals[e.name] = totals.get(e.name, 0.0) + _self_device_us(e)
    else:
        for avg in prof.key_averages():
            totals[avg.key] = float(avg.self_cpu_time_total)
    out = [(k, us / 1e3 / steps) for k, us in totals.items() if us > 0]
    out.sort(key=lambda k: -k[1])
    return out


def profile_workload(
    what: str,
    dev: torch.device,
    *,
    small: bool,
    compile_: bool,
    steps: int = 5,
    rows: int = 15,
    mode: Optional[str] = None,
    reference_dir: Optional[str] = None,
    gaps: bool = False,
    graph: Optional[str] = None,
) -> tuple[str, dict[str, float]]:
    """Profile ``steps`` steps of ``what``; returns the markdown and a summary dict
    (``step_ms``, ``device_ms`` per step, ``busy_share``, and ``family:<name>`` ms per step).
    ``mode``: ``torch.compile``'s (e.g. ``"reduce-overhead"``: forward and backward in CUDA
    graphs), with ``compile_``. ``reference_dir``: profile the reference model instead.
    ``gaps``: profile two more steps with Python stacks and add where the device waited
    for the host (gaps.py; summary key ``idle_ms``).
    ``graph``: profile the water step captured in one CUDA graph (`build_graphed`)."""
    if mode is not None and not compile_:
        raise ValueError(f"mode={mode!r} needs compile_=True")
    torch._dynamo.reset()
    torch.manual_seed(0)
    if graph is not None and (compile_ or reference_dir is not None):
        raise ValueError("graph= profiles crossmae's own step, without compile_ or reference_dir")
    if graph is not None:
        step = build_graphed(what, dev, small, graph)
    else:
        step = build(what, dev, small, reference_dir)
    # the GEMM family's work, counted on one eager step (a captured graph cannot be counted)
    flops = count_matmul_flops(step) if graph is None else None
    if compile_:
        step.holder["f"] = torch.compile(step.holder["f"], mode=mode)  # type: ignore[attr-defined]
        step.holder["graphed"] = mode == "reduce-overhead"  # type: ignore[attr-defined]
    for _ in range(4 if compile_ else 3):
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(steps):  # step time without the profiler's overhead
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    step_ms = statistics.median(times)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    kernels = _kernel_times(prof, dev, steps)
    device_ms = sum(ms for _, ms in kernels)
    busy = device_ms / step_ms if step_ms > 0 else float("nan")
    tag = ("compiled" + (f", {mode}" if mode else "")) if compile_ else "eager"
    if graph is not None:
        tag = f"one CUDA graph, {graph} forward"
    unit = "device" if dev.type == "cuda" else "CPU (no device: not a GPU-busy share)"
    side = "reference " if reference_dir is not None else ""
    lines = [
        f"### {side}{what} ({tag}, {dev.type})",
        "",
        f"step {step_ms:.2f} ms (median of {steps}, no profiler); profiler self {unit} time "
        f"{device_ms:.2f} ms per step; **busy share {busy:.0%}**",
        "",
        "| kernel | ms / step | share of step |",
        "| --- | ---: | ---: |",
    ]
    for key, ms in kernels[:rows]:
        name = key.replace("|", "/")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{name}` | {ms:.3f} | {ms / step_ms:.1%} |")
    fams: dict[str, list[float]] = {}
    for key, ms in kernels:
        acc = fams.setdefault(family(key), [0.0, 0.0])
        acc[0] += ms
        acc[1] += 1
    lines += [
        "",
        "| kernel family | ms / step | distinct kernels | share of step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for fam, (ms, n) in sorted(fams.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {fam} | {ms:.3f} | {int(n)} | {ms / step_ms:.1%} |")
    lines.append("")
    summary = {"step_ms": step_ms, "device_ms": device_ms, "busy_share": busy}
    summary.update({f"family:{f}": v[0] for f, v in fams.items()})
    gemm_ms = fams.get("GEMM", [0.0])[0]
    if flops is not None and flops[0] > 0 and gemm_ms > 0:
        rate = flops[0] / (gemm_ms * 1e-3) / 1e12
        ceiling = matmul_ceiling(dev)
        lines += [
            f"GEMM work (counted on one eager step, forward and backward): "
            f"{flops[0] / 1e12:.3g} TFLOP per step, plus {flops[1] / 1e12:.3g} TFLOP inside "
            f"the attention kernels. The GEMM family ran it at **{rate:.3g} TFLOP/s**, "
            f"{rate / ceiling:.0%} of a bf16 matmul measured now ({ceiling:.3g} TFLOP/s).",
            "",
        ]
        summary.update(
            {"gemm_tflop": flops[0] / 1e12, "gemm_tflops_per_s": rate, "ceiling_tflops": ceiling}
        )
    if gaps:
        import tempfile

        _on_path()
        import gaps as gap_mod

        with profile(activities=acts, with_stack=True) as prof2:
            for _ in range(2):
                step()
            sync()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof2.export_chrome_trace(path)
            report = gap_mod.analyze_gaps(gap_mod.load_trace(path))
        lines += [
            "Where the device waits for the host (2 more steps, profiled with Python stacks, "
            "which slows the host: read the split, not the total):",
            "",
            gap_mod.gap_table(report, 2, rows),
        ]
        summary["idle_ms"] = report.idle_us / 1e3 / 2
    return "\n".join(lines), summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", nargs="+", choices=WORKLOADS)
    ap.add_argument("--rows", type=int, default=15, help="top kernels per table")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--eager-too", action="store_true", help="with --compile: eager as well")
    ap.add_argument(
        "--mode", default=None, help="with --compile: torch.compile mode, e.g. reduce-overhead"
    )
    ap.add_argument("--cpu", action="store_true", help="tiny workloads on the CPU (tests)")
    ap.add_argument(
        "--water-batch",
        type=int,
        default=8,
        metavar="B",
        help="batch of the water workload (default 8; half of it without river flow)",
    )
    ap.add_argument("--out", default="", help="write profiles.md (and print) here")
    ap.add_argument(
        "--graph",
        choices=GRAPHS,
        default=None,
        help="water only: profile the step captured in one CUDA graph (eager forward, "
        "blocks compiled, or the whole model compiled)",
    )
    ap.add_argument(
        "--gaps", action="store_true", help="also show where the device waits for the host"
    )
    ap.add_argument(
        "--no-mix-order-reduction",
        action="store_true",
        help="turn inductor's triton.mix_order_reduction off while profiling (as run.py's "
        "CROSSMAE_BENCH_MIX_ORDER_REDUCTION=0)",
    )
    ap.add_argument(
        "--reference",
        default=None,
        metavar="DIR",
        help="also profile the reference model of every image workload (see reference.py)",
    )
    ap.add_argument(
        "--inductor",
        default="",
        metavar="JSON",
        help="inductor settings while profiling, e.g. '{\"coordinate_descent_tuning\": true}' "
        "(as run.py's CROSSMAE_BENCH_INDUCTOR; torch's settings are restored)",
    )
    args = ap.parse_args(argv)
    _on_path()
    import run

    try:
        options = run.parse_inductor_options(args.inductor, "--inductor")
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    if args.water_batch < 2:
        ap.error(
            f"--water-batch must be at least 2 (half the batch misses river flow), got {args.water_batch}"
        )
    global WATER_BATCH
    WATER_BATCH = args.water_batch
    if args.mode and not args.compile:
        ap.error("--mode needs --compile")
    if args.graph is not None and (args.compile or args.reference is not None):
        ap.error("--graph profiles crossmae's own step in one CUDA graph: no --compile/--reference")
    if args.graph is not None and args.cpu:
        ap.error("--graph needs a CUDA device")
    if args.reference is not None:
        try:
            _reference_module().check_reference_dir(args.reference)
        except ValueError as e:
            ap.error(str(e))
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    import torch._inductor.config as inductor_config

    if args.no_mix_order_reduction:
        options["triton.mix_order_reduction"] = False
    with inductor_config.patch(options):  # torch's settings are back afterwards
        return _profile_all(args, dev)


def _profile_all(args: argparse.Namespace, dev: torch.device) -> int:
    """`main` after parsing: profile every asked workload, print and write the tables."""
    modes = [args.compile] + ([False] if args.compile and args.eager_too else [])
    mix = ", inductor mix-order reduction off" if args.no_mix_order_reduction else ""
    if args.inductor:
        mix += f", inductor settings {args.inductor}"
    _on_path()
    import run

    order = ", ".join(run.sdpa_order(dev))
    parts = [f"# Step profiles, torch {torch.__version__}, {dev.type}{mix}\n"]
    parts.append(f"PyTorch's SDPA priority order (calls outside a kernel rule): {order}\n")
    print(parts[-1], flush=True)
    for what in args.what:
        sides: list[Optional[str]] = [None]  # crossmae, then the reference where asked
        if args.reference is not None and what in IMAGE_WORKLOADS:
            sides.append(args.reference)
        for comp in modes:
            for ref_dir in sides:
                md, _ = profile_workload(
                    what,
                    dev,
                    small=dev.type == "cpu" and ref_dir is None,
                    compile_=comp,
                    steps=args.steps,
                    rows=args.rows,
                    mode=args.mode if comp else None,
                    reference_dir=ref_dir,
                    gaps=args.gaps,
                    graph=args.graph if ref_dir is None else None,
                )
                print(md, flush=True)
                parts.append(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profiles.md"), "w") as f:
            f.write("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
