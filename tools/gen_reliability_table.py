"""Render ``docs/reliability.md`` from the outcomes recorded by ``tests/reliability``.

Every reliability check appends one JSON line ``{callable, tried, outcome, ok, test}`` to
the file named by the environment variable ``CROSSMAE_RELIABILITY_OUT`` (see
``tests/reliability/reliability_helpers.py``). This script runs that suite (``--run``) or
reads such a file (``--input``), and writes a plain-markdown page: a summary, the open
failures, and one table row per (public name, input tried, test).

Usage::

    .venv/bin/python tools/gen_reliability_table.py --run            # run the suite, write the page
    .venv/bin/python tools/gen_reliability_table.py --input rows.jsonl
    .venv/bin/python tools/gen_reliability_table.py --run --check    # fail if the page is stale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "reliability.md"
ENV = "CROSSMAE_RELIABILITY_OUT"
# Submodules whose public names are audited too (as ``<module>.<name>``): they are not
# re-exported from ``crossmae`` but are part of the public API.
SUBMODULES = ("distributed",)

HEADER = """\
# Reliability

How every public callable of `crossmae` behaves under bad and extreme input. This page is
generated from the reliability test suite (`tests/reliability`); do not edit it by hand.

## The standard

Bad input gets a `ValueError` or `TypeError` that names the argument and shows the value,
raised before any work; nothing is silently truncated, broadcast or reinterpreted; or the
input gets a documented, correct result. No `IndexError`, `RuntimeError` or
`AssertionError` from deep inside torch.

What the suite tries, for every public function and module `forward`: wrong rank, wrong
dtype (float masks, integer tokens, float64 tokens into a float32 module), mismatched batch
or length between tokens and masks, negative or too-large sizes, ratios outside their
range, an empty batch (`b = 0`), zero tokens (`n = 0`), NaN/inf in real and in padded
inputs, non-contiguous and channels-last inputs (same result as contiguous), constructor
arguments; plus a hypothesis fuzz of the main entry points, a dtype matrix, determinism,
checkpoint round trips and gradients for every masking strategy.

## Documented behaviour

