"""What a composite needs from its parts: runtime-checkable protocols for encoders, decoders and
tokenizers.

Legend: ``b`` batch, ``n`` tokens of the full sequence, ``k`` kept (visible) slots, ``m``
context (key) tokens, ``p`` predicted slots (queries), ``f`` feature maps, ``e`` encoder
width, ``o`` values predicted per token.
Mask polarity: every ``*_padding_mask`` True = padding slot (not a real token; ignored as a
key; its output is don't-care but finite).

The composites (`crossmae.ImageCrossMAE`, `crossmae.Modality`, `crossmae.MultimodalMAE`
and the builders) check their parts with ``isinstance(part, Protocol)`` only: any module
with the attributes and the ``forward`` below fits, crossmae's own classes included, and a
part may be replaced after construction (``model.encoder = mine``; the replacement is checked
the same way). A composite passes a part only the arguments its protocol names, plus
``cond=`` to an encoder whose ``cond_dim`` attribute exists and is not None.

``runtime_checkable`` protocols check that the attributes exist, not their signatures;
the composites check widths (``dim``, ``context_dim``) where they are stated.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from torch import Tensor

from .encoders.transformer import EncoderOutput, LayerSelection

__all__ = ["Encoder", "QueryDecoder", "SequenceDecoder", "Tokenizer"]


@runtime_checkable
class Encoder(Protocol):
    """A token encoder over a padded token set (`crossmae.TransformerEncoder` is one).

    Attributes:
        dim: token width ``e`` (input and output).
        depth: number of layers that ``return_layers`` indexes (``0 .. depth - 1``,
            negatives from the end).

    ``forward(tokens [b, n, e], padding_mask [b, n] | None = None, *, return_layers=None,
    include_input=False) -> EncoderOutput``: ``padding_mask`` True = padding slot (never a
    key; its output is finite and meaningless). ``return_layers`` (``"all"``, an int or
    ints, or None) selects the layers whose outputs are stacked into
    ``EncoderOutput.features [f, b, n, e]`` (the input first when ``include_input``).

    Optional: an int ``cond_dim`` attribute (not None) means ``forward`` also takes
    ``cond=[b, cond_dim]`` (e.g. FiLM on static attributes); composites pass ``cond`` only
    then.
    """

    dim: int
    depth: int

    def forward(
        self,
        tokens: Tensor,
        padding_mask: Optional[Tensor] = None,
        *,
        return_layers: LayerSelection = None,
        include_input: bool = False,
    ) -> EncoderOutput: ...


@runtime_checkable
class QueryDecoder(Protocol):
    """A CrossMAE-style decoder: predicts the tokens at ``ids_predict`` from context keys
    (`crossmae.CrossMAEDecoder` is one).

    Attributes:
        context_dim: key width ``e`` it attends to.
        num_feature_maps: None when ``context`` is one key set ``[b, m, e]``; ``f`` when it
            is ``f`` stacked encoder feature maps ``[f, b, m, e]`` (weighted feature maps).

    ``forward(context, ids_predict [b, p], *, context_padding_mask [b, m] | None = None,
    query_padding_mask [b, p] | None = None) -> [b, p, o]``. ``ids_predict`` indexes the
    modality's full token sequence (its query positions); padded query slots give finite,
    meaningless outputs.

    Optional, read when present (``getattr``): ``out_dim`` (``o``, checked against the
    target width) and ``num_positions`` (the number of token positions it has queries for;
    None = any).
    """

    context_dim: int
    num_feature_maps: Optional[int]

    def forward(
        self,
        context: Tensor,
        ids_predict: Tensor,
        *,
        context_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
    ) -> Tensor: ...


@runtime_checkable
class SequenceDecoder(Protocol):
    """An MAE-style decoder: places the encoded visible tokens at ``ids_keep`` in a full
    sequence of ``num_tokens`` (mask tokens elsewhere), self-attends, and returns the
    predictions at ``ids_predict`` (`crossmae.MAEDecoder` is one).

    Attributes:
        context_dim: width ``e`` of the encoded tokens.
        num_tokens: length ``n`` of the full sequence.

    ``forward(context [b, k, e], ids_keep [b, k], ids_predict [b, p], *,
    context_padding_mask [b, k] | None = None, query_padding_mask [b, p] | None = None,
    padding_mask [b, n] | None = None) -> [b, p, o]``; ``padding_mask`` flags padding
    tokens of the full sequence (True = padding).

    A decoder that satisfies `QueryDecoder` is used as one; `SequenceDecoder` is checked
    second.
    """

    context_dim: int
    num_tokens: int

    def forward(
        self,
        context: Tensor,
        ids_keep: Tensor,
        ids_predict: Tensor,
        *,
        context_padding_mask: Optional[Tensor] = None,
        query_padding_mask: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor: ...


@runtime_checkable
class Tokenizer(Protocol):
    """Turns one modality's input into tokens and reconstruction targets
    (`crossmae.RasterTokenizer` and `crossmae.SeriesTokenizer` are two).

    ``forward(x, **kwargs) -> (tokens [b, n, e], padding_mask [b, n])``: True = padding
    token (no observed value, an invalid site or patch). Padding always wins over any
    split: such a token is never visible and never predicted.

    ``targets(x, **kwargs) -> (target [b, n, o], target_valid [b, n, o])``: True = a value
    that is scored.

    ``layout_to_tokens(values [b, *layout]) -> [b, n, ...]``: maps a tensor in the
    modality's *input layout* (e.g. a bool hidden mask) to the token order of ``forward``
    (this is how ``MultimodalMAE.forward(hidden_masks=...)`` reads user masks). Needed only
    when masks are given in the input layout.

    Optional: ``num_tokens(num_steps) -> int`` (tokens for ``num_steps`` time steps; lets a
    model run fewer steps than it was built for); a ``num_sites`` attribute (then
    `MultimodalMAE` passes its ``site_padding_mask=`` on); ``pad_empty_tokens`` (False, with
    ``valid_patch_index``: the tokenizer never flags padding, so masking needs no sync).
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def targets(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


def cond_dim_of(encoder: object) -> Optional[int]:
    """The encoder's conditioning width: its ``cond_dim`` attribute when it exists and is not
    None, else None (then composites never pass ``cond=``)."""
    value = getattr(encoder, "cond_dim", None)
    return None if value is None else int(value)
