"""dtype matrix: every component in float32, float64, bf16/fp16 autocast (CPU), and as a
``.bfloat16()`` / ``.half()`` module fed float32 *side inputs* (padding masks are bool;
static attributes, FiLM conditions, decoder position tables and the models' raw data stay
float32).

Every output must be finite and close to the float64 reference (the same module in float64
on float64 inputs), measured as the relative L2 error ``||y - y64|| / ||y64||`` of each output
tensor, within `TOL` for the mode. fp16 autocast on the CPU is supported by the installed
torch (checked by `test_cpu_fp16_autocast_is_available`).

Legend: ``b`` batch, ``n`` tokens, ``m`` context tokens, ``c`` width, ``k`` feature maps.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from reliability_helpers import (
    IMAGE_PATCHES,
    Recorder,
    build_image,
    build_water,
    gen,
    images,
    pad_mask,
    rand,
    randn,
    tensors_of,
    water_inputs,
    water_static,
)
from torch import Tensor, nn

import crossmae as cm


@dataclass(frozen=True)
class Mode:
    name: str
    module_dtype: torch.dtype
    main_dtype: torch.dtype  # dtype of the main tensor inputs (tokens, q/k/v)
    side_dtype: torch.dtype  # dtype of float side inputs (cond, pos tables, static, raw data)
    autocast: torch.dtype | None
    tol: float


F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
MODES = [
    Mode("float32", F32, F32, F32, None, 1e-5),
    Mode("float64", F64, F64, F64, None, 1e-10),
    Mode("bf16 autocast", F32, F32, F32, BF16, 5e-2),
    Mode("fp16 autocast", F32, F32, F32, F16, 1e-2),
    Mode(".bfloat16() module, float32 side inputs", BF16, BF16, F32, None, 5e-2),
    Mode(".half() module, float32 side inputs", F16, F16, F32, None, 1e-2),
]
TOL = {m.name: m.tol for m in MODES}


@dataclass(frozen=True)
class Component:
    api: str
    build: Callable[[], nn.Module]
    # inputs(main dtype, side dtype) -> (args, kwargs)
    inputs: Callable[[torch.dtype, torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]
    outputs: Callable[[Any], list[Tensor]] = lambda r: tensors_of(r)
    data_is_side: bool = False  # the model's raw data is a side input (tokenizers cast it)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory().eval()

    return build


class _Fn(nn.Module):
    """Wraps a function so it fits the module-based matrix (no parameters)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class _FeatureMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wfm = cm.WeightedFeatureMaps(3, 2)
        self.norm = cm.StackedLayerNorm(2, 8)

    def forward(self, features: Tensor) -> Tensor:
        return self.norm(self.wfm(features))


PM = pad_mask([3, 1], 3)
CPM = pad_mask([4, 2], 4)
SPLIT = cm.random_masking(
    2, IMAGE_PATCHES, 0.75, predict_ratio=0.25, noise=rand(2, IMAGE_PATCHES, seed=11)
)


def _x(dt: torch.dtype, *shape: int, seed: int = 0) -> Tensor:
    return randn(*shape, seed=seed, dtype=dt)


