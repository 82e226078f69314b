"""Tests for ``crossmae.losses``: masked MSE, norm_pix targets, weighted sums.

Legend: ``B`` batch, ``P`` predicted slots, ``D`` values per token. ``padding_mask`` True =
padding slot; ``valid_mask`` True = valid target value.

The reference loss is a slow Python loop over samples, tokens and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import generator, seeds

from crossmae import RasterTokenizer, SeriesTokenizer, gather_tokens
from crossmae.losses import (
    MaskedMSELoss,
    masked_mse_loss,
    norm_pix_target,
    token_valid_mask_from_pixels,
    weighted_sum_losses,
)

Reduction = Literal["mean", "none", "sum"]
REDUCTION_NAMES: tuple[Reduction, ...] = ("mean", "none", "sum")
REDUCTIONS = st.sampled_from(REDUCTION_NAMES)


# ----------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """Seeded loss inputs; masks may empty whole samples or the whole batch."""

    pred: torch.Tensor
    target: torch.Tensor
    padding_mask: Optional[torch.Tensor]
    valid_mask: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]

    def kwargs(self) -> dict[str, Any]:
        return {
            "padding_mask": self.padding_mask,
            "valid_mask": self.valid_mask,
            "weight": self.weight,
        }

    def scored(self) -> torch.Tensor:
        """bool ``[B, P, D]``: values that enter the loss."""
        m = torch.ones(self.pred.shape, dtype=torch.bool)
        if self.valid_mask is not None:
            v = self.valid_mask
            m = m & (v if v.ndim == 3 else v[..., None])
        if self.padding_mask is not None:
            m = m & ~self.padding_mask[..., None]
        return m


@st.composite
def problems(draw: st.DrawFn, max_b: int = 4, max_p: int = 5, max_d: int = 4) -> Problem:
    b = draw(st.integers(1, max_b))
    p = draw(st.integers(0, max_p))
    d = draw(st.integers(1, max_d))
    g = generator(draw(seeds()))
    pred = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    target = torch.randn(b, p, d, generator=g, dtype=torch.float64) * 2 + 0.5
    pad_kind = draw(st.sampled_from(["none", "random", "rows", "all"]))
    pad: Optional[torch.Tensor] = None
    if pad_kind == "random":
        pad = torch.rand(b, p, generator=g) < 0.4
    elif pad_kind == "rows":
        pad = (torch.rand(b, p, generator=g) < 0.3) | (torch.rand(b, 1, generator=g) < 0.5)
    elif pad_kind == "all":
        pad = torch.ones(b, p, dtype=torch.bool)
    valid_kind = draw(st.sampled_from(["none", "values", "tokens"]))
    valid: Optional[torch.Tensor] = None
    if valid_kind == "values":
        valid = torch.rand(b, p, d, generator=g) < 0.7
    elif valid_kind == "tokens":
        valid = torch.rand(b, p, generator=g) < 0.7
    weight_kind = draw(st.sampled_from(["none", "sample", "token"]))
    weight: Optional[torch.Tensor] = None
    if weight_kind == "sample":
        weight = torch.rand(b, generator=g, dtype=torch.float64) * 2
    elif weight_kind == "token":
        weight = torch.rand(b, p, generator=g, dtype=torch.float64) * 2
    return Problem(pred, target, pad, valid, weight)


def ref_norm_token(values: list[float], eps: float) -> list[float]:
    """MAE norm_pix on one token's valid values (unbiased variance, 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return [(v - mean) / math.sqrt(var + eps) for v in values]


def _reduce(per_sample: list[float], nonempty: int, reduction: Reduction) -> torch.Tensor:
    """The batch reduction of the reference losses (mean over samples that score)."""
    out = torch.tensor(per_sample, dtype=torch.float64)
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    return out.sum() / max(nonempty, 1)


