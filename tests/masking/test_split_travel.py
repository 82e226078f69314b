"""A `MaskSplit` travels like a batch: ``.to(non_blocking=)``, ``pin_memory()``,
`torch.utils.data.default_collate`, `MaskSplit.collate` for ragged widths, DataLoader workers.

Legend: ``b`` batch, ``n`` tokens, ``k`` kept slots, ``p`` predicted slots.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from crossmae.masking import MaskSplit, random_masking

N = 8


def sample_split(i: int) -> MaskSplit:
    """One sample's split (fields without the batch dimension); sample ``i`` has ``N - i % 3``
    real tokens, so widths differ between samples."""
    real = N - i % 3
    pad = (torch.arange(N) >= real)[None]
    g = torch.Generator().manual_seed(i)
    split = random_masking(1, N, 0.5, padding_mask=pad, generator=g)
    return MaskSplit(*(t[0] for t in split))


class Masks(Dataset[dict[str, object]]):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"x": torch.full((N,), float(i)), "split": sample_split(i)}


def collate(items: list[dict[str, object]]) -> dict[str, object]:
    splits = [it["split"] for it in items]
    xs = default_collate([it["x"] for it in items])
    return {"x": xs, "split": MaskSplit.collate(splits)}  # type: ignore[arg-type]


def test_to_keeps_the_type_and_checks_non_blocking() -> None:
    split = random_masking(2, N, 0.5, generator=torch.Generator().manual_seed(0))
    moved = split.to("cpu", non_blocking=True)
    assert isinstance(moved, MaskSplit)
    assert all(torch.equal(a, b) for a, b in zip(split, moved))
    with pytest.raises(TypeError, match="non_blocking"):
        split.to("cpu", non_blocking="yes")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_then_async_copy() -> None:
    split = random_masking(2, N, 0.5, generator=torch.Generator().manual_seed(0))
    pinned = split.pin_memory()
    assert isinstance(pinned, MaskSplit) and all(t.is_pinned() for t in pinned)
    on_gpu = pinned.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(split, on_gpu))


def test_default_collate_stacks_equal_width_samples() -> None:
    one = [sample_split(i) for i in (0, 3)]  # both have N real tokens: equal widths
    batch = default_collate(one)
    assert isinstance(batch, MaskSplit)
    assert batch.ids_keep.shape == (2, N // 2) and batch.visible_mask.shape == (2, N)


def test_collate_repads_ragged_samples() -> None:
    parts = [sample_split(i) for i in range(3)]
    batch = MaskSplit.collate(parts)
    assert batch.visible_mask.shape == (3, N)
    for i, sp in enumerate(parts):
        k, p = sp.ids_keep.shape[0], sp.ids_predict.shape[0]
        assert torch.equal(batch.ids_keep[i, :k], sp.ids_keep)
        assert torch.equal(batch.keep_padding_mask[i, :k], sp.keep_padding_mask)
        assert batch.keep_padding_mask[i, k:].all() and (batch.ids_keep[i, k:] == 0).all()
        assert torch.equal(batch.ids_predict[i, :p], sp.ids_predict)
        assert batch.predict_padding_mask[i, p:].all()
    # batched splits join too, and mixing token counts is refused
    twice = MaskSplit.collate([batch, batch])
    assert twice.ids_keep.shape[0] == 6
    other = random_masking(1, N + 1, 0.5)
    with pytest.raises(ValueError, match="tokens"):
        MaskSplit.collate([batch, other])
    with pytest.raises(TypeError, match="splits"):
        MaskSplit.collate(batch)


def test_dataloader_workers_carry_splits() -> None:
    loader = DataLoader(Masks(), batch_size=3, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    for j, b in enumerate(batches):
        split = b["split"]
        assert isinstance(split, MaskSplit)
        expect = MaskSplit.collate([sample_split(i) for i in range(3 * j, 3 * j + 3)])
        assert all(torch.equal(u, v) for u, v in zip(split, expect))
