"""Write the checked-in compatibility checkpoints under ``tests/data/checkpoints/``.

Each checkpoint is a tiny model's ``state_dict`` (``<name>.pt``, loadable with
``torch.load(weights_only=True)``) plus ``<name>.json``: how to rebuild the model, the
versions that wrote it, and a summary of the model's output on a fixed, RNG-free input (the
input and the masks are closed-form functions of the element index, so they do not depend on
torch's random number generators). ``test_reliability_checkpoints.py`` asserts that every
checkpoint still loads strictly into a freshly built model and reproduces the stored output.

Regenerate (only when a format change is intended, and say so in CHANGELOG.md)::

    .venv/bin/python tests/reliability/make_checkpoints.py
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import crossmae as cm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reliability_helpers import IMAGE_PRESETS, IMAGE_TINY, MODALITIES, RASTERS, WATER_TINY  # noqa: E402

DATA = HERE.parent / "data" / "checkpoints"
SIZE_LIMIT = 200 * 1024


def analytic(*shape: int, phase: float = 0.0) -> Tensor:
    """A fixed float32 tensor: ``sin(0.731 * i + phase)`` over the flat index ``i``."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    return torch.sin(0.731 * i + phase).reshape(shape).to(torch.float32)


def hash_noise(*shape: int, phase: float = 0.0) -> Tensor:
    """Fixed uniform-looking noise in ``[0, 1)`` (a sine hash of the flat index)."""
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.float64)
    x = torch.sin(i * 12.9898 + 78.233 + phase) * 43758.5453
    return (x - torch.floor(x)).reshape(shape).to(torch.float32)


# --------------------------------------------------------------------------- image
IMAGE_OVERRIDES: dict[str, Any] = {**IMAGE_TINY, **IMAGE_PRESETS["crossmae_vit_small"]}
IMAGE_MAE_OVERRIDES: dict[str, Any] = {**IMAGE_OVERRIDES, "use_cross_attn": False}


def image_model(seed: int, overrides: Mapping[str, Any]) -> cm.ImageCrossMAE:
    torch.manual_seed(seed)
    return cm.crossmae_vit_small(**overrides).eval()


def image_forward(model: cm.ImageCrossMAE) -> dict[str, Tensor]:
    imgs = analytic(2, 3, 16, 16)
    split = cm.random_masking(
        2, model.num_patches, 0.75, predict_ratio=0.5, noise=hash_noise(2, model.num_patches)
    )
    with torch.no_grad():
        out = model(imgs, split=split)
    return {"loss": out.loss, "pred": out.pred}


# --------------------------------------------------------------------------- water
# The reliability tests' tiny water model at width 8 (width 16 would exceed 200 KB on disk:
# the zip format spends ~400 bytes per tensor and the model has 212 tensors).
WATER_OVERRIDES: dict[str, Any] = {**WATER_TINY, "embed_dim": 8}


def water_model(seed: int, overrides: Mapping[str, Any]) -> cm.MultimodalMAE:
    torch.manual_seed(seed)
    return cm.water_mae_small(**overrides).eval()


def water_forward(model: cm.MultimodalMAE) -> dict[str, Tensor]:
    b, t = 2, WATER_TINY["num_steps"]
    inputs = {m: analytic(b, t, 20, 20, phase=k) for k, m in enumerate(RASTERS)}
    inputs.update(
        {
            m: analytic(b, WATER_TINY["num_sites"], t, phase=10 + k)
            for k, m in enumerate(MODALITIES[3:])
        }
    )
    inputs["river_flow"][1] = float("nan")  # sample 1 has no river flow at all
    static = analytic(b, WATER_TINY["num_sites"], 11, phase=20)
    tokenized = model.tokenize(inputs)
    splits = {}
    for k, (name, (tokens, pad)) in enumerate(tokenized.items()):
        n = tokens.shape[1]
        splits[name] = cm.grouped_random_masking(
            b, t, n // t, 0.5, padding_mask=pad, noise=hash_noise(b, n, phase=k)
        )
    with torch.no_grad():
        out = model(inputs, static=static, splits=splits)
    return {"loss": out.loss, **{f"pred.{m}": p for m, p in out.preds.items()}}


# --------------------------------------------------------------------------- registry
CHECKPOINTS: dict[str, dict[str, Any]] = {
    "image_crossmae_vit_small_tiny": {
        "builder": "crossmae_vit_small",
        "overrides": IMAGE_OVERRIDES,
        "build": lambda seed: image_model(seed, IMAGE_OVERRIDES),
        "forward": image_forward,
    },
    "image_mae_decoder_tiny": {
        "builder": "crossmae_vit_small",
        "overrides": IMAGE_MAE_OVERRIDES,
        "build": lambda seed: image_model(seed, IMAGE_MAE_OVERRIDES),
        "forward": image_forward,
    },
    "water_mae_small_tiny": {
        "builder": "water_mae_small",
        "overrides": WATER_OVERRIDES,
        "build": lambda seed: water_model(seed, WATER_OVERRIDES),
        "forward": water_forward,
    },
}


def summarize(outputs: Mapping[str, Tensor]) -> dict[str, Any]:
    """Shape, sum, sum of absolute values and the first 8 values of every output."""
    out: dict[str, Any] = {}
    for key, t in outputs.items():
        flat = t.detach().to(torch.float64).reshape(-1)
        out[key] = {
            "shape": list(t.shape),
            "sum": float(flat.sum()),
            "abs_sum": float(flat.abs().sum()),
            "head": [float(v) for v in flat[:8]],
        }
    return out


def write(name: str, directory: Path = DATA) -> tuple[Path, Path]:
    spec = CHECKPOINTS[name]
    model: torch.nn.Module = spec["build"](0)
    directory.mkdir(parents=True, exist_ok=True)
    pt, js = directory / f"{name}.pt", directory / f"{name}.json"
    torch.save(model.state_dict(), pt)
    if pt.stat().st_size >= SIZE_LIMIT:
        raise RuntimeError(f"{pt} is {pt.stat().st_size} bytes (limit {SIZE_LIMIT})")
    meta = {
        "builder": spec["builder"],
        "overrides": {
            k: list(v) if isinstance(v, tuple) else v for k, v in spec["overrides"].items()
        },
        "written_by": {"crossmae": cm.__version__, "torch": torch.__version__.split("+")[0]},
        "input": "closed-form: tests/reliability/make_checkpoints.py (analytic, hash_noise)",
        "expected": summarize(spec["forward"](model)),
    }
    js.write_text(json.dumps(meta, indent=1) + "\n")
    return pt, js


if __name__ == "__main__":
    for checkpoint in CHECKPOINTS:
        for path in write(checkpoint):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
