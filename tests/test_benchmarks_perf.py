"""The speed-work benchmark code paths on the CPU: ``--reference DIR`` (with a fake
reference module: the real one needs timm), the small-head section, the markdown output,
and the step profiles. Timings are never asserted; rows, ratios and tables are."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import types
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

FAKE_MODELS = textwrap.dedent(
    """
    import torch
    import torch.nn as nn
    from transformer_utils import Tiny

    BUILT = []

    def mae_vit_base_patch16_dec512d8b(**kwargs):
        BUILT.append((__name__, kwargs))
        return Tiny()
    """
)
FAKE_UTILS = textwrap.dedent(
    """
    import torch
    import torch.nn as nn

    CALLS = []

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, imgs, mask_ratio=0.75, kept_mask_ratio=None):
            CALLS.append((mask_ratio, kept_mask_ratio))
            return self.lin(imgs.mean(dim=(2, 3))).square().mean()
    """
)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = _load("_crossmae_bench_perf", ROOT / "benchmarks" / "run.py")
    monkeypatch.setattr(module, "ROWS", [])
    timed = module.bench
    monkeypatch.setattr(module, "bench", lambda fn, dev, **kw: timed(fn, dev, warmup=1, iters=1))
    return module


@pytest.fixture
def fake_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ref = tmp_path / "CrossMAE"
    (ref / "util").mkdir(parents=True)
    (ref / "models_cross.py").write_text(FAKE_MODELS)
    (ref / "models_mae.py").write_text(FAKE_MODELS)
    (ref / "transformer_utils.py").write_text(FAKE_UTILS)
    (ref / "util" / "pos_embed.py").write_text("")
    for name in ("models_cross", "models_mae", "transformer_utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return ref


def test_reference_section_times_both_sides_per_config(
    bench: ModuleType, fake_reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset()))
    monkeypatch.setenv("CROSSMAE_BENCH_REF_ROUNDS", "2")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--cpu", "--only", "reference", "--reference", str(fake_reference)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in bench.ROWS if r["section"] == "reference"]
    names = [r["name"] for r in rows]
    ref = sys.modules["reference"]
    for cfg in ref.IMAGE_CONFIGS:
        for side in ("crossmae", "reference", "ratio"):
            assert f"eager {cfg.name} {side}" in names, names
    ratios = [r["speedup_crossmae"] for r in rows if r["name"].endswith("ratio")]
    assert len(ratios) == 3 and all(x > 0 for x in ratios)
    for cfg in ref.IMAGE_CONFIGS:  # two alternating rounds per side; the ratio of medians
        per_side = {
            side: [r["ms"] for r in rows if r["name"] == f"eager {cfg.name} {side}"]
            for side in ("crossmae", "reference")
        }
        assert all(len(v) == 2 for v in per_side.values()), per_side
        (row,) = [r for r in rows if r["name"] == f"eager {cfg.name} ratio"]
        assert row["rounds"] == 2
        assert row["crossmae_ms"] == pytest.approx(sum(per_side["crossmae"]) / 2)
        assert row["speedup_crossmae"] == pytest.approx(row["reference_ms"] / row["crossmae_ms"])
    # the reference was built and called as issue 11's table says
    utils = sys.modules["transformer_utils"]
    assert (
        (0.75, 0.25) in utils.CALLS and (0.75, 0.75) in utils.CALLS and (0.75, None) in utils.CALLS
    )
    built = sys.modules["models_cross"].BUILT + sys.modules["models_mae"].BUILT
    assert ("models_cross", {"weight_fm": True, "use_fm": [-1], "use_input": True}) in built
    assert ("models_mae", {}) in built
    assert len(resets) >= 6  # before every model


def test_reference_schedule_alternates_rounds_and_compile_order(bench: ModuleType) -> None:
    eager = bench.reference_schedule(1, False, 2)
    assert eager == (("crossmae", True), ("reference", True)) * 2  # rebuilt every round
    even = bench.reference_schedule(0, True, 3)
    assert [s for s, _ in even] == ["crossmae", "reference"] * 3
    assert [f for _, f in even] == [True, True, False, False, False, False]  # compiled once
    odd = bench.reference_schedule(1, True, 2)  # the other side compiles first
    assert odd == (("reference", True), ("crossmae", True), ("reference", False),
                   ("crossmae", False))  # fmt: skip
    with pytest.raises(ValueError, match="rounds"):
        bench.reference_schedule(0, True, 0)


def test_compiled_reference_pairs_compile_once_and_time_in_rounds(
    bench: ModuleType, fake_reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled schedule on the CPU: ``torch.compile`` stands in as the identity."""
    compiled: list[str] = []
    monkeypatch.setattr(
        torch, "compile", lambda m, mode=None: (compiled.append(type(m).__module__), m)[1]
    )
    monkeypatch.setenv("CROSSMAE_BENCH_REF_MODES", "compiled")
    monkeypatch.setenv("CROSSMAE_BENCH_REF_ROUNDS", "2")
    monkeypatch.setattr(bench, "REFERENCE_DIR", str(fake_reference))
    threads = torch.get_num_threads()
    try:
        bench.section_reference(torch.device("cpu"), True, True)
    finally:
        torch.set_num_threads(threads)
    ref = sys.modules["reference"]
    assert len(compiled) == 2 * len(ref.IMAGE_CONFIGS)  # each side once per config
    rows = [r for r in bench.ROWS if r["section"] == "reference"]
    for k, cfg in enumerate(ref.IMAGE_CONFIGS):
        timed = [
            r["name"].split()[-1] for r in rows if r["name"].startswith(f"compiled {cfg.name} ")
        ]
        first = "crossmae" if k % 2 == 0 else "reference"
        second = "reference" if first == "crossmae" else "crossmae"
        assert timed == [first, second, first, second, "ratio"], timed
        (row,) = [r for r in rows if r["name"] == f"compiled {cfg.name} ratio"]
        assert row["rounds"] == 2


