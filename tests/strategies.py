"""Hypothesis strategies and seeded tensor helpers shared by the test suite.

Tensors are never drawn element-wise by hypothesis: a strategy draws small
integers (shapes, lengths, a seed) and the tensors are built from the seed
with a :class:`torch.Generator`, so failures shrink to small shapes and stay
reproducible.

Legend: ``B`` batch, ``N`` tokens (padded length), ``Nq`` queries, ``Nk`` keys,
``h`` heads, ``d`` head dim, ``D`` width.

Polarity: every ``*padding_mask`` here is bool ``[B, N]`` with True = padding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from hypothesis import strategies as st

from crossmae.masking import MaskSplit, mask_split_from_masks, random_masking
from crossmae.models import ImageCrossMAE, MultimodalMAE

__all__ = [
    "CORRUPTED_FIELD",
    "SPLIT_CORRUPTIONS",
    "CrossBatch",
    "PaddedBatch",
    "SplitSpec",
    "assert_close_or_equal",
    "corrupt_split",
    "cross_batches",
    "generator",
    "lengths_to_mask",
    "padded_batches",
    "poison_padding",
    "rand",
    "randn",
    "reference_attention",
    "seeds",
    "shuffled_mask",
    "split_specs",
    "tiny_water_batch",
    "tiny_water_model",
]

GARBAGE_KINDS = ("random", "nan", "inf", "mixed")


def seeds() -> st.SearchStrategy[int]:
    """Seeds for :class:`torch.Generator`."""
    return st.integers(min_value=0, max_value=2**31 - 1)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(int(seed) % (2**63))
    return g


def _gen(seed: Union[int, torch.Generator]) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else generator(seed)


def randn(
    seed: Union[int, torch.Generator], *shape: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal tensor of ``shape`` built from a seed (or a generator)."""
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def rand(
    seed: Union[int, torch.Generator], *shape: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform ``[0, 1)`` tensor of ``shape`` built from a seed (or a generator)."""
    return torch.rand(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def lengths_to_mask(lengths: Sequence[int], max_len: int) -> torch.Tensor:
    """Independent reference: bool ``[B, max_len]``, True = padding (slot >= length)."""
    ar = torch.arange(max_len)
    return ar[None, :] >= torch.tensor(list(lengths), dtype=torch.long).reshape(-1, 1)


def shuffled_mask(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Permute each row of a bool ``[B, N]`` mask independently (keeps per-row counts)."""
    b, n = mask.shape
    if n == 0:
        return mask.clone()
    g = generator(seed)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    return torch.gather(mask, 1, perm)


def poison_padding(
    x: torch.Tensor,
    padding_mask: torch.Tensor,
    seed: int,
    *,
    kind: str = "mixed",
) -> torch.Tensor:
    """Return a copy of ``x [B, N, ...]`` whose padded slots hold garbage.

    Args:
        x: tokens ``[B, N, ...]``.
        padding_mask: bool ``[B, N]``, True = padding slot (the slots overwritten).
        seed: seed for the garbage values.
        kind: ``"random"`` (large random values), ``"nan"``, ``"inf"`` or
            ``"mixed"`` (random values with NaN, +inf and -inf sprinkled in).

    Returns:
        A new tensor equal to ``x`` at real slots.
    """
    g = generator(seed)
    garbage = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) * 1e3
    if kind == "nan":
        garbage = torch.full_like(x, float("nan"))
    elif kind == "inf":
        garbage = torch.full_like(x, float("inf"))
    elif kind == "mixed":
        sel = torch.randint(0, 4, x.shape, generator=g)
        garbage = torch.where(sel == 1, torch.full_like(x, float("nan")), garbage)
        garbage = torch.where(sel == 2, torch.full_like(x, float("inf")), garbage)
        garbage = torch.where(sel == 3, torch.full_like(x, float("-inf")), garbage)
    elif kind != "random":
        raise ValueError(f"unknown kind {kind!r}")
    m = padding_mask.reshape(tuple(padding_mask.shape) + (1,) * (x.dim() - padding_mask.dim()))
    return torch.where(m, garbage, x)


