"""Shared machinery of the reliability audit (``tests/reliability``).

* `Recorder`: every check writes one row ``{callable, tried, outcome, ok, test}``; when the
  environment variable ``CROSSMAE_RELIABILITY_OUT`` names a file, rows are appended to it as
  JSON lines (``tools/gen_reliability_table.py`` renders them into ``docs/reliability.md``).
  Rows are written *before* the assertion, so a failing check still documents what happened.
* `Case` + `run_case`: one public callable, one input, one expected outcome:

  - `Raises`: ``ValueError``/``TypeError`` whose message names the argument (as a word, so
    ``ids`` does not match ``ids_keep``) and shows the offending value;
  - `Returns`: success, every floating-point tensor in the result finite (unless the case
    says NaN must propagate), plus an optional extra check;
  - `KernelError`: a value-range error that crossmae deliberately does not check (it would
    need a device sync); the documented behaviour is that the kernel raises, never a silent
    wrong result.

* tiny builders of the models, seeded inputs, non-contiguous copies.

Legend: ``b`` batch, ``n`` tokens, ``c`` width. Polarity: ``*_padding_mask`` True = padding.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

import crossmae as cm
from crossmae.models.water import water_mae_small

ENV = "CROSSMAE_RELIABILITY_OUT"
STANDARD = (ValueError, TypeError)
# What a kernel raises for an unchecked out-of-range index on the CPU.
KERNEL = (RuntimeError, IndexError, ValueError)

Names = tuple[Union[str, tuple[str, ...]], ...]


# --------------------------------------------------------------------------- recording
class Recorder:
    """Collects rows for the reliability table; see the module docstring."""

    def __init__(self, test_id: str) -> None:
        self.test_id = test_id.split("tests/reliability/")[-1]
        self.rows: list[dict[str, Any]] = []

    def record(self, api: str, tried: str, outcome: str, ok: bool = True) -> None:
        row = {"callable": api, "tried": tried, "outcome": outcome, "ok": ok, "test": self.test_id}
        self.rows.append(row)
        path = os.environ.get(ENV)
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def check(self, api: str, tried: str, ok: bool, outcome: str, failure: str = "") -> None:
        """Record ``outcome`` (or ``FAIL: failure``) and assert ``ok``."""
        self.record(api, tried, outcome if ok else f"FAIL: {failure or outcome}", ok)
        assert ok, f"{api} / {tried}: {failure or outcome}"


# --------------------------------------------------------------------------- expectations
@dataclass(frozen=True)
class Raises:
    """A ``ValueError``/``TypeError`` naming every entry of ``names`` (a tuple entry means
    any one of its alternatives) and containing every string of ``shows`` (the value)."""

    names: Names
    shows: tuple[str, ...] = ()

    def describe(self) -> str:
        return "ValueError/TypeError naming " + ", ".join(_fmt_names(self.names))


@dataclass(frozen=True)
class Returns:
    """Success. ``finite``: every floating-point tensor of the result is finite. ``check``
    raises AssertionError when the result is wrong; ``note`` says what is checked."""

    note: str = "returns a finite result"
    check: Optional[Callable[[Any], None]] = None
    finite: bool = True


@dataclass(frozen=True)
class KernelError:
    """Documented: not validated (needs a device sync); the CPU kernel raises."""

    note: str


Expect = Union[Raises, Returns, KernelError]


@dataclass(frozen=True)
class Case:
    api: str
    tried: str
    fn: Callable[[], Any]
    expect: Expect

    @property
    def id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.tried).strip("_").lower()
        return f"{self.api}-{slug}"[:90]


def _fmt_names(names: Names) -> list[str]:
    out = []
    for n in names:
        if isinstance(n, tuple):
            out.append(" or ".join(f"`{a}`" for a in n))
        else:
            out.append(f"`{n}`")
    return out


def word_in(name: str, text: str) -> bool:
    """Whether ``name`` occurs in ``text`` as a word (``ids`` does not match ``ids_keep``)."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text) is not None


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg.replace("|", "/")
    if len(msg) > 110:
        msg = msg[:107] + "..."
    return f"{type(e).__name__}: {msg}"


def summarize(result: Any) -> str:
    if isinstance(result, Tensor):
        return f"tensor {tuple(result.shape)} {result.dtype}"
    if isinstance(result, tuple):
        return type(result).__name__ + "(" + ", ".join(summarize(r) for r in result) + ")"
    return type(result).__name__


