"""Post-norm encoder: equal to PyTorch's layers, FiLM in the γ·LN(x + f(x)) + β form, padding.

Legend: ``B`` batch, ``N`` tokens, ``D`` width, ``A`` attributes. Padding masks: True = padding.
"""

from __future__ import annotations

import inspect
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import lengths_to_mask, padded_batches, poison_padding, randn
from torch import nn

import crossmae as cm
from crossmae import EncoderOutput, FiLMProjection, PostNormBlock, PostNormTransformerEncoder

D, H, A = 16, 4, 3


def _copy_torch_layer(block: PostNormBlock, ref: nn.TransformerEncoderLayer) -> None:
    with torch.no_grad():
        block.attn.qkv.weight.copy_(ref.self_attn.in_proj_weight)
        block.attn.qkv.bias.copy_(ref.self_attn.in_proj_bias)
        block.attn.proj.weight.copy_(ref.self_attn.out_proj.weight)
        block.attn.proj.bias.copy_(ref.self_attn.out_proj.bias)
        block.mlp.fc1.load_state_dict(ref.linear1.state_dict())
        block.mlp.fc2.load_state_dict(ref.linear2.state_dict())
        block.norm1.load_state_dict(ref.norm1.state_dict())
        block.norm2.load_state_dict(ref.norm2.state_dict())


