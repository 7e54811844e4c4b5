"""Benchmark of ``frozenseg.ops.ms_deform_attn`` (multi-scale deformable attention).

Shapes (8 heads, head dim 32, 4 points, inputs random: locations uniform in [0, 1],
attention weights softmaxed over levels * points):

    E1  DINO encoder      batch 2, levels 100x152, 50x76, 25x38, 13x19, queries = all pixels
    D1  DINO decoder      batch 2, 900 queries, same levels
    M1  mask-head encoder batch 2, levels 128x128, 64x64, 32x32, queries = all pixels

Cases: ``kernel-*`` the CUDA kernel, ``cpu-*`` the CPU kernel, ``fallback-fp32`` the
grid_sample fallback (back end forced with ``FROZENSEG_OPS``); ``peer-fp32`` the pure-PyTorch
op that Deformable DETR (``ms_deform_attn_core_pytorch``), transformers and mmcv each ship
(see :func:`grid_sample_peer`); ``original-fp32`` with ``--original`` when the original
Deformable DETR extension (module ``MultiScaleDeformableAttention``) is importable. On CUDA
the kernel, fallback and original cases; on the CPU the CPU kernel, fallback and peer cases,
on the shapes with every level's H and W divided by 4 (rounded up; E1 and M1 queries follow,
D1 keeps 900) unless ``--full``, at each of ``--threads``.

The cases of a shape run alternately, one repeat of each in turn, so that a shared
machine's load falls on all of them alike. Per case: median forward, backward (given the
forward graph) and forward+backward time over ``--repeats`` runs after warm-up; peak memory
of one forward+backward (CUDA: peak allocated above what was allocated before it, inputs
included in that base; CPU: in a fresh process, peak resident set above the resident set before
the call, inputs and a small warm-up call included in that base; the thread count is torch's
default); and effective gathered GB/s
= bytes the forward gathers (N*Q*M*L*P * 4 corners * D * element size) / forward time.

Run:
    python benchmarks/ms_deform_attn.py                       # all shapes, default cases
    python benchmarks/ms_deform_attn.py --shapes E1 --batch 8 --cases fallback-fp32
    python benchmarks/ms_deform_attn.py --original            # beside the original op (CUDA)
    python benchmarks/ms_deform_attn.py --threads 1,2         # CPU: 1 then 2 threads
    python benchmarks/ms_deform_attn.py --full --repeats 1    # full shapes on CPU

The output is markdown tables, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
CASES = {  # name: (FROZENSEG_OPS value, "peer" or "original"; value dtype)
    "kernel-fp32": ("cuda", torch.float32),
    "kernel-bf16": ("cuda", torch.bfloat16),
    "triton-fp32": ("triton", torch.float32),
    "cpu-fp32": ("cpu", torch.float32),
    "cpu-bf16": ("cpu", torch.bfloat16),
    "fallback-fp32": ("fallback", torch.float32),
    "peer-fp32": ("peer", torch.float32),
    "original-fp32": ("original", torch.float32),
}
CPU_CASES = ["cpu-fp32", "cpu-bf16", "fallback-fp32", "peer-fp32"]


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


def grid_sample_peer(value, spatial_shapes, level_start_index, locations, weights):
    """The pure-PyTorch deformable attention that Deformable DETR publishes as
    ``ms_deform_attn_core_pytorch`` and transformers and mmcv publish as the same
    algorithm, written here from that description: each level's map, heads folded into
    the batch, sampled at every query's points by one ``grid_sample`` (bilinear, zero
    padding, ``align_corners=False``, grid = 2 * location - 1); the levels' samples stacked
    and summed with the attention weights. Autograd differentiates it, keeping every
    level's samples for backward. One re-implementation stands for the three."""
    n, _, m, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    shapes = spatial_shapes.tolist()
    maps = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    samples = []
    for level, ((h, w), level_map) in enumerate(zip(shapes, maps, strict=True)):
        level_map = level_map.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N*M, Q, P, 2)
        samples.append(F.grid_sample(level_map, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N*M, D, Q, P)
    weights = weights.transpose(1, 2).reshape(n * m, 1, q, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Q)
    return out.view(n, m * d, q).transpose(1, 2)


def differentiable(inp: Inputs, dtype, op, backend=None):
    """forward() -> op's output with its graph; backward(out, grad) -> the inputs' gradients.
    backend, when given, is set in FROZENSEG_OPS before every forward (cases alternate)."""
    leaves = [t.to(d, copy=True).requires_grad_()
              for t, d in ((inp.value, dtype), (inp.loc, None), (inp.attn, None))]

    def forward():
        if backend is not None:
            os.environ[BACKEND_ENV] = backend
        return op(leaves[0], inp.shapes, inp.starts, *leaves[1:])

    return forward, lambda out, grad: torch.autograd.grad(out, leaves, grad)


def original(inp: Inputs, dtype):
    """The original extension's forward and backward, called directly."""
    import MultiScaleDeformableAttention as ext

    args = (inp.value.to(dtype), inp.shapes, inp.starts, inp.loc, inp.attn)

    def forward():
        return ext.ms_deform_attn_forward(*args, IM2COL_STEP)

    return forward, lambda out, grad: ext.ms_deform_attn_backward(*args, grad, IM2COL_STEP)


def runner(case, inp: Inputs):
    """(forward, backward) of a case, as differentiable() returns them."""
    backend, dtype = CASES[case]
    if backend == "original":
        return original(inp, dtype)
    if backend == "peer":
        return differentiable(inp, dtype, grid_sample_peer)
    return differentiable(inp, dtype, ms_deform_attn, backend)


def peak_mib(run, device) -> float:
    """Peak memory of run() above what was in use before it: CUDA allocations, or the
    resident set (meaningful in a fresh process, where freed memory is not reused)."""
    if device.type != "cuda":
        return cpu_peak_mib(run)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def cpu_peak_mib(run) -> float:
    """Linux: the resident-set peak is reset through /proc/self/clear_refs and read back as
    VmHWM; elsewhere the growth of the process's lifetime peak (ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / MIB
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) * 1024 / MIB


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def one_peak(case, shape, args, device) -> float:
    """Peak MiB of one forward+backward of case; on the CPU in a fresh process."""
    if device.type == "cuda" or args.peak_of:
        inp = make_inputs(*shape_levels(shape, args, device), args.batch, device)
        small = make_inputs([(4, 4)], 8, 1, device)
        for data in (small, inp):  # the small call loads the kernel outside the peak
            forward, backward = runner(case, data)
            out = forward()
            grad = torch.randn_like(out)
            del out
            result = peak_mib(lambda: backward(forward(), grad), device)  # noqa: B023
        return result
    cmd = [sys.executable, __file__, "--peak-of", case, "--shapes", shape, "--batch",
           str(args.batch), "--device", "cpu", *(["--full"] if args.full else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])["peak_mib"]


def time_alternating(cases, inp: Inputs, args, device) -> dict:
    """Median fwd, bwd and fwd+bwd seconds per case, the cases taking turns each repeat."""
    runs = {case: runner(case, inp) for case in cases}
    grads = {case: torch.randn_like(forward()) for case, (forward, _) in runs.items()}
    times = {case: {"fwd": [], "bwd": [], "both": []} for case in cases}
    for repeat in range(args.warmup + args.repeats):
        for case, (forward, backward) in runs.items():
            grad = grads[case]
            fwd = elapsed(forward, device)
            out = forward()
            bwd = elapsed(lambda: backward(out, grad), device)  # noqa: B023
            both = elapsed(lambda: backward(forward(), grad), device)  # noqa: B023
            if repeat >= args.warmup:
                for key, t in (("fwd", fwd), ("bwd", bwd), ("both", both)):
                    times[case][key].append(t)
    return {case: {k: statistics.median(v) for k, v in t.items()} for case, t in times.items()}


def run_shape(shape, cases, args, device) -> dict:
    """Results per case (times, peak, GB/s, or an error) for one shape at this thread count."""
    levels, queries = shape_levels(shape, args, device)
    inp = make_inputs(levels, queries, args.batch, device)
    results, ok = {}, []
    for case in cases:  # a case that cannot run is reported, not timed
        try:
            runner(case, inp)[0]()
            ok.append(case)
        except (RuntimeError, ValueError, ImportError) as err:
            results[case] = {"error": f"failed: {type(err).__name__}: "
                                      f"{str(err).splitlines()[0][:80]}"}
    n, q, m, lv, p, _ = inp.loc.shape
    for case, res in time_alternating(ok, inp, args, device).items():
        gathered = n * q * m * lv * p * 4 * HEAD_DIM * CASES[case][1].itemsize
        res["gbps"] = gathered / res["fwd"] / 1e9
        results[case] = res
    return results


def shape_levels(shape, args, device):
    """(levels, queries) of a shape, scaled down by 4 per side on the CPU unless --full."""
    levels, queries = SHAPES[shape]
    factor = 1 if device.type == "cuda" or args.full else 4
    return [(math.ceil(h / factor), math.ceil(w / factor)) for h, w in levels], queries


def default_cases(device, want_original):
    if device.type != "cuda":
        return CPU_CASES
    cases = ["kernel-fp32", "kernel-bf16", "fallback-fp32"]
    if want_original:
        try:
            import MultiScaleDeformableAttention  # noqa: F401
        except ImportError as err:
            print(f"--original: not importable ({err}); skipped", file=sys.stderr)
        else:
            cases.append("original-fp32")
    return cases


def result_row(shape, case, threads, levels, n, q, res):
    lv = "/".join(f"{h}x{w}" for h, w in levels)
    head = [shape, case, threads, lv, n, q]
    if "error" in res:
        return head + [res["error"]] + [""] * 4
    times = [f"{res[k] * 1e3:.2f}" for k in ("fwd", "bwd", "both")]
    peak = f"{res['mem']:.0f}" if "mem" in res else ""
    return head + times + [peak, f"{res['gbps']:.1f}"]


def ratio_rows(results):
    """The fastest baseline's time / each kernel's (>1: the kernel is faster), forward and
    forward+backward; baselines: original-fp32 on CUDA, peer-fp32 and fallback-fp32 on CPU."""
    rows = []
    for (shape, threads, case), res in results.items():
        if not case.startswith(("kernel", "triton", "cpu")) or "fwd" not in res:
            continue
        for base in ("original-fp32", "peer-fp32", "fallback-fp32"):
            ref = results.get((shape, threads, base), {})
            if "fwd" in ref:
                rows.append([shape, threads, f"{base} / {case}", f"{ref['fwd'] / res['fwd']:.2f}x",
                             f"{ref['both'] / res['both']:.2f}x"])
    return rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="E1,D1,M1", help="comma-separated, from " + ",".join(SHAPES))
    p.add_argument("--cases", help="comma-separated, from " + ",".join(CASES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", help="CPU: comma-separated torch thread counts (default: torch's)")
    p.add_argument("--full", action="store_true", help="full shapes on CPU too")
    p.add_argument("--no-peak", action="store_true", help="skip the peak memory runs")
    p.add_argument("--original", action="store_true", help="add the original op (CUDA)")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one case's CPU peak
    add_run_arguments(p)
    return p.parse_args()


def main():
    args = parse_args()
    device = resolve_run_arguments(args)
    if args.peak_of:
        print(json.dumps({"peak_mib": one_peak(args.peak_of, args.shapes, args, device)}))
        return
    cases = args.cases.split(",") if args.cases else default_cases(device, args.original)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    results, rows = {}, []
    for shape in args.shapes.split(","):
        levels, queries = shape_levels(shape, args, device)
        for threads in thread_counts:
            if threads:
                torch.set_num_threads(threads)
            print(f"running {shape} at {torch.get_num_threads()} threads ...", file=sys.stderr,
                  flush=True)
            for case, res in run_shape(shape, cases, args, device).items():
                results[shape, torch.get_num_threads(), case] = res
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for case in cases if not args.no_peak else []:
            res = results[shape, torch.get_num_threads(), case]
            if "error" not in res:
                res["mem"] = one_peak(case, shape, args, device)
        for (s, threads, case), res in results.items():
            if s == shape:
                rows.append(result_row(shape, case, threads, levels, args.batch,
                                       queries or sum(h * w for h, w in levels), res))
    memory_note = (
        "peak MiB = max_memory_allocated of one fwd+bwd minus memory allocated before it"
        if device.type == "cuda" else
        "peak MiB = one fwd+bwd in a fresh process, peak RSS above the RSS before the call"
    )
    print(device_line(device, args, memory_note) + "\n")
    print(table(["shape", "case", "threads", "levels", "N", "Q", "fwd ms", "bwd ms",
                 "fwd+bwd ms", "peak MiB", "GB/s"], rows))
    if ratios := ratio_rows(results):
        print("\nspeed-up (baseline time / kernel time; >1 means the kernel is faster)\n")
        print(table(["shape", "threads", "ratio", "fwd", "fwd+bwd"], ratios))


if __name__ == "__main__":
    main()