- **Index and length values** (`ids_*` past the sequence, negative ids, lengths outside
  `[0, max_len]`) are range-checked where that is free (CPU tensors: a `ValueError`, or
  the CPU kernel's error where a case says so); on CUDA a device-side assert fires
  instead of a host sync. An out-of-range value is never silently dropped, clamped or
  wrapped.
- **Self-contradictory splits** (a real id repeated in `ids_keep` or `ids_predict`, an id
  outside `[0, N)`, `visible_mask` / `predict_mask` not equal to the real ids, a token
  both visible and predicted) are refused with a `ValueError` naming the field by
  `MaskSplit.validate()` on any device, and by every entry point that accepts a split
  (`ImageCrossMAE.forward` and its parts, `MultimodalMAE(splits=)`, `mask_missing_samples`,
  `modality_dropout`) when the split is on the CPU. On CUDA those entry points check only
  shapes and dtypes (no host sync in forward): validate in data preparation. Splits the
  library draws are valid by construction and not re-checked.
- **Repeated real ids in `scatter_tokens`** (and `MAEDecoder`'s `ids_keep`) are refused on
  CPU tensors; where that cannot be checked (CUDA, `torch.compile`) the repeated values
  are summed at their position and each gets that position's gradient: value and
  gradient always agree.
- **Pixels outside the visible patches are never read** by `ImageCrossMAE`'s encoder
  (visible-only patch embedding): NaN/inf there leaves loss, predictions and gradients
  bit-identical. A NaN/inf pixel inside a **predicted** patch is a missing target value:
  not scored, not in that patch's `norm_pix_loss` statistics (NaN and inf score alike).
- **Flags and generators are typed**: a non-`bool` flag (`"False"`, `"no"`, `1`) or a
  `generator` that is not a `torch.Generator` is a `TypeError` naming it, raised first.
  Tokenizers check `time_positions` before any work.
- **NaN/inf in real data propagates** to the outputs of that sample only (never to other
  samples, never hidden). NaN/inf in **padded** slots, in tokens that are not selected, or
  at invalid target values never reaches an output, a loss or a gradient.
- **Tokenizers** (`RasterTokenizer`, `SeriesTokenizer`, `StaticToken`, and the models built
  on them) read NaN/inf as a *missing value*: it is zeroed and flagged, so NaN and inf give
  identical, finite tokens.
- **NaN in masking noise** sorts last (as `torch.sort` does): the counts stay exact.
- **Empty batches and empty token sets** return correctly shaped empty results (losses
  return 0 with zero gradients). Without a `padding_mask` the masking functions size their
  outputs from the ratios alone, so an empty batch still has `k = int(n * (1 - r))` columns.
- **Device mismatch** between arguments (e.g. tokens on CUDA, a mask on the CPU) can only
  happen on a GPU machine and is not exercised by this CPU suite.
- **dtypes**: every component runs in float32, float64, bf16 and fp16 autocast on the CPU
  (fp16 CPU autocast is supported by the installed torch), and as a `.bfloat16()` /
  `.half()` module fed float32 side inputs. Outputs are finite and within a relative L2
  error of the float64 result of 1e-5 (float32), 1e-10 (float64), 1e-2 (fp16) and 5e-2
  (bf16).

## Regenerate

```bash
.venv/bin/python tools/gen_reliability_table.py --run
```

runs `pytest tests/reliability` with `CROSSMAE_RELIABILITY_OUT` set and rewrites this page
(`--check` fails instead when the page is out of date).
"""


def run_suite(out_file: Path, pytest_args: list[str]) -> int:
    env = dict(os.environ, **{ENV: str(out_file)})
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/reliability",
        "-q",
        "-p",
        "no:cacheprovider",
        *pytest_args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def load_rows(path: Path) -> list[dict[str, object]]:
    """Records, de-duplicated on (callable, tried, test): the last one wins."""
    rows: dict[tuple[str, str, str], dict[str, object]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(str(r["callable"]), str(r["tried"]), str(r["test"]))] = r
    return list(rows.values())


def _cell(text: object) -> str:
    """Plain table-cell text: no pipes or newlines; ``*`` and ``<`` escaped outside code."""
    parts = str(text).replace("|", "/").replace("\n", " ").strip().split("`")
    for i in range(0, len(parts), 2):  # even parts are outside `code` spans
        parts[i] = parts[i].replace("*", "\\*").replace("<", "&lt;")
    return "`".join(parts)


def _code(text: object) -> str:
    return "`" + str(text).replace("|", "/").replace("\n", " ").replace("`", "'").strip() + "`"


def _public_objects() -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    import importlib

    import crossmae

    objs: dict[str, object] = {n: getattr(crossmae, n) for n in crossmae.__all__}
    for sub in SUBMODULES:
        mod = importlib.import_module(f"crossmae.{sub}")
        objs.update({f"{sub}.{n}": getattr(mod, n) for n in mod.__all__})
    return objs


def _takes_no_input(obj: object) -> str:
    """Why a public name has no row: ``"data"`` (a constant), ``"protocol"`` (a
    ``typing.Protocol``: a type to satisfy, checked where a part is received), or ``""``."""
    if not callable(obj):
        return "data"
    if isinstance(obj, type) and getattr(obj, "_is_protocol", False):
        return "protocol"
    return ""


def _public_names() -> list[str]:
    return sorted(_public_objects())


def render(rows: list[dict[str, object]]) -> str:
    rows = sorted(rows, key=lambda r: (str(r["callable"]).lower(), str(r["test"]), str(r["tried"])))
    failures = [r for r in rows if not r["ok"]]
    objs = _public_objects()
    names = sorted(objs)
    kinds = {n: _takes_no_input(objs[n]) for n in names}
    covered = {str(r["callable"]) for r in rows}
    missing = [n for n in names if n not in covered and not kinds[n]]
    fail_names = sorted({str(r["callable"]) for r in failures}, key=str.lower)

    out = [HEADER, "## Summary", ""]
    public = [n for n in names if not kinds[n]]
    subs = " and ".join(f"`crossmae.{m}.__all__`" for m in SUBMODULES)
    out.append(
        f"{len(rows)} checks, covering {len([n for n in public if n in covered])} of the "
        f"{len(public)} public callables in `crossmae.__all__` and {subs}; "
        f"**{len(failures)} checks fail the standard**"
        + (
            f" (in {len(fail_names)} names: {', '.join(_code(n) for n in fail_names)})."
            if failures
            else "."
        )
    )
    out.append("")
    data = [n for n in names if kinds[n] == "data"]
    protocols = [n for n in names if kinds[n] == "protocol"]
    out.append(
        "Not in the table, having no input to check: the constants "
        + ", ".join(_code(n) for n in data)
        + " (the functions that take such a value check it, e.g. "
        "`set_padded_attention_kernel` against `PADDED_ATTENTION_KERNELS`), and the "
        "protocols "
        + ", ".join(_code(n) for n in protocols)
        + " (types a part satisfies; `Modality` refuses a tokenizer, encoder or decoder that does "
        "not with a `TypeError` naming it, in the rows of that name)."
    )
    out.append("")
    if missing:
        out.append(
            "Public callables without a check: " + ", ".join(_code(n) for n in missing) + "."
        )
        out.append("")
    if failures:
        out += [
            "## Open failures",
            "",
            "| Public name | Input tried | Outcome | Test that checks it |",
            "| --- | --- | --- | --- |",
        ]
        for r in failures:
            out.append(
                f"| {_code(r['callable'])} | {_cell(r['tried'])} | {_cell(r['outcome'])} | {_code(r['test'])} |"
            )
        out.append("")
    out += [
        "## All checks",
        "",
        "| Public name | Input tried | Outcome | Test that checks it |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        outcome = _cell(r["outcome"])
        if not r["ok"] and outcome.startswith("FAIL: "):
            outcome = "**FAIL**: " + outcome[len("FAIL: ") :]
        out.append(
            f"| {_code(r['callable'])} | {_cell(r['tried'])} | {outcome} | {_code(r['test'])} |"
        )
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="store_true", help="run tests/reliability first")
    parser.add_argument("--input", type=Path, help="a JSON-lines file of recorded outcomes")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="fail if --output differs instead of writing it"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.run == (args.input is not None):
        parser.error("pass exactly one of --run and --input")
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            records = Path(tmp) / "reliability.jsonl"
            records.touch()
            code = run_suite(records, args.pytest_args)
            if code not in (0, 1):  # 1 = some tests failed: their failures are the table's point
                print(f"pytest exited with {code}; not writing the page", file=sys.stderr)
                return code
            rows = load_rows(records)
    else:
        rows = load_rows(args.input)
    if not rows:
        print("no records found", file=sys.stderr)
        return 2
    text = render(rows)
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; regenerate it with --run", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(rows)} rows, {sum(1 for r in rows if not r['ok'])} failing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
