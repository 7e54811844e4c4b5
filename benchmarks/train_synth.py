"""Learning curve of the tiny recipe on the synthetic dataset: mask AP vs minutes of training.

The head of ``recipes/synth_tiny.yaml`` trains from the feature cache of a random-weight
ResNet-50 detector (no trained detector exists to download: a random one still gives the
head real shapes and real feature maps), on the ground-truth boxes (``loss.proposals: gt``),
and is evaluated on the validation split's ground-truth boxes (``eval.boxes: gt``), so the
figure is the head's mask quality alone. The training-free baseline (paper Table 1, RoIAlign
+ 1/4 features) on the same boxes is the reference. Minutes count training only (caching
and evaluation are timed apart).

Run:
    python benchmarks/train_synth.py                       # 200 images, 10 minutes
    python benchmarks/train_synth.py --marks 1,2 --images 60 head.mask_head=segmenter
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import frozenseg
from benchmarks.common import cpu_name, learning_curve, table
from frozenseg.cache import write_cache
from frozenseg.data import CocoInstances
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.folder import write_detector
from frozenseg.detector.model import build_detector
from frozenseg.engine.data import eval_transform
from frozenseg.engine.train import Trainer
from frozenseg.head.inference import evaluate
from frozenseg.head.network import build_mask_head
from frozenseg.head.segmenter import MaskFrozenDETR
from frozenseg.head.task import recipe_detector
from frozenseg.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "synth_tiny.yaml"
DETECTOR = dict(backbone={"name": "resnet50"}, hidden_dim=256, enc_layers=4, dec_layers=2,
                dim_feedforward=1024, num_queries=100, num_classes=16)


def prepare(work: Path, images: int, scale: float) -> tuple[Path, Path, float]:
    """Synthetic data, a random detector folder and its train cache (seconds to cache;
    about 0 when an earlier run's cache is reused)."""
    frozenseg.synth(work / "synth", images=images, seed=0)
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(**DETECTOR))
    write_detector(work / "detector", model.state_dict(), model.config, format="frozenseg",
                   source="random ResNet-50 (benchmark)")
    dataset = CocoInstances(work / "synth/images/train", work / "synth/instances_train.json")
    started = time.perf_counter()
    write_cache(str(work / "detector"), dataset, work / "cache", dtype="fp16", top_k=20,
                transform=eval_transform(scale), resume=True)  # a second run reuses it
    return work / "synth", work / "cache", time.perf_counter() - started


def recipe(work: Path, synth: Path, cache: Path, scale: float, *extra: str):
    return load_recipe(RECIPE, [
        f"detector.path={work / 'detector'}", f"data.train.images={synth / 'images/train'}",
        f"data.train.annotations={synth / 'instances_train.json'}",
        f"data.val.images={synth / 'images/val'}",
        f"data.val.annotations={synth / 'instances_val.json'}", f"data.cache={cache}",
        f"data.scale={scale}", "data.num_workers=0", "eval.boxes=gt", "train.max_minutes=null",
        "train.iterations=1000000", "train.checkpoint_every=0", *extra])


COLUMNS = ["minutes", "step", "mask AP", "AP50", "AP75"]


def mask_ap(metrics: dict) -> list[str]:
    return [f"{metrics['segm'][name]:.1f}" for name in ("AP", "AP50", "AP75")]


def baseline(r) -> dict:
    """The training-free head (Table 1: RoIAlign + 1/4 features) on the same boxes."""
    r.head.trainable = False
    detector = recipe_detector(r)
    return evaluate(MaskFrozenDETR(detector, build_mask_head(r.head, **detector.head_dims), r),
                    Path(r.train.output_dir) / "baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="synthetic images (train+val)")
    parser.add_argument("--marks", default="1,2,3,5,7,10", help="minutes to evaluate at")
    parser.add_argument("--scale", type=float, default=0.32, help="data.scale (eval 256 px)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/frozenseg-train-synth"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.lr=5e-4")
    args = parser.parse_args()
    synth, cache, cache_s = prepare(args.work, args.images, args.scale)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"cached the train split in {cache_s:.0f} s", flush=True)
    run = args.work / f"run-{int(time.time())}"
    rows = learning_curve(Trainer(recipe(args.work, synth, cache, args.scale,
                                         f"train.output_dir={run}", *args.overrides),
                                  log=lambda _: None, evaluate=False),
                          [float(m) for m in args.marks.split(",")], mask_ap, COLUMNS)
    free = baseline(recipe(args.work, synth, cache, args.scale, f"train.output_dir={run}",
                           *args.overrides))
    rows.append(["baseline", 0, f"{free['segm']['AP']:.1f}", f"{free['segm']['AP50']:.1f}",
                 f"{free['segm']['AP75']:.1f}"])
    print(table(COLUMNS, rows))


if __name__ == "__main__":
    main()