@pytest.mark.parametrize("depth", [1, 3])
def test_equals_torch_transformer_encoder_post_norm(depth: int) -> None:
    """Same weights → same outputs as nn.TransformerEncoder(norm_first=False) + LayerNorm."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        D, H, 4 * D, 0.1, activation="relu", batch_first=True, norm_first=False
    )
    ref = nn.TransformerEncoder(
        layer, depth, norm=nn.LayerNorm(D), enable_nested_tensor=False
    ).double()
    ref.eval()
    enc = PostNormTransformerEncoder(D, depth, H).double().eval()
    for blk, ref_layer in zip(enc.blocks, ref.layers):
        _copy_torch_layer(blk, ref_layer)
    with torch.no_grad():
        enc.norm.load_state_dict(ref.norm.state_dict())  # type: ignore[union-attr]
    pm = lengths_to_mask([7, 4, 1], 7)
    x = randn(1, 3, 7, D, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=pm)
        out = enc(x, pm)
    assert isinstance(out, EncoderOutput)
    torch.testing.assert_close(out.tokens[~pm], expected[~pm], atol=1e-12, rtol=1e-12)
    # parameter count: the same as PyTorch's (12 d^2 + 13 d per layer + the final norm)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert (
        sum(p.numel() for p in enc.parameters()) == n_ref == depth * (12 * D * D + 13 * D) + 2 * D
    )


class _ReferenceFiLMLayer(nn.Module):
    """Independent reference of the downstream FiLM layer, on nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, dropout=0.1, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.film = nn.Linear(A, 2 * D)

    def forward(self, x: torch.Tensor, attrs: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
        gamma, beta = torch.tanh(self.film(attrs)).chunk(2, dim=-1)
        g, b = gamma[:, None], beta[:, None]
        a, _ = self.attn(x, x, x, key_padding_mask=pm, need_weights=False)
        x = g * self.ln1(x + a) + b
        return g * self.ln2(x + self.fc2(F.relu(self.fc1(x)))) + b


def test_film_form_matches_reference() -> None:
    """x = γ·LN(x + MHA(x)) + β, then x = γ·LN(x + FFN(x)) + β with γ, β = tanh(Linear(attrs))."""
    torch.manual_seed(1)
    refs = nn.ModuleList(_ReferenceFiLMLayer() for _ in range(2)).double().eval()
    enc = PostNormTransformerEncoder(D, 2, H, proj_drop=0.0, cond_dim=A, final_norm=True)
    enc = enc.double().eval()
    for blk, film, r in zip(enc.blocks, enc.films or [], refs):
        with torch.no_grad():
            blk.attn.qkv.weight.copy_(r.attn.in_proj_weight)
            blk.attn.qkv.bias.copy_(r.attn.in_proj_bias)
            blk.attn.proj.load_state_dict(r.attn.out_proj.state_dict())
            blk.norm1.load_state_dict(r.ln1.state_dict())
            blk.norm2.load_state_dict(r.ln2.state_dict())
            blk.mlp.fc1.load_state_dict(r.fc1.state_dict())
            blk.mlp.fc2.load_state_dict(r.fc2.state_dict())
            film.proj.load_state_dict(r.film.state_dict())
    pm = lengths_to_mask([6, 3], 6)
    x = randn(2, 2, 6, D, dtype=torch.float64)
    attrs = randn(3, 2, A, dtype=torch.float64)
    with torch.no_grad():
        expected = x
        for r in refs:
            expected = r(expected, attrs, pm)
        expected = enc.norm(expected)
        out = enc(x, pm, cond=attrs, return_layers="all")
    torch.testing.assert_close(out.tokens[~pm], expected[~pm], atol=1e-12, rtol=1e-12)
    assert out.features is not None and out.features.shape == (2, 2, 6, D)


def test_block_film_arguments() -> None:
    blk = PostNormBlock(D, H).eval()
    x = randn(0, 2, 5, D)
    g, b = randn(1, 2, D), randn(2, 2, D)
    with torch.no_grad():
        plain = blk(x)
        out = blk(x, gamma=g, beta=b)
        h = blk.norm1(x + blk.attn(x))
        h = g[:, None] * h + b[:, None]
        h = g[:, None] * blk.norm2(h + blk.mlp(h)) + b[:, None]
    torch.testing.assert_close(out, h)
    assert not torch.allclose(out, plain)
    with pytest.raises(ValueError, match="together"):
        blk(x, gamma=g)
    with pytest.raises(ValueError, match="beta must have shape"):
        blk(x, gamma=g, beta=randn(3, 3, D))


def test_film_projection_is_tanh_linear() -> None:
    fp = FiLMProjection(A, D)
    c = randn(4, 5, A)
    g, b = fp(c)
    gb = torch.tanh(c @ fp.proj.weight.T + fp.proj.bias)
    torch.testing.assert_close(torch.cat([g, b], dim=-1), gb)
    assert g.shape == b.shape == (5, D)
    assert (g.abs() < 1).all()
    with pytest.raises(ValueError, match="cond must have shape"):
        fp(randn(4, 5, A + 1))


def test_encoder_protocol_surface() -> None:
    """CONTRACT § v0.2 `Encoder`: int dim/depth, forward(tokens, padding_mask=None, *,
    return_layers=None, include_input=False); conditioning encoders expose cond_dim, cond=."""
    plain = PostNormTransformerEncoder(D, 2, H)
    film = PostNormTransformerEncoder(D, 2, H, cond_dim=A)
    for enc in (plain, film):
        assert isinstance(enc.dim, int) and isinstance(enc.depth, int)
        params = inspect.signature(enc.forward).parameters
        assert list(params)[:2] == ["tokens", "padding_mask"]
        assert params["padding_mask"].default is None
        for name, default in (("return_layers", None), ("include_input", False), ("cond", None)):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[name].default is default
    assert plain.cond_dim is None and film.cond_dim == A
    proto = getattr(cm, "Encoder", None)
    if proto is not None:  # the protocol lands with issue 10 item 1
        assert isinstance(plain, proto) and isinstance(film, proto)


def test_feature_taps_and_norm_features() -> None:
    x = randn(5, 2, 4, D)
    raw = PostNormTransformerEncoder(D, 3, H).eval()
    normed = PostNormTransformerEncoder(D, 3, H, norm_features=True).eval()
    normed.load_state_dict(raw.state_dict())
    with torch.no_grad():
        r = raw(x, return_layers=[0, -1], include_input=True)
        n = normed(x, return_layers=[0, -1], include_input=True)
        h0 = raw.blocks[0](x)
        h2 = raw.blocks[2](raw.blocks[1](h0))
    assert r.features is not None and n.features is not None
    torch.testing.assert_close(r.features, torch.stack([x, h0, h2]))
    torch.testing.assert_close(n.features, raw.norm(torch.stack([x, h0, h2])))
    torch.testing.assert_close(r.tokens, raw.norm(h2))
    torch.testing.assert_close(n.tokens, r.tokens)


def test_bad_arguments() -> None:
    enc = PostNormTransformerEncoder(D, 2, H, cond_dim=A)
    x = randn(0, 2, 3, D)
    with pytest.raises(ValueError, match="cond"):
        enc(x)
    with pytest.raises(ValueError, match="cond must have shape"):
        enc(x, cond=randn(1, 2, A + 1))
    with pytest.raises(ValueError, match="without cond_dim"):
        PostNormTransformerEncoder(D, 2, H)(x, cond=randn(1, 2, A))
    with pytest.raises(ValueError, match="needs return_layers"):
        enc(x, cond=randn(1, 2, A), include_input=True)
    with pytest.raises(TypeError, match="include_input must be a bool"):
        enc(x, cond=randn(1, 2, A), return_layers="all", include_input=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens has width"):
        enc(randn(0, 2, 3, D + 1), cond=randn(1, 2, A))
    with pytest.raises(ValueError, match="norm_features=True needs final_norm=True"):
        PostNormTransformerEncoder(D, 2, H, final_norm=False, norm_features=True)
    with pytest.raises(ValueError, match="mlp_ratio"):
        PostNormBlock(D, H, mlp_ratio=0)
    with pytest.raises(ValueError, match="drop"):
        PostNormBlock(D, H, drop=1.0)
    with pytest.raises(TypeError, match=r"padding_mask must have dtype torch\.bool"):
        enc(x, torch.zeros(2, 3, dtype=torch.int64), cond=randn(1, 2, A))


def test_dropout_only_in_training() -> None:
    enc = PostNormTransformerEncoder(D, 2, H)
    blk = enc.blocks[0]
    assert blk.attn.attn_drop == 0.1
    assert isinstance(blk.attn.proj_drop, nn.Dropout) and blk.attn.proj_drop.p == 0.1
    assert isinstance(blk.mlp.drop1, nn.Dropout) and blk.mlp.drop1.p == 0.1
    assert isinstance(blk.mlp.act, nn.ReLU) and blk.mlp.fc1.out_features == 4 * D
    x = randn(6, 2, 5, D)
    enc.train()
    torch.manual_seed(0)
    a = enc(x).tokens
    b = enc(x).tokens
    assert not torch.allclose(a, b)
    enc.eval()
    torch.testing.assert_close(enc(x).tokens, enc(x).tokens, rtol=0, atol=0)


@settings(max_examples=20)  # each example runs 2 encoders + backward: keep CI fast
@given(pb=padded_batches(max_batch=4, max_len=9, heads=(2,), head_dims=(4,)), film=st.booleans())
def test_padding_invariance_and_empty_samples(pb: object, film: bool) -> None:
    """NaN/inf in padded slots never reaches real outputs; empty samples stay finite."""
    from strategies import PaddedBatch

    assert isinstance(pb, PaddedBatch)
    torch.manual_seed(pb.seed % 1000)
    enc = PostNormTransformerEncoder(pb.dim, 2, 2, cond_dim=A if film else None).eval()
    x = pb.tokens().requires_grad_(True)
    pm = pb.padding_mask
    cond: Optional[torch.Tensor] = randn(pb.seed + 1, pb.batch, A) if film else None
    clean = enc(x, pm, cond=cond, return_layers="all", include_input=True)
    poisoned = enc(
        poison_padding(x.detach(), pm, pb.seed, kind="mixed"),
        pm,
        cond=cond,
        return_layers="all",
        include_input=True,
    )
    real = ~pm
    torch.testing.assert_close(poisoned.tokens[real], clean.tokens[real], rtol=0, atol=0)
    assert clean.features is not None and poisoned.features is not None
    torch.testing.assert_close(poisoned.features[:, real], clean.features[:, real], rtol=0, atol=0)
    assert torch.isfinite(poisoned.tokens).all() and torch.isfinite(poisoned.features).all()
    (clean.tokens.sum() + clean.features.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad[pm] == 0).all()  # padded inputs do not influence anything


def test_batch_independence() -> None:
    """Perturbing sample j never changes sample i; results equal the batch-of-one results."""
    enc = PostNormTransformerEncoder(D, 2, H, cond_dim=A).eval()
    pm = lengths_to_mask([5, 0, 3], 5)
    x, c = randn(8, 3, 5, D), randn(9, 3, A)
    with torch.no_grad():
        full = enc(x, pm, cond=c).tokens
        for i in range(3):
            one = enc(x[i : i + 1], pm[i : i + 1], cond=c[i : i + 1]).tokens
            torch.testing.assert_close(one[~pm[i : i + 1]], full[i : i + 1][~pm[i : i + 1]])
        x2 = x.clone()
        x2[2] += 10
        out2 = enc(x2, pm, cond=c).tokens
    torch.testing.assert_close(out2[:2], full[:2], rtol=0, atol=0)


def test_compile_fullgraph_bf16_autocast_float64_gradcheck() -> None:
    torch.manual_seed(0)
    enc = PostNormTransformerEncoder(8, 2, 2, cond_dim=A, norm_features=True).eval()
    pm = lengths_to_mask([4, 0, 2], 4)
    x = poison_padding(randn(10, 3, 4, 8), pm, 1, kind="nan")
    c = randn(11, 3, A)
    with torch.no_grad():
        eager = enc(x, pm, cond=c, return_layers="all")
        torch._dynamo.reset()
        compiled = torch.compile(enc, fullgraph=True, backend="eager")(
            x, pm, cond=c, return_layers="all"
        )
        torch.testing.assert_close(compiled.tokens[~pm], eager.tokens[~pm])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = enc(x, pm, cond=c, return_layers="all")
    assert torch.isfinite(half.tokens).all()
    torch.testing.assert_close(half.tokens[~pm].float(), eager.tokens[~pm], atol=0.1, rtol=0.05)
    assert half.features is not None and half.features.dtype == torch.bfloat16
    small = PostNormTransformerEncoder(4, 1, 2, mlp_ratio=1.0, cond_dim=2).double().eval()
    pm2 = lengths_to_mask([3, 1], 3)
    x64 = randn(12, 2, 3, 4, dtype=torch.float64).requires_grad_(True)
    c64 = randn(13, 2, 2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: small(a, pm2, cond=b).tokens[~pm2], (x64, c64), eps=1e-6, atol=1e-5
    )
