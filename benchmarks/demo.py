"""The demo's figures: the shipped detector's box AP, the head's mask AP against minutes of
training, the training-free baseline (paper Table 1) on the same detections, and the head
on ground-truth boxes (what better boxes would give).

1. ``frozenseg demo`` as a user runs it (its defaults) in WORK/demo: seconds per stage,
   the detector's box AP and the head's mask AP.
2. On that demo's data and feature cache, the demo's head again, its schedule stretched to
   the last mark at the steps per minute of the demo's training (timed when it ran, so a
   reused demo gives the rate of the run that made it; the lr drops land near the mark),
   evaluated at every mark on the detector's boxes (evaluation time not counted); after
   the last mark also on the ground-truth boxes.
3. The training-free head on the detector's boxes and on the ground-truth boxes.

Run:
    python -m benchmarks.demo                      # marks 1, 3, 5 minutes
    python -m benchmarks.demo --marks 1,2 --images 100 --detector my_dino.pth
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.common import cpu_name, learning_curve, table
from frozenseg.demo import (
    DEFAULT_IMAGES,
    DEFAULT_STEPS,
    DETECTOR,
    demo_recipe,
    finished_run,
    run_demo,
    summary_table,
)
from frozenseg.engine.train import Trainer
from frozenseg.head.inference import evaluate
from frozenseg.head.network import build_mask_head
from frozenseg.head.segmenter import MaskFrozenDETR
from frozenseg.head.task import recipe_detector
from frozenseg.recipe import recipe_from_dict, recipe_to_dict

COLUMNS = ["head", "minutes", "step", "mask AP", "AP50", "AP75", "mask AP on GT boxes"]


def with_overrides(recipe, *overrides: str):
    return recipe_from_dict(recipe_to_dict(recipe), "demo recipe", list(overrides))


def segm(metrics: dict) -> list[str]:
    return [f"{metrics['segm'][name]:.1f}" for name in ("AP", "AP50", "AP75")]


def curve(recipe, out: Path, marks: list[float], steps_per_minute: float):
    """Rows of the demo's head trained to the last mark, the last with its GT-box AP."""
    shutil.rmtree(out, ignore_errors=True)
    iterations = math.ceil(steps_per_minute * marks[-1])
    recipe = with_overrides(recipe, f"train.output_dir={out}", "train.max_minutes=null",
                            f"train.iterations={iterations}", "train.checkpoint_every=0")
    trainer = Trainer(recipe, log=lambda _: None, evaluate=False)
    rows = learning_curve(trainer, list(marks), segm, COLUMNS[1:-1])
    rows = [["trained", *r, ""] for r in rows]
    head = trainer.accelerator.unwrap_model(trainer.model)
    on_gt = evaluate(MaskFrozenDETR(trainer.task.detector, head,
                                    with_overrides(recipe, "eval.boxes=gt")), out / "eval-gt")
    rows[-1][-1] = f"{on_gt['segm']['AP']:.1f}"
    return rows


def training_free(recipe, out: Path) -> tuple[list, float]:
    """The parameter-free head of Table 1 on the detector's and on the GT boxes (with the
    1/4 backbone map added only where its width is the detector's)."""
    detector = recipe_detector(recipe)
    same_width = detector.model.backbone.channels[0] == detector.config.hidden_dim
    recipe = with_overrides(recipe, "head.trainable=false", f"head.fuse_c1={same_width}")
    head = build_mask_head(recipe.head, **detector.head_dims)
    on_boxes = evaluate(MaskFrozenDETR(detector, head, recipe), out / "free")
    on_gt = evaluate(MaskFrozenDETR(detector, head, with_overrides(recipe, "eval.boxes=gt")),
                     out / "free-gt")
    row = ["training-free", 0, 0, *segm(on_boxes), f"{on_gt['segm']['AP']:.1f}"]
    return row, on_boxes["bbox"]["AP"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--marks", default="1,3,5", help="minutes of head training")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    parser.add_argument("--detector", type=Path, default=DETECTOR)
    parser.add_argument("--work", type=Path, default=Path("/tmp/frozenseg-bench-demo"))
    args = parser.parse_args()
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)

    demo = args.work / "demo"
    started = time.perf_counter()
    summary = run_demo(demo, images=args.images, detector=args.detector)
    Console(width=120).print(summary_table(summary))
    print(f"the demo: {time.perf_counter() - started:.0f} s wall", flush=True)

    recipe = demo_recipe(demo)
    run = finished_run(summary.stage("train").path.parent, DEFAULT_STEPS)
    steps, minutes = run["steps"], run["seconds"] / 60
    rows = curve(recipe, args.work / "curve", [float(m) for m in args.marks.split(",")],
                 steps / minutes)
    free, box_ap = training_free(recipe, args.work)
    print(f"detector box AP on val: {box_ap:.1f}")
    print(table(COLUMNS, [free, ["demo default", f"{minutes:.1f}", steps,
                                 f"{summary.mask_ap:.1f}", "", "", ""], *rows]))


if __name__ == "__main__":
    main()