def tensors_of(result: Any) -> list[Tensor]:
    """Every tensor in a (nested) result: tensors, tuples/NamedTuples, lists, dicts."""
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in tensors_of(r)]
    if isinstance(result, Mapping):
        return [t for r in result.values() for t in tensors_of(r)]
    return []


def all_finite(result: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors_of(result) if t.is_floating_point())


def judge_error(e: BaseException, expect: Raises) -> tuple[bool, str]:
    """Whether ``e`` meets the standard for ``expect``, and why not."""
    if not isinstance(e, STANDARD):
        return False, "not a ValueError/TypeError"
    text = str(e)
    for n in expect.names:
        alts = n if isinstance(n, tuple) else (n,)
        if not any(word_in(a, text) for a in alts):
            return False, f"message does not name {' or '.join(alts)}"
    for s in expect.shows:
        if s not in text:
            return False, f"message does not show the value {s!r}"
    return True, ""


def run_case(rec: Recorder, case: Case) -> None:
    """Run ``case``, record the observed outcome, and assert it is the expected one."""
    expect = case.expect
    try:
        result = case.fn()
    except AssertionError:
        raise
    except Exception as e:
        if isinstance(expect, Raises):
            ok, why = judge_error(e, expect)
            rec.check(
                case.api,
                case.tried,
                ok,
                f"{type(e).__name__} naming " + ", ".join(_fmt_names(expect.names)),
                f"{_short(e)} ({why}; expected {expect.describe()})",
            )
        elif isinstance(expect, KernelError):
            ok = isinstance(e, KERNEL)
            rec.check(
                case.api,
                case.tried,
                ok,
                f"documented: {expect.note}; CPU kernel raises {type(e).__name__}",
                f"{_short(e)} (expected the kernel's RuntimeError/IndexError)",
            )
        else:
            rec.check(case.api, case.tried, False, "", f"{_short(e)} (expected: {expect.note})")
        return
    if isinstance(expect, Raises):
        rec.check(
            case.api,
            case.tried,
            False,
            "",
            f"returned {summarize(result)} silently (expected {expect.describe()})",
        )
    elif isinstance(expect, KernelError):
        rec.check(
            case.api,
            case.tried,
            False,
            "",
            f"returned {summarize(result)} silently (expected an error: {expect.note})",
        )
    else:
        if expect.finite and not all_finite(result):
            rec.check(case.api, case.tried, False, "", f"non-finite output ({expect.note})")
        if expect.check is not None:
            try:
                expect.check(result)
            except AssertionError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else "check failed"
                rec.check(case.api, case.tried, False, "", f"{expect.note}: {first}"[:200])
        rec.check(case.api, case.tried, True, expect.note)


