"""Visible-only patch embedding vs 0.1.0's convolution over every patch (issue 9, item 1).

    python benchmarks/patch_embed.py             # GPU: ViT-B/16, B=256, 49 of 196 visible
    python benchmarks/patch_embed.py --cpu       # small CPU variant (a smoke run; its
                                                 # compiled bf16 rows mean nothing)

Times forward + backward of the encoder input (patch embedding of the visible patches +
position embedding) in bf16 autocast, eager and compiled: ``conv`` is 0.1.0's path
(``Conv2d`` over all 196 patches, then gather the 49 visible), ``selected`` is
`PatchEmbed.embed_selected` (gather the 49 patches, one linear projection). Before timing
it checks that both paths agree (float32, relative error < 1e-5) and exits 1 otherwise.
Legend: ``b`` batch, ``k`` visible patches, ``e`` width.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import crossmae as cm


def _time(fn, reps: int, cuda: bool) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="small CPU variant")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda" if cuda else "cpu")
    b, img, patch, e = (256, 224, 16, 768) if cuda else (8, 64, 16, 96)
    n = (img // patch) ** 2
    k = n // 4
    torch.manual_seed(0)
    pe = cm.PatchEmbed(e, patch, img).to(dev)
    imgs = torch.randn(b, 3, img, img, device=dev)
    split = cm.random_masking(b, n, 0.75, predict_ratio=0.25, device=dev)
    ids = split.ids_keep

    def conv() -> torch.Tensor:
        return torch.gather(pe(imgs), 1, ids[..., None].expand(-1, -1, e))

    def selected() -> torch.Tensor:
        return pe.embed_selected(imgs, ids)

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():  # the check in true fp32 (cuDNN convs default to TF32)
        err = float((conv() - selected()).abs().max() / conv().abs().max())
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(
        f"b={b}, {img}x{img}, patch {patch}, e={e}: {k} of {n} patches visible; "
        f"max rel err selected vs conv (fp32) {err:.1e}"
    )
    if not err < 1e-5:
        print("FAILED: the two paths disagree")
        return 1

    def step(path):  # type: ignore[no-untyped-def]
        def run() -> None:
            pe.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = path()
            out.float().square().mean().backward()

        return run

    rows = [("eager", "conv", step(conv)), ("eager", "selected", step(selected))]
    if not args.no_compile:
        rows += [
            ("compiled", "conv", step(torch.compile(conv))),
            ("compiled", "selected", step(torch.compile(selected))),
        ]
    reps = 20 if cuda else 5
    results = {}
    print("| mode | path | fwd+bwd ms |")
    print("| --- | --- | ---: |")
    for mode, name, fn in rows:
        results[(mode, name)] = _time(fn, reps, cuda)
        print(f"| {mode} | {name} | {results[(mode, name)]:.3f} |")
    for mode in ("eager", "compiled"):
        if (mode, "conv") in results:
            saved = results[(mode, "conv")] - results[(mode, "selected")]
            print(f"{mode}: selected saves {saved:.3f} ms per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
