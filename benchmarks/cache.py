"""Benchmark of the feature cache: writing and reading it, its bytes per image, and a head
training step from the cache versus with the detector live, side by side in one run.

Detector: ``swinl-4scale`` of benchmarks/detector.py (DINO-4scale Swin-L, random weights,
top-100 detections, memory from encoder layer 4). Data: a synthetic COCO set
(``frozenseg.synth``, sides 480-640 px) under the evaluation resize scaled by ``--scale``
(1.0: short side 800, long <= 1333; the CPU default 0.4: 320 / 533). Head: the default
HeadConfig with 3 image-encoder and 2 box-encoder layers, as the Swin-L recipe
(recipes/mask_frozen_dino_swinl_4scale.yaml); MaskCriterion defaults; AdamW.

Per storage dtype:
  write images/s   images / the time write_cache takes from its first entry to its return
                   (the detector, packing, saving and hashing the shards; its set-up, the
                   weights' hash and the size projection's detector run, left out)
  read images/s    FeatureCache[i] for every entry (memory-mapped, dequantised to float32)
  item images/s    CachedTrainingSet[i] for every image: the cached entry, the image decoded
                   and resized, its ground truth (what a DataLoader worker does per item)
  bytes/image      the shard files' size / images (c1 not stored: recomputed)

Training step, batch ``--batch``, proposals ``--proposals`` (a random detector finds
nothing: "both" trains on the jittered ground-truth boxes); the two cases take turns,
median of ``--repeats`` after ``--warmup``:
  live    LiveTrainingSet items + collate + live_batch (the detector on each image)
          + head_losses + backward + AdamW step
  cache   CachedTrainingSet items + collate_cached (``--dtype`` cache) + head_losses
          (which recomputes backbone stage 1 alone) + backward + AdamW step
Then the goals: live / cache step time >= 3, and item images/s >= 5 x the cache step's
images/s (reading is never the bottleneck); and the epochs after which writing has paid.

Run:
    python benchmarks/cache.py                          # CPU: scale 0.4, 4 images, batch 2
    python benchmarks/cache.py --full --batch 8 --images 64     # 800x1333 (a GPU)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import MIB, add_run_arguments, device_line, elapsed, resolve_run_arguments, table
from detector import make_detector

import frozenseg
from frozenseg.cache import CachedTrainingSet, FeatureCache, collate_cached, write_cache
from frozenseg.data import CocoInstances
from frozenseg.data.collate import collate
from frozenseg.detector.classes import match_classes
from frozenseg.engine.data import LiveTrainingSet, eval_transform, live_batch
from frozenseg.head.loss import MaskCriterion
from frozenseg.head.network import build_mask_head
from frozenseg.head.step import head_losses
from frozenseg.recipe.head import HeadConfig

DTYPES = ("fp32", "fp16", "bf16", "int8")
HEAD = HeadConfig(image_encoder_layers=3, box_encoder_layers=2)  # the Swin-L recipe's head
CPU_SCALE = 0.4


def make_dataset(root: Path, images: int) -> CocoInstances:
    """``images`` synthetic training images (plus the one validation image synth insists on)."""
    frozenseg.synth(root, images=images + 1, seed=0, min_size=480, max_size=640,
                    val_fraction=1 / (images + 1))
    return CocoInstances(root / "images" / "train", root / "instances_train.json")


def median_time(fn, args, device) -> float:
    for _ in range(args.warmup):
        fn()
    return statistics.median(elapsed(fn, device) for _ in range(args.repeats))


def write_seconds(detector, dataset, out: Path, dtype: str, transform) -> float:
    """Seconds write_cache takes from its first entry (progress is called once before it)."""
    started: list[float] = []

    def progress(done: int, total: int) -> None:
        if not started:
            started.append(time.perf_counter())

    write_cache(detector, dataset, out, dtype=dtype, transform=transform, progress=progress)
    return time.perf_counter() - started[0]


def cache_figures(detector, dataset, out: Path, dtype: str, transform, args, device) -> dict:
    """Write the ``dtype`` cache to ``out``, then time reading it back."""
    print(f"writing and reading the {dtype} cache ...", file=sys.stderr, flush=True)
    write = write_seconds(detector, dataset, out, dtype, transform)
    cache = FeatureCache(out)
    items = CachedTrainingSet(cache, dataset)
    read = median_time(lambda: [cache[i] for i in range(len(cache))], args, device)
    item = median_time(lambda: [items[i] for i in range(len(items))], args, device)
    shard_bytes = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    return {"write": len(dataset) / write, "read": len(cache) / read, "item": len(items) / item,
            "bytes": shard_bytes / len(cache)}


def train_step(detector, proposals: str, device):
    """step(batch): head_losses + backward + AdamW step of a fresh Swin-L-recipe head."""
    torch.manual_seed(0)
    head = build_mask_head(HEAD, **detector.head_dims).to(device)
    criterion, generator = MaskCriterion(), torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1.5e-4, weight_decay=5e-5)

    def step(batch) -> None:
        losses = head_losses(batch, detector, head, criterion, mode=proposals, assign_iou=0.5,
                             jitter=0.1, generator=generator)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def next_batch(size: int, batch: int):
    """A function giving the next ``batch`` indices of 0..size-1, round and round."""
    order = itertools.cycle(range(size))
    return lambda: [next(order) for _ in range(batch)]


def step_times(detector, dataset, cache_dir: Path, transform, args, device) -> dict:
    """Median seconds of a live and a cached training step, the two taking turns."""
    step = train_step(detector, args.proposals, device)
    live_set = LiveTrainingSet(dataset, transform)
    cached_set = CachedTrainingSet(cache_dir, dataset)
    live_next, cache_next = (next_batch(len(dataset), args.batch) for _ in range(2))
    classes = match_classes(detector.classes, dataset.category_ids, dataset.category_names)
    cases = {
        "live": lambda: step(live_batch(detector, classes, dataset,
                                        collate([live_set[i] for i in live_next()]))),
        "cache": lambda: step(collate_cached([cached_set[i] for i in cache_next()])),
    }
    print("timing the live and cached steps ...", file=sys.stderr, flush=True)
    for _ in range(args.warmup):
        for run in cases.values():
            run()
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            times[name].append(elapsed(run, device))
    return {name: statistics.median(t) for name, t in times.items()}


def dtype_rows(figures: dict) -> list[list]:
    return [[dtype, f"{f['bytes'] / MIB:.2f}", f"{f['write']:.2f}", f"{f['read']:.1f}",
             f"{f['item']:.1f}"] for dtype, f in figures.items()]


def step_rows(times: dict, batch: int) -> list[list]:
    return [[name, f"{t * 1e3:.0f}", f"{batch / t:.2f}"] for name, t in times.items()]


def verdicts(times: dict, cached: dict, batch: int) -> list[str]:
    """The two goals, and the epochs after which the cache has paid for its writing."""
    ratio = times["live"] / times["cache"]
    headroom = cached["item"] / (batch / times["cache"])
    saved = (times["live"] - times["cache"]) / batch  # seconds per image per epoch
    paid = (f"after {(1 / cached['write']) / saved:.2f} epochs of training from it"
            if saved > 0 else "never")
    return [
        f"live / cache step time: {ratio:.2f}x (goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})",
        f"cache items/s / cache step images/s: {headroom:.1f}x "
        f"(goal >= 5x: {'met' if headroom >= 5 else 'NOT met'})",
        f"the time spent writing the cache is won back {paid}",
    ]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4, help="training images (default 4)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--scale", type=float,
                   help=f"evaluation-resize scale (default 1.0 on CUDA, {CPU_SCALE} on CPU)")
    p.add_argument("--full", action="store_true", help="scale 1.0 (800x1333) on CPU too")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="storage dtypes to write and read")
    p.add_argument("--dtype", default="fp16", help="the cache the training step reads")
    p.add_argument("--proposals", default="both", choices=("gt", "both"))
    add_run_arguments(p)
    args = p.parse_args()
    if args.dtype not in args.dtypes.split(","):
        p.error(f"--dtype {args.dtype} is not among --dtypes {args.dtypes}")
    return args


def measure(args, device, transform) -> tuple[dict, dict, str]:
    """(figures per dtype, step times, a note on the setup), in a temporary folder."""
    detector, _ = make_detector("swinl-4scale", device)
    # Random weights: unnamed classes, taken in order for the synthetic categories (COCO's
    # names, the default of 91 classes, share none with them)
    k = detector.config.num_classes
    detector.classes = {"names": [None] * k, "category_ids": list(range(k))}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = make_dataset(root / "synth", args.images)
        figures = {dtype: cache_figures(detector, dataset, root / dtype, dtype, transform,
                                        args, device) for dtype in args.dtypes.split(",")}
        times = step_times(detector, dataset, root / args.dtype, transform, args, device)
        instances = len(json.loads(dataset.annotations_json.read_text())["annotations"])
    note = (f"swinl-4scale, random weights; {len(dataset)} synthetic images, "
            f"{instances / len(dataset):.1f} instances each, resize {transform!r}; "
            f"batch {args.batch}, proposals {args.proposals}; the step reads {args.dtype}")
    return figures, times, note


def main():
    args = parse_args()
    device = resolve_run_arguments(args)
    scale = args.scale or (1.0 if device.type == "cuda" or args.full else CPU_SCALE)
    figures, times, note = measure(args, device, eval_transform(scale))
    print(device_line(device, args, note) + "\n")
    print(table(["dtype", "MiB/image", "write images/s", "read images/s", "item images/s"],
                dtype_rows(figures)) + "\n")
    print(table(["step", "ms/step", "images/s"], step_rows(times, args.batch)) + "\n")
    print("\n".join(verdicts(times, figures[args.dtype], args.batch)))


if __name__ == "__main__":
    main()
