"""Post-norm Transformer encoder (``nn.TransformerEncoderLayer(norm_first=False)`` style).

`PostNormBlock` is ``x = norm1(x + attn(x))`` then ``x = norm2(x + mlp(x))``, optionally
FiLM-modulated after each norm (``x = γ·norm(x + f(x)) + β``, the downstream water model's
series layers); `PostNormTransformerEncoder` stacks them, adds a final norm and satisfies
the `Encoder` protocol. The attention math is `Attention`'s (exact under padding).

Legend: ``b`` batch, ``n`` tokens, ``c`` width, ``k`` returned feature maps, ``a``
conditioning width. Mask polarity: ``padding_mask`` True = padding slot.
"""

from __future__ import annotations

from typing import Callable, Optional, cast

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import (
    check_bool,
    check_float_tensor,
    check_int,
    check_optional_bool,
    check_padding_mask,
)
from ..layers import backend
from ..layers.attention import Attention
from ..layers.mlp import Mlp
from ..layers.packing import pack_tokens, unpack_tokens
from .film import FiLMProjection
from .transformer import (
    EncoderOutput,
    LayerSelection,
    _check_capacity,
    _check_input_dtype,
    _packed_row_index,
    _param_dtype,
    _per_row,
    _unpack_features,
    _zero_padding,
    resolve_layer_indices,
)

__all__ = ["PostNormBlock", "PostNormTransformerEncoder"]


def _hidden(dim: int, mlp_ratio: object) -> int:
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
    return max(1, int(dim * mlp_ratio))


