"""Raster tokenizers: patchify/unpatchify, land-masked raster tokens, image patch embedding.

Legend: ``b`` batch, ``t`` time steps, ``c`` channels, ``h``/``w`` patch-grid rows/cols,
``p``/``q`` pixel row/col inside a patch (``ph``/``pw`` pixels), ``l = h * w`` patches
(row-major: patch ``k = row * w + col``), ``v`` valid patches (``Lv`` of them, ascending grid
index), ``k = ph * pw * c`` values per patch, ``d`` embedding width.

A patch vector is laid out ``(p q c)``: pixels row-major, channels last (MAE's order).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._checks import check_bool, check_int, check_ratio, check_tensor
from .._checks import check_int_pair as _pair
from ..layers.pos_embed import (
    sincos_pos_embed_1d,
    sincos_pos_embed_2d_from_coords,
    steps_table,
)
from ._base import _check_time_positions, _ProjectedTokenizer, _time_embed_positions

__all__ = [
    "PatchEmbed",
    "RasterTokenizer",
    "patchify",
    "raster_position_embedding",
    "unpatchify",
    "valid_patches_from_mask",
]

IntPair = Union[int, tuple[int, int]]

_LAYOUTS = {"bchw": 4, "bthw": 4, "btchw": 5}  # image rank per layout
_PATCH_RANKS = {"bchw": 3, "bthw": 4, "btchw": 4}  # patch-tensor rank per layout


def _layout(name: str, layout: Optional[str], ndim: int, default: dict[int, str]) -> str:
    if layout is None:
        if ndim not in default:
            wanted = " or ".join(f"{n}D" for n in sorted(default))
            raise ValueError(f"{name} must be {wanted} (got {ndim}D); pass layout= to be explicit")
        return default[ndim]
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(_LAYOUTS)} or None, got {layout!r}")
    return layout


def _check_divisible(name: str, size: tuple[int, int], patch: tuple[int, int]) -> None:
    if size[0] % patch[0] != 0 or size[1] % patch[1] != 0:
        raise ValueError(
            f"{name} spatial size (H, W) = {size} is not divisible by patch_size (ph, pw) = {patch}"
        )


def patchify(x: Tensor, patch_size: IntPair, *, layout: Optional[str] = None) -> Tensor:
    """Cut images into non-overlapping patches (any dtype, bool masks included).

    Args:
        x: ``[b, c, H, W]`` (layout ``"bchw"``, the default for 4D input),
            ``[b, t, H, W]`` (layout ``"bthw"``: a single-channel series, ``c = 1``; must be
            requested explicitly because it is indistinguishable from ``"bchw"`` by shape) or
            ``[b, t, c, H, W]`` (layout ``"btchw"``, the default for 5D input).
        patch_size: ``ph`` (square) or ``(ph, pw)``; ``H % ph == 0`` and ``W % pw == 0``.
        layout: ``"bchw"``, ``"bthw"``, ``"btchw"`` or None (infer from ``x.ndim``).

    Returns:
        ``[b, l, ph*pw*c]`` for ``"bchw"``; ``[b, t, l, ph*pw*c]`` for ``"btchw"`` and
        ``[b, t, l, ph*pw]`` for ``"bthw"``. Patches are row-major over the
        ``(H/ph) x (W/pw)`` grid and each vector is laid out ``(p q c)``.

    Raises:
        ValueError: wrong rank for ``layout``, or ``H``/``W`` not divisible by the patch size.
    """
    t = check_tensor("x", x)
    lay = _layout("x", layout, t.ndim, {4: "bchw", 5: "btchw"})
    if t.ndim != _LAYOUTS[lay]:
        raise ValueError(
            f"x must have {_LAYOUTS[lay]} dimensions for layout {lay!r}, got {tuple(t.shape)}"
        )
    ph, pw = _pair("patch_size", patch_size)
    _check_divisible("x", (t.shape[-2], t.shape[-1]), (ph, pw))
    out: Tensor
    if lay == "bchw":
        out = rearrange(t, "b c (h p) (w q) -> b (h w) (p q c)", p=ph, q=pw)
    elif lay == "bthw":
        out = rearrange(t, "b t (h p) (w q) -> b t (h w) (p q)", p=ph, q=pw)
    else:
        out = rearrange(t, "b t c (h p) (w q) -> b t (h w) (p q c)", p=ph, q=pw)
    return out


def unpatchify(
    patches: Tensor,
    patch_size: IntPair,
    image_size: IntPair,
    *,
    layout: Optional[str] = None,
) -> Tensor:
    """Exact inverse of `patchify`: reassemble patch vectors into images.

    Args:
        patches: ``[b, l, ph*pw*c]`` (layout ``"bchw"``, the default for 3D input),
            ``[b, t, l, ph*pw]`` (layout ``"bthw"``, explicit only) or
            ``[b, t, l, ph*pw*c]`` (layout ``"btchw"``, the default for 4D input).
            ``c`` is read from the last dimension.
        patch_size: ``ph`` or ``(ph, pw)``.
        image_size: ``H`` or ``(H, W)`` of the images; must be divisible by the patch size
            and ``l`` must equal ``(H/ph) * (W/pw)``.
        layout: ``"bchw"``, ``"bthw"``, ``"btchw"`` or None (infer from ``patches.ndim``).

    Returns:
        ``[b, c, H, W]``, ``[b, t, H, W]`` or ``[b, t, c, H, W]`` for the three layouts.

    Raises:
        ValueError: wrong rank, ``l`` not matching the grid, or a last dimension that is
            not a multiple of ``ph * pw`` (exactly ``ph * pw`` for ``"bthw"``).
    """
    t = check_tensor("patches", patches)
    lay = _layout("patches", layout, t.ndim, {3: "bchw", 4: "btchw"})
    if t.ndim != _PATCH_RANKS[lay]:
        raise ValueError(
            f"patches must have {_PATCH_RANKS[lay]} dimensions for layout {lay!r}, "
            f"got {tuple(t.shape)}"
        )
    ph, pw = _pair("patch_size", patch_size)
    hw = _pair("image_size", image_size)
    _check_divisible("image_size", hw, (ph, pw))
    gh, gw = hw[0] // ph, hw[1] // pw
    if t.shape[-2] != gh * gw:
        raise ValueError(
            f"patches has {t.shape[-2]} patches (shape {tuple(t.shape)}) but image_size {hw} "
            f"with patch_size {(ph, pw)} needs {gh * gw}"
        )
    k = t.shape[-1]
    if k == 0 or k % (ph * pw) != 0 or (lay == "bthw" and k != ph * pw):
        raise ValueError(
            f"patches last dimension {k} is not ph*pw*c for patch_size {(ph, pw)}"
            + (" with c = 1 (layout 'bthw')" if lay == "bthw" else "")
        )
    out: Tensor
    if lay == "bchw":
        out = rearrange(t, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=ph, q=pw)
    elif lay == "bthw":
        out = rearrange(t, "b t (h w) (p q) -> b t (h p) (w q)", h=gh, w=gw, p=ph, q=pw)
    else:
        out = rearrange(t, "b t (h w) (p q c) -> b t c (h p) (w q)", h=gh, w=gw, p=ph, q=pw)
    return out


def _check_min_coverage(min_coverage: object) -> float:
    v = check_ratio("min_coverage", min_coverage)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage!r}")
    return v


def _check_bool_map(name: str, value: object, shape: tuple[int, ...]) -> Tensor:
    t = check_tensor(name, value)
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = valid), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t


def valid_patches_from_mask(
    valid_mask: Tensor, patch_size: IntPair, min_coverage: float = 0.5
) -> Tensor:
    """Which patches of a pixel validity (e.g. land) mask count as valid.

    A patch is valid when its share of valid pixels is ``>= min_coverage`` (share computed in
    float64 as ``count / (ph * pw)``).

    Args:
        valid_mask: bool ``[H, W]``, **True = valid pixel** (e.g. land).
        patch_size: ``ph`` or ``(ph, pw)``; must divide ``H`` and ``W``.
        min_coverage: required share of valid pixels, in ``(0, 1]`` (so a valid patch always
            holds at least one valid pixel).

    Returns:
        bool ``[l]``, True = valid patch, row-major over the ``(H/ph) x (W/pw)`` grid.
    """
    vm = check_tensor("valid_mask", valid_mask)
    if vm.dtype != torch.bool:
        raise TypeError(f"valid_mask must have dtype torch.bool (True = valid), got {vm.dtype}")
    if vm.ndim != 2:
        raise ValueError(f"valid_mask must have shape [H, W], got {tuple(vm.shape)}")
    cov = _check_min_coverage(min_coverage)
    ph, pw = _pair("patch_size", patch_size)
    _check_divisible("valid_mask", (vm.shape[0], vm.shape[1]), (ph, pw))
    per_patch = patchify(vm[None, None], (ph, pw), layout="bchw")[0]  # [l, ph*pw]
    share = per_patch.sum(dim=-1).to(torch.float64) / float(ph * pw)
    return share >= cov


def raster_position_embedding(
    dim: int,
    patch_coords: Tensor,
    time_positions: Union[Tensor, int],
    *,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Fixed sin-cos position embedding of time-major raster tokens at any width.

    Token ``n = t * Lv + v`` gets ``sincos_2d(dim, patch_coords[v]) + sincos_1d(dim,
    time_positions[t])`` (each cast to ``dtype`` before the sum). This is exactly the position
    part a `RasterTokenizer` with ``spatial_embed="sincos"`` and ``time_embed="sincos"`` adds,
    and lets a decoder of another width embed its query positions.

    Args:
        dim: embedding width (multiple of 4).
        patch_coords: int or float ``[Lv, 2]``, the ``(row, col)`` grid position of every
            token patch (e.g. `RasterTokenizer.patch_coords`).
        time_positions: an int ``t`` (positions ``0..t-1``), or a real tensor ``[t]`` or
            ``[b, t]`` (e.g. day of year).
        dtype: output dtype (default: torch's default dtype).

    Returns:
        ``[t*Lv, dim]`` (``[b, t*Lv, dim]`` for per-sample ``[b, t]`` time positions).
    """
    pc = check_tensor("patch_coords", patch_coords)
    if pc.dtype == torch.bool or pc.is_complex():
        raise TypeError(f"patch_coords must be a real int or float tensor, got {pc.dtype}")
    if pc.ndim != 2 or pc.shape[-1] != 2:
        raise ValueError(f"patch_coords must have shape [Lv, 2] (row, col), got {tuple(pc.shape)}")
    tp = _time_embed_positions(time_positions)
    out_dtype = dtype or torch.get_default_dtype()
    spatial = sincos_pos_embed_2d_from_coords(dim, pc, dtype=out_dtype)  # [v, d]
    temporal = sincos_pos_embed_1d(dim, tp.to(pc.device), dtype=out_dtype)  # [(b) t d]
    out: Tensor = rearrange(temporal[..., :, None, :] + spatial, "... t v d -> ... (t v) d")
    return out


