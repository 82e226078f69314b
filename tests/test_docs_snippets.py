"""Every ```python block of README.md and docs/**/*.md runs without an exception.

Each block runs on its own, in a fresh namespace (``exec``), with the working directory set to
a temporary folder, so a block must do its own imports. Blocks are found automatically: a new
page under docs/ is tested as soon as it exists.

Conventions for writing docs:

* A block whose first line is ``# not-run`` (optionally followed by a reason:
  ``# not-run: needs a GPU``) is shown but not executed: fragments, code that needs several
  processes, a GPU or a download.
* Shell commands go in ```bash blocks, which are never executed; so do ``pycon`` sessions and
  any other language.
* Tracebacks point at the Markdown file and line (``docs/page.md`` line numbers).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import crossmae as cm

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = "# not-run"
_NOT_RUN = re.compile(r"^# not-run(?:$|[\s:])")
_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")


class Snippet(NamedTuple):
    path: Path
    line: int  # 1-based line of the first code line
    code: str

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def _language(info: str) -> str:
    """First word of a fence's info string: ``python``, ``{.python}``, ``python title="x"``."""
    word = info.strip().split(maxsplit=1)[0] if info.strip() else ""
    return word.strip("{}").lstrip(".").lower()


def python_blocks(path: Path) -> Iterator[Snippet]:
    """The ```python blocks of one Markdown file, dedented by their fence's indentation."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        start = i + 1
        end = start
        while end < len(lines) and close.match(lines[end]) is None:
            end += 1
        if _language(opening["info"]) == "python":
            body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start:end]]
            yield Snippet(path, start + 1, "\n".join(body) + "\n")
        i = end + 1


def markdown_files() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
    return [p for p in [ROOT / "README.md", *docs] if p.is_file()]


def runnable_snippets() -> list[Snippet]:
    return [
        s
        for path in markdown_files()
        for s in python_blocks(path)
        if _NOT_RUN.match(s.code.lstrip()) is None
    ]


SNIPPETS = runnable_snippets()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in a temporary folder and undo the global torch/crossmae state a snippet may set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    rng, dtype, fused = torch.get_rng_state(), torch.get_default_dtype(), cm.use_fused_attn()
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        torch.set_default_dtype(dtype)
        cm.set_fused_attn(fused)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.label for s in SNIPPETS])
@pytest.mark.usefixtures("isolated")
def test_snippet_runs(snippet: Snippet) -> None:
    # Pad with blank lines so that tracebacks report the line number in the Markdown file.
    source = "\n" * (snippet.line - 1) + snippet.code
    code = compile(source, str(snippet.path), "exec")
    try:
        exec(code, {"__name__": "__docs_snippet__"})
    except Exception as err:
        pytest.fail(
            f"{snippet.label}: {type(err).__name__}: {err}\n"
            f"Make the block self-contained (its own imports and inputs), or start it with "
            f"`{NOT_RUN}` if it is not meant to run.",
            pytrace=True,
        )


def test_snippets_are_collected() -> None:
    """Guard the extractor: the home page's quick start is found and runnable."""
    assert any(s.path == ROOT / "docs" / "index.md" for s in SNIPPETS)
    fences = python_blocks(ROOT / "docs" / "index.md")
    assert "import crossmae" in next(fences).code


def test_extractor_handles_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "```python\nx = 1\n```\n"
        "```bash\npip install crossmae\n```\n"
        '!!! note\n    ```python title="t"\n    y = 2\n\n    z = y\n    ```\n'
        "````python\n```\nnot a close\n````\n"
        "```python\n# not-run\nundefined_name\n```\n"
        "```python\n# not-run: a reason\nundefined_name\n```\n",
        encoding="utf-8",
    )
    blocks = list(python_blocks(page))
    assert [b.code for b in blocks] == [
        "x = 1\n",
        "y = 2\n\nz = y\n",
        "```\nnot a close\n",
        "# not-run\nundefined_name\n",
        "# not-run: a reason\nundefined_name\n",
    ]
    assert [b.line for b in blocks] == [3, 10, 15, 19, 23]
    assert [_NOT_RUN.match(b.code) is not None for b in blocks] == [False] * 3 + [True] * 2
    assert _NOT_RUN.match("# not-running = 1\n") is None
