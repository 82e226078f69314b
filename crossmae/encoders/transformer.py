"""Transformer encoder over a padded token set, with per-layer feature taps and FiLM.

Legend: ``b`` batch, ``n`` tokens, ``c`` width, ``k`` returned feature maps,
``a`` conditioning width. Mask polarity: ``padding_mask`` True = padding slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional, Union, cast

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import (
    check_bool,
    check_float_tensor,
    check_int,
    check_optional_bool,
    check_padding_mask,
    check_probability,
)
from ..layers import backend
from ..layers.attention import warn_trailing
from ..layers.blocks import Block
from ..layers.drop import DropPath, drop_path_schedule
from ..layers.packing import (
    PackedTokens,
    _packed_batch_size,
    pack_tokens,
    packed_segment_ids,
    unpack_tokens,
)

__all__ = ["EncoderOutput", "FiLM", "TransformerEncoder", "resolve_layer_indices"]

LayerSelection = Union[None, str, int, Sequence[int]]


class EncoderOutput(NamedTuple):
    """What `TransformerEncoder` returns.

    Attributes:
        tokens: ``[b, n, c]`` output of the last block (after the final norm if enabled).
        padding_mask: bool ``[b, n]`` (True = padding) passed through, or None.
        features: ``[k, b, n, c]`` stacked outputs of the selected layers (raw block
            outputs, before any final norm; the input first when ``include_input``), or None.
    """

    tokens: Tensor
    padding_mask: Optional[Tensor]
    features: Optional[Tensor]


def resolve_layer_indices(
    layers: LayerSelection, depth: int, name: str = "layers"
) -> tuple[int, ...]:
    """Normalize a layer selection (``"all"``, an int, or ints, negatives allowed) to indices.

    Args:
        layers: the selection; None selects nothing.
        depth: number of layers.
        name: the argument name used in error messages (e.g. ``"return_layers"``).

    Returns:
        Sorted indices in ``[0, depth)``. Raises TypeError for a selection that is not
        ``"all"``, an int or a sequence of ints, and ValueError when an index is out of
        range, repeated, or the selection is empty.
    """
    if layers is None:
        return ()
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"{name} must be 'all', an int or a sequence of ints, got {layers!r}")
        return tuple(range(depth))
    if isinstance(layers, bool) or not isinstance(layers, (int, Sequence)):
        raise TypeError(
            f"{name} must be 'all', an int or a sequence of ints, got {layers!r} "
            f"({type(layers).__name__})"
        )
    items = [layers] if isinstance(layers, int) else list(layers)
    out: list[int] = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name} must hold ints, got {i!r} in {layers!r}")
        if not -depth <= i < depth:
            raise ValueError(
                f"{name} index {i} is out of range for depth {depth} (got {name}={layers!r})"
            )
        out.append(i % depth)
    if not out:
        raise ValueError(f"{name} selects no layer: {layers!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} selects a layer twice: {layers!r}")
    return tuple(sorted(out))


def _param_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """dtype of the module's first floating-point parameter (None when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _check_input_dtype(name: str, x: Tensor, dtype: Optional[torch.dtype], owner: str) -> None:
    """``x`` must have the module's parameter dtype, unless autocast is on (metadata only)."""
    if dtype is None or x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(
        f"{name} has dtype {x.dtype} but the {owner}'s parameters are {dtype}: cast it with "
        f".to({dtype}), convert the module, or run under torch.autocast"
    )


def _check_capacity(
    capacity: object, tokens: Tensor, padding_mask: Optional[Tensor]
) -> Optional[int]:
    """Validate an encoder's ``capacity=`` (rows of the packed layout, see `pack_tokens`).

    A static Python int ``>= 0`` (``bool`` is refused) or None. Without a padding mask every
    one of the ``b * n`` slots is a real token, so the check against the real count is free
    (static shapes) and done here; with a mask, `pack_tokens` checks it (a ``ValueError``
    off-GPU, a device-side assertion on CUDA).
    """
    if capacity is None:
        return None
    cap = check_int("capacity", capacity, minimum=0)
    if padding_mask is None:
        real = tokens.shape[0] * tokens.shape[1]
        if cap < real:
            raise ValueError(
                f"capacity={cap} is smaller than the {real} real tokens of tokens "
                f"{tuple(tokens.shape)} (no padding_mask: every slot is real)"
            )
    return cap


