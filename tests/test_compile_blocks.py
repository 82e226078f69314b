"""`crossmae.compile_blocks`: regional compilation of a model's transformer blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import crossmae as cm
from crossmae.models.water import water_mae_small
from tests.strategies import generator

WATER_TINY = dict(
    num_steps=2, image_size=(40, 30), num_land_patches=6, num_sites=12, group_size=4,
    embed_dim=16, num_heads=2, decoder_dim=16, decoder_num_heads=2, decoder_depth=1,
    raster_depth=1, series_depth=1,
)  # fmt: skip


def _water_inputs() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = generator(0)
    inputs = {
        k: torch.randn(2, 2, 40, 30, generator=g)
        for k in ("precipitation", "soil_moisture", "temperature")
    }
    inputs["evaporation"] = torch.randn(2, 12, 2, generator=g)
    flow = torch.randn(2, 12, 2, generator=g)
    flow[:1] = float("nan")  # one sample without river flow
    inputs["river_flow"] = flow
    return inputs, torch.randn(2, 12, 11, generator=g)


def _expected_blocks(model: nn.Module) -> int:
    return sum(isinstance(m, cm.compile.BLOCK_TYPES) for m in model.modules())


def test_water_model_blocks_compile_and_give_the_same_step() -> None:
    """Every block of the water model (pre-norm, post-norm, cross-attention) is compiled;
    the loss and every gradient equal the uncompiled model's, with a generator= drawing
    the masks (eager code between the blocks: no graph break to pay)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = water_mae_small(**WATER_TINY).eval()
    model = water_mae_small(**WATER_TINY).eval()
    model.load_state_dict(ref.state_dict())
    n = cm.compile_blocks(model, backend="eager", fullgraph=True)
    assert n == _expected_blocks(model) > 0
    kinds = {type(m) for m in model.modules() if isinstance(m, cm.compile.BLOCK_TYPES)}
    assert kinds == {cm.Block, cm.CrossAttentionBlock}
    compiled = [m for m in model.modules() if isinstance(m, cm.compile.BLOCK_TYPES)]
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in compiled)
    inputs, static = _water_inputs()
    outs = []
    for m in (ref, model):
        g = torch.Generator().manual_seed(3)
        out = m(inputs, static=static, generator=g)
        out.loss.backward()
        outs.append((out.loss.detach(), {k: p.grad for k, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    for k, g_ref in outs[0][1].items():
        g_new = outs[1][1][k]
        if g_ref is None:
            assert g_new is None, k
        else:
            torch.testing.assert_close(g_new, g_ref, msg=k)
    assert set(ref.state_dict()) == set(model.state_dict())  # no wrapper in the names
    torch._dynamo.reset()


def test_postnorm_encoder_blocks_compile() -> None:
    torch.manual_seed(0)
    enc = cm.PostNormTransformerEncoder(16, 2, 2, cond_dim=3).eval()
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 3)
    pad = cm.lengths_to_padding_mask(torch.tensor([5, 2]), 5)
    with torch.no_grad():
        ref = enc(x, pad, cond=cond).tokens
        assert cm.compile_blocks(enc, backend="eager", fullgraph=True) == 2
        out = enc(x, pad, cond=cond).tokens
    torch.testing.assert_close(out[~pad], ref[~pad])
    torch._dynamo.reset()


def test_own_block_types_and_nested_matches() -> None:
    class Mine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = cm.Block(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 2

    model = nn.Sequential(Mine(), cm.Block(8, 2))
    # Mine matches first: its inner Block is part of it, not compiled twice
    assert cm.compile_blocks(model, types=(Mine, cm.Block), backend="eager") == 2
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[1](model[0](x)))
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("model", "types", "error", "match"),
    [
        ("not a module", None, TypeError, "model must be an nn.Module"),
        (nn.Linear(2, 2), None, ValueError, r"holds no module of types \(Block"),
        (nn.Linear(2, 2), (), TypeError, "types must be a non-empty tuple"),
        (nn.Linear(2, 2), [cm.Block], TypeError, "types must be a non-empty tuple"),
        (nn.Linear(2, 2), (int,), TypeError, "types must be a non-empty tuple"),
    ],
)
def test_bad_arguments(model: object, types: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cm.compile_blocks(model, types=types)  # type: ignore[arg-type]
