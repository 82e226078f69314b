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
from reliability_helpers import Case, Raises, Recorder, randn, run_case

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
    }
    return [
        Case(api, f"generator={g!r}", (lambda f=fn, g=g: f(g)), Raises(("generator",), (repr(g),)))
        for api, fn in calls.items()
        for g in BAD_GENERATORS
    ]


_IMAGE: list[cm.ImageCrossMAE] = []


def _image() -> cm.ImageCrossMAE:
    if not _IMAGE:
        torch.manual_seed(0)
        _IMAGE.append(
            cm.models.crossmae_vit_small(
                img_size=16,
                patch_size=4,
                depth=1,
                decoder_depth=1,
                embed_dim=24,
                num_heads=6,
                decoder_embed_dim=16,
                decoder_num_heads=8,
            ).eval()
        )
    return _IMAGE[0]


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
