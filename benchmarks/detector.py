"""Benchmark of the frozen detector: ``FrozenDetector(build_detector(config))`` forward.

Configurations (random weights, eval, no grad; DINO-4scale settings: hidden 256, 8 heads,
6 encoder + 6 decoder layers, dim_feedforward 2048, 4 points, 900 queries, 91 classes,
mixed query selection, box refinement, decoder norm, reference-point head):

    r50-4scale     ResNet-50, stages 1..3 (strides 8/16/32) + one stride-64 level
    swinl-4scale   Swin-L (embed 192, depths 2-2-18-2, window 12), out stages 1, 2, 3 normed

Input: a batch of random [0, 1] RGB images, 800x1333 (the originals' resize of a 3:5
image). Cases: on CUDA ``fp32`` and ``bf16`` (``torch.autocast("cuda", dtype=bfloat16)``);
on CPU ``fp32`` only, at 320x533 unless ``--full`` or ``--size`` (the 900 queries need at
least 900 positions over the four levels: about H * W / 48 >= 900).

Per case: median forward time over ``--repeats`` runs after ``--warmup`` (CUDA events on a
GPU), images/s = batch / median, and peak memory (CUDA: max_memory_allocated of one forward
after a reset, weights included; CPU: the process peak RSS so far, ru_maxrss, not a per-case
figure). The parameter count of each configuration is printed with it.

``--parts B1,B2`` instead times the backbone alone and the backbone + encoder
(``model.encode``), with the deformable attention on each of the op back ends named
(``FROZENSEG_OPS`` values), alternating in one process: where the forward's time goes.

Run:
    python benchmarks/detector.py                              # both configurations
    python benchmarks/detector.py --configs r50-4scale --size 800 1216 --parts cpu,fallback
    python benchmarks/detector.py --configs r50-4scale --batch 2
    python benchmarks/detector.py --full --repeats 1           # 800x1333 on CPU

The output is a markdown table, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import statistics
import sys

import torch
from common import (
    MIB,
    add_run_arguments,
    device_line,
    elapsed,
    resolve_run_arguments,
    table,
)

from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector

FULL_SIZE, CPU_SIZE = (800, 1333), (320, 533)
SWIN_L = {"name": "swin", "embed_dim": 192, "depths": (2, 2, 18, 2),
          "num_heads": (6, 12, 24, 48), "window_size": 12, "out_indices": (1, 2, 3)}
DINO = {  # as frozenseg.formats.dino derives a DINO-4scale checkpoint
    "variant": "dino", "hidden_dim": 256, "backbone_levels": (1, 2, 3), "num_feature_levels": 4,
    "nheads": 8, "enc_layers": 6, "dec_layers": 6, "dim_feedforward": 2048, "num_queries": 900,
    "num_classes": 91, "query_init": "mixed", "box_refine": True, "proposal_score": "max_class",
    "decoder_norm": True, "ref_point_head": True, "pos_temperature": 20.0, "pos_offset": 0.0,
    "inverse_sigmoid_eps": 1e-3, "num_select": 300,
}
CONFIGS = {
    "r50-4scale": DetectorConfig(backbone={"name": "resnet50"}, **DINO),
    "swinl-4scale": DetectorConfig(backbone=SWIN_L, **DINO),
}
CASES = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype


def make_detector(name, device) -> tuple[FrozenDetector, int]:
    torch.manual_seed(0)
    model = build_detector(CONFIGS[name])
    params = sum(p.numel() for p in model.parameters())
    return FrozenDetector(model).to(device), params


def forward_fn(detector, images, dtype):
    """A no-argument forward, under autocast when dtype is given."""
    def run():
        ctx = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            return detector(images)
    return run




def peak_mib(fn, device) -> float:
    """CUDA: max_memory_allocated of one fn() after a reset; CPU: process peak RSS so far."""
    if device.type != "cuda":
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / MIB


def run_case(detector, images, dtype, args, device) -> dict:
    fn = forward_fn(detector, images, dtype)
    for _ in range(args.warmup):
        fn()
    fwd = statistics.median(elapsed(fn, device) for _ in range(args.repeats))
    return {"fwd": fwd, "ips": images.shape[0] / fwd, "mem": peak_mib(fn, device)}


def result_row(name, case, images, params, res) -> list:
    b, _, h, w = images.shape
    head = [name, case, f"{b}x{h}x{w}", f"{params / 1e6:.1f}"]
    if "error" in res:
        return head + [res["error"], "", ""]
    return head + [f"{res['fwd'] * 1e3:.1f}", f"{res['ips']:.2f}", f"{res['mem']:.0f}"]


def run_config(name, args, device) -> list[list]:
    detector, params = make_detector(name, device)
    images = torch.rand(args.batch, 3, *args.size, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    rows = []
    for case in args.cases:
        print(f"running {name} {case} ...", file=sys.stderr, flush=True)
        try:
            res = run_case(detector, images, CASES[case], args, device)
        except (RuntimeError, ValueError) as err:
            res = {"error": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"}
        rows.append(result_row(name, case, images, params, res))
    del detector, images
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows








def part_rows(name, backends: list[str], args, device) -> list[list]:
    """Median ms of the backbone and of backbone + encoder per op back end, alternating."""
    detector, _ = make_detector(name, device)
    model = detector.model
    images = torch.rand(args.batch, 3, *args.size, generator=torch.Generator().manual_seed(0))
    batch, padding, _ = detector.preprocess(list(images.to(device)))
    parts = {"backbone": lambda: model.backbone(batch),
             "backbone+encoder": lambda: model.encode(batch, padding)}
    times = {(b, part): [] for b in backends for part in parts}
    with torch.no_grad():
        for repeat in range(args.warmup + args.repeats):
            for backend in backends:
                os.environ["FROZENSEG_OPS"] = backend
                for part, fn in parts.items():
                    seconds = elapsed(fn, device)
                    if repeat >= args.warmup:
                        times[backend, part].append(seconds)
    rows = []
    for backend in backends:
        backbone = statistics.median(times[backend, "backbone"])
        both = statistics.median(times[backend, "backbone+encoder"])
        rows.append([name, backend, f"{args.batch}x{args.size[0]}x{args.size[1]}",
                     f"{backbone * 1e3:.0f}", f"{(both - backbone) * 1e3:.0f}",
                     f"{(both - backbone) / backbone:.2f}"])
    return rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated, from " + ",".join(CONFIGS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size (default 800 1333 on CUDA, 320 533 on CPU)")
    p.add_argument("--full", action="store_true", help="800x1333 on CPU too")
    p.add_argument("--parts", help="op back ends (FROZENSEG_OPS values) to time the backbone "
                                   "and the encoder with, e.g. cpu,fallback")
    add_run_arguments(p)
    return p.parse_args()


def main():
    args = parse_args()
    device = resolve_run_arguments(args)
    on_gpu = device.type == "cuda"
    args.size = tuple(args.size or (FULL_SIZE if on_gpu or args.full else CPU_SIZE))
    args.cases = list(CASES) if on_gpu else ["fp32"]
    if args.parts:
        rows = [row for name in args.configs.split(",")
                for row in part_rows(name, args.parts.split(","), args, device)]
        print(device_line(device, args, "encoder = backbone+encoder - backbone") + "\n")
        print(table(["config", "op back end", "input BxHxW", "backbone ms", "encoder ms",
                     "encoder / backbone"], rows))
        return
    rows = [row for name in args.configs.split(",") for row in run_config(name, args, device)]
    memory_note = (
        "peak MiB = max_memory_allocated of one forward after a reset, weights included"
        if on_gpu else "peak MiB = process peak RSS so far (ru_maxrss), not per case"
    )
    print(device_line(device, args, memory_note) + "\n")
    print(table(["config", "case", "input BxHxW", "params M", "fwd ms", "images/s",
                 "peak MiB"], rows))


if __name__ == "__main__":
    main()
