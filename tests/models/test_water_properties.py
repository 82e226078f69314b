"""Model-level properties of the multimodal water MAE (`water_mae_small` at a tiny size).

Every test guards one of the ten bugs the downstream water project hit (REFERENCE.md, "Bugs
that project hit"); the number in each section header is the bug's number there.

Tiny model: 3 steps; rasters 40x30 cut into 10x10 patches (4x3 grid, 6 land patches, so
``6 * 3 = 18`` tokens); 10 sites grouped 4 per patch (3 patches, the last one half filled up,
``3 * 3 = 9`` tokens); width 32, one layer everywhere. Inputs are built from a drawn seed
with a `torch.Generator` (never drawn element-wise).

Legend: ``b`` batch, ``t`` steps, ``s`` sites, ``n`` tokens of a modality, ``p`` predicted
slots, ``o`` values per token. Polarity: ``*_padding_mask`` True = padding; ``missing[m][i]``
True = modality ``m`` is missing for sample ``i``; ``visible_mask`` / ``predict_mask`` True =
seen / reconstructed.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import GARBAGE_KINDS, generator, poison_padding, rand, randn, seeds
from torch import Tensor, nn

from crossmae.decoders import CrossMAEDecoder, MAEDecoder
from crossmae.encoders.transformer import EncoderOutput
from crossmae.masking import MaskSplit, gather_tokens, mask_split_from_masks, scatter_tokens
from crossmae.masking.strategies import grouped_random_masking
from crossmae.models.multimodal import (
    Modality,
    MultimodalMAE,
    MultimodalOutput,
    grouped_masking_fn,
)
from crossmae.models.water import water_mae_small
from crossmae.tokenizers.raster import RasterTokenizer

RASTERS = ("precipitation", "soil_moisture", "temperature")
SERIES = ("evaporation", "river_flow")
NAMES = RASTERS + SERIES
T = 3
IMAGE = (40, 30)
PATCH = 10
GRID_W = IMAGE[1] // PATCH  # 3 patch columns
LAND = 6  # land patches per step
SITES = 10
GROUP = 4
PATCHES = math.ceil(SITES / GROUP)  # 3 site patches per step
ATTRS = 11
MASK_RATIO = 0.4  # the preset's default
LOCATIONS = {**{m: LAND for m in RASTERS}, **{m: PATCHES for m in SERIES}}
TINY: dict[str, Any] = dict(
    num_steps=T,
    image_size=IMAGE,
    num_land_patches=LAND,
    num_sites=SITES,
    group_size=GROUP,
    embed_dim=32,
    num_heads=4,
    decoder_dim=16,
    decoder_num_heads=4,
    decoder_depth=1,
    raster_depth=1,
    series_depth=1,
)
VARIANTS: dict[str, dict[str, Any]] = {
    "cross": {},
    "cross_selfattn_wfm": dict(
        decoder_self_attn=True, use_weighted_fm=True, use_input=True, fusion_depth=2
    ),
    "mae": dict(use_cross_attn=False),
}
# Decoders whose prediction for one token cannot depend on which other tokens are queried.
INDEPENDENT_QUERIES = ("cross", "mae")


def budget(share: float) -> settings:
    """Hypothesis settings with ``share`` of the active profile's example count (min 3)."""
    return settings(max_examples=max(3, int(settings().max_examples * share)))


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny ops: intra-op threads only add synchronisation (5x slower on a busy 2-core box).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def build(seed: int = 0, **overrides: Any) -> MultimodalMAE:
    torch.manual_seed(seed)
    return water_mae_small(**{**TINY, **overrides}).eval()


class Zoo(dict[Any, MultimodalMAE]):
    """Built models by key, with a short repr (hypothesis prints fixture arguments)."""

    def __repr__(self) -> str:
        return f"Zoo({sorted(map(str, self))})"


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    """The module's models, one per entry of `VARIANTS` (built once, eval mode)."""
    return Zoo({name: build(**over) for name, over in VARIANTS.items()})


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class WaterBatch:
    """A drawn water batch; tensors are built from ``seed``.

    Attributes:
        batch: ``b``.
        seed: seed of every value.
        nan_frac: share of land pixels / series values / static attributes that are NaN.
        river_missing: per sample, True = the whole river-flow series is NaN (pre-1989).
        padded_sites: per sample, how many sites are padding (scattered, from the seed).
    """

    batch: int
    seed: int
    nan_frac: float
    river_missing: tuple[bool, ...]
    padded_sites: tuple[int, ...]

    def site_padding_mask(self) -> Optional[Tensor]:
        """bool ``[b, s]``, True = padding site (None when no site is padded)."""
        if not any(self.padded_sites):
            return None
        g = generator(self.seed + 5)
        rows = []
        for k in self.padded_sites:
            row = torch.zeros(SITES, dtype=torch.bool)
            row[torch.randperm(SITES, generator=g)[:k]] = True
            rows.append(row)
        return torch.stack(rows)

    def tensors(self) -> tuple[dict[str, Tensor], Tensor, Optional[Tensor]]:
        """``(inputs, static [b, s, a], site_padding_mask)``; sea pixels hold NaN."""
        b, g = self.batch, generator(self.seed)
        sea = ~land_pixel_mask()
        inputs: dict[str, Tensor] = {}
        for m in RASTERS:
            x = randn(g, b, T, *IMAGE)
            x = x.masked_fill(rand(g, b, T, *IMAGE) < self.nan_frac, float("nan"))
            inputs[m] = x.masked_fill(sea, float("nan"))
        for m in SERIES:
            x = randn(g, b, SITES, T)
            inputs[m] = x.masked_fill(rand(g, b, SITES, T) < self.nan_frac, float("nan"))
        gone = torch.tensor(self.river_missing, dtype=torch.bool)
        inputs["river_flow"] = inputs["river_flow"].masked_fill(gone[:, None, None], float("nan"))
        static = randn(g, b, SITES, ATTRS)
        static = static.masked_fill(rand(g, b, SITES, ATTRS) < self.nan_frac, float("nan"))
        return inputs, static, self.site_padding_mask()