def assert_close_or_equal(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    exact: bool,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> None:
    """Bitwise equality when ``exact`` else ``torch.testing.assert_close``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if exact:
        same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
        if not bool(same.all()):
            diff = (actual - expected).abs().max()
            raise AssertionError(f"tensors differ bitwise (max abs diff {diff})")
    else:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Independent float64 multi-head attention.

    Args:
        q: ``[B, h, Nq, d]``.
        k: ``[B, h, Nk, d]``.
        v: ``[B, h, Nk, d]``.
        key_padding_mask: bool ``[B, Nk]``, True = padding (ignored key).

    Returns:
        ``[B, h, Nq, d]`` float64; a query row with zero real keys gives zeros.
    """
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5
    b, nk = k.shape[0], k.shape[2]
    valid = torch.ones(b, nk, dtype=torch.bool)
    if key_padding_mask is not None:
        valid = ~key_padding_mask
    valid4 = valid[:, None, None, :]
    v = torch.where(valid[:, None, :, None], v, torch.zeros_like(v))
    s = (q @ k.transpose(-2, -1)) * scale
    s = torch.where(valid4, s, torch.full_like(s, -math.inf))
    smax = (
        s.amax(dim=-1, keepdim=True) if nk > 0 else torch.zeros((*s.shape[:-1], 1), dtype=s.dtype)
    )
    smax = torch.where(torch.isfinite(smax), smax, torch.zeros_like(smax))
    e = torch.exp(s - smax) * valid4
    denom = e.sum(dim=-1, keepdim=True)
    w = torch.where(denom > 0, e / torch.where(denom > 0, denom, torch.ones_like(denom)), e)
    return w @ v


@dataclass(frozen=True)
class PaddedBatch:
    """A drawn padded batch description.

    Attributes:
        batch: ``B``.
        max_len: ``N`` (padded length, may be 0).
        lengths: per-sample real lengths, each in ``0..N``.
        num_heads: ``h``.
        head_dim: ``d`` (even).
        seed: seed for the tensor values.
        shuffle_padding: if True the padded slots are scattered over the
            sequence (same per-sample counts) instead of trailing.
    """

    batch: int
    max_len: int
    lengths: tuple[int, ...]
    num_heads: int
    head_dim: int
    seed: int
    shuffle_padding: bool = False

    @property
    def dim(self) -> int:
        """Model width ``h * d``."""
        return self.num_heads * self.head_dim

    @property
    def padding_mask(self) -> torch.Tensor:
        """bool ``[B, N]``, True = padding."""
        m = lengths_to_mask(self.lengths, self.max_len)
        return shuffled_mask(m, self.seed + 7) if self.shuffle_padding else m

    def tokens(self, dim: Optional[int] = None, *, offset: int = 0) -> torch.Tensor:
        """Seeded float32 tokens ``[B, N, dim]`` (``dim`` defaults to ``h * d``)."""
        return randn(self.seed + offset, self.batch, self.max_len, dim or self.dim)


def _draw_lengths(draw: st.DrawFn, b: int, n: int, allow_empty_rows: bool) -> list[int]:
    low = 0 if allow_empty_rows else min(1, n)
    return draw(st.lists(st.integers(low, n), min_size=b, max_size=b))


@st.composite
def padded_batches(
    draw: st.DrawFn,
    *,
    min_batch: int = 1,
    max_batch: int = 6,
    min_len: int = 0,
    max_len: int = 40,
    heads: Sequence[int] = (1, 2, 4),
    head_dims: Sequence[int] = (2, 4, 8),
    allow_empty_rows: bool = True,
    force_padding: bool = False,
    shuffle_padding: Optional[bool] = None,
) -> PaddedBatch:
    """Draw a :class:`PaddedBatch`.

    Args:
        min_batch: smallest ``B``.
        max_batch: largest ``B``.
        min_len: smallest padded length ``N``.
        max_len: largest padded length ``N``.
        heads: candidate head counts.
        head_dims: candidate head dims.
        allow_empty_rows: whether a sample may have 0 real tokens.
        force_padding: if True, at least one slot of the batch is padding
            (forces ``N >= 1``).
        shuffle_padding: scatter padded slots (True), keep them trailing
            (False) or draw it (None).
    """
    b = draw(st.integers(min_batch, max_batch))
    lo = max(min_len, 1) if force_padding else min_len
    n = draw(st.integers(lo, max(lo, max_len)))
    lengths = _draw_lengths(draw, b, n, allow_empty_rows)
    if force_padding and all(length == n for length in lengths):
        i = draw(st.integers(0, b - 1))
        lengths[i] = draw(st.integers(0, n - 1))
    h = draw(st.sampled_from(list(heads)))
    d = draw(st.sampled_from(list(head_dims)))
    seed = draw(seeds())
    shuffle = draw(st.booleans()) if shuffle_padding is None else shuffle_padding
    return PaddedBatch(b, n, tuple(lengths), h, d, seed, shuffle)


@dataclass(frozen=True)
class CrossBatch:
    """Queries and a padded context for cross-attention tests.

    Attributes:
        batch: ``B``.
        num_queries: ``Nq`` (may be 0).
        num_keys: ``Nk`` (may be 0).
        query_lengths: real queries per sample.
        key_lengths: real keys per sample (0 allowed).
        num_heads: ``h``.
        head_dim: ``d``.
        context_dim: width of the context (may differ from ``h * d``).
        seed: seed for the values.
        shuffle_padding: scatter padded slots instead of trailing.
    """

    batch: int
    num_queries: int
    num_keys: int
    query_lengths: tuple[int, ...]
    key_lengths: tuple[int, ...]
    num_heads: int
    head_dim: int
    context_dim: int
    seed: int
    shuffle_padding: bool = False

    @property
    def dim(self) -> int:
        """Query width ``h * d``."""
        return self.num_heads * self.head_dim

    @property
    def query_padding_mask(self) -> torch.Tensor:
        """bool ``[B, Nq]``, True = padded query."""
        m = lengths_to_mask(self.query_lengths, self.num_queries)
        return shuffled_mask(m, self.seed + 11) if self.shuffle_padding else m

    @property
    def context_padding_mask(self) -> torch.Tensor:
        """bool ``[B, Nk]``, True = padded key."""
        m = lengths_to_mask(self.key_lengths, self.num_keys)
        return shuffled_mask(m, self.seed + 13) if self.shuffle_padding else m

    def queries(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Seeded queries ``[B, Nq, h * d]``."""
        return randn(self.seed, self.batch, self.num_queries, self.dim, dtype=dtype)

    def context(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Seeded context ``[B, Nk, context_dim]``."""
        return randn(self.seed + 1, self.batch, self.num_keys, self.context_dim, dtype=dtype)


@st.composite
def cross_batches(
    draw: st.DrawFn,
    *,
    max_batch: int = 6,
    max_queries: int = 12,
    max_keys: int = 40,
    min_keys: int = 0,
    heads: Sequence[int] = (1, 2, 4),
    head_dims: Sequence[int] = (2, 4, 8),
    context_dims: Sequence[int] = (3, 8, 16),
    force_key_padding: bool = False,
    shuffle_padding: Optional[bool] = None,
) -> CrossBatch:
    """Draw a :class:`CrossBatch` (context width is ``h * d`` or from ``context_dims``)."""
    b = draw(st.integers(1, max_batch))
    nq = draw(st.integers(0, max_queries))
    lo = max(min_keys, 1) if force_key_padding else min_keys
    nk = draw(st.integers(lo, max(lo, max_keys)))
    qlen = _draw_lengths(draw, b, nq, True)
    klen = _draw_lengths(draw, b, nk, True)
    if force_key_padding and all(length == nk for length in klen):
        i = draw(st.integers(0, b - 1))
        klen[i] = draw(st.integers(0, nk - 1))
    h = draw(st.sampled_from(list(heads)))
    d = draw(st.sampled_from(list(head_dims)))
    cdim = draw(st.one_of(st.just(h * d), st.sampled_from(list(context_dims))))
    seed = draw(seeds())
    shuffle = draw(st.booleans()) if shuffle_padding is None else shuffle_padding
    return CrossBatch(b, nq, nk, tuple(qlen), tuple(klen), h, d, cdim, seed, shuffle)


def tiny_water_model() -> MultimodalMAE:
    """`water_mae_small` at a CPU-test size: T=3, 40x30 rasters of 6 land patches, 12 sites
    in groups of 4, one block per stack (eval mode)."""
    from crossmae.models.water import water_mae_small

    return water_mae_small(
        num_steps=3,
        image_size=(40, 30),
        num_land_patches=6,
        num_sites=12,
        group_size=4,
        embed_dim=32,
        num_heads=4,
        decoder_dim=16,
        decoder_num_heads=4,
        decoder_depth=1,
        raster_depth=1,
        series_depth=1,
    ).eval()


def tiny_water_batch(
    names: Sequence[str], g: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs for `tiny_water_model` (``names`` in its order) and static attributes, batch 2;
    sample 0 has no river flow at all."""
    inputs = {n: torch.randn(2, 3, 40, 30, generator=g) for n in names[:3]}
    inputs["evaporation"] = torch.randn(2, 12, 3, generator=g)
    flow = torch.randn(2, 12, 3, generator=g)
    flow[0] = float("nan")
    inputs["river_flow"] = flow
    return inputs, torch.randn(2, 12, 11, generator=g)


# --------------------------------------------------------------------------- mask splits
SPLIT_CORRUPTIONS = (
    "repeat_keep",
    "repeat_predict",
    "overlap",
    "keep_out_of_range",
    "predict_negative",
    "visible_mask_disagrees",
    "predict_mask_disagrees",
)
"""Ways to make a `MaskSplit` self-contradictory, and the field each one is named by."""
CORRUPTED_FIELD = {
    "repeat_keep": "ids_keep",
    "repeat_predict": "ids_predict",
    "overlap": "predict_mask",
    "keep_out_of_range": "ids_keep",
    "predict_negative": "ids_predict",
    "visible_mask_disagrees": "visible_mask",
    "predict_mask_disagrees": "predict_mask",
}


@dataclass(frozen=True)
class SplitSpec:
    """How to build a split over ``n`` tokens: ``dense`` (`random_masking`, no padding) or
    padded (per-sample random masks of different sizes, `mask_split_from_masks`; a sample
    may keep or predict nothing). Built from ``seed``."""

    seed: int
    dense: bool
    mask_ratio: float

    def build(self, b: int, n: int) -> MaskSplit:
        g = generator(self.seed)
        if self.dense:
            return random_masking(
                b, n, self.mask_ratio, predict_ratio=self.mask_ratio / 2, generator=g
            )
        role = torch.randint(0, 3, (b, n), generator=g)  # 0 visible, 1 predicted, 2 skipped
        role[0] = torch.where(role[0] == 0, 2, role[0])  # sample 0 sees nothing
        if b > 1:  # the last sample keeps and predicts at least two tokens each
            role[-1, :2], role[-1, 2:4] = 0, 1
        return mask_split_from_masks(role == 0, role == 1)


@st.composite
def split_specs(draw: st.DrawFn) -> SplitSpec:
    return SplitSpec(draw(seeds()), draw(st.booleans()), draw(st.sampled_from([0.5, 0.75])))


def corrupt_split(split: MaskSplit, kind: str) -> MaskSplit:
    """A copy of ``split`` broken in the way ``kind`` (one of `SPLIT_CORRUPTIONS`) names.

    ``split`` needs a sample with two real kept and two real predicted slots (sample -1).
    """
    s = MaskSplit(*(t.clone() for t in split))
    n = s.visible_mask.shape[1]
    if kind == "repeat_keep":
        s.ids_keep[-1, 1] = s.ids_keep[-1, 0]
    elif kind == "repeat_predict":
        s.ids_predict[-1, 1] = s.ids_predict[-1, 0]
    elif kind == "overlap":  # a visible token also predicted (in ids and masks alike)
        s.ids_predict[-1, 0] = s.ids_keep[-1, 0]
        s.predict_mask[-1] = False
        s.predict_mask[-1, s.ids_predict[-1][~s.predict_padding_mask[-1]]] = True
    elif kind == "keep_out_of_range":
        s.ids_keep[-1, 0] = n
    elif kind == "predict_negative":
        s.ids_predict[-1, 0] = -1
    elif kind == "visible_mask_disagrees":
        s.visible_mask[-1, s.ids_keep[-1, 0]] = False
    elif kind == "predict_mask_disagrees":
        s.predict_mask[-1, s.ids_predict[-1, 0]] = False
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return s


@functools.cache
def tiny_image_model(
    embed_dim: int, num_heads: int, decoder_embed_dim: int, decoder_num_heads: int
) -> ImageCrossMAE:
    """A one-block `crossmae_vit_small` over 16x16 images of 4x4 patches (eval mode, seed 0),
    built once per width (callers must not train it)."""
    import crossmae as cm

    torch.manual_seed(0)
    return cm.models.crossmae_vit_small(
        img_size=16,
        patch_size=4,
        depth=1,
        decoder_depth=1,
        embed_dim=embed_dim,
        num_heads=num_heads,
        decoder_embed_dim=decoder_embed_dim,
        decoder_num_heads=decoder_num_heads,
    ).eval()
