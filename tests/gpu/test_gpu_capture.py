"""`capture_step` on CUDA: the image model's whole training step (masks from a registered
device generator, fused capturable AdamW, bf16 autocast) captured once and replayed.

Run with ``python -m pytest -m gpu -q`` on a CUDA machine (skipped elsewhere).
"""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import DEVICE, GPU

import crossmae as cm

pytestmark = GPU


def test_replays_train_with_new_masks() -> None:
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    torch.manual_seed(0)
    model = cm.build_image_crossmae(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
        decoder_depth=2, decoder_num_heads=4, mask_ratio=0.75,
    ).cuda()  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    masks = torch.Generator(device="cuda").manual_seed(0)
    imgs = torch.randn(8, 3, 32, 32, device="cuda")

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = model(imgs, generator=masks)
        out.loss.backward()
        opt.step()
        return out.loss.detach(), out.split.ids_keep

    replay, (loss, ids_keep) = cm.capture_step(step, optimizers=[opt], generators=[masks])
    before = [p.detach().clone() for p in model.parameters()]
    losses, keeps = [], []
    for _ in range(3):
        replay()
        losses.append(loss.clone())
        keeps.append(ids_keep.clone())
    torch.cuda.synchronize()
    assert all(torch.isfinite(x) for x in losses)
    assert not torch.equal(keeps[0], keeps[1])  # the registered generator advances
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert moved > 0  # the optimizer step is in the graph


def test_a_step_built_in_a_function_survives_its_locals() -> None:
    """Only the replay is kept: the model, optimizer and compiled step must stay alive
    through it (a freed parameter reused by a NaN buffer would show in the loss, freed
    kernels would crash the replay)."""
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    import gc

    def build() -> tuple[object, torch.Tensor]:
        torch.manual_seed(0)
        model = cm.build_image_crossmae(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mask_ratio=0.75,
        ).cuda()  # fmt: skip
        fwd = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
        imgs = torch.randn(8, 3, 32, 32, device="cuda")

        def step() -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                out = fwd(imgs)
            out.loss.backward()
            opt.step()
            return out.loss.detach()

        return cm.capture_step(step, optimizers=[opt])

    replay, loss = build()
    gc.collect()
    torch.cuda.empty_cache()
    junk = torch.full((1 << 24,), float("nan"), device="cuda")  # reuses any freed block
    losses = []
    for _ in range(3):
        replay()  # type: ignore[operator]
        losses.append(loss.clone())
    torch.cuda.synchronize()
    assert all(torch.isfinite(x) for x in losses), losses
    assert not torch.equal(losses[0], losses[2])  # it trains: new masks, new weights
    del junk
