"""Frozen configuration records for the image CrossMAE model and its parts.

`ImageCrossMAEConfig` is the flat, user-facing record (the fields of CrossMAE's
``MaskedAutoencoderViT`` plus the switches the downstream projects use); its `encoder` and
`decoder` properties derive the per-part records `EncoderConfig` and `DecoderConfig` that
the builders in `crossmae.models.factories` consume. Every record validates itself in
``__post_init__`` and raises ``ValueError`` / ``TypeError`` naming the field and the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

from .._checks import (
    check_bool,
    check_divisible,
    check_int,
    check_int_pair,
    check_optional_bool,
    check_probability,
    check_ratio,
)
from ..encoders.transformer import resolve_layer_indices

__all__ = ["DecoderConfig", "EncoderConfig", "FeatureLayers", "ImageCrossMAEConfig"]

#: ``"all"`` or layer indices (negatives count from the last block).
FeatureLayers = Union[str, int, tuple[int, ...]]
IntPair = Union[int, tuple[int, int]]


# Field checks: the constructors' own checks (crossmae._checks), under the field's
# qualified name ("EncoderConfig.embed_dim"), so each rule is written once.
def _int(owner: str, name: str, value: object, minimum: int = 1) -> int:
    return check_int(f"{owner}.{name}", value, minimum=minimum)


def _bool(owner: str, name: str, value: object) -> bool:
    return check_bool(f"{owner}.{name}", value)


def _float(owner: str, name: str, value: object) -> float:
    return check_ratio(f"{owner}.{name}", value)


def _pair(owner: str, name: str, value: object) -> tuple[int, int]:
    return check_int_pair(f"{owner}.{name}", value, "(H, W)")


def _check_transformer(
    owner: str,
    *,
    embed_dim: object,
    depth: object,
    num_heads: object,
    mlp_ratio: object,
    qkv_bias: object,
    drop_path: object,
    norm_eps: object,
    prefix: str = "",
) -> None:
    dim = _int(owner, f"{prefix}embed_dim", embed_dim)
    _int(owner, f"{prefix}depth", depth)
    heads = _int(owner, f"{prefix}num_heads", num_heads)
    check_divisible(f"{owner}.{prefix}embed_dim", dim, f"{owner}.{prefix}num_heads", heads)
    if dim % 4 != 0:
        raise ValueError(
            f"{owner}.{prefix}embed_dim must be a multiple of 4 (2D sin-cos position "
            f"embedding), got {dim}"
        )
    for name, value in (("mlp_ratio", mlp_ratio), ("norm_eps", norm_eps)):
        if _float(owner, name, value) <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")
    _bool(owner, "qkv_bias", qkv_bias)
    check_probability(f"{owner}.{prefix}drop_path", drop_path)


_PART_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "drop_path", "norm_eps")


def _check_part_record(owner: str, record: EncoderConfig | DecoderConfig) -> None:
    """The checks `EncoderConfig` and `DecoderConfig` share (their common fields)."""
    _check_transformer(owner, **{f: getattr(record, f) for f in _PART_FIELDS})
    check_optional_bool(f"{owner}.fused_attn", record.fused_attn)


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of a ViT encoder (`crossmae.encoders.TransformerEncoder`).

    Attributes:
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads (must divide ``embed_dim``).
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        qkv_bias: bias on the qkv projections (ViT/MAE: True).
        drop_path: stochastic depth, linear from 0 to this value over the blocks.
        norm_eps: LayerNorm epsilon (MAE: 1e-6).
        final_norm: build the final LayerNorm (CrossMAE with feature weighting does not).
        fused_attn: force the fused (SDPA) or explicit attention path; None = the
            process-wide switch (`crossmae.set_fused_attn`).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    final_norm: bool = True
    fused_attn: Optional[bool] = None

    def __post_init__(self) -> None:
        _check_part_record("EncoderConfig", self)
        _bool("EncoderConfig", "final_norm", self.final_norm)


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a reconstruction decoder.

    Attributes:
        embed_dim: decoder width.
        depth: number of decoder blocks.
        num_heads: attention heads (must divide ``embed_dim``).
        mlp_ratio: MLP hidden width multiple.
        qkv_bias: bias on the q/kv/qkv projections (CrossMAE: True).
        drop_path: stochastic depth, linear from 0 to this value.
        norm_eps: LayerNorm epsilon.
        use_cross_attn: True = CrossMAE decoder (`crossmae.decoders.CrossMAEDecoder`);
            False = MAE's self-attention decoder (`crossmae.decoders.MAEDecoder`).
        self_attn: self-attention among the queries in every CrossMAE block. Has no effect
            with ``use_cross_attn=False`` (the MAE decoder always self-attends).
        fused_attn: see `EncoderConfig.fused_attn`.
    """

    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    use_cross_attn: bool = True
    self_attn: bool = False
    fused_attn: Optional[bool] = None

    def __post_init__(self) -> None:
        _check_part_record("DecoderConfig", self)
        _bool("DecoderConfig", "use_cross_attn", self.use_cross_attn)
        _bool("DecoderConfig", "self_attn", self.self_attn)


