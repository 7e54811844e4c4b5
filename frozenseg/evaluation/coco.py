"""COCO box and mask AP with pycocotools, quietly; tables and a metrics file.

``coco_evaluate`` returns::

    {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"},   # percent
     "segm": {...},
     "per_class": {"bbox": {category name: AP}, "segm": {...}}}

The numbers are pycocotools' ``stats[0:6] * 100`` (COCOeval.summarize). Where pycocotools
says -1 (no ground truth in that area range, or of that class, among the images
evaluated) the value is NaN; ``write_metrics`` writes it as null. Empty results are
scored, not skipped: 0 wherever there is ground truth.

As detectron2 does, mask AP is computed from results stripped of their ``bbox``: given
a bbox, pycocotools' ``loadRes`` would take the box area as the detection's area, so
the small/medium/large split of mask AP would follow boxes instead of masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.markup import escape
from rich.table import Table

from frozenseg.files import atomic_write_text

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
# What each IoU type reads from a result (besides image_id, category_id, score).
_GEOMETRY = {"bbox": "bbox", "segm": "segmentation"}


def coco_evaluate(annotations: str | os.PathLike | COCO, results: str | os.PathLike | list,
                  iou_types: Sequence[str] = IOU_TYPES, *,
                  image_ids: Iterable[int] | None = None) -> dict:
    """COCO AP of ``results`` against ``annotations`` (see the module docstring).

    annotations: a COCO instances json, or a loaded pycocotools ``COCO``.
    results: a list of COCO result dicts (``bbox`` [x, y, w, h] original pixels;
    ``segmentation`` compressed RLE), or the path of a results json array.
    image_ids: evaluate only these images (default: every image of ``annotations``);
    results on other images are ignored.
    """
    unknown = set(iou_types) - set(IOU_TYPES)
    if unknown:
        raise ValueError(f"unknown iou_types {sorted(unknown)} (known: {list(IOU_TYPES)})")
    gt = load_ground_truth(annotations)
    detections = _load_results(results)
    ids = _image_ids(gt, detections, image_ids)
    kept = set(ids)
    detections = [d for d in detections if d["image_id"] in kept]
    metrics: dict[str, Any] = {"per_class": {}}
    for iou_type in iou_types:
        coco_eval = _run(gt, _detections_object(gt, detections, iou_type), iou_type, ids)
        metrics[iou_type] = {name: _percent(v)
                             for name, v in zip(METRIC_NAMES, coco_eval.stats[:6], strict=True)}
        metrics[iou_type]["best_f1"] = best_f1(coco_eval)
        metrics["per_class"][iou_type] = _per_class(gt, coco_eval)
    return metrics


def load_ground_truth(annotations: str | os.PathLike | COCO) -> COCO:
    """A pycocotools COCO for a json path (loaded without pycocotools' prints), or as is."""
    if isinstance(annotations, COCO):
        return annotations
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotations file")
    with _quiet():
        return COCO(str(path))


def _load_results(results: str | os.PathLike | list) -> list[dict]:
    if isinstance(results, list):
        return results
    with open(results) as f:
        loaded = json.load(f)
    if not isinstance(loaded, list):
        raise ValueError(f"{results}: a COCO results file is a JSON array of results")
    return loaded


def _image_ids(gt: COCO, detections: list[dict], image_ids: Iterable[int] | None) -> list[int]:
    """The images to evaluate, checked against the ground truth (and the results' ids)."""
    known = set(gt.getImgIds())
    strangers = {d["image_id"] for d in detections} - known
    if strangers:
        raise ValueError(f"results name image ids not in the annotations: "
                         f"{sorted(strangers)[:10]}")
    if image_ids is None:
        return sorted(known)
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise ValueError("image_ids is empty: nothing to evaluate")
    if not set(ids) <= known:
        raise ValueError(f"image_ids not in the annotations: {sorted(set(ids) - known)[:10]}")
    return ids


def _detections_object(gt: COCO, detections: list[dict], iou_type: str) -> COCO:
    """A pycocotools results COCO holding only what ``iou_type`` reads of each result."""
    field = _GEOMETRY[iou_type]
    if any(field not in d for d in detections):
        raise ValueError(f"{iou_type} AP needs '{field}' in every result")
    anns = [{"image_id": d["image_id"], "category_id": d["category_id"], "score": d["score"],
             field: d[field]} for d in detections]
    with _quiet():
        if anns:
            return gt.loadRes(anns)
        # loadRes fails on an empty list (it reads anns[0]): build the empty object by hand.
        empty = COCO()
        empty.dataset = {"images": list(gt.dataset["images"]),
                         "categories": list(gt.dataset["categories"]), "annotations": []}
        empty.createIndex()
        return empty


def _run(gt: COCO, dt: COCO, iou_type: str, image_ids: list[int]) -> COCOeval:
    coco_eval = COCOeval(gt, dt, iou_type)
    coco_eval.params.imgIds = image_ids
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def best_f1(coco_eval: COCOeval) -> dict[str, float | None]:
    """The score threshold whose detections have the best F1 at IoU 0.5 (all areas, all
    classes pooled, pycocotools' own matches and crowd handling), with that F1, precision
    and recall: a threshold for showing results that the data chose, not a guess.
    {"score": None, ...} when there is nothing to match."""
    all_areas = coco_eval.params.areaRng[0]
    matched, scores, targets = [], [], 0
    for image in coco_eval.evalImgs:
        if image is None or image["aRng"] != all_areas:
            continue
        kept = ~np.asarray(image["dtIgnore"][0], dtype=bool)
        matched.append(np.asarray(image["dtMatches"][0])[kept] > 0)
        scores.append(np.asarray(image["dtScores"])[kept])
        targets += int((np.asarray(image["gtIgnore"]) == 0).sum())
    scores = np.concatenate(scores) if scores else np.zeros(0)
    if not (targets and scores.size):
        return {"score": None, "f1": None, "precision": None, "recall": None}
    order = np.argsort(-scores, kind="stable")
    scores, true = scores[order], np.concatenate(matched)[order]
    last_of_score = np.append(scores[1:] != scores[:-1], True)  # ties enter together
    tp = np.cumsum(true)[last_of_score]
    shown = (np.nonzero(last_of_score)[0] + 1)
    precision, recall = tp / shown, tp / targets
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return {"score": float(scores[last_of_score][best]), "f1": float(f1[best]),
            "precision": float(precision[best]), "recall": float(recall[best])}


def _per_class(gt: COCO, coco_eval: COCOeval) -> dict[str, float]:
    """{category name: AP (%)}, IoU 0.50:0.95, all areas, 100 detections (as stats[0])."""
    precision = coco_eval.eval["precision"]  # (T IoUs, R recalls, K classes, A areas, M dets)
    result = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        ap = float(np.mean(values)) if values.size else -1.0
        result[gt.cats[cat_id]["name"]] = _percent(ap)
    return result


def _percent(value: float) -> float:
    return float(value) * 100 if value >= 0 else math.nan


@contextlib.contextmanager
def _quiet():
    """Swallow what pycocotools prints (it prints on every load and evaluation)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ----------------------------------------------------------------------------- reporting


def metrics_table(metrics: dict) -> Table:
    """One row per IoU type in ``metrics`` (bbox, segm), columns AP ... APl in percent."""
    table = Table(title="COCO AP (%)")
    table.add_column("")
    for name in METRIC_NAMES:
        table.add_column(name, justify="right")
    for iou_type in IOU_TYPES:
        if iou_type in metrics:
            table.add_row(iou_type, *(metric_cell(metrics[iou_type][n]) for n in METRIC_NAMES))
    return table


def per_class_table(metrics: dict, iou_type: str) -> Table:
    """The AP of each category for ``iou_type`` ("bbox" or "segm"), in percent."""
    per_class = metrics.get("per_class", {}).get(iou_type)
    if per_class is None:
        raise ValueError(f"no per-class {iou_type} AP in these metrics")
    table = Table(title=f"{iou_type} AP per category (%)")
    table.add_column("category")
    table.add_column("AP", justify="right")
    for name, ap in per_class.items():
        table.add_row(escape(name), metric_cell(ap))  # the dataset's names: not markup
    return table


def metric_cell(value: float) -> str:
    """A metric (percent) for a table: one decimal, "-" for NaN (undefined)."""
    return "-" if math.isnan(value) else f"{value:.1f}"


def write_metrics(metrics: dict, path: str | os.PathLike) -> None:
    """``metrics`` as JSON at ``path`` (NaN as null), atomically: a temp name, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_nan_to_none(metrics), indent=2, allow_nan=False) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
