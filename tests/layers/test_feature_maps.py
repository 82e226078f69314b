"""Contract tests for ``WeightedFeatureMaps``.

Legend: ``k`` encoder feature maps (``num_inputs``), ``L`` decoder layers
(``num_outputs``), ``B`` batch, ``N`` tokens, ``D`` width.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import randn, seeds

from crossmae import WeightedFeatureMaps


@st.composite
def wfm_cases(draw: st.DrawFn) -> tuple[int, int, int, int, int, int, int]:
    k = draw(st.integers(1, 5))
    n_out = draw(st.integers(1, 5))
    b = draw(st.integers(1, 4))
    n = draw(st.integers(0, 12))
    d = draw(st.integers(1, 8))
    return k, n_out, b, n, d, draw(seeds()), draw(seeds())


def test_parameters() -> None:
    m = WeightedFeatureMaps(3, 5)
    assert m.linear.weight.shape == (5, 3)
    assert m.linear.bias is None
    assert {n for n, _ in m.named_parameters()} == {"linear.weight"}


@given(case=wfm_cases())
def test_equals_explicit_weighted_sum(case: tuple[int, int, int, int, int, int, int]) -> None:
    k, n_out, b, n, d, s1, s2 = case
    torch.manual_seed(s1)
    m = WeightedFeatureMaps(k, n_out).double()
    with torch.no_grad():
        m.linear.weight.copy_(randn(s2, n_out, k, dtype=torch.float64))  # unconstrained signs
    feats = [randn(s1 + i, b, n, d, dtype=torch.float64) for i in range(k)]
    with torch.no_grad():
        out = m(feats)
        out_stacked = m(torch.stack(feats))
        out_tuple = m(tuple(feats))
    w = m.linear.weight.detach()
    expected = torch.stack(
        [
            sum((w[j, i] * feats[i] for i in range(k)), torch.zeros(b, n, d, dtype=torch.float64))
            for j in range(n_out)
        ]
    )
    assert out.shape == (n_out, b, n, d)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out_stacked, out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out_tuple, out, atol=1e-12, rtol=1e-12)


@given(case=wfm_cases())
def test_float32_list_and_stacked_agree(case: tuple[int, int, int, int, int, int, int]) -> None:
    k, n_out, b, n, d, s1, _ = case
    torch.manual_seed(s1)
    m = WeightedFeatureMaps(k, n_out)
    feats = [randn(s1 + i, b, n, d) for i in range(k)]
    with torch.no_grad():
        out = m(feats)
        assert out.dtype == torch.float32
        torch.testing.assert_close(m(torch.stack(feats)), out)


def test_wrong_number_of_inputs() -> None:
    m = WeightedFeatureMaps(3, 2)
    feats = [torch.randn(2, 4, 5) for _ in range(2)]
    with pytest.raises(ValueError):
        m(feats)
    with pytest.raises(ValueError):
        m(torch.stack(feats))
    with pytest.raises(ValueError):
        m([torch.randn(2, 4, 5) for _ in range(4)])


def test_gradients_reach_weights_and_inputs() -> None:
    torch.manual_seed(0)
    m = WeightedFeatureMaps(3, 2)
    feats = [torch.randn(2, 4, 5, requires_grad=True) for _ in range(3)]
    m(feats).square().sum().backward()
    assert m.linear.weight.grad is not None and torch.isfinite(m.linear.weight.grad).all()
    assert all(f.grad is not None for f in feats)


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    m = WeightedFeatureMaps(3, 2).double()
    feats = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = m.linear.weight.detach().clone().requires_grad_(True)

    def fn(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(m, {"linear.weight": w}, (f,))
        return out

    assert torch.autograd.gradcheck(fn, (feats, weight), eps=1e-6, atol=1e-6)
    listed = torch.autograd.gradcheck(
        lambda a, b, c: m([a, b, c]),
        tuple(torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)),
    )
    assert listed
