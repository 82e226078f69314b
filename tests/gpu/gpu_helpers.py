"""Shared pieces of the GPU selection: the marks, the kernels, tolerances, tiny parts.

Legend: ``b`` batch, ``n`` tokens, ``q`` queries, ``c`` width. Polarity: every
``*_padding_mask`` is bool, True = padding.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
from torch import Tensor

import crossmae as cm

KERNELS = ("sdpa", "varlen", "flex")
# ``CROSSMAE_GPU_TESTS_DEVICE=cpu`` dry-runs the selection's logic on the CPU (sdpa only).
DEVICE = os.environ.get("CROSSMAE_GPU_TESTS_DEVICE", "cuda")
GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]
# half-precision autocast against a float32 explicit-softmax reference (max error relative
# to the reference's largest entry); torch 2.11 on an H200 stays well inside these
FWD_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}
GRAD_TOL = {torch.bfloat16: 6e-2, torch.float16: 2e-2}
DTYPES = (torch.bfloat16, torch.float16)


def kernel_available(kernel: str) -> bool:
    from crossmae.layers import _flex, _varlen

    if kernel == "varlen":
        return DEVICE == "cuda" and _varlen.varlen_available()
    if kernel == "flex":
        return DEVICE == "cuda" and _flex.flex_available()
    return True


def assert_kernel_selected(kernel: str, dtype: torch.dtype, head_dim: int) -> None:
    """The switch really routes this call shape to ``kernel`` (when the dispatcher can say)."""
    from crossmae.layers import attention

    select = getattr(attention, "select_padded_kernel", None)
    if select is None:  # the dispatcher moved: nothing to ask
        return
    q = torch.zeros(1, 1, 4, head_dim, device=DEVICE, dtype=dtype)
    assert select(q, 0.0) == kernel, f"{kernel} requested, {select(q, 0.0)} selected"


def rel_err(a: Tensor, b: Tensor) -> float:
    """Max abs difference relative to ``b``'s largest entry."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def scattered_padding(lengths: list[int], n: int, seed: int = 0) -> Tensor:
    """bool ``[b, n]``, True = padding, ``lengths[i]`` real slots per row at random places."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]
    order = torch.rand(len(lengths), n, generator=g).argsort(dim=1)
    return torch.gather(pad, 1, order).to(DEVICE)


class Stack(torch.nn.Module):
    """A padded encoder (head dim 16) feeding a CrossMAE block with self-attention among
    its queries: every padded-attention call the models make (self, cross, query padding)."""

    def __init__(self, dim: int = 64, heads: int = 4, fused: Optional[bool] = None) -> None:
        super().__init__()
        self.encoder = cm.TransformerEncoder(dim, 2, heads, fused_attn=fused)
        self.block = cm.CrossAttentionBlock(dim, dim, heads, self_attn=True, fused_attn=fused)

    def forward(
        self, x: Tensor, pad: Tensor, queries: Tensor, query_pad: Tensor
    ) -> tuple[Tensor, Tensor]:
        tokens = self.encoder(x, pad).tokens
        return tokens, self.block(
            queries, tokens, context_padding_mask=pad, query_padding_mask=query_pad
        )


def build_stacks(seed: int = 0) -> tuple[Stack, Stack]:
    """``(fused, reference)``: the same weights; the reference uses the explicit softmax."""
    torch.manual_seed(seed)
    fused = Stack().to(DEVICE)
    ref = Stack(fused=False).to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def run_stack(
    model: torch.nn.Module,
    x: Tensor,
    pad: Tensor,
    queries: Tensor,
    query_pad: Tensor,
    dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Forward + backward of a loss over the real outputs: ``(tokens, out, grads)``.

    ``grads`` has every parameter's gradient and the real rows of the inputs' gradients.
    """
    x = x.clone().requires_grad_(True)
    qx = queries.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None):
        tokens, out = model(x, pad, qx, query_pad)
    loss = (
        tokens.float().masked_fill(pad[..., None], 0).square().mean()
        + out.float().masked_fill(query_pad[..., None], 0).square().mean()
    )
    loss.backward()
    grads = {k: v.grad for k, v in model.named_parameters() if v.grad is not None}
    assert x.grad is not None and qx.grad is not None
    grads["x"] = x.grad.masked_fill(pad[..., None], 0)
    grads["queries"] = qx.grad.masked_fill(query_pad[..., None], 0)
    return tokens.detach(), out.detach(), grads
