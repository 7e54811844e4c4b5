"""Benchmark of ``frozenseg.ops.ms_deform_attn`` (multi-scale deformable attention).

Shapes (8 heads, head dim 32, 4 points, inputs random: locations uniform in [0, 1],
attention weights softmaxed over levels * points):

    E1  DINO encoder      batch 2, levels 100x152, 50x76, 25x38, 13x19, queries = all pixels
    D1  DINO decoder      batch 2, 900 queries, same levels
    M1  mask-head encoder batch 2, levels 128x128, 64x64, 32x32, queries = all pixels

Cases: on CUDA ``kernel-fp32``, ``kernel-bf16`` and ``fallback-fp32`` (back end forced with
``FROZENSEG_OPS``), plus ``original-fp32`` with ``--original`` when the original Deformable
DETR extension (module ``MultiScaleDeformableAttention``) is importable. On CPU only
``fallback-fp32``, on the shapes with every level's H and W divided by 4 (rounded up; E1 and
M1 queries follow, D1 keeps 900) unless ``--full``.

Per case: median forward, backward (given the forward graph) and forward+backward time over
``--repeats`` runs after warm-up; peak memory of one forward+backward (CUDA: peak allocated
above what was allocated before it, inputs included in that base; CPU: the process peak RSS
so far, not a per-case figure); and effective gathered GB/s = bytes the forward gathers
(N*Q*M*L*P * 4 corners * D * element size) / forward time.

Run:
    python benchmarks/ms_deform_attn.py                       # all shapes, default cases
    python benchmarks/ms_deform_attn.py --shapes E1 --batch 8 --cases fallback-fp32
    python benchmarks/ms_deform_attn.py --original            # beside the original op (CUDA)
    python benchmarks/ms_deform_attn.py --full --repeats 1    # full shapes on CPU

The output is a markdown table, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import sys
from dataclasses import dataclass

import torch
from common import (
    MIB,
    add_run_arguments,
    device_line,
    elapsed,
    resolve_run_arguments,
    table,
)

from frozenseg.ops import ms_deform_attn

BACKEND_ENV = "FROZENSEG_OPS"  # read by ms_deform_attn at call time
HEADS, HEAD_DIM, POINTS, IM2COL_STEP = 8, 32, 4, 64
DINO_LEVELS = [(100, 152), (50, 76), (25, 38), (13, 19)]
SHAPES = {  # name: (levels, queries; None = all pixels)
    "E1": (DINO_LEVELS, None),
    "D1": (DINO_LEVELS, 900),
    "M1": ([(128, 128), (64, 64), (32, 32)], None),
}
CASES = {  # name: (FROZENSEG_OPS value, or None for the original op; value dtype)
    "kernel-fp32": ("cuda", torch.float32),
    "kernel-bf16": ("cuda", torch.bfloat16),
    "triton-fp32": ("triton", torch.float32),
    "fallback-fp32": ("fallback", torch.float32),
    "original-fp32": (None, torch.float32),
}


@dataclass
class Inputs:
    value: torch.Tensor  # (N, S, M, D) float32
    shapes: torch.Tensor  # (L, 2) int64
    starts: torch.Tensor  # (L,) int64
    loc: torch.Tensor  # (N, Q, M, L, P, 2)
    attn: torch.Tensor  # (N, Q, M, L, P)


def make_inputs(levels, queries, batch, device) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    sizes = [h * w for h, w in levels]
    q = queries or sum(sizes)
    loc = torch.rand(batch, q, HEADS, len(levels), POINTS, 2, generator=gen)
    attn = torch.randn(batch, q, HEADS, len(levels) * POINTS, generator=gen).softmax(-1)
    return Inputs(
        value=torch.randn(batch, sum(sizes), HEADS, HEAD_DIM, generator=gen).to(device),
        shapes=torch.tensor(levels, dtype=torch.long, device=device),
        starts=torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], device=device),
        loc=loc.to(device),
        attn=attn.view(*attn.shape[:-1], len(levels), POINTS).to(device),
    )


def ours(inp: Inputs, dtype):
    """forward() -> output with its graph; backward(out, grad) -> gradients of the inputs."""
    leaves = [t.to(d, copy=True).requires_grad_()
              for t, d in ((inp.value, dtype), (inp.loc, None), (inp.attn, None))]

    def forward():
        return ms_deform_attn(leaves[0], inp.shapes, inp.starts, *leaves[1:])

    return forward, lambda out, grad: torch.autograd.grad(out, leaves, grad)


def original(inp: Inputs, dtype):
    """The original extension's forward and backward, called directly."""
    import MultiScaleDeformableAttention as ext

    args = (inp.value.to(dtype), inp.shapes, inp.starts, inp.loc, inp.attn)

    def forward():
        return ext.ms_deform_attn_forward(*args, IM2COL_STEP)

    return forward, lambda out, grad: ext.ms_deform_attn_backward(*args, grad, IM2COL_STEP)




