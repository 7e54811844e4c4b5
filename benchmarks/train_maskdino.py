"""Learning curve of the tiny joint recipe: box AP, mask AP and PQ vs minutes of training.

``recipes/maskdino_synth_tiny.yaml`` (Mask DINO from random weights: a small Swin, a
64-wide transformer, 50 queries) trains on the synthetic shapes, things and stuff
(panoptic), and is evaluated on the validation split at each mark: box and mask AP
(pycocotools), PQ (things and stuff), mIoU. Minutes count training only.

Run:
    python benchmarks/train_maskdino.py                     # 300 images, 30 minutes
    python benchmarks/train_maskdino.py --marks 1,2 --images 60 maskdino.task=instance
    # From the shipped detector, as `frozenseg demo` converted it (class names included):
    python -m benchmarks.train_maskdino --min-object 24 maskdino.init=frozenseg-demo/detector \
        maskdino.num_queries=100 maskdino.query_init=mixed data.scale=0.4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import frozenseg
from benchmarks.common import cpu_name, learning_curve, table
from frozenseg.engine.train import Trainer
from frozenseg.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "maskdino_synth_tiny.yaml"
COLUMNS = ["minutes", "step", "box AP", "mask AP", "PQ", "PQ th", "PQ st", "mIoU"]


def cells(metrics: dict) -> list[str]:
    panoptic = metrics.get("panoptic", {})
    values = [metrics.get("bbox", {}).get("AP"), metrics.get("segm", {}).get("AP"),
              *(panoptic.get(group, {}).get("PQ") for group in ("all", "things", "stuff")),
              metrics.get("semantic", {}).get("mIoU")]
    return ["-" if v is None else f"{v:.1f}" for v in values]


def recipe(synth: Path, run: Path, overrides: list[str]):
    paths = []
    for split in ("train", "val"):
        paths += [f"data.{split}.images={synth / 'images' / split}",
                  f"data.{split}.annotations={synth / f'instances_{split}.json'}",
                  f"data.{split}.panoptic={synth / f'panoptic_{split}.json'}",
                  f"data.{split}.panoptic_png={synth / f'panoptic_{split}'}"]
    return load_recipe(RECIPE, [*paths, f"train.output_dir={run}", "train.max_minutes=null",
                                "train.iterations=1000000", "train.checkpoint_every=0",
                                *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="synthetic images (train+val)")
    parser.add_argument("--marks", default="2,5,10,20,30", help="minutes to evaluate at")
    parser.add_argument("--min-object", type=int, default=8,
                        help="smallest shape in pixels (frozenseg synth --min-object)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/frozenseg-train-maskdino"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.lr=2e-4")
    args = parser.parse_args()
    synth = args.work / f"synth-{args.min_object}"
    frozenseg.synth(synth, images=args.images, seed=0, min_object=args.min_object)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    trainer = Trainer(recipe(synth, args.work / f"run-{int(time.time())}",
                             args.overrides), log=lambda _: None, evaluate=False)
    print("; ".join(trainer.task.report), flush=True)
    rows = learning_curve(trainer, [float(m) for m in args.marks.split(",")], cells, COLUMNS)
    print(table(COLUMNS, rows))


if __name__ == "__main__":
    main()