def ref_loss(
    pb: Problem, *, norm_pix: bool = False, eps: float = 1e-6, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Slow reference: loops over samples, tokens, values."""
    scored = pb.scored()
    b, p, _ = pb.pred.shape
    per_sample = []
    nonempty = 0
    for i in range(b):
        errs = []
        for j in range(p):
            idx = [k for k in range(pb.pred.shape[2]) if bool(scored[i, j, k])]
            if not idx:
                continue
            x = [float(pb.pred[i, j, k]) for k in idx]
            y = [float(pb.target[i, j, k]) for k in idx]
            if norm_pix:
                y = ref_norm_token(y, eps)
            e = sum((a - c) ** 2 for a, c in zip(x, y)) / len(idx)
            if pb.weight is not None and pb.weight.ndim == 2:
                e *= float(pb.weight[i, j])
            errs.append(e)
        loss = sum(errs) / len(errs) if errs else 0.0
        if errs:
            nonempty += 1
            if pb.weight is not None and pb.weight.ndim == 1:
                loss *= float(pb.weight[i])
        per_sample.append(loss)
    return _reduce(per_sample, nonempty, reduction)


def poison(x: torch.Tensor, where: torch.Tensor, seed: int) -> torch.Tensor:
    """Copy of ``x`` with NaN / +inf / -inf / huge values written where ``where`` is True."""
    g = generator(seed)
    sel = torch.randint(0, 4, x.shape, generator=g)
    garbage = torch.where(sel == 0, torch.tensor(float("nan"), dtype=x.dtype), 1e30)
    garbage = torch.where(sel == 1, torch.tensor(float("inf"), dtype=x.dtype), garbage)
    garbage = torch.where(sel == 2, torch.tensor(float("-inf"), dtype=x.dtype), garbage)
    return torch.where(where, garbage, x)


# ----------------------------------------------------------------------------- value


@given(problems(), st.booleans())
def test_matches_slow_reference(pb: Problem, norm_pix: bool) -> None:
    for reduction in REDUCTION_NAMES:
        got = masked_mse_loss(
            pb.pred, pb.target, norm_pix=norm_pix, reduction=reduction, **pb.kwargs()
        )
        want = ref_loss(pb, norm_pix=norm_pix, reduction=reduction)
        assert got.dtype == torch.float64
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@given(problems(), st.booleans())
def test_module_equals_function(pb: Problem, norm_pix: bool) -> None:
    m = MaskedMSELoss(norm_pix=norm_pix, reduction="none")
    assert "reduction='none'" in repr(m)
    got = m(pb.pred, pb.target, **pb.kwargs())
    want = masked_mse_loss(pb.pred, pb.target, norm_pix=norm_pix, reduction="none", **pb.kwargs())
    assert torch.equal(got, want)


def test_known_value() -> None:
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[5.0, 5.0], [9.0, 9.0]]])
    target = torch.zeros(2, 2, 2)
    pad = torch.tensor([[False, False], [True, True]])
    # sample 0: token errors 2.5 and 0 -> 1.25; sample 1 is empty and not counted
    assert masked_mse_loss(pred, target, padding_mask=pad).item() == pytest.approx(1.25)
    none = masked_mse_loss(pred, target, padding_mask=pad, reduction="none")
    assert none.tolist() == pytest.approx([1.25, 0.0])


# ----------------------------------------------------------------------------- robustness


@given(problems(), st.booleans(), REDUCTIONS, seeds())
def test_garbage_at_unscored_positions_changes_nothing(
    pb: Problem, norm_pix: bool, reduction: Reduction, seed: int
) -> None:
    """NaN/inf at padded or invalid positions: same loss, same gradients (bug 8)."""
    unscored = ~pb.scored()

    def loss_and_grad(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pred.clone().requires_grad_(True)
        y = target.clone().requires_grad_(True)
        out = masked_mse_loss(x, y, norm_pix=norm_pix, reduction=reduction, **pb.kwargs())
        torch.autograd.backward(out.sum())
        assert x.grad is not None and y.grad is not None
        return out.detach(), x.grad, y.grad

    clean = loss_and_grad(pb.pred, pb.target)
    dirty = loss_and_grad(poison(pb.pred, unscored, seed), poison(pb.target, unscored, seed + 1))
    for a, c in zip(clean, dirty):
        assert torch.isfinite(c).all()
        assert torch.equal(a, c)
    assert not clean[1][unscored].any()  # nothing flows to unscored positions


@given(problems(max_b=5), st.booleans(), seeds())
def test_per_sample_loss_independent_of_other_samples(
    pb: Problem, norm_pix: bool, seed: int
) -> None:
    """Sample i's loss never depends on other samples' values or flags (bugs 5 and 7)."""
    b = pb.pred.shape[0]
    full = masked_mse_loss(pb.pred, pb.target, norm_pix=norm_pix, reduction="none", **pb.kwargs())
    g = generator(seed)
    pred2 = torch.randn(pb.pred.shape, generator=g, dtype=torch.float64)
    pad2 = torch.rand(pb.pred.shape[:2], generator=g) < 0.5
    for i in range(b):
        one_kw: dict[str, Any] = {
            k: (v[i : i + 1] if v is not None else None) for k, v in pb.kwargs().items()
        }
        one = masked_mse_loss(
            pb.pred[i : i + 1], pb.target[i : i + 1], norm_pix=norm_pix, reduction="none", **one_kw
        )
        torch.testing.assert_close(one, full[i : i + 1], rtol=1e-12, atol=0)
        # change every other sample's content and padding flags
        others = torch.arange(b) != i
        kw = dict(pb.kwargs())
        base_pad = pb.padding_mask if pb.padding_mask is not None else torch.zeros_like(pad2)
        kw["padding_mask"] = torch.where(others[:, None], pad2, base_pad)
        pred_mod = torch.where(others[:, None, None], pred2, pb.pred)
        mod = masked_mse_loss(pred_mod, pb.target, norm_pix=norm_pix, reduction="none", **kw)
        assert torch.equal(mod[i], full[i])


@given(problems(), REDUCTIONS)
def test_empty_samples_finite_and_all_empty_batch_is_zero(
    pb: Problem, reduction: Reduction
) -> None:
    """Any mix of empty samples: finite loss and grads; an all-empty batch gives 0 (bug 6)."""
    x = pb.pred.clone().requires_grad_(True)
    loss = masked_mse_loss(x, pb.target, reduction=reduction, **pb.kwargs())
    torch.autograd.backward(loss.sum())
    assert torch.isfinite(loss).all() and x.grad is not None and torch.isfinite(x.grad).all()

    everything = torch.ones(pb.pred.shape[:2], dtype=torch.bool)
    y = pb.pred.clone().requires_grad_(True)
    kw = dict(pb.kwargs())
    kw["padding_mask"] = everything
    zero = masked_mse_loss(
        y, poison(pb.target, torch.ones_like(everything)[..., None], 0), reduction=reduction, **kw
    )
    assert zero.requires_grad
    torch.autograd.backward(zero.sum())
    assert torch.equal(zero, torch.zeros_like(zero))
    assert y.grad is not None and torch.equal(y.grad, torch.zeros_like(y.grad))


def test_empty_shapes() -> None:
    for shape in ((0, 3, 2), (2, 0, 2)):
        x = torch.randn(shape, requires_grad=True)
        loss = masked_mse_loss(x, torch.randn(shape))
        torch.autograd.backward(loss)
        assert loss.item() == 0.0 and x.grad is not None


# ----------------------------------------------------------------------------- norm_pix


@given(problems(), seeds())
def test_norm_pix_target_matches_formula(pb: Problem, seed: int) -> None:
    eps = 1e-6
    out = norm_pix_target(pb.target, eps=eps)
    mean = pb.target.mean(dim=-1, keepdim=True)
    if pb.target.shape[-1] > 1 and pb.target.numel() > 0:
        var = pb.target.var(dim=-1, keepdim=True)  # unbiased, as MAE's norm_pix_loss
        torch.testing.assert_close(out, (pb.target - mean) / (var + eps) ** 0.5)
    else:
        assert torch.equal(out, torch.zeros_like(out))
    valid = torch.rand(pb.target.shape, generator=generator(seed)) < 0.6
    got = norm_pix_target(poison(pb.target, ~valid, seed), valid, eps)
    assert torch.isfinite(got).all()
    assert not got[~valid].any()
    b, p, d = pb.target.shape
    for i in range(b):
        for j in range(p):
            idx = [k for k in range(d) if bool(valid[i, j, k])]
            if idx:
                want = ref_norm_token([float(pb.target[i, j, k]) for k in idx], eps)
                torch.testing.assert_close(
                    got[i, j, idx], torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12
                )


def test_norm_pix_target_keeps_dtype_and_token_mask() -> None:
    t = torch.randn(2, 3, 4, generator=generator(0)).to(torch.bfloat16)
    out = norm_pix_target(t, torch.tensor([[True, False, True], [True, True, True]]))
    assert out.dtype == torch.bfloat16
    assert not out[0, 1].any()
    ref = norm_pix_target(t.float())
    torch.testing.assert_close(out[1].float(), ref[1], rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- dtypes, compile


@given(problems(), st.booleans())
def test_float32_and_bf16_autocast(pb: Problem, norm_pix: bool) -> None:
    pred32 = pb.pred.float()
    ref = ref_loss(
        Problem(pred32.double(), pb.target, *list(pb.kwargs().values())), norm_pix=norm_pix
    )
    got32 = masked_mse_loss(pred32, pb.target.float(), norm_pix=norm_pix, **pb.kwargs())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-4, atol=1e-5)

    lin = torch.nn.Linear(pb.pred.shape[-1], pb.pred.shape[-1])
    x = pb.pred.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
        assert out.dtype == torch.bfloat16
        loss = masked_mse_loss(out, pb.target.float(), norm_pix=norm_pix, **pb.kwargs())
    assert loss.dtype == torch.float32
    torch.autograd.backward(loss)
    assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        plain = masked_mse_loss(
            lin(pb.pred.float()).bfloat16(), pb.target.float(), norm_pix=norm_pix, **pb.kwargs()
        )
    torch.testing.assert_close(loss.detach(), plain, rtol=3e-2, atol=3e-2)


@settings(max_examples=8)  # each example compiles afresh (options change the graph)
@given(problems(max_b=3, max_p=4, max_d=3), st.booleans(), REDUCTIONS, seeds())
def test_compile_fullgraph(pb: Problem, norm_pix: bool, reduction: Reduction, seed: int) -> None:
    torch.compiler.reset()
    compiled = torch.compile(masked_mse_loss, fullgraph=True, backend="eager")
    unscored = ~pb.scored()
    pred = poison(pb.pred, unscored, seed).float().requires_grad_(True)
    target = poison(pb.target, unscored, seed + 1).float()
    got = compiled(pred, target, norm_pix=norm_pix, reduction=reduction, **pb.kwargs())
    torch.autograd.backward(got.sum())
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    want = masked_mse_loss(
        pred.detach(), target, norm_pix=norm_pix, reduction=reduction, **pb.kwargs()
    )
    torch.testing.assert_close(got.detach(), want)


# ----------------------------------------------------------------------------- arguments


def test_bad_arguments() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="target"):
        masked_mse_loss(x, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="pred"):
        masked_mse_loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(TypeError, match="pred"):
        masked_mse_loss(x.long(), x)
    with pytest.raises(ValueError, match="padding_mask"):
        masked_mse_loss(x, x, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask"):
        masked_mse_loss(x, x, padding_mask=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="valid_mask"):
        masked_mse_loss(x, x, valid_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid_mask"):
        masked_mse_loss(x, x, valid_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="weight"):
        masked_mse_loss(x, x, weight=torch.ones(3))
    with pytest.raises(TypeError, match="weight"):
        masked_mse_loss(x, x, weight=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        masked_mse_loss(x, x, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        masked_mse_loss(x, x, eps=0.0)
    with pytest.raises(ValueError, match="reduction"):
        MaskedMSELoss(reduction="batchmean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        norm_pix_target(x, eps=-1.0)
    with pytest.raises(ValueError, match="valid_mask"):
        norm_pix_target(x, torch.ones(3, dtype=torch.bool))


def test_weighted_sum_losses() -> None:
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0)
    total = weighted_sum_losses({"flow": a, "temp": b}, {"temp": 10, "flow": 100.0})
    assert total.item() == pytest.approx(230.0)
    torch.autograd.backward(total)
    assert a.grad is not None and a.grad.item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="'temp'"):
        weighted_sum_losses({"flow": a, "temp": b}, {"flow": 1.0})
    with pytest.raises(ValueError, match="'tmep'"):
        weighted_sum_losses({"flow": a}, {"flow": 1.0, "tmep": 1.0})
    with pytest.raises(ValueError, match="empty"):
        weighted_sum_losses({}, {})
    with pytest.raises(TypeError, match="'flow'"):
        weighted_sum_losses({"flow": 1.0}, {"flow": 1.0})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="'flow'"):
        weighted_sum_losses({"flow": a}, {"flow": "1"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="'flow'"):
        weighted_sum_losses({"flow": a}, {"flow": float("nan")})


# ----------------------------------------------------------------------------- per-value average


def ref_loss_value(pb: Problem, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Slow reference of ``average="value"``: each scored value counts once in its sample."""
    scored = pb.scored()
    b, p, d = pb.pred.shape
    per_sample, nonempty = [], 0
    for i in range(b):
        total, count = 0.0, 0
        for j in range(p):
            for k in range(d):
                if not bool(scored[i, j, k]):
                    continue
                e = (float(pb.pred[i, j, k]) - float(pb.target[i, j, k])) ** 2
                if pb.weight is not None and pb.weight.ndim == 2:
                    e *= float(pb.weight[i, j])
                total += e
                count += 1
        loss = total / count if count else 0.0
        if count:
            nonempty += 1
            if pb.weight is not None and pb.weight.ndim == 1:
                loss *= float(pb.weight[i])
        per_sample.append(loss)
    return _reduce(per_sample, nonempty, reduction)


@given(problems(), REDUCTIONS, seeds())
def test_value_average_matches_reference_and_ignores_garbage(
    pb: Problem, reduction: Reduction, seed: int
) -> None:
    out = masked_mse_loss(pb.pred, pb.target, **pb.kwargs(), reduction=reduction, average="value")
    torch.testing.assert_close(out, ref_loss_value(pb, reduction=reduction))
    module = MaskedMSELoss(reduction=reduction, average="value")
    torch.testing.assert_close(module(pb.pred, pb.target, **pb.kwargs()), out)
    # NaN/inf written at padded or invalid positions leaves loss and gradients unchanged
    unscored = ~pb.scored()
    pred = poison(pb.pred, unscored, seed).requires_grad_(True)
    target = poison(pb.target, unscored, seed + 1)
    bad = masked_mse_loss(pred, target, **pb.kwargs(), reduction=reduction, average="value")
    torch.testing.assert_close(bad, out, rtol=0, atol=0)
    bad.sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert (pred.grad[unscored] == 0).all()


def test_series_loss_per_real_site_hand_computed() -> None:
    """Two series tokens of group_size 4: a full one and a half-padded one (2 real sites)."""
    pred = torch.zeros(1, 2, 4, dtype=torch.float64)
    target = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, float("nan"), float("nan")]]])
    target = target.double()
    valid = torch.tensor([[[True] * 4, [True, True, False, False]]])
    per_site = masked_mse_loss(pred, target, valid_mask=valid, average="value")
    per_token = masked_mse_loss(pred, target, valid_mask=valid)
    # per real site: (4 * 1 + 2 * 9) / 6; per token: (1 + 9) / 2
    torch.testing.assert_close(per_site, torch.tensor(22.0 / 6.0, dtype=torch.float64))
    torch.testing.assert_close(per_token, torch.tensor(5.0, dtype=torch.float64))
    compiled = torch.compile(masked_mse_loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(pred, target, valid_mask=valid, average="value"), per_site)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = masked_mse_loss(pred.float(), target.bfloat16(), valid_mask=valid, average="value")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), per_site)


