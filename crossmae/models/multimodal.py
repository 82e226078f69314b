"""Multimodal masked autoencoder: per-modality tokenizers and encoders, fusion, decoders.

Legend: ``b`` batch, ``n_m`` tokens of modality ``m`` (time-major, ``t * l_m``), ``k_m``
visible slots of ``m``, ``p_m`` predicted slots of ``m``, ``M`` fused keys (all modalities'
visible tokens, plus static tokens), ``e`` encoder width, ``f`` decoder feature maps.
Mask polarity: every ``*_padding_mask`` True = padding slot; ``hidden_masks`` True = hidden
from the encoder (MAE's "1 = removed"); ``predict_masks`` True = reconstructed.

`MultimodalMAE.forward` is the method in six steps, each a method of the part that owns it:

1. **tokenize** — `Modality.tokenize`: ``tokens, padding_mask = tokenizer(x_m)``
   (invalid/missing data → padding tokens);
2. **split** — `Modality.split`: a `MaskSplit` from the masks the caller drew
   (``hidden_masks`` in the input layout, or ``splits``) or from the modality's masking
   function; tokenizer padding always wins (a padding token is never visible, never
   predicted); a per-sample ``missing`` flag removes every token of that sample;
3. **encode** — `Modality.encode`: the visible tokens through the modality's encoder
   (``cond=`` only for an encoder with a ``cond_dim``), the static token appended;
4. **fuse** — `MultimodalMAE.fuse`: the modalities' encodings concatenated and passed
   through the fusion encoder; the decoder context (fused keys, or stacked feature maps);
5. **decode** — `Modality.decode`: the modality's decoder predicts its ``ids_predict``;
6. **score** — `Modality.score`: the modality's loss, weighted and summed.

Parts are checked by protocol (`crossmae.Encoder`, `crossmae.QueryDecoder`,
`crossmae.SequenceDecoder`, `crossmae.Tokenizer`), never by class, also when one is
replaced after construction (``model.modalities["x"].encoder = mine``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, NoReturn, Optional, Union, cast

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import (
    check_bool,
    check_float_tensor,
    check_generator,
    check_int,
    check_ratio,
    check_tensor,
)
from ..decoders.cross import CrossMAEDecoder
from ..decoders.together import decode_together
from ..encoders import _together
from ..encoders.film import visible_patch_mean
from ..encoders.transformer import (
    EncoderOutput,
    LayerSelection,
    TransformerEncoder,
    _param_dtype,
    resolve_layer_indices,
)
from ..losses import masked_mse_loss, token_valid_mask_from_pixels
from ..masking.split import MaskSplit, _DenseSplit, mask_split_from_masks
from ..masking.strategies import _check_ratios, grouped_random_masking, mask_missing_samples
from ..masking.tokens import gather_tokens
from ..protocols import Encoder, QueryDecoder, SequenceDecoder, Tokenizer, cond_dim_of
from ._inputs import check_mask_split

__all__ = [
    "CondFn",
    "LossFn",
    "MaskingFn",
    "Modality",
    "ModalityLoss",
    "MultimodalMAE",
    "MultimodalOutput",
    "grouped_masking_fn",
    "padding_wins",
    "visible_site_mean",
]

MaskingFn = Callable[[Tensor, int, Optional[torch.Generator], bool], MaskSplit]
"""``(padding_mask [b, n], num_steps, generator, never_padded) -> MaskSplit`` for one
modality. With ``never_padded`` the mask is all False and may be ignored (so the output
widths are known on the host and no device sync happens).

A masking function may carry the attribute ``dense_when_unpadded = True``: a promise that,
called with ``never_padded=True``, every sample keeps the same number of tokens (no
padding slot in ``ids_keep``). Only then does `MultimodalMAE.forward` run a never-padded
modality's encoder unmasked without being told (`grouped_masking_fn` carries it); any other
function's splits are attended with their padding mask."""

LossFn = Callable[..., Tensor]
"""``loss(pred [b, p, o], target [b, p, o], *, padding_mask [b, p], valid_mask [b, p, o],
ids [b, p]) -> [b]`` per-sample losses (0 where nothing is scored); ``ids`` are the
predicted token ids (``split.ids_predict``). ``padding_mask`` True = padding slot,
``valid_mask`` True = a scored value. Default: `ModalityLoss` ``()`` (masked MSE)."""


class ModalityLoss(nn.Module):
    """A modality's per-sample masked MSE, with the downstream options.

    Args:
        average: ``"token"`` (mean over each token's valid values, then over tokens: 0.1's
            loss) or ``"value"`` (every valid value counts once in its sample: the series
            loss averaged per real site). See `crossmae.masked_mse_loss`.
        pixel_valid_mask: optional bool pixel map, **True = valid pixel** (e.g. a land mask,
            ``[H, W]``), for raster tokens: values at invalid pixels are not scored (a
            non-persistent buffer; it moves with the model).
        patch_size: the raster patch size (with ``pixel_valid_mask``).
        patch_index: the grid patch of each token slot (e.g.
            `RasterTokenizer.valid_patch_index`), with ``pixel_valid_mask``.
        in_chans: channels per pixel (with ``pixel_valid_mask``).

    Shapes: see `LossFn`; returns ``[b]``.
    """

    pixel_valid_mask: Optional[Tensor]
    patch_index: Optional[Tensor]

    def __init__(
        self,
        *,
        average: str = "token",
        pixel_valid_mask: Optional[Tensor] = None,
        patch_size: Union[int, tuple[int, int], None] = None,
        patch_index: Optional[Tensor] = None,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if average not in ("token", "value"):
            raise ValueError(f"average must be 'token' or 'value', got {average!r}")
        self.in_chans = check_int("in_chans", in_chans, minimum=1)
        if pixel_valid_mask is not None:
            check_tensor("pixel_valid_mask", pixel_valid_mask)
            if patch_size is None:
                raise ValueError("pixel_valid_mask needs patch_size")
            _check_pixel_map(pixel_valid_mask, patch_size, patch_index, self.in_chans)
        elif patch_index is not None:
            raise ValueError("patch_index is used only with pixel_valid_mask, which is None")
        self.average = average
        self.patch_size = patch_size
        self.register_buffer("pixel_valid_mask", pixel_valid_mask, persistent=False)
        self.register_buffer("patch_index", patch_index, persistent=False)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        *,
        padding_mask: Tensor,
        valid_mask: Tensor,
        ids: Tensor,
    ) -> Tensor:
        """Per-sample masked MSE of one modality's predicted tokens (a `LossFn`).

        Args:
            pred: float ``[b, p, o]`` decoder predictions for the ``p`` predicted tokens.
            target: float ``[b, p, o]`` targets of the same tokens.
            padding_mask: bool ``[b, p]``, True = padding slot (not scored).
            valid_mask: bool ``[b, p, o]`` (or ``[b, p]``), True = a scored target value; with
                ``pixel_valid_mask`` it is further restricted to valid pixels.
            ids: int ``[b, p]`` predicted token ids (``split.ids_predict``); used only with
                ``pixel_valid_mask``, to find each token's pixels.

        Returns:
            ``[b]`` per-sample losses, 0 for a sample with nothing to score.
        """
        if self.pixel_valid_mask is not None and self.patch_size is not None:
            vm = check_tensor("valid_mask", valid_mask)
            if vm.dtype != torch.bool:
                raise TypeError(
                    f"valid_mask must have dtype torch.bool (True = scored), got {vm.dtype}"
                )
            valid_mask = vm & token_valid_mask_from_pixels(
                self.pixel_valid_mask, self.patch_size, ids, patch_index=self.patch_index,
                in_chans=self.in_chans,
            )  # fmt: skip
        return masked_mse_loss(
            pred, target, padding_mask=padding_mask, valid_mask=valid_mask, reduction="none",
            average=self.average,  # type: ignore[arg-type]
        )  # fmt: skip


