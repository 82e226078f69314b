"""Contract tests for ``Mlp``, ``DropPath`` and ``drop_path``.

Legend: ``B`` batch, ``N`` tokens, ``D`` width.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import randn, seeds
from torch import nn

from crossmae import DropPath, Mlp, drop_path


def test_mlp_structure_and_defaults() -> None:
    m = Mlp(6)
    children = dict(m.named_children())
    for name in ("fc1", "act", "fc2"):
        assert name in children
    assert isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear)
    assert (m.fc1.in_features, m.fc1.out_features) == (6, 6)  # hidden defaults to in
    assert (m.fc2.in_features, m.fc2.out_features) == (6, 6)  # out defaults to in
    assert isinstance(m.act, nn.GELU)
    assert m.fc1.bias is not None and m.fc2.bias is not None
    m2 = Mlp(6, hidden_features=10, out_features=3, act_layer=nn.ReLU, bias=False)
    assert (m2.fc1.in_features, m2.fc1.out_features) == (6, 10)
    assert (m2.fc2.in_features, m2.fc2.out_features) == (10, 3)
    assert isinstance(m2.act, nn.ReLU)
    assert m2.fc1.bias is None and m2.fc2.bias is None


@given(seed=seeds(), n=st.integers(0, 9), drop=st.sampled_from([0.0, 0.3, 0.5]))
def test_mlp_forward_in_eval(seed: int, n: int, drop: float) -> None:
    torch.manual_seed(seed)
    m = Mlp(5, hidden_features=7, out_features=4, drop=drop).eval()
    x = randn(seed, 3, n, 5)
    with torch.no_grad():
        out = m(x)
        ref = m.fc2(m.act(m.fc1(x)))
    assert out.shape == (3, n, 4)
    torch.testing.assert_close(out, ref)


def test_mlp_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    m = Mlp(8, hidden_features=32, drop=0.5)
    x = torch.randn(4, 10, 8)
    with torch.no_grad():
        m.train()
        a = m(x)
        m.eval()
        b, c = m(x), m(x)
    assert torch.equal(b, c)
    assert not torch.allclose(a, b)


@given(seed=seeds(), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
def test_drop_path_identity_in_eval(seed: int, p: float) -> None:
    x = randn(seed, 5, 3, 4)
    m = DropPath(p).eval()
    assert torch.equal(m(x), x)
    assert torch.equal(drop_path(x, p, training=False), x)
    assert torch.equal(drop_path(x, p), x)  # training defaults to False


def test_drop_path_zero_prob_identity_in_train() -> None:
    x = torch.randn(6, 3, 4)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert torch.equal(drop_path(x, 0.0, training=True), x)


@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("use_module", [True, False])
def test_drop_path_per_sample_and_scaled(p: float, use_module: bool) -> None:
    torch.manual_seed(1234)
    b = 20000
    x = torch.rand(b, 3, 2) + 0.5  # strictly positive
    out = DropPath(p).train()(x) if use_module else drop_path(x, p, training=True)
    assert out.shape == x.shape
    ratio = out / x
    # per sample: all entries dropped, or all scaled by 1/(1-p)
    dropped = (ratio == 0).all(dim=(1, 2))
    kept = torch.isclose(ratio, torch.full_like(ratio, 1 / (1 - p))).all(dim=(1, 2))
    assert bool((dropped ^ kept).all())
    frac = dropped.double().mean().item()
    sigma = (p * (1 - p) / b) ** 0.5
    assert abs(frac - p) < 5 * sigma, (frac, p)
    # unbiased in expectation
    mean_ratio = ratio.mean().item()
    assert abs(mean_ratio - 1.0) < 5 * (p / (1 - p) / b) ** 0.5


def test_drop_path_gradient_matches_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, requires_grad=True)
    out = DropPath(0.5).train()(x)
    out.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad * x.detach(), out.detach())


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_drop_path_bad_probability(p: float) -> None:
    with pytest.raises(ValueError):
        DropPath(p)
