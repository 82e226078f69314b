"""crossmae's segmented (packed variable-length) Triton attention on CUDA
(crossmae.layers._segmented): against a float64 softmax per segment, flash varlen's error
at the same precision as the yardstick; through `_varlen`'s padded and lockstep paths;
compiled in one graph; captured in a CUDA graph.

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).

Legend: ``tq`` / ``tk`` packed query / key rows, ``h`` heads, ``d`` head dim.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpu_helpers import DEVICE, GPU

from crossmae.layers import _segmented, _varlen
from tests.layers.segmented_reference import bounds, reference

pytestmark = [
    *GPU,
    pytest.mark.skipif(
        DEVICE != "cuda" or not _segmented.available() or not _varlen.varlen_available(),
        reason="CUDA, triton and torch's varlen_attn",
    ),
]

# (query rows per segment, key rows per segment, heads, head dim): the water decoders'
# cross-attention (one real and one query-less segment per sample) at a small batch, a
# self-attention layout, empty segments both ways, one key, head dims 16 to 128
CASES = [
    ([1110, 0, 1110, 0], [3000, 4892, 7892, 0], 8, 16),
    ([300, 0, 41, 259], [300, 0, 41, 259], 8, 32),
    ([5, 0, 70, 3], [9, 4, 0, 130], 2, 16),
    ([17, 200], [1, 129], 4, 64),
    ([64, 65], [64, 63], 2, 128),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("lq", "lk", "h", "d"), CASES)
def test_matches_float64_softmax(
    lq: list[int], lk: list[int], h: int, d: int, dtype: torch.dtype
) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cu_q, cu_k = bounds(lq).to(DEVICE), bounds(lk).to(DEVICE)
    q = torch.randn(sum(lq), h, d, device=DEVICE, dtype=dtype, generator=g)
    kv = torch.randn(sum(lk), 2, h, d, device=DEVICE, dtype=dtype, generator=g)
    k, v = kv[:, 0], kv[:, 1]  # strided views of one projection, as the models pass
    assert _segmented.fits(q, k, v, cu_q, cu_k)
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    out = _segmented.segmented_attention(*ins, cu_q, cu_k, max(lq), max(lk))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference(*ref, cu_q, cu_k)
    grad = torch.randn(want.shape, device=DEVICE, dtype=torch.float64, generator=g)
    (want * grad).sum().backward()
    (out.double() * grad).sum().backward()
    # flash varlen's own error at the same precision, the yardstick
    from torch.nn.attention.varlen import varlen_attn

    fl = [t.detach().requires_grad_() for t in (q, k, v)]
    flash = varlen_attn(*fl, cu_q, cu_k, max(lq), max(lk))
    (flash.double() * grad).sum().backward()

    def err(a: torch.Tensor, r: torch.Tensor) -> float:
        return float((a.double() - r).abs().max() / r.abs().max().clamp_min(1))

    mine = [out, *(t.grad for t in ins)]
    theirs = [flash, *(t.grad for t in fl)]
    wants = [want, *(t.grad for t in ref)]
    for a, s, r in zip(mine, theirs, wants):
        assert a is not None and s is not None and r is not None
        assert torch.isfinite(a).all()
        assert err(a, r) <= max(2 * err(s, r), 1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_varlen_paths_and_compile_and_capture() -> None:
    """`_varlen`'s padded path with the kernels swapped in equals it on flash; compiled
    (``fullgraph=True``) equals eager exactly; a CUDA graph replays it."""
    torch.manual_seed(0)
    b, h, n, m, d = 4, 8, 96, 700, 16
    q = torch.randn(b, h, n, d, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(b, h, m, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    pad = (
        torch.arange(m, device=DEVICE)[None, :]
        >= torch.tensor([700, 9, 333, 1], device=DEVICE)[:, None]
    )
    k, v = k.masked_fill(pad[:, None, :, None], 0), v.masked_fill(pad[:, None, :, None], 0)

    def run(fn: Any) -> Any:
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        out.float().square().sum().backward()
        return out.detach(), [t.grad for t in ins]

    flash = run(lambda a, b_, c: _varlen.varlen_attend(a, b_, c, pad))
    mine = run(lambda a, b_, c: _varlen.varlen_attend(a, b_, c, pad, kernel=_segmented.varlen_fn))
    torch.testing.assert_close(mine[0], flash[0], atol=2e-2, rtol=2e-2)
    for a, f in zip(mine[1], flash[1]):
        torch.testing.assert_close(a, f, atol=5e-2, rtol=5e-2)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a, b_, c: _varlen.varlen_attend(a, b_, c, pad, kernel=_segmented.varlen_fn),
        fullgraph=True,
    )
    got = run(compiled)
    assert torch.equal(got[0], mine[0])
    assert all(torch.equal(a, c) for a, c in zip(got[1], mine[1]))
    torch._dynamo.reset()
    # a CUDA graph: forward and backward captured, replayed on new values
    sq, sk, sv = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def step() -> torch.Tensor:
        out = _varlen.varlen_attend(sq, sk, sv, pad, kernel=_segmented.varlen_fn)
        out.float().square().sum().backward()
        return out.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for t in (sq, sk, sv):
        t.grad = None
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        sq.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    want = _varlen.varlen_attend(sq.detach(), k, v, pad, kernel=_segmented.varlen_fn)
    torch.testing.assert_close(static, want)


@pytest.mark.parametrize("route", ["table", "forced"])
def test_water_model_on_the_segmented_kernels_equals_it_on_flash(route: str) -> None:
    """The multimodal water model at head dim 16 everywhere (its encoders' packed
    self-attention, its lockstep decoders' cross-attention), eager, on the segmented
    kernels (``table``: picked by the default kernel table's head-dim 16 rule;
    ``forced``: `use_for_varlen`): loss and gradients as on torch's varlen_attn (the table
    less its segmented rules), all finite (sample 0 has no river flow)."""
    import crossmae as cm
    from crossmae.layers import backend
    from crossmae.models.water import water_mae_small
    from tests.strategies import tiny_water_batch

    flash_table = tuple(r for r in backend.DEFAULT_KERNEL_TABLE if r.kernel != "segmented")

    def run(segmented: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = water_mae_small(
            num_steps=3, image_size=(40, 30), num_land_patches=6, num_sites=12, group_size=4,
            embed_dim=32, num_heads=2, decoder_dim=32, decoder_num_heads=2, decoder_depth=1,
            raster_depth=1, series_depth=1,
        ).to(DEVICE).train()  # fmt: skip
        inputs, static = tiny_water_batch(list(model.modalities), torch.Generator().manual_seed(0))
        inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        calls: list[int] = []
        real = _segmented.segmented_attention

        def counted(*a: Any, **kw: Any) -> torch.Tensor:
            calls.append(1)
            return real(*a, **kw)

        _segmented.use_for_varlen(segmented and route == "forced")
        cm.set_kernel_table(None if segmented and route == "table" else flash_table)
        _segmented.segmented_attention = counted  # type: ignore[assignment]
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(inputs, static=static.to(DEVICE), generator=gen)
            out.loss.backward()
        finally:
            _segmented.use_for_varlen(False)
            cm.set_kernel_table(None)
            _segmented.segmented_attention = real  # type: ignore[assignment]
        assert bool(calls) == segmented  # the kernels served the packed calls
        grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        return out.loss.detach(), grads

    flash_loss, flash_grads = run(False)
    loss, grads = run(True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, flash_loss, atol=2e-2, rtol=2e-2)
    assert len(grads) == len(flash_grads)
    worst = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-3))
        for a, b in zip(grads, flash_grads)
    )
    assert worst < 0.1, worst
