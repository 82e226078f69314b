"""Multimodal masked autoencoder: per-modality tokenizers and encoders, fusion, CrossMAE decoders.

Legend: ``b`` batch, ``n_m`` tokens of modality ``m`` (time-major, ``t * l_m``), ``k_m``
visible tokens of ``m``, ``p_m`` predicted tokens of ``m``, ``M`` fused keys (all
modalities' visible tokens, plus static tokens), ``e`` encoder width.
Mask polarity: every ``*_padding_mask`` True = padding slot.

Data flow for every modality ``m`` (nothing here loops over samples):

1. ``tokens, padding_mask = tokenizer(x_m)`` (invalid/missing data → padding tokens);
2. a `MaskSplit` from the modality's masking function (or the one given), honouring that
   padding; a per-sample ``missing`` flag removes every token of that sample;
3. the visible tokens are encoded (optionally FiLM-conditioned on static attributes, and
   with one static token appended so every sample keeps at least one real key);
4. all modalities' encoded tokens are concatenated with their padding masks and fused by
   a few more self-attention layers;
5. each modality's decoder reconstructs its ``ids_predict`` from the fused keys
   (`CrossMAEDecoder`, or `MAEDecoder` over the modality's own slice of the fused tokens);
6. a masked MSE per modality (invalid target values never scored), weighted and summed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union, cast

import torch
import torch.nn as nn
from torch import Tensor

from .._checks import check_int, check_ratio, check_tensor
from ..decoders.cross import CrossMAEDecoder
from ..decoders.mae import MAEDecoder
from ..encoders.transformer import LayerSelection, TransformerEncoder, resolve_layer_indices
from ..layers import _varlen
from ..losses import masked_mse_loss
from ..masking.split import MaskSplit, mask_split_from_masks
from ..masking.strategies import grouped_random_masking, mask_missing_samples
from ..masking.tokens import gather_tokens
from ..tokenizers.raster import RasterTokenizer
from ..tokenizers.series import SeriesTokenizer, StaticToken
from ._inputs import check_mask_split

__all__ = [
    "MaskingFn",
    "Modality",
    "MultimodalMAE",
    "MultimodalOutput",
    "grouped_masking_fn",
]

MaskingFn = Callable[[Tensor, int, Optional[torch.Generator], bool], MaskSplit]
"""``(padding_mask [b, n], num_steps, generator, never_padded) -> MaskSplit`` for one
modality. With ``never_padded`` the mask is all False and may be ignored (so the output
widths are known on the host and no device sync happens)."""


def grouped_masking_fn(mask_ratio: float, predict_ratio: Optional[float] = None) -> MaskingFn:
    """Masking function: exact-count random masking per (sample, time step), see
    `grouped_random_masking`. Tokens must be time-major (``n = t * l``)."""

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
        )

    return fn


@dataclass(frozen=True)
class _ModalityOptions:
    loss_weight: float
    uses_static: bool


class Modality(nn.Module):
    """The built parts of one modality.

    Args:
        tokenizer: a module ``tokenizer(x, **kwargs) -> (tokens [b, n, e], padding_mask [b, n])``
            with ``targets(x, **kwargs) -> (target [b, n, o], target_valid)`` (e.g.
            `RasterTokenizer`, `SeriesTokenizer`).
        encoder: `TransformerEncoder` of width ``e`` (with ``cond_dim=e`` to be FiLM-conditioned
            on the static token).
        decoder: `CrossMAEDecoder` (context width = the fusion width) or `MAEDecoder`.
        masking: `MaskingFn` (default: `grouped_masking_fn(0.4)`).
        static_token: optional `StaticToken`; its token is appended to the encoded sequence
            (never padding) and, if the encoder has ``cond_dim``, conditions it via FiLM.
        loss_weight: weight of this modality's loss in the total.
        num_steps: time steps ``t`` of the token layout (for the default masking).
        never_padded: the tokenizer never flags padding (default: inferred, True for a
            `RasterTokenizer` without ``pad_empty_tokens``). Masking then runs without a
            padding mask, so its output widths are known on the host: no device sync.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        encoder: TransformerEncoder,
        decoder: Union[CrossMAEDecoder, MAEDecoder],
        *,
        masking: Optional[MaskingFn] = None,
        static_token: Optional[StaticToken] = None,
        loss_weight: float = 1.0,
        num_steps: int = 1,
        never_padded: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if not isinstance(tokenizer, nn.Module) or not callable(
            getattr(tokenizer, "targets", None)
        ):
            raise TypeError(
                "tokenizer must be an nn.Module with a targets() method (e.g. RasterTokenizer, "
                f"SeriesTokenizer), got {type(tokenizer).__name__}"
            )
        if not isinstance(encoder, TransformerEncoder):
            raise TypeError(f"encoder must be a TransformerEncoder, got {type(encoder).__name__}")
        if not isinstance(decoder, (CrossMAEDecoder, MAEDecoder)):
            raise TypeError(
                f"decoder must be a CrossMAEDecoder or MAEDecoder, got {type(decoder).__name__}"
            )
        if masking is not None and not callable(masking):
            raise TypeError(f"masking must be a MaskingFn or None, got {type(masking).__name__}")
        if static_token is not None and not isinstance(static_token, StaticToken):
            raise TypeError(
                f"static_token must be a StaticToken or None, got {type(static_token).__name__}"
            )
        weight = check_ratio("loss_weight", loss_weight)
        if weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {loss_weight!r}")
        steps = check_int("num_steps", num_steps, minimum=1)
        if never_padded is not None and not isinstance(never_padded, bool):
            raise TypeError(f"never_padded must be a bool or None, got {never_padded!r}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.decoder = decoder
        self.static_token = static_token
        self.masking: MaskingFn = masking if masking is not None else grouped_masking_fn(0.4)
        self.loss_weight = weight
        self.num_steps = steps
        if never_padded is None:
            never_padded = isinstance(tokenizer, RasterTokenizer) and not tokenizer.pad_empty_tokens
        self.never_padded = bool(never_padded)


def _decoder_positions(decoder: Union[CrossMAEDecoder, MAEDecoder]) -> Optional[int]:
    """Tokens a decoder has positions for (its table's rows); None without a table."""
    if isinstance(decoder, MAEDecoder):
        return decoder.num_tokens
    table = decoder.pos_embed if decoder.pos_embed is not None else decoder.pos_table
    return None if table is None else int(table.shape[-2])


def _check_batch(name: str, value: object, batch: int, against: str) -> Tensor:
    """A tensor ``[batch, ...]`` (metadata check)."""
    t = check_tensor(name, value)
    if t.ndim == 0 or t.shape[0] != batch:
        raise ValueError(
            f"{name} has batch size {t.shape[0] if t.ndim else None} (shape {tuple(t.shape)}) "
            f"but {against} has batch size {batch}"
        )
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
        splits: per-modality `MaskSplit`.
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
        fusion: optional `TransformerEncoder` over the concatenated encoded tokens (all
            modality encoders must share its width). None: the concatenation is used as is.
        use_weighted_fm: CrossMAE decoders receive ``[k, b, M, e]`` feature maps: the
            outputs of the fusion layers ``fm_layers`` (and, with ``use_input``, the fusion
            input). Decoders must then be built with ``num_feature_maps=k``.
        fm_layers: fusion layers to tap (``"all"``, ints, negatives allowed).
        use_input: include the fusion input (the concatenated modality encodings).

    Shapes:
        ``forward(inputs: {name: x_m}, *, tokenizer_kwargs={name: {...}}, static=None
        ([b, a] or [b, s, a]), site_padding_mask=None ([b, s]), missing={name: bool [b]},
        splits={name: MaskSplit}, generator=None) -> MultimodalOutput``.
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality],
        fusion: Optional[TransformerEncoder] = None,
        *,
        use_weighted_fm: bool = False,
        fm_layers: LayerSelection = "all",
        use_input: bool = False,
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
        if fusion is not None and not isinstance(fusion, TransformerEncoder):
            raise TypeError(
                f"fusion must be a TransformerEncoder or None, got {type(fusion).__name__}"
            )
        for flag, value in (("use_weighted_fm", use_weighted_fm), ("use_input", use_input)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        if use_weighted_fm and fusion is None:
            raise ValueError("use_weighted_fm=True needs a fusion encoder to tap")
        num_maps: Optional[int] = None
        if use_weighted_fm and fusion is not None:
            layers = resolve_layer_indices(fm_layers, fusion.depth, "fm_layers")
            num_maps = len(layers) + int(use_input)
        for name, mod in modalities.items():
            dec = mod.decoder
            if isinstance(dec, CrossMAEDecoder) and dec.num_feature_maps not in (None, num_maps):
                raise ValueError(
                    f"modalities[{name!r}].decoder mixes num_feature_maps="
                    f"{dec.num_feature_maps} feature maps but the fusion provides "
                    f"{num_maps} (use_weighted_fm={use_weighted_fm}, fm_layers={fm_layers!r}, "
                    f"use_input={use_input})"
                )
        self.modalities = nn.ModuleDict(dict(modalities))
        self.fusion = fusion
        self.use_weighted_fm = use_weighted_fm
        self.fm_layers = fm_layers
        self.use_input = use_input

    @property
    def names(self) -> list[str]:
        """Modality names in fused order."""
        return list(self.modalities.keys())

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
        self._check_names("padding_masks", padding_masks, require_all=True)
        self._check_names("missing", missing)
        splits: dict[str, MaskSplit] = {}
        for name, mod in self._items():
            split = mod.masking(padding_masks[name], mod.num_steps, generator, mod.never_padded)
            if missing is not None and name in missing:
                split = mask_missing_samples(split, missing[name])
            splits[name] = split
        return splits

    def full_reconstruction_split(self, split: MaskSplit, padding_mask: Tensor) -> MaskSplit:
        """Same visible tokens, but every hidden real token is predicted (inference)."""
        predict = ~split.visible_mask & ~padding_mask
        return mask_split_from_masks(split.visible_mask, predict, padding_mask=padding_mask)

    def _items(self) -> list[tuple[str, Modality]]:
        return [(name, mod) for name, mod in self.modalities.items() if isinstance(mod, Modality)]

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
        if site_padding_mask is not None and isinstance(mod.tokenizer, SeriesTokenizer):
            kwargs.setdefault("site_padding_mask", site_padding_mask)
        return kwargs

    def tokenize(
        self,
        inputs: Mapping[str, Tensor],
        tokenizer_kwargs: Optional[Mapping[str, Mapping[str, object]]] = None,
        site_padding_mask: Optional[Tensor] = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (tokens [b, n_m, e], padding_mask [b, n_m])}`` for every modality.

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
                out[name] = mod.tokenizer(x, **kwargs)
            except (ValueError, TypeError) as e:
                cls = TypeError if isinstance(e, TypeError) else ValueError
                raise cls(f"inputs[{name!r}]: {e}") from e
        return out

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        *,
        tokenizer_kwargs: Optional[Mapping[str, Mapping[str, object]]] = None,
        static: Optional[Tensor] = None,
        site_padding_mask: Optional[Tensor] = None,
        missing: Optional[Mapping[str, Tensor]] = None,
        splits: Optional[Mapping[str, MaskSplit]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> MultimodalOutput:
        b = self._check_inputs(inputs)
        self._check_names("tokenizer_kwargs", tokenizer_kwargs)
        self._check_names("missing", missing)
        self._check_names("splits", splits, require_all=splits is not None)
        if missing is not None:
            for name, flags in missing.items():
                f = _check_batch(f"missing[{name!r}]", flags, b, "inputs")
                if f.dtype != torch.bool or f.ndim != 1:
                    raise TypeError(
                        f"missing[{name!r}] must be a bool tensor [b] (True = modality absent), "
                        f"got dtype {f.dtype} shape {tuple(f.shape)}"
                    )
        needs_static = [n for n, mod in self._items() if mod.static_token is not None]
        if static is None and needs_static:
            raise ValueError(f"static is required: modalities {needs_static} have a static token")
        if static is not None:
            _check_batch("static", static, b, "inputs")
        if site_padding_mask is not None:
            spm = _check_batch("site_padding_mask", site_padding_mask, b, "inputs")
            if spm.dtype != torch.bool:
                raise TypeError(
                    f"site_padding_mask must have dtype torch.bool (True = padding site), "
                    f"got {spm.dtype}"
                )
        tokenized = self.tokenize(inputs, tokenizer_kwargs, site_padding_mask)
        for name, mod in self._items():
            n_m = tokenized[name][0].shape[1]
            rows = _decoder_positions(mod.decoder)
            if rows is not None and n_m != rows:
                raise ValueError(
                    f"inputs[{name!r}] of shape {tuple(inputs[name].shape)} gives {n_m} tokens "
                    f"but modality {name!r} is built for {rows} (its decoder's position table; "
                    f"num_steps={mod.num_steps})"
                )
            if splits is not None:
                check_mask_split(
                    f"splits[{name!r}]", splits[name], b, n_m, f"inputs[{name!r}] ({n_m} tokens)"
                )
        # A modality's visible set is known to be unpadded only when its split was drawn here
        # without padding and no sample of it was removed; user splits may be ragged.
        dense = {
            name: splits is None and mod.never_padded and (missing is None or name not in missing)
            for name, mod in self._items()
        }
        if splits is None:
            splits = self.make_splits(
                {k: v[1] for k, v in tokenized.items()}, missing=missing, generator=generator
            )
        elif missing is not None:
            splits = {
                k: mask_missing_samples(s, missing[k]) if k in missing else s
                for k, s in splits.items()
            }
        encoded: list[Tensor] = []
        encoded_pad: list[Tensor] = []
        widths: list[int] = []
        for name, mod in self._items():
            tokens, _ = tokenized[name]
            split = splits[name]
            visible, keep_pad = split.visible_tokens(tokens)
            cond = None
            static_tok = None
            if mod.static_token is not None and static is not None:
                kw = {"site_padding_mask": site_padding_mask} if mod.static_token.per_site else {}
                static_tok, _ = mod.static_token(static, **kw)
                if mod.encoder.cond_dim is not None:
                    cond = static_tok[:, 0]
            # MaskSplit slots put padding last; a never-padded modality has none at all, so its
            # encoder runs without a mask (flash attention on CUDA).
            enc = mod.encoder(
                visible,
                None if dense[name] else keep_pad,
                cond=cond,
                padding_is_trailing=True,
            ).tokens
            if static_tok is not None:
                enc = torch.cat([enc, static_tok.to(enc.dtype)], dim=1)
                keep_pad = torch.cat([keep_pad, keep_pad.new_zeros(keep_pad.shape[0], 1)], dim=1)
            encoded.append(enc)
            encoded_pad.append(keep_pad)
            widths.append(enc.shape[1])
        keys = torch.cat(encoded, dim=1)
        keys_pad = torch.cat(encoded_pad, dim=1)
        features: Optional[Tensor] = None
        if self.fusion is not None:
            fused = self.fusion(
                keys,
                keys_pad,
                return_layers=self.fm_layers if self.use_weighted_fm else None,
                include_input=self.use_input and self.use_weighted_fm,
            )
            keys, features = fused.tokens, fused.features

        # Keys are shared by every CrossMAE decoder: move their padding to the end of each row
        # once (CUDA packed attention), instead of once per decoder.
        dec_keys, dec_features, dec_pad = keys, features, keys_pad
        if _varlen.prefer_trailing_padding(keys):
            perm = _varlen.real_first_permutation(keys_pad)
            dec_keys = _varlen.take_tokens(keys, perm, 1)
            dec_pad = torch.gather(keys_pad, 1, perm)
            if features is not None:
                dec_features = _varlen.take_tokens(features, perm, 2)
        losses: dict[str, Tensor] = {}
        sample_losses: dict[str, Tensor] = {}
        preds: dict[str, Tensor] = {}
        targets: dict[str, Tensor] = {}
        valids: dict[str, Tensor] = {}
        total = keys.new_zeros(())
        offset = 0
        for (name, mod), width in zip(self._items(), widths):
            split = splits[name]
            dec = mod.decoder
            if isinstance(dec, CrossMAEDecoder):
                use_fm = dec_features is not None and dec.wfm is not None
                pred = dec(
                    dec_features if use_fm else dec_keys,
                    split.ids_predict,
                    context_padding_mask=dec_pad,
                    query_padding_mask=split.predict_padding_mask,
                    context_padding_is_trailing=dec_pad is not keys_pad,
                )
            else:
                k_m = split.ids_keep.shape[1]
                own = keys[:, offset : offset + k_m]
                pred = dec(
                    own,
                    split.ids_keep,
                    split.ids_predict,
                    context_padding_mask=split.keep_padding_mask,
                    query_padding_mask=split.predict_padding_mask,
                    padding_mask=tokenized[name][1],
                )
            offset += width
            kwargs = self._kwargs(name, tokenizer_kwargs, site_padding_mask)
            kwargs.pop("time_positions", None)
            tokenizer = cast(Any, mod.tokenizer)
            target_full, valid_full = tokenizer.targets(inputs[name], **kwargs)
            target = gather_tokens(target_full, split.ids_predict)
            valid = gather_tokens(valid_full, split.ids_predict)
            per_sample = masked_mse_loss(
                pred,
                target,
                padding_mask=split.predict_padding_mask,
                valid_mask=valid,
                reduction="none",
            )
            scored = (~split.predict_padding_mask[..., None] & valid).flatten(1).any(dim=1)
            loss = per_sample.sum() / scored.sum().clamp(min=1).to(per_sample.dtype)
            losses[name] = loss
            sample_losses[name] = per_sample
            preds[name], targets[name], valids[name] = pred, target, valid
            total = total + mod.loss_weight * loss
        return MultimodalOutput(total, losses, sample_losses, preds, targets, valids, dict(splits))
