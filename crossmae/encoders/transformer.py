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
from ..layers.drop import drop_path_schedule
from ..layers.packing import PackedTokens, packed_segment_ids

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
        return_layers=None | "all" | int | ints, include_input=False) -> EncoderOutput``
        (``padding_is_trailing`` is deprecated and ignored: the attention backend decides
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

        Returns:
            `EncoderOutput`: ``tokens [b, n, c]`` (after the final norm if enabled),
            ``padding_mask [b, n]`` (True = padding, passed through) and ``features
            [k, b, n, c]`` (raw block outputs of the selected layers, in block order, the
            input first with ``include_input``; in the autocast dtype under autocast) or None.
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
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        plan = self._plan(x, pad, "padded")
        perm: Optional[Tensor] = None
        block_pad = pad
        if pad is not None and plan.reorder:
            # The packed kernel wants padding at the end of every row: reorder once here
            # (attention is permutation-equivariant), not in every layer.
            x, block_pad, perm = backend.trailing_order(x, pad)
            plan = plan.reordered()
        # Feature taps are consumed by a matmul (WeightedFeatureMaps): under autocast keep them
        # in the autocast dtype, which halves the traffic of stacking them.
        tap_dtype: Optional[torch.dtype] = None
        if taps and torch.is_autocast_enabled(x.device.type):
            tap_dtype = torch.get_autocast_dtype(x.device.type)

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
            # segments: b samples, then max(1, ceil(t / max_seqlen)) slack pieces (static)
            t = x.shape[0]
            b = packed.cu_seqlens.shape[0] - 1 - max(1, -(-t // max(packed.max_seqlen, 1)))
            if tuple(c.shape) != (b, self.cond_dim):
                raise ValueError(
                    f"cond must have shape {(b, self.cond_dim)} (one row per packed sample), "
                    f"got {tuple(c.shape)}"
                )
            c = c.to(cast(FiLM, self.films[0]).proj.weight.dtype) if len(self.films) else c
            seg = packed_segment_ids(packed).clamp(max=max(b - 1, 0))
            row_cond = c[seg] if b > 0 else c.new_zeros(x.shape[0], c.shape[1])
        elif cond is not None:
            raise ValueError("cond was given but the encoder was built without cond_dim")
        if include_input and return_layers is None:
            raise ValueError("include_input=True needs return_layers")
        taps = set(resolve_layer_indices(return_layers, self.depth, "return_layers"))
        feats: list[Tensor] = [x] if include_input else []
        plan = self._plan(x, None, "packed")
        for i, blk in enumerate(self.blocks):
            x = cast(Block, blk).forward_packed(x, packed.cu_seqlens, packed.max_seqlen, plan=plan)
            if self.films is not None and row_cond is not None:
                x = self.films[i](x, row_cond)
            if i in taps:
                feats.append(x)
        features = torch.stack(feats, dim=0) if feats else None
        return EncoderOutput(self.norm(x), packed.row_padding_mask, features)
