"""Whole models under ``torch.compile(fullgraph=True)``, and static shapes for CUDA graphs.

Masking draws its split in data preparation (it may size outputs from the data); given a
split, every forward below must trace as one graph. The packed layout must keep one graph
for every length pattern of the same capacity: that is what makes CUDA-graph capture of a
variable-length step possible.
"""

from __future__ import annotations

import torch

import crossmae as cm
from crossmae.encoders import TransformerEncoder
from tests.strategies import tiny_water_batch, tiny_water_model


def test_multimodal_model_compiles_as_one_graph_given_splits() -> None:
    torch.manual_seed(0)
    model = tiny_water_model()
    x, static = tiny_water_batch(model.names, torch.Generator().manual_seed(1))
    pads = {k: p for k, (_, p) in model.tokenize(x).items()}
    splits = model.make_splits(pads, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x, static=static, splits=splits)
        out = torch.compile(model, fullgraph=True, backend="eager")(x, static=static, splits=splits)
    torch.testing.assert_close(out.loss, ref.loss)
    for name in model.names:
        torch.testing.assert_close(out.preds[name], ref.preds[name])


def test_packed_encoder_keeps_one_graph_for_any_lengths() -> None:
    graphs = []

    def counting_backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    enc = TransformerEncoder(16, 2, 2).eval()
    step = torch.compile(
        enc.forward_packed, fullgraph=True, dynamic=False, backend=counting_backend
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, 16, generator=g)
    with torch.no_grad():
        for lengths in ([10, 3, 0, 7], [1, 1, 1, 1], [0, 0, 0, 0], [10, 10, 10, 2]):
            pad = cm.lengths_to_padding_mask(torch.tensor(lengths), 10)
            packed = cm.pack_tokens(x, pad, 32)  # the bucket: same shapes for every batch
            out = step(packed)
            ref = enc(x, pad).tokens
            got = cm.unpack_tokens(out.tokens, packed, 4)
            torch.testing.assert_close(got[~pad], ref[~pad], atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1, f"recompiled {len(graphs)} times for different lengths"