def test_whole_step_reference_mode_needs_cuda(
    bench: ModuleType, fake_reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``graph-compiled`` (both sides captured whole by ``cm.capture_step``) is refused on
    the CPU before any model is built; an unknown mode names the known ones."""
    monkeypatch.setattr(bench, "REFERENCE_DIR", str(fake_reference))
    monkeypatch.setenv("CROSSMAE_BENCH_REF_MODES", "graph-compiled")
    before = len(bench.ROWS)
    with pytest.raises(ValueError, match=r"graph-compiled.*CUDA device, got cpu"):
        bench.section_reference(torch.device("cpu"), True, True)
    assert len(bench.ROWS) == before
    monkeypatch.setenv("CROSSMAE_BENCH_REF_MODES", "graphed")
    with pytest.raises(ValueError, match=r"unknown \['graphed'\].*graph-compiled"):
        bench.section_reference(torch.device("cpu"), True, True)


def test_reference_arguments_are_checked(bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"models_cross\.py"):
        bench.main(["--cpu", "--reference", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--cpu", "--only", "reference"])  # no --reference
    with pytest.raises(SystemExit):
        bench.main(["--cpu", "--only", "nosuchsection"])


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_reference_shims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Old-timm `qk_scale` is dropped, `np.float` restored, float16 autocast redirected."""
    ref = _load("_crossmae_reference", ROOT / "benchmarks" / "reference.py")

    class Block(torch.nn.Module):
        def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False) -> None:
            super().__init__()
            self.dim = dim

    vit = types.ModuleType("timm.models.vision_transformer")
    vit.Block = Block  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    monkeypatch.setitem(sys.modules, "timm.models", types.ModuleType("timm.models"))
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", vit)
    ref.patch_timm_block()
    blk = vit.Block(8, 2, qkv_bias=True, qk_scale=None)  # type: ignore[attr-defined]
    assert blk.dim == 8
    ref.patch_timm_block()  # idempotent
    assert vit.Block.__mro__[1] is Block  # type: ignore[attr-defined]
    with ref.reference_autocast(torch.bfloat16):
        ctx = torch.cuda.amp.autocast()
        assert ctx.fast_dtype == torch.bfloat16
    assert torch.cuda.amp.autocast is not None


def test_smallhead_section_and_markdown(bench: ModuleType, tmp_path: Path) -> None:
    md = tmp_path / "rows.md"
    assert bench.main(["--cpu", "--only", "smallhead,cudagraph", "--markdown", str(md)]) == 0
    rows = [r for r in bench.ROWS if r["section"] == "smallhead"]
    assert any("unmasked sdpa[" in r["name"] for r in rows)
    assert any("padded sdpa_mask[" in r["name"] for r in rows)
    fused = [r for r in rows if "x5 decoders" in r["name"]]
    assert fused and all(
        isinstance(r[k], float) and r[k] > 0
        for r in fused
        for k in ("five_calls_ms", "fused_heads_ms", "fused_batch_ms")
    )
    text = md.read_text()
    assert "### smallhead" in text and "| case | ms |" in text
    assert text.count("\n| ") >= len(rows) + 1


