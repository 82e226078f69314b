"""Bring your own masks: `MultimodalMAE.forward(hidden_masks=, predict_masks=, dense=)`, and
tokenizer padding winning over every split (issue 10 item 2, issue 9 item 2).

Tiny water model (tests/strategies.py `tiny_water_model`): 3 steps, 4x3 raster patch grid with
6 land patches, 12 sites in groups of 4 (3 site patches). Legend: ``b`` batch, ``t`` steps,
``P`` site patches, ``n`` tokens. Polarity: hidden masks True = hidden from the encoder,
``*_padding_mask`` True = padding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import seeds, tiny_water_batch, tiny_water_model
from torch import Tensor

from crossmae.masking import MaskSplit, mask_split_from_masks
from crossmae.models.multimodal import Modality, MultimodalMAE, padding_wins

NAMES = ("precipitation", "soil_moisture", "temperature", "evaporation", "river_flow")
RASTERS, SERIES = NAMES[:3], NAMES[3:]
T, GRID, PATCHES = 3, (4, 3), 3


@pytest.fixture(scope="module")
def model() -> MultimodalMAE:
    torch.manual_seed(0)
    return tiny_water_model()


def mod(model: MultimodalMAE, name: str) -> Modality:
    m = model.modalities[name]
    assert isinstance(m, Modality)
    return m


def draw_hidden(g: torch.Generator, b: int, ratio: float = 0.5) -> dict[str, Tensor]:
    """Masks in the input layout, as a collate function draws them (True = hidden)."""
    out = {m: torch.rand(b, T, GRID[0] * GRID[1], generator=g) < ratio for m in RASTERS}
    out.update({m: torch.rand(b, PATCHES, T, generator=g) < ratio for m in SERIES})
    return out


def test_layout_masks_equal_token_splits(model: MultimodalMAE) -> None:
    """hidden_masks in the input layout give the split that `layout_to_tokens` maps them to:
    visible = not hidden and not padding, predicted = hidden real tokens."""
    g = torch.Generator().manual_seed(3)
    x, static = tiny_water_batch(NAMES, g)
    hidden = draw_hidden(g, 2)
    out = model(x, static=static, hidden_masks=hidden)
    pads = {k: p for k, (_, p) in model.tokenize(x).items()}
    for name in NAMES:
        tok = mod(model, name).tokenizer
        h = tok.layout_to_tokens(hidden[name])
        assert torch.equal(out.splits[name].visible_mask, ~h & ~pads[name]), name
        assert torch.equal(out.splits[name].predict_mask, h & ~pads[name]), name
    # the same masks turned into splits in the data pipeline give the same loss
    splits = model.splits_from_masks(hidden)
    again = model(x, static=static, splits=splits)
    torch.testing.assert_close(again.loss, out.loss)
    # river flow of sample 0 is all NaN: no visible, no predicted token for it
    assert not out.splits["river_flow"].visible_mask[0].any()
    assert not out.splits["river_flow"].predict_mask[0].any()


def test_raster_masks_accept_the_grid_layout(model: MultimodalMAE) -> None:
    g = torch.Generator().manual_seed(4)
    x, static = tiny_water_batch(NAMES, g)
    hidden = draw_hidden(g, 2)
    flat = model(x, static=static, hidden_masks=hidden)
    grid = {m: (v.reshape(2, T, *GRID) if m in RASTERS else v) for m, v in hidden.items()}
    torch.testing.assert_close(model(x, static=static, hidden_masks=grid).loss, flat.loss)


def test_predict_masks_choose_the_targets(model: MultimodalMAE) -> None:
    g = torch.Generator().manual_seed(5)
    x, static = tiny_water_batch(NAMES, g)
    hidden = {"precipitation": torch.rand(2, T, 12, generator=g) < 0.6}
    predict = {"precipitation": hidden["precipitation"] & (torch.rand(2, T, 12, generator=g) < 0.5)}
    out = model(x, static=static, hidden_masks=hidden, predict_masks=predict)
    tok = mod(model, "precipitation").tokenizer
    assert torch.equal(
        out.splits["precipitation"].predict_mask, tok.layout_to_tokens(predict["precipitation"])
    )
    # modalities left out of hidden_masks are masked by the model as before
    assert out.splits["evaporation"].visible_mask.any()


def test_mask_arguments_are_checked_first(model: MultimodalMAE) -> None:
    g = torch.Generator().manual_seed(6)
    x, static = tiny_water_batch(NAMES, g)
    hidden = draw_hidden(g, 2)
    calls: list[str] = []
    handle = mod(model, "precipitation").tokenizer.register_forward_pre_hook(
        lambda *_: calls.append("tokenized")
    )
    try:
        with pytest.raises(TypeError, match=r"hidden_masks\['precipitation'\].*float"):
            model(x, static=static, hidden_masks={"precipitation": hidden["precipitation"].float()})
        with pytest.raises(ValueError, match="predict_masks"):
            model(x, static=static, predict_masks={"evaporation": hidden["evaporation"]})
        with pytest.raises(ValueError, match="snow"):
            model(x, static=static, hidden_masks={"snow": hidden["evaporation"]})
        with pytest.raises(TypeError, match="generator"):
            model(x, static=static, generator=5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="generator"):
            model(x, static=static, generator="seed")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="static"):
            model(x, static=static.long())
        with pytest.raises(ValueError, match=r"static.*\(2, 12, 10\)"):
            model(x, static=static[..., :10])
        with pytest.raises(TypeError, match=r"dense\['precipitation'\]"):
            model(x, static=static, dense={"precipitation": "yes"})
        with pytest.raises(ValueError, match=r"hidden_masks\['precipitation'\].*12"):
            model(x, static=static, hidden_masks={"precipitation": hidden["evaporation"]})
        outside = {"precipitation": ~hidden["precipitation"]}
        with pytest.raises(ValueError, match="does not hide"):
            model(x, static=static, hidden_masks={"precipitation": hidden["precipitation"]},
                  predict_masks=outside)  # fmt: skip
        assert calls == [], "arguments must be checked before any tokenizing"
    finally:
        handle.remove()


def test_dense_promise_drops_padding_masks(model: MultimodalMAE) -> None:
    """``dense=True`` (a true promise) gives the same result, with no padding mask passed to
    the decoders (so the unmasked kernels can run)."""
    g = torch.Generator().manual_seed(7)
    x, _ = tiny_water_batch(NAMES, g)
    x["river_flow"] = torch.randn(2, 12, 3, generator=g)  # nothing missing: no padding
    rasters = list(RASTERS)
    sub = MultimodalMAE(
        {m: mod(model, m) for m in rasters}, model.fusion, use_weighted_fm=False
    ).eval()
    xs = {m: x[m] for m in rasters}
    seen: list[Any] = []
    handle = mod(model, "precipitation").decoder.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["context_padding_mask"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            ref = sub(xs, generator=torch.Generator().manual_seed(0))
            got = sub(xs, generator=torch.Generator().manual_seed(0), dense=True)
    finally:
        handle.remove()
    torch.testing.assert_close(got.loss, ref.loss)
    assert seen[0] is not None and seen[1] is None


# ------------------------------------------------------------- padding wins (issue 9 item 2)
@settings(max_examples=12, deadline=None)
@given(seed=seeds(), nan_sites=st.integers(0, 12), nan_sample=st.integers(0, 1))
def test_tokenizer_padding_wins_over_given_splits(
    model: MultimodalMAE, seed: int, nan_sites: int, nan_sample: int
) -> None:
    """Splits drawn on clean data, then NaN written into random series values: every
    padding token is neither visible nor predicted, and every output equals the one for the
    split rebuilt without the padding tokens (so padding acts as no token at all)."""
    g = torch.Generator().manual_seed(seed)
    x, static = tiny_water_batch(NAMES, g)
    x["river_flow"] = torch.randn(2, 12, 3, generator=g)
    clean_pads = {k: p for k, (_, p) in model.tokenize(x).items()}
    splits = model.make_splits(clean_pads, generator=torch.Generator().manual_seed(seed))
    # random NaN pattern: whole sites, a random share of (site, step) values
    for name in SERIES:
        values = x[name].clone()
        sites = torch.randperm(12, generator=g)[:nan_sites]
        values[nan_sample, sites] = float("nan")
        values[torch.rand(values.shape, generator=g) < 0.3] = float("nan")
        x[name] = values
    pads = {k: p for k, (_, p) in model.tokenize(x).items()}
    with torch.no_grad():
        out = model(x, static=static, splits=splits)
        rebuilt = {
            k: mask_split_from_masks(s.visible_mask & ~pads[k], s.predict_mask & ~pads[k])
            for k, s in splits.items()
        }
        ref = model(x, static=static, splits=rebuilt)
    for name in NAMES:
        sp = out.splits[name]
        assert not (sp.visible_mask & pads[name]).any(), name
        assert not (sp.predict_mask & pads[name]).any(), name
        kept = torch.gather(pads[name], 1, sp.ids_keep) & ~sp.keep_padding_mask
        assert not kept.any(), name
        torch.testing.assert_close(out.losses[name], ref.losses[name], msg=name)
        # predictions at the real predicted tokens agree (slot layouts may differ)
        for i in range(2):
            a = out.preds[name][i][~sp.predict_padding_mask[i]]
            b_ = ref.preds[name][i][~ref.splits[name].predict_padding_mask[i]]
            torch.testing.assert_close(a, b_, msg=name)


def test_padding_wins_keeps_widths_and_is_sync_free() -> None:
    split = mask_split_from_masks(
        torch.tensor([[True, True, False, False]]), torch.tensor([[False, False, True, True]])
    )
    pad = torch.tensor([[False, True, False, True]])
    out = padding_wins(split, pad)
    assert out.ids_keep.shape == split.ids_keep.shape
    assert out.keep_padding_mask.tolist() == [[False, True]]
    assert out.predict_padding_mask.tolist() == [[False, True]]
    assert out.ids_keep.tolist() == [[0, 0]] and out.ids_predict.tolist() == [[2, 0]]
    assert isinstance(out, MaskSplit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_splits_on_cuda_match_hidden_masks() -> None:
    """On CUDA: splits built in the 'collate_fn' (CPU), pinned and moved with
    ``non_blocking=True``, give the loss of ``hidden_masks``; the dense promise (unmasked
    kernels) gives the same loss as the masked kernels for never-padded rasters."""
    torch.manual_seed(0)
    model = tiny_water_model().cuda()
    g = torch.Generator().manual_seed(8)
    x, static = tiny_water_batch(NAMES, g)
    x["river_flow"] = torch.randn(2, 12, 3, generator=g)
    hidden = draw_hidden(g, 2)
    splits = model.splits_from_masks(hidden)  # CPU, data preparation
    moved = {k: s.pin_memory().to("cuda", non_blocking=True) for k, s in splits.items()}
    xc = {k: v.cuda() for k, v in x.items()}
    with torch.no_grad():
        ref = model(xc, static=static.cuda(), hidden_masks={k: v.cuda() for k, v in hidden.items()})
        got = model(xc, static=static.cuda(), splits=moved)
    torch.testing.assert_close(got.loss, ref.loss)
    rasters = {m: model.modalities[m] for m in RASTERS}
    sub = MultimodalMAE(rasters, model.fusion).cuda()  # type: ignore[arg-type]
    xs = {m: xc[m] for m in RASTERS}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = sub(xs, generator=torch.Generator("cuda").manual_seed(0))
        b = sub(xs, generator=torch.Generator("cuda").manual_seed(0), dense=True)
    torch.testing.assert_close(a.loss.float(), b.loss.float(), rtol=2e-2, atol=2e-2)


def test_custom_masking_of_unequal_widths_is_attended_with_its_padding() -> None:
    """A never-padded modality (a raster) with a masking function of one's own that keeps
    different counts per sample: the encoder must see the keep padding. Only a function
    promising equal widths (``dense_when_unpadded``, as `grouped_masking_fn`) runs unmasked."""
    from crossmae.models import grouped_masking_fn

    torch.manual_seed(0)
    model = tiny_water_model()
    name = RASTERS[0]
    m = mod(model, name)
    assert m.never_padded and getattr(m.masking, "dense_when_unpadded", False) is True
    assert grouped_masking_fn(0.5).dense_when_unpadded is True  # type: ignore[attr-defined]

    def unequal(pad: Tensor, steps: int, gen: Any, never_padded: bool) -> MaskSplit:
        b, n = pad.shape
        vis = torch.zeros(b, n, dtype=torch.bool)
        vis[0, : n // 2] = True  # sample 0 sees half of its tokens, sample 1 two of them
        vis[1, :2] = True
        return mask_split_from_masks(vis, ~vis)

    m.masking = unequal
    seen: list[Any] = []
    m.encoder.register_forward_hook(lambda mod_, args, out: seen.append((args, out)))
    inputs, static = tiny_water_batch(NAMES, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(inputs, static=static, generator=torch.Generator().manual_seed(1))
        split = out.splits[name]
        assert split.keep_padding_mask.sum(dim=1).tolist() == [0, split.ids_keep.shape[1] - 2]
        ((args, enc_out),) = seen
        assert args[1] is not None  # the keep padding reached the encoder
        tokens, _ = model.tokenize(inputs, None, None)[name]
        visible, _ = split.visible_tokens(tokens)
        alone = m.encoder(visible[1:2, :2], None)  # sample 1's two real tokens, no padding
    torch.testing.assert_close(enc_out.tokens[1, :2], alone.tokens[0], rtol=1e-5, atol=1e-5)
    # draw_splits does not mark such splits dense either
    drawn = model.draw_splits(inputs, generator=torch.Generator().manual_seed(1))
    assert type(drawn[name]) is MaskSplit