class PostNormBlock(nn.Module):
    """Post-norm Transformer layer, as ``nn.TransformerEncoderLayer(norm_first=False)``.

    ``x = norm1(x + attn(x))``, then ``x = norm2(x + mlp(x))``. With ``gamma``/``beta``
    given, each norm output is modulated: ``x = γ·norm1(x + attn(x)) + β`` and
    ``x = γ·norm2(x + mlp(x)) + β`` (FiLM in the post-norm form; one ``(γ, β)`` pair per
    layer, e.g. from a `FiLMProjection`).

    Equal to ``nn.TransformerEncoderLayer(dim, num_heads, int(mlp_ratio * dim), drop,
    activation="relu", batch_first=True, norm_first=False)`` when its weights are copied
    (``in_proj`` → ``attn.qkv``, ``out_proj`` → ``attn.proj``, ``linear1``/``linear2`` →
    ``mlp.fc1``/``mlp.fc2``, ``norm1``/``norm2``), in eval mode; dropout sits in the same
    places (attention weights, after the attention projection, after the activation, after
    ``fc2``).

    Args:
        dim: token width ``c``.
        num_heads: attention heads.
        mlp_ratio: feed-forward hidden width as a multiple of ``dim`` (4 → ``4·c``).
        qkv_bias: bias on the ``qkv`` projection (``nn.MultiheadAttention`` has one).
        drop: dropout after the activation and after ``fc2`` (training only).
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the attention output projection (training only;
            ``nn.TransformerEncoderLayer``'s ``dropout1``). The downstream FiLM layers have
            none there: pass 0.
        act_layer: feed-forward activation constructor (ReLU, as PyTorch's default).
        norm_layer: norm constructor, called as ``norm_layer(dim)``.
        fused_attn: see `Attention`.

    Submodules: ``attn`` (`Attention`), ``norm1``, ``mlp`` (`Mlp`), ``norm2``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
        drop: float = 0.1,
        attn_drop: float = 0.1,
        proj_drop: float = 0.1,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        fused_attn: Optional[bool] = None,
    ) -> None:
        super().__init__()
        check_bool("qkv_bias", qkv_bias)
        check_optional_bool("fused_attn", fused_attn)
        self.dim = check_int("dim", dim, minimum=1)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            fused_attn=fused_attn,
        )
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, _hidden(dim, mlp_ratio), act_layer=act_layer, drop=drop)
        self.norm2 = norm_layer(dim)

    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        gamma: Optional[Tensor] = None,
        beta: Optional[Tensor] = None,
        plan: Optional[backend.AttentionPlan] = None,
    ) -> Tensor:
        """One post-norm layer, optionally FiLM-modulated after each norm.

        Args:
            x: float ``[b, n, c]`` tokens, in the parameters' dtype (any float dtype under
                autocast).
            padding_mask: optional bool ``[b, n]``, **True = padding**: padded tokens are
                zeroed on entry and never act as keys, so whatever they hold (NaN included)
                never reaches a real output; their own outputs are finite and meaningless. A
                sample with no real token gets finite outputs and gradients.
            gamma: optional float ``[b, c]`` FiLM scale (with ``beta``).
            beta: optional float ``[b, c]`` FiLM shift (with ``gamma``).
            plan: the stack's `AttentionPlan` (decided once per encoder forward), or None.

        Returns:
            ``[b, n, c]``.
        """
        x = check_float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"x has width {x.shape[-1]} (shape {tuple(x.shape)}) but dim={self.dim}"
            )
        pad = check_padding_mask("padding_mask", padding_mask, x.shape[:2], "x [b, n, c]")
        if (gamma is None) != (beta is None):
            raise ValueError("gamma and beta must be given together (FiLM), got only one")
        if gamma is not None and beta is not None:
            for name, t in (("gamma", gamma), ("beta", beta)):
                check_float_tensor(name, t, ndim=2)
                if tuple(t.shape) != (x.shape[0], self.dim):
                    raise ValueError(
                        f"{name} must have shape [b, c] = {(x.shape[0], self.dim)}, "
                        f"got {tuple(t.shape)}"
                    )
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        x = self.norm1(x + self.attn(x, pad, plan=plan))
        if gamma is not None and beta is not None:
            g, s = gamma[:, None], beta[:, None]
            x = torch.addcmul(s, g, x)
        x = self.norm2(x + self.mlp(x))
        if gamma is not None and beta is not None:
            x = torch.addcmul(beta[:, None], gamma[:, None], x)
        return x

    def forward_packed(
        self,
        x: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        *,
        gamma: Optional[Tensor] = None,
        beta: Optional[Tensor] = None,
        plan: Optional[backend.AttentionPlan] = None,
    ) -> Tensor:
        """The same layer over a packed layout (see `pack_tokens`).

        Args:
            x: float ``[t, c]`` packed rows (real tokens sample after sample, then slack).
            cu_seqlens: int32 segment boundaries (`PackedTokens.cu_seqlens`): rows attend only
                within their segment.
            max_seqlen: an upper bound of the segment lengths (`PackedTokens.max_seqlen`).
            gamma: optional float ``[t, c]`` FiLM scale, one row per packed row (with
                ``beta``; e.g. the per-sample ``[b, c]`` looked up by segment).
            beta: optional float ``[t, c]`` FiLM shift (with ``gamma``).
            plan: the stack's packed-layout `AttentionPlan`, or None (decided per call).
                Attention dropout is not applied on this path (see `Attention`).

        Returns:
            ``[t, c]``.
        """
        x = check_float_tensor("x", x, ndim=2)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"x has width {x.shape[-1]} (shape {tuple(x.shape)}) but dim={self.dim}"
            )
        if (gamma is None) != (beta is None):
            raise ValueError("gamma and beta must be given together (FiLM), got only one")
        if gamma is not None and beta is not None:
            for name, t in (("gamma", gamma), ("beta", beta)):
                check_float_tensor(name, t, ndim=2)
                if tuple(t.shape) != tuple(x.shape):
                    raise ValueError(
                        f"{name} must have shape [t, c] = {tuple(x.shape)} (one row per packed "
                        f"row), got {tuple(t.shape)}"
                    )
        x = self.norm1(x + self.attn.forward_packed(x, cu_seqlens, max_seqlen, plan=plan))
        if gamma is not None and beta is not None:
            x = torch.addcmul(beta, gamma, x)
        x = self.norm2(x + self.mlp(x))
        if gamma is not None and beta is not None:
            x = torch.addcmul(beta, gamma, x)
        return x


class PostNormTransformerEncoder(nn.Module):
    """Stack of `PostNormBlock` s plus a final norm: ``nn.TransformerEncoder`` style.

    Satisfies the `Encoder` protocol (int ``dim``, int ``depth``, ``forward(tokens,
    padding_mask=None, *, return_layers=None, include_input=False) -> EncoderOutput``). With
    ``cond_dim`` set it is a conditioning encoder (``cond_dim`` attribute, ``cond=`` keyword):
    every layer gets its own `FiLMProjection` ``act(Linear(cond_dim -> 2·dim))`` and applies
    ``x = γ·LN(x + f(x)) + β`` after both of its norms (pass the raw attributes, e.g. from
    `visible_patch_mean`).

    Why a class of its own and not a ``norm_first=`` flag on `TransformerEncoder`: the norm
    position changes every line of the layer and what FiLM modulates, and the pre-norm
    encoder's packed path and state-dict keys stay untouched.

    Args:
        dim: token width ``c``.
        depth: number of layers (``>= 0``).
        num_heads: attention heads.
        mlp_ratio: feed-forward width multiple (4 → ``4·c``).
        qkv_bias: bias on the ``qkv`` projections.
        drop: feed-forward dropout (after the activation and after ``fc2``; training only).
        attn_drop: attention-weight dropout (training only).
        proj_drop: dropout after each attention output projection (training only).
        act_layer: feed-forward activation constructor (default ReLU).
        norm_layer: norm constructor (``nn.LayerNorm``: eps 1e-5 as PyTorch's layers).
        final_norm: apply a final norm ``norm`` to ``tokens``.
        norm_features: also pass every returned feature map through the final norm (the
            downstream model takes its WFM taps after the encoder's final LayerNorm); needs
            ``final_norm=True``. Default False: feature maps are the raw layer outputs.
        cond_dim: conditioning width ``a`` (enables FiLM), or None.
        film_act_layer: activation of every `FiLMProjection` (default Tanh).
        fused_attn: see `Attention`.

    Submodules: ``blocks`` (`PostNormBlock` s), ``films`` (`FiLMProjection` s, only with
    ``cond_dim``), ``norm``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
        drop: float = 0.1,
        attn_drop: float = 0.1,
        proj_drop: float = 0.1,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        final_norm: bool = True,
        norm_features: bool = False,
        cond_dim: Optional[int] = None,
        film_act_layer: Callable[[], nn.Module] = nn.Tanh,
        fused_attn: Optional[bool] = None,
    ) -> None:
        super().__init__()
        check_bool("qkv_bias", qkv_bias)
        check_optional_bool("fused_attn", fused_attn)
        self.dim = check_int("dim", dim, minimum=1)
        self.depth = check_int("depth", depth, minimum=0)
        for flag_name, flag in (("final_norm", final_norm), ("norm_features", norm_features)):
            if not isinstance(flag, bool):
                raise TypeError(f"{flag_name} must be a bool, got {flag!r}")
        if norm_features and not final_norm:
            raise ValueError("norm_features=True needs final_norm=True (the norm it applies)")
        self.norm_features = norm_features
        self.blocks = nn.ModuleList(
            PostNormBlock(
                dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                act_layer=act_layer,
                norm_layer=norm_layer,
                fused_attn=fused_attn,
            )
            for _ in range(depth)
        )
        self.cond_dim: Optional[int] = None
        self.films: Optional[nn.ModuleList] = None
        if cond_dim is not None:
            self.cond_dim = check_int("cond_dim", cond_dim, minimum=1)
            self.films = nn.ModuleList(
                FiLMProjection(cond_dim, dim, act_layer=film_act_layer) for _ in range(depth)
            )
        self.norm: nn.Module = norm_layer(dim) if final_norm else nn.Identity()

    def forward(
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        cond: Optional[Tensor] = None,
        return_layers: LayerSelection = None,
        include_input: bool = False,
        capacity: Optional[int] = None,
    ) -> EncoderOutput:
        """Encode a padded token set.

        Args:
            tokens: float ``[b, n, c]`` in the parameters' dtype (any float dtype under
                autocast).
            padding_mask: optional bool ``[b, n]``, **True = padding**: padded tokens never
                act as keys, whatever they hold (NaN included) never reaches a real output or
                gradient, their own outputs are finite and meaningless, and a sample with no
                real token gets finite outputs and gradients.
            cond: float ``[b, a]`` conditioning vectors; required exactly when the encoder
                was built with ``cond_dim`` (any float dtype: cast to the parameters').
            return_layers: layers whose outputs to return as ``features`` (``"all"``, an
                int, or ints; negatives allowed), or None.
            include_input: put the input tokens (after zeroing padding) first in
                ``features``; needs ``return_layers``.
            capacity: padded in, padded out at packed cost. A static int ``t >= 0``: the
                layers run on the real tokens packed into ``t`` rows (`pack_tokens`: a
                bucket, e.g. the real total rounded up to 128), so projections and
                feed-forwards cost ``t`` rows instead of ``b * n``; the result has the padded
                layout, as without ``capacity``, with **0 in every padding slot** of
                ``tokens`` and ``features``. Must be at least the batch's real tokens: a
                ``ValueError`` off-GPU, a device-side assertion on CUDA (no host sync). With
                ``padding_mask=None`` the two layouts coincide and the plain path runs
                (``capacity`` must still be ``>= b * n``). While training with attention
                dropout (``attn_drop > 0``; no packed kernel applies it) the padded path
                runs instead, at padded cost, with the same result layout. None (default):
                the padded path.

        Returns:
            `EncoderOutput` ``(tokens [b, n, c] after the final norm, padding_mask [b, n] |
            None as given, features [k, b, n, c] | None)``; features are the raw layer
            outputs, or passed through the final norm with ``norm_features=True``.

        Raises:
            TypeError: ``capacity`` not an int (``bool`` included), or the other arguments'
                types as above.
            ValueError: ``capacity`` negative or smaller than the real tokens (off-GPU).
        """
        x = check_float_tensor("tokens", tokens, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"tokens has width {x.shape[-1]} (shape {tuple(x.shape)}) but dim={self.dim}"
            )
        _check_input_dtype("tokens", x, _param_dtype(self), "encoder")
        pad = check_padding_mask("padding_mask", padding_mask, x.shape[:2], "tokens [b, n, c]")
        if self.films is not None:
            if cond is None:
                raise ValueError(
                    f"cond [b, {self.cond_dim}] is required: the encoder was built with "
                    f"cond_dim={self.cond_dim}"
                )
            c = check_float_tensor("cond", cond, ndim=2)
            if tuple(c.shape) != (x.shape[0], self.cond_dim):
                raise ValueError(
                    f"cond must have shape [b, cond_dim] = {(x.shape[0], self.cond_dim)}, "
                    f"got {tuple(c.shape)}"
                )
        elif cond is not None:
            raise ValueError("cond was given but the encoder was built without cond_dim")
        if not isinstance(include_input, bool):
            raise TypeError(f"include_input must be a bool, got {include_input!r}")
        if include_input and return_layers is None:
            raise ValueError("include_input=True needs return_layers")
        taps = set(resolve_layer_indices(return_layers, self.depth, "return_layers"))
        cap = _check_capacity(capacity, x, pad)
        tap_dtype: Optional[torch.dtype] = None
        if taps and torch.is_autocast_enabled(x.device.type):
            tap_dtype = torch.get_autocast_dtype(x.device.type)
        if cap is not None and pad is not None:
            if self._packed_exact():
                return self._forward_capacity(x, pad, cap, cond, taps, include_input, tap_dtype)
            out = self._forward_padded(x, pad, cond, taps, include_input, tap_dtype)
            return _zero_padding(out, pad)
        return self._forward_padded(x, pad, cond, taps, include_input, tap_dtype)

    def _tap(self, t: Tensor, tap_dtype: Optional[torch.dtype]) -> Tensor:
        t = self.norm(t) if self.norm_features else t
        return t if tap_dtype is None else t.to(tap_dtype)

    def _forward_padded(
        self,
        x: Tensor,
        pad: Optional[Tensor],
        cond: Optional[Tensor],
        taps: set[int],
        include_input: bool,
        tap_dtype: Optional[torch.dtype],
    ) -> EncoderOutput:
        """The layers over the padded layout (inputs checked by `forward`)."""
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        plan = backend.AttentionPlan("sdpa")
        if len(self.blocks):
            attn = cast(PostNormBlock, self.blocks[0]).attn
            drop = attn.attn_drop if self.training else 0.0
            plan = backend.plan_for(
                x, attn.head_dim, padding_mask=pad, dropout_p=drop, fused=attn.fused_attn
            )
        x, block_pad, plan, perm = backend.order_for(plan, x, pad)  # packed kernel: once
        feats: list[Tensor] = [self._tap(x, tap_dtype)] if include_input else []
        for i, blk in enumerate(self.blocks):
            if self.films is not None and cond is not None:
                gamma, beta = self.films[i](cond)
                x = blk(x, block_pad, gamma=gamma, beta=beta, plan=plan)
            else:
                x = blk(x, block_pad, plan=plan)
            if i in taps:
                feats.append(self._tap(x, tap_dtype))
        features = torch.stack(feats, dim=0) if feats else None
        if perm is not None:
            x, features = backend.restore_order(perm, x, features)
        return EncoderOutput(self.norm(x), pad, features)

    def _packed_exact(self) -> bool:
        """Whether the packed route computes what the padded one does in this mode: not while
        training with attention dropout (no packed kernel applies it)."""
        if not self.training:
            return True
        return all(cast(PostNormBlock, blk).attn.attn_drop == 0 for blk in self.blocks)

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
        """``forward(..., capacity=)``: pack, run the layers on the rows, unpack."""
        b = x.shape[0]
        packed = pack_tokens(x, pad, capacity)
        rows = packed.tokens
        index = _packed_row_index(packed, b) if self.films is not None else None
        plan = backend.AttentionPlan("dense")
        if len(self.blocks):
            attn = cast(PostNormBlock, self.blocks[0]).attn
            plan = backend.plan_for(rows, attn.head_dim, layout="packed", fused=attn.fused_attn)
        feats: list[Tensor] = [self._tap(rows, tap_dtype)] if include_input else []
        for i, blk in enumerate(self.blocks):
            block = cast(PostNormBlock, blk)
            cu, longest = packed.cu_seqlens, packed.max_seqlen
            if self.films is not None and cond is not None and index is not None:
                gamma, beta = self.films[i](cond)
                g, s = _per_row(gamma, index, b, capacity), _per_row(beta, index, b, capacity)
                rows = block.forward_packed(rows, cu, longest, gamma=g, beta=s, plan=plan)
            else:
                rows = block.forward_packed(rows, cu, longest, plan=plan)
            if i in taps:
                feats.append(self._tap(rows, tap_dtype))
        features = torch.stack(feats, dim=0) if feats else None
        tokens = unpack_tokens(self.norm(rows), packed, b)
        return EncoderOutput(tokens, pad, _unpack_features(features, packed, b))