def test_profile_without_mix_order_reduction_restores_the_setting(tmp_path: Path) -> None:
    """``--no-mix-order-reduction`` turns inductor's option off while profiling (the header
    says so) and puts torch's value back afterwards, also when a profile fails."""
    import torch._inductor.config as inductor_config

    prof = _load("_crossmae_profile", ROOT / "benchmarks" / "profile_step.py")
    before = inductor_config.triton.mix_order_reduction
    seen: list[bool] = []
    real = prof.profile_workload

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(inductor_config.triton.mix_order_reduction)
        return real(*args, **kwargs)

    prof.profile_workload = spy
    argv = ["decoder", "--cpu", "--steps", "1", "--rows", "2", "--out", str(tmp_path)]
    assert prof.main([*argv, "--no-mix-order-reduction"]) == 0
    assert seen == [False] and inductor_config.triton.mix_order_reduction == before
    assert "mix-order reduction off" in (tmp_path / "profiles.md").read_text()
    assert prof.main(argv) == 0
    assert seen == [False, before]
    assert "mix-order" not in (tmp_path / "profiles.md").read_text()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("profile failed")

    prof.profile_workload = broken
    with pytest.raises(RuntimeError, match="profile failed"):
        prof.main([*argv, "--no-mix-order-reduction"])
    assert inductor_config.triton.mix_order_reduction == before


def test_profile_counts_gemm_work_and_its_rate() -> None:
    """The GEMM line of a profile: the matmul FLOPs of one eager step (forward and
    backward: 2 + 4 FLOPs per multiply-add of a linear layer whose input needs a gradient),
    attention's own matmuls apart, and the rate in the summary."""
    prof = _load("_crossmae_profile", ROOT / "benchmarks" / "profile_step.py")
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 5, 16, requires_grad=True)

    def step() -> None:
        q = lin(x).unflatten(-1, (2, 4)).transpose(1, 2)  # [4, 2, 5, 4]
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    gemm, attn = prof.count_matmul_flops(step)
    assert gemm == 6 * 4 * 5 * 16 * 8
    assert attn == 0  # torch counts no CPU attention kernel; on CUDA they land apart:
    aten = torch.ops.aten
    counts = {
        aten.mm: 10,
        aten.addmm: 20,
        aten.convolution: 30,
        aten._scaled_dot_product_efficient_attention: 400,
        aten._scaled_dot_product_cudnn_attention_backward: 5000,
        aten._flash_attention_forward: 60000,
    }
    assert prof.split_flops(counts) == (60, 65400)
    assert prof.matmul_ceiling(torch.device("cpu")) > 0
    md, summary = prof.profile_workload(
        "decoder", torch.device("cpu"), small=True, compile_=False, steps=1, rows=2
    )
    assert "GEMM work (counted on one eager step" in md
    assert summary["gemm_tflop"] > 0
    assert summary["gemm_tflops_per_s"] == pytest.approx(
        summary["gemm_tflop"] / (summary["family:GEMM"] * 1e-3)
    )


def test_profile_inductor_settings_hold_while_profiling(tmp_path: Path) -> None:
    """``--inductor JSON`` holds while the profiles run (the header names it), is restored
    afterwards, and a bad setting is refused before any work."""
    import torch._inductor.config as inductor_config

    prof = _load("_crossmae_profile", ROOT / "benchmarks" / "profile_step.py")
    before = inductor_config.coordinate_descent_tuning
    seen: list[bool] = []
    real = prof.profile_workload

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(inductor_config.coordinate_descent_tuning)
        return real(*args, **kwargs)

    prof.profile_workload = spy
    opts = '{"coordinate_descent_tuning": true}'
    argv = ["decoder", "--cpu", "--steps", "1", "--rows", "2", "--out", str(tmp_path)]
    assert prof.main([*argv, "--inductor", opts]) == 0
    assert seen == [True] and inductor_config.coordinate_descent_tuning == before
    text = (tmp_path / "profiles.md").read_text()
    assert f"inductor settings {opts}" in text
    assert "PyTorch's SDPA priority order (calls outside a kernel rule): " in text
    with pytest.raises(SystemExit):
        prof.main([*argv, "--inductor", '{"no_such_setting": true}'])
    assert seen == [True]


