"""Tests for `ImageCrossMAE` (tiny models: image 32, patch 8 -> 16 patches, width 32)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from typing import Any

import pytest
import torch

from crossmae.decoders import CrossMAEDecoder, MAEDecoder
from crossmae.encoders import TransformerEncoder
from crossmae.layers import sincos_pos_embed_2d
from crossmae.masking import MaskSplit, mask_split_from_masks, random_masking
from crossmae.models import ImageCrossMAE, ImageCrossMAEConfig, build_image_crossmae
from crossmae.tokenizers import patchify

N = 16  # (32 / 8) ** 2 patches
P_DIM = 8 * 8 * 3  # values per patch


def tiny_config(**overrides: Any) -> ImageCrossMAEConfig:
    cfg = ImageCrossMAEConfig(
        img_size=32,
        patch_size=8,
        in_chans=3,
        embed_dim=32,
        depth=2,
        num_heads=4,
        decoder_embed_dim=24,
        decoder_depth=2,
        decoder_num_heads=4,
    )
    return replace(cfg, **overrides)


def tiny_model(seed: int = 0, **overrides: Any) -> ImageCrossMAE:
    torch.manual_seed(seed)
    return build_image_crossmae(tiny_config(**overrides))


def images(b: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g).to(dtype)


def split_for(
    b: int = 2, seed: int = 3, mask_ratio: float = 0.75, predict_ratio: float = 0.25
) -> MaskSplit:
    g = torch.Generator().manual_seed(seed)
    return random_masking(b, N, mask_ratio, predict_ratio=predict_ratio, generator=g)


# --------------------------------------------------------------------------- switches
SWITCHES = list(itertools.product([True, False], repeat=4))


@pytest.mark.parametrize(("cross", "self_attn", "wfm", "use_input"), SWITCHES)
def test_every_switch_combination_trains(
    cross: bool, self_attn: bool, wfm: bool, use_input: bool
) -> None:
    model = tiny_model(
        use_cross_attn=cross, decoder_self_attn=self_attn, use_weighted_fm=wfm, use_input=use_input
    )
    assert isinstance(model.decoder, CrossMAEDecoder if cross else MAEDecoder)
    # With feature weighting the encoder's final norm is not built (no unused parameters).
    assert isinstance(model.encoder.norm, torch.nn.Identity) == wfm
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(images(), generator=torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == (2, 4, P_DIM) and out.target.shape == (2, 4, P_DIM)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    opt.step()
    again = model(images(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(again.loss)


@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("fm_layers", ["all", -1, (-1,), (0, 1), [0, -1], (1,)])
@pytest.mark.parametrize("use_input", [True, False])
def test_fm_layer_variants_train(cross: bool, fm_layers: Any, use_input: bool) -> None:
    model = tiny_model(
        use_cross_attn=cross, use_weighted_fm=True, fm_layers=fm_layers, use_input=use_input
    )
    cfg = tiny_config(fm_layers=fm_layers, use_input=use_input)
    maps = cfg.num_feature_maps
    mix: Any = model.decoder.wfm if cross else model.feature_mix
    assert mix is not None and mix.num_inputs == maps
    assert mix.num_outputs == (2 if cross else 1)
    out = model(images(), split=split_for())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters())


def test_blocks_after_last_mixed_layer_are_unused() -> None:
    """Documented behaviour: blocks past the last mixed layer do not reach the loss."""
    model = tiny_model(fm_layers=(0,))
    model(images(), split=split_for()).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("encoder.blocks.1."):
            assert p.grad is None
        else:
            assert p.grad is not None, name


def test_feature_maps_include_cls_and_input() -> None:
    model = tiny_model(use_input=True)
    split = split_for()
    enc = model.forward_encoder(images(), split)
    k = int(split.ids_keep.shape[1])
    assert enc.tokens.shape == (2, 1 + k, 32)
    assert enc.padding_mask is not None and enc.padding_mask.shape == (2, 1 + k)
    assert not enc.padding_mask[:, 0].any()  # the cls token is never padding
    assert enc.features is not None and enc.features.shape == (3, 2, 1 + k, 32)


# --------------------------------------------------------------------------- ratios
@pytest.mark.parametrize(("predict_ratio", "queries"), [(0.25, 4), (0.5, 8), (0.75, 12)])
def test_predict_ratio_sets_query_count(predict_ratio: float, queries: int) -> None:
    model = tiny_model(predict_ratio=predict_ratio)
    out = model(images())
    assert out.split.ids_keep.shape == (2, 4)
    assert out.pred.shape == (2, queries, P_DIM)
    assert int(out.split.predict_mask.sum()) == 2 * queries
    # per-call override of the model's default
    out2 = tiny_model()(images(), predict_ratio=predict_ratio)
    assert out2.pred.shape == (2, queries, P_DIM)


def test_mask_ratio_override_and_zero_visible() -> None:
    model = tiny_model()
    out = model(images(), mask_ratio=0.5, predict_ratio=0.5)
    assert out.split.ids_keep.shape == (2, 8) and out.pred.shape == (2, 8, P_DIM)
    # int(16 * 0.05) = 0 visible patches: only the cls token is encoded
    out0 = model(images(), mask_ratio=0.95, predict_ratio=0.5)
    assert out0.split.ids_keep.shape == (2, 0)
    out0.loss.backward()
    assert torch.isfinite(out0.loss)


def test_loss_is_mse_over_predicted_patches() -> None:
    model = tiny_model()
    x, split = images(), split_for()
    out = model(x, split=split)
    target = torch.gather(patchify(x, 8), 1, split.ids_predict[..., None].expand(-1, -1, P_DIM))
    torch.testing.assert_close(out.target, target)
    torch.testing.assert_close(out.loss, ((out.pred - target) ** 2).mean())


def test_norm_pix_loss_target() -> None:
    model = tiny_model(norm_pix_loss=True)
    x, split = images(), split_for()
    out = model(x, split=split)
    raw = torch.gather(patchify(x, 8), 1, split.ids_predict[..., None].expand(-1, -1, P_DIM))
    expected = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out.target, expected)
    torch.testing.assert_close(out.loss, ((out.pred - expected) ** 2).mean())
    assert model.normalized_predictions


# --------------------------------------------------------------------------- determinism
def test_deterministic_given_generator() -> None:
    model = tiny_model()
    a = model(images(), generator=torch.Generator().manual_seed(7))
    b = model(images(), generator=torch.Generator().manual_seed(7))
    c = model(images(), generator=torch.Generator().manual_seed(8))
    for fa, fb in zip(a.split, b.split):
        assert torch.equal(fa, fb)
    assert torch.equal(a.loss, b.loss)
    assert not torch.equal(a.split.visible_mask, c.split.visible_mask)


def test_noise_orders_patches() -> None:
    model = tiny_model()
    noise = torch.arange(N, dtype=torch.float32).repeat(2, 1)
    out = model(images(), noise=noise)
    assert torch.equal(out.split.ids_keep, torch.arange(4).repeat(2, 1))
    assert torch.equal(out.split.ids_predict, torch.arange(12, 16).repeat(2, 1))


def test_forward_uses_a_subclass_forward_loss() -> None:
    """``forward`` scores through ``forward_loss`` when a subclass overrides it (crossmae's
    own loss takes a shorter path for splits without padding)."""
    calls: list[int] = []

    class Scaled(type(tiny_model())):  # type: ignore[misc]
        def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, split: Any) -> Any:
            calls.append(pred.shape[1])
            loss, target = super().forward_loss(imgs, pred, split)
            return 2 * loss, target

    base = tiny_model()
    model = copy.deepcopy(base)
    model.__class__ = Scaled  # the same weights, the subclass's loss
    out = model(images(), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    ref = base(images(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.loss, 2 * ref.loss)


@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("wfm", [True, False])
def test_dense_path_matches_masked_path(cross: bool, wfm: bool) -> None:
    model = tiny_model(use_cross_attn=cross, use_weighted_fm=wfm, decoder_self_attn=True)
    model.eval()
    x, split = images(), split_for()
    masked = model(x, split=split)  # a given split: masks passed (safe default)
    dense = model(x, split=split, dense=True)
    torch.testing.assert_close(dense.pred, masked.pred, atol=1e-5, rtol=1e-5)
    # the dense path skips the padding masks of the embedding and the loss, not their effect
    torch.testing.assert_close(dense.loss, masked.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.target, masked.target, atol=0, rtol=0)
    loss, target = model.forward_loss(x, dense.pred, split)
    torch.testing.assert_close(loss, dense.loss, atol=0, rtol=0)
    torch.testing.assert_close(target, dense.target, atol=0, rtol=0)
    drawn = model(x, generator=torch.Generator().manual_seed(3))  # drawn here: dense
    again = model(x, split=drawn.split, dense=False)
    torch.testing.assert_close(drawn.pred, again.pred, atol=1e-5, rtol=1e-5)
    # dense encoder output combined with a masked decoder call
    enc = model.forward_encoder(x, split, dense=True)
    assert enc.padding_mask is None
    torch.testing.assert_close(model.forward_decoder(enc, split), masked.pred, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="dense"):
        model(x, dense=1)


# --------------------------------------------------------------------------- padding/batch
def test_variable_counts_match_batch_of_one() -> None:
    """A split with per-sample counts (padding) gives each sample its batch-of-one result."""
    model = tiny_model(decoder_self_attn=True).eval()
    x = images(3)
    vis = torch.zeros(3, N, dtype=torch.bool)
    pred_m = torch.zeros(3, N, dtype=torch.bool)
    vis[0, [0, 5, 9]] = True
    pred_m[0, [1, 2, 3, 4]] = True
    vis[1, [2, 3, 4, 7, 11, 15]] = True
    pred_m[1, [0]] = True
    pred_m[2, [1, 6, 8]] = True  # no visible patch at all
    split = mask_split_from_masks(vis, pred_m)
    out = model(x, split=split)
    assert torch.isfinite(out.loss)
    for i in range(3):
        one = mask_split_from_masks(vis[i : i + 1], pred_m[i : i + 1])
        ref = model(x[i : i + 1], split=one)
        p = int(one.ids_predict.shape[1])
        torch.testing.assert_close(out.pred[i : i + 1, :p], ref.pred, atol=1e-5, rtol=1e-5)


def test_sample_independence() -> None:
    model = tiny_model().eval()
    x, split = images(), split_for()
    out = model(x, split=split)
    y = x.clone()
    y[1] = torch.randn_like(y[1]) * 5
    out2 = model(y, split=split)
    torch.testing.assert_close(out.pred[0], out2.pred[0])


# --------------------------------------------------------------------------- reconstruct
@pytest.mark.parametrize("wfm", [True, False])
def test_reconstruct_every_patch(wfm: bool) -> None:
    model = tiny_model(use_weighted_fm=wfm).eval()
    x, split = images(), split_for()
    with torch.no_grad():
        rec = model.reconstruct(x, split)
    assert rec.shape == x.shape
    px, pr = patchify(x, 8), patchify(rec, 8)
    vis = split.visible_mask
    assert torch.equal(pr[vis], px[vis])  # visible patches keep the input pixels
    # hidden patches hold the predictions of a split that predicts every hidden patch
    full = MaskSplit(
        split.ids_keep,
        split.keep_padding_mask,
        *mask_split_from_masks(vis, ~vis)[2:4],
        vis,
        ~vis,
    )
    with torch.no_grad():
        pred = model.forward_decoder(model.forward_encoder(x, full), full)
    hidden = torch.gather(pr, 1, full.ids_predict[..., None].expand(-1, -1, P_DIM))
    torch.testing.assert_close(hidden, pred)
    # CrossMAE queries are independent: the 4 trained-ratio predictions are among them
    with torch.no_grad():
        small = model(x, split=split).pred
    idx = split.ids_predict[..., None].expand(-1, -1, P_DIM)
    torch.testing.assert_close(torch.gather(pr, 1, idx), small, atol=1e-5, rtol=1e-5)


def test_reconstruct_from_visible_mask_and_order() -> None:
    model = tiny_model().eval()
    x, split = images(), split_for()
    with torch.no_grad():
        a = model.reconstruct(x, split)
        b = model.reconstruct(x, split.visible_mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="split_or_visible_mask"):
        model.reconstruct(x, split.visible_mask.float())


def test_reconstruct_norm_pix() -> None:
    model = tiny_model(norm_pix_loss=True).eval()
    x, split = images(), split_for()
    with torch.no_grad():
        rec = model.reconstruct(x, split)
        oracle = model.reconstruct(x, split, oracle_denormalize=True)
    vis = split.visible_mask
    assert torch.equal(patchify(rec, 8)[vis], patchify(x, 8)[vis])
    assert torch.equal(patchify(oracle, 8)[vis], patchify(x, 8)[vis])
    hidden_rec, hidden_or = patchify(rec, 8)[~vis], patchify(oracle, 8)[~vis]
    truth = patchify(x, 8)[~vis]
    std = (truth.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(hidden_or, hidden_rec * std + truth.mean(-1, keepdim=True))
    with pytest.raises(ValueError, match="oracle_denormalize"):
        tiny_model().reconstruct(x, split, oracle_denormalize=True)


# --------------------------------------------------------------------------- dtypes/compile
def test_float64_forward() -> None:
    model = tiny_model().double()
    out = model(images(dtype=torch.float64), split=split_for())
    assert out.pred.dtype == torch.float64 and out.loss.dtype == torch.float64
    assert torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("cross", [True, False])
def test_autocast_bf16_forward(cross: bool) -> None:
    model = tiny_model(use_cross_attn=cross)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(), split=split_for())
    assert torch.isfinite(out.loss) and torch.isfinite(out.pred.float()).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("cross", [True, False])
def test_compile_fullgraph(cross: bool) -> None:
    model = tiny_model(use_cross_attn=cross, use_input=True).eval()
    x, split = images(), split_for()
    expected = model(x, split=split)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    got = compiled(x, split=split)
    torch.testing.assert_close(got.loss, expected.loss)
    torch.testing.assert_close(got.pred, expected.pred)


# --------------------------------------------------------------------------- init/buffers
def test_initialization_and_fixed_tables() -> None:
    model = tiny_model(use_input=True)
    assert "pos_embed" not in model.state_dict()
    assert "pos_embed" not in dict(model.named_parameters())
    table = model.pos_embed[0]
    assert torch.equal(table[0], torch.zeros(32))
    torch.testing.assert_close(table[1:], sincos_pos_embed_2d(32, 4))
    assert isinstance(model.decoder, CrossMAEDecoder)
    torch.testing.assert_close(model.decoder.pos_table, sincos_pos_embed_2d(24, 4))
    # weighted feature maps keep their own initialization (plain average)
    assert model.decoder.wfm is not None
    torch.testing.assert_close(model.decoder.wfm.linear.weight, torch.full((2, 3), 1 / 3))
    assert model.decoder.dec_norms is not None
    assert torch.equal(model.decoder.dec_norms.weight, torch.ones(2, 32))
    blk: Any = model.encoder.blocks[0]
    assert torch.equal(blk.attn.qkv.bias, torch.zeros(96))
    assert torch.equal(blk.norm1.weight, torch.ones(32))
    bound = (6 / (32 + 96)) ** 0.5
    assert blk.attn.qkv.weight.abs().max() <= bound
    assert 0.005 < model.cls_token.std() < 0.05


# --------------------------------------------------------------------------- bad input
def test_bad_inputs() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="imgs"):
        model(torch.randn(2, 3, 32, 16))
    with pytest.raises(TypeError, match="imgs"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="split was given"):
        model(images(), split=split_for(), mask_ratio=0.5)
    with pytest.raises(TypeError, match="split"):
        model(images(), split=(1, 2))
    with pytest.raises(ValueError, match=r"split\.visible_mask"):
        model(images(), split=split_for(b=3))
    with pytest.raises(ValueError, match="predict_ratio"):
        model(images(), mask_ratio=0.2)


def test_constructor_checks_parts() -> None:
    ref = tiny_model()
    kwargs: dict[str, Any] = {"img_size": 32, "patch_size": 8, "in_chans": 3}
    with pytest.raises(ValueError, match="num_feature_maps"):
        ImageCrossMAE(ref.patch_embed, ref.encoder, ref.decoder, **kwargs)  # no fm_layers
    with pytest.raises(ValueError, match="values per patch"):
        ImageCrossMAE(
            ref.patch_embed, ref.encoder, ref.decoder, fm_layers="all", **{**kwargs, "in_chans": 1}
        )
    with pytest.raises(ValueError, match="predict_ratio"):
        ImageCrossMAE(
            ref.patch_embed, ref.encoder, ref.decoder, fm_layers="all", predict_ratio=0.9, **kwargs
        )
    normed = TransformerEncoder(32, 2, 4, final_norm=True)
    with pytest.raises(ValueError, match="final_norm"):
        ImageCrossMAE(ref.patch_embed, normed, ref.decoder, fm_layers="all", **kwargs)
    film_encoder = TransformerEncoder(32, 2, 4, cond_dim=3, final_norm=False)
    with pytest.raises(ValueError, match="cond_dim"):
        ImageCrossMAE(ref.patch_embed, film_encoder, ref.decoder, fm_layers="all", **kwargs)
    with pytest.raises(TypeError, match="encoder"):
        ImageCrossMAE(ref.patch_embed, ref.decoder, ref.decoder, **kwargs)  # type: ignore[arg-type]


def _padded_flags(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records ``padded`` of every attention plan `backend.decide` makes."""
    from crossmae.layers import backend

    flags: list[bool] = []
    real = backend.decide

    def spy(*args: Any, **kwargs: Any) -> Any:
        flags.append(bool(kwargs["padded"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "decide", spy)
    return flags


def test_random_split_is_marked_dense_and_runs_unmasked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A split from `random_split` has no padding slot: forward given it plans the unmasked
    attention without ``dense=True``. Moving it keeps the mark; editing it drops it."""
    import pickle

    from strategies import tiny_image_model

    torch.manual_seed(0)
    model = tiny_image_model(32, 4, 32, 4)
    imgs = torch.randn(3, 3, 16, 16)
    split = model.random_split(3, generator=torch.Generator().manual_seed(4))
    assert isinstance(split, MaskSplit)
    assert not split.keep_padding_mask.any() and not split.predict_padding_mask.any()
    flags = _padded_flags(monkeypatch)
    with torch.no_grad():
        auto = model(imgs, split=split)
        auto_flags, flags[:] = list(flags), []
        promised = model(imgs, split=split, dense=True)
        promised_flags, flags[:] = list(flags), []
        edited = split._replace(ids_keep=split.ids_keep.clone())
        assert type(edited) is MaskSplit
        masked = model(imgs, split=edited)
        masked_flags, flags[:] = list(flags), []
    assert auto_flags and not any(auto_flags) and auto_flags == promised_flags
    assert any(masked_flags)  # an edited split is attended with its (empty) masks
    torch.testing.assert_close(auto.loss, promised.loss)
    torch.testing.assert_close(masked.loss, auto.loss)
    moved = split.to("cpu")
    assert type(moved) is type(split)
    assert type(pickle.loads(pickle.dumps(split))) is type(split)  # DataLoader workers
    # a split built by hand stays a plain MaskSplit, attended with its masks
    plain = mask_split_from_masks(split.visible_mask, split.predict_mask)
    assert type(plain) is MaskSplit
    # stacking per-sample splits: marked only while no padding slot comes in
    from torch.utils.data import default_collate

    one = type(split)(*(t[0] for t in split))
    assert type(one) is type(split)
    fields = [t[1].clone() for t in split]
    fields[1][-1] = True  # sample 1's last kept slot becomes padding
    fields[0][-1] = 0
    padded = MaskSplit(*fields)
    assert type(default_collate([one, one])) is type(split)
    assert type(default_collate([one, padded])) is MaskSplit
    assert type(type(split)(*padded)) is MaskSplit  # the mark is never put on padding
