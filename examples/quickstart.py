"""crossmae in one page: a CrossMAE encoder/decoder over a padded, variable-length batch.

Four samples with 37, 20, 5 and 0 real tokens (the last one is "river flow missing"),
random 75% masking with partial (25%) reconstruction, a Transformer encoder over the visible
tokens and a CrossAttention decoder whose queries are only the tokens to reconstruct.
Then the padded slots are filled with NaN and the run is repeated: the loss must not move.
"""

from __future__ import annotations

import torch

import crossmae as cm
from crossmae.decoders import CrossMAEDecoder
from crossmae.encoders import TransformerEncoder


def main() -> None:
    torch.manual_seed(0)
    lengths = torch.tensor([37, 20, 5, 0])
    b, n, width, dim = len(lengths), 40, 12, 64
    padding_mask = cm.lengths_to_padding_mask(lengths, n)  # True = padding slot
    x = torch.randn(b, n, width)
    pos = cm.sincos_pos_embed_1d(dim, n)  # [n, dim]

    split = cm.random_masking(
        b,
        n,
        0.75,
        predict_ratio=0.25,
        padding_mask=padding_mask,
        generator=torch.Generator().manual_seed(0),
    )
    embed = torch.nn.Linear(width, dim)
    encoder = TransformerEncoder(dim, depth=2, num_heads=4, final_norm=False)
    decoder = CrossMAEDecoder(
        dim, 48, depth=2, num_heads=4, out_dim=width, num_feature_maps=3, pos_embed=pos[:, :48]
    )

    def loss_of(inputs: torch.Tensor) -> torch.Tensor:
        tokens = embed(inputs) + pos
        visible, keep_pad = split.visible_tokens(tokens)
        enc = encoder(visible, keep_pad, return_layers="all", include_input=True)
        pred = decoder(
            enc.features,
            split.ids_predict,
            context_padding_mask=keep_pad,
            query_padding_mask=split.predict_padding_mask,
        )
        target, pred_pad = split.predict_tokens(inputs)
        err = ((pred - target) ** 2).mean(-1).masked_fill(pred_pad, 0.0)
        per_sample = err.sum(1) / (~pred_pad).sum(1).clamp(min=1)
        has_targets = (~pred_pad).any(1)
        return per_sample.sum() / has_targets.sum().clamp(min=1)

    print("real tokens per sample:     ", lengths.tolist())
    print(
        "visible tokens per sample:  ",
        split.num_keep.tolist(),
        "-> ids_keep",
        tuple(split.ids_keep.shape),
    )
    print(
        "predicted tokens per sample:",
        split.num_predict.tolist(),
        "-> ids_predict",
        tuple(split.ids_predict.shape),
    )
    loss = loss_of(x)
    loss.backward()
    grads_finite = all(p.grad is not None and p.grad.isfinite().all() for p in decoder.parameters())
    print(f"loss: {loss.item():.4f}   all decoder gradients finite: {grads_finite}")

    poisoned = x.masked_fill(padding_mask[..., None], float("nan"))
    with torch.no_grad():
        same = torch.equal(loss_of(poisoned), loss.detach())
    print("loss unchanged with NaN written into every padded slot:", same)
    if not (same and grads_finite and torch.isfinite(loss)):
        raise SystemExit("padding leaked into the result")


if __name__ == "__main__":
    main()