def _packed_row_index(packed: PackedTokens, batch_size: int) -> Tensor:
    """The sample of every packed row, int64 ``[t]``, clamped to ``batch_size - 1`` (slack
    rows borrow the last sample's index: their values are meaningless); for per-sample
    lookups ``values[b, ...] -> values[index]``."""
    return packed_segment_ids(packed).clamp(max=max(batch_size - 1, 0))


def _per_row(values: Tensor, index: Tensor, batch_size: int, rows: int) -> Tensor:
    """Per-sample ``values [b, ...]`` looked up for every packed row: ``[t, ...]`` (zeros
    for an empty batch, where there is no sample to look up)."""
    if batch_size == 0:
        return values.new_zeros(rows, *values.shape[1:])
    return values[index]


def _unpack_features(
    features: Optional[Tensor], packed: PackedTokens, batch_size: int
) -> Optional[Tensor]:
    """Stacked packed feature maps ``[k, t, c]`` back to ``[k, b, n, c]`` (padding slots 0),
    contiguous, in one ``index_copy`` (the `unpack_tokens` of a stack)."""
    if features is None:
        return None
    k, t = features.shape[:2]
    bn = batch_size * packed.num_tokens
    rest = features.shape[2:]
    # map j's row r to slot j * bn + source_index[r]; slack rows to one scratch slot at the end
    offsets = torch.arange(k, device=features.device) * bn
    index = (offsets[:, None] + packed.source_index[None, :]).masked_fill(
        packed.row_padding_mask[None, :], k * bn
    )
    out = features.new_zeros(k * bn + 1, *rest)
    out = out.index_copy(0, index.reshape(k * t), features.reshape(k * t, *rest))
    return out[: k * bn].view(k, batch_size, packed.num_tokens, *rest)


