"""Print the torch.compile graph breaks of crossmae's forwards on this machine's device.

    python benchmarks/graph_breaks.py                 # every workload, on CUDA if present
    python benchmarks/graph_breaks.py decoder image --out $OUT/breaks.md

For each workload (``decoder``: CrossMAE decoder, ``encoder``: padded encoder, ``image``:
the image model from a generator, ``water``: the water model given its splits), under
bf16 autocast, `torch._dynamo.explain` reports how many graphs the forward compiles to and
why every break happened (with the innermost user frames). A forward meant to compile with
``fullgraph=True`` shows 1 graph and 0 breaks. Exits 1 when any workload breaks.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_step  # the workloads, shared with the step profiles

WORKLOADS = ("decoder", "encoder", "image", "water")


def build(
    what: str, dev: torch.device, small: bool
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """``(fn, args, kwargs)`` of one forward of workload ``what``: profile_step.py's
    workloads, except that the image model draws its masks from a ``generator=`` (the break
    this script should show) and the water model is given its splits (drawn eagerly, as in a
    compiled training step)."""
    if what not in WORKLOADS:
        raise ValueError(f"unknown workload {what!r}; choose from {WORKLOADS}")
    if what == "encoder":
        import crossmae as cm
        from crossmae.encoders import TransformerEncoder

        b, n, d = (8, 2048, 256) if not small else (2, 32, 32)
        enc = TransformerEncoder(d, 2, 8 if not small else 2).to(dev)
        lengths = torch.randint(n // 4, n + 1, (b,), device=dev)
        pad = cm.lengths_to_padding_mask(lengths, n)
        return enc, (torch.randn(b, n, d, device=dev), pad), {}
    model, args, kwargs = profile_step.workload(what, dev, small)
    if what == "image":
        kwargs = {"generator": torch.Generator(device=dev).manual_seed(0)}
    elif what == "water":
        kwargs["splits"] = model.draw_splits(args[0], generator=kwargs.pop("generator"))  # type: ignore[operator]
    return model, args, kwargs


def explain(what: str, dev: torch.device, small: bool) -> tuple[str, int]:
    """Markdown lines for one workload and its break count (-1: explain itself failed)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    fn, args, kwargs = build(what, dev, small)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    try:
        with amp:
            e = torch._dynamo.explain(fn)(*args, **kwargs)
    except Exception:
        return f"### {what}\n\nexplain failed:\n\n```\n{traceback.format_exc(limit=8)}```\n", -1
    lines = [
        f"### {what} ({dev.type})",
        "",
        f"graphs {e.graph_count}, breaks {e.graph_break_count}",
        "",
    ]
    for i, br in enumerate(e.break_reasons):
        lines.append(f"{i + 1}. {str(br.reason)[:600]}")
        for fr in list(br.user_stack)[-4:]:
            lines.append(
                f"    - {fr.filename.split('crossmae/')[-1]}:{fr.lineno} in {fr.name}: `{(fr.line or '').strip()}`"
            )
    lines.append("")
    return "\n".join(lines), e.graph_break_count


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "what", nargs="*", help="workloads: " + ", ".join(WORKLOADS) + " (default: all)"
    )
    ap.add_argument("--cpu", action="store_true", help="tiny workloads on the CPU (tests)")
    ap.add_argument("--out", default="", help="also write breaks.md here")
    args = ap.parse_args(argv)
    bad = [w for w in args.what if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {WORKLOADS}")
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    parts, worst = [f"# Graph breaks, torch {torch.__version__}, {dev.type}\n"], 0
    for what in args.what or WORKLOADS:
        md, n = explain(what, dev, small=dev.type == "cpu")
        print(md, flush=True)
        parts.append(md)
        worst = max(worst, 1 if n != 0 else 0)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "breaks.md"), "w") as f:
            f.write("\n".join(parts))
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