def test_bad_average() -> None:
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="average must be one of"):
        masked_mse_loss(x, x, average="site")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="average must be one of"):
        MaskedMSELoss(average="tokens")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- pixel land masks


def _ref_pixel_mask(
    pix: torch.Tensor, ph: int, pw: int, ids: torch.Tensor, index: torch.Tensor, c: int
) -> torch.Tensor:
    """Loop reference of `token_valid_mask_from_pixels`."""
    gw = pix.shape[-1] // pw
    b, p = ids.shape
    out = torch.zeros(b, p, ph * pw * c, dtype=torch.bool)
    per_step = index.numel()
    for i in range(b):
        for j in range(p):
            t, slot = divmod(int(ids[i, j]), per_step)
            patch = int(index[slot])
            row, col = divmod(patch, gw)
            if pix.ndim == 2:
                m = pix
            elif pix.ndim == 3:
                m = pix[i]
            else:
                m = pix[i, t]
            block = m[row * ph : (row + 1) * ph, col * pw : (col + 1) * pw]
            vals = [bool(block[a, q]) for a in range(ph) for q in range(pw) for _ in range(c)]
            out[i, j] = torch.tensor(vals)
    return out


@given(
    seed=seeds(),
    rank=st.sampled_from([2, 3, 4]),
    use_index=st.booleans(),
    c=st.integers(1, 2),
)
def test_token_valid_mask_from_pixels_matches_reference(
    seed: int, rank: int, use_index: bool, c: int
) -> None:
    g = generator(seed)
    b, t, ph, pw, gh, gw = 2, 3, 2, 3, 3, 2
    shape = {2: (gh * ph, gw * pw), 3: (b, gh * ph, gw * pw), 4: (b, t, gh * ph, gw * pw)}[rank]
    pix = torch.rand(shape, generator=g) < 0.6
    index = torch.tensor([0, 2, 3, 5]) if use_index else torch.arange(gh * gw)
    ids = torch.randint(0, t * index.numel(), (b, 5), generator=g)
    out = token_valid_mask_from_pixels(
        pix, (ph, pw), ids, patch_index=index if use_index else None, in_chans=c
    )
    assert out.dtype == torch.bool and out.shape == (b, 5, ph * pw * c)
    torch.testing.assert_close(out, _ref_pixel_mask(pix, ph, pw, ids, index, c), rtol=0, atol=0)