def test_profile_water_batch_option(tmp_path: Path) -> None:
    """``--water-batch B`` sets the real-size water workload's batch (half of it without
    river flow); a batch that cannot be half missing is refused before any profile."""
    prof = _load("_crossmae_profile", ROOT / "benchmarks" / "profile_step.py")
    with pytest.raises(SystemExit):
        prof.main(["water", "--cpu", "--water-batch", "1"])
    assert prof.WATER_BATCH == 8
    argv = ["decoder", "--cpu", "--steps", "1", "--rows", "2", "--out", str(tmp_path)]
    try:
        assert prof.main([*argv, "--water-batch", "4"]) == 0
        assert prof.WATER_BATCH == 4
        _, (inputs,), kwargs = prof.workload("water", torch.device("cpu"), small=False)
        flow = inputs["river_flow"]
        assert flow.shape[0] == 4 and kwargs["static"].shape[0] == 4
        assert flow[:2].isnan().all() and not flow[2:].isnan().any()
    finally:
        prof.WATER_BATCH = 8


def test_profile_tables_on_cpu(tmp_path: Path) -> None:
    prof = _load("_crossmae_profile", ROOT / "benchmarks" / "profile_step.py")
    assert (
        prof.main(
            ["decoder", "image", "--cpu", "--steps", "1", "--rows", "4", "--out", str(tmp_path)]
        )
        == 0
    )
    text = (tmp_path / "profiles.md").read_text()
    assert "### decoder (eager, cpu)" in text and "### image (eager, cpu)" in text
    assert "busy share" in text
    assert text.count("| `") >= 8  # four kernels per workload
    md, summary = prof.profile_workload(
        "water", torch.device("cpu"), small=True, compile_=False, steps=1, rows=3
    )
    assert summary["step_ms"] > 0 and summary["device_ms"] > 0
    assert md.count("| `") == 3
    with pytest.raises(SystemExit):
        prof.main(["decoder", "--cpu", "--mode", "reduce-overhead"])  # --mode needs --compile
    with pytest.raises(ValueError, match="needs compile_=True"):
        prof.profile_workload("decoder", torch.device("cpu"), small=True, compile_=False, mode="x")
    assert "| kernel family |" in text and "| GEMM |" in text
    assert summary["family:GEMM"] > 0
    assert sum(v for k, v in summary.items() if k.startswith("family:")) == pytest.approx(
        summary["device_ms"]
    )
    with pytest.raises(SystemExit):  # a reference folder without the reference files
        prof.main(["image", "--cpu", "--reference", str(tmp_path)])
    with pytest.raises(SystemExit):  # --graph: water on CUDA, crossmae's own step
        prof.main(["water", "--cpu", "--graph", "regional"])
    with pytest.raises(SystemExit):
        prof.main(["water", "--graph", "eager", "--compile"])
    with pytest.raises(ValueError, match="water workload only"):
        prof.build_graphed("image", torch.device("cpu"), True, "eager")
    with pytest.raises(ValueError, match="graph must be one of"):
        prof.build_graphed("water", torch.device("cpu"), True, "turbo")
    with pytest.raises(ValueError, match="without compile_"):
        prof.profile_workload(
            "water", torch.device("cpu"), small=True, compile_=True, graph="eager"
        )
    with pytest.raises(ValueError, match="image workloads only"):
        prof.build("water", torch.device("cpu"), True, reference_dir=str(tmp_path))