@dataclass(frozen=True)
class ImageCrossMAEConfig:
    """Everything `crossmae.models.build_image_crossmae` needs (defaults: CrossMAE ViT-B/16).

    Attributes:
        img_size: image size ``H`` (square) or ``(H, W)``.
        patch_size: patch size ``p`` or ``(ph, pw)``; must divide ``img_size``.
        in_chans: image channels ``C``.
        embed_dim: encoder width.
        depth: encoder blocks.
        num_heads: encoder heads.
        decoder_embed_dim: decoder width.
        decoder_depth: decoder blocks (CrossMAE: 8, or 12).
        decoder_num_heads: decoder heads.
        mlp_ratio: MLP hidden width multiple (encoder and decoder).
        qkv_bias: bias on attention input projections.
        norm_eps: LayerNorm epsilon everywhere.
        drop_path: encoder stochastic depth (max rate).
        decoder_drop_path: decoder stochastic depth (max rate).
        mask_ratio: default share of patches hidden from the encoder, ``[0, 1)``.
        predict_ratio: default share of *all* patches decoded and scored (CrossMAE's
            ``kept_mask_ratio``), ``0 < predict_ratio <= mask_ratio``.
        norm_pix_loss: score predictions against per-patch normalized pixels (eps 1e-6).
        use_cross_attn: CrossMAE decoder (True) or MAE's self-attention decoder (False).
        decoder_self_attn: self-attention among the CrossMAE queries (no effect with
            ``use_cross_attn=False``).
        use_weighted_fm: CrossMAE's inter-block attention: every decoder layer attends to
            its own learned mix of encoder feature maps (then the encoder's final norm is
            not built). With the MAE decoder a single learned mix (plus a LayerNorm) feeds
            the decoder.
        fm_layers: encoder blocks whose outputs are mixed: ``"all"``, an int or ints
            (negatives count from the end: ``-1`` is the last block). Note: the official
            code's ``--use_fm -1`` means *all* blocks, i.e. ``"all"`` here. Only used with
            ``use_weighted_fm``.
        use_input: also mix the encoder input (the embedded visible tokens). Only used
            with ``use_weighted_fm``.
        fused_attn: force the fused or explicit attention path (None = process default).

    Derived: `grid_size`, `num_patches`, `patch_dim`, `num_feature_maps`, `encoder`,
    `decoder`.
    """

    img_size: IntPair = 224
    patch_size: IntPair = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    drop_path: float = 0.0
    decoder_drop_path: float = 0.0
    mask_ratio: float = 0.75
    predict_ratio: float = 0.25
    norm_pix_loss: bool = False
    use_cross_attn: bool = True
    decoder_self_attn: bool = False
    use_weighted_fm: bool = True
    fm_layers: FeatureLayers = "all"
    use_input: bool = False
    fused_attn: Optional[bool] = None

    def __post_init__(self) -> None:
        owner = "ImageCrossMAEConfig"
        img = _pair(owner, "img_size", self.img_size)
        patch = _pair(owner, "patch_size", self.patch_size)
        if img[0] % patch[0] != 0 or img[1] % patch[1] != 0:
            raise ValueError(
                f"{owner}.img_size {self.img_size!r} must be divisible by "
                f"{owner}.patch_size {self.patch_size!r}"
            )
        # Store pairs given as lists as tuples, so the record stays hashable.
        if isinstance(self.img_size, list):
            object.__setattr__(self, "img_size", img)
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", patch)
        _int(owner, "in_chans", self.in_chans)
        _check_transformer(
            owner,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            drop_path=self.drop_path,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            norm_eps=self.norm_eps,
        )
        _check_transformer(
            owner,
            embed_dim=self.decoder_embed_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_num_heads,
            drop_path=self.decoder_drop_path,
            prefix="decoder_",
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            norm_eps=self.norm_eps,
        )
        mr = check_probability(f"{owner}.mask_ratio", self.mask_ratio)
        pr = _float(owner, "predict_ratio", self.predict_ratio)
        if not 0.0 < pr <= mr:
            raise ValueError(
                f"{owner}.predict_ratio must satisfy 0 < predict_ratio <= mask_ratio "
                f"({self.mask_ratio!r}), got {self.predict_ratio!r}"
            )
        for name in (
            "norm_pix_loss",
            "use_cross_attn",
            "decoder_self_attn",
            "use_weighted_fm",
            "use_input",
        ):
            _bool(owner, name, getattr(self, name))
        check_optional_bool(f"{owner}.fused_attn", self.fused_attn)
        layers = self.fm_layers
        if isinstance(layers, Sequence) and not isinstance(layers, str):
            layers = tuple(layers)
            object.__setattr__(self, "fm_layers", layers)
        try:
            resolve_layer_indices(layers, self.depth, "fm_layers")
        except (TypeError, ValueError) as e:
            raise type(e)(f"{owner}.fm_layers={self.fm_layers!r} is invalid: {e}") from None

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)``."""
        img = _pair("ImageCrossMAEConfig", "img_size", self.img_size)
        patch = _pair("ImageCrossMAEConfig", "patch_size", self.patch_size)
        return img[0] // patch[0], img[1] // patch[1]

    @property
    def num_patches(self) -> int:
        """Number of patches ``N`` (rows * cols)."""
        rows, cols = self.grid_size
        return rows * cols

    @property
    def patch_dim(self) -> int:
        """Values per patch ``ph * pw * C`` (the prediction width)."""
        ph, pw = _pair("ImageCrossMAEConfig", "patch_size", self.patch_size)
        return ph * pw * self.in_chans

    @property
    def fm_layer_indices(self) -> tuple[int, ...]:
        """Resolved, sorted non-negative indices of the mixed encoder blocks (empty without
        feature weighting)."""
        if not self.use_weighted_fm:
            return ()
        return resolve_layer_indices(self.fm_layers, self.depth, "fm_layers")

    @property
    def num_feature_maps(self) -> Optional[int]:
        """Number of mixed feature maps (blocks + input), or None without feature weighting."""
        if not self.use_weighted_fm:
            return None
        return len(self.fm_layer_indices) + int(self.use_input)

    @property
    def encoder(self) -> EncoderConfig:
        """The encoder's `EncoderConfig` (no final norm with feature weighting)."""
        return EncoderConfig(
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path=self.drop_path,
            norm_eps=self.norm_eps,
            final_norm=not self.use_weighted_fm,
            fused_attn=self.fused_attn,
        )

    @property
    def decoder(self) -> DecoderConfig:
        """The decoder's `DecoderConfig`."""
        return DecoderConfig(
            embed_dim=self.decoder_embed_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path=self.decoder_drop_path,
            norm_eps=self.norm_eps,
            use_cross_attn=self.use_cross_attn,
            self_attn=self.decoder_self_attn,
            fused_attn=self.fused_attn,
        )
