"""Your own masked autoencoder from crossmae parts, over a made-up variable-length modality.

The modality: recordings of a vibrating machine of different durations. Each recording is a
sum of two sinusoids plus noise, cut into tokens of 4 consecutive readings; a batch holds
recordings of 0 to 48 tokens (a recording of length 0 is a sensor that was off), padded to
48 and flagged with `crossmae.lengths_to_padding_mask` (True = padding).

`SignalMAE` is eleven library calls: a `TransformerEncoder` over the visible tokens that
also returns every layer's output, a `CrossMAEDecoder` whose queries are only the tokens to
reconstruct and whose layers each attend to their own learned mix of those outputs,
`random_masking` (per-sample counts from the real lengths), `MaskSplit.visible_tokens` /
`MaskSplit.predict_tokens` to gather, and `masked_mse_loss` (padding is never scored, an
empty recording never makes a NaN).

It exits with status 1 unless every loss is finite and the loss halved (see `MAX_RATIO`).

Run (in a clone)::

    python examples/custom_encoder.py            # 300 steps, ~15 s on a CPU
    python examples/custom_encoder.py --quick    # CI size, a weaker claim
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

import crossmae as cm

N, VALUES, DIM, DEC_DIM = 48, 4, 64, 32  # max tokens, readings per token, widths
# The claim: every loss finite, and the mean loss of the last 20 steps at most MAX_RATIO x
# that of the first 20 (predicting 0 everywhere scores about 1.0 on these signals). The
# --quick run checks that it fell at all (last 5 of 20 steps below the first 5).
MAX_RATIO, QUICK_MAX_RATIO = 0.5, 1.0


class SignalMAE(nn.Module):
    pos: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(VALUES, DIM)
        self.register_buffer("pos", cm.sincos_pos_embed_1d(DIM, N), persistent=False)
        self.encoder = cm.TransformerEncoder(DIM, depth=3, num_heads=4, final_norm=False)
        self.decoder = cm.CrossMAEDecoder(
            DIM, DEC_DIM, depth=2, num_heads=4, out_dim=VALUES, num_feature_maps=4,
            pos_embed=cm.sincos_pos_embed_1d(DEC_DIM, N),
        )  # fmt: skip

    def forward(self, x: Tensor, lengths: Tensor, generator: torch.Generator) -> Tensor:
        padding_mask = cm.lengths_to_padding_mask(lengths, N)  # True = padding
        split = cm.random_masking(
            len(x), N, 0.75, predict_ratio=0.5, padding_mask=padding_mask, generator=generator
        )
        # Gather *before* embedding: padded readings (NaN here) never enter a matmul, where
        # a zero gradient times NaN would still poison the weight gradient.
        visible, keep_pad = split.visible_tokens(x)
        visible = self.embed(visible) + self.pos[split.ids_keep]
        enc = self.encoder(visible, keep_pad, return_layers="all", include_input=True)
        pred = self.decoder(  # every layer's output (and the input) feed the decoder's mixes
            enc.features, split.ids_predict,
            context_padding_mask=keep_pad, query_padding_mask=split.predict_padding_mask,
        )  # fmt: skip
        target, pred_pad = split.predict_tokens(x)
        return cm.masked_mse_loss(pred, target, padding_mask=pred_pad)


def recordings(batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x [batch, N, VALUES]`` (NaN after each recording's end) and ``lengths [batch]``."""
    lengths = torch.randint(0, N + 1, (batch,), generator=g)
    lengths[0] = 0  # always one sensor that was off: zero real tokens
    freq = 0.02 + 0.1 * torch.rand(batch, 2, 1, generator=g)  # two slow tones per machine
    phase = 2 * math.pi * torch.rand(batch, 2, 1, generator=g)
    t = torch.arange(N * VALUES, dtype=torch.float32)
    signal = torch.sin(freq * t + phase).sum(1) + 0.1 * torch.randn(batch, N * VALUES, generator=g)
    x = signal.reshape(batch, N, VALUES)
    return x.masked_fill(cm.lengths_to_padding_mask(lengths, N)[..., None], math.nan), lengths


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    p = argparse.ArgumentParser(description="Train a custom CrossMAE on variable-length signals.")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (tiny model: 1 is best)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--quick", action="store_true", help="CI size: 20 steps")
    p.add_argument("--cuda", action="store_true", help="train on CUDA if available")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 20
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(args.seed)  # data
    mask_gen = torch.Generator(device).manual_seed(args.seed)  # masks, where the data lives
    model = SignalMAE().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(args.steps):
        x, lengths = recordings(args.batch_size, g)
        loss = model(x.to(device), lengths.to(device), mask_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lengths {lengths[:6].tolist()}...")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "custom_encoder_loss.txt").write_text("\n".join(map(str, losses)) + "\n")
    finite = all(math.isfinite(v) for v in losses)
    window = max(1, min(20, args.steps // 4))  # compare the first and the last steps' means
    start, end = sum(losses[:window]) / window, sum(losses[-window:]) / window
    max_ratio = QUICK_MAX_RATIO if args.quick else MAX_RATIO
    print(f"first loss {losses[0]:.4f} -> last loss {losses[-1]:.4f}; all finite: {finite}")
    ok = finite and end <= max_ratio * start
    print(
        f"{'PASS' if ok else 'FAIL'}: mean loss of the last {window} steps {end:.4f} ="
        f" {end / start:.3f} x that of the first {window} (claim: <= {max_ratio}, all finite)"
    )
    if not ok:
        raise SystemExit(1)
    return losses


if __name__ == "__main__":
    main()
