"""GEMM parameters cast once per block on CUDA (`crossmae.layers._precast`): the image
model's and the water model's losses and gradients equal autocast's per-call casts bit for
bit on the real kernels (cuBLAS, SDPA, the packed kernel), in bf16 and fp16, and the
per-linear casts are gone from the step (one multi-tensor copy per block each way).

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from gpu_helpers import DEVICE, DTYPES, GPU
from torch.utils._python_dispatch import TorchDispatchMode

import crossmae as cm
from crossmae.layers import _precast

pytestmark = GPU


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _step(model: torch.nn.Module, run: Callable[[], Any], dtype: torch.dtype) -> tuple[Any, ...]:
    model.zero_grad(set_to_none=True)
    with _Count() as count:
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
            out = run()
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, count.ops


def _compare(
    model: torch.nn.Module, run: Callable[[], Any], dtype: torch.dtype, per_linear: int
) -> None:
    got = _step(model, run, dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_precast, "_start", lambda root: None)
        want = _step(model, run, dtype)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for name in got[1]:
        assert torch.equal(got[1][name], want[1][name]), name
    linears = sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
    assert got[2].get("_foreach_copy_", 0) >= 2
    # autocast casts a linear's weight and bias forward and their gradients back
    assert want[2]["_to_copy"] - got[2]["_to_copy"] >= per_linear * linears


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "kw",
    [{"use_weighted_fm": True}, {"use_cross_attn": False}],
    ids=["wfm", "mae-decoder"],
)
def test_image_model_bit_identical(dtype: torch.dtype, kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = cm.crossmae_vit_base(
        img_size=64, embed_dim=128, depth=3, num_heads=4, decoder_embed_dim=64,
        decoder_depth=2, decoder_num_heads=2, **kw,
    ).to(DEVICE)  # fmt: skip
    x = torch.randn(4, 3, 64, 64, device=DEVICE)

    def run() -> Any:
        return model(x, generator=torch.Generator(device=DEVICE).manual_seed(1))

    _compare(model, run, dtype, per_linear=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_water_model_bit_identical(dtype: torch.dtype) -> None:
    from crossmae.models.water import water_mae_small

    torch.manual_seed(0)
    model = water_mae_small(
        num_steps=4, image_size=(60, 40), num_land_patches=12, num_sites=40, group_size=4,
        embed_dim=64, num_heads=2, decoder_dim=32, decoder_num_heads=2,
    ).to(DEVICE)  # fmt: skip
    g = torch.Generator(device=DEVICE).manual_seed(2)
    inputs = {
        n: torch.randn(4, 4, 60, 40, device=DEVICE, generator=g)
        for n in ("precipitation", "soil_moisture", "temperature")
    }
    inputs["evaporation"] = torch.randn(4, 40, 4, device=DEVICE, generator=g)
    flow = torch.randn(4, 40, 4, device=DEVICE, generator=g)
    flow[:2] = float("nan")
    inputs["river_flow"] = flow
    static = torch.randn(4, 40, 11, device=DEVICE, generator=g)

    def run() -> Any:
        return model(inputs, static=static, generator=torch.Generator(device=DEVICE).manual_seed(3))

    _compare(model, run, dtype, per_linear=1)  # the stacked blocks cast once per stack already