def _check_pixel_map(
    pixel_valid_mask: Tensor,
    patch_size: Union[int, tuple[int, int]],
    patch_index: Optional[Tensor],
    in_chans: int,
) -> None:
    """`ModalityLoss`'s construction-time check of its pixel map (a sync is fine here)."""
    batch = pixel_valid_mask.shape[0] if pixel_valid_mask.ndim >= 3 else 1
    ids = torch.zeros(batch, 1, dtype=torch.int64, device=pixel_valid_mask.device)
    # token_valid_mask_from_pixels checks dtype, rank, patch_size, in_chans, patch_index
    # metadata, each by name; only the range of patch_index is left to check here.
    token_valid_mask_from_pixels(pixel_valid_mask, patch_size, ids, in_chans=in_chans)
    if patch_index is not None:
        index = check_tensor("patch_index", patch_index)
        if index.dtype not in (torch.int64, torch.int32) or index.ndim != 1:
            raise TypeError(
                f"patch_index must be an int64 tensor [L], got dtype {index.dtype} and shape "
                f"{tuple(index.shape)}"
            )
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        grid = (pixel_valid_mask.shape[-2] // ph) * (pixel_valid_mask.shape[-1] // pw)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= grid):
            raise ValueError(
                f"patch_index values must lie in [0, {grid}) (the patches of the pixel map), "
                f"got range [{int(index.min())}, {int(index.max())}]"
            )


CondFn = Callable[[Tensor, Optional[Tensor], MaskSplit, Any], Tensor]
"""``cond_fn(static, site_padding_mask, split, tokenizer) -> cond [b, cond_dim]``: what
conditions a modality's encoder (see `visible_site_mean`)."""

Decoder = Union[QueryDecoder, SequenceDecoder]


def visible_site_mean(group_size: int) -> CondFn:
    """A `CondFn` for series modalities: the raw per-site attributes ``static [b, s, a]``
    averaged over the sample's visible patches, each patch being the mean over its real
    sites (`crossmae.encoders.visible_patch_mean`; the downstream water model's FiLM input).
    A patch is visible when any of its (step, patch) tokens is; tokens are time-major
    (``n = t * P + p``, as `SeriesTokenizer` numbers them).

    Shapes: ``static [b, s, a]``, ``site_padding_mask [b, s]`` (True = padding site) →
    ``[b, a]``.
    """
    g = check_int("group_size", group_size, minimum=1)

    def fn(
        static: Tensor, site_padding_mask: Optional[Tensor], split: MaskSplit, tokenizer: Any
    ) -> Tensor:
        x = check_float_tensor("static", static, ndim=3)
        if not isinstance(split, MaskSplit):
            raise TypeError(f"split must be a MaskSplit, got {type(split).__name__}")
        b, s = x.shape[0], x.shape[1]
        p = -(-s // g)
        vm = check_tensor("split.visible_mask", split.visible_mask)
        if vm.ndim != 2 or vm.shape[0] != b or vm.shape[1] % p != 0:
            raise ValueError(
                f"split.visible_mask must be [b, t * P] with b={b} (static) and P={p} patches "
                f"(s={s} sites, group_size={g}), got shape {tuple(vm.shape)}"
            )
        seen = vm.reshape(b, -1, p).any(dim=1)  # [b P]
        return visible_patch_mean(static, g, seen, site_padding_mask=site_padding_mask)

    return fn


def grouped_masking_fn(
    mask_ratio: float,
    predict_ratio: Optional[float] = None,
    *,
    static_shape: Optional[bool] = None,
) -> MaskingFn:
    """Masking function: exact-count random masking per (sample, time step), see
    `grouped_random_masking`. Tokens must be time-major (``n = t * l``).

    ``static_shape`` decides the slot widths of a padded modality's split (without padding
    they are always the per-step counts):

    - ``None`` (default): the batch's largest counts where reading them is free (CPU
      tensors, not compiling), else (CUDA, ``torch.compile``) the largest counts any
      padding can give, computed on the host. So drawing inside ``forward`` never syncs
      with a GPU and never breaks a compiled graph, and on the CPU the widths are the
      tightest ones. The same rule keeps `mask_missing_samples` from trimming on CUDA.
    - ``True``: always the host-computed widths (the same shapes every step and on every
      device; the extra slots are padding, the loss is the same).
    - ``False``: always the batch's largest counts, for one host sync per draw on a GPU.

    Raises:
        ValueError: ratios out of range (as `grouped_random_masking`), at construction.
        TypeError: a ratio is not a number, or ``static_shape`` is not a bool or None.
    """
    _check_ratios(mask_ratio, predict_ratio)  # at the door, not at the first draw
    if static_shape is not None and not isinstance(static_shape, bool):
        raise TypeError(
            f"static_shape must be a bool or None, got {static_shape!r} "
            f"({type(static_shape).__name__})"
        )

    def fn(
        padding_mask: Tensor,
        num_steps: int,
        generator: Optional[torch.Generator],
        never_padded: bool,
    ) -> MaskSplit:
        b, n = padding_mask.shape
        if n % num_steps != 0:
            raise ValueError(f"{n} tokens cannot be split into num_steps={num_steps} steps")
        return grouped_random_masking(
            b,
            num_steps,
            n // num_steps,
            mask_ratio,
            predict_ratio=predict_ratio,
            padding_mask=None if never_padded else padding_mask,
            generator=generator,
            device=padding_mask.device,
            static_shape=_static_widths(static_shape, padding_mask),
        )

    fn.dense_when_unpadded = True  # type: ignore[attr-defined]  # exact counts per sample
    return fn


def _static_widths(static_shape: Optional[bool], padding_mask: Tensor) -> bool:
    """`grouped_masking_fn`'s choice: as asked, else static unless reading the batch's
    counts is free (a CPU tensor outside of compilation)."""
    if static_shape is not None:
        return static_shape
    return padding_mask.device.type != "cpu" or torch.compiler.is_compiling()


def _drawn_dense(mod: Modality) -> bool:
    """Whether the modality's own draws have no padding slot in ``ids_keep``: a tokenizer
    that never pads and a masking function promising equal widths then (see `MaskingFn`)."""
    return mod.never_padded and getattr(mod.masking, "dense_when_unpadded", False) is True


def padding_wins(split: MaskSplit, padding_mask: Tensor) -> MaskSplit:
    """The same split with every padding token (``padding_mask`` True) neither visible nor
    predicted: its slots become padding slots. Widths are unchanged and nothing syncs with
    the device (safe inside a compiled forward).

    Args:
        split: `MaskSplit` over ``n`` tokens.
        padding_mask: bool ``[b, n]``, True = padding token (e.g. a tokenizer's output).

    Returns:
        `MaskSplit`; ids of padded slots are 0.

    Raises:
        TypeError: ``split`` is not a `MaskSplit`, ``padding_mask`` not a bool tensor.
        ValueError: ``padding_mask`` is not ``[b, n]`` of ``split.visible_mask``.
    """
    if not isinstance(split, MaskSplit):
        raise TypeError(f"split must be a MaskSplit, got {type(split).__name__}")
    pm = check_tensor("padding_mask", padding_mask)
    if pm.dtype != torch.bool:
        raise TypeError(f"padding_mask must have dtype torch.bool (True = padding), got {pm.dtype}")
    vis = check_tensor("split.visible_mask", split.visible_mask)
    if tuple(pm.shape) != tuple(vis.shape) or pm.ndim != 2:
        raise ValueError(
            f"padding_mask must have shape [b, n] = {tuple(vis.shape)} (split.visible_mask), "
            f"got {tuple(pm.shape)}"
        )
    padding_mask = pm
    keep_pad = split.keep_padding_mask | torch.gather(padding_mask, 1, split.ids_keep)
    pred_pad = split.predict_padding_mask | torch.gather(padding_mask, 1, split.ids_predict)
    return MaskSplit(
        split.ids_keep.masked_fill(keep_pad, 0),
        keep_pad,
        split.ids_predict.masked_fill(pred_pad, 0),
        pred_pad,
        split.visible_mask & ~padding_mask,
        split.predict_mask & ~padding_mask,
    )


def _stackable_inputs(x: Tensor, cond: Optional[Tensor], enc: TransformerEncoder) -> bool:
    """What `TransformerEncoder.forward` would accept without an error: tokens ``[b, n,
    dim]`` in the encoder's dtype (any under autocast), ``cond [b, cond_dim]`` exactly when
    it has FiLMs. Inputs it would refuse take its own call, which names the problem."""
    if x.ndim != 3 or x.shape[-1] != enc.dim:
        return False
    if x.dtype != _param_dtype(enc) and not torch.is_autocast_enabled(x.device.type):
        return False
    if (cond is None) != (enc.films is None):
        return False
    return cond is None or tuple(cond.shape) == (x.shape[0], enc.cond_dim)


def _accepts(part: object, keywords: tuple[str, ...]) -> bool:
    """``part.forward`` takes every keyword in ``keywords`` (or ``**kwargs``)."""
    try:
        forward: Any = getattr(part, "forward", None)
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return True  # no signature to read (e.g. a C function): trust the protocol check
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return all(k in params for k in keywords)


_QUERY_KEYWORDS = ("context_padding_mask", "query_padding_mask")
_SEQUENCE_KEYWORDS = ("context_padding_mask", "query_padding_mask", "padding_mask")


def _decoder_kind(name: str, decoder: object) -> str:
    if not isinstance(decoder, nn.Module):
        pass
    elif isinstance(decoder, QueryDecoder) and _accepts(decoder, _QUERY_KEYWORDS):
        return "query"
    elif isinstance(decoder, SequenceDecoder) and _accepts(decoder, _SEQUENCE_KEYWORDS):
        return "sequence"
    raise TypeError(
        f"{name} must be an nn.Module satisfying crossmae.QueryDecoder (context_dim, "
        "num_feature_maps, forward(context, ids_predict, ...)) or crossmae.SequenceDecoder "
        f"(context_dim, num_tokens, forward(context, ids_keep, ids_predict, ...)), got "
        f"{type(decoder).__name__}"
    )


def _int_attr(part: object, attr: str) -> int:
    """A part's int attribute that its protocol promises (``dim``, ``depth``, ...)."""
    return int(getattr(part, attr))


def _check_encoder(name: str, encoder: object) -> None:
    if not (
        isinstance(encoder, nn.Module)
        and isinstance(encoder, Encoder)
        and _accepts(encoder, ("return_layers", "include_input"))
    ):
        raise TypeError(
            f"{name} must be an nn.Module satisfying crossmae.Encoder (int dim, int depth, "
            f"forward(tokens, padding_mask, *, return_layers, include_input)), got "
            f"{type(encoder).__name__}"
        )


def _check_tokenizer(name: str, tokenizer: object) -> None:
    if not (isinstance(tokenizer, nn.Module) and isinstance(tokenizer, Tokenizer)):
        raise TypeError(
            f"{name} must be an nn.Module satisfying crossmae.Tokenizer (forward(x) -> (tokens, "
            "padding_mask), targets(x) -> (target, target_valid)), e.g. RasterTokenizer or "
            f"SeriesTokenizer, got {type(tokenizer).__name__}"
        )


@dataclass(frozen=True)
class _ModalityOptions:
    loss_weight: float
    uses_static: bool


class Modality(nn.Module):
    """The built parts of one modality, and the steps of the method that it owns.

    Args:
        tokenizer: a `crossmae.Tokenizer` (e.g. `RasterTokenizer`, `SeriesTokenizer`);
            ``layout_to_tokens`` is needed for ``hidden_masks``.
        encoder: a `crossmae.Encoder` of width ``e``; an encoder with a non-None ``cond_dim``
            is FiLM-conditioned on the static token (``cond=token [b, e]``).
        decoder: a `crossmae.QueryDecoder` (context width = the fusion width; e.g.
            `CrossMAEDecoder`) or a `crossmae.SequenceDecoder` (e.g. `MAEDecoder`).
        masking: `MaskingFn` (default: `grouped_masking_fn(0.4)`). A function of your own
            is attended with its splits' padding masks unless it carries
            ``dense_when_unpadded = True`` (see `MaskingFn`).
        static_token: optional module ``static_token(static, [site_padding_mask]) ->
            (token [b, 1, e], padding_mask [b, 1])`` (e.g. `StaticToken`); its token is
            appended to the encoded sequence (never padding) and conditions the encoder.
        loss_weight: weight of this modality's loss in the total.
        num_steps: time steps ``t`` the modality is built for: the largest number of steps
            an input may have (fewer run when the tokenizer has ``num_tokens`` and the
            decoder queries positions by index, e.g. `CrossMAEDecoder`).
        never_padded: the tokenizer never flags padding (default: inferred from the
            tokenizer's ``pad_empty_tokens`` attribute when it has one and ``num_patches``
            like `RasterTokenizer`; else False). Masking then runs without a padding mask, so
            its output widths are known on the host: no device sync.
        fm_layers: layers of *this modality's encoder* whose outputs feed the decoders'
            weighted feature maps (``"all"``, ints; see `MultimodalMAE`), or None.
        use_input: also feed this encoder's input (with ``fm_layers``).
        loss: a `LossFn` (default: masked MSE over valid target values), e.g. a
            per-site-averaged series loss or a loss with a pixel land mask.
        cond_fn: what conditions an encoder with a ``cond_dim``: a `CondFn` (e.g.
            `visible_site_mean`, the raw attributes averaged over the visible patches), or
            None for the static token ``[b, e]``.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        masking: Optional[MaskingFn] = None,
        static_token: Optional[nn.Module] = None,
        loss_weight: float = 1.0,
        num_steps: int = 1,
        never_padded: Optional[bool] = None,
        fm_layers: LayerSelection = None,
        use_input: bool = False,
        loss: Optional[LossFn] = None,
        cond_fn: Optional[CondFn] = None,
    ) -> None:
        super().__init__()
        _check_tokenizer("tokenizer", tokenizer)
        _check_encoder("encoder", encoder)
        _decoder_kind("decoder", decoder)
        if masking is not None and not callable(masking):
            raise TypeError(f"masking must be a MaskingFn or None, got {type(masking).__name__}")
        if static_token is not None and not isinstance(static_token, nn.Module):
            raise TypeError(
                f"static_token must be an nn.Module (e.g. StaticToken) or None, got "
                f"{type(static_token).__name__}"
            )
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be a LossFn or None, got {type(loss).__name__}")
        if cond_fn is not None and not callable(cond_fn):
            raise TypeError(f"cond_fn must be a CondFn or None, got {type(cond_fn).__name__}")
        weight = check_ratio("loss_weight", loss_weight)
        if weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {loss_weight!r}")
        steps = check_int("num_steps", num_steps, minimum=1)
        if never_padded is not None and not isinstance(never_padded, bool):
            raise TypeError(f"never_padded must be a bool or None, got {never_padded!r}")
        check_bool("use_input", use_input)
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.decoder = decoder
        self.static_token = static_token
        self.masking: MaskingFn = masking if masking is not None else grouped_masking_fn(0.4)
        self.loss_weight = weight
        self.num_steps = steps
        self.loss_fn: Optional[LossFn] = loss
        self.cond_fn: Optional[CondFn] = cond_fn
        if never_padded is None:
            flag = getattr(tokenizer, "pad_empty_tokens", None)
            never_padded = flag is False and hasattr(tokenizer, "valid_patch_index")
        self.never_padded = bool(never_padded)
        self.fm_layers: Optional[tuple[int, ...]] = None
        self.use_input = False
        if fm_layers is not None:
            depth = _int_attr(encoder, "depth")
            self.fm_layers = resolve_layer_indices(fm_layers, depth, "fm_layers")
            self.use_input = use_input
        elif use_input:
            raise ValueError("use_input=True needs fm_layers (the encoder layers to tap)")

    def __setattr__(self, name: str, value: Any) -> None:
        # Parts may be replaced after construction; the replacement is checked by protocol.
        if name == "encoder":
            _check_encoder("encoder", value)
        elif name == "decoder":
            _decoder_kind("decoder", value)
        elif name == "tokenizer":
            _check_tokenizer("tokenizer", value)
        super().__setattr__(name, value)

    @property
    def num_feature_maps(self) -> Optional[int]:
        """Feature maps this modality's encoder provides (``fm_layers`` + input), or None."""
        if self.fm_layers is None:
            return None
        return len(self.fm_layers) + int(self.use_input)

    @property
    def tokens_per_step(self) -> Optional[int]:
        """Tokens per time step (``tokenizer.num_tokens(1)``), or None when the tokenizer
        does not say (then inputs must have exactly ``num_steps`` steps)."""
        count = getattr(self.tokenizer, "num_tokens", None)
        return int(count(1)) if callable(count) else None

    def forward(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Not callable: a `Modality` is a container of parts and steps, not a layer.

        Call its steps (`tokenize`, `split`, `condition`, `encode`, `decode`, `score`), or
        put it in a `MultimodalMAE` and call that on ``{name: x [b, ...]}``.

        Args:
            *args: ignored.
            **kwargs: ignored.

        Raises:
            NotImplementedError: always (as nn.Module's own ``forward`` did), naming the
                methods to call; e.g. `tokenize` returns ``(tokens [b, n, e],
                padding_mask [b, n])`` with True = padding.
        """
        raise NotImplementedError(
            "a Modality is not called directly: call its steps (tokenize, split, condition, "
            "encode, decode, score) or use it inside MultimodalMAE"
        )

    # ------------------------------------------------------------------ the steps
    def tokenize(self, x: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Step 1: ``(tokens [b, n, e], padding_mask [b, n])`` (True = padding)."""
        tokens, pad = self.tokenizer(x, **kwargs)
        return tokens, pad

    def steps_of(self, num_tokens: int) -> int:
        """Time steps of a token sequence of length ``num_tokens``."""
        per_step = self.tokens_per_step
        return self.num_steps if per_step is None else num_tokens // max(per_step, 1)

    def split_from_masks(
        self,
        hidden_mask: Tensor,
        predict_mask: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
    ) -> MaskSplit:
        """A `MaskSplit` from masks in the modality's input layout (data preparation: one
        host sync sizes the slots; call it in a ``collate_fn`` to keep the step sync-free).

        Args:
            hidden_mask: bool, the tokenizer's input layout (``layout_to_tokens``), True =
                hidden from the encoder.
            predict_mask: optional bool, same layout, True = reconstruct (default: every
                hidden token). Must lie inside ``hidden_mask``.
            padding_mask: optional bool ``[b, n]`` token padding (True = padding), which wins.

        Returns:
            `MaskSplit` over the tokenizer's ``n`` tokens.
        """
        to_tokens = getattr(self.tokenizer, "layout_to_tokens", None)
        if not callable(to_tokens):
            raise TypeError(
                f"hidden masks need a tokenizer with layout_to_tokens(); "
                f"{type(self.tokenizer).__name__} has none (pass splits= instead)"
            )
        for arg, m in (("hidden_mask", hidden_mask), ("predict_mask", predict_mask)):
            if m is not None and check_tensor(arg, m).dtype != torch.bool:
                raise TypeError(f"{arg} must have dtype torch.bool (True = yes), got {m.dtype}")
        hidden = to_tokens(hidden_mask)
        predict = hidden if predict_mask is None else to_tokens(predict_mask)
        if predict.shape != hidden.shape:
            raise ValueError(
                f"predict_mask has shape {tuple(predict_mask.shape)} but hidden_mask has "  # type: ignore[union-attr]
                f"{tuple(hidden_mask.shape)}"
            )
        # data preparation: a host check is fine here (mask_split_from_masks syncs anyway)
        if predict_mask is not None and bool((predict & ~hidden).any()):
            raise ValueError("predict_mask marks tokens that hidden_mask does not hide")
        visible = ~hidden
        if padding_mask is not None:
            visible = visible & ~padding_mask
            predict = predict & ~padding_mask
        return mask_split_from_masks(visible, predict)

    def split(
        self,
        padding_mask: Tensor,
        *,
        given: Optional[MaskSplit] = None,
        missing: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> MaskSplit:
        """Step 2: the modality's `MaskSplit` (``given``, or drawn by ``masking``); padding
        tokens are never visible nor predicted; ``missing [b]`` removes whole samples."""
        if given is None:
            steps = self.steps_of(padding_mask.shape[1])
            split = self.masking(padding_mask, steps, generator, self.never_padded)
        else:
            split = given
        if not self.never_padded or (given is not None and not isinstance(given, _DenseSplit)):
            split = padding_wins(split, padding_mask)
        if missing is not None:
            split = mask_missing_samples(split, missing)
        return split

    def condition(
        self,
        static: Optional[Tensor],
        site_padding_mask: Optional[Tensor],
        split: MaskSplit,
        static_tok: Optional[Tensor],
    ) -> Optional[Tensor]:
        """What conditions the encoder: None unless it has a ``cond_dim``; then ``cond_fn``'s
        output, or the static token ``[b, e]``."""
        if cond_dim_of(self.encoder) is None or static is None:
            return None
        if self.cond_fn is not None:
            return self.cond_fn(static, site_padding_mask, split, self.tokenizer)
        return None if static_tok is None else static_tok[:, 0]

    def encode(
        self,
        tokens: Tensor,
        split: MaskSplit,
        static_tok: Optional[Tensor],
        *,
        dense: bool,
        cond: Optional[Tensor] = None,
    ) -> EncoderOutput:
        """Step 3: encode the visible tokens (``cond=`` only for an encoder with a
        ``cond_dim``; ``dense``: the visible slots hold no padding, attention runs
        unmasked). Returns an `EncoderOutput` whose ``tokens [b, k (+1), e]``,
        ``padding_mask [b, k (+1)]`` (True = padding; never None) and ``features`` have the
        static token appended (never padding)."""
        visible, keep_pad = split.visible_tokens(tokens)
        kwargs: dict[str, Any] = {} if cond is None else {"cond": cond}
        if self.fm_layers is not None:
            kwargs["return_layers"] = self.fm_layers
            kwargs["include_input"] = self.use_input
        out: EncoderOutput = self.encoder(visible, None if dense else keep_pad, **kwargs)
        return self._with_static(out, keep_pad, static_tok)

    def _with_static(
        self, out: EncoderOutput, keep_pad: Tensor, static_tok: Optional[Tensor]
    ) -> EncoderOutput:
        """The end of `encode`: the encoder's output with the static token appended."""
        enc, feats = out.tokens, out.features
        if static_tok is not None:
            s = static_tok.to(enc.dtype)
            enc = torch.cat([enc, s], dim=1)
            if feats is not None:
                s4 = s.to(feats.dtype)[None].expand(feats.shape[0], -1, -1, -1)
                feats = torch.cat([feats, s4], dim=2)
            keep_pad = torch.cat([keep_pad, keep_pad.new_zeros(keep_pad.shape[0], 1)], dim=1)
        return EncoderOutput(enc, keep_pad, feats)

    def decode(
        self,
        context: Tensor,
        context_padding_mask: Optional[Tensor],
        own: Tensor,
        split: MaskSplit,
        padding_mask: Tensor,
        *,
        dense: bool,
    ) -> Tensor:
        """Step 5: predictions ``[b, p, o]`` at ``split.ids_predict``. A query decoder reads
        ``context`` (fused keys ``[b, M, e]`` or feature maps ``[f, b, M, e]``); a sequence
        decoder reads ``own``, this modality's slice of the fused keys ``[b, k, e]``."""
        predict_pad = None if dense else split.predict_padding_mask
        if _decoder_kind("decoder", self.decoder) == "query":
            return self.decoder(
                context,
                split.ids_predict,
                context_padding_mask=context_padding_mask,
                query_padding_mask=predict_pad,
            )
        return self.decoder(
            own,
            split.ids_keep,
            split.ids_predict,
            context_padding_mask=None if dense else split.keep_padding_mask,
            query_padding_mask=predict_pad,
            padding_mask=padding_mask,
        )

    def score(
        self, x: Tensor, pred: Tensor, split: MaskSplit, **kwargs: Any
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Step 6: ``(loss [], per-sample loss [b], target [b, p, o], target_valid)``; the
        loss averages over the samples that have a scored value."""
        tokenizer: Any = self.tokenizer
        target_full, valid_full = tokenizer.targets(x, **kwargs)
        target = gather_tokens(target_full, split.ids_predict)
        valid = gather_tokens(valid_full, split.ids_predict)
        loss_fn = self.loss_fn if self.loss_fn is not None else _DEFAULT_LOSS
        per_sample = loss_fn(
            pred, target, padding_mask=split.predict_padding_mask, valid_mask=valid,
            ids=split.ids_predict,
        )  # fmt: skip
        scored = (~split.predict_padding_mask[..., None] & valid).flatten(1).any(dim=1)
        loss = per_sample.sum() / scored.sum().clamp(min=1).to(per_sample.dtype)
        return loss, per_sample, target, valid


_DEFAULT_LOSS = ModalityLoss()


def _check_batch(name: str, value: object, batch: int, against: str) -> Tensor:
    """A tensor ``[batch, ...]`` (metadata check)."""
    t = check_tensor(name, value)
    if t.ndim == 0 or t.shape[0] != batch:
        raise ValueError(
            f"{name} has batch size {t.shape[0] if t.ndim else None} (shape {tuple(t.shape)}) "
            f"but {against} has batch size {batch}"
        )
    return t


def _check_bool_mask(name: str, value: object, batch: int) -> Tensor:
    t = _check_batch(name, value, batch, "inputs")
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = hidden), got {t.dtype}")
    return t


class MultimodalOutput(NamedTuple):
    """What `MultimodalMAE.forward` returns.

    Attributes:
        loss: scalar, ``sum_m weight_m * losses[m]``.
        losses: per-modality scalar losses.
        sample_losses: per-modality per-sample losses ``[b]`` (0 where nothing is scored).
        preds: per-modality predictions ``[b, p_m, o_m]`` at ``splits[m].ids_predict``.
        targets: per-modality targets ``[b, p_m, o_m]`` (invalid values are 0).
        target_valid: per-modality bool ``[b, p_m, o_m]``, True = scored value.
        splits: per-modality `MaskSplit` (as used: tokenizer padding removed).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    sample_losses: dict[str, Tensor]
    preds: dict[str, Tensor]
    targets: dict[str, Tensor]
    target_valid: dict[str, Tensor]
    splits: dict[str, MaskSplit]


class MultimodalMAE(nn.Module):
    """Named modalities → encoders → fused keys → one decoder per modality.

    Args:
        modalities: name → `Modality` (insertion order = order in the fused sequence).
        fusion: optional `crossmae.Encoder` over the concatenated encoded tokens (all
            modality encoders must share its width). None: the concatenation is used as is.
        use_weighted_fm: query decoders receive ``[f, b, M, e]`` feature maps: the outputs
            of the fusion layers ``fm_layers`` (and, with ``use_input``, the fusion input).
            Decoders must then be built with ``num_feature_maps=f``.
        fm_layers: fusion layers to tap (``"all"``, ints, negatives allowed).
        use_input: include the fusion input (the concatenated modality encodings).
        fuse_decoders: decode the modalities whose decoder is a `CrossMAEDecoder` in
            lockstep with `decode_together`: where the packed CUDA kernel serves (half
            precision, padded keys), one attention call per layer serves every decoder
            instead of one per decoder. Results are the same either way; False runs the
            decoders one by one (e.g. to compare). Also an attribute:
            ``model.fuse_decoders = False`` on a built model (e.g. from `water_mae_small`).

    Feature maps may instead come from **each modality's own encoder**: give every
    `Modality` the same number of taps (``Modality(fm_layers=...)``); map ``j`` of the
    decoders' context is then the concatenation over modalities of each encoder's tap ``j``
    (static tokens appended), followed, when a fusion encoder is given, by one more map:
    the fused keys. ``use_weighted_fm`` must then be False.

    Shapes:
        ``forward(inputs: {name: x_m}, *, tokenizer_kwargs={name: {...}}, static=None
        ([b, a] or [b, s, a]), site_padding_mask=None ([b, s]), missing={name: bool [b]},
        splits={name: MaskSplit}, hidden_masks={name: bool}, predict_masks={name: bool},
        dense=None, generator=None) -> MultimodalOutput``.
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        fusion: Optional[nn.Module] = None,
        *,
        use_weighted_fm: bool = False,
        fm_layers: LayerSelection = "all",
        use_input: bool = False,
        fuse_decoders: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(modalities, Mapping):
            raise TypeError(
                f"modalities must be a mapping from name to Modality, got "
                f"{type(modalities).__name__}"
            )
        if not modalities:
            raise ValueError("modalities must name at least one modality")
        for name, mod in modalities.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"modalities keys must be non-empty strings, got {name!r}")
            if not isinstance(mod, Modality):
                raise TypeError(
                    f"modalities[{name!r}] must be a Modality, got {type(mod).__name__}"
                )
        if fusion is not None:
            _check_encoder("fusion", fusion)
        for flag, value in (
            ("use_weighted_fm", use_weighted_fm),
            ("use_input", use_input),
            ("fuse_decoders", fuse_decoders),
        ):
            check_bool(flag, value)
        if use_weighted_fm and fusion is None:
            raise ValueError("use_weighted_fm=True needs a fusion encoder to tap")
        self.use_weighted_fm = use_weighted_fm
        self.fm_layers = fm_layers
        self.use_input = use_input
        self.fuse_decoders = fuse_decoders
        self.modalities = nn.ModuleDict(dict(modalities))
        self.fusion = fusion
        self._check_feature_maps()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "fusion" and value is not None:
            _check_encoder("fusion", value)
        if name == "fuse_decoders":
            check_bool("fuse_decoders", value)
        super().__setattr__(name, value)

    def _check_feature_maps(self) -> None:
        """Every query decoder mixes as many feature maps as the model provides."""
        num_maps = self.num_feature_maps
        for name, mod in self._items():
            dec = mod.decoder
            own = getattr(dec, "num_feature_maps", None)
            if _decoder_kind("decoder", dec) == "query" and own not in (None, num_maps):
                raise ValueError(
                    f"modalities[{name!r}].decoder mixes num_feature_maps={own} feature maps "
                    f"but the model provides {num_maps} (use_weighted_fm="
                    f"{self.use_weighted_fm}, fm_layers={self.fm_layers!r}, use_input="
                    f"{self.use_input}, modality taps "
                    f"{ {n: m.num_feature_maps for n, m in self._items()} })"
                )

    @property
    def num_feature_maps(self) -> Optional[int]:
        """Feature maps the decoders receive (None: one key set ``[b, M, e]``)."""
        taps = {mod.num_feature_maps for _, mod in self._items()}
        if taps != {None}:
            if None in taps or len(taps) != 1:
                raise ValueError(
                    "modality feature taps must be given for every modality with the same "
                    f"count, got { {n: m.num_feature_maps for n, m in self._items()} }"
                )
            if self.use_weighted_fm:
                raise ValueError("use_weighted_fm=True (fusion taps) and modality taps exclude")
            (count,) = taps
            assert count is not None
            return count + int(self.fusion is not None)
        if self.use_weighted_fm and self.fusion is not None:
            depth = _int_attr(self.fusion, "depth")
            return len(resolve_layer_indices(self.fm_layers, depth, "fm_layers")) + int(
                self.use_input
            )
        return None

    @property
    def names(self) -> list[str]:
        """Modality names in fused order."""
        return list(self.modalities.keys())

    def _modality(self, name: str) -> Modality:
        mod = self.modalities[name]
        assert isinstance(mod, Modality)
        return mod

    def _items(self) -> list[tuple[str, Modality]]:
        return [(name, mod) for name, mod in self.modalities.items() if isinstance(mod, Modality)]

    # ------------------------------------------------------------------ data preparation
    def make_splits(
        self,
        padding_masks: Mapping[str, Tensor],
        *,
        missing: Optional[Mapping[str, Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, MaskSplit]:
        """Draw one `MaskSplit` per modality (data preparation; may sync to size outputs).

        Args:
            padding_masks: name → bool ``[b, n_m]`` token padding mask (True = padding), for
                every modality.
            missing: optional name → bool ``[b]`` (True = the modality is absent for that
                sample: no token of it is kept or predicted).
            generator: RNG for the masking functions.
        """
        check_generator("generator", generator)
        self._check_names("padding_masks", padding_masks, require_all=True)
        self._check_names("missing", missing)
        return {
            name: mod.split(
                padding_masks[name],
                missing=None if missing is None else missing.get(name),
                generator=generator,
            )
            for name, mod in self._items()
        }

    def draw_splits(
        self,
        inputs: Mapping[str, Tensor],
        *,
        tokenizer_kwargs: Optional[Mapping[str, Mapping[str, object]]] = None,
        site_padding_mask: Optional[Tensor] = None,
        missing: Optional[Mapping[str, Tensor]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, MaskSplit]:
        """The splits ``forward(inputs, ..., generator=generator)`` would draw, drawn before
        it: tokenize without gradients for the padding masks, then `make_splits`.

        For a compiled forward: dynamo cannot trace a ``torch.Generator``, so masks drawn
        inside a compiled forward break its graph at every draw. Draw them here, eagerly
        (inside a captured CUDA graph too: with static split widths nothing syncs), and
        pass ``forward(inputs, splits=...)``. The draws equal forward's own for the same
        generator state, and so does the attention plan: the split of a never-padded
        modality with no sample missing is marked dense (still a `MaskSplit`), so the
        forward given it runs that encoder unmasked, as with its own draws. An edited copy
        (``split._replace(...)``) loses the mark.

        Args:
            inputs, tokenizer_kwargs, site_padding_mask, missing: as in `forward`.
            generator: RNG for the masking functions.

        Returns:
            name → `MaskSplit`, for every modality.
        """
        check_generator("generator", generator)
        self._check_names("missing", missing)
        with torch.no_grad():
            tokenized = self.tokenize(inputs, tokenizer_kwargs, site_padding_mask)
        pads = {name: pad for name, (_, pad) in tokenized.items()}
        splits = self.make_splits(pads, missing=missing, generator=generator)
        for name, mod in self._items():  # as dense as forward's own draws (see forward)
            if _drawn_dense(mod) and (missing is None or name not in missing):
                splits[name] = _DenseSplit(*splits[name])
        return splits

    def splits_from_masks(
        self,
        hidden_masks: Mapping[str, Tensor],
        predict_masks: Optional[Mapping[str, Tensor]] = None,
    ) -> dict[str, MaskSplit]:
        """`Modality.split_from_masks` for every modality in ``hidden_masks`` (data
        preparation, e.g. in a ``collate_fn``: one host sync each). Masks are in each
        modality's input layout, True = hidden / predicted; pass the result as
        ``forward(splits=...)`` (tokenizer padding still wins there)."""
        self._check_names("hidden_masks", hidden_masks)
        self._check_names("predict_masks", predict_masks)
        predict_masks = predict_masks or {}
        return self._mask_splits(hidden_masks, predict_masks)

    def full_reconstruction_split(self, split: MaskSplit, padding_mask: Tensor) -> MaskSplit:
        """Same visible tokens, but every hidden real token is predicted (inference)."""
        predict = ~split.visible_mask & ~padding_mask
        return mask_split_from_masks(split.visible_mask, predict, padding_mask=padding_mask)

    # ------------------------------------------------------------------ checks
    def _check_names(
        self, arg: str, value: Optional[Mapping[str, Any]], *, require_all: bool = False
    ) -> None:
        """``value`` is None or a mapping keyed by modality names (all of them if
        ``require_all``); errors name ``arg`` and the offending key."""
        if value is None:
            if require_all:
                raise TypeError(f"{arg} must map every modality {self.names} to a value, got None")
            return
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{arg} must be a mapping from modality name to value, got {type(value).__name__}"
            )
        unknown = [k for k in value if k not in self.modalities]
        if unknown:
            raise ValueError(f"{arg} has unknown modalities {unknown}; known: {self.names}")
        if require_all:
            lacking = [n for n in self.names if n not in value]
            if lacking:
                raise ValueError(f"{arg} lacks modalities {lacking}; it needs all of {self.names}")

    def _check_inputs(self, inputs: Mapping[str, Tensor]) -> int:
        """Names, types and a common batch size of ``inputs``; returns the batch size."""
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs must be a mapping from modality name to tensor, got {type(inputs).__name__}"
            )
        missing_names = [n for n in self.names if n not in inputs]
        if missing_names:
            raise ValueError(f"inputs lacks modalities {missing_names}; got {sorted(inputs)}")
        extra = sorted(set(inputs) - set(self.names))
        if extra:
            raise ValueError(f"inputs has unknown modalities {extra}; known: {self.names}")
        first = self.names[0]
        x0 = check_tensor(f"inputs[{first!r}]", inputs[first])
        if x0.ndim == 0:
            raise ValueError(f"inputs[{first!r}] must have a batch dimension, got a scalar")
        batch = x0.shape[0]
        for name in self.names[1:]:
            _check_batch(f"inputs[{name!r}]", inputs[name], batch, f"inputs[{first!r}]")
        return batch

    def _check_static(
        self, static: Optional[Tensor], site_padding_mask: Optional[Tensor], batch: int
    ) -> None:
        """``static`` is there when a modality has a static token, with the batch, dtype and
        attribute count that static token needs (before any tokenizing)."""
        needs = [(n, m.static_token) for n, m in self._items() if m.static_token is not None]
        if static is None:
            if needs:
                names = [n for n, _ in needs]
                raise ValueError(f"static is required: modalities {names} have a static token")
            return
        st = _check_batch("static", static, batch, "inputs")
        if not st.is_floating_point():
            raise TypeError(f"static must be a floating-point tensor, got dtype {st.dtype}")
        for name, tok in needs:
            check = getattr(tok, "check_static", None)
            if callable(check):
                kw = (
                    {"site_padding_mask": site_padding_mask}
                    if getattr(tok, "per_site", False)
                    else {}
                )
                try:
                    check(st, **kw)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"static (for modality {name!r}): {e}") from e

    def _kwargs(
        self,
        name: str,
        tokenizer_kwargs: Optional[Mapping[str, Mapping[str, object]]],
        site_padding_mask: Optional[Tensor],
    ) -> dict[str, object]:
        given = (tokenizer_kwargs or {}).get(name, {})
        if not isinstance(given, Mapping):
            raise TypeError(
                f"tokenizer_kwargs[{name!r}] must be a mapping of keyword arguments, got "
                f"{type(given).__name__}"
            )
        kwargs = dict(given)
        mod = self.modalities[name]
        if site_padding_mask is not None and hasattr(mod.tokenizer, "num_sites"):
            kwargs.setdefault("site_padding_mask", site_padding_mask)
        return kwargs

    def _check_forward(
        self,
        inputs: Mapping[str, Tensor],
        tokenizer_kwargs: Optional[Mapping[str, Mapping[str, object]]],
        static: Optional[Tensor],
        site_padding_mask: Optional[Tensor],
        missing: Optional[Mapping[str, Tensor]],
        splits: Optional[Mapping[str, MaskSplit]],
        hidden_masks: Optional[Mapping[str, Tensor]],
        predict_masks: Optional[Mapping[str, Tensor]],
        dense: Union[bool, Mapping[str, bool], None],
        generator: Optional[torch.Generator],
    ) -> tuple[int, dict[str, bool], dict[str, bool]]:
        """Every argument of `forward`, once, before any work (metadata only, no sync).
        Returns the batch size and, per modality, whether its visible slots are dense (the
        encoder runs unmasked) and whether that was promised (``dense``: the decoders and
        the fusion run unmasked too)."""
        check_generator("generator", generator)
        b = self._check_inputs(inputs)
        self._check_names("tokenizer_kwargs", tokenizer_kwargs)
        self._check_names("missing", missing)
        self._check_names("splits", splits)
        self._check_names("hidden_masks", hidden_masks)
        self._check_names("predict_masks", predict_masks)
        for name in (hidden_masks or {}).keys() & (splits or {}).keys():
            raise ValueError(f"modality {name!r} has both splits[{name!r}] and hidden_masks")
        if splits is not None:  # given splits cover every modality (with hidden_masks)
            lacking = [n for n in self.names if n not in splits and n not in (hidden_masks or {})]
            if lacking:
                raise ValueError(
                    f"splits lacks modalities {lacking}; give a split (or hidden_masks) for "
                    f"all of {self.names}"
                )
        for name in predict_masks or {}:
            if name not in (hidden_masks or {}):
                raise ValueError(f"predict_masks[{name!r}] needs hidden_masks[{name!r}]")
        for arg, masks in (("hidden_masks", hidden_masks), ("predict_masks", predict_masks)):
            for name, m in (masks or {}).items():
                _check_bool_mask(f"{arg}[{name!r}]", m, b)
        if missing is not None:
            for name, flags in missing.items():
                f = _check_batch(f"missing[{name!r}]", flags, b, "inputs")
                if f.dtype != torch.bool or f.ndim != 1:
                    raise TypeError(
                        f"missing[{name!r}] must be a bool tensor [b] (True = modality absent), "
                        f"got dtype {f.dtype} shape {tuple(f.shape)}"
                    )
        if site_padding_mask is not None:
            spm = _check_batch("site_padding_mask", site_padding_mask, b, "inputs")
            if spm.dtype != torch.bool:
                raise TypeError(
                    f"site_padding_mask must have dtype torch.bool (True = padding site), "
                    f"got {spm.dtype}"
                )
        self._check_static(static, site_padding_mask, b)
        for name in self.names:
            self._kwargs(name, tokenizer_kwargs, site_padding_mask)
        if dense is not None and not isinstance(dense, (bool, Mapping)):
            raise TypeError(f"dense must be None, a bool or a mapping name → bool, got {dense!r}")
        if isinstance(dense, Mapping):
            self._check_names("dense", dense)
            for name, flag in dense.items():
                check_bool(f"dense[{name!r}]", flag)
        # A modality's visible slots are dense (no padding: unmasked kernels) when promised,
        # or when drawn without padding (here or by draw_splits) and no sample of it is removed.
        # Only a promise drops the padding masks of the decoders and the fusion too.
        out: dict[str, bool] = {}
        promised: dict[str, bool] = {}
        for name, mod in self._items():
            split = None if splits is None else splits.get(name)
            given = split is not None or name in (hidden_masks or {})
            # the mark proves a given split has no padding; our own draws need the promise
            free = isinstance(split, _DenseSplit) or (not given and _drawn_dense(mod))
            auto = free and mod.never_padded and (missing is None or name not in missing)
            promise = dense.get(name) if isinstance(dense, Mapping) else dense
            out[name] = auto if promise is None else promise
            promised[name] = bool(promise)
        return b, out, promised

    def _check_tokens(
        self,
        name: str,
        x: Tensor,
        tokens: Tensor,
        split: Optional[MaskSplit],
        b: int,
        from_masks: bool = False,
    ) -> None:
        """The token count fits the modality (at most ``num_steps`` steps) and a given
        split."""
        mod = self._modality(name)
        n_m = tokens.shape[1]
        per_step = mod.tokens_per_step
        rows = getattr(mod.decoder, "num_positions", None)
        if _decoder_kind("decoder", mod.decoder) == "sequence":
            rows = _int_attr(mod.decoder, "num_tokens")
            fits = n_m == rows
        elif per_step is None:
            fits = rows is None or n_m == rows
        else:
            fits = n_m % max(per_step, 1) == 0 and n_m <= per_step * mod.num_steps
            fits = fits and (rows is None or n_m <= rows)
        if not fits:
            steps = "?" if per_step is None else n_m // max(per_step, 1)
            raise ValueError(
                f"inputs[{name!r}] of shape {tuple(x.shape)} gives {n_m} tokens ({steps} "
                f"steps) but modality {name!r} is built for {rows} positions, at most "
                f"num_steps={mod.num_steps} steps"
            )
        if split is not None:
            label = "hidden_masks" if from_masks else "splits"
            check_mask_split(
                f"{label}[{name!r}]", split, b, n_m, f"inputs[{name!r}] ({n_m} tokens)"
            )

    # ------------------------------------------------------------------ the steps
    def tokenize(
        self,
        inputs: Mapping[str, Tensor],
        tokenizer_kwargs: Optional[Mapping[str, Mapping[str, object]]] = None,
        site_padding_mask: Optional[Tensor] = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Step 1: ``{name: (tokens [b, n_m, e], padding_mask [b, n_m])}``.

        A tokenizer's ValueError/TypeError is re-raised (same type) prefixed with
        ``inputs['<name>']``, so the message says which modality was wrong.
        """
        self._check_inputs(inputs)
        self._check_names("tokenizer_kwargs", tokenizer_kwargs)
        out = {}
        for name, mod in self._items():
            kwargs = self._kwargs(name, tokenizer_kwargs, site_padding_mask)
            x = check_tensor(f"inputs[{name!r}]", inputs[name])
            try:
                out[name] = mod.tokenize(x, **kwargs)
            except (ValueError, TypeError) as e:
                cls = TypeError if isinstance(e, TypeError) else ValueError
                raise cls(f"inputs[{name!r}]: {e}") from e
        return out

    def fuse(
        self, encoded: Mapping[str, EncoderOutput], dense: bool
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Step 4: ``(keys [b, M, e], keys_padding_mask [b, M], context, context_padding)``:
        the concatenated encodings through the fusion encoder, and what the query decoders
        read (``keys`` or stacked feature maps ``[f, b, M, e]``; the padding mask is None
        when ``dense``)."""
        keys = torch.cat([e.tokens for e in encoded.values()], dim=1)
        pad = torch.cat([e.padding_mask for e in encoded.values() if e.padding_mask is not None], 1)
        mod_feats = [e.features for e in encoded.values()]
        key_pad = None if dense else pad
        context: Optional[Tensor] = None
        if self.fusion is not None:
            taps = self.use_weighted_fm
            fused: EncoderOutput = self.fusion(
                keys,
                key_pad,
                return_layers=self.fm_layers if taps else None,
                include_input=self.use_input and taps,
            )
            keys, context = fused.tokens, fused.features
        if all(f is not None for f in mod_feats):  # taps of every modality's own encoder
            maps = torch.cat([f for f in mod_feats if f is not None], dim=2)
            if self.fusion is not None:
                maps = torch.cat([maps, keys[None].to(maps.dtype)], dim=0)
            context = maps
        return keys, pad, (keys if context is None else context), key_pad

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        *,
        tokenizer_kwargs: Optional[Mapping[str, Mapping[str, object]]] = None,
        static: Optional[Tensor] = None,
        site_padding_mask: Optional[Tensor] = None,
        missing: Optional[Mapping[str, Tensor]] = None,
        splits: Optional[Mapping[str, MaskSplit]] = None,
        hidden_masks: Optional[Mapping[str, Tensor]] = None,
        predict_masks: Optional[Mapping[str, Tensor]] = None,
        dense: Union[bool, Mapping[str, bool], None] = None,
        generator: Optional[torch.Generator] = None,
    ) -> MultimodalOutput:
        """Tokenize, split, encode, fuse, decode and score every modality.

        Args:
            inputs: name → input ``x_m`` in the modality's layout (e.g. rasters
                ``[b, t, H, W]``, series ``[b, s, t]``; NaN = missing value).
            tokenizer_kwargs: name → extra keyword arguments of that tokenizer.
            static: static attributes ``[b, a]`` or ``[b, s, a]`` (for static tokens).
            site_padding_mask: bool ``[b, s]``, True = padding site (series tokenizers and
                per-site static tokens).
            missing: name → bool ``[b]``, True = the modality is absent for that sample.
            splits: name → `MaskSplit` over the modality's tokens (e.g. drawn in the data
                pipeline); modalities left out are masked by the model.
            hidden_masks: name → bool mask in the modality's **input layout**, True =
                hidden from the encoder: a raster ``[b, t, gh*gw]`` or ``[b, t, gh, gw]``
                over the full patch grid (cells that are not valid patches are ignored); a
                series ``[b, P, t]`` over site groups × steps. One host sync per modality
                (slot widths); for a sync-free step build ``splits`` with
                `splits_from_masks` in the data pipeline.
            predict_masks: name → bool, same layout, True = reconstruct (default: every
                hidden real token); must lie inside ``hidden_masks``.
            dense: promise that the visible slots of the named modalities (True: of all)
                hold no padding, so attention runs unmasked (flash kernels). Default: True
                only for a split of a never-padded modality whose masking function
                promises equal widths (`MaskingFn`, e.g. `grouped_masking_fn`), drawn here
                or by `draw_splits` (and not edited since). A false promise gives wrong
                results.
            generator: RNG for the model's own masking (a `torch.Generator`).

        Tokenizer padding always wins: a padding token is never visible, never predicted,
        whichever way the split came.

        Returns:
            `MultimodalOutput`.
        """
        b, dense_of, promised = self._check_forward(
            inputs, tokenizer_kwargs, static, site_padding_mask, missing, splits,
            hidden_masks, predict_masks, dense, generator,
        )  # fmt: skip
        given = {**(splits or {}), **self._mask_splits(hidden_masks, predict_masks)}
        tokenized = self.tokenize(inputs, tokenizer_kwargs, site_padding_mask)
        used: dict[str, MaskSplit] = {}
        parts: dict[str, tuple[Optional[Tensor], Optional[Tensor]]] = {}
        for name, mod in self._items():
            tokens, pad = tokenized[name]
            from_masks = name in (hidden_masks or {})
            self._check_tokens(name, inputs[name], tokens, given.get(name), b, from_masks)
            flags = None if missing is None else missing.get(name)
            used[name] = mod.split(pad, given=given.get(name), missing=flags, generator=generator)
            static_tok = self._static_token(mod, static, site_padding_mask)
            cond = mod.condition(static, site_padding_mask, used[name], static_tok)
            parts[name] = (static_tok, cond)
        encoded = self._encode_all(tokenized, used, parts, dense_of)
        all_dense = all(promised.values())
        keys, _, context, context_pad = self.fuse(encoded, all_dense)
        losses, per_sample, preds, targets, valids = {}, {}, {}, {}, {}
        fused = self._decode_together(context, context_pad, used, promised)
        total = keys.new_zeros(())
        offset = 0
        for name, mod in self._items():
            width = encoded[name].tokens.shape[1]
            own = keys[:, offset : offset + used[name].ids_keep.shape[1]]
            offset += width
            pad = tokenized[name][1]
            if name in fused:
                preds[name] = fused[name]
            else:
                preds[name] = mod.decode(
                    context, context_pad, own, used[name], pad, dense=promised[name]
                )
            kwargs = self._kwargs(name, tokenizer_kwargs, site_padding_mask)
            kwargs.pop("time_positions", None)
            losses[name], per_sample[name], targets[name], valids[name] = mod.score(
                inputs[name], preds[name], used[name], **kwargs
            )
            total = total + mod.loss_weight * losses[name]
        return MultimodalOutput(total, losses, per_sample, preds, targets, valids, used)

    def _encode_all(
        self,
        tokenized: Mapping[str, tuple[Tensor, Optional[Tensor]]],
        used: Mapping[str, MaskSplit],
        parts: Mapping[str, tuple[Optional[Tensor], Optional[Tensor]]],
        dense_of: Mapping[str, bool],
    ) -> dict[str, EncoderOutput]:
        """Step 3 for every modality (`Modality.encode`). In eager mode, modalities whose
        encoders are stock `TransformerEncoder` s of one architecture and whose visible
        tokens share one shape run **stacked** (`crossmae.encoders._together`): one
        batched op per block step and one attention call for all of them."""
        stacks: dict[tuple[object, ...], list[tuple[str, Any]]] = {}
        visible: dict[str, tuple[Tensor, Tensor]] = {}
        if _together.may_stack():
            for name, mod in self._items():
                if type(mod).encode is not Modality.encode or mod.fm_layers is not None:
                    continue
                got = _together.encoder_parts(mod.encoder)
                if got is None:
                    continue
                vis, keep_pad = used[name].visible_tokens(tokenized[name][0])
                cond = parts[name][1]
                if not _stackable_inputs(vis, cond, cast(TransformerEncoder, mod.encoder)):
                    continue  # the encoder's own call names what is wrong
                dense = dense_of[name]
                key = (got[0], tuple(vis.shape), vis.dtype, dense,
                       None if cond is None else (tuple(cond.shape), cond.dtype))  # fmt: skip
                visible[name] = (vis, keep_pad)
                stacks.setdefault(key, []).append((name, got[1:]))
        out: dict[str, EncoderOutput] = {}
        for members in stacks.values():
            if len(members) < 2:
                continue
            names = [nm for nm, _ in members]
            mods = [self._modality(nm) for nm in names]
            dense = dense_of[names[0]]
            results = _together.encode_stacked(
                [cast(TransformerEncoder, m.encoder) for m in mods],
                [pp for _, pp in members],
                [visible[nm][0] for nm in names],
                [None if dense else visible[nm][1] for nm in names],
                [parts[nm][1] for nm in names],
            )
            for nm, m, res in zip(names, mods, results):
                out[nm] = m._with_static(res, visible[nm][1], parts[nm][0])
        for name, mod in self._items():
            if name in out:
                continue
            static_tok, cond = parts[name]
            if name in visible:  # `Modality.encode`, with the visible tokens already taken
                vis, keep_pad = visible[name]
                kwargs: dict[str, Any] = {} if cond is None else {"cond": cond}
                res = mod.encoder(vis, None if dense_of[name] else keep_pad, **kwargs)
                out[name] = mod._with_static(res, keep_pad, static_tok)
            else:
                out[name] = mod.encode(
                    tokenized[name][0], used[name], static_tok, dense=dense_of[name], cond=cond
                )
        return {name: out[name] for name in self.names}

    def _decode_together(
        self,
        context: Tensor,
        context_pad: Optional[Tensor],
        used: Mapping[str, MaskSplit],
        promised: Mapping[str, bool],
    ) -> dict[str, Tensor]:
        """Predictions of the modalities whose `CrossMAEDecoder` s can decode in lockstep
        (`decode_together`: one attention call per layer for all of them), when
        ``fuse_decoders`` is on and at least two qualify; the others decode one by one."""
        if not self.fuse_decoders or context_pad is None:
            return {}
        names = [
            name
            for name, mod in self._items()
            if type(mod).decode is Modality.decode and isinstance(mod.decoder, CrossMAEDecoder)
        ]
        if len(names) < 2:
            return {}
        mods = [self._modality(n) for n in names]
        outs = decode_together(
            [cast(CrossMAEDecoder, m.decoder) for m in mods],
            context,
            [used[n].ids_predict for n in names],
            context_padding_mask=context_pad,
            query_padding_masks=[
                None if promised[n] else used[n].predict_padding_mask for n in names
            ],
        )
        return dict(zip(names, outs))

    def _mask_splits(
        self,
        hidden_masks: Optional[Mapping[str, Tensor]],
        predict_masks: Optional[Mapping[str, Tensor]],
    ) -> dict[str, MaskSplit]:
        """Splits from masks in the input layout; errors name ``hidden_masks['<name>']``."""
        out = {}
        for name, hidden in (hidden_masks or {}).items():
            try:
                out[name] = self._modality(name).split_from_masks(
                    hidden, (predict_masks or {}).get(name)
                )
            except (TypeError, ValueError) as e:
                raise type(e)(f"hidden_masks[{name!r}] / predict_masks[{name!r}]: {e}") from e
        return out

    @staticmethod
    def _static_token(
        mod: Modality, static: Optional[Tensor], site_padding_mask: Optional[Tensor]
    ) -> Optional[Tensor]:
        if mod.static_token is None or static is None:
            return None
        per_site = getattr(mod.static_token, "per_site", False)
        kw = {"site_padding_mask": site_padding_mask} if per_site else {}
        token, _ = mod.static_token(static, **kw)
        return token