def _timed(fn, arg, device) -> float:
    return elapsed(lambda: fn(arg), device)


def median_time(fn, device, repeats, setup=lambda: None) -> float:
    """Median over repeats of fn(setup()), timing fn only."""
    return statistics.median(_timed(fn, setup(), device) for _ in range(repeats))


def peak_mib(run, device) -> float:
    """Peak memory of run(): CUDA allocation above the base, or the process peak RSS so far."""
    if device.type != "cuda":
        run()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def run_case(case, inp: Inputs, args, device) -> dict:
    backend, dtype = CASES[case]
    if backend is not None:
        os.environ[BACKEND_ENV] = backend
    forward, backward = (ours if backend else original)(inp, dtype)
    grad = torch.randn_like(forward())

    def both(_=None):
        backward(forward(), grad)

    for _ in range(args.warmup):
        both()
    n, q, m, lv, p, _ = inp.loc.shape
    gathered = n * q * m * lv * p * 4 * HEAD_DIM * dtype.itemsize
    fwd = median_time(lambda _: forward(), device, args.repeats)
    return {
        "fwd": fwd,
        "bwd": median_time(lambda out: backward(out, grad), device, args.repeats, forward),
        "both": median_time(both, device, args.repeats),
        "mem": peak_mib(both, device),
        "gbps": gathered / fwd / 1e9,
    }


def scaled(levels, factor):
    """Each level's H and W divided by factor, rounded up."""
    return [(math.ceil(h / factor), math.ceil(w / factor)) for h, w in levels]


def default_cases(device, want_original):
    if device.type != "cuda":
        return ["fallback-fp32"]
    cases = ["kernel-fp32", "kernel-bf16", "fallback-fp32"]
    if want_original:
        try:
            import MultiScaleDeformableAttention  # noqa: F401
        except ImportError as err:
            print(f"--original: not importable ({err}); skipped", file=sys.stderr)
        else:
            cases.append("original-fp32")
    return cases








def result_row(shape, case, levels, n, q, res):
    lv = "/".join(f"{h}x{w}" for h, w in levels)
    head = [shape, case, lv, n, q]
    if "error" in res:
        return head + [res["error"]] + [""] * 4
    times = [f"{res[k] * 1e3:.2f}" for k in ("fwd", "bwd", "both")]
    return head + times + [f"{res['mem']:.0f}", f"{res['gbps']:.1f}"]


def ratio_rows(results):
    """original-fp32 time / ours (>1: ours is faster), forward and forward+backward."""
    rows = []
    for (shape, case), res in results.items():
        orig = results.get((shape, "original-fp32"), {})
        if case.startswith(("kernel", "triton")) and "fwd" in res and "fwd" in orig:
            rows.append([shape, f"original-fp32 / {case}",
                         f"{orig['fwd'] / res['fwd']:.2f}x", f"{orig['both'] / res['both']:.2f}x"])
    return rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="E1,D1,M1", help="comma-separated, from " + ",".join(SHAPES))
    p.add_argument("--cases", help="comma-separated, from " + ",".join(CASES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--full", action="store_true", help="full shapes on CPU too")
    p.add_argument("--original", action="store_true", help="add the original op (CUDA)")
    add_run_arguments(p)
    return p.parse_args()


def main():
    args = parse_args()
    device = resolve_run_arguments(args)
    on_gpu = device.type == "cuda"
    cases = args.cases.split(",") if args.cases else default_cases(device, args.original)
    factor = 1 if on_gpu or args.full else 4
    results, rows = {}, []
    for shape in args.shapes.split(","):
        levels, queries = SHAPES[shape]
        levels = scaled(levels, factor)
        inp = make_inputs(levels, queries, args.batch, device)
        for case in cases:
            print(f"running {shape} {case} ...", file=sys.stderr, flush=True)
            try:
                res = run_case(case, inp, args, device)
            except (RuntimeError, ValueError, ImportError) as err:
                res = {"error": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"}
            results[shape, case] = res
            rows.append(result_row(shape, case, levels, args.batch, inp.loc.shape[1], res))
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    memory_note = (
        "peak MiB = max_memory_allocated of one fwd+bwd minus memory allocated before it"
        if on_gpu else "peak MiB = process peak RSS so far (ru_maxrss), not per case"
    )
    print(device_line(device, args, memory_note) + "\n")
    print(table(["shape", "case", "levels", "N", "Q", "fwd ms", "bwd ms", "fwd+bwd ms",
                 "peak MiB", "GB/s"], rows))
    if ratios := ratio_rows(results):
        print("\nspeed-up (original-fp32 time / ours; >1 means ours is faster)\n")
        print(table(["shape", "ratio", "fwd", "fwd+bwd"], ratios))


if __name__ == "__main__":
    main()