def _zero_padding(out: EncoderOutput, pad: Tensor) -> EncoderOutput:
    """``out`` with 0 in every padding slot of ``tokens [b, n, c]`` and ``features
    [k, b, n, c]`` (what the packed route returns there)."""
    tokens = out.tokens.masked_fill(pad[..., None], 0.0)
    features = out.features
    if features is not None:
        features = features.masked_fill(pad[None, ..., None], 0.0)
    return EncoderOutput(tokens, out.padding_mask, features)


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``x * (1 + scale(cond)) + shift(cond)``.

    Zero-initialised, so a freshly built FiLM is the identity.

    Args:
        cond_dim: conditioning width ``a``.
        dim: modulated width ``c``.

    Shapes:
        ``forward(x [b, n, c], cond [b, a]) -> [b, n, c]``, or packed rows
        ``forward(x [t, c], cond [t, a]) -> [t, c]``. ``x`` must have the module's dtype
        (unless autocast is on); ``cond`` is cast to it.
    """

    def __init__(self, cond_dim: int, dim: int) -> None:
        super().__init__()
        self.cond_dim = check_int("cond_dim", cond_dim, minimum=1)
        self.dim = check_int("dim", dim, minimum=1)
        self.proj = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """Modulate ``x`` by ``cond``: ``x * (1 + scale(cond)) + shift(cond)``.

        Args:
            x: ``[b, n, c]``, or packed rows ``[t, c]``, of the module's dtype (unless autocast
                is on).
            cond: ``[b, a]`` for ``x [b, n, c]`` (one vector per sample, broadcast over ``n``),
                or ``[t, a]`` for packed ``x [t, c]`` (one row per token); cast to the module's
                dtype.

        Returns:
            Same shape as ``x``: ``[b, n, c]`` or ``[t, c]``.
        """
        x = check_float_tensor("x", x)
        if x.ndim not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have shape [b, n, {self.dim}] (or packed [t, {self.dim}]), "
                f"got {tuple(x.shape)}"
            )
        _check_input_dtype("x", x, self.proj.weight.dtype, "FiLM")
        c = check_float_tensor("cond", cond)
        if tuple(c.shape) != (x.shape[0], self.cond_dim):
            layout = "[b, a]" if x.ndim == 3 else "[t, a] (one row per packed token)"
            raise ValueError(
                f"cond must have shape {layout} = {(x.shape[0], self.cond_dim)} for x of shape "
                f"{tuple(x.shape)}, got {tuple(c.shape)}"
            )
        # cond is a side input (e.g. float32 attributes): it follows the module's dtype.
        mod = self.proj(c.to(self.proj.weight.dtype))
        if x.ndim == 3:  # [b, n, c] with cond [b, a]; packed rows [t, c] come with cond [t, a]
            mod = mod.unsqueeze(1)
        scale, shift = mod.chunk(2, dim=-1)
        return torch.addcmul(x + shift, x, scale)


class TransformerEncoder(nn.Module):
    """Pre-norm ViT-style encoder (`Block` stack) over a padded token set.

    Args:
        dim: token width ``c``.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: bias on the qkv projections (ViT/MAE use True).
        drop: dropout in blocks (training only).
        attn_drop: attention-weight dropout (training only).
        drop_path: stochastic depth, increased linearly from 0 to this value over the blocks.
        act_layer: MLP activation constructor.
        norm_layer: norm constructor (called with ``dim``); MAE uses LayerNorm(eps=1e-6).
        final_norm: apply a final norm to ``tokens`` (feature taps are always raw).
        cond_dim: if set, every block is followed by a `FiLM` on a per-sample vector
            ``cond [b, cond_dim]`` (e.g. static catchment attributes).
        fused_attn: see `Attention`.

    Shapes:
        ``forward(tokens [b, n, c], padding_mask [b, n] | None, *, cond [b, a] | None,
        return_layers=None | "all" | int | ints, include_input=False, capacity=None | int)
        -> EncoderOutput`` (``capacity``: run the blocks on the real tokens packed into that
        many rows, padded layout in and out; ``padding_is_trailing`` is deprecated and ignored: the attention backend decides
        the layout once per forward, see `crossmae.layers.backend`).
        ``padding_mask`` True = padding: padded tokens never act as keys, their outputs are
        finite and meaningless, and samples with no real token produce finite outputs.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        final_norm: bool = True,
        cond_dim: Optional[int] = None,
        fused_attn: Optional[bool] = None,
    ) -> None:
        super().__init__()
        check_bool("qkv_bias", qkv_bias)
        check_bool("final_norm", final_norm)
        check_optional_bool("fused_attn", fused_attn)
        self.dim = check_int("dim", dim, minimum=1)
        self.depth = check_int("depth", depth, minimum=0)
        check_probability("drop_path", drop_path)
        rates = drop_path_schedule(drop_path, depth)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=r,
                act_layer=act_layer,
                norm_layer=norm_layer,
                fused_attn=fused_attn,
            )
            for r in rates
        )
        self.cond_dim = cond_dim
        self.films: Optional[nn.ModuleList] = None
        if cond_dim is not None:
            check_int("cond_dim", cond_dim, minimum=1)
            self.films = nn.ModuleList(FiLM(cond_dim, dim) for _ in range(depth))
        self.norm: nn.Module = norm_layer(dim) if final_norm else nn.Identity()

    def forward(
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        cond: Optional[Tensor] = None,
        return_layers: LayerSelection = None,
        include_input: bool = False,
        padding_is_trailing: Optional[bool] = None,
        capacity: Optional[int] = None,
    ) -> EncoderOutput:
        """Encode a padded token set with the `Block` stack.

        Args:
            tokens: ``[b, n, c]``, floating point, of the encoder's dtype (any float dtype
                under autocast).
            padding_mask: bool ``[b, n]``, True = padding, or None (no padding). Padded tokens
                never act as keys; their outputs are finite and meaningless, and a sample with no
                real token produces finite outputs.
            cond: ``[b, a]`` per-sample conditioning for the `FiLM` after every block (``a =
                cond_dim``); required exactly when the encoder was built with ``cond_dim``.
            return_layers: which block outputs to return in ``features``: None (none),
                ``"all"``, an int or a sequence of ints (negatives count from the end).
            include_input: also return the (padding-zeroed) input as ``features[0]``; needs
                ``return_layers``.
            padding_is_trailing: deprecated, ignored; FutureWarning (the attention backend
                decides the layout once per forward, see `crossmae.layers.backend`).
            capacity: padded in, padded out at packed cost. A static int ``t >= 0``: the
                blocks run on the real tokens packed into ``t`` rows (`pack_tokens`: a bucket,
                e.g. the real total rounded up to 128), so projections and MLPs cost ``t``
                rows instead of ``b * n``; the result has the padded layout, as without
                ``capacity``, with **0 in every padding slot** of ``tokens`` and
                ``features``. Must be at least the batch's real tokens: a ``ValueError``
                off-GPU, a device-side assertion on CUDA (no host sync, so the call can be
                compiled or captured in a CUDA graph). With ``padding_mask=None`` the packed
                and padded layouts coincide and the plain path runs (``capacity`` must still
                be ``>= b * n``). While training with attention dropout or stochastic depth
                (no packed kernel applies attention dropout; stochastic depth is per sample)
                the padded path runs instead, at padded cost, with the same result layout.
                None (default): the padded path.

        Returns:
            `EncoderOutput`: ``tokens [b, n, c]`` (after the final norm if enabled),
            ``padding_mask [b, n]`` (True = padding, passed through) and ``features
            [k, b, n, c]`` (raw block outputs of the selected layers, in block order, the
            input first with ``include_input``; in the autocast dtype under autocast) or None.

        Raises:
            TypeError: ``capacity`` not an int (``bool`` included), or the other arguments'
                types as above.
            ValueError: ``capacity`` negative or smaller than the real tokens (off-GPU).
        """
        if padding_is_trailing is not None:
            warn_trailing("padding_is_trailing", padding_is_trailing)
        check_bool("include_input", include_input)
        x = check_float_tensor("tokens", tokens, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"tokens has width {x.shape[-1]} (shape {tuple(x.shape)}) but dim={self.dim}"
            )
        _check_input_dtype("tokens", x, _param_dtype(self), "encoder")
        pad = check_padding_mask("padding_mask", padding_mask, x.shape[:2], "tokens [b, n, c]")
        if self.films is not None:
            c = check_float_tensor("cond", cond, ndim=2)
            if tuple(c.shape) != (x.shape[0], self.cond_dim):
                raise ValueError(
                    f"cond must have shape {(x.shape[0], self.cond_dim)}, got {tuple(c.shape)}"
                )
            cond = c.to(cast(FiLM, self.films[0]).proj.weight.dtype) if len(self.films) else c
        elif cond is not None:
            raise ValueError("cond was given but the encoder was built without cond_dim")
        if include_input and return_layers is None:
            raise ValueError("include_input=True needs return_layers")
        taps = set(resolve_layer_indices(return_layers, self.depth, "return_layers"))
        cap = _check_capacity(capacity, x, pad)
        # Feature taps are consumed by a matmul (WeightedFeatureMaps): under autocast keep them
        # in the autocast dtype, which halves the traffic of stacking them.
        tap_dtype: Optional[torch.dtype] = None
        if taps and torch.is_autocast_enabled(x.device.type):
            tap_dtype = torch.get_autocast_dtype(x.device.type)
        if cap is not None and pad is not None:
            if self._packed_exact():
                return self._forward_capacity(x, pad, cap, cond, taps, include_input, tap_dtype)
            out = self._forward_padded(x, pad, cond, taps, include_input, tap_dtype)
            return _zero_padding(out, pad)
        return self._forward_padded(x, pad, cond, taps, include_input, tap_dtype)

    def _forward_padded(
        self,
        x: Tensor,
        pad: Optional[Tensor],
        cond: Optional[Tensor],
        taps: set[int],
        include_input: bool,
        tap_dtype: Optional[torch.dtype],
    ) -> EncoderOutput:
        """The blocks over the padded layout (inputs checked by `forward`)."""
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        # The packed kernel wants padding at the end of every row: reorder once here
        # (attention is permutation-equivariant), not in every layer.
        x, block_pad, plan, perm = backend.order_for(self._plan(x, pad, "padded"), x, pad)

        def tap(t: Tensor) -> Tensor:
            return t if tap_dtype is None else t.to(tap_dtype)

        feats: list[Tensor] = [tap(x)] if include_input else []
        for i, blk in enumerate(self.blocks):
            x = blk(x, block_pad, plan=plan)
            if self.films is not None:
                x = self.films[i](x, cond)
            if i in taps:
                feats.append(tap(x))
        features = torch.stack(feats, dim=0) if feats else None
        if perm is not None:
            x, features = backend.restore_order(perm, x, features)
        return EncoderOutput(self.norm(x), pad, features)

    def _packed_exact(self) -> bool:
        """Whether the packed route computes what the padded one does in this mode: not while
        training with attention dropout (no packed kernel applies it) or stochastic depth
        (per sample on the padded layout, per row on packed rows)."""
        if not self.training:
            return True
        for blk in self.blocks:
            b = cast(Block, blk)
            if b.attn.attn_drop > 0:
                return False
            for dp in (b.drop_path1, b.drop_path2):
                if isinstance(dp, DropPath) and dp.drop_prob > 0:
                    return False
        return True

    def _forward_capacity(
        self,
        x: Tensor,
        pad: Tensor,
        capacity: int,
        cond: Optional[Tensor],
        taps: set[int],
        include_input: bool,
        tap_dtype: Optional[torch.dtype],
    ) -> EncoderOutput:
        """``forward(..., capacity=)``: pack, run the blocks on the rows, unpack."""
        b = x.shape[0]
        packed = pack_tokens(x, pad, capacity)
        row_cond: Optional[Tensor] = None
        if cond is not None and self.films is not None:
            index = _packed_row_index(packed, b)
            row_cond = _per_row(cond, index, b, capacity)
        rows, features = self._run_packed(packed, row_cond, taps, include_input, tap_dtype)
        tokens = unpack_tokens(rows, packed, b)
        return EncoderOutput(tokens, pad, _unpack_features(features, packed, b))

    def _run_packed(
        self,
        packed: PackedTokens,
        row_cond: Optional[Tensor],
        taps: set[int],
        include_input: bool,
        tap_dtype: Optional[torch.dtype],
    ) -> tuple[Tensor, Optional[Tensor]]:
        """The blocks over packed rows: ``(tokens [t, c] after the final norm, features
        [k, t, c] or None)``; ``row_cond [t, a]`` is FiLM's per-row conditioning."""
        x = packed.tokens

        def tap(t: Tensor) -> Tensor:
            return t if tap_dtype is None else t.to(tap_dtype)

        feats: list[Tensor] = [tap(x)] if include_input else []
        plan = self._plan(x, None, "packed")
        for i, blk in enumerate(self.blocks):
            x = cast(Block, blk).forward_packed(x, packed.cu_seqlens, packed.max_seqlen, plan=plan)
            if self.films is not None and row_cond is not None:
                x = self.films[i](x, row_cond)
            if i in taps:
                feats.append(tap(x))
        features = torch.stack(feats, dim=0) if feats else None
        return self.norm(x), features

    def _plan(self, x: Tensor, pad: Optional[Tensor], layout: str) -> backend.AttentionPlan:
        """The attention plan of this forward (decided once for every block)."""
        if not len(self.blocks):
            return backend.AttentionPlan("sdpa")
        attn = cast(Block, self.blocks[0]).attn
        return backend.plan_for(
            x,
            attn.head_dim,
            padding_mask=pad,
            layout=layout,
            dropout_p=attn.attn_drop if self.training else 0.0,
            fused=attn.fused_attn,
        )

    def forward_packed(
        self,
        packed: PackedTokens,
        *,
        cond: Optional[Tensor] = None,
        return_layers: LayerSelection = None,
        include_input: bool = False,
    ) -> EncoderOutput:
        """Encode a packed layout (see `pack_tokens`): cost follows the real tokens.

        Returns an `EncoderOutput` whose ``tokens`` are ``[t, c]`` packed rows, whose
        ``padding_mask`` is the slack-row mask ``[t]`` (True = not a real token) and whose
        ``features`` are ``[k, t, c]``; `unpack_tokens` brings rows back to ``[b, n, c]``.
        ``cond [b, a]`` (FiLM) is looked up per row.
        """
        check_bool("include_input", include_input)
        if not isinstance(packed, PackedTokens):
            raise TypeError(f"packed must be PackedTokens, got {type(packed).__name__}")
        x = check_float_tensor("packed.tokens", packed.tokens, ndim=2)
        if x.shape[-1] != self.dim:
            raise ValueError(f"packed.tokens has width {x.shape[-1]} but dim={self.dim}")
        _check_input_dtype("packed.tokens", x, _param_dtype(self), "encoder")
        row_cond: Optional[Tensor] = None
        if self.films is not None:
            c = check_float_tensor("cond", cond, ndim=2)
            t = x.shape[0]
            b = _packed_batch_size(packed)  # from the static layout, no sync
            if tuple(c.shape) != (b, self.cond_dim):
                raise ValueError(
                    f"cond must have shape {(b, self.cond_dim)} (one row per packed sample), "
                    f"got {tuple(c.shape)}"
                )
            c = c.to(cast(FiLM, self.films[0]).proj.weight.dtype) if len(self.films) else c
            row_cond = _per_row(c, _packed_row_index(packed, b), b, t)
        elif cond is not None:
            raise ValueError("cond was given but the encoder was built without cond_dim")
        if include_input and return_layers is None:
            raise ValueError("include_input=True needs return_layers")
        taps = set(resolve_layer_indices(return_layers, self.depth, "return_layers"))
        rows, features = self._run_packed(packed, row_cond, taps, include_input, None)
        return EncoderOutput(rows, packed.row_padding_mask, features)
