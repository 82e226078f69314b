"""The timm adapter of docs/howto/timm-encoder.md (issue 10 item 1).

CI has no timm: the adapter runs against `StubVisionTransformer`, a stand-in with the
attributes the adapter reads (``embed_dim``, ``blocks``, ``norm``, ``patch_embed``) and
``forward_intermediates`` with timm's exact signature (timm 1.0.x,
``timm/models/vision_transformer.py``) and semantics for a ViT built with
``class_token=False, pos_embed="none"``. Where timm is installed (the GPU machine), the same
checks run on a real ``VisionTransformer``.

Legend: ``b`` batch, ``n`` tokens, ``e`` width. Polarity: ``padding_mask`` True = padding;
timm's ``attn_mask`` True = attend.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Optional, Union

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import crossmae as cm

DOC = Path(__file__).resolve().parents[2] / "docs" / "howto" / "timm-encoder.md"

# timm's VisionTransformer.forward_intermediates parameters (name, default), in order.
TIMM_SIGNATURE = [
    ("x", inspect.Parameter.empty),
    ("indices", None),
    ("return_prefix_tokens", False),
    ("norm", False),
    ("stop_early", False),
    ("output_fmt", "NCHW"),
    ("intermediates_only", False),
    ("output_dict", False),
    ("attn_mask", None),
    ("is_causal", False),
]


def adapter_class() -> type[nn.Module]:
    """The first ```python block of the how-to, executed: its `TimmEncoder`."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    code = block.group(1)
    assert len(code.split("class TimmEncoder")[1].strip().splitlines()) <= 20, "adapter > 20 lines"
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["TimmEncoder"]  # type: ignore[no-any-return]


class _StubBlock(nn.Module):
    """Pre-norm ViT block taking timm's ``attn_mask`` (SDPA polarity)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        b, n, e = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, e))
        return x + self.mlp(self.norm2(x))


class StubVisionTransformer(nn.Module):
    """What the adapter uses of timm's VisionTransformer(class_token=False, pos_embed="none")."""

    def __init__(self, embed_dim: int, depth: int, heads: int, final_norm: bool = True) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed: nn.Module = nn.Conv2d(3, embed_dim, 8, 8)  # replaced by the adapter
        self.blocks = nn.Sequential(*(_StubBlock(embed_dim, heads) for _ in range(depth)))
        self.norm: nn.Module = nn.LayerNorm(embed_dim) if final_norm else nn.Identity()

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Any:
        assert output_fmt == "NLC" and not intermediates_only and not output_dict
        assert isinstance(indices, list)
        b = x.shape[0]
        _, _, _, _ = x.shape  # timm unpacks B, _, H, W: the input must be 4-D
        x = self.patch_embed(x)
        x = x.reshape(b, -1, x.shape[-1])  # timm's _pos_embed without class token / table
        take = {i % len(self.blocks) for i in indices}
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask=attn_mask)
            if i in take:
                out.append(self.norm(x) if norm else x)
        return self.norm(x), out


def test_stub_has_timms_signature() -> None:
    params = inspect.signature(StubVisionTransformer.forward_intermediates).parameters
    got = [(p.name, p.default) for p in list(params.values())[1:]]
    assert got == TIMM_SIGNATURE


def _image_model() -> cm.ImageCrossMAE:
    torch.manual_seed(0)
    return cm.crossmae_vit_small(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4,
    )  # fmt: skip


def check_adapter(vit: nn.Module, *, ragged: bool = True) -> None:
    """The adapted ViT as ImageCrossMAE's encoder: protocol, a training step with finite
    gradients reaching every ViT block, and (``ragged``: the ViT takes ``attn_mask``)
    padding invariance under a ragged split."""
    timm_encoder = adapter_class()
    model = _image_model()
    enc = timm_encoder(vit)
    assert isinstance(enc, cm.Encoder)
    model.encoder = enc
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model(imgs, generator=torch.Generator().manual_seed(2))
    out.loss.backward()
    grads = [p.grad for p in vit.blocks.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if not ragged:
        return
    # a ragged split (sample 1 sees fewer patches): garbage in the padded slots is ignored
    visible = torch.zeros(2, 16, dtype=torch.bool)
    visible[0, :6], visible[1, :3] = True, True
    split = cm.mask_split_from_masks(visible, ~visible)
    model.eval()
    with torch.no_grad():
        enc_out = model.forward_encoder(imgs, split)
        assert enc_out.features is not None and enc_out.features.shape[0] == 2
        pred = model(imgs, split=split).pred
        # sample 1 alone gives the same predictions (batch independence, padding ignored)
        one = cm.mask_split_from_masks(visible[1:], ~visible[1:])
        alone = model(imgs[1:], split=one).pred
    torch.testing.assert_close(pred[1, : alone.shape[1]], alone[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="final norm"):
        model.encoder = timm_encoder(StubVisionTransformer(32, 2, 4, final_norm=True))


def test_adapter_on_the_stub() -> None:
    check_adapter(StubVisionTransformer(32, 2, 4, final_norm=False))


def test_adapter_on_timm() -> None:
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    params = inspect.signature(timm_vit.VisionTransformer.forward_intermediates).parameters
    names = [p for p in params if p != "self"]
    # timm >= 1.0.x (with attn_mask) has the full signature; older ones stop after
    # intermediates_only, and then only dense splits (no padding) can be encoded
    assert names[:7] == [n for n, _ in TIMM_SIGNATURE[:7]], names
    ragged = "attn_mask" in names
    torch.manual_seed(0)
    vit = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, class_token=False,
        pos_embed="none", global_pool="", num_classes=0,
    )  # fmt: skip
    vit.norm = nn.Identity()  # with weighted feature maps the final norm would go unused
    check_adapter(vit, ragged=ragged)
