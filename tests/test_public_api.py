"""Public API snapshot and the binding signatures from CONTRACT.md.

When a public name is added or removed on purpose, update
``tests/data/public_api.txt`` (one name per line, sorted) and CHANGELOG.md.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import crossmae

SNAPSHOT = Path(__file__).parent / "data" / "public_api.txt"
_ = inspect.Parameter.empty
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY

# name -> [(argument, kind, default)] in order, exactly as CONTRACT.md states them.
CONTRACT_SIGNATURES: dict[str, list[tuple[str, Any, Any]]] = {
    "Mlp": [
        ("in_features", POS, _),
        ("hidden_features", POS, None),
        ("out_features", POS, None),
        ("act_layer", POS, nn.GELU),
        ("drop", POS, 0.0),
        ("bias", POS, True),
    ],
    "DropPath": [("drop_prob", POS, 0.0)],
    "Attention": [
        ("dim", POS, _),
        ("num_heads", POS, 8),
        ("qkv_bias", KW, False),
        ("attn_drop", KW, 0.0),
        ("proj_drop", KW, 0.0),
    ],
    "CrossAttention": [
        ("dim", POS, _),
        ("context_dim", POS, None),
        ("num_heads", POS, 8),
        ("qkv_bias", KW, False),
        ("attn_drop", KW, 0.0),
        ("proj_drop", KW, 0.0),
    ],
    "Block": [
        ("dim", POS, _),
        ("num_heads", POS, _),
        ("mlp_ratio", POS, 4.0),
        ("qkv_bias", KW, False),
        ("drop", KW, 0.0),
        ("attn_drop", KW, 0.0),
        ("drop_path", KW, 0.0),
        ("act_layer", KW, nn.GELU),
        ("norm_layer", KW, nn.LayerNorm),
    ],
    "CrossAttentionBlock": [
        ("dim", POS, _),
        ("context_dim", POS, None),
        ("num_heads", POS, 8),
        ("mlp_ratio", POS, 4.0),
        ("self_attn", KW, False),
        ("qkv_bias", KW, False),
        ("drop", KW, 0.0),
        ("attn_drop", KW, 0.0),
        ("drop_path", KW, 0.0),
        ("act_layer", KW, nn.GELU),
        ("norm_layer", KW, nn.LayerNorm),
    ],
    "WeightedFeatureMaps": [("num_inputs", POS, _), ("num_outputs", POS, _)],
    "random_masking": [
        ("batch_size", POS, _),
        ("num_tokens", POS, _),
        ("mask_ratio", POS, _),
        ("predict_ratio", KW, None),
        ("padding_mask", KW, None),
        ("noise", KW, None),
        ("generator", KW, None),
        ("device", KW, None),
    ],
    "gather_tokens": [("x", POS, _), ("ids", POS, _)],
    "scatter_tokens": [
        ("values", POS, _),
        ("ids", POS, _),
        ("num_tokens", POS, _),
        ("padding_mask", KW, None),
        ("fill_value", KW, 0.0),
    ],
    "lengths_to_padding_mask": [("lengths", POS, _), ("max_len", POS, None)],
    "sincos_pos_embed_1d": [("dim", POS, _), ("positions", POS, _)],
    "sincos_pos_embed_2d": [("dim", POS, _), ("grid_size", POS, _)],
    "sincos_pos_embed_2d_from_coords": [("dim", POS, _), ("coords", POS, _)],
}

FORWARD_SIGNATURES: dict[str, list[str]] = {
    "Attention": ["x", "padding_mask"],
    "CrossAttention": ["x", "context", "context_padding_mask"],
    "Block": ["x", "padding_mask"],
    "CrossAttentionBlock": ["x", "context", "context_padding_mask", "query_padding_mask"],
    "WeightedFeatureMaps": ["features"],
}

CONTRACT_NAMES = sorted({*CONTRACT_SIGNATURES, "MaskSplit", "set_fused_attn"})

MASK_SPLIT_FIELDS = (
    "ids_keep",
    "keep_padding_mask",
    "ids_predict",
    "predict_padding_mask",
    "visible_mask",
    "predict_mask",
)


def test_all_matches_snapshot() -> None:
    expected = [line.strip() for line in SNAPSHOT.read_text().splitlines() if line.strip()]
    assert expected == sorted(expected), "keep tests/data/public_api.txt sorted"
    assert sorted(crossmae.__all__) == expected


def test_all_has_no_duplicates_and_no_private_names() -> None:
    assert len(set(crossmae.__all__)) == len(crossmae.__all__)
    assert all(not n.startswith("_") or n == "__version__" for n in crossmae.__all__)


@pytest.mark.parametrize("name", sorted(crossmae.__all__))
def test_every_exported_name_is_importable(name: str) -> None:
    module = importlib.import_module("crossmae")
    assert hasattr(module, name)
    ns: dict[str, Any] = {}
    exec(f"from crossmae import {name}", ns)  # the import statement itself
    assert ns[name] is getattr(crossmae, name)


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_contract_names_exported(name: str) -> None:
    assert name in crossmae.__all__


@pytest.mark.parametrize("name", sorted(CONTRACT_SIGNATURES))
def test_contract_signatures(name: str) -> None:
    params = list(inspect.signature(getattr(crossmae, name)).parameters.values())
    params = [p for p in params if p.name != "self"]
    expected = CONTRACT_SIGNATURES[name]
    got = [(p.name, p.kind, p.default) for p in params[: len(expected)]]
    assert got == expected
    # anything added beyond the contract must be keyword-only with a default
    for p in params[len(expected) :]:
        assert p.kind in (KW, inspect.Parameter.VAR_KEYWORD), p
        assert p.kind is inspect.Parameter.VAR_KEYWORD or p.default is not _, p


@pytest.mark.parametrize("name", sorted(FORWARD_SIGNATURES))
def test_forward_argument_names(name: str) -> None:
    params = list(inspect.signature(getattr(crossmae, name).forward).parameters)
    assert params[0] == "self"
    assert params[1 : 1 + len(FORWARD_SIGNATURES[name])] == FORWARD_SIGNATURES[name]


def test_no_argument_is_called_bare_mask() -> None:
    for name in crossmae.__all__:
        obj = getattr(crossmae, name)
        targets = [obj]
        if inspect.isclass(obj) and hasattr(obj, "forward"):
            targets.append(obj.forward)
        for t in targets:
            if not callable(t):
                continue
            try:
                sig = inspect.signature(t)
            except (TypeError, ValueError):
                continue
            assert "mask" not in sig.parameters, f"{name} has an argument called bare 'mask'"


def test_mask_split_fields() -> None:
    ms = crossmae.MaskSplit
    fields = getattr(ms, "_fields", None)
    if fields is None:
        import dataclasses

        fields = tuple(f.name for f in dataclasses.fields(ms))
    assert tuple(fields) == MASK_SPLIT_FIELDS


def test_version_string() -> None:
    assert isinstance(crossmae.__version__, str) and crossmae.__version__
