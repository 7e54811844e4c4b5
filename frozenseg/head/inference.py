"""Running detector + head over a dataset: COCO results, and their evaluation.

Images get the evaluation view (a plain resize); the detector runs on each image alone
(as in training and in the cache) and the head on the padded batch of its outputs.
Results are COCO dicts in the original images' pixels (:mod:`frozenseg.evaluation.results`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from frozenseg.data.coco import CocoInstances
from frozenseg.data.collate import collate
from frozenseg.detector.classes import ClassMapping, match_classes
from frozenseg.detector.output import DetectorOutput, batch_outputs, stack_padded
from frozenseg.engine.data import eval_transform
from frozenseg.evaluation.coco import coco_evaluate, write_metrics
from frozenseg.evaluation.results import ResultsWriter
from frozenseg.head.results import image_predictions


@torch.no_grad()
def predict(model, dataset: CocoInstances, *, classes: ClassMapping | None = None,
            batch_size: int = 2, score_threshold: float = 0.0, max_per_image: int = 100,
            mask_threshold: float = 0.5, boxes: str = "detector", num_workers: int = 0,
            progress: Callable[[int, int], None] | None = None
            ) -> Iterator[tuple[dict, list[dict]]]:
    """(target, COCO results) of each image of ``dataset`` (its own transform is the view)
    by ``model`` (a :class:`frozenseg.MaskFrozenDETR`), in order; ``progress(done, total)``
    after each batch.

    classes: detector class -> dataset category id; default: matched from the detector's
      and the dataset's categories (:func:`frozenseg.detector.classes.match_classes`).
    boxes: "detector" (its top-K) or "gt" (the targets' boxes, with their categories and a
      detector score of 1, so a mask's score is its predicted IoU).
    An image that cannot be read is skipped (the dataset warns)."""
    if classes is None:
        classes = match_classes(model.detector.classes, dataset.category_ids,
                                dataset.category_names)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                        num_workers=num_workers)
    detector, device, done = model.detector, model.device, 0
    for images, _, targets in loader:
        done += len(targets) if targets else batch_size
        if targets:
            runs = [_run(detector, _unpadded(image, t).to(device), t, boxes, classes, dataset)
                    for image, t in zip(images, targets, strict=True)]
            found = batch_outputs([output for output, _ in runs])
            category_ids = stack_padded([ids[None] for _, ids in runs])
            yield from zip(targets, image_predictions(
                model.head(found), category_ids, targets, score_threshold=score_threshold,
                max_per_image=max_per_image, mask_threshold=mask_threshold), strict=True)
        if progress:
            progress(min(done, len(dataset)), len(dataset))


def _unpadded(image: torch.Tensor, target: dict) -> torch.Tensor:
    return image[:, : int(target["size"][0]), : int(target["size"][1])]


def _run(detector, image: torch.Tensor, target: dict, boxes: str, classes: ClassMapping,
         dataset: CocoInstances) -> tuple[DetectorOutput, torch.Tensor]:
    """One image's detector output and the category id of each of its queries."""
    if boxes == "detector":
        out = detector([image])
        return out, classes.to_category_ids(out.labels[0])
    labels = classes.detector_labels(target["labels"], dataset.category_ids)
    out = detector.embed_boxes([image], [target["boxes"]], None if labels is None else [labels])
    category_ids = torch.tensor(dataset.category_ids, dtype=torch.int64)[target["labels"]]
    return out.given_boxes(), category_ids.to(out.labels.device)


def evaluate(model, out_dir: str | Path, *,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Mask and box AP of ``model`` (a :class:`frozenseg.MaskFrozenDETR`) on its recipe's
    val split, with its recipe's ``eval`` settings: writes ``results.json`` (COCO results,
    RLE) and ``metrics.json`` in ``out_dir`` and returns the metrics."""
    recipe = model.recipe
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split, settings = recipe.data.val, recipe.eval
    dataset = CocoInstances(split.images, split.annotations,
                            transform=eval_transform(recipe.data.scale))
    was_training = model.head.training
    model.eval()
    with ResultsWriter(out / "results.json") as writer:
        for _, image_results in predict(
                model, dataset, batch_size=recipe.train.batch_size,
                score_threshold=settings.score_threshold, max_per_image=settings.max_per_image,
                mask_threshold=settings.mask_threshold, boxes=settings.boxes, progress=progress):
            writer.write(image_results)
    model.head.train(was_training)
    metrics = coco_evaluate(dataset.annotations_json, out / "results.json")
    write_metrics(metrics, out / "metrics.json")
    return metrics