def test_token_valid_mask_from_pixels_agrees_with_raster_tokenizer() -> None:
    """The land-mask part of RasterTokenizer.targets' validity, for the predicted tokens."""
    g = generator(3)
    land = torch.rand(8, 6, generator=g) < 0.7
    tok = RasterTokenizer(8, 2, (8, 6), valid_mask=land)
    x = torch.randn(2, 3, 8, 6, generator=g)
    _, target_valid = tok.targets(x)
    ids = torch.randint(0, tok.num_tokens(3), (2, 4), generator=g)
    expected = gather_tokens(target_valid, ids)
    got = token_valid_mask_from_pixels(land, 2, ids, patch_index=tok.valid_patch_index)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    compiled = torch.compile(token_valid_mask_from_pixels, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(land, 2, ids, patch_index=tok.valid_patch_index), got)
    # with a raster loss: NaN over the sea (invalid pixels) leaves it unchanged
    pred = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    target = gather_tokens(tok.targets(x)[0], ids).double()
    loss = masked_mse_loss(pred, target, valid_mask=got)
    sea = torch.where(got, target, torch.full_like(target, float("nan")))
    torch.testing.assert_close(masked_mse_loss(pred, sea, valid_mask=got), loss, rtol=0, atol=0)


def test_token_valid_mask_from_pixels_bad_arguments() -> None:
    ids = torch.zeros(2, 3, dtype=torch.long)
    land = torch.ones(4, 6, dtype=torch.bool)
    with pytest.raises(TypeError, match="pixel_valid_mask must have dtype"):
        token_valid_mask_from_pixels(land.float(), 2, ids)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        token_valid_mask_from_pixels(land, 4, ids)
    with pytest.raises(ValueError, match="but ids has batch 2"):
        token_valid_mask_from_pixels(torch.ones(3, 4, 6, dtype=torch.bool), 2, ids)
    with pytest.raises(TypeError, match="ids must be an int64"):
        token_valid_mask_from_pixels(land, 2, ids.float())
    with pytest.raises(TypeError, match="patch_size must be an int or a pair"):
        token_valid_mask_from_pixels(land, [2, 2], ids)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pixel_valid_mask must be"):
        token_valid_mask_from_pixels(torch.ones(6, dtype=torch.bool), 2, ids)


