"""GPU-only correctness checks of the CUDA paths (packed varlen) against the masked path."""

from __future__ import annotations

import torch

import crossmae as cm
from crossmae.encoders import TransformerEncoder


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    enc = TransformerEncoder(64, 2, 4).to(dev)
    ref_enc = TransformerEncoder(64, 2, 4, fused_attn=False).to(dev)
    ref_enc.load_state_dict(enc.state_dict())
    lengths = torch.tensor([37, 0, 64, 5, 1], device=dev)
    pad = cm.lengths_to_padding_mask(lengths, 64)
    pad = torch.gather(pad, 1, torch.rand(5, 64, device=dev).argsort(1))
    x = torch.randn(5, 64, 64, device=dev).masked_fill(pad[..., None], float("nan"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = ref_enc(x, pad).tokens.float()
        pad_out = enc(x, pad).tokens.float()
        packed = cm.pack_tokens(x, pad, 128)
        pk = cm.unpack_tokens(enc.forward_packed(packed).tokens.float(), packed, 5)
    real = ~pad
    print("padded varlen vs manual max err", float((pad_out - ref)[real].abs().max()))
    print("packed varlen vs manual max err", float((pk - ref)[real].abs().max()))
    print("finite", bool(pad_out.isfinite().all()), bool(pk.isfinite().all()))
    x.requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = enc.forward_packed(cm.pack_tokens(x, pad, 128)).tokens
    out.float().sum().backward()
    print("packed grads finite", all(p.grad.isfinite().all() for p in enc.parameters()))


if __name__ == "__main__":
    main()