@st.composite
def water_batches(
    draw: st.DrawFn,
    *,
    min_batch: int = 1,
    max_batch: int = 4,
    site_padding: bool = True,
    all_sites_padded: bool = True,
) -> WaterBatch:
    b = draw(st.integers(min_batch, max_batch))
    nan_frac = draw(st.sampled_from([0.0, 0.1, 0.4]))
    river = tuple(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    top = (SITES if all_sites_padded else SITES - 1) if site_padding else 0
    padded = tuple(draw(st.lists(st.integers(0, top), min_size=b, max_size=b)))
    return WaterBatch(b, draw(seeds()), nan_frac, river, padded)


def missing_flags(b: int, names: tuple[str, ...] = NAMES) -> st.SearchStrategy[dict[str, Tensor]]:
    """Per-modality bool ``[b]`` flags (True = missing)."""
    row = st.lists(st.booleans(), min_size=b, max_size=b).map(
        lambda v: torch.tensor(v, dtype=torch.bool)
    )
    return st.fixed_dictionaries({m: row for m in names})


@functools.cache
def land_patches() -> tuple[int, ...]:
    """Row-major grid index of every land patch of the tiny preset (ascending)."""
    tok = modality(build(), "precipitation").tokenizer
    assert isinstance(tok, RasterTokenizer)
    return tuple(int(q) for q in tok.valid_patch_index)


def land_pixel_mask() -> Tensor:
    """bool ``[H, W]``, True = pixel of a land (valid) patch of the tiny preset."""
    patch = torch.zeros(IMAGE[0] // PATCH * GRID_W, dtype=torch.bool)
    patch[list(land_patches())] = True
    grid = patch.reshape(IMAGE[0] // PATCH, GRID_W)
    return grid.repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)


def run(
    model: MultimodalMAE,
    wb: WaterBatch,
    *,
    split_seed: int = 0,
    inputs: Optional[Mapping[str, Tensor]] = None,
    static: Optional[Tensor] = None,
    **kwargs: Any,
) -> MultimodalOutput:
    """Forward ``wb`` (or the given replacement tensors); masks drawn from ``split_seed``."""
    x, s, spm = wb.tensors()
    if "splits" not in kwargs:
        kwargs["generator"] = generator(split_seed)
    out = model(
        dict(inputs if inputs is not None else x),
        static=static if static is not None else s,
        site_padding_mask=spm,
        **kwargs,
    )
    assert isinstance(out, MultimodalOutput)
    return out


def modality(model: MultimodalMAE, name: str) -> Modality:
    mod = model.modalities[name]
    assert isinstance(mod, Modality)
    return mod


def backward(loss: Tensor) -> None:
    loss.backward()  # type: ignore[no-untyped-call]


def draw_splits(
    model: MultimodalMAE,
    wb: WaterBatch,
    seed: int,
    missing: Optional[Mapping[str, Tensor]] = None,
) -> dict[str, MaskSplit]:
    x, _, spm = wb.tensors()
    pads = {m: v[1] for m, v in model.tokenize(x, site_padding_mask=spm).items()}
    return model.make_splits(pads, missing=missing, generator=generator(seed))


def token_padding(model: MultimodalMAE, wb: WaterBatch) -> dict[str, Tensor]:
    x, _, spm = wb.tensors()
    return {m: v[1] for m, v in model.tokenize(x, site_padding_mask=spm).items()}


def full_preds(out: MultimodalOutput, name: str, num_tokens: int) -> Tensor:
    """Predictions scattered to token order ``[b, n, o]`` (0 where not predicted)."""
    sp = out.splits[name]
    return scatter_tokens(
        out.preds[name], sp.ids_predict, num_tokens, padding_mask=sp.predict_padding_mask
    )


def real_preds(out: MultimodalOutput, name: str) -> Tensor:
    """Predictions at real (non-padded) query slots, ``[sum p_i, o]``."""
    return out.preds[name][~out.splits[name].predict_padding_mask]


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def assert_same_outputs(a: MultimodalOutput, b: MultimodalOutput, tol: float = 1e-5) -> None:
    """Same splits, loss, per-sample losses and predictions at real slots."""
    close(a.loss, b.loss, tol)
    for m in NAMES:
        for fa, fb in zip(a.splits[m], b.splits[m]):
            assert torch.equal(fa, fb), m
        close(a.losses[m], b.losses[m], tol)
        close(a.sample_losses[m], b.sample_losses[m], tol)
        close(real_preds(a, m), real_preds(b, m), tol)


def grads_finite(model: nn.Module) -> int:
    """Assert every existing gradient is finite; return how many parameters have one."""
    count = 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
            count += 1
    return count


def assert_finite_outputs(out: MultimodalOutput) -> None:
    assert out.loss.ndim == 0 and torch.isfinite(out.loss), out.loss
    for m in NAMES:
        assert torch.isfinite(out.losses[m]), (m, out.losses[m])
        assert torch.isfinite(out.sample_losses[m]).all(), (m, out.sample_losses[m])
        # padded query slots are don't-care but must be finite (CONTRACT)
        assert torch.isfinite(out.preds[m]).all(), m


def raster_token_pixels(token: int) -> tuple[int, slice, slice]:
    """``(step, rows, cols)`` of raster token ``token`` (time-major over land patches)."""
    q = land_patches()[token % LAND]
    r, c = q // GRID_W, q % GRID_W
    return token // LAND, slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH)


def series_token_values(token: int) -> tuple[int, slice]:
    """``(step, sites)`` of series token ``token`` (time-major over site patches)."""
    p = token % PATCHES
    return token // PATCHES, slice(p * GROUP, min((p + 1) * GROUP, SITES))


# =========================================================================== bug 1
@budget(1.0)
@given(wb=water_batches(), data=st.data(), split_seed=seeds())
def test_encoders_get_exactly_the_visible_tokens(
    zoo: Zoo, wb: WaterBatch, data: st.DataObject, split_seed: int
) -> None:
    """Per sample, the tokens entering each encoder are the visible ones: as many real
    slots as ``visible_mask`` has, equal to the tokenizer's tokens at ``ids_keep``, and as
    many as the mask ratio keeps of each step's real tokens (none for a missing sample)."""
    model = zoo["cross"]
    missing = data.draw(missing_flags(wb.batch))
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def grab(name: str) -> Any:
        def hook(enc: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = inspect.signature(enc.forward).bind(*args, **kwargs)
            call.apply_defaults()
            tokens, pad = call.arguments["tokens"], call.arguments["padding_mask"]
            if pad is None:  # no mask: the encoder treats every slot as a real token
                pad = torch.zeros(tokens.shape[:2], dtype=torch.bool)
            seen[name] = (tokens.detach().clone(), pad.clone())

        return hook

    handles = [
        modality(model, m).encoder.register_forward_pre_hook(grab(m), with_kwargs=True)
        for m in NAMES
    ]
    try:
        with torch.no_grad():
            out = run(model, wb, split_seed=split_seed, missing=missing)
    finally:
        for h in handles:
            h.remove()
    x, _, spm = wb.tensors()
    with torch.no_grad():
        tokenized = model.tokenize(x, site_padding_mask=spm)
    for m in NAMES:
        tokens, pad = seen[m]
        sp = out.splits[m]
        all_tokens, tok_pad = tokenized[m]
        n_visible = sp.visible_mask.sum(dim=1)
        n_real = (~pad).sum(dim=1)
        assert torch.equal(n_real, n_visible), (
            f"{m}: the encoder treats {n_real.tolist()} slots per sample as real tokens, "
            f"but {n_visible.tolist()} are visible"
        )
        assert torch.equal(sp.num_keep, n_visible), m
        assert torch.equal(pad, sp.keep_padding_mask), m
        # the kept ids are the visible tokens, each once
        for i in range(wb.batch):
            ids = sp.ids_keep[i][~sp.keep_padding_mask[i]]
            assert torch.equal(ids.sort().values, sp.visible_mask[i].nonzero().flatten()), m
        # the encoder input is the tokenizer output at those ids (padded slots zeroed)
        expected = gather_tokens(all_tokens, sp.ids_keep)
        assert torch.equal(tokens[~pad], expected[~pad]), m
        # never a padding token, never both visible and predicted
        assert not (sp.visible_mask & tok_pad).any(), m
        assert not (sp.visible_mask & sp.predict_mask).any(), m
        # exact counts: int(u * (1 - mask_ratio)) per (sample, step) with u real tokens
        real = (~tok_pad).reshape(wb.batch, T, LOCATIONS[m]).sum(dim=-1)
        for i in range(wb.batch):
            keep = 0 if missing[m][i] else sum(int(int(u) * (1 - MASK_RATIO)) for u in real[i])
            real_i = 0 if missing[m][i] else int(real[i].sum())
            assert int(n_visible[i]) == keep, (m, i)
            assert int(sp.predict_mask[i].sum()) == real_i - keep, (m, i)


# =========================================================================== bug 2
@budget(1.0)
@given(wb=water_batches(min_batch=2), split_seed=seeds())
def test_samples_without_river_flow_give_finite_loss_and_grads(
    zoo: Zoo, wb: WaterBatch, split_seed: int
) -> None:
    """Samples whose river flow is all NaN have zero real river-flow tokens, zero visible
    and zero predicted ones, a zero river-flow loss, and nothing becomes NaN."""
    model = zoo["cross"]
    model.zero_grad(set_to_none=True)
    out = run(model, wb, split_seed=split_seed)
    backward(out.loss)
    assert_finite_outputs(out)
    assert grads_finite(model) > 0
    pad = token_padding(model, wb)["river_flow"]
    sp = out.splits["river_flow"]
    for i, gone in enumerate(wb.river_missing):
        if gone:
            assert bool(pad[i].all())
            assert int(sp.num_keep[i]) == 0 and int(sp.num_predict[i]) == 0
            assert out.sample_losses["river_flow"][i].item() == 0.0


@pytest.mark.parametrize("static_shape", [None, False, True], ids=["auto", "batch", "static"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_whole_batch_without_river_flow(
    zoo: Zoo, variant: str, static_shape: Optional[bool]
) -> None:
    """Every sample lacks river flow: river-flow splits with no real slot (zero-width with
    the batch's widths, the default on the CPU; all padding with static widths), a zero
    (not NaN) river-flow loss with finite gradients, and the other modalities still
    train."""
    model = zoo[variant]
    model.zero_grad(set_to_none=True)
    wb = WaterBatch(3, 11, 0.1, (True, True, True), (0, 2, 0))
    mod = modality(model, "river_flow")
    saved = mod.masking
    mod.masking = grouped_masking_fn(0.39, static_shape=static_shape)
    try:
        out = run(model, wb)
        full = run(model, WaterBatch(3, 11, 0.1, (False, False, False), (0, 2, 0)))
    finally:
        mod.masking = saved
    backward(out.loss)
    assert_finite_outputs(out)
    sp = out.splits["river_flow"]
    if not static_shape:  # None on CPU tensors: the batch's widths
        assert sp.ids_keep.shape == (3, 0) and sp.ids_predict.shape == (3, 0)
    else:  # the same widths as a batch with river flow, every slot padding
        assert sp.ids_keep.shape == full.splits["river_flow"].ids_keep.shape
        assert sp.ids_predict.shape == full.splits["river_flow"].ids_predict.shape
        assert sp.ids_keep.shape[1] > 0 and sp.ids_predict.shape[1] > 0
        assert bool(sp.keep_padding_mask.all()) and bool(sp.predict_padding_mask.all())
        assert int(sp.num_keep.sum()) == 0 and int(sp.num_predict.sum()) == 0
    assert out.preds["river_flow"].shape == (3, sp.ids_predict.shape[1], GROUP)
    assert out.losses["river_flow"].item() == 0.0
    assert all(out.losses[m].item() > 0 for m in NAMES if m != "river_flow")
    assert grads_finite(model) > 0
    # the river-flow decoder got a (zero) gradient or none, never NaN
    for p in modality(model, "river_flow").decoder.parameters():
        assert p.grad is None or not p.grad.any()


@pytest.mark.parametrize("name", [*NAMES, "all"])
def test_modality_missing_for_the_whole_batch(zoo: Zoo, name: str) -> None:
    """``missing`` flags a modality (or every modality) for every sample: its loss is 0,
    no query is decoded, the total is finite, and every gradient is finite."""
    model = zoo["cross"]
    model.zero_grad(set_to_none=True)
    wb = WaterBatch(3, 12, 0.1, (False, True, False), (0, 3, 10))
    flagged = NAMES if name == "all" else (name,)
    missing = {m: torch.ones(3, dtype=torch.bool) for m in flagged}
    out = run(model, wb, missing=missing)
    backward(out.loss)
    assert_finite_outputs(out)
    for m in NAMES:
        sp = out.splits[m]
        if m in flagged:
            assert not sp.visible_mask.any() and not sp.predict_mask.any()
            assert sp.ids_keep.shape[1] == 0 and sp.ids_predict.shape[1] == 0
            assert out.losses[m].item() == 0.0
            assert not out.sample_losses[m].any()
        else:
            assert out.losses[m].item() > 0.0
    if name == "all":
        assert out.loss.item() == 0.0
    grads_finite(model)


# =========================================================================== bug 3
def _subset(mask: Tensor, seed: int, share: float) -> Tensor:
    return mask & (rand(seed, *mask.shape) < share)


@pytest.mark.parametrize("variant", INDEPENDENT_QUERIES)
@budget(1.0)
@given(wb=water_batches(), split_seed=seeds(), seed=seeds())
def test_token_prediction_ignores_which_other_tokens_are_predicted(
    zoo: Zoo, variant: str, wb: WaterBatch, split_seed: int, seed: int
) -> None:
    """Same visible tokens, two different query sets with different per-sample counts: the
    prediction for token ``i`` is the same in both (it is decoded at token ``i``'s own
    ``(t, patch)`` position, whatever slot it lands in)."""
    model = zoo[variant]
    pads = token_padding(model, wb)
    base = draw_splits(model, wb, split_seed)
    splits_a, splits_b, shared = {}, {}, {}
    for k, m in enumerate(NAMES):
        hidden = ~base[m].visible_mask & ~pads[m]
        common = _subset(hidden, seed + k, 0.4)
        pa = common | _subset(hidden, seed + 10 + k, 0.5)
        pb = common | _subset(hidden, seed + 20 + k, 0.5)
        splits_a[m] = mask_split_from_masks(base[m].visible_mask, pa, padding_mask=pads[m])
        splits_b[m] = mask_split_from_masks(base[m].visible_mask, pb, padding_mask=pads[m])
        shared[m] = common
    with torch.no_grad():
        out_a = run(model, wb, splits=splits_a)
        out_b = run(model, wb, splits=splits_b)
    for m in NAMES:
        n = pads[m].shape[1]
        assert torch.equal(out_a.splits[m].visible_mask, out_b.splits[m].visible_mask)
        pa_full, pb_full = full_preds(out_a, m, n), full_preds(out_b, m, n)
        close(pa_full[shared[m]], pb_full[shared[m]])


@pytest.mark.parametrize("variant", list(VARIANTS))
@budget(0.5)
@given(wb=water_batches(), split_seed=seeds(), seed=seeds())
def test_permuting_query_slots_permutes_predictions(
    zoo: Zoo, variant: str, wb: WaterBatch, split_seed: int, seed: int
) -> None:
    """Shuffling each sample's real ``ids_predict`` slots (any order, not just ascending)
    shuffles the predictions and targets the same way and keeps every per-sample loss."""
    model = zoo[variant]
    base = draw_splits(model, wb, split_seed)
    shuffled = {}
    perms = {}
    g = generator(seed)
    for m in NAMES:
        sp = base[m]
        b, p = sp.ids_predict.shape
        perm = torch.arange(p).repeat(b, 1)
        for i in range(b):
            k = int(sp.num_predict[i])
            perm[i, :k] = torch.randperm(k, generator=g)
        perms[m] = perm
        shuffled[m] = sp._replace(ids_predict=torch.gather(sp.ids_predict, 1, perm))
    with torch.no_grad():
        out = run(model, wb, splits=base)
        out_s = run(model, wb, splits=shuffled)
    for m in NAMES:
        idx = perms[m][..., None]
        real = ~base[m].predict_padding_mask
        moved = torch.gather(out.preds[m], 1, idx.expand_as(out.preds[m]))
        close(out_s.preds[m][real], moved[real])
        moved_t = torch.gather(out.targets[m], 1, idx.expand_as(out.targets[m]))
        assert torch.equal(out_s.targets[m][real], moved_t[real])
        close(out_s.sample_losses[m], out.sample_losses[m])


@budget(0.5)
@given(wb=water_batches(site_padding=False), split_seed=seeds())
def test_every_predicted_token_gets_its_own_position(
    zoo: Zoo, wb: WaterBatch, split_seed: int
) -> None:
    """Full reconstruction (every hidden token queried): the queries of one sample are all
    different, so no two tokens are decoded at the same position."""
    model = zoo["cross"]
    pads = token_padding(model, wb)
    base = draw_splits(model, wb, split_seed)
    full = {m: model.full_reconstruction_split(base[m], pads[m]) for m in NAMES}
    with torch.no_grad():
        out = run(model, wb, splits=full)
    for m in NAMES:
        for i in range(wb.batch):
            rows = out.preds[m][i][~full[m].predict_padding_mask[i]]
            if rows.shape[0] < 2:
                continue
            dist = torch.cdist(rows[None].double(), rows[None].double())[0]
            off_diag = dist + torch.eye(rows.shape[0], dtype=torch.float64) * 1e9
            assert float(off_diag.min()) > 1e-6, (m, i)


# =========================================================================== bug 4
def _garbage_like(x: Tensor, seed: int, kind: str) -> Tensor:
    return poison_padding(x, torch.ones(x.shape[:1], dtype=torch.bool), seed, kind=kind)


@pytest.mark.parametrize("variant", list(VARIANTS))
@budget(0.7)
@given(
    wb=water_batches(),
    data=st.data(),
    kind=st.sampled_from(GARBAGE_KINDS),
    split_seed=seeds(),
    poison_seed=seeds(),
)
def test_garbage_in_sea_padded_sites_and_missing_samples_changes_nothing(
    zoo: Zoo,
    variant: str,
    wb: WaterBatch,
    data: st.DataObject,
    kind: str,
    split_seed: int,
    poison_seed: int,
) -> None:
    """NaN / inf / huge values in sea pixels, in padded sites (series values and static
    attributes) and in every value of a sample flagged missing leave the splits, the loss,
    the per-sample losses and the predictions at real slots unchanged."""
    model = zoo[variant]
    missing = data.draw(missing_flags(wb.batch))
    x, static, spm = wb.tensors()
    with torch.no_grad():
        clean = run(model, wb, split_seed=split_seed, missing=missing)
    sea = ~land_pixel_mask()
    bad: dict[str, Tensor] = {}
    for k, m in enumerate(NAMES):
        junk = _garbage_like(x[m], poison_seed + k, kind)
        v = torch.where(sea, junk, x[m]) if m in RASTERS else x[m]
        if m in SERIES and spm is not None:
            v = torch.where(spm[:, :, None], junk, v)
        bad[m] = torch.where(missing[m].reshape(-1, *[1] * (v.ndim - 1)), junk, v)
    bad_static = static
    if spm is not None:
        junk_s = _garbage_like(static, poison_seed + 9, kind)
        bad_static = torch.where(spm[:, :, None], junk_s, static)
    with torch.no_grad():
        dirty = run(
            model, wb, split_seed=split_seed, missing=missing, inputs=bad, static=bad_static
        )
    assert_same_outputs(clean, dirty)


def _poison_output_hook(seed: int, kind: str) -> Any:
    """Forward hook writing garbage into the padded slots of an `EncoderOutput`."""

    def hook(_: nn.Module, args: tuple[Any, ...], output: EncoderOutput) -> EncoderOutput:
        pad = output.padding_mask
        if pad is None:
            return output
        tokens = poison_padding(output.tokens, pad, seed, kind=kind)
        feats = output.features
        if feats is not None:
            feats = torch.stack([poison_padding(f, pad, seed + 1, kind=kind) for f in feats])
        return output._replace(tokens=tokens, features=feats)

    return hook


@pytest.mark.parametrize("variant", list(VARIANTS))
@budget(0.7)
@given(
    wb=water_batches(),
    data=st.data(),
    kind=st.sampled_from(GARBAGE_KINDS),
    split_seed=seeds(),
    poison_seed=seeds(),
)
def test_padded_keys_holding_garbage_change_nothing(
    zoo: Zoo,
    variant: str,
    wb: WaterBatch,
    data: st.DataObject,
    kind: str,
    split_seed: int,
    poison_seed: int,
) -> None:
    """The padded slots of every modality encoder's output and of the fused keys (and of
    the fusion feature maps) are overwritten with NaN / inf / garbage: fusion and decoders
    never read them, so loss and predictions at real slots are unchanged."""
    model = zoo[variant]
    missing = data.draw(missing_flags(wb.batch))
    with torch.no_grad():
        clean = run(model, wb, split_seed=split_seed, missing=missing)
    encoders = [modality(model, m).encoder for m in NAMES]
    assert model.fusion is not None
    handles = [
        enc.register_forward_hook(_poison_output_hook(poison_seed + k, kind))
        for k, enc in enumerate([*encoders, model.fusion])
    ]
    try:
        with torch.no_grad():
            dirty = run(model, wb, split_seed=split_seed, missing=missing)
    finally:
        for h in handles:
            h.remove()
    assert_same_outputs(clean, dirty)


def _decoder_calls(model: MultimodalMAE, wb: WaterBatch) -> dict[str, tuple[Any, ...]]:
    """The (args, kwargs) each CrossMAE decoder is called with in one forward."""
    calls: dict[str, tuple[Any, ...]] = {}

    def grab(name: str) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name] = (args, dict(kwargs))

        return hook

    handles = [
        modality(model, m).decoder.register_forward_pre_hook(grab(m), with_kwargs=True)
        for m in NAMES
    ]
    try:
        with torch.no_grad():
            run(model, wb)
    finally:
        for h in handles:
            h.remove()
    return calls


@budget(0.5)
@given(
    wb=water_batches(),
    extra=st.integers(1, 5),
    kind=st.sampled_from(GARBAGE_KINDS),
    seed=seeds(),
)
def test_decoders_ignore_appended_padded_keys(
    zoo: Zoo, wb: WaterBatch, extra: int, kind: str, seed: int
) -> None:
    """Appending padded keys full of garbage to a decoder's context (with a matching
    ``context_padding_mask``) leaves its predictions unchanged."""
    model = zoo["cross"]
    calls = _decoder_calls(model, wb)
    for k, m in enumerate(NAMES):
        dec = modality(model, m).decoder
        assert isinstance(dec, CrossMAEDecoder)
        (context, ids), kw = calls[m]
        cpad = kw["context_padding_mask"]
        b = context.shape[0]
        junk = poison_padding(
            torch.zeros(b, extra, context.shape[-1]),
            torch.ones(b, extra, dtype=torch.bool),
            seed + k,
            kind=kind,
        )
        longer = torch.cat([context, junk], dim=1)
        longer_pad = torch.cat([cpad, torch.ones(b, extra, dtype=torch.bool)], dim=1)
        with torch.no_grad():
            ref = dec(context, ids, **kw)
            got = dec(longer, ids, **{**kw, "context_padding_mask": longer_pad})
        real = ~kw["query_padding_mask"]
        close(got[real], ref[real])
        assert torch.isfinite(got).all(), m


def test_decoder_context_mask_shape_is_checked(zoo: Zoo) -> None:
    """A ``context_padding_mask`` whose shape does not match the keys is a ValueError."""
    model = zoo["cross"]
    wb = WaterBatch(2, 3, 0.1, (False, True), (0, 4))
    calls = _decoder_calls(model, wb)
    for m in NAMES:
        dec = modality(model, m).decoder
        (context, ids), kw = calls[m]
        b, n = context.shape[:2]
        for shape in [(b, n + 1), (b, max(n - 1, 0)), (b + 1, n), (b, n, 1), (n,)]:
            if shape == (b, n):
                continue
            wrong = torch.zeros(shape, dtype=torch.bool)
            with pytest.raises(ValueError, match="context_padding_mask"):
                dec(context, ids, **{**kw, "context_padding_mask": wrong})


def test_mae_decoder_context_mask_shape_is_checked(zoo: Zoo) -> None:
    dec = zoo["mae"].modalities["precipitation"].decoder
    assert isinstance(dec, MAEDecoder)
    ctx = torch.zeros(2, 4, 32)
    ids = torch.zeros(2, 4, dtype=torch.long)
    for shape in [(2, 5), (2, 3), (3, 4)]:
        with pytest.raises(ValueError, match="context_padding_mask"):
            dec(ctx, ids, ids, context_padding_mask=torch.zeros(shape, dtype=torch.bool))


def test_wrong_site_padding_mask_shape_is_a_value_error(zoo: Zoo) -> None:
    model = zoo["cross"]
    x, static, _ = WaterBatch(2, 3, 0.0, (False, False), (0, 0)).tensors()
    with pytest.raises(ValueError, match="site_padding_mask"):
        model(x, static=static, site_padding_mask=torch.zeros(2, SITES + 1, dtype=torch.bool))


# =========================================================================== bug 5
def _perturb_sample(x: Tensor, j: int, seed: int) -> Tensor:
    """Add noise to sample ``j`` (NaN stays NaN, so the padding does not change)."""
    y = x.clone()
    y[j] = y[j] + 0.5 * randn(seed, *y.shape[1:]) + 1.0
    return y


@pytest.mark.parametrize("variant", list(VARIANTS))
@budget(0.7)
@given(wb=water_batches(min_batch=2), data=st.data(), split_seed=seeds(), seed=seeds())
def test_perturbing_one_sample_never_changes_another(
    zoo: Zoo,
    variant: str,
    wb: WaterBatch,
    data: st.DataObject,
    split_seed: int,
    seed: int,
) -> None:
    """With the same splits, changing every input of sample ``j`` (rasters, series, static
    attributes) leaves every other sample's predictions and per-sample losses unchanged."""
    model = zoo[variant]
    j = data.draw(st.integers(0, wb.batch - 1))
    splits = draw_splits(model, wb, split_seed)
    x, static, _ = wb.tensors()
    moved = {m: _perturb_sample(x[m], j, seed + k) for k, m in enumerate(NAMES)}
    with torch.no_grad():
        out = run(model, wb, splits=splits)
        out_j = run(model, wb, splits=splits, inputs=moved, static=_perturb_sample(static, j, seed))
    others = torch.arange(wb.batch) != j
    changed = False
    for m in NAMES:
        real = ~splits[m].predict_padding_mask
        keep = real & others[:, None]
        close(out_j.preds[m][keep], out.preds[m][keep])
        close(out_j.sample_losses[m][others], out.sample_losses[m][others])
        own = real[j]
        changed |= not torch.allclose(out_j.preds[m][j][own], out.preds[m][j][own])
    if any(bool(splits[m].predict_mask[j].any()) for m in NAMES):
        assert changed, "perturbing sample j did not change its own predictions"


def _row_split(sp: MaskSplit, i: int) -> MaskSplit:
    return mask_split_from_masks(sp.visible_mask[i : i + 1], sp.predict_mask[i : i + 1])


@pytest.mark.parametrize("variant", list(VARIANTS))
@budget(0.7)
@given(wb=water_batches(min_batch=2), data=st.data(), split_seed=seeds())
def test_batch_equals_batches_of_one(
    zoo: Zoo,
    variant: str,
    wb: WaterBatch,
    data: st.DataObject,
    split_seed: int,
) -> None:
    """Each sample of a ragged batch (different visible / predicted counts, missing flags)
    gets the predictions and loss it gets when run alone."""
    model = zoo[variant]
    missing = data.draw(missing_flags(wb.batch))
    splits = draw_splits(model, wb, split_seed, missing)
    x, static, spm = wb.tensors()
    with torch.no_grad():
        out = model(x, static=static, site_padding_mask=spm, splits=splits)
        for i in range(wb.batch):
            sl = slice(i, i + 1)
            one = model(
                {m: v[sl] for m, v in x.items()},
                static=static[sl],
                site_padding_mask=None if spm is None else spm[sl],
                splits={m: _row_split(sp, i) for m, sp in splits.items()},
            )
            for m in NAMES:
                k = int(splits[m].num_predict[i])
                assert torch.equal(one.splits[m].ids_predict[0, :k], splits[m].ids_predict[i, :k])
                close(one.preds[m][0, :k], out.preds[m][i, :k])
                close(one.sample_losses[m][0], out.sample_losses[m][i])


def _ragged_splits(model: MultimodalMAE, wb: WaterBatch, seed: int) -> dict[str, MaskSplit]:
    """Custom splits with arbitrary per-sample counts: each sample keeps its own random
    share (0 to 100%) of its real tokens and predicts a random part of the rest."""
    pads = token_padding(model, wb)
    out = {}
    for k, m in enumerate(NAMES):
        real = ~pads[m]
        share = rand(seed + k, wb.batch, 1)
        visible = real & (rand(seed + 10 + k, *real.shape) < share)
        predict = real & ~visible & (rand(seed + 20 + k, *real.shape) < 0.7)
        out[m] = mask_split_from_masks(visible, predict, padding_mask=pads[m])
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@budget(0.7)
@given(wb=water_batches(min_batch=2), seed=seeds())
def test_ragged_custom_splits_equal_batches_of_one(
    zoo: Zoo, variant: str, wb: WaterBatch, seed: int
) -> None:
    """Splits passed by the caller may give every sample of every modality (rasters
    included) its own visible and predicted counts: each sample still gets exactly what it
    gets alone, so no padded slot is ever attended and no token moves between samples."""
    model = zoo[variant]
    splits = _ragged_splits(model, wb, seed)
    x, static, spm = wb.tensors()
    with torch.no_grad():
        out = model(x, static=static, site_padding_mask=spm, splits=splits)
        for i in range(wb.batch):
            sl = slice(i, i + 1)
            one = model(
                {m: v[sl] for m, v in x.items()},
                static=static[sl],
                site_padding_mask=None if spm is None else spm[sl],
                splits={m: _row_split(sp, i) for m, sp in splits.items()},
            )
            for m in NAMES:
                k = int(splits[m].num_predict[i])
                close(one.preds[m][0, :k], out.preds[m][i, :k])
                close(one.sample_losses[m][0], out.sample_losses[m][i])


# =========================================================================== bug 6
@pytest.mark.parametrize("variant", list(VARIANTS))
@budget(0.7)
@given(wb=water_batches(), data=st.data(), split_seed=seeds())
def test_any_mix_of_missing_samples_gives_finite_loss_and_grads(
    zoo: Zoo,
    variant: str,
    wb: WaterBatch,
    data: st.DataObject,
    split_seed: int,
) -> None:
    """Random per-modality missing flags, all-NaN river flow, samples with every site
    padded: loss, per-sample losses, predictions and gradients stay finite; missing
    samples score 0; the total is the weighted sum of the modality losses."""
    model = zoo[variant]
    missing = data.draw(missing_flags(wb.batch))
    model.zero_grad(set_to_none=True)
    out = run(model, wb, split_seed=split_seed, missing=missing)
    backward(out.loss)
    assert_finite_outputs(out)
    grads_finite(model)
    total = sum(modality(model, m).loss_weight * out.losses[m] for m in NAMES)
    close(out.loss, torch.as_tensor(total))
    for m in NAMES:
        assert not out.sample_losses[m][missing[m]].any(), m
        assert not out.splits[m].visible_mask[missing[m]].any(), m


# =========================================================================== bug 7
@pytest.mark.parametrize("variant", list(VARIANTS))
@budget(0.7)
@given(wb=water_batches(min_batch=2), data=st.data(), split_seed=seeds())
def test_sample_loss_ignores_other_samples_missing_flags(
    zoo: Zoo,
    variant: str,
    wb: WaterBatch,
    data: st.DataObject,
    split_seed: int,
) -> None:
    """Flipping sample ``j``'s missing flag for one modality changes nothing for any other
    sample (every modality's per-sample loss and predictions)."""
    model = zoo[variant]
    missing = data.draw(missing_flags(wb.batch))
    name = data.draw(st.sampled_from(NAMES))
    j = data.draw(st.integers(0, wb.batch - 1))
    flipped = {m: v.clone() for m, v in missing.items()}
    flipped[name][j] = ~flipped[name][j]
    with torch.no_grad():
        out = run(model, wb, split_seed=split_seed, missing=missing)
        out_f = run(model, wb, split_seed=split_seed, missing=flipped)
    others = torch.arange(wb.batch) != j
    for m in NAMES:
        close(out_f.sample_losses[m][others], out.sample_losses[m][others])
        for i in others.nonzero().flatten().tolist():
            k = int(out.splits[m].num_predict[i])
            assert int(out_f.splits[m].num_predict[i]) == k, (m, i)
            close(out_f.preds[m][i, :k], out.preds[m][i, :k])
    if bool(flipped[name][j]):
        assert out_f.sample_losses[name][j].item() == 0.0


# =========================================================================== bug 8
def _skip_splits(model: MultimodalMAE, wb: WaterBatch, seed: int) -> dict[str, MaskSplit]:
    """CrossMAE partial reconstruction: keep 40%, predict 20%, skip the rest of each step."""
    pads = token_padding(model, wb)
    g = generator(seed)
    return {
        m: grouped_random_masking(
            wb.batch, T, LOCATIONS[m], 0.6, predict_ratio=0.2, padding_mask=pads[m], generator=g
        )
        for m in NAMES
    }


@budget(1.0)
@given(
    wb=water_batches(),
    kind=st.sampled_from(GARBAGE_KINDS),
    split_seed=seeds(),
    poison_seed=seeds(),
)
def test_garbage_at_skipped_tokens_and_invalid_pixels_leaves_loss_unchanged(
    zoo: Zoo, wb: WaterBatch, kind: str, split_seed: int, poison_seed: int
) -> None:
    """NaN / inf / garbage written into every value of the tokens that are neither visible
    nor predicted, and into the sea pixels, leaves loss and predictions unchanged."""
    model = zoo["cross"]
    splits = _skip_splits(model, wb, split_seed)
    pads = token_padding(model, wb)
    x, _, _ = wb.tensors()
    hit = torch.zeros(x["precipitation"].shape, dtype=torch.bool)
    hit |= ~land_pixel_mask()
    hit_s = torch.zeros(x["river_flow"].shape, dtype=torch.bool)
    bad: dict[str, Tensor] = {}
    skipped_any = False
    for k, m in enumerate(NAMES):
        sp = splits[m]
        skipped = ~sp.visible_mask & ~sp.predict_mask & ~pads[m]
        where = (hit if m in RASTERS else hit_s).clone()
        for i, n in skipped.nonzero().tolist():
            skipped_any = True
            if m in RASTERS:
                t, rows, cols = raster_token_pixels(n)
                where[i, t, rows, cols] = True
            else:
                t, sites = series_token_values(n)
                where[i, sites, t] = True
        bad[m] = torch.where(where, _garbage_like(x[m], poison_seed + k, kind), x[m])
    assert skipped_any
    with torch.no_grad():
        clean = run(model, wb, splits=splits)
        dirty = run(model, wb, splits=splits, inputs=bad)
    assert_same_outputs(clean, dirty)


@budget(0.5)
@given(wb=water_batches(), split_seed=seeds(), sign=st.sampled_from([1.0, -1.0]))
def test_kind_of_missing_marker_does_not_matter(
    zoo: Zoo, wb: WaterBatch, split_seed: int, sign: float
) -> None:
    """Replacing every NaN placeholder (inputs and static attributes) by ``±inf`` changes
    nothing: a missing value is missing, whatever non-finite value marks it."""
    model = zoo["cross"]
    x, static, _ = wb.tensors()
    inf = torch.tensor(sign * math.inf)
    as_inf = {m: torch.where(torch.isnan(v), inf, v) for m, v in x.items()}
    with torch.no_grad():
        clean = run(model, wb, split_seed=split_seed)
        dirty = run(
            model,
            wb,
            split_seed=split_seed,
            inputs=as_inf,
            static=torch.where(torch.isnan(static), inf, static),
        )
    assert_same_outputs(clean, dirty)


def _token_values(
    m: str, x: Tensor, i: int, n: int, spm: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Independent reference: the raw values of token ``n`` of sample ``i`` and whether each
    counts as observed (finite, real site), in the token's value layout."""
    if m in RASTERS:
        t, rows, cols = raster_token_pixels(n)
        v = x[i, t, rows, cols].flatten()  # patch vector, pixels row-major
        return v, torch.isfinite(v)
    t, sites = series_token_values(n)
    v = torch.full((GROUP,), math.nan)
    real = torch.zeros(GROUP, dtype=torch.bool)
    k = sites.stop - sites.start
    v[:k] = x[i, sites, t]
    real[:k] = True if spm is None else ~spm[i, sites]
    return v, real & torch.isfinite(v)


@budget(0.5)
@given(wb=water_batches(), data=st.data(), split_seed=seeds())
def test_losses_match_an_independent_masked_mse(
    zoo: Zoo, wb: WaterBatch, data: st.DataObject, split_seed: int
) -> None:
    """Recompute every per-sample loss from the predictions and the raw inputs: per token,
    the mean squared error over its observed values; per sample, the mean over tokens with
    an observed value; per modality, the mean over samples with a scored token. NaN
    placeholders are never scored, targets and ``target_valid`` say exactly that."""
    model = zoo["cross"]
    missing = data.draw(missing_flags(wb.batch))
    x, _, spm = wb.tensors()
    with torch.no_grad():
        out = run(model, wb, split_seed=split_seed, missing=missing)
    for m in NAMES:
        sp = out.splits[m]
        pred = out.preds[m].double()
        per_sample = torch.zeros(wb.batch, dtype=torch.float64)
        scored_samples = 0
        for i in range(wb.batch):
            errs = []
            for k in range(sp.ids_predict.shape[1]):
                if sp.predict_padding_mask[i, k]:
                    continue
                v, ok = _token_values(m, x[m], i, int(sp.ids_predict[i, k]), spm)
                assert torch.equal(out.target_valid[m][i, k], ok), (m, i, k)
                close(out.targets[m][i, k][ok], v[ok])
                if ok.any():
                    errs.append(((pred[i, k][ok] - v[ok].double()) ** 2).mean())
            if errs:
                per_sample[i] = torch.stack(errs).mean()
                scored_samples += 1
        assert torch.isfinite(out.targets[m]).all(), m
        close(out.sample_losses[m].double(), per_sample, 1e-4)
        expected = per_sample.sum() / max(scored_samples, 1)
        close(out.losses[m].double(), expected, 1e-4)


# =========================================================================== bug 9
@budget(0.3)
@given(wb=water_batches(max_batch=3), split_seed=seeds())
def test_autocast_bf16_on_cpu(zoo: Zoo, wb: WaterBatch, split_seed: int) -> None:
    """Under CPU autocast (bf16) with float32 inputs and static attributes: finite loss and
    gradients, and the loss is close to the float32 loss."""
    model = zoo["cross"]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref = run(model, wb, split_seed=split_seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, wb, split_seed=split_seed)
    backward(out.loss)
    assert_finite_outputs(out)
    assert grads_finite(model) > 0
    torch.testing.assert_close(out.loss.float(), ref.loss, rtol=5e-2, atol=1e-3)


@pytest.fixture(scope="module")
def converted(zoo: Zoo) -> Zoo:
    """Copies of the default model converted to float64 / bfloat16 / float16."""
    dtypes = (torch.float64, torch.bfloat16, torch.float16)
    return Zoo({dt: copy.deepcopy(zoo["cross"]).to(dt) for dt in dtypes})


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@budget(0.3)
@given(wb=water_batches(max_batch=3), split_seed=seeds())
def test_converted_model_accepts_float32_inputs(
    zoo: Zoo,
    converted: Zoo,
    dtype: torch.dtype,
    wb: WaterBatch,
    split_seed: int,
) -> None:
    """``model.to(dtype)`` fed float32 rasters, series and static attributes: finite loss
    and gradients, predictions in the model dtype, loss close to the float32 model's."""
    model = zoo["cross"]
    low = converted[dtype]
    low.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref = run(model, wb, split_seed=split_seed)
    x, static, _ = wb.tensors()
    assert static.dtype == torch.float32 and all(v.dtype == torch.float32 for v in x.values())
    out = run(low, wb, split_seed=split_seed)
    backward(out.loss)
    assert_finite_outputs(out)
    assert grads_finite(low) > 0
    for m in NAMES:
        assert out.preds[m].dtype == dtype, m
    tol = 1e-4 if dtype == torch.float64 else 5e-2
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=tol, atol=1e-4)


# =========================================================================== bug 10
@budget(0.5)
@given(wb=water_batches(), seed=seeds(), other=seeds())
def test_masking_is_deterministic_given_a_generator(
    zoo: Zoo, wb: WaterBatch, seed: int, other: int
) -> None:
    """Same generator seed → identical splits and bitwise-identical loss (eval mode);
    another seed → different splits (the masks really are drawn from the generator)."""
    model = zoo["cross"]
    with torch.no_grad():
        a = run(model, wb, split_seed=seed)
        b = run(model, wb, split_seed=seed)
    assert torch.equal(a.loss, b.loss)
    for m in NAMES:
        for fa, fb in zip(a.splits[m], b.splits[m]):
            assert torch.equal(fa, fb), m
        assert torch.equal(a.sample_losses[m], b.sample_losses[m])
        assert torch.equal(a.preds[m], b.preds[m])
    if other != seed:
        c = draw_splits(model, wb, other)
        # raster masks alone have 20 ** (3 * b) equally likely outcomes per modality
        assert any(not torch.equal(a.splits[m].visible_mask, c[m].visible_mask) for m in RASTERS)
    again = draw_splits(model, wb, seed)
    for m in NAMES:
        assert torch.equal(again[m].visible_mask, a.splits[m].visible_mask)
        assert torch.equal(again[m].predict_mask, a.splits[m].predict_mask)


# =========================================================================== training
def test_reduced_water_mae_small_trains() -> None:
    """`water_mae_small` at a reduced size (4 steps, 24 patches / 12 land, 24 sites) trains
    20 AdamW steps on a fixed batch where half the samples lack river flow: every loss is
    finite and the loss goes down."""
    torch.manual_seed(0)
    model = water_mae_small(
        num_steps=4,
        image_size=(60, 40),
        num_land_patches=12,
        num_sites=24,
        embed_dim=64,
        decoder_dim=32,
        num_heads=4,
        decoder_num_heads=4,
        raster_depth=2,
        series_depth=2,
        decoder_depth=2,
    ).train()
    g = generator(123)
    b = 4
    x = {m: randn(g, b, 4, 60, 40) for m in RASTERS}
    x.update({m: randn(g, b, 24, 4) for m in SERIES})
    x["river_flow"][::2] = float("nan")  # samples 0 and 2: before 1989
    static = randn(g, b, 24, ATTRS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masks = generator(7)
    losses: list[float] = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        out = model(x, static=static, generator=masks)
        assert torch.isfinite(out.loss), losses
        backward(out.loss)
        grads_finite(model)
        opt.step()
        losses.append(out.loss.item())
        assert out.losses["river_flow"].item() > 0.0  # the samples with river flow still train
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, losses
