"""GPU-only correctness checks of the CUDA attention kernels against the explicit softmax.

    python benchmarks/gpu_check.py        # exits 1 if any check fails

For each padded-attention kernel this torch offers on CUDA (``varlen``, ``flex``, ``sdpa``,
chosen with `set_padded_attention_kernel`): a padded encoder (scattered padding, NaN in the
padded slots, a sample without tokens), the same encoder on the packed layout, and a
CrossMAE decoder block with head dim 16 (the water model's), all in bf16 autocast, against
the explicit-softmax modules in float32. Checks forward error on real tokens, gradient
error of the inputs and parameters, and that everything is finite.
"""

from __future__ import annotations

import sys

import torch

import crossmae as cm
from crossmae.encoders import TransformerEncoder
from crossmae.layers import _flex, _varlen

FWD_TOL = 3e-2  # bf16 autocast against float32
GRAD_TOL = 5e-2  # relative to the reference gradient's largest entry


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def _decoder_stack_check(
    dev: torch.device, ctx: torch.Tensor, pad: torch.Tensor, kernels: list[str]
) -> list[str]:
    """The decoder stack's plan (keys reordered once for varlen, none in float32) against
    the explicit softmax, in bf16 autocast per kernel and in float32 (SDPA with a mask)."""
    from crossmae.decoders import CrossMAEDecoder
    from crossmae.layers import backend

    torch.manual_seed(1)
    n = 64
    dec = CrossMAEDecoder(64, 64, 2, 4, 8, num_tokens=n, self_attn=True).to(dev)
    ref = CrossMAEDecoder(64, 64, 2, 4, 8, num_tokens=n, self_attn=True, fused_attn=False)
    ref = ref.to(dev)
    ref.load_state_dict(dec.state_dict())
    ids = torch.randint(0, n, (ctx.shape[0], 40), device=dev)
    with torch.no_grad():
        want = ref(ctx, ids, context_padding_mask=pad)
    failures = []
    fp32 = backend.plan_for(ctx, 16, padding_mask=pad)
    ok = fp32.kernel == "sdpa_mask" and not fp32.reorder
    print(f"| float32 plan on CUDA | {fp32} | {'ok' if ok else 'WRONG'} |")
    if not ok:
        failures.append("fp32-plan")
    for kernel, amp in [(k, True) for k in kernels] + [("auto", False)]:
        cm.set_padded_attention_kernel(kernel)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            got = dec(ctx, ids, context_padding_mask=pad).float()
        err = float((got - want).abs().max())
        tag = f"{kernel} {'bf16' if amp else 'fp32'}"
        print(
            f"| decoder stack | {tag} | max err {err:.2e} | finite {bool(got.isfinite().all())} |"
        )
        if not (got.isfinite().all() and err < (FWD_TOL if amp else 1e-4)):
            failures.append(f"decoder/{tag}")
    cm.set_padded_attention_kernel("auto")
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing checked")
        return 1
    dev = torch.device("cuda")
    kernels = ["sdpa"]
    kernels += ["varlen"] if _varlen.varlen_available() else []
    kernels += ["flex"] if _flex.flex_available() else []
    torch.manual_seed(0)
    enc = TransformerEncoder(64, 2, 4).to(dev)
    ref_enc = TransformerEncoder(64, 2, 4, fused_attn=False).to(dev)
    ref_enc.load_state_dict(enc.state_dict())
    block = cm.CrossAttentionBlock(64, 64, 4).to(dev)  # head dim 16
    ref_block = cm.CrossAttentionBlock(64, 64, 4, fused_attn=False).to(dev)
    ref_block.load_state_dict(block.state_dict())

    lengths = torch.tensor([37, 0, 300, 5, 1, 256], device=dev)
    n = 300
    pad = cm.lengths_to_padding_mask(lengths, n)
    pad = torch.gather(pad, 1, torch.rand(len(lengths), n, device=dev).argsort(1))
    real = ~pad
    x0 = torch.randn(len(lengths), n, 64, device=dev).masked_fill(pad[..., None], float("nan"))
    queries = torch.randn(len(lengths), 40, 64, device=dev)

    def run(e: torch.nn.Module, blk: torch.nn.Module, packed: bool, amp: bool):  # type: ignore[no-untyped-def]
        x = x0.clone().requires_grad_(True)
        qx = queries.clone().requires_grad_(True)
        e.zero_grad(set_to_none=True)
        blk.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            if packed:
                p = cm.pack_tokens(x, pad, 2048)
                tok = cm.unpack_tokens(e.forward_packed(p).tokens, p, len(lengths))
            else:
                tok = e(x, pad).tokens
            out = blk(qx, tok, pad)
        loss = (
            tok.float().masked_fill(pad[..., None], 0).square().mean() + out.float().square().mean()
        )
        loss.backward()
        grads = {f"enc.{k}": v.grad for k, v in e.named_parameters()}
        grads.update({f"blk.{k}": v.grad for k, v in blk.named_parameters()})
        grads["queries"] = qx.grad
        grads["x"] = x.grad.masked_fill(pad[..., None], 0)
        return tok.detach().float(), out.detach().float(), grads, x.grad

    failures = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| kernel | layout | fwd err (enc) | fwd err (dec) | worst grad rel err | finite |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for packed in (False, True):
        ref_tok, ref_out, ref_grads, _ = run(ref_enc, ref_block, packed=False, amp=False)
        for kernel in kernels:
            cm.set_padded_attention_kernel(kernel)
            tok, out, grads, xgrad = run(enc, block, packed=packed, amp=True)
            e_tok = float((tok - ref_tok)[real].abs().max())
            e_out = float((out - ref_out).abs().max())
            worst = max(_rel(grads[k], ref_grads[k].to(grads[k].dtype)) for k in ref_grads)
            finite = bool(
                tok[real].isfinite().all()
                and out.isfinite().all()
                and xgrad.isfinite().all()
                and all(g.isfinite().all() for g in grads.values())
            )
            layout = "packed" if packed else "padded"
            print(f"| {kernel} | {layout} | {e_tok:.2e} | {e_out:.2e} | {worst:.2e} | {finite} |")
            if not (finite and e_tok < FWD_TOL and e_out < FWD_TOL and worst < GRAD_TOL):
                failures.append(f"{kernel}/{layout}")
    cm.set_padded_attention_kernel("auto")
    failures += _decoder_stack_check(dev, x0.nan_to_num(0.0), pad, kernels)
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