def test_series_loss_per_real_site_with_series_tokenizer() -> None:
    """With SeriesTokenizer's targets, average='value' is the mean over real (site, step)."""
    g = generator(5)
    s, t, group = 7, 3, 4  # 2 site groups, the last with 3 real sites and 1 fill-up site
    tok = SeriesTokenizer(8, s, group_size=group)
    x = torch.randn(2, s, t, generator=g, dtype=torch.float64)
    target_full, valid_full = tok.targets(x)  # [b, t * 2, 4], time-major tokens
    ids = torch.tensor([[0, 1, 5], [3, 4, 0]])
    pad = torch.tensor([[False, False, False], [False, False, True]])
    target, valid = gather_tokens(target_full, ids), gather_tokens(valid_full, ids)
    pred = torch.randn(2, 3, group, generator=g, dtype=torch.float64)
    loss = masked_mse_loss(pred, target, padding_mask=pad, valid_mask=valid, reduction="none")
    per_site = masked_mse_loss(
        pred, target, padding_mask=pad, valid_mask=valid, reduction="none", average="value"
    )
    expected = []
    for i in range(2):
        errs = []
        for j in range(3):
            if pad[i, j]:
                continue
            step, patch = divmod(int(ids[i, j]), 2)
            for slot in range(group):
                site = patch * group + slot
                if site < s:
                    errs.append((float(pred[i, j, slot]) - float(x[i, site, step])) ** 2)
        expected.append(sum(errs) / len(errs))
    torch.testing.assert_close(per_site, torch.tensor(expected, dtype=torch.float64))
    assert not torch.allclose(loss, per_site)  # the half-filled group weighs differently