COMPONENTS = [
    Component(
        "Attention", _seeded(lambda: cm.Attention(8, 2)), lambda d, s: ((_x(d, 2, 3, 8), PM), {})
    ),
    Component(
        "CrossAttention",
        _seeded(lambda: cm.CrossAttention(8, 6, 2)),
        lambda d, s: ((_x(d, 2, 3, 8), _x(d, 2, 4, 6, seed=1), CPM), {}),
    ),
    Component("Block", _seeded(lambda: cm.Block(8, 2)), lambda d, s: ((_x(d, 2, 3, 8), PM), {})),
    Component(
        "CrossAttentionBlock",
        _seeded(lambda: cm.CrossAttentionBlock(8, 6, 2, self_attn=True)),
        lambda d, s: ((_x(d, 2, 3, 8), _x(d, 2, 4, 6, seed=1), CPM, PM), {}),
    ),
    Component("Mlp", _seeded(lambda: cm.Mlp(8, 16)), lambda d, s: ((_x(d, 2, 3, 8),), {})),
    Component(
        "padded_attention",
        lambda: _Fn(cm.padded_attention),
        lambda d, s: (
            (_x(d, 2, 2, 3, 4), _x(d, 2, 2, 4, 4, seed=1), _x(d, 2, 2, 4, 4, seed=2), CPM),
            {},
        ),
    ),
    Component("WeightedFeatureMaps", _seeded(_FeatureMix), lambda d, s: ((_x(d, 3, 2, 3, 8),), {})),
    Component(
        "TransformerEncoder",
        _seeded(lambda: cm.TransformerEncoder(8, 2, 2, cond_dim=3)),
        lambda d, s: (
            (_x(d, 2, 4, 8), CPM),
            {"cond": _x(s, 2, 3, seed=1), "return_layers": "all", "include_input": True},
        ),
        lambda r: [r.tokens, r.features],
    ),
    Component(
        "CrossMAEDecoder",
        _seeded(lambda: cm.CrossMAEDecoder(6, 8, 2, 2, 5, num_feature_maps=3, pos_embed=None)),
        lambda d, s: (
            (_x(d, 3, 2, 4, 6), torch.tensor([[1, 7, 9], [0, 3, 0]])),
            {
                "context_padding_mask": CPM,
                "query_padding_mask": pad_mask([3, 2], 3),
                "pos": cm.sincos_pos_embed_2d(8, (2, 5), dtype=s),
            },
        ),
    ),
    Component(
        "MAEDecoder",
        _seeded(lambda: cm.MAEDecoder(6, 8, 1, 2, 5, num_tokens=10, pos_embed=None)),
        lambda d, s: (
            (_x(d, 2, 3, 6), torch.tensor([[2, 5, 8], [4, 0, 0]]), torch.tensor([[0, 9], [1, 2]])),
            {
                "context_padding_mask": pad_mask([3, 1], 3),
                "pos": cm.sincos_pos_embed_2d(8, (2, 5), dtype=s),
            },
        ),
    ),
    Component(
        "ImageCrossMAE",
        lambda: build_image(),
        lambda d, s: ((images(dtype=s),), {"split": SPLIT}),
        lambda r: [r.loss, r.pred],
        data_is_side=True,
    ),
    Component(
        "MultimodalMAE",
        lambda: build_water(),
        lambda d, s: (
            (({k: v.to(s) for k, v in water_inputs().items()}),),
            {"static": water_static().to(s), "generator": gen(0)},
        ),
        lambda r: [r.loss, *r.preds.values()],
        data_is_side=True,
    ),
]


@contextlib.contextmanager
def _autocast(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast("cpu", dtype=dtype):
            yield


def _run(
    comp: Component,
    module: nn.Module,
    main: torch.dtype,
    side: torch.dtype,
    autocast: torch.dtype | None,
) -> list[Tensor]:
    args, kwargs = comp.inputs(side if comp.data_is_side else main, side)
    with torch.no_grad(), _autocast(autocast):
        return [t.detach() for t in comp.outputs(module(*args, **kwargs))]


def _rel_error(y: Tensor, ref: Tensor) -> float:
    y64, r64 = y.to(F64), ref.to(F64)
    return float((y64 - r64).norm() / r64.norm().clamp(min=1e-12))


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
@pytest.mark.parametrize("comp", COMPONENTS, ids=[c.api for c in COMPONENTS])
def test_dtype_matrix(comp: Component, mode: Mode, rec: Recorder) -> None:
    base = comp.build()
    reference = _run(comp, copy.deepcopy(base).to(F64), F64, F64, None)
    module = copy.deepcopy(base).to(mode.module_dtype)
    tried = f"dtype: {mode.name}"
    try:
        outs = _run(comp, module, mode.main_dtype, mode.side_dtype, mode.autocast)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:150].replace("|", "/")
        rec.check(comp.api, tried, False, "", f"{type(e).__name__}: {msg}")
        return
    finite = all(bool(torch.isfinite(t).all()) for t in outs if t.is_floating_point())
    if not finite:
        rec.check(comp.api, tried, False, "", "non-finite output")
    errors = [
        _rel_error(y, r) for y, r in zip(outs, reference) if y.is_floating_point() and y.numel()
    ]
    worst = max(errors, default=0.0)
    rec.check(
        comp.api,
        tried,
        worst <= mode.tol,
        f"finite; within rel. L2 {mode.tol:g} of float64",
        f"relative error {worst:.2e} > {mode.tol:g}",
    )


def test_cpu_fp16_autocast_is_available(rec: Recorder) -> None:
    """fp16 autocast on the CPU exists in the installed torch (documented in the table)."""
    ok = torch.amp.is_autocast_available("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    rec.check(
        "torch.autocast",
        "device 'cpu', dtype float16",
        ok and y.dtype == torch.float16,
        "supported: matmuls run in float16",
    )
