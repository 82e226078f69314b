"""Every public module's ``forward`` documents itself: ``help(cm.X)`` shows shapes and the
polarity of every mask it takes, not nn.Module's generic text."""

from __future__ import annotations

import inspect
import pydoc
import re

import pytest
from torch import nn

import crossmae as cm

MODULES = sorted(
    name
    for name in cm.__all__
    if inspect.isclass(getattr(cm, name))
    and issubclass(getattr(cm, name), nn.Module)
    and not inspect.isabstract(getattr(cm, name))
)

_ENTRY = re.compile(r"^ {4}(\*{0,2}\w+)(?: \([^)]*\))?:(.*)$")


def _forward_owner(cls: type) -> type:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass
    raise AssertionError(f"{cls} has no forward")


def _args_entries(doc: str) -> dict[str, str]:
    """The Google-style ``Args:`` section as {name: entry text}."""
    entries: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = lines.index("Args:")
    except ValueError:
        return entries
    current = None
    for line in lines[start + 1 :]:
        if line and not line.startswith(" "):
            break
        m = _ENTRY.match(line)
        if m:
            current = m.group(1).lstrip("*")
            entries[current] = m.group(2)
        elif current is not None:
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("name", MODULES)
def test_forward_has_its_own_docstring_with_shapes_and_mask_polarity(name: str) -> None:
    cls = getattr(cm, name)
    owner = _forward_owner(cls)
    assert owner.__module__.startswith("crossmae"), f"{name}.forward is {owner.__module__}'s"
    # The docstring written on the class that defines forward, never an inherited one.
    own = vars(owner)["forward"].__doc__
    assert own is not None, f"{name}.forward has no docstring of its own"
    doc = inspect.cleandoc(own)
    assert len(doc) > 40, f"{name}.forward's docstring is a stub: {doc!r}"
    assert re.search(r"\[[a-zA-Z0-9_, +*.]+\]", doc), f"{name}.forward states no shapes: {doc!r}"
    assert "Returns:" in doc or "Raises:" in doc, f"{name}.forward has no Returns:/Raises: section"
    params = [p for p in inspect.signature(owner.forward).parameters if p != "self"]
    entries = _args_entries(doc)
    if params:
        assert entries, f"{name}.forward has no Google-style Args: section"
    for p in params:
        assert p in entries, f"{name}.forward's Args: section does not document {p!r}"
        text = entries[p]
        if p.endswith("padding_mask"):
            assert "True = padding" in text, f"{name}.forward: {p} does not state True = padding"
        if p.endswith("padding_is_trailing"):
            for word in ("deprecated", "ignored", "FutureWarning"):
                assert word in text, f"{name}.forward: {p} does not say {word!r}"
    rendered = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert "Define the computation performed at every call" not in rendered, name
