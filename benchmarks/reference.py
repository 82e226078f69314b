"""Side by side with the reference CrossMAE/MAE code, in the same process (issue 11 item 5).

The reference code (github.com/TonyLianLong/CrossMAE: ``models_cross.py``, ``models_mae.py``,
``transformer_utils.py``, ``util/pos_embed.py``) is not part of crossmae (its license is
non-commercial): fetch it into a git-ignored folder and pass that folder::

    python benchmarks/run.py --reference .reference/CrossMAE

It needs ``timm`` (``timm.layers.DropPath``, ``timm.layers.helpers.to_2tuple``) and NumPy.
Compatibility shims are applied here, never in their files:

* ``to_2tuple`` moved in some timm versions: a stand-in ``timm.layers.helpers`` module is
  provided when the import fails;
* ``np.float`` (removed in NumPy 1.24) is used by MAE's ``util/pos_embed.py``: restored as
  ``float`` when missing;
* their ``forward`` wraps itself in ``torch.cuda.amp.autocast()`` (float16): while a
  reference model runs, that call returns the benchmark's autocast (bf16), so both sides
  run in the same precision;
* their CrossMAE without feature weighting calls ``self.norm``, which its constructor never
  builds: the harness adds MAE's final ``LayerNorm(eps=1e-6)`` to such a model;
* timm's ``Block`` lost the ``qk_scale`` argument (MAE's original ``models_mae.py`` passes
  it): `patch_timm_block` drops it.

Every configuration is timed for crossmae and the reference back to back, eager and
compiled, with ``torch._dynamo.reset()`` before every model, in alternating rounds: the
shared host's speed drifts by more than the ratios differ (compiled steps without CUDA
graphs are bound by the host; RESULTS.md, session 8).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch

REFERENCE_FILES = ("models_cross.py", "models_mae.py", "transformer_utils.py", "util/pos_embed.py")


@dataclass(frozen=True)
class ImageConfig:
    """One image configuration of issue 11's table, for both sides.

    Fields:
        name: row label.
        crossmae: keyword arguments of ``crossmae_vit_base``.
        module: reference module (``models_cross`` or ``models_mae``).
        builder: reference builder in that module.
        build_kwargs: keyword arguments of the builder.
        forward_kwargs: keyword arguments of the reference ``forward(imgs, ...)``.
    """

    name: str
    crossmae: dict[str, Any]
    module: str
    builder: str
    build_kwargs: dict[str, Any]
    forward_kwargs: dict[str, Any]


IMAGE_CONFIGS: tuple[ImageConfig, ...] = (
    ImageConfig(
        "predict0.25+wfm(all+input)",
        dict(predict_ratio=0.25, use_weighted_fm=True, use_input=True),
        "models_cross",
        "mae_vit_base_patch16_dec512d8b",
        dict(weight_fm=True, use_fm=[-1], use_input=True),
        dict(mask_ratio=0.75, kept_mask_ratio=0.25),
    ),
    ImageConfig(
        "predict0.75 no-wfm",
        dict(predict_ratio=0.75, use_weighted_fm=False),
        "models_cross",
        "mae_vit_base_patch16_dec512d8b",
        dict(weight_fm=False),
        dict(mask_ratio=0.75, kept_mask_ratio=0.75),
    ),
    ImageConfig(
        "mae-decoder",
        dict(use_cross_attn=False, predict_ratio=0.75, use_weighted_fm=False),
        "models_mae",
        "mae_vit_base_patch16_dec512d8b",
        {},
        dict(mask_ratio=0.75),
    ),
)


def check_reference_dir(path: str) -> str:
    """``path`` must be a folder holding the reference files; returns it absolute.

    Raises:
        ValueError: the folder or one of `REFERENCE_FILES` is missing (the message says how
            to fetch them).
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"--reference must be a folder, got {path!r}")
    full = os.path.abspath(path)
    missing = [f for f in REFERENCE_FILES if not os.path.isfile(os.path.join(full, f))]
    if missing:
        raise ValueError(
            f"--reference {path!r} lacks {missing}: export them from "
            "github.com/TonyLianLong/CrossMAE (e.g. git archive HEAD "
            + " ".join(REFERENCE_FILES)
            + ") into a git-ignored folder"
        )
    return full


def _install_shims() -> None:
    """Make the reference importable with current timm/NumPy (see the module docs)."""
    try:
        import numpy as np

        if not hasattr(np, "float"):
            np.float = float  # type: ignore[attr-defined]
    except ImportError:
        pass
    try:
        importlib.import_module("timm.layers.helpers")
    except ImportError:
        helpers = types.ModuleType("timm.layers.helpers")

        def to_2tuple(x: Any) -> Any:
            return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

        helpers.to_2tuple = to_2tuple  # type: ignore[attr-defined]
        sys.modules["timm.layers.helpers"] = helpers
    patch_timm_block()


def patch_timm_block() -> None:
    """timm's ``Block`` without ``qk_scale`` (removed in timm 0.9): accept and drop it."""
    try:
        vit = importlib.import_module("timm.models.vision_transformer")
    except ImportError:
        return
    block = vit.Block
    if "qk_scale" in inspect.signature(block.__init__).parameters or getattr(
        block, "_crossmae_shim", False
    ):
        return

    class Block(block):  # type: ignore[misc, valid-type]
        _crossmae_shim = True

        def __init__(self, *args: Any, qk_scale: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)

    vit.Block = Block


def load_reference(path: str) -> dict[str, types.ModuleType]:
    """Import ``models_cross`` and ``models_mae`` from ``path`` (after the shims)."""
    full = check_reference_dir(path)
    _install_shims()
    if full not in sys.path:
        sys.path.insert(0, full)
    return {name: importlib.import_module(name) for name in ("models_cross", "models_mae")}


@contextlib.contextmanager
def reference_autocast(dtype: torch.dtype) -> Iterator[None]:
    """While active, ``torch.cuda.amp.autocast()`` (which the reference's forward calls,
    float16 by default) gives ``torch.autocast("cuda", dtype=dtype)``."""
    amp = torch.cuda.amp
    orig = amp.autocast

    def autocast(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("dtype", dtype)
        return torch.autocast("cuda", *args, **kwargs)

    amp.autocast = autocast  # type: ignore[assignment]
    try:
        yield
    finally:
        amp.autocast = orig  # type: ignore[assignment]


def build_reference(modules: dict[str, types.ModuleType], cfg: ImageConfig) -> torch.nn.Module:
    """The reference model of ``cfg``."""
    model = getattr(modules[cfg.module], cfg.builder)(**cfg.build_kwargs)
    assert isinstance(model, torch.nn.Module)
    if not getattr(model, "weight_fm", True) and not hasattr(model, "norm"):
        # Their no-WFM path calls self.norm, which their constructor never creates
        # (REFERENCE.md: "its no-WFM path crashes"): give it MAE's final LayerNorm.
        width = int(model.cls_token.shape[-1])
        model.norm = torch.nn.LayerNorm(width, eps=1e-6)
    return model


def reference_step(
    model: torch.nn.Module,
    forward: Callable[..., Any],
    opt: torch.optim.Optimizer,
    imgs: torch.Tensor,
    cfg: ImageConfig,
    dtype: torch.dtype,
) -> Callable[[], None]:
    """One full training step of the reference model (forward, backward, optimizer)."""

    def step() -> None:
        with reference_autocast(dtype), torch.autocast(imgs.device.type, dtype=dtype):
            out = forward(imgs, **cfg.forward_kwargs)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