class RasterTokenizer(_ProjectedTokenizer):
    """Tokens for time-resolved rasters with a fixed valid-patch (e.g. land) mask.

    Every (time step, valid patch) pair becomes one token, **time-major**: token
    ``n = t * Lv + v`` holds step ``t`` of the ``v``-th valid patch (valid patches in ascending
    row-major grid order, see `valid_patch_index`). Patches outside the valid-patch mask never
    become tokens: they are dropped by index before any arithmetic, so whatever they hold (NaN
    included) never reaches an output or a gradient.

    A token is ``proj(values) + spatial + time + modality`` where:

    * ``values`` is the patch vector ``(p q c)`` with every *missing* value replaced by 0. A
      value is missing when it is non-finite (NaN/inf) or its pixel is outside the pixel
      validity mask ``valid_mask``. With ``missing_fraction=True`` the share of missing values
      in the patch is appended as one extra input feature (so an all-missing patch and an
      all-zero patch differ).
    * ``spatial`` is the sin-cos 2D embedding of the patch's ``(row, col)`` grid coordinates
      (``spatial_embed="sincos"``, computed on the fly in the parameter dtype, so it is exact in
      float64 too) or a learned vector per valid patch
      (``"learned"``, parameter ``spatial_pos_embed [Lv, d]``).
    * ``time`` is the sin-cos 1D embedding of the step's time position (``time_embed="sincos"``;
      default positions ``0..t-1``, or e.g. day of year) or nothing (``None``).
    * ``modality`` is one learned vector ``modality_embed [d]`` (``modality_embed=True``).

    Parameters: ``proj`` (Linear ``ph*pw*c (+1) -> d``), optionally ``spatial_pos_embed``
    and ``modality_embed``.

    Args:
        embed_dim: token width ``d`` (multiple of 4 for sin-cos spatial, even for sin-cos time).
        patch_size: ``ph`` or ``(ph, pw)``.
        image_size: ``H`` or ``(H, W)``, divisible by the patch size.
        in_chans: channels ``c`` per step.
        valid_mask: optional bool ``[H, W]``, **True = valid pixel** (e.g. land). Pixels outside
            it are missing values; unless ``valid_patch_mask`` is given it also selects the
            valid patches with `valid_patches_from_mask` at ``min_coverage``.
        valid_patch_mask: optional bool ``[l]``, **True = valid patch** (row-major grid). None:
            derived from ``valid_mask``, or every patch when that is None too.
        min_coverage: share of valid pixels a patch needs to be valid (with ``valid_mask``).
        spatial_embed: ``"sincos"`` or ``"learned"``.
        time_embed: ``"sincos"`` or None.
        modality_embed: add one learned modality vector to every token.
        missing_fraction: append the share of missing values as an extra projection input.
        pad_empty_tokens: if True, ``padding_mask`` flags tokens whose values are all missing
            (e.g. a cloud-covered step); if False (default) every token is real.
        bias: bias in ``proj``.

    Shapes: ``b`` batch, ``t`` steps, ``c`` channels, ``Lv`` valid patches, ``d`` width.
    """

    spatial_pos_embed: Optional[nn.Parameter]
    valid_patch_index: Tensor
    patch_coords: Tensor
    value_valid: Tensor
    modality_embed: Optional[nn.Parameter]

    def __init__(
        self,
        embed_dim: int,
        patch_size: IntPair,
        image_size: IntPair,
        *,
        in_chans: int = 1,
        valid_mask: Optional[Tensor] = None,
        valid_patch_mask: Optional[Tensor] = None,
        min_coverage: float = 0.5,
        spatial_embed: str = "sincos",
        time_embed: Optional[str] = "sincos",
        modality_embed: bool = False,
        missing_fraction: bool = False,
        pad_empty_tokens: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        d = check_int("embed_dim", embed_dim, minimum=1)
        self.patch_size = _pair("patch_size", patch_size)
        self.image_size = _pair("image_size", image_size)
        _check_divisible("image_size", self.image_size, self.patch_size)
        self.in_chans = check_int("in_chans", in_chans, minimum=1)
        if spatial_embed not in ("sincos", "learned"):
            raise ValueError(f"spatial_embed must be 'sincos' or 'learned', got {spatial_embed!r}")
        if time_embed not in ("sincos", None):
            raise ValueError(f"time_embed must be 'sincos' or None, got {time_embed!r}")
        if spatial_embed == "sincos" and d % 4 != 0:
            raise ValueError(f"embed_dim must be a multiple of 4 for sincos spatial, got {d}")
        if time_embed == "sincos" and d % 2 != 0:
            raise ValueError(f"embed_dim must be even for sincos time embedding, got {d}")
        for flag_name, flag in (
            ("modality_embed", modality_embed),
            ("missing_fraction", missing_fraction),
            ("pad_empty_tokens", pad_empty_tokens),
            ("bias", bias),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{flag_name} must be a bool, got {flag!r}")
        cov = _check_min_coverage(min_coverage)
        ph, pw = self.patch_size
        gh, gw = self.image_size[0] // ph, self.image_size[1] // pw
        self.grid_size = (gh, gw)
        self.num_patches = gh * gw
        self.embed_dim = d
        self.spatial_embed_kind = spatial_embed
        self.time_embed_kind = time_embed
        self.missing_fraction = missing_fraction
        self.pad_empty_tokens = pad_empty_tokens

        if valid_mask is None:
            pixel_valid = torch.ones(self.image_size, dtype=torch.bool)
        else:
            pixel_valid = _check_bool_map("valid_mask", valid_mask, self.image_size).cpu()
        if valid_patch_mask is not None:
            patch_valid = _check_bool_map("valid_patch_mask", valid_patch_mask, (gh * gw,)).cpu()
        elif valid_mask is not None:
            patch_valid = valid_patches_from_mask(pixel_valid, self.patch_size, cov)
        else:
            patch_valid = torch.ones(gh * gw, dtype=torch.bool)
        index = torch.nonzero(patch_valid).flatten()
        if index.numel() == 0:
            raise ValueError(
                "the valid-patch mask selects no patch (valid_patch_mask / valid_mask with "
                f"min_coverage={cov}); a RasterTokenizer needs at least one valid patch"
            )
        self.num_valid_patches = int(index.numel())
        coords = torch.stack([index // gw, index % gw], dim=-1)
        per_pixel = patchify(pixel_valid[None, None], self.patch_size, layout="bchw")[0]
        value_valid = per_pixel.index_select(0, index).repeat_interleave(self.in_chans, dim=-1)
        self.register_buffer("valid_patch_index", index, persistent=False)
        self.register_buffer("patch_coords", coords, persistent=False)
        self.register_buffer("value_valid", value_valid, persistent=False)

        values_per_patch = ph * pw * self.in_chans
        self.proj = nn.Linear(values_per_patch + int(missing_fraction), d, bias=bias)
        self.spatial_pos_embed = (
            nn.Parameter(torch.empty(self.num_valid_patches, d))
            if spatial_embed == "learned"
            else None
        )
        self.modality_embed = nn.Parameter(torch.empty(d)) if modality_embed else None
        self.reset_parameters()

    def spatial_embedding(self) -> Tensor:
        """The spatial embedding of every valid patch.

        Returns:
            ``[Lv, d]`` in the parameter dtype: the learned ``spatial_pos_embed`` or the sin-cos
            2D embedding of `patch_coords`.
        """
        if self.spatial_pos_embed is not None:
            return self.spatial_pos_embed
        return sincos_pos_embed_2d_from_coords(
            self.embed_dim, self.patch_coords, dtype=self.proj.weight.dtype
        )

    def num_tokens(self, num_steps: int) -> int:
        """Number of tokens ``t * Lv`` for ``num_steps`` steps."""
        return check_int("num_steps", num_steps, minimum=1) * self.num_valid_patches

    def _check_x(self, x: object) -> Tensor:
        t = check_tensor("x", x)
        if not t.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {t.dtype}")
        if t.ndim == 4:
            if self.in_chans != 1:
                raise ValueError(
                    f"x of shape {tuple(t.shape)} is read as [b, t, H, W] (c = 1) but "
                    f"in_chans={self.in_chans}; pass [b, t, c, H, W]"
                )
            t = t[:, :, None]
        elif t.ndim != 5:
            raise ValueError(f"x must be [b, t, c, H, W] or [b, t, H, W], got {tuple(t.shape)}")
        if t.shape[2] != self.in_chans or tuple(t.shape[-2:]) != self.image_size:
            raise ValueError(
                f"x has (c, H, W) = {tuple(t.shape[2:])} but the tokenizer expects "
                f"{(self.in_chans, *self.image_size)}"
            )
        if t.shape[1] == 0:
            raise ValueError(f"x must have at least one time step, got shape {tuple(t.shape)}")
        return t

    def _patch_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Valid-patch values with missing ones zeroed, and the value validity, ``[b t v k]``."""
        patches = patchify(x, self.patch_size, layout="btchw")
        patches = patches.index_select(2, self.valid_patch_index)
        valid = torch.isfinite(patches) & self.value_valid
        return torch.where(valid, patches, patches.new_zeros(())), valid

    def _time_table(self, time_positions: Optional[Tensor], num_steps: int, batch: int) -> Tensor:
        """Sin-cos time embedding ``[t, d]`` or ``[b, t, d]`` in the parameter dtype."""
        if time_positions is None:
            w = self.proj.weight
            return steps_table(self.embed_dim, num_steps, w.device, w.dtype)
        else:
            tp = _time_embed_positions(time_positions, batch).to(self.proj.weight.device)
            if tp.shape[-1] != num_steps:
                raise ValueError(
                    f"time_positions has shape {tuple(tp.shape)} but x has {num_steps} steps"
                )
        return sincos_pos_embed_1d(self.embed_dim, tp, dtype=self.proj.weight.dtype)

    def _position_4d(self, time_positions: Optional[Tensor], num_steps: int, batch: int) -> Tensor:
        """Spatial + time embedding broadcastable to ``[b, t, v, d]``."""
        pos = self.spatial_embedding()[None, None]  # [1 1 v d]
        if self.time_embed_kind == "sincos":
            table = self._time_table(time_positions, num_steps, batch)
            if table.ndim == 2:
                table = table[None]
            pos = pos + table[:, :, None, :]
        elif time_positions is not None:
            _time_embed_positions(time_positions, batch)
        return pos

    def forward(self, x: Tensor, time_positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Tokenize a batch of raster series.

        Args:
            x: float ``[b, t, c, H, W]`` or ``[b, t, H, W]`` (read as ``c = 1``; only with
                ``in_chans=1``). NaN/inf mark missing values.
            time_positions: optional real ``[t]`` or ``[b, t]`` positions of the steps for the
                sin-cos time embedding (e.g. day of year); default ``0..t-1``.

        Returns:
            ``(tokens, padding_mask)``: tokens ``[b, t*Lv, d]`` time-major (token
            ``n = t_i * Lv + v``); padding_mask bool ``[b, t*Lv]``, **True = padding**: all
            False, or (``pad_empty_tokens=True``) True where every value of the patch at that
            step is missing.
        """
        xt = self._check_x(x)
        b, t = xt.shape[0], xt.shape[1]
        _check_time_positions(time_positions, b, t)
        values, valid = self._patch_values(xt)
        feats = values.to(self.proj.weight.dtype)
        if self.missing_fraction:
            frac = (~valid).sum(dim=-1, keepdim=True).to(feats.dtype) / valid.shape[-1]
            feats = torch.cat([feats, frac], dim=-1)
        h = self.proj(feats) + self._position_4d(time_positions, t, b)
        if self.modality_embed is not None:
            h = h + self.modality_embed
        tokens: Tensor = rearrange(h, "b t v d -> b (t v) d")
        if self.pad_empty_tokens:
            padding_mask: Tensor = rearrange(~valid.any(dim=-1), "b t v -> b (t v)")
        else:
            padding_mask = torch.zeros(
                b, t * self.num_valid_patches, dtype=torch.bool, device=tokens.device
            )
        return tokens, padding_mask

    def targets(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction targets in token order, with their validity.

        Args:
            x: float ``[b, t, c, H, W]`` or ``[b, t, H, W]`` (as in `forward`).

        Returns:
            ``(target, target_valid)``: target ``[b, t*Lv, ph*pw*c]`` in ``x``'s dtype, patch
            vectors ``(p q c)`` of the valid patches, time-major, with missing values replaced
            by 0; target_valid bool of the same shape, **True = valid value** (finite and
            inside ``valid_mask``), the weight for a masked loss.
        """
        values, valid = self._patch_values(self._check_x(x))
        target: Tensor = rearrange(values, "b t v k -> b (t v) k")
        target_valid: Tensor = rearrange(valid, "b t v k -> b (t v) k")
        return target, target_valid

    def layout_to_tokens(self, values: Tensor) -> Tensor:
        """Map a per-patch tensor in the input layout to this tokenizer's token order.

        The input layout is one entry per (step, grid patch) over the **full** patch grid:
        ``[b, t, gh*gw, ...]`` (row-major patches) or ``[b, t, gh, gw, ...]``. Entries of
        patches that are not valid patches are dropped (they have no token). Typical use: a
        bool hidden mask drawn by a data pipeline (True = hidden), see
        ``MultimodalMAE.forward(hidden_masks=...)``.

        Args:
            values: ``[b, t, gh*gw, ...]`` or ``[b, t, gh, gw, ...]``, any dtype.

        Returns:
            ``[b, t*Lv, ...]``, time-major like the tokens (token ``n = t_i * Lv + v``).
        """
        v = check_tensor("values", values)
        gh, gw = self.grid_size
        if v.ndim >= 4 and tuple(v.shape[2:4]) == (gh, gw):
            v = v.flatten(2, 3)
        if v.ndim < 3 or v.shape[2] != self.num_patches:
            raise ValueError(
                f"values must be [b, t, {gh * gw}, ...] or [b, t, {gh}, {gw}, ...] (steps x "
                f"the full {gh}x{gw} patch grid), got shape {tuple(v.shape)}"
            )
        picked = v.index_select(2, self.valid_patch_index.to(v.device))
        return picked.flatten(1, 2)

    def token_positions(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """Time step and grid patch of every token.

        Args:
            num_steps: ``t``.

        Returns:
            ``(t_index, patch_index)``, both int64 ``[t*Lv]``: token ``n`` is step
            ``t_index[n] = n // Lv`` of grid patch ``patch_index[n]`` (row-major index into the
            full ``(H/ph) x (W/pw)`` grid; its valid-patch rank is ``n % Lv``).
        """
        t = check_int("num_steps", num_steps, minimum=1)
        device = self.valid_patch_index.device
        t_index = torch.arange(t, device=device).repeat_interleave(self.num_valid_patches)
        return t_index, self.valid_patch_index.repeat(t)

    def position_embedding(
        self,
        num_steps: Optional[int] = None,
        time_positions: Optional[Tensor] = None,
    ) -> Tensor:
        """The spatial + time part of the tokens (no values, no modality vector).

        Args:
            num_steps: ``t`` (may be omitted when ``time_positions`` is given).
            time_positions: optional real ``[t]`` or ``[b, t]`` step positions (default
                ``0..t-1``).

        Returns:
            ``[t*Lv, d]`` (``[b, t*Lv, d]`` for ``[b, t]`` time positions) in the parameter
            dtype, time-major like the tokens. For another width use
            `raster_position_embedding` with `patch_coords`.
        """
        return self._flat_position_embedding(num_steps, time_positions, self.num_valid_patches)


class PatchEmbed(nn.Module):
    """Image patch embedding: a strided convolution, one token per patch.

    Stored as ``proj = nn.Conv2d(in_chans, d, kernel_size=patch, stride=patch)`` so MAE /
    CrossMAE / timm checkpoints (``patch_embed.proj.weight`` ``[d, c, ph, pw]`` and
    ``patch_embed.proj.bias``) load 1:1. Equivalent to ``patchify(img) @ W.T + b`` with
    ``W = rearrange(proj.weight, "d c p q -> d (p q c)")``.

    Args:
        embed_dim: token width ``d``.
        patch_size: ``ph`` or ``(ph, pw)``.
        image_size: optional ``H`` or ``(H, W)``; when given, inputs must have that size and
            `num_patches` / `grid_size` are set. When None any divisible size is accepted.
        in_chans: image channels ``c``.
        bias: bias in ``proj``.

    Shapes: ``b`` batch, ``c`` channels, ``l = (H/ph)*(W/pw)`` patches (row-major), ``d`` width.
    """

    def __init__(
        self,
        embed_dim: int,
        patch_size: IntPair,
        image_size: Optional[IntPair] = None,
        *,
        in_chans: int = 3,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_bool("bias", bias)
        d = check_int("embed_dim", embed_dim, minimum=1)
        self.patch_size = _pair("patch_size", patch_size)
        self.in_chans = check_int("in_chans", in_chans, minimum=1)
        self.image_size: Optional[tuple[int, int]] = None
        self.grid_size: Optional[tuple[int, int]] = None
        self.num_patches: Optional[int] = None
        if image_size is not None:
            self.image_size = _pair("image_size", image_size)
            _check_divisible("image_size", self.image_size, self.patch_size)
            self.grid_size = (
                self.image_size[0] // self.patch_size[0],
                self.image_size[1] // self.patch_size[1],
            )
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = d
        self.proj = nn.Conv2d(
            self.in_chans, d, kernel_size=self.patch_size, stride=self.patch_size, bias=bias
        )
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, img: Tensor) -> Tensor:
        """Embed every patch.

        Args:
            img: float ``[b, c, H, W]``.

        Returns:
            ``[b, l, d]``, patches row-major over the grid.
        """
        t = self._check_img(img)
        y = F.conv2d(
            t.to(self.proj.weight.dtype), self.proj.weight, self.proj.bias, stride=self.patch_size
        )
        out: Tensor = rearrange(y, "b d h w -> b (h w) d")
        return out

    def _check_img(self, img: object) -> Tensor:
        """``img`` as a float ``[b, in_chans, H, W]`` tensor this embedding accepts."""
        t = check_tensor("img", img)
        if not t.is_floating_point():
            raise TypeError(f"img must be a floating-point tensor, got dtype {t.dtype}")
        if t.ndim != 4 or t.shape[1] != self.in_chans:
            raise ValueError(
                f"img must have shape [b, {self.in_chans}, H, W], got {tuple(t.shape)}"
            )
        size = (t.shape[2], t.shape[3])
        if self.image_size is not None and size != self.image_size:
            raise ValueError(f"img has (H, W) = {size} but image_size is {self.image_size}")
        _check_divisible("img", size, self.patch_size)
        return t

    def embed_selected(
        self, img: Tensor, ids: Tensor, padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """Embed only the patches ``ids`` of each image: no other pixel is ever read.

        Gathers the selected patches from a view of ``img`` (no copy of the whole image),
        then applies one linear projection whose weight is a view of ``proj.weight`` in its
        ``[d, c, ph, pw]`` layout (so checkpoints load unchanged). Equal to
        ``gather_tokens(self(img), ids)`` up to floating-point rounding (same products,
        another summation order), but a NaN/inf pixel in a patch that is not selected
        cannot reach the output or any gradient (the convolution over every patch would
        put it into ``proj.weight.grad``).

        Args:
            img: float ``[b, c, H, W]``.
            ids: int64 ``[b, k]`` patch indices into the row-major ``(H/ph) x (W/pw)`` grid.
            padding_mask: optional bool ``[b, k]``, **True = padding slot**: its pixels are
                not read either (the slot gets ``proj.bias``, or 0 without bias).

        Returns:
            ``[b, k, d]`` in ``proj.weight``'s dtype (autocast applies to the projection).
        """
        t = self._check_img(img)
        idx = check_tensor("ids", ids)
        if idx.dtype not in (torch.int64, torch.int32) or idx.ndim != 2:
            raise TypeError(
                f"ids must be an int64 [b, k] tensor, got {idx.dtype} {tuple(idx.shape)}"
            )
        if idx.shape[0] != t.shape[0]:
            raise ValueError(f"ids has batch {idx.shape[0]} but img has batch {t.shape[0]}")
        if padding_mask is not None:
            pm = check_tensor("padding_mask", padding_mask)
            if pm.dtype != torch.bool or tuple(pm.shape) != tuple(idx.shape):
                raise ValueError(
                    f"padding_mask must be bool {tuple(idx.shape)} (True = padding), got "
                    f"{pm.dtype} {tuple(pm.shape)}"
                )
        (ph, pw), (gh, gw) = (
            self.patch_size,
            (t.shape[2] // self.patch_size[0], t.shape[3] // self.patch_size[1]),
        )
        idx = idx.long()
        if padding_mask is not None:
            idx = idx.masked_fill(padding_mask, 0)  # a valid index; its pixels are zeroed below
        grid = t.reshape(t.shape[0], t.shape[1], gh, ph, gw, pw)  # splits dims: a view
        grid = grid.permute(0, 2, 4, 1, 3, 5)  # [b gh gw c ph pw], a view
        rows = torch.arange(t.shape[0], device=t.device)[:, None]
        patches = grid[rows, idx // gw, idx % gw]  # [b k c ph pw]: only these pixels are read
        patches = patches.flatten(2)  # [b k (c ph pw)], the conv weight's layout
        if padding_mask is not None:
            patches = patches.masked_fill(padding_mask[..., None], 0)
        weight = self.proj.weight.flatten(1)  # [d (c ph pw)], a view of proj.weight
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)
