"""`layout_to_tokens`: the mapping from a tokenizer's input layout to its token order.

Legend: ``b`` batch, ``t`` steps, ``gh x gw`` patch grid, ``Lv`` valid patches, ``P`` site
patches.
"""

from __future__ import annotations

import pytest
import torch

from crossmae.tokenizers import RasterTokenizer, SeriesTokenizer


def test_raster_layout_follows_token_positions() -> None:
    valid = torch.tensor([True, False, True, True, False, True])  # 2x3 grid, 4 valid
    tok = RasterTokenizer(8, 2, (4, 6), valid_patch_mask=valid)
    t_index, patch_index = tok.token_positions(3)
    # a tensor whose entry (t, patch) is its own label
    labels = torch.arange(3 * 6).reshape(1, 3, 6)
    mapped = tok.layout_to_tokens(labels)
    assert mapped.shape == (1, 3 * 4)
    assert torch.equal(mapped[0], t_index * 6 + patch_index)
    grid = tok.layout_to_tokens(labels.reshape(1, 3, 2, 3))
    assert torch.equal(grid, mapped)
    with pytest.raises(ValueError, match="values"):
        tok.layout_to_tokens(labels[:, :, :5])


def test_series_layout_is_patch_major_to_time_major() -> None:
    tok = SeriesTokenizer(8, 10, group_size=4)  # 3 patches
    t_index, patch_index = tok.token_positions(2)
    labels = torch.arange(3 * 2).reshape(1, 3, 2)  # [b, P, t]: label = p * t + step
    mapped = tok.layout_to_tokens(labels)
    assert torch.equal(mapped[0], patch_index * 2 + t_index)
    with pytest.raises(ValueError, match="values"):
        tok.layout_to_tokens(labels[:, :2])
