"""Load state dicts saved by the official CrossMAE code into `ImageCrossMAE`.

The official ``MaskedAutoencoderViT`` (CrossMAE) names its tensors ``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``, ``norm.*`` (only without feature
weighting), ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.{i}.*``,
``wfm.linear.weight``, ``dec_norms.{j}.*``, ``decoder_norm.*`` and ``decoder_pred.*``.
They map one-to-one onto `ImageCrossMAE`, except that

* the ``decoder_depth`` per-layer norms ``dec_norms.{j}.weight/bias`` become the rows ``j``
  of our one `StackedLayerNorm` (``decoder.dec_norms.weight/bias [depth, e]``);
* the fixed sin-cos tables ``pos_embed [1, 1 + N, e]`` and ``decoder_pos_embed
  [1, 1 + N, c]`` are not parameters here (non-persistent buffers rebuilt from the config):
  they are compared with ours and reported as ``ignored`` (or ``mismatched`` when they
  differ, which means the checkpoint's model did not use MAE's table for this grid).

Nothing is dropped silently: every checkpoint key is loaded, ignored after verification,
or reported as unexpected, and every key the model needs but the checkpoint lacks is
reported as missing. All names in the report are checkpoint (official) names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Union, overload

import torch
from torch import Tensor

from ..decoders.cross import CrossMAEDecoder
from ..layers.pos_embed import sincos_pos_embed_2d
from .config import ImageCrossMAEConfig
from .factories import build_image_crossmae
from .image import ImageCrossMAE

__all__ = ["OfficialLoadReport", "load_official_crossmae_state_dict", "official_key_for"]

_FIXED_TABLES = ("pos_embed", "decoder_pos_embed")
_ATOL = 1e-4  # the official tables are float32 copies of a float64 computation

_ENC_BLOCK = r"(?:norm1|norm2)\.(?:weight|bias)|attn\.(?:qkv|proj)\.(?:weight|bias)|mlp\.(?:fc1|fc2)\.(?:weight|bias)"
_DEC_BLOCK = (
    r"(?:norm0|norm1|norm2)\.(?:weight|bias)|self_attn\.(?:qkv|proj)\.(?:weight|bias)"
    r"|cross_attn\.(?:q|kv|proj)\.(?:weight|bias)|mlp\.(?:fc1|fc2)\.(?:weight|bias)"
)

# official name -> our name (applied with re.fullmatch, first match wins)
_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"cls_token", "cls_token"),
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (rf"blocks\.(\d+)\.({_ENC_BLOCK})", r"encoder.blocks.\1.\2"),
    (r"norm\.(weight|bias)", r"encoder.norm.\1"),
    (r"mask_token", "decoder.mask_token"),
    (rf"decoder_blocks\.(\d+)\.({_DEC_BLOCK})", r"decoder.blocks.\1.\2"),
    (r"wfm\.linear\.weight", "decoder.wfm.linear.weight"),
    (r"decoder_norm\.(weight|bias)", r"decoder.norm.\1"),
    (r"decoder_pred\.(weight|bias)", r"decoder.head.\1"),
)
_DEC_NORM = re.compile(r"dec_norms\.(\d+)\.(weight|bias)")

# our name -> official name
_TO_OFFICIAL: tuple[tuple[str, str], ...] = (
    (r"cls_token", "cls_token"),
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (rf"encoder\.blocks\.(\d+)\.({_ENC_BLOCK})", r"blocks.\1.\2"),
    (r"encoder\.norm\.(weight|bias)", r"norm.\1"),
    (r"decoder\.mask_token", "mask_token"),
    (rf"decoder\.blocks\.(\d+)\.({_DEC_BLOCK})", r"decoder_blocks.\1.\2"),
    (r"decoder\.wfm\.linear\.weight", "wfm.linear.weight"),
    (r"decoder\.norm\.(weight|bias)", r"decoder_norm.\1"),
    (r"decoder\.head\.(weight|bias)", r"decoder_pred.\1"),
)
_OUR_DEC_NORMS = re.compile(r"decoder\.dec_norms\.(weight|bias)")


@dataclass(frozen=True)
class OfficialLoadReport:
    """What `load_official_crossmae_state_dict` did with every key (official names).

    Attributes:
        missing: keys the target model needs that the checkpoint lacks (left as they were;
            when no model is given only gaps in ``dec_norms.{j}`` can be detected).
        unexpected: checkpoint keys with no counterpart in the target model.
        ignored: fixed tables (``pos_embed``, ``decoder_pos_embed``) that were checked
            against ours and not loaded (ours are rebuilt from the config).
        mismatched: fixed tables whose values differ from ours (not loaded).
        notes: human-readable remarks (unwrapping, prefix stripping, unverified tables).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mismatched."""
        return not (self.missing or self.unexpected or self.mismatched)


def official_key_for(key: str, *, decoder_depth: Optional[int] = None) -> list[str]:
    """Official checkpoint name(s) of one of our `ImageCrossMAE` state-dict keys.

    ``decoder.dec_norms.weight``/``bias`` map to ``decoder_depth`` official keys
    ``dec_norms.{j}.weight``/``bias`` (``decoder_depth`` is then required).

    Raises:
        ValueError: the key has no official counterpart (e.g. an MAE-decoder model).
    """
    m = _OUR_DEC_NORMS.fullmatch(key)
    if m is not None:
        if decoder_depth is None:
            raise ValueError(f"decoder_depth is required to name the rows of {key!r}")
        return [f"dec_norms.{j}.{m.group(1)}" for j in range(decoder_depth)]
    for pattern, repl in _TO_OFFICIAL:
        hit = re.fullmatch(pattern, key)
        if hit is not None:
            return [hit.expand(repl)]
    raise ValueError(f"{key!r} has no counterpart in the official CrossMAE checkpoints")


def _to_ours(key: str) -> Optional[str]:
    for pattern, repl in _TO_OURS:
        hit = re.fullmatch(pattern, key)
        if hit is not None:
            return hit.expand(repl)
    return None


def _unwrap(state_dict: object, notes: list[str]) -> dict[str, Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}"
        )
    sd: Mapping[object, object] = state_dict
    if "model" in sd and isinstance(sd["model"], Mapping):
        notes.append("unwrapped the checkpoint's 'model' entry")
        sd = sd["model"]
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise TypeError(f"state_dict keys must be str, got {k!r}")
        if not isinstance(v, Tensor):
            raise TypeError(f"state_dict[{k!r}] must be a Tensor, got {type(v).__name__}")
        out[k] = v
    if out and all(k.startswith("module.") for k in out):
        notes.append("stripped the 'module.' prefix (DistributedDataParallel)")
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _square_grid(num: int) -> Optional[int]:
    side = math.isqrt(num)
    return side if side > 0 and side * side == num else None


def _table_rows(key: str, value: Tensor) -> Tensor:
    """``[1, n, d]`` or ``[n, d]`` → ``[n, d]`` float64 on the CPU."""
    t = value.detach()
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2 or not t.is_floating_point():
        raise ValueError(f"{key} must be a float [1, n, d] table, got shape {tuple(value.shape)}")
    return t.to("cpu", torch.float64)


def _check_fixed(
    key: str, value: Tensor, ours: Optional[Tensor], report: OfficialLoadReport
) -> None:
    """Compare an official fixed table with ours (patch rows ``[N, d]``), or with MAE's
    table for the grid its shape implies when ``ours`` is None."""
    rows = _table_rows(key, value)
    if ours is None:
        n, d = rows.shape
        with_cls, without_cls = _square_grid(n - 1), _square_grid(n)
        if d % 4 != 0 or (with_cls is None and without_cls is None):
            report.notes.append(
                f"{key} {tuple(value.shape)}: not a sin-cos table of a square grid, not verified"
            )
            report.ignored.append(key)
            return
        if with_cls is not None:
            zero = torch.zeros(1, d, dtype=torch.float64)
            ref = torch.cat([zero, sincos_pos_embed_2d(d, with_cls, dtype=torch.float64)])
        else:
            ref = sincos_pos_embed_2d(d, without_cls or 1, dtype=torch.float64)
    else:
        if ours.device.type == "meta":
            report.notes.append(f"{key}: the model is on the meta device, not verified")
            report.ignored.append(key)
            return
        patch_rows = ours.detach().to("cpu", torch.float64)
        n, d = patch_rows.shape
        if tuple(rows.shape) == (n + 1, d):
            ref = torch.cat([torch.zeros(1, d, dtype=torch.float64), patch_rows])
        elif tuple(rows.shape) == (n, d):
            ref = patch_rows
        else:
            raise ValueError(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model expects "
                f"{(1, n + 1, d)} (or {(1, n, d)} without the cls row)"
            )
    if torch.allclose(rows, ref, rtol=0.0, atol=_ATOL):
        report.ignored.append(key)
    else:
        report.mismatched.append(key)


def _shape_error(official: str, ours: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise ValueError(
            f"shape mismatch for {official} (-> {ours}): checkpoint {got}, model expects {want}"
        )


def _map_without_model(sd: dict[str, Tensor], report: OfficialLoadReport) -> dict[str, Tensor]:
    mapped: dict[str, Tensor] = {}
    rows: dict[str, dict[int, Tensor]] = {"weight": {}, "bias": {}}
    for key, value in sd.items():
        if key in _FIXED_TABLES:
            _check_fixed(key, value, None, report)
            continue
        m = _DEC_NORM.fullmatch(key)
        if m is not None:
            rows[m.group(2)][int(m.group(1))] = value
            continue
        ours = _to_ours(key)
        if ours is None:
            report.unexpected.append(key)
        else:
            mapped[ours] = value
    if rows["weight"] or rows["bias"]:
        depth = 1 + max([*rows["weight"], *rows["bias"]])
        for kind in ("weight", "bias"):
            gaps = [j for j in range(depth) if j not in rows[kind]]
            report.missing.extend(f"dec_norms.{j}.{kind}" for j in gaps)
            if not gaps:
                parts = [rows[kind][j] for j in range(depth)]
                for j, p in enumerate(parts):
                    _shape_error(
                        f"dec_norms.{j}.{kind}",
                        f"decoder.dec_norms.{kind}[{j}]",
                        tuple(p.shape),
                        tuple(parts[0].shape),
                    )
                mapped[f"decoder.dec_norms.{kind}"] = torch.stack(parts)
    return mapped


def _map_with_model(
    sd: dict[str, Tensor], model: ImageCrossMAE, report: OfficialLoadReport
) -> dict[str, Tensor]:
    if not isinstance(model.decoder, CrossMAEDecoder):
        raise ValueError(
            "official CrossMAE checkpoints have a cross-attention decoder; this model uses an "
            "MAEDecoder (use_cross_attn=False)"
        )
    target = model.state_dict()
    depth = model.decoder.depth
    expected: dict[str, tuple[str, Optional[int]]] = {}
    unmappable: list[str] = []
    for ours in target:
        try:
            names = official_key_for(ours, decoder_depth=depth)
        except ValueError:
            unmappable.append(ours)
            continue
        stacked = _OUR_DEC_NORMS.fullmatch(ours) is not None
        for j, name in enumerate(names):
            expected[name] = (ours, j if stacked else None)
    if unmappable:
        raise ValueError(
            f"the model has state-dict entries with no official counterpart: {unmappable}"
        )
    mapped: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _FIXED_TABLES:
            table = model.pos_embed[0, 1:] if key == "pos_embed" else model.decoder.pos_table
            if table is None:  # a learned decoder table would be a (mappable) parameter
                report.unexpected.append(key)
            else:
                _check_fixed(key, value, table, report)
            continue
        if key not in expected:
            report.unexpected.append(key)
            continue
        ours, row = expected[key]
        want = tuple(target[ours].shape[1:] if row is not None else target[ours].shape)
        _shape_error(key, ours if row is None else f"{ours}[{row}]", tuple(value.shape), want)
        if row is None:
            mapped[ours] = value
        else:
            if ours not in mapped:
                mapped[ours] = target[ours].detach().clone()
            mapped[ours][row] = value.to(mapped[ours].dtype)
    report.missing.extend(k for k in expected if k not in sd)
    return mapped


@overload
def load_official_crossmae_state_dict(
    state_dict: Mapping[str, object], model: None = None, *, strict: bool = True
) -> tuple[dict[str, Tensor], OfficialLoadReport]: ...


@overload
def load_official_crossmae_state_dict(
    state_dict: Mapping[str, object],
    model: Union[ImageCrossMAE, ImageCrossMAEConfig],
    *,
    strict: bool = True,
) -> tuple[ImageCrossMAE, OfficialLoadReport]: ...


def load_official_crossmae_state_dict(
    state_dict: Mapping[str, object],
    model: Union[ImageCrossMAE, ImageCrossMAEConfig, None] = None,
    *,
    strict: bool = True,
) -> tuple[Union[dict[str, Tensor], ImageCrossMAE], OfficialLoadReport]:
    """Map a state dict saved by the official CrossMAE code onto `ImageCrossMAE`.

    Args:
        state_dict: the official ``model.state_dict()``, or a checkpoint dict holding it
            under ``"model"`` (as the official training script saves). A ``module.``
            prefix on every key is stripped.
        model: None (only rename: returns our state dict), an `ImageCrossMAE` (loaded in
            place) or an `ImageCrossMAEConfig` (a model is built, then loaded). The model
            must use the CrossMAE decoder (``use_cross_attn=True``) and match the
            checkpoint's architecture (depths, widths, feature weighting, decoder
            self-attention).
        strict: raise when anything is missing, unexpected or mismatched; with False, load
            what matches and return the report.

    Returns:
        ``(state_dict_or_model, report)``: our state dict (``model=None``) or the loaded
        model, and an `OfficialLoadReport` in official key names.

    Raises:
        TypeError: ``state_dict`` is not a mapping of str to tensors, or ``model`` has the
            wrong type.
        ValueError: a tensor's shape does not fit (the message names the key); the model
            has no official counterpart (MAE decoder); or, with ``strict``, missing /
            unexpected / mismatched keys (listed in the message). Nothing is loaded when
            it raises.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    report = OfficialLoadReport()
    sd = _unwrap(state_dict, report.notes)
    target: Optional[ImageCrossMAE]
    if model is None:
        target = None
    elif isinstance(model, ImageCrossMAEConfig):
        if not model.use_cross_attn:
            raise ValueError(
                "official CrossMAE checkpoints have a cross-attention decoder; "
                "config.use_cross_attn is False"
            )
        target = build_image_crossmae(model)
    elif isinstance(model, ImageCrossMAE):
        target = model
    else:
        raise TypeError(
            f"model must be None, an ImageCrossMAE or an ImageCrossMAEConfig, got "
            f"{type(model).__name__}"
        )
    if target is None:
        mapped = _map_without_model(sd, report)
    else:
        mapped = _map_with_model(sd, target, report)
    if strict and not report.ok:
        raise ValueError(
            "official CrossMAE state dict does not match: "
            f"missing={report.missing}, unexpected={report.unexpected}, "
            f"mismatched fixed tables={report.mismatched} (pass strict=False to load what "
            "matches and inspect the report)"
        )
    if target is None:
        return mapped, report
    target.load_state_dict(mapped, strict=False)
    return target, report
