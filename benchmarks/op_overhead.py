"""Per-call overhead of ``frozenseg.ops.ms_deform_attn`` on a tiny input, where the Python
around the kernel (checks, dispatch, autograd) is most of the time.

One CPU thread; batch 1, levels 8x8 and 4x4, 10 queries, 2 heads of dim 8, 2 points. Median
microseconds per call over ``--calls`` calls, repeated ``--repeats`` times (the median of
those medians), for the forward under no_grad and forward + backward. Level shapes as the
(L, 2) tensor (Deformable DETR's call) and, where the installed frozenseg takes them, as
int pairs. Point PYTHONPATH at two checkouts to compare them:

    PYTHONPATH=. python benchmarks/op_overhead.py --backend cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def inputs(grad: bool):
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[8, 8], [4, 4]])
    starts = torch.tensor([0, 64])
    value = torch.randn(1, 80, 2, 8, generator=g)
    loc = torch.rand(1, 10, 2, 2, 2, 2, generator=g)
    attn = torch.rand(1, 10, 2, 2, 2, generator=g)
    for t in (value, loc, attn):
        t.requires_grad_(grad)
    return value, shapes, starts, loc, attn


def per_call(fn, calls: int, repeats: int) -> float:
    for _ in range(20):
        fn()
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return statistics.median(medians) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", choices=("cpu", "fallback"))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["FROZENSEG_OPS"] = args.backend
    torch.set_num_threads(1)
    from frozenseg.ops import ms_deform_attn

    value, shapes, starts, loc, attn = inputs(grad=True)
    forms = {"tensor shapes": (shapes, starts)}
    try:
        ms_deform_attn(value, shapes.tolist(), None, loc, attn)
        forms["int pairs"] = (shapes.tolist(), None)
    except (ValueError, TypeError):  # a frozenseg that takes tensors only
        pass
    for form, (s, i) in forms.items():
        with torch.no_grad():
            forward = per_call(lambda s=s, i=i: ms_deform_attn(value, s, i, loc, attn),
                               args.calls, args.repeats)
        both = per_call(lambda s=s, i=i: ms_deform_attn(value, s, i, loc, attn).sum().backward(),
                        args.calls, args.repeats)
        print(f"| {args.backend} | {form} | {forward:.0f} | {both:.0f} |")


if __name__ == "__main__":
    main()
