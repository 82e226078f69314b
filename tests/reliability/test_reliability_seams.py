"""Seams the 0.1.0 review found leaking (issue 9): each case here failed on 0.1.0.

* a ``generator`` that is not a ``torch.Generator`` (a seed ``5``, ``"seed"``) gets a
  ``TypeError`` naming ``generator`` before any work, at every entry point taking one;
* a flag that is not a ``bool`` (``"False"``, ``"no"``, ``0``, ``1``) gets a ``TypeError``
  naming the flag, never read as truthy;
* a self-contradictory `MaskSplit` (repeated id, a token visible and predicted, ids out of
  range, masks that disagree with the ids) is refused on the CPU (``ValueError`` naming the
  field) and by ``split.validate()`` on any device;
* `scatter_tokens` refuses repeated real ids on the CPU;
* tokenizers check ``time_positions`` before their projection runs;
* a NaN/inf pixel the encoder does not see never reaches a loss, a prediction or a
  gradient of `ImageCrossMAE`; a NaN/inf pixel inside a target patch is a *missing target
  value* (not scored, not in the ``norm_pix_loss`` statistics).

Legend: ``b`` batch, ``n`` tokens, ``k`` kept slots, ``p`` predicted slots. Polarity:
``*_padding_mask`` True = padding; ``visible_mask`` True = seen; ``predict_mask`` True =
reconstructed.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from reliability_helpers import Case, Raises, Recorder, Returns, randn, run_case, water_inputs
from strategies import tiny_image_model

import crossmae as cm

BAD_GENERATORS: tuple[Any, ...] = (5, "seed")


def _gen_cases() -> list[Case]:
    calls: dict[str, Callable[[Any], Any]] = {
        "random_masking": lambda g: cm.random_masking(2, 8, 0.5, generator=g),
        "grouped_random_masking": lambda g: cm.grouped_random_masking(2, 2, 4, 0.5, generator=g),
        "chunk_masking": lambda g: cm.chunk_masking(2, 4, 2, 0.5, chunk_size=2, generator=g),
        "time_step_masking": lambda g: cm.time_step_masking(2, 2, 4, 0.5, generator=g),
        "channel_masking": lambda g: cm.channel_masking(2, 2, 4, 0.5, generator=g),
        "tube_masking": lambda g: cm.tube_masking(2, 2, 4, 0.5, generator=g),
        "modality_dropout": lambda g: cm.modality_dropout(
            cm.random_masking(2, 8, 0.5), drop_prob=0.5, generator=g
        ),
        "ImageCrossMAE.forward": lambda g: _image()(randn(2, 3, 16, 16), generator=g),
        "ImageCrossMAE.random_split": lambda g: _image().random_split(2, generator=g),
        "MultimodalMAE.make_splits": lambda g: _water().make_splits(
            {name: torch.zeros(2, 1, dtype=torch.bool) for name in _water().names}, generator=g
        ),
        "MultimodalMAE.draw_splits": lambda g: _water().draw_splits(water_inputs(), generator=g),
    }
    return [
        Case(api, f"generator={g!r}", (lambda f=fn, g=g: f(g)), Raises(("generator",), (repr(g),)))
        for api, fn in calls.items()
        for g in BAD_GENERATORS
    ]


def _water() -> cm.MultimodalMAE:
    from reliability_helpers import build_water

    return build_water()


def _image() -> cm.ImageCrossMAE:
    return tiny_image_model(24, 6, 16, 8)


def _flag_cases() -> list[Case]:
    q = randn(1, 2, 3, 4)
    calls: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "CrossAttentionBlock": ("self_attn", lambda v: cm.CrossAttentionBlock(8, self_attn=v)),
        "CrossAttentionBlock ": ("qkv_bias", lambda v: cm.CrossAttentionBlock(8, qkv_bias=v)),
        "CrossAttention": ("fused_attn", lambda v: cm.CrossAttention(8, fused_attn=v)),
        "Attention": ("fused_attn", lambda v: cm.Attention(8, fused_attn=v)),
        "Attention ": ("qkv_bias", lambda v: cm.Attention(8, qkv_bias=v)),
        "Block": ("fused_attn", lambda v: cm.Block(8, 2, fused_attn=v)),
        "Mlp": ("bias", lambda v: cm.Mlp(8, bias=v)),
        "padded_attention": ("fused", lambda v: cm.padded_attention(q, q, q, fused=v)),
        "TransformerEncoder": (
            "final_norm",
            lambda v: cm.TransformerEncoder(8, 1, 2, final_norm=v),
        ),
        "TransformerEncoder.forward": (
            "include_input",
            lambda v: cm.TransformerEncoder(8, 1, 2)(
                randn(1, 3, 8), return_layers=[0], include_input=v
            ),
        ),
        "CrossMAEDecoder": (
            "self_attn",
            lambda v: cm.CrossMAEDecoder(
                8, 8, 1, 2, 4, pos_embed="learned", num_tokens=4, self_attn=v
            ),
        ),
        "PatchEmbed": ("bias", lambda v: cm.PatchEmbed(8, 4, bias=v)),
        "PostNormBlock": ("qkv_bias", lambda v: cm.PostNormBlock(8, 2, qkv_bias=v)),
        "PostNormTransformerEncoder": (
            "qkv_bias",
            lambda v: cm.PostNormTransformerEncoder(8, 0, 2, qkv_bias=v),
        ),
        "PostNormTransformerEncoder ": (
            "norm_features",
            lambda v: cm.PostNormTransformerEncoder(8, 1, 2, norm_features=v),
        ),
        "PostNormTransformerEncoder.forward": (
            "include_input",
            lambda v: cm.PostNormTransformerEncoder(8, 1, 2)(
                randn(1, 3, 8), return_layers=[0], include_input=v
            ),
        ),
        "drop_path": ("training", lambda v: cm.drop_path(randn(2, 3), 0.5, v)),
    }
    out = []
    for api, (name, fn) in calls.items():
        for v in ("False", "no", 1):
            out.append(
                Case(
                    api.strip(),
                    f"{name}={v!r}",
                    (lambda f=fn, v=v: f(v)),
                    Raises((name,), (repr(v),)),
                )
            )
    return out


CASES = _gen_cases() + _flag_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_seam_input(case: Case, rec: Recorder) -> None:
    run_case(rec, case)


# --------------------------------------------------------------------------- time_positions
def _tokenizers() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    raster = cm.RasterTokenizer(8, 4, (8, 12))
    series = cm.SeriesTokenizer(8, 4, group_size=2)
    return {
        "RasterTokenizer": (raster, randn(2, 3, 8, 12)),  # [b, t, H, W]
        "SeriesTokenizer": (series, randn(2, 4, 3)),  # [b, s, t]
    }


BAD_TIME_POSITIONS: dict[str, Callable[[], torch.Tensor]] = {
    "time_positions of the wrong length [t + 1]": lambda: torch.arange(4.0),
    "time_positions of bool dtype": lambda: torch.ones(3, dtype=torch.bool),
    "time_positions [b + 1, t] (another batch)": lambda: torch.zeros(3, 3),
}


@pytest.mark.parametrize("api", ["RasterTokenizer", "SeriesTokenizer"])
@pytest.mark.parametrize("tried", list(BAD_TIME_POSITIONS))
def test_time_positions_checked_before_proj(api: str, tried: str, rec: Recorder) -> None:
    """The error comes before any work: the projection never runs."""
    tok, x = _tokenizers()[api]
    calls: list[int] = []
    hook = tok.proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        tok(x, time_positions=BAD_TIME_POSITIONS[tried]())
    except (ValueError, TypeError) as e:
        ok = "time_positions" in str(e) and not calls
        rec.check(
            api,
            tried,
            ok,
            f"{type(e).__name__} naming `time_positions`, raised before `proj` runs",
            f"{type(e).__name__}: {e} (proj ran {len(calls)} times)",
        )
    else:
        rec.check(api, tried, False, "", "returned silently")
    finally:
        hook.remove()


# --------------------------------------------------------------------------- splits, scatter
def _corrupt(kind: str) -> cm.MaskSplit:
    from strategies import SplitSpec, corrupt_split

    return corrupt_split(SplitSpec(1, False, 0.75).build(2, 16), kind)


def _split_cases() -> list[Case]:
    from strategies import CORRUPTED_FIELD, SPLIT_CORRUPTIONS

    imgs = randn(2, 3, 16, 16)
    out: list[Case] = []
    for kind in SPLIT_CORRUPTIONS:
        field = CORRUPTED_FIELD[kind]
        tried = f"split with {kind.replace('_', ' ')}"
        out += [
            Case(
                "MaskSplit",
                f"validate(): {tried}",
                (lambda k=kind: _corrupt(k).validate()),
                Raises((f"split.{field}",)),
            ),
            Case(
                "ImageCrossMAE.forward",
                f"CPU {tried}",
                (lambda k=kind: _image()(imgs, split=_corrupt(k))),
                Raises((f"split.{field}",)),
            ),
            Case(
                "mask_missing_samples",
                f"CPU {tried}",
                (
                    lambda k=kind: cm.mask_missing_samples(
                        _corrupt(k), torch.zeros(2, dtype=torch.bool)
                    )
                ),
                Raises((f"split.{field}",)),
            ),
        ]
    values = torch.tensor([[[1.0], [2.0], [3.0]]])
    out += [
        Case(
            "scatter_tokens",
            "repeated real ids [[1, 1, 2]] (CPU)",
            lambda: cm.scatter_tokens(values, torch.tensor([[1, 1, 2]]), 4),
            Raises(("ids",)),
        ),
        Case(
            "scatter_tokens",
            "a repeated id in a padded slot only",
            lambda: cm.scatter_tokens(
                values,
                torch.tensor([[1, 1, 2]]),
                4,
                padding_mask=torch.tensor([[False, True, False]]),
            ),
            Returns("placed; padded slots are never written", _equals([0.0, 1.0, 3.0, 0.0])),
        ),
        Case(
            "MAEDecoder.forward",
            "repeated real ids_keep (CPU)",
            lambda: cm.MAEDecoder(8, 8, 1, 2, 4, num_tokens=4)(
                randn(1, 3, 8), torch.tensor([[1, 1, 2]]), torch.tensor([[0, 3]])
            ),
            Raises(("ids_keep",)),
        ),
    ]
    return out


def _equals(expected: list[float]) -> Callable[[Any], None]:
    def check(result: Any) -> None:
        assert result.flatten().tolist() == expected, result.flatten().tolist()

    return check


# --------------------------------------------------------------------------- unseen pixels
def _pixel_case(where: str) -> Any:
    """Loss, predictions and gradients with NaN/inf written at ``where``; the clean ones."""
    model = _image().train()
    imgs = randn(2, 3, 16, 16, seed=4)
    split = cm.random_masking(
        2, 16, 0.75, predict_ratio=0.25, generator=torch.Generator().manual_seed(0)
    )
    if where == "hidden":
        patch = int(torch.nonzero(~split.visible_mask[0] & ~split.predict_mask[0])[0])
    else:
        patch = int(split.ids_predict[0, 0])
    r, c = divmod(patch, 4)

    def run(x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(x, split=split, dense=True)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    clean = run(imgs)
    poisoned = imgs.clone()
    poisoned[0, 1, r * 4 + 1, c * 4 + 2] = float("nan")
    nan = run(poisoned)
    poisoned[0, 1, r * 4 + 1, c * 4 + 2] = float("inf")
    inf = run(poisoned)
    model.eval()
    return where, clean, nan, inf


def _check_pixel(result: Any) -> None:
    where, (c_out, c_g), (n_out, n_g), (i_out, i_g) = result
    for grads in (n_g, i_g):
        bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
        assert not bad, f"non-finite gradients: {bad[:3]}"
    assert torch.equal(n_out.pred, c_out.pred) and torch.equal(i_out.pred, c_out.pred)
    if where == "hidden":
        assert torch.equal(n_out.loss, c_out.loss) and torch.equal(i_out.loss, c_out.loss)
        assert all(torch.equal(n_g[k], c_g[k]) for k in c_g), "gradients changed"
    else:  # a missing target value: NaN and inf alike, both finite
        assert torch.equal(n_out.loss, i_out.loss), "NaN and inf targets scored differently"
        assert all(torch.equal(n_g[k], i_g[k]) for k in n_g)


def _pixel_cases() -> list[Case]:
    pe = cm.PatchEmbed(8, 4, 16)
    imgs = randn(2, 3, 16, 16, seed=2)
    ids = torch.tensor([[0, 5], [15, 3]])
    poisoned = imgs.clone()
    poisoned[:, :, 4:8, 8:12] = float("nan")  # patch 6: selected by no sample
    return [
        Case(
            "ImageCrossMAE.forward",
            "NaN/inf in a pixel neither visible nor predicted",
            lambda: _pixel_case("hidden"),
            Returns(
                "loss, predictions and every gradient bit-identical; gradients finite",
                _check_pixel,
                finite=False,
            ),
        ),
        Case(
            "ImageCrossMAE.forward",
            "NaN/inf in a pixel of a predicted (target) patch",
            lambda: _pixel_case("target"),
            Returns(
                "a missing target value: not scored, not in norm_pix statistics; "
                "predictions bit-identical, loss and gradients finite",
                _check_pixel,
                finite=False,
            ),
        ),
        Case(
            "PatchEmbed.embed_selected",
            "NaN in a patch that is not selected",
            lambda: pe.embed_selected(poisoned, ids),
            Returns(
                "never read: equal to the clean result",
                lambda r: torch.testing.assert_close(
                    r, pe.embed_selected(imgs, ids), rtol=0, atol=0
                ),
            ),
        ),
    ]


MORE_CASES = _split_cases() + _pixel_cases()


@pytest.mark.parametrize("case", MORE_CASES, ids=[c.id for c in MORE_CASES])
def test_seam_split_scatter_pixels(case: Case, rec: Recorder) -> None:
    run_case(rec, case)
