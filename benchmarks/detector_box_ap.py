"""Box AP of a detector alone: its own top-K detections and class scores, no head.

``frozenseg demo`` scores each detection by class score times the head's predicted mask
IoU, so its box AP moves with the head. This measures what the detector gives by itself,
as the frozen detector predicts during caching and export (evaluation resize at
``--scale``), with pycocotools, at the demo's top 20 and at DINO's top 100. A checkpoint
is converted first, in a temporary folder (a joint-mode ``last.pt``: its detector, so a
training run can be followed while it trains; a DINO file: with the shapes' class names).

    python -m benchmarks.detector_box_ap --detector frozenseg/assets/synth_dino.pth \\
        --images synth_plain/images/val --annotations synth_plain/instances_val.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import cpu_name, table
from frozenseg.boxes import to_pixels
from frozenseg.convert import convert_checkpoint
from frozenseg.data import ImageFolder
from frozenseg.data.synth import THINGS
from frozenseg.detector.classes import match_classes
from frozenseg.detector.frozen import load_detector
from frozenseg.engine.data import eval_transform
from frozenseg.evaluation.coco import coco_evaluate
from frozenseg.maskdino.checkpoint import is_joint_checkpoint, load_joint, save_as_detector

TOP_K = (20, 100)   # the demo's detections per image; DINO's


def detections(detector, dataset, classes) -> list[tuple[int, dict]]:
    """(rank in its image, COCO box result) of the detector's best ``max(TOP_K)`` per image,
    in original pixels. Its top-K is sorted, so the best k of an image are ranks < k."""
    detector.top_k = max(TOP_K)
    found = []
    with torch.inference_mode():
        for image, target in dataset:
            out = detector([image])
            x0, y0, x1, y1 = to_pixels(out.boxes[0], target["orig_size"]).unbind(-1)
            ids = classes.to_category_ids(out.labels[0])
            found += [(j, {"image_id": target["image_id"], "category_id": int(ids[j]),
                           "bbox": [float(x0[j]), float(y0[j]), float(x1[j] - x0[j]),
                                    float(y1[j] - y0[j])], "score": float(out.scores[0, j])})
                      for j in range(len(ids)) if ids[j] >= 0]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", type=Path, required=True,
                        help="a checkpoint (converted on the fly) or a converted folder")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--annotations", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.4, help="the demo's data.scale")
    parser.add_argument("--class-names", nargs="*", default=[c.name for c in THINGS],
                        help="of an unnamed checkpoint (default: the synthetic shapes')")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.detector
        if not folder.is_dir():
            folder = Path(scratch) / "detector"
            if is_joint_checkpoint(args.detector):
                model, info = load_joint(args.detector)
                save_as_detector(model, folder, info["class_names"])
            else:
                convert_checkpoint(args.detector, folder, class_names=args.class_names)
        detector = load_detector(folder)
        dataset = ImageFolder.from_coco(args.images, args.annotations,
                                        transform=eval_transform(args.scale))
        classes = match_classes(detector.classes, dataset.category_ids,
                                dataset.category_names)
        found = detections(detector, dataset, classes)
    rows = []
    for k in TOP_K:
        box = coco_evaluate(args.annotations, [r for rank, r in found if rank < k],
                            ["bbox"])["bbox"]
        rows.append([k, f"{box['AP']:.1f}", f"{box['AP50']:.1f}", f"{box['AP75']:.1f}"])
    print(f"{args.detector} on {len(dataset)} images of {args.annotations} ({cpu_name()}, "
          f"torch {torch.__version__})")
    print(table(["top K", "box AP", "AP50", "AP75"], rows))


if __name__ == "__main__":
    main()
