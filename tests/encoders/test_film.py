"""`visible_patch_mean`: FiLM attributes averaged over visible patches of real-site means.

Legend: ``B`` batch, ``S`` sites, ``G`` sites per patch, ``P`` patches, ``A`` attributes.
``site_padding_mask`` True = padding site; ``patch_visible_mask`` True = visible patch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import generator, randn

from crossmae import visible_patch_mean


def _reference(
    attrs: torch.Tensor, g: int, visible: torch.Tensor, site_pad: torch.Tensor
) -> torch.Tensor:
    """Loop reference in float64 (loops are fine in a test)."""
    b, s, a = attrs.shape
    out = torch.zeros(b, a, dtype=torch.float64)
    for i in range(b):
        patch_means = []
        for p in range(math.ceil(s / g)):
            sites = [j for j in range(p * g, min(s, (p + 1) * g)) if not site_pad[i, j]]
            if visible[i, p] and sites:
                patch_means.append(attrs[i, sites].double().mean(dim=0))
        if patch_means:
            out[i] = torch.stack(patch_means).mean(dim=0)
    return out


def test_hand_computed_example() -> None:
    # 5 sites in patches of 2: patches {0,1}, {2,3}, {4, fill-up}
    attrs = torch.tensor([[[1.0], [3.0], [10.0], [20.0], [7.0]]], dtype=torch.float64)
    site_pad = torch.tensor([[False, False, False, True, False]])  # site 3 is padding
    vis = torch.tensor([[True, True, True]])
    out = visible_patch_mean(attrs, 2, vis, site_padding_mask=site_pad)
    # patch means: 2, 10 (site 3 excluded), 7 -> mean 19/3
    torch.testing.assert_close(out, torch.tensor([[19.0 / 3.0]], dtype=torch.float64))
    vis2 = torch.tensor([[False, True, True]])
    out2 = visible_patch_mean(attrs, 2, vis2, site_padding_mask=site_pad)
    torch.testing.assert_close(out2, torch.tensor([[8.5]], dtype=torch.float64))


@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 4),
    s=st.integers(1, 11),
    g=st.integers(1, 4),
    per_sample_pad=st.booleans(),
)
def test_matches_loop_reference_and_ignores_padding_values(
    seed: int, b: int, s: int, g: int, per_sample_pad: bool
) -> None:
    gen = generator(seed)
    p = math.ceil(s / g)
    attrs = randn(gen, b, s, 3, dtype=torch.float64)
    vis = torch.rand(b, p, generator=gen) < 0.6
    if per_sample_pad:
        site_pad = torch.rand(b, s, generator=gen) < 0.3
        given_pad = site_pad
    else:
        one = torch.rand(s, generator=gen) < 0.3
        site_pad = one.expand(b, s)
        given_pad = one
    out = visible_patch_mean(attrs, g, vis, site_padding_mask=given_pad)
    torch.testing.assert_close(out, _reference(attrs, g, vis, site_pad))
    # NaN/inf stored at padding sites changes nothing, and gives no NaN gradient
    poisoned = torch.where(site_pad[..., None], torch.full_like(attrs, float("nan")), attrs)
    poisoned.requires_grad_(True)
    out2 = visible_patch_mean(poisoned, g, vis, site_padding_mask=given_pad)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    out2.sum().backward()
    assert poisoned.grad is not None and torch.isfinite(poisoned.grad).all()
    assert (poisoned.grad[site_pad] == 0).all()


def test_no_visible_patch_gives_zero_and_dtypes() -> None:
    attrs = randn(0, 2, 6, 4)
    vis = torch.tensor([[False, False, False], [True, False, False]])
    out = visible_patch_mean(attrs, 2, vis)
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1], attrs[1, :2].mean(dim=0))
    half = visible_patch_mean(attrs.bfloat16(), 2, vis)
    assert half.dtype == torch.bfloat16
    compiled = torch.compile(visible_patch_mean, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(attrs, 2, vis), out)


def test_bad_arguments() -> None:
    attrs = randn(0, 2, 5, 3)
    vis = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"patch_visible_mask must have shape \[b, P\]"):
        visible_patch_mean(attrs, 2, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"patch_visible_mask must have dtype torch\.bool"):
        visible_patch_mean(attrs, 2, vis.float())
    with pytest.raises(ValueError, match="site_padding_mask must have shape"):
        visible_patch_mean(attrs, 2, vis, site_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="group_size must be an int"):
        visible_patch_mean(attrs, 2.0, vis)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="attributes must be a floating-point tensor"):
        visible_patch_mean(attrs.long(), 2, vis)