# --------------------------------------------------------------------------- tensors
def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.rand(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def pad_mask(lengths: list[int], n: int) -> Tensor:
    """bool ``[b, n]``, True = padding (slot >= length)."""
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def nc(t: Tensor) -> Tensor:
    """A non-contiguous tensor with the values of ``t`` (stride 2 on the last axis)."""
    out = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    assert t.numel() <= 1 or not out.is_contiguous()
    return out


def close(a: Any, b: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every tensor of ``a`` equals the matching tensor of ``b`` (NaN == NaN)."""
    ta, tb = tensors_of(a), tensors_of(b)
    assert len(ta) == len(tb), f"{len(ta)} tensors vs {len(tb)}"
    for x, y in zip(ta, tb):
        assert x.shape == y.shape, f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        assert x.dtype == y.dtype, f"dtype {x.dtype} vs {y.dtype}"
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True)
        else:
            assert torch.equal(x, y), "integer/bool outputs differ"


def same_as(ref: Callable[[], Any], **tol: float) -> Callable[[Any], None]:
    """Check: the result equals ``ref()`` (e.g. the contiguous-input result)."""

    def check(result: Any) -> None:
        close(result, ref(), **tol)

    return check


def shape_is(*shape: int) -> Callable[[Any], None]:
    def check(result: Any) -> None:
        t = tensors_of(result)[0]
        assert tuple(t.shape) == shape, f"shape {tuple(t.shape)} != {shape}"

    return check


def nan_in_sample_only(
    sample: int, *, pick: Callable[[Any], Tensor] = lambda r: r
) -> Callable[[Any], None]:
    """Check: NaN reached sample ``sample`` of the output (propagated, not hidden) and no
    other sample (no cross-sample spread)."""

    def check(result: Any) -> None:
        out = pick(result)
        for i in range(out.shape[0]):
            has_nan = bool(torch.isnan(out[i]).any())
            if i == sample:
                assert has_nan, f"NaN in sample {i}'s input was hidden (output finite)"
            else:
                assert bool(torch.isfinite(out[i]).all()), f"NaN spread to sample {i}"

    return check


def grad_report(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Names of parameters with no gradient, and with a non-finite gradient."""
    none, bad = [], []
    for name, p in model.named_parameters():
        if p.grad is None:
            none.append(name)
        elif not bool(torch.isfinite(p.grad).all()):
            bad.append(name)
    return none, bad


# --------------------------------------------------------------------------- tiny models
RASTERS = ("precipitation", "soil_moisture", "temperature")
SERIES = ("evaporation", "river_flow")
MODALITIES = RASTERS + SERIES
WATER_TINY: dict[str, Any] = dict(
    num_steps=2,
    image_size=(20, 20),
    num_land_patches=3,
    num_sites=8,
    group_size=4,
    embed_dim=16,
    num_heads=2,
    decoder_dim=8,
    decoder_num_heads=2,
    decoder_depth=1,
    raster_depth=1,
    series_depth=1,
)
WATER_VARIANTS: dict[str, dict[str, Any]] = {
    "cross": {},
    "cross_selfattn_wfm_input": dict(
        decoder_self_attn=True, use_weighted_fm=True, use_input=True, fusion_depth=2
    ),
    "mae": dict(use_cross_attn=False),
}
WATER_STEPS, WATER_SITES, WATER_ATTRS = 2, 8, 11
WATER_LAND = 3  # valid patches per step -> 6 raster tokens
WATER_SERIES_PATCHES = 2  # 8 sites / 4 per patch -> 4 series tokens


def build_water(seed: int = 0, **overrides: Any) -> cm.MultimodalMAE:
    torch.manual_seed(seed)
    return water_mae_small(**{**WATER_TINY, **overrides}).eval()


def water_inputs(b: int = 2, *, seed: int = 0, steps: int = WATER_STEPS) -> dict[str, Tensor]:
    g = gen(seed)
    x = {m: torch.randn(b, steps, 20, 20, generator=g) for m in RASTERS}
    x.update({m: torch.randn(b, WATER_SITES, steps, generator=g) for m in SERIES})
    return x


def water_static(b: int = 2, *, seed: int = 1) -> Tensor:
    return randn(b, WATER_SITES, WATER_ATTRS, seed=seed)


# Image presets at a tiny size: each keeps its preset's head counts (head dim 4 / 2),
# MLP ratio, qkv bias and norm eps; 16x16 images, 4x4 patches (16 patches), 2 + 2 blocks.
IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    "crossmae_vit_small": dict(
        embed_dim=24, num_heads=6, decoder_embed_dim=16, decoder_num_heads=8
    ),
    "crossmae_vit_base": dict(
        embed_dim=48, num_heads=12, decoder_embed_dim=32, decoder_num_heads=16
    ),
    "crossmae_vit_large": dict(
        embed_dim=64, num_heads=16, decoder_embed_dim=32, decoder_num_heads=16
    ),
}
IMAGE_TINY: dict[str, Any] = dict(img_size=16, patch_size=4, depth=2, decoder_depth=2)
IMAGE_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "self_attn_input": dict(decoder_self_attn=True, use_input=True, fm_layers=(0, -1)),
    "no_wfm": dict(use_weighted_fm=False),
    "mae_decoder_wfm": dict(use_cross_attn=False),
    "mae_decoder": dict(use_cross_attn=False, use_weighted_fm=False),
}
IMAGE_GRID = (4, 4)
IMAGE_PATCHES = 16


def build_image(
    preset: str = "crossmae_vit_small", seed: int = 0, **overrides: Any
) -> cm.ImageCrossMAE:
    torch.manual_seed(seed)
    factory = getattr(cm, preset)
    return factory(**{**IMAGE_TINY, **IMAGE_PRESETS[preset], **overrides}).eval()


@functools.cache
def shared_image() -> cm.ImageCrossMAE:
    """A cached tiny image model (do not modify it in tests)."""
    return build_image()


@functools.cache
def shared_water() -> cm.MultimodalMAE:
    """A cached tiny water model (do not modify it in tests)."""
    return build_water()


def images(b: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return randn(b, 3, 16, 16, seed=seed, dtype=dtype)
