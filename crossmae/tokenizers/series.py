"""Series tokenizers: per-(step, site-group) tokens, a static-attribute token, token appending.

Legend: ``b`` batch, ``s`` sites (e.g. catchments), ``t`` time steps, ``c`` channels per site,
``g`` sites per patch (``group_size``), ``p`` patches (``P = ceil(s / g)``; the last one is
filled up with padding sites), ``a`` static attributes, ``d`` embedding width.

Site ``i`` belongs to patch ``i // g`` at slot ``i % g``; a token's values are laid out
``(g c)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

from .._checks import check_int, check_padding_mask, check_tensor
from ..layers.pos_embed import sincos_pos_embed_1d, steps_table
from ._base import _check_time_positions, _ProjectedTokenizer, _time_embed_positions

__all__ = ["SeriesTokenizer", "StaticToken", "append_tokens"]


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_float(name: str, value: object) -> Tensor:
    t = check_tensor(name, value)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_group_reduce(value: object) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise TypeError(
            f"group_reduce must be None or 'mean', got {value!r} ({type(value).__name__})"
        )
    if value not in (None, "mean"):
        raise ValueError(f"group_reduce must be None or 'mean', got {value!r}")
    return value


def _check_bool_like(name: str, value: Optional[Tensor], shape: tuple[int, ...]) -> None:
    if value is None:
        return
    t = check_tensor(name, value)
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = missing), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have the shape of x {shape}, got {tuple(t.shape)}")


class SeriesTokenizer(_ProjectedTokenizer):
    """Tokens for multi-site time series, ``group_size`` sites per token, time-major.

    The ``s`` sites are cut into ``P = ceil(s / group_size)`` patches of ``group_size``
    consecutive sites (the last patch is filled up with padding sites). Every (time step,
    patch) pair becomes one token, **time-major**: token ``n = t_i * P + p``.

    A value is *observed* when it is finite, not flagged by ``missing_mask`` and its site is
    real (not flagged by ``site_padding_mask``, not a fill-up site). A token is
    ``proj([values, missing]) + spatial + time + modality``, where ``values`` are the group's
    ``g*c`` values with every unobserved one replaced by 0 and ``missing`` is the matching 0/1
    indicator (1 = not observed), so an observed 0 and a missing value differ. Whatever an
    unobserved value holds (NaN included) never reaches an output or a gradient.

    * ``spatial``: a learned vector per patch (``spatial_embed="learned"``, parameter
      ``spatial_pos_embed [P, d]``) or the sin-cos 1D embedding of the patch index
      (``"sincos"``, a fixed table in the parameter dtype, made once and reused).
    * ``time``: sin-cos 1D embedding of the step's position (``time_embed="sincos"``; default
      ``0..t-1``) or nothing (None).
    * ``modality``: one learned vector ``modality_embed [d]`` (``modality_embed=True``).

    With ``group_reduce="mean"`` a token is ``proj(mean) + spatial + time + modality`` instead,
    where ``mean`` holds, per channel, the mean of the group's *observed* values (0 when the
    group has none), so ``proj`` is Linear ``c -> d`` (the downstream water model's series
    tokens: ``Linear(1 -> d)`` of the mean over a patch's real catchments). Padding sites,
    fill-up sites and missing values are excluded from the mean, not counted as zeros.

    A token with no observed value at all is flagged as padding, so a sample whose whole series
    is missing (e.g. river flow before 1989) contributes zero real tokens. `targets` and
    `layout_to_tokens` do not depend on ``group_reduce``: the targets stay per site.

    Args:
        embed_dim: token width ``d`` (even when a sin-cos embedding is used).
        num_sites: ``s``.
        in_chans: ``c`` values per site and step.
        group_size: ``g`` sites per token.
        spatial_embed: ``"learned"`` or ``"sincos"``.
        time_embed: ``"sincos"`` or None.
        modality_embed: add one learned modality vector to every token.
        bias: bias in ``proj`` (Linear ``2*g*c -> d``; ``c -> d`` with ``group_reduce="mean"``).
        group_reduce: None (default: every site's values and missing flags are projected) or
            ``"mean"`` (the per-channel mean over the group's observed values is projected).

    Shapes: ``b`` batch, ``s`` sites, ``t`` steps, ``c`` channels, ``P`` patches, ``d`` width.
    """

    spatial_pos_embed: Optional[nn.Parameter]
    modality_embed: Optional[nn.Parameter]

    def __init__(
        self,
        embed_dim: int,
        num_sites: int,
        *,
        in_chans: int = 1,
        group_size: int = 1,
        spatial_embed: str = "learned",
        time_embed: Optional[str] = "sincos",
        modality_embed: bool = False,
        bias: bool = True,
        group_reduce: Optional[str] = None,
    ) -> None:
        super().__init__()
        d = check_int("embed_dim", embed_dim, minimum=1)
        self.num_sites = check_int("num_sites", num_sites, minimum=1)
        self.in_chans = check_int("in_chans", in_chans, minimum=1)
        self.group_size = check_int("group_size", group_size, minimum=1)
        if spatial_embed not in ("learned", "sincos"):
            raise ValueError(f"spatial_embed must be 'learned' or 'sincos', got {spatial_embed!r}")
        if time_embed not in ("sincos", None):
            raise ValueError(f"time_embed must be 'sincos' or None, got {time_embed!r}")
        if (spatial_embed == "sincos" or time_embed == "sincos") and d % 2 != 0:
            raise ValueError(f"embed_dim must be even for sin-cos embeddings, got {d}")
        _check_flag("modality_embed", modality_embed)
        _check_flag("bias", bias)
        self.group_reduce = _check_group_reduce(group_reduce)
        self.embed_dim = d
        self.num_patches = math.ceil(self.num_sites / self.group_size)
        self.spatial_embed_kind = spatial_embed
        self.time_embed_kind = time_embed
        self.values_per_token = self.group_size * self.in_chans
        proj_in = self.in_chans if group_reduce == "mean" else 2 * self.values_per_token
        self.proj = nn.Linear(proj_in, d, bias=bias)
        self.spatial_pos_embed = (
            nn.Parameter(torch.empty(self.num_patches, d)) if spatial_embed == "learned" else None
        )
        self.modality_embed = nn.Parameter(torch.empty(d)) if modality_embed else None
        self.reset_parameters()

    def spatial_embedding(self) -> Tensor:
        """The spatial embedding of every patch.

        Returns:
            ``[P, d]`` in the parameter dtype: the learned ``spatial_pos_embed`` or the sin-cos
            1D embedding of the patch index ``0..P-1``.
        """
        table = self._spatial_table()
        return table if self.spatial_pos_embed is not None else table.clone()

    def _spatial_table(self) -> Tensor:
        """`spatial_embedding` without a copy: the shared sin-cos table (read only)."""
        if self.spatial_pos_embed is not None:
            return self.spatial_pos_embed
        w = self.proj.weight
        return steps_table(self.embed_dim, self.num_patches, w.device, w.dtype)

    def num_tokens(self, num_steps: int) -> int:
        """Number of tokens ``t * P`` for ``num_steps`` steps."""
        return check_int("num_steps", num_steps, minimum=1) * self.num_patches

    def _grouped(
        self,
        x: object,
        site_padding_mask: Optional[Tensor],
        missing_mask: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Values (unobserved zeroed) and observed flags, both ``[b, t, p, (g c)]``."""
        xt = _check_float("x", x)
        if xt.ndim == 3:
            if self.in_chans != 1:
                raise ValueError(
                    f"x of shape {tuple(xt.shape)} is read as [b, s, t] (c = 1) but "
                    f"in_chans={self.in_chans}; pass [b, s, t, c]"
                )
        elif xt.ndim != 4:
            raise ValueError(f"x must be [b, s, t] or [b, s, t, c], got {tuple(xt.shape)}")
        if xt.shape[1] != self.num_sites or (xt.ndim == 4 and xt.shape[3] != self.in_chans):
            raise ValueError(
                f"x has shape {tuple(xt.shape)} but the tokenizer expects s={self.num_sites} "
                f"sites and c={self.in_chans} channels ([b, s, t(, c)])"
            )
        if xt.shape[2] == 0:
            raise ValueError(f"x must have at least one time step, got shape {tuple(xt.shape)}")
        _check_bool_like("missing_mask", missing_mask, tuple(xt.shape))
        b = xt.shape[0]
        check_padding_mask("site_padding_mask", site_padding_mask, (b, self.num_sites), "x")
        if xt.ndim == 3:
            xt = xt[..., None]
            if missing_mask is not None:
                missing_mask = missing_mask[..., None]
        observed = torch.isfinite(xt)
        if missing_mask is not None:
            observed = observed & ~missing_mask
        if site_padding_mask is not None:
            observed = observed & ~site_padding_mask[:, :, None, None]
        fill = self.num_patches * self.group_size - self.num_sites
        if fill > 0:
            shape = (b, fill, xt.shape[2], self.in_chans)
            xt = torch.cat([xt, xt.new_zeros(shape)], dim=1)
            observed = torch.cat(
                [observed, torch.zeros(shape, dtype=torch.bool, device=xt.device)], dim=1
            )
        values = torch.where(observed, xt, xt.new_zeros(()))
        pattern = "b (p g) t c -> b t p (g c)"
        grouped: Tensor = rearrange(values, pattern, g=self.group_size)
        grouped_observed: Tensor = rearrange(observed, pattern, g=self.group_size)
        return grouped, grouped_observed

    def _group_mean(self, values: Tensor, observed: Tensor) -> Tensor:
        """Per channel, the mean of a group's observed values (0 when none): ``[b, t, p, c]``
        from ``values`` (unobserved already 0) and ``observed``, both ``[b, t, p, (g c)]``."""
        pattern = "b t p (g c) -> b t p c"
        total: Tensor = reduce(values, pattern, "sum", g=self.group_size)
        count: Tensor = reduce(observed.to(values.dtype), pattern, "sum", g=self.group_size)
        return total / count.clamp(min=1)

    def _position_4d(self, time_positions: Optional[Tensor], num_steps: int, batch: int) -> Tensor:
        """Spatial + time embedding broadcastable to ``[b, t, p, d]``."""
        pos = self._spatial_table()[None, None]
        w = self.proj.weight
        tp: Optional[Tensor] = None
        if time_positions is not None:
            tp = _time_embed_positions(time_positions, batch).to(w.device)
            if tp.shape[-1] != num_steps:
                raise ValueError(
                    f"time_positions has shape {tuple(tp.shape)} but there are {num_steps} steps"
                )
        if self.time_embed_kind == "sincos":
            if tp is None:
                table = steps_table(self.embed_dim, num_steps, w.device, w.dtype)
            else:
                table = sincos_pos_embed_1d(self.embed_dim, tp, dtype=w.dtype)
            if table.ndim == 2:
                table = table[None]
            pos = pos + table[:, :, None, :]
        return pos

    def forward(
        self,
        x: Tensor,
        site_padding_mask: Optional[Tensor] = None,
        *,
        missing_mask: Optional[Tensor] = None,
        time_positions: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Tokenize a batch of multi-site series.

        Args:
            x: float ``[b, s, t]`` (``c = 1``; only with ``in_chans=1``) or ``[b, s, t, c]``.
                NaN/inf mark missing values.
            site_padding_mask: optional bool ``[b, s]``, **True = padding site** (its values
                never enter a token).
            missing_mask: optional bool of ``x``'s shape, **True = missing value** (in addition
                to non-finite values).
            time_positions: optional real ``[t]`` or ``[b, t]`` step positions for the sin-cos
                time embedding (e.g. day of year); default ``0..t-1``.

        Returns:
            ``(tokens, padding_mask)``: tokens ``[b, t*P, d]`` time-major (token
            ``n = t_i * P + p``); padding_mask bool ``[b, t*P]``, **True = padding**: the token
            has no observed value (all its sites padded or all its values missing). Padded
            tokens are finite.
        """
        if isinstance(x, Tensor) and x.ndim in (3, 4):  # other x: refused by _grouped
            _check_time_positions(time_positions, x.shape[0], x.shape[2])
        values, observed = self._grouped(x, site_padding_mask, missing_mask)
        b, t = values.shape[0], values.shape[1]
        dtype = self.proj.weight.dtype
        if self.group_reduce == "mean":
            feats = self._group_mean(values, observed).to(dtype)
        else:
            feats = torch.cat([values.to(dtype), (~observed).to(dtype)], dim=-1)
        h = self.proj(feats) + self._position_4d(time_positions, t, b)
        if self.modality_embed is not None:
            h = h + self.modality_embed
        tokens: Tensor = rearrange(h, "b t p d -> b (t p) d")
        padding_mask: Tensor = rearrange(~observed.any(dim=-1), "b t p -> b (t p)")
        return tokens, padding_mask

    def targets(
        self,
        x: Tensor,
        site_padding_mask: Optional[Tensor] = None,
        *,
        missing_mask: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Reconstruction targets in token order, with their validity.

        Args:
            x: float ``[b, s, t]`` or ``[b, s, t, c]`` (as in `forward`).
            site_padding_mask: optional bool ``[b, s]``, True = padding site.
            missing_mask: optional bool of ``x``'s shape, True = missing value.

        Returns:
            ``(target, target_valid)``: target ``[b, t*P, g*c]`` in ``x``'s dtype, values laid
            out ``(g c)``, unobserved ones replaced by 0; target_valid bool of the same shape,
            **True = observed value**, the weight for a masked loss.
        """
        values, observed = self._grouped(x, site_padding_mask, missing_mask)
        target: Tensor = rearrange(values, "b t p k -> b (t p) k")
        target_valid: Tensor = rearrange(observed, "b t p k -> b (t p) k")
        return target, target_valid

    def layout_to_tokens(self, values: Tensor) -> Tensor:
        """Map a per-patch tensor in the input layout to this tokenizer's token order.

        The input layout is patch-major: one entry per (site group, step), ``[b, P, t, ...]``
        with ``P = ceil(s / group_size)`` patches of ``group_size`` consecutive sites.
        Typical use: a bool hidden mask drawn by a data pipeline (True = hidden), see
        ``MultimodalMAE.forward(hidden_masks=...)``.

        Args:
            values: ``[b, P, t, ...]``, any dtype.

        Returns:
            ``[b, t*P, ...]``, time-major like the tokens (token ``n = t_i * P + p``).
        """
        v = check_tensor("values", values)
        if v.ndim < 3 or v.shape[1] != self.num_patches:
            raise ValueError(
                f"values must be [b, {self.num_patches}, t, ...] (site groups x steps), got "
                f"shape {tuple(v.shape)}"
            )
        return v.transpose(1, 2).flatten(1, 2)

    def token_positions(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """Time step and patch of every token.

        Args:
            num_steps: ``t``.

        Returns:
            ``(t_index, patch_index)``, both int64 ``[t*P]``: token ``n`` is step
            ``n // P`` of patch ``n % P`` (sites ``p*g .. p*g + g - 1``).
        """
        t = check_int("num_steps", num_steps, minimum=1)
        device = self.proj.weight.device
        t_index = torch.arange(t, device=device).repeat_interleave(self.num_patches)
        return t_index, torch.arange(self.num_patches, device=device).repeat(t)

    def position_embedding(
        self,
        num_steps: Optional[int] = None,
        time_positions: Optional[Tensor] = None,
    ) -> Tensor:
        """The spatial + time part of the tokens (no values, no modality vector).

        Args:
            num_steps: ``t`` (may be omitted when ``time_positions`` is given).
            time_positions: optional real ``[t]`` or ``[b, t]`` step positions.

        Returns:
            ``[t*P, d]`` (``[b, t*P, d]`` for ``[b, t]`` time positions), time-major.
        """
        return self._flat_position_embedding(num_steps, time_positions, self.num_patches)


class StaticToken(nn.Module):
    """One never-padded token from static attributes (e.g. catchment descriptors).

    Appended to a sequence (see `append_tokens`) it guarantees every sample at least one real
    key. Missing attributes (non-finite values) are replaced by 0 and flagged by a 0/1 indicator
    (1 = missing), so the projection is ``proj([values, missing])`` (Linear ``2a -> d``).

    With ``per_site=True`` the attributes are per site: every real site is projected without
    the bias, the projections are averaged over the real sites only, and the bias is added. A
    sample with zero real sites gets exactly the learned bias (a finite token). Padded sites
    never influence anything, whatever they hold (NaN included).

    With ``missing_flags=False`` there are no indicators: the projection is ``proj(values)``
    (Linear ``a -> d``, the downstream water model's static token ``Linear(11 -> d)``), and
    with ``per_site=True`` each attribute is first averaged over the real sites where it is
    observed (0 when it is observed at none), then projected. A sample with zero real sites
    again gets exactly the learned bias.

    Args:
        num_attributes: ``a``.
        embed_dim: token width ``d``.
        per_site: attributes are ``[b, s, a]`` (averaged over real sites) instead of ``[b, a]``.
        missing_flags: project the 0/1 missing indicators beside the values (default True).

    Shapes: ``b`` batch, ``s`` sites, ``a`` attributes, ``d`` width.
    """

    def __init__(
        self,
        num_attributes: int,
        embed_dim: int,
        *,
        per_site: bool = False,
        missing_flags: bool = True,
    ) -> None:
        super().__init__()
        self.num_attributes = check_int("num_attributes", num_attributes, minimum=1)
        self.embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        self.per_site = _check_flag("per_site", per_site)
        self.missing_flags = _check_flag("missing_flags", missing_flags)
        proj_in = 2 * self.num_attributes if missing_flags else self.num_attributes
        self.proj = nn.Linear(proj_in, self.embed_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.trunc_normal_(self.proj.bias, std=0.02)

    def check_static(self, static: object, site_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Check ``static`` (and ``site_padding_mask``) as `forward` would, without any work
        (metadata only); composites call it at their entry point. Returns ``static``."""
        x = _check_float("static", static)
        want = 3 if self.per_site else 2
        if x.ndim != want or x.shape[-1] != self.num_attributes:
            layout = "[b, s, a]" if self.per_site else "[b, a]"
            raise ValueError(
                f"static must have shape {layout} with a={self.num_attributes} "
                f"(per_site={self.per_site}), got {tuple(x.shape)}"
            )
        if site_padding_mask is not None and not self.per_site:
            raise ValueError("site_padding_mask is only accepted with per_site=True")
        if self.per_site:
            check_padding_mask(
                "site_padding_mask", site_padding_mask, (x.shape[0], x.shape[1]), "static"
            )
        return x

    def forward(
        self, static: Tensor, site_padding_mask: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        """Embed the static attributes as one token.

        Args:
            static: float ``[b, a]`` (or ``[b, s, a]`` with ``per_site=True``); NaN/inf =
                missing attribute.
            site_padding_mask: optional bool ``[b, s]``, **True = padding site** (only with
                ``per_site=True``).

        Returns:
            ``(token, padding_mask)``: token ``[b, 1, d]``; padding_mask bool ``[b, 1]``, all
            False (**True = padding**; this token is always real).
        """
        x = self.check_static(static, site_padding_mask)
        b = x.shape[0]
        dtype = self.proj.weight.dtype
        observed = torch.isfinite(x)
        if not self.missing_flags:
            return self._unflagged(x, observed, site_padding_mask), x.new_zeros(
                b, 1, dtype=torch.bool
            )
        values = torch.where(observed, x, x.new_zeros(())).to(dtype)
        feats = torch.cat([values, (~observed).to(dtype)], dim=-1)
        if self.per_site:
            h = nn.functional.linear(feats, self.proj.weight)  # [b s d]
            if site_padding_mask is None:
                real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            else:
                real = ~site_padding_mask
            total = torch.where(real[..., None], h, h.new_zeros(())).sum(dim=1)
            count = real.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)
            token = total / count + self.proj.bias
        else:
            token = self.proj(feats)
        return token[:, None, :], torch.zeros(b, 1, dtype=torch.bool, device=x.device)

    def _unflagged(
        self, x: Tensor, observed: Tensor, site_padding_mask: Optional[Tensor]
    ) -> Tensor:
        """``proj(values)`` without missing flags: ``[b, 1, d]``; per site, each attribute is
        first averaged over the real sites where it is observed (0 where none)."""
        if self.per_site and site_padding_mask is not None:
            observed = observed & ~site_padding_mask[..., None]
        values = torch.where(observed, x, x.new_zeros(()))
        if self.per_site:
            count = observed.sum(dim=1).clamp(min=1).to(values.dtype)
            values = values.sum(dim=1) / count  # [b a]
        return self.proj(values.to(self.proj.weight.dtype))[:, None, :]


def append_tokens(
    tokens: Tensor,
    padding_mask: Optional[Tensor],
    extra_tokens: Tensor,
    extra_padding_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Concatenate two token sets along the token axis, with their padding masks.

    Typical use: append a `StaticToken` to a series' tokens so every sample keeps a real key.

    Args:
        tokens: ``[b, n, d]``.
        padding_mask: bool ``[b, n]``, **True = padding**, or None (all real).
        extra_tokens: ``[b, m, d]`` (same ``b`` and ``d``).
        extra_padding_mask: bool ``[b, m]``, True = padding, or None (all real).

    Returns:
        ``(tokens, padding_mask)``: ``[b, n + m, d]`` (dtype promoted as `torch.cat` does) and
        bool ``[b, n + m]``; the extra tokens come last.
    """
    x = check_tensor("tokens", tokens)
    e = check_tensor("extra_tokens", extra_tokens)
    if x.ndim != 3:
        raise ValueError(f"tokens must have shape [b, n, d], got {tuple(x.shape)}")
    if e.ndim != 3 or e.shape[0] != x.shape[0] or e.shape[2] != x.shape[2]:
        raise ValueError(
            f"extra_tokens must have shape [{x.shape[0]}, m, {x.shape[2]}] to match tokens "
            f"{tuple(x.shape)}, got {tuple(e.shape)}"
        )
    if e.device != x.device:
        raise ValueError(f"extra_tokens is on {e.device} but tokens is on {x.device}")
    b, n, m = x.shape[0], x.shape[1], e.shape[1]
    pm = check_padding_mask("padding_mask", padding_mask, (b, n), "tokens")
    em = check_padding_mask("extra_padding_mask", extra_padding_mask, (b, m), "extra_tokens")
    if pm is None:
        pm = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    if em is None:
        em = torch.zeros(b, m, dtype=torch.bool, device=x.device)
    return torch.cat([x, e], dim=1), torch.cat([pm, em], dim=1)