@pytest.mark.parametrize(
    "name, fam",
    [
        ("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNT", "GEMM"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "GEMM"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_knob_7", "attention"),
        ("void at::native::(anonymous namespace)::layer_norm_grad_input_kernel", "norm"),
        ("void at::native::(anonymous namespace)::fused_adamw_kernel", "optimizer"),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "reduction"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy / gather / cat"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernel>",
            "elementwise",
        ),
        ("triton_per_fused_native_layer_norm_0", "norm"),
        ("triton_poi_fused_add_1", "fused (triton)"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_kernel_families(name: str, fam: str) -> None:
    prof = _load("_crossmae_profile", ROOT / "benchmarks" / "profile_step.py")
    assert prof.family(name) == fam


def test_environment_selections(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench.flex_blocks() == bench.FLEX_BLOCKS
    monkeypatch.setenv("CROSSMAE_BENCH_FLEX_BLOCKS", "64x32,128x128")
    assert bench.flex_blocks() == ((64, 32), (128, 128))
    assert bench.graph_modes() == bench.GRAPH_MODES
    monkeypatch.setenv("CROSSMAE_BENCH_GRAPH_MODES", "eager,graph-compiled")
    assert bench.graph_modes() == ("eager", "graph-compiled")
    monkeypatch.setenv("CROSSMAE_BENCH_GRAPH_MODES", "turbo")
    with pytest.raises(ValueError, match="turbo"):
        bench.graph_modes()
    assert bench.ref_rounds() == 3
    monkeypatch.setenv("CROSSMAE_BENCH_REF_ROUNDS", "5")
    assert bench.ref_rounds() == 5
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("CROSSMAE_BENCH_REF_ROUNDS", bad)
        with pytest.raises(ValueError, match="REF_ROUNDS"):
            bench.ref_rounds()
    assert bench.graph_water_batches() == (8,)
    monkeypatch.setenv("CROSSMAE_BENCH_GRAPH_WATER_BATCHES", "8,16")
    assert bench.graph_water_batches() == (8, 16)
    for bad in ("7", "x", ""):
        monkeypatch.setenv("CROSSMAE_BENCH_GRAPH_WATER_BATCHES", bad)
        with pytest.raises(ValueError, match="GRAPH_WATER_BATCHES"):
            bench.graph_water_batches()
    assert bench.mix_order_reduction_from_env() is None
    monkeypatch.setenv("CROSSMAE_BENCH_MIX_ORDER_REDUCTION", "0")
    assert bench.mix_order_reduction_from_env() is False
    monkeypatch.setenv("CROSSMAE_BENCH_MIX_ORDER_REDUCTION", "off")
    with pytest.raises(ValueError, match="MIX_ORDER_REDUCTION"):
        bench.mix_order_reduction_from_env()
    monkeypatch.delenv("CROSSMAE_BENCH_KERNEL_RULES", raising=False)
    assert bench.kernel_rules_from_env() is None  # unset: the default table stays
    monkeypatch.setenv("CROSSMAE_BENCH_KERNEL_RULES", "[]")
    assert bench.kernel_rules_from_env() == []  # no rule at all
    monkeypatch.setenv("CROSSMAE_BENCH_KERNEL_RULES", '[{"head_dim": 32, "padded": false}]')
    assert bench.kernel_rules_from_env() == [bench.cm.KernelRule(head_dim=32, padded=False)]


def test_inductor_options_apply_to_the_run_and_are_restored(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CROSSMAE_BENCH_INDUCTOR (and CROSSMAE_BENCH_MIX_ORDER_REDUCTION=0) hold while the
    sections run and torch's settings are back afterwards; bad names and types are refused
    with the setting named."""
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("CROSSMAE_BENCH_INDUCTOR", raising=False)
    assert bench.inductor_options_from_env() == {}
    seen: list[tuple[bool, bool]] = []

    def section(dev: Any, small: bool, compile_: bool) -> None:
        seen.append(
            (inductor_config.coordinate_descent_tuning, inductor_config.triton.mix_order_reduction)
        )

    monkeypatch.setitem(bench.SECTIONS, "decoder", section)
    before = (inductor_config.coordinate_descent_tuning, inductor_config.triton.mix_order_reduction)
    monkeypatch.setenv("CROSSMAE_BENCH_INDUCTOR", '{"coordinate_descent_tuning": true}')
    monkeypatch.setenv("CROSSMAE_BENCH_MIX_ORDER_REDUCTION", "0")
    assert bench.main(["--cpu", "--only", "decoder"]) == 0
    assert seen == [(True, False)]
    order = bench.sdpa_order(torch.device("cpu"))  # the run logs PyTorch's SDPA order
    assert set(order) >= {"flash_attention", "efficient_attention", "math", "cudnn_attention"}
    assert f"SDPA priority order (PyTorch's, for every call outside a kernel rule): {order}" in (
        capsys.readouterr().out
    )
    after = (inductor_config.coordinate_descent_tuning, inductor_config.triton.mix_order_reduction)
    assert after == before
    monkeypatch.setenv("CROSSMAE_BENCH_INDUCTOR", '{"cpu_gpu_bw": 40}')  # an int for a float
    assert bench.inductor_options_from_env() == {"cpu_gpu_bw": 40.0}
    for raw, error, match in (
        ('{"no_such_setting": 1}', ValueError, "'no_such_setting' is not an inductor setting"),
        ('{"coordinate_descent_tuning": 3}', TypeError, "'coordinate_descent_tuning' takes a bool"),
        ('["coordinate_descent_tuning"]', TypeError, "must be a JSON object"),
        ('{"max_autotune_gemm_search_space": 1}', TypeError, "takes a str"),
        ('{"inductor_default_autotune_warmup": true}', TypeError, "takes a int"),
    ):
        monkeypatch.setenv("CROSSMAE_BENCH_INDUCTOR", raw)
        with pytest.raises(error, match=match):
            bench.inductor_options_from_env()


def test_water_loss_draws_splits_outside_a_compiled_model(bench: ModuleType) -> None:
    """Section 8's compiled water steps get their splits drawn eagerly from the same
    generator: the loss equals the eager model's, which draws them itself."""
    from tests.strategies import generator, tiny_water_batch, tiny_water_model

    model = tiny_water_model()
    inputs, static = tiny_water_batch(model.names, generator(4))
    loss_of = bench.water_loss_fn(model, inputs, static)
    calls: list[dict[str, Any]] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:  # stands for torch.compile(model)
        calls.append(kwargs)
        return model(*args, **kwargs)

    with torch.no_grad():
        eager = loss_of(model, generator(9))
        compiled = loss_of(wrapper, generator(9))
        other = loss_of(wrapper, generator(10))
    assert "splits" in calls[0] and "generator" not in calls[0]
    torch.testing.assert_close(compiled, eager)
    assert not torch.allclose(other, eager)  # the generator really draws the masks


@pytest.mark.parametrize("graph", ["eager", "compiled"])
def test_graphed_water_step_builds(graph: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`profile_step.build_graphed` on the CPU, with the capture and the compiler replaced
    by stand-ins: the whole-model compiled step passes splits drawn outside the compiled
    forward (never the generator), and the replay is what the capture returned."""
    import crossmae as cm

    prof = _load("_crossmae_profile", ROOT / "benchmarks" / "profile_step.py")
    seen: list[dict[str, Any]] = []

    def fake_compile(model: Any, **_: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            seen.append(kwargs)
            return model(*args, **kwargs)

        return run

    captured: list[Any] = []

    def fake_capture(step: Any, **kwargs: Any) -> Any:
        captured.append(kwargs)
        step()
        return step, None

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(cm, "capture_step", fake_capture)
    replay = prof.build_graphed("water", torch.device("cpu"), True, graph)
    replay()
    assert len(captured) == 1 and len(captured[0]["optimizers"]) == 1
    assert isinstance(captured[0]["generators"][0], torch.Generator)
    if graph == "compiled":
        assert len(seen) == 2 and all("splits" in k and "generator" not in k for k in seen)
    else:
        assert seen == []


def test_segmented_sweep_tries_every_tile_and_restores_the_defaults(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep of the segmented kernels' tiles (CUDA only in the run): each kernel's
    table holds every tile of `SEGMENTED_SWEEP` while it is timed, the others keep their
    defaults, the defaults are back afterwards, and one row per tile is recorded. The
    kernels module (which needs triton) is a stand-in here."""
    from crossmae.layers import _segmented, _varlen

    tables = {t: {16: (1, 1, 1, 1)} for t in bench.SEGMENTED_SWEEP}
    fake = types.ModuleType("crossmae.layers._segmented_kernels")
    for t, cfg in tables.items():
        setattr(fake, t, cfg)
    monkeypatch.setitem(sys.modules, "crossmae.layers._segmented_kernels", fake)
    import crossmae.layers as layers

    monkeypatch.setattr(layers, "_segmented_kernels", fake, raising=False)
    seen: list[tuple[Any, ...]] = []

    def kernel(q: Any, k: Any, v: Any, *rest: Any) -> torch.Tensor:
        seen.append(tuple(tables[t][16] for t in tables))
        return q * 1.0

    monkeypatch.setattr(_segmented, "varlen_fn", kernel)
    q, k, v = (torch.randn(2, 2, n, 16, requires_grad=True) for n in (3, 5, 5))
    kpad = torch.zeros(2, 5, dtype=torch.bool)
    before = len(bench.ROWS)
    bench._segmented_sweep(torch.device("cpu"), "shape", q, k, v, kpad, None)
    rows = bench.ROWS[before:]
    n_tiles = sum(len(t) for t in bench.SEGMENTED_SWEEP.values())
    assert len(rows) == n_tiles and all(isinstance(r["ms"], float) for r in rows)
    for i, (table, tiles) in enumerate(bench.SEGMENTED_SWEEP.items()):
        for tile in tiles:
            want = tuple(tile if j == i else (1, 1, 1, 1) for j in range(len(tables)))
            assert want in seen, (table, tile)
    assert all(cfg[16] == (1, 1, 1, 1) for cfg in tables.values())
    assert _varlen._VARLEN is not kernel
