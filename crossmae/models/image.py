"""Image CrossMAE: a ViT encoder over the visible patches and a partial-reconstruction decoder.

Legend: ``b`` batch, ``C`` image channels, ``H``/``W`` image size, ``n`` patches
(``N = (H/ph) * (W/pw)``, row-major), ``k`` visible (kept) slots, ``p`` predicted slots,
``e`` encoder width, ``f`` mixed encoder feature maps, ``o = ph * pw * C`` values per patch
(laid out ``(ph pw C)``, MAE's order).

Mask polarity: ``visible_mask`` True = the encoder sees the patch; ``predict_mask`` True = the
patch is reconstructed and scored; every ``*_padding_mask`` True = padding slot.

The encoder sequence is ``[cls] + visible patches``: the cls token is never padding and is
part of the CrossMAE decoder's context. Decoder indices (``ids_predict``) are patch indices
(the cls token has none).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import (
    check_bool,
    check_float_tensor,
    check_generator,
    check_optional_bool,
    check_tensor,
)
from ..encoders.transformer import (
    EncoderOutput,
    LayerSelection,
    resolve_layer_indices,
)
from ..layers.feature_maps import StackedLayerNorm, WeightedFeatureMaps
from ..layers.pos_embed import sincos_pos_embed_2d
from ..losses import masked_mse_loss, norm_pix_target
from ..masking.split import MaskSplit, _DenseSplit, mask_split_from_masks, random_masking
from ..masking.tokens import gather_tokens, scatter_tokens
from ..protocols import QueryDecoder, SequenceDecoder, cond_dim_of
from ..tokenizers.raster import patchify, unpatchify
from ._inputs import check_mask_split
from .multimodal import _check_encoder, _decoder_kind, _int_attr

__all__ = ["ImageCrossMAE", "ImageCrossMAEOutput"]

IntPair = Union[int, tuple[int, int]]
Decoder = Union[QueryDecoder, SequenceDecoder]


class ImageCrossMAEOutput(NamedTuple):
    """What `ImageCrossMAE.forward` returns.

    Attributes:
        loss: scalar masked MSE over the predicted patches (mean per sample, then over the
            batch; see `crossmae.losses.masked_mse_loss`).
        pred: ``[b, p, o]`` predictions for the patches at ``split.ids_predict`` (in
            per-patch normalized pixel space when ``norm_pix_loss``).
        split: the `MaskSplit` used (drawn or given).
        target: ``[b, p, o]`` what ``pred`` is scored against: the pixels of the predicted
            patches, per-patch normalized when ``norm_pix_loss``. Padded slots hold 0.
    """

    loss: Tensor
    pred: Tensor
    split: MaskSplit
    target: Tensor


def _check_image_encoder(encoder: object) -> None:
    """An `crossmae.Encoder` without per-sample conditioning (``cond_dim`` None or absent)."""
    _check_encoder("encoder", encoder)
    cond = cond_dim_of(encoder)
    if cond is not None:
        raise ValueError(
            f"encoder was built with cond_dim={cond}; ImageCrossMAE has no "
            "per-sample conditioning (build the encoder without cond_dim)"
        )


def _pair(name: str, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")


def _ratio(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    return float(value)


class ImageCrossMAE(nn.Module):
    """CrossMAE (or MAE) pre-training model for images, assembled from built parts.

    The patches get MAE's fixed 2D sin-cos position embedding (a non-persistent buffer
    ``pos_embed [1, 1 + N, e]`` whose first row, the cls token's, is zero); the visible ones
    are encoded together with a learned cls token. A `CrossMAEDecoder` then decodes only the
    patches to predict (queries: mask token + the decoder's fixed sin-cos table) against the
    encoder tokens (cls included), or, with feature weighting, decoder layer ``j`` attends to
    its own normalized mix of encoder feature maps (``decoder.wfm`` / ``decoder.dec_norms``).
    An `MAEDecoder` instead decodes the full sequence (without the cls token) and returns the
    predicted patches; with feature weighting it is fed one learned mix (``feature_mix``,
    ``feature_norm``). Unlike MAE's code, the MAE decoder's sequence holds the patches only
    (no cls token). The loss is the masked MSE over the predicted patches.

    Build it with `crossmae.models.build_image_crossmae` or a preset
    (`crossmae.models.crossmae_vit_base`, ...); the builders also apply MAE's initialization
    (`initialize_weights`).

    Args:
        patch_embed: module ``[b, C, H, W] -> [b, N, e]`` (e.g.
            `crossmae.tokenizers.PatchEmbed`, whose ``proj`` is a Conv2d).
        encoder: `TransformerEncoder` of width ``e``, without FiLM conditioning. With
            feature weighting it must be built with ``final_norm=False`` (the norm would be
            an unused parameter, which DistributedDataParallel rejects).
        decoder: `CrossMAEDecoder` (``context_dim=e``, ``out_dim=o``; with feature weighting
            ``num_feature_maps=f``) or `MAEDecoder` (``num_tokens=N``).
        img_size: ``H`` or ``(H, W)``.
        patch_size: ``p`` or ``(ph, pw)``.
        in_chans: ``C``.
        mask_ratio: default share of hidden patches, ``[0, 1)``.
        predict_ratio: default share of *all* patches decoded (CrossMAE's
            ``kept_mask_ratio``), ``0 < predict_ratio <= mask_ratio``.
        norm_pix_loss: score against per-patch normalized pixels.
        fm_layers: encoder blocks whose outputs feed feature weighting (``"all"``, an int or
            ints; negatives from the end), or None for no feature weighting.
        use_input: also feed the encoder input to feature weighting.
        feature_mix: with an `MAEDecoder` and feature weighting, a
            ``WeightedFeatureMaps(f, 1)``; must be None otherwise.
        feature_norm: the norm applied to ``feature_mix``'s output (required with it).

    Shapes:
        ``forward(imgs [b, C, H, W], *, mask_ratio, predict_ratio, split, generator, noise)
        -> ImageCrossMAEOutput(loss [], pred [b, p, o], split, target [b, p, o])``.
    """

    pos_embed: Tensor

    def __init__(
        self,
        patch_embed: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        img_size: IntPair,
        patch_size: IntPair,
        in_chans: int,
        mask_ratio: float = 0.75,
        predict_ratio: float = 0.25,
        norm_pix_loss: bool = False,
        fm_layers: LayerSelection = None,
        use_input: bool = False,
        feature_mix: Optional[WeightedFeatureMaps] = None,
        feature_norm: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if not isinstance(patch_embed, nn.Module):
            raise TypeError(f"patch_embed must be an nn.Module, got {type(patch_embed).__name__}")
        _check_image_encoder(encoder)
        _decoder_kind("decoder", decoder)
        self.img_size = _pair("img_size", img_size)
        self.patch_size = _pair("patch_size", patch_size)
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        self.in_chans = in_chans
        (h, w), (ph, pw) = self.img_size, self.patch_size
        if h % ph != 0 or w % pw != 0:
            raise ValueError(f"img_size {img_size!r} is not divisible by patch_size {patch_size!r}")
        self.grid_size = (h // ph, w // pw)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_dim = ph * pw * in_chans
        self.embed_dim = _int_attr(encoder, "dim")
        mr, pr = _ratio("mask_ratio", mask_ratio), _ratio("predict_ratio", predict_ratio)
        if not 0.0 <= mr < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        if not 0.0 < pr <= mr:
            raise ValueError(
                f"predict_ratio must satisfy 0 < predict_ratio <= mask_ratio ({mask_ratio!r}), "
                f"got {predict_ratio!r}"
            )
        self.mask_ratio, self.predict_ratio = mr, pr
        if not isinstance(norm_pix_loss, bool):
            raise TypeError(f"norm_pix_loss must be a bool, got {norm_pix_loss!r}")
        if not isinstance(use_input, bool):
            raise TypeError(f"use_input must be a bool, got {use_input!r}")
        self.norm_pix_loss = norm_pix_loss

        self.fm_layers: Optional[tuple[int, ...]] = None
        self.use_input = False
        num_maps: Optional[int] = None
        if fm_layers is not None:
            self.fm_layers = resolve_layer_indices(
                fm_layers, _int_attr(encoder, "depth"), "fm_layers"
            )
            self.use_input = use_input
            num_maps = len(self.fm_layers) + int(use_input)
        self._check_encoder_fits(encoder)
        self._check_decoder(decoder, num_maps, feature_mix, feature_norm)

        self.patch_embed = patch_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        table = sincos_pos_embed_2d(self.embed_dim, self.grid_size)
        table = torch.cat([table.new_zeros(1, self.embed_dim), table], dim=0)
        self.register_buffer("pos_embed", table[None], persistent=False)
        self.encoder = encoder
        self.decoder = decoder
        self.feature_mix = feature_mix
        self.feature_norm = feature_norm
        nn.init.normal_(self.cls_token, std=0.02)

    def __setattr__(self, name: str, value: Any) -> None:
        # Parts may be replaced after construction (``model.encoder = mine``); the replacement
        # is checked by protocol and against the model's widths, as in the constructor.
        if name == "encoder" and "decoder" in self._modules:
            _check_image_encoder(value)
            self._check_encoder_fits(value)
        elif name == "decoder" and "decoder" in self._modules:
            _decoder_kind("decoder", value)
            self._check_decoder(value, self.num_feature_maps, self.feature_mix, self.feature_norm)
        super().__setattr__(name, value)

    @property
    def num_feature_maps(self) -> Optional[int]:
        """Encoder feature maps mixed by the decoder (``fm_layers`` + input), or None."""
        if self.fm_layers is None:
            return None
        return len(self.fm_layers) + int(self.use_input)

    def _check_encoder_fits(self, encoder: Any) -> None:
        """Width ``embed_dim``; with feature weighting, the tapped layers exist and no final
        norm would go unused (checked on encoders exposing a ``norm`` module)."""
        if int(encoder.dim) != self.embed_dim:
            raise ValueError(
                f"encoder.dim ({encoder.dim}) must equal the model's width ({self.embed_dim})"
            )
        if self.fm_layers is not None:
            if max(self.fm_layers) >= _int_attr(encoder, "depth"):
                raise ValueError(
                    f"fm_layers {self.fm_layers} index past the encoder's depth {encoder.depth}"
                )
            norm = getattr(encoder, "norm", None)
            if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
                raise ValueError(
                    "with fm_layers (weighted feature maps) the encoder's final norm is never "
                    "used: build the encoder with final_norm=False"
                )

    def _check_decoder(
        self,
        decoder: Any,
        num_maps: Optional[int],
        feature_mix: Optional[WeightedFeatureMaps],
        feature_norm: Optional[nn.Module],
    ) -> None:
        """Widths and positions of ``decoder`` fit the model (attributes its protocol names,
        plus the optional ``out_dim`` / ``num_positions`` when the decoder has them)."""
        kind = _decoder_kind("decoder", decoder)
        if int(decoder.context_dim) != self.embed_dim:
            raise ValueError(
                f"decoder.context_dim ({decoder.context_dim}) must equal the encoder width "
                f"({self.embed_dim})"
            )
        out_dim = getattr(decoder, "out_dim", None)
        if out_dim is not None and int(out_dim) != self.patch_dim:
            raise ValueError(
                f"decoder predicts {out_dim} values per patch but "
                f"patch_size**2 * in_chans = {self.patch_dim}"
            )
        has_positions = hasattr(decoder, "num_positions")
        positions = getattr(decoder, "num_positions", None)
        if kind == "query":
            if feature_mix is not None or feature_norm is not None:
                raise ValueError(
                    "feature_mix/feature_norm are only for a sequence (MAE) decoder; a query "
                    "decoder (CrossMAEDecoder) holds its own weighted feature maps "
                    "(num_feature_maps)"
                )
            own_maps = getattr(decoder, "num_feature_maps", None)
            if own_maps != num_maps:
                raise ValueError(
                    f"decoder.num_feature_maps is {own_maps} but fm_layers / "
                    f"use_input select {num_maps} feature maps"
                )
            if positions is not None and positions != self.num_patches:
                raise ValueError(
                    f"decoder needs a position table [{self.num_patches}, c], got one for "
                    f"{positions} positions"
                )
            return
        num_tokens = _int_attr(decoder, "num_tokens")
        if num_tokens != self.num_patches:
            raise ValueError(
                f"decoder.num_tokens ({num_tokens}) must equal the number of "
                f"patches ({self.num_patches})"
            )
        if has_positions and positions is None and getattr(decoder, "query_pos", None) is None:
            raise ValueError("decoder needs a position table (pos_embed='learned' or fixed)")
        if num_maps is None:
            if feature_mix is not None or feature_norm is not None:
                raise ValueError("feature_mix/feature_norm need fm_layers")
        else:
            if not isinstance(feature_mix, WeightedFeatureMaps) or feature_norm is None:
                raise ValueError(
                    "an MAEDecoder with fm_layers needs feature_mix="
                    f"WeightedFeatureMaps({num_maps}, 1) and a feature_norm"
                )
            if (feature_mix.num_inputs, feature_mix.num_outputs) != (num_maps, 1):
                raise ValueError(
                    f"feature_mix must be WeightedFeatureMaps({num_maps}, 1), got "
                    f"WeightedFeatureMaps({feature_mix.num_inputs}, "
                    f"{feature_mix.num_outputs})"
                )

    @property
    def uses_weighted_fm(self) -> bool:
        """Whether the decoder reads learned mixes of encoder feature maps."""
        return self.fm_layers is not None

    @property
    def normalized_predictions(self) -> bool:
        """True when predictions live in per-patch normalized pixel space (``norm_pix_loss``).

        Such predictions cannot be mapped back to pixels without the (hidden) mean and
        variance of each masked patch; see `reconstruct`.
        """
        return self.norm_pix_loss

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE's initialization of every learned part, in place.

        Linear weights xavier-uniform with zero bias; LayerNorm (and the decoder's stacked
        per-layer norms) weight 1, bias 0; the patch-embedding conv weight xavier-uniform as
        the ``[e, C*ph*pw]`` matrix it is; cls and mask tokens normal(std 0.02). Weighted
        feature maps keep their own initialization (their ``Linear`` is not reset), fixed
        sin-cos tables stay fixed, learned position tables keep theirs.
        """
        skip: set[int] = set()
        for m in self.modules():
            if isinstance(m, WeightedFeatureMaps):
                skip.update(id(sub) for sub in m.modules())
        embed_parts = {id(m) for m in self.patch_embed.modules()}
        for m in self.modules():
            if id(m) in skip:
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, StackedLayerNorm)):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and id(m) in embed_parts:
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        mask_token = getattr(self.decoder, "mask_token", None)
        if isinstance(mask_token, nn.Parameter):
            nn.init.normal_(mask_token, std=0.02)

    # ------------------------------------------------------------------ inputs
    def _check_imgs(self, imgs: object) -> Tensor:
        x = check_float_tensor("imgs", imgs, ndim=4)
        expected = (self.in_chans, *self.img_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"imgs must have shape [b, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {tuple(x.shape)}"
            )
        return x

    def _check_split(self, split: object, batch: int) -> MaskSplit:
        return check_mask_split("split", split, batch, self.num_patches, "imgs")

    def random_split(
        self,
        batch_size: int,
        *,
        mask_ratio: Optional[float] = None,
        predict_ratio: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> MaskSplit:
        """Draw a keep / predict split over the patches (`crossmae.random_masking`).

        Defaults to the model's ``mask_ratio`` and ``predict_ratio``; ``noise [b, N]``
        (small = keep) or ``generator`` make it deterministic. The split has no padding
        slot and is marked so (it is still a `MaskSplit`): ``forward(split=...)`` runs it
        unmasked without ``dense=True``; an edited copy (``split._replace(...)``) loses
        the mark, a moved one (``split.to(device)``) keeps it.
        """
        check_generator("generator", generator)
        mr = self.mask_ratio if mask_ratio is None else mask_ratio
        pr = self.predict_ratio if predict_ratio is None else predict_ratio
        if device is None and noise is None and generator is None:
            device = self.cls_token.device
        if noise is None and generator is not None and device is not None:
            target = torch.device(device)
            if target.type != generator.device.type:
                # draw with the generator where it lives, then move the split
                split = random_masking(
                    batch_size,
                    self.num_patches,
                    mr,
                    predict_ratio=pr,
                    generator=generator,
                    device=generator.device,
                )
                return _DenseSplit(*split).to(target)
        return _DenseSplit(  # no padding: forward given it runs unmasked, as for its own draws
            *random_masking(
                batch_size,
                self.num_patches,
                mr,
                predict_ratio=pr,
                noise=noise,
                generator=generator,
                device=device,
            )
        )

    # ------------------------------------------------------------------ parts
    def forward_encoder(
        self, imgs: Tensor, split: MaskSplit, *, dense: bool = False
    ) -> EncoderOutput:
        """Encode ``[cls] + visible patches``.

        Args:
            imgs: float ``[b, C, H, W]``.
            split: `MaskSplit` over the ``N`` patches (only ``ids_keep`` and
                ``keep_padding_mask`` are used).
            dense: promise that ``split`` has no padding slot (every sample keeps the same
                number of patches, as any `crossmae.random_masking` split without
                ``padding_mask``); attention then runs without a mask, which lets the
                flash kernels run. Wrong results if the promise is false.

        Returns:
            `EncoderOutput` with ``tokens [b, 1 + k, e]`` (cls first), ``padding_mask
            [b, 1 + k]`` (True = padding; the cls slot is never padding; None when
            ``dense``) and, with feature weighting, ``features [f, b, 1 + k, e]`` (the
            input first when ``use_input``).
        """
        x = self._check_imgs(imgs)
        check_bool("dense", dense)
        return self._encode(x, self._check_split(split, x.shape[0]), dense=dense)

    def _embed_visible(self, x: Tensor, split: MaskSplit, *, dense: bool = False) -> Tensor:
        """Embeddings of the visible patches ``[b, k, e]`` (padded slots 0; ``dense``: the
        split has none, so nothing is masked).

        Pixels outside the visible patches are never read: a patch embedding with an
        ``embed_selected(img, ids, padding_mask)`` method (`crossmae.PatchEmbed`) embeds only
        the ``ids_keep`` patches; any other ``[b, C, H, W] -> [b, N, e]`` module gets the
        image with every pixel outside the visible patches replaced by 0 first. So NaN/inf
        there cannot reach a loss, a prediction or a gradient.
        """
        ids = split.ids_keep
        keep_pad: Optional[Tensor] = None if dense else split.keep_padding_mask
        embed_selected = getattr(self.patch_embed, "embed_selected", None)
        if callable(embed_selected):
            visible: Tensor = embed_selected(x, ids, keep_pad)  # [b k e]
        else:
            (gh, gw), (ph, pw) = self.grid_size, self.patch_size
            seen = split.visible_mask.view(-1, 1, gh, 1, gw, 1)
            seen = seen.expand(-1, 1, gh, ph, gw, pw).reshape(-1, 1, gh * ph, gw * pw)
            tokens = self.patch_embed(torch.where(seen, x, x.new_zeros(())))  # [b n e]
            visible = torch.gather(
                tokens, 1, ids.long()[..., None].expand(-1, -1, tokens.shape[-1])
            )
        pos = self.pos_embed[0, 1:][ids.long()]  # [b k e]
        visible = visible + pos.to(visible.dtype)
        return visible if keep_pad is None else visible.masked_fill(keep_pad[..., None], 0)

    def _encode(self, x: Tensor, split: MaskSplit, *, dense: bool) -> EncoderOutput:
        """`forward_encoder` on checked inputs."""
        visible, keep_pad = self._embed_visible(x, split, dense=dense), split.keep_padding_mask
        cls = (self.cls_token + self.pos_embed[:, :1]).to(visible.dtype)
        cls = cls.expand(visible.shape[0], -1, -1)
        seq = torch.cat([cls, visible], dim=1)
        pad: Optional[Tensor] = None
        if not dense:
            pad = torch.cat([keep_pad.new_zeros(keep_pad.shape[0], 1), keep_pad], dim=1)
        return self.encoder(
            seq,
            pad,
            return_layers=self.fm_layers,
            include_input=self.use_input and self.fm_layers is not None,
        )

    def forward_decoder(
        self, encoded: EncoderOutput, split: MaskSplit, *, dense: bool = False
    ) -> Tensor:
        """Predict the patches at ``split.ids_predict``.

        Args:
            encoded: `forward_encoder`'s output for the same split.
            split: `MaskSplit`; ``ids_predict`` / ``predict_padding_mask`` choose the
                queries (any number, e.g. every hidden patch), ``ids_keep`` /
                ``keep_padding_mask`` locate the encoder tokens (MAE decoder only).
            dense: promise that ``split`` has no padding slot (see `forward_encoder`); the
                padding masks are then not passed to attention.

        Returns:
            ``[b, p, o]`` predicted patch values, laid out ``(ph pw C)``; padded query slots
            hold finite, meaningless values.
        """
        check_bool("dense", dense)
        return self._decode(encoded, self._check_split(split, encoded.tokens.shape[0]), dense=dense)

    def _decode(self, encoded: EncoderOutput, split: MaskSplit, *, dense: bool) -> Tensor:
        """`forward_decoder` on a checked split."""
        if self.fm_layers is not None:
            if encoded.features is None:
                raise ValueError("encoded.features is None but this model uses weighted fm")
            context = encoded.features  # [f b 1+k e]
        else:
            context = encoded.tokens  # [b 1+k e]
        keep_pad = None if dense else split.keep_padding_mask
        predict_pad = None if dense else split.predict_padding_mask
        if _decoder_kind("decoder", self.decoder) == "query":
            context_pad = encoded.padding_mask
            if dense:
                context_pad = None
            elif context_pad is None:  # encoded densely: rebuild [cls] + keep padding
                keep = split.keep_padding_mask
                context_pad = torch.cat([keep.new_zeros(keep.shape[0], 1), keep], dim=1)
            return self.decoder(
                context,
                split.ids_predict,
                context_padding_mask=context_pad,
                query_padding_mask=predict_pad,
            )
        if self.feature_mix is not None and self.feature_norm is not None:
            context = self.feature_norm(self.feature_mix(context)[0])
        return self.decoder(
            context[:, 1:],  # the MAE decoder gets the patch tokens only (no cls)
            split.ids_keep,
            split.ids_predict,
            context_padding_mask=keep_pad,
            query_padding_mask=predict_pad,
        )

    def target_patches(self, imgs: Tensor) -> Tensor:
        """Every patch's pixels ``[b, N, o]``, laid out ``(ph pw C)`` (not normalized)."""
        return patchify(self._check_imgs(imgs), self.patch_size)

    def forward_loss(self, imgs: Tensor, pred: Tensor, split: MaskSplit) -> tuple[Tensor, Tensor]:
        """Masked MSE of ``pred [b, p, o]`` against the patches at ``split.ids_predict``.

        Target rule: a non-finite target pixel (NaN/inf inside a predicted patch) is a
        *missing value*, as everywhere in crossmae: it is not scored, does not enter the
        ``norm_pix_loss`` mean and variance of its patch, and holds 0 in ``target``; a patch
        with no finite pixel is not scored at all. Masked with ``torch.where``, no host sync;
        for finite images the loss is exactly the plain masked MSE.

        Returns:
            ``(loss, target)``: the scalar loss (mean over each sample's predicted patches,
            then over samples) and the target ``[b, p, o]`` (normalized per patch when
            ``norm_pix_loss``, eps 1e-6; padded slots and missing pixels 0).
        """
        return self._loss(imgs, pred, split, dense=False)

    def _loss(
        self, imgs: Tensor, pred: Tensor, split: MaskSplit, *, dense: bool
    ) -> tuple[Tensor, Tensor]:
        """`forward_loss`; ``dense``: the split has no padding slot, so none is masked."""
        pad: Optional[Tensor]
        if dense:
            target, pad = gather_tokens(self.target_patches(imgs), split.ids_predict), None
        else:
            target, pad = split.predict_tokens(self.target_patches(imgs))
        valid = torch.isfinite(target)  # [b p o], True = a real target value
        if self.norm_pix_loss:
            target = norm_pix_target(target, valid_mask=valid, eps=1e-6)
        else:
            target = torch.where(valid, target, target.new_zeros(()))
        loss = masked_mse_loss(pred, target, padding_mask=pad, valid_mask=valid)
        return loss, target

    def forward(
        self,
        imgs: Tensor,
        *,
        mask_ratio: Optional[float] = None,
        predict_ratio: Optional[float] = None,
        split: Optional[MaskSplit] = None,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
        dense: Optional[bool] = None,
    ) -> ImageCrossMAEOutput:
        """Mask, encode, decode the patches to predict, and score them.

        Args:
            imgs: float ``[b, C, H, W]``.
            mask_ratio: share of hidden patches (default: the model's).
            predict_ratio: share of all patches decoded and scored (default: the model's).
            split: a precomputed `MaskSplit` over the ``N`` patches (then none of the
                masking arguments may be given). Passing one keeps ``forward`` free of host
                syncs (e.g. for ``torch.compile(fullgraph=True)``). A split on the CPU is
                checked for self-consistency here (`MaskSplit.validate`, ``ValueError``
                naming the field); one on CUDA only for shapes and dtypes (call
                ``split.validate()`` in data preparation).
            generator: RNG for the random split.
            noise: ``[b, N]`` ordering scores for the random split (small = visible).
            dense: whether the split has no padding slot, so attention can run without
                masks (much faster on GPUs: the flash kernels refuse masks). Default: True
                for a split drawn here or by `random_split` (and not edited since), False
                for any other given ``split`` (safe for any split; pass True for a
                `crossmae.random_masking` split drawn without ``padding_mask``).
                ``dense=True`` with a padded split gives wrong results.

        Returns:
            `ImageCrossMAEOutput` ``(loss, pred [b, p, o], split, target [b, p, o])``.
        """
        check_generator("generator", generator)
        x = self._check_imgs(imgs)
        check_optional_bool("dense", dense)
        drawn = split is None or isinstance(split, _DenseSplit)  # here or by random_split
        is_dense = drawn if dense is None else dense
        if split is not None:  # a given split is checked once here (values too on the CPU)
            split = self._check_split(split, x.shape[0])
        if split is None:
            split = self.random_split(
                x.shape[0],
                mask_ratio=mask_ratio,
                predict_ratio=predict_ratio,
                generator=generator,
                noise=noise,
                device=x.device,
            )
        elif (
            mask_ratio is not None
            or predict_ratio is not None
            or generator is not None
            or (noise is not None)
        ):
            raise ValueError(
                "split was given: do not also pass mask_ratio, predict_ratio, generator or noise"
            )
        encoded = self._encode(x, split, dense=is_dense)
        pred = self._decode(encoded, split, dense=is_dense)
        if type(self).forward_loss is ImageCrossMAE.forward_loss:
            loss, target = self._loss(x, pred, split, dense=is_dense)
        else:  # a subclass's own loss
            loss, target = self.forward_loss(x, pred, split)
        return ImageCrossMAEOutput(loss, pred, split, target)

    # ------------------------------------------------------------------ inference
    def reconstruct(
        self,
        imgs: Tensor,
        split_or_visible_mask: Union[MaskSplit, Tensor],
        *,
        oracle_denormalize: bool = False,
    ) -> Tensor:
        """Full reconstruction: decode *every* hidden patch in one pass and paste it back.

        Because CrossMAE's queries are independent, a model trained to decode a share
        ``predict_ratio`` of the patches decodes all hidden patches at once here, whatever
        ``predict_ratio`` it was trained with.

        Args:
            imgs: float ``[b, C, H, W]``.
            split_or_visible_mask: a `MaskSplit` (its visible patches are encoded; its
                ``predict_mask`` is ignored) or a bool ``visible_mask [b, N]`` (True = the
                encoder sees the patch).
            oracle_denormalize: only with ``norm_pix_loss``: map the normalized predictions
                back to pixels with the *true* mean and variance of each hidden patch taken
                from ``imgs``. This leaks ground truth (a patch's mean and contrast) and is
                only meant for visualisation, as in MAE's demo.

        Returns:
            ``[b, C, H, W]`` in the predictions' dtype: visible patches hold the input pixels,
            every other patch the prediction. With ``norm_pix_loss`` and without
            ``oracle_denormalize`` the predicted patches stay in per-patch normalized space
            (`normalized_predictions` is True): their pixel mean and variance are not
            recoverable from the visible patches.
        """
        x = self._check_imgs(imgs)
        b, n = x.shape[0], self.num_patches
        if isinstance(split_or_visible_mask, MaskSplit):
            given = self._check_split(split_or_visible_mask, b)
            visible = given.visible_mask
        else:
            visible = check_tensor("split_or_visible_mask", split_or_visible_mask)
            if visible.dtype != torch.bool or tuple(visible.shape) != (b, n):
                raise ValueError(
                    "split_or_visible_mask must be a MaskSplit or a bool visible_mask "
                    f"[{b}, {n}], got {visible.dtype} {tuple(visible.shape)}"
                )
            given = None
        if not isinstance(oracle_denormalize, bool):
            raise TypeError(f"oracle_denormalize must be a bool, got {oracle_denormalize!r}")
        if oracle_denormalize and not self.norm_pix_loss:
            raise ValueError("oracle_denormalize=True only applies to norm_pix_loss models")
        full = mask_split_from_masks(visible, ~visible)  # predict every hidden patch
        if given is not None:  # keep the caller's visible order exactly
            full = full._replace(ids_keep=given.ids_keep, keep_padding_mask=given.keep_padding_mask)
        pred = self._decode(self._encode(x, full, dense=False), full, dense=False)  # [b p o]
        patches = patchify(x, self.patch_size)  # [b n o]
        if oracle_denormalize:
            truth, _ = full.predict_tokens(patches)
            mean = truth.mean(dim=-1, keepdim=True)
            std = (truth.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std.to(pred.dtype) + mean.to(pred.dtype)
        pasted = scatter_tokens(
            pred, full.ids_predict, n, padding_mask=full.predict_padding_mask
        )  # [b n o]
        out = torch.where(visible[..., None], patches.to(pasted.dtype), pasted)
        return unpatchify(out, self.patch_size, self.img_size)
