"""Panoptic quality (PQ) and semantic mIoU, as streaming accumulators; tables.

Panoptic quality (Kirillov et al., "Panoptic Segmentation"), counted per category as the
COCO panopticapi's ``pq_compute`` does:

* a predicted and a ground-truth segment of the same category *match* (one TP, its IoU
  added to the category's IoU sum) when IoU > 0.5; the union leaves out the predicted
  pixels that fall on VOID. IoU > 0.5 makes matches unique.
* unmatched non-crowd GT segments are FN; crowd GT segments are never matched, never FN.
* an unmatched predicted segment is FP unless more than half of its pixels lie on VOID or
  on a crowd GT region of its own category.
* per category: PQ = IoU sum / (TP + FP/2 + FN/2) = SQ x RQ, SQ = IoU sum / TP (0 if no
  TP), RQ = TP / (TP + FP/2 + FN/2).
* PQ, SQ and RQ over all/thing/stuff categories are means of the per-category values over
  categories with TP + FP + FN > 0 (absent categories are left out; NaN if none is left).

Segment id maps are (H, W) integer arrays or tensors (a COCO panoptic PNG gives one
through :func:`frozenseg.data.panoptic.rgb_to_id`); a segment list is COCO panoptic's
``segments_info``: dicts with "id", "category_id" and optionally "iscrowd". GT pixels
whose id no GT segment lists (0 included) are VOID. Predicted pixels with id 0 are
unassigned (VOID); any other id must be listed, and every listed predicted segment must
have pixels (panopticapi's checks).

One difference from panopticapi: it measures GT areas from its json; here they are
measured on the map (the PNG is the truth they were measured on, as in
:mod:`frozenseg.data.panoptic`). Where an image has several crowd regions of one
category, all of them excuse predicted pixels (panopticapi keeps only the last one).

Semantic IoU: a confusion matrix over K classes, pixels whose GT is ``ignore_index`` not
counted. IoU_k = TP / (TP + FP + FN); mIoU over classes present in the GT or the
prediction; pixel accuracy = correct / counted pixels; mean accuracy over GT classes.

Every figure is in percent (as :mod:`frozenseg.evaluation.coco`'s AP), NaN where
undefined (``write_metrics`` writes NaN as null).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

from frozenseg.evaluation.coco import metric_cell

OFFSET = 256**3  # > every segment id (three 8-bit channels), so gt * OFFSET + pred is a pair
PQ_GROUPS = ("all", "things", "stuff")


# ----------------------------------------------------------------------------- panoptic


class PanopticQuality:
    """Streaming PQ: :meth:`update` once per image, then :meth:`compute`.

    categories: COCO panoptic "categories", each {"id", "name", "isthing"}. Memory is
    four numbers per category, whatever the number of images.
    """

    def __init__(self, categories: Sequence[Mapping]) -> None:
        self.category_ids = [int(c["id"]) for c in categories]
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError("panoptic categories have a duplicate 'id'")
        self.names = [str(c.get("name", c["id"])) for c in categories]
        self.isthing = np.array([bool(c["isthing"]) for c in categories])
        self.index = {cid: k for k, cid in enumerate(self.category_ids)}
        self.reset()

    def reset(self) -> None:
        k = len(self.category_ids)
        self.tp = np.zeros(k, np.int64)
        self.fp = np.zeros(k, np.int64)
        self.fn = np.zeros(k, np.int64)
        self.iou_sum = np.zeros(k, np.float64)

    def update(self, pred_ids_map, pred_segments: Sequence[Mapping],
               gt_ids_map, gt_segments: Sequence[Mapping]) -> None:
        """Count one image: id maps (H, W) of the same shape, segment lists as COCO's."""
        gt_map = _ids(gt_ids_map)
        pred_map = _ids(pred_ids_map).to(gt_map.device)
        if gt_map.shape != pred_map.shape:
            raise ValueError(f"prediction id map {tuple(pred_map.shape)} is not the size of "
                             f"the ground truth's {tuple(gt_map.shape)}")
        gt = self._segments(gt_segments, "ground truth")
        pred = self._segments(pred_segments, "prediction")
        overlaps = _overlaps(gt_map, pred_map, gt, pred)
        gt_area, pred_area = _areas(overlaps)
        for pid in pred:
            if pred_area.get(pid, 0) == 0:
                raise ValueError(f"predicted segment {pid} is listed but has no pixels")
        matched_gt, matched_pred = self._count_matches(overlaps, gt, pred, gt_area, pred_area)
        self._count_false_negatives(gt, matched_gt)
        self._count_false_positives(overlaps, gt, pred, pred_area, matched_pred)

    def _segments(self, segments: Sequence[Mapping], side: str) -> dict[int, tuple[int, bool]]:
        """{segment id: (category index, iscrowd)}, checked."""
        result = {}
        for seg in segments:
            sid, cid = int(seg["id"]), int(seg["category_id"])
            if cid not in self.index:
                raise ValueError(f"{side} segment {sid}: unknown category_id {cid}")
            if sid in result or sid == 0:
                raise ValueError(f"{side} segment id {sid} is 0 or listed twice")
            result[sid] = (self.index[cid], bool(seg.get("iscrowd", 0)))
        return result

    def _count_matches(self, overlaps, gt, pred, gt_area, pred_area):
        matched_gt, matched_pred = set(), set()
        for (gid, pid), inter in overlaps.items():
            if gid not in gt or pid not in pred or gt[gid][1] or gt[gid][0] != pred[pid][0]:
                continue
            # Predicted pixels on VOID are left out of the union (panopticapi).
            union = pred_area[pid] + gt_area[gid] - inter - overlaps.get((0, pid), 0)
            iou = inter / union
            if iou > 0.5:
                self.tp[gt[gid][0]] += 1
                self.iou_sum[gt[gid][0]] += iou
                matched_gt.add(gid)
                matched_pred.add(pid)
        return matched_gt, matched_pred

    def _count_false_negatives(self, gt, matched_gt) -> None:
        for gid, (k, crowd) in gt.items():
            if gid not in matched_gt and not crowd:
                self.fn[k] += 1

    def _count_false_positives(self, overlaps, gt, pred, pred_area, matched_pred) -> None:
        crowds: dict[int, list[int]] = {}
        for gid, (k, crowd) in gt.items():
            if crowd:
                crowds.setdefault(k, []).append(gid)
        for pid, (k, _) in pred.items():
            if pid in matched_pred:
                continue
            ignored = overlaps.get((0, pid), 0)
            ignored += sum(overlaps.get((gid, pid), 0) for gid in crowds.get(k, ()))
            if ignored / pred_area[pid] <= 0.5:  # mostly on VOID/crowd: not counted
                self.fp[k] += 1

    def compute(self) -> dict:
        """{"all" | "things" | "stuff": {"PQ", "SQ", "RQ", "n"}, "per_class": {name: {"PQ",
        "SQ", "RQ", "TP", "FP", "FN"}}}, figures in percent, NaN where undefined."""
        pq, sq, rq = _per_class_quality(self.tp, self.fp, self.fn, self.iou_sum)
        present = (self.tp + self.fp + self.fn) > 0
        result: dict = {}
        for group, members in zip(PQ_GROUPS, (np.ones_like(present), self.isthing,
                                              ~self.isthing), strict=True):
            used = present & members
            result[group] = {"PQ": _mean_percent(pq[used]), "SQ": _mean_percent(sq[used]),
                             "RQ": _mean_percent(rq[used]), "n": int(used.sum())}
        result["per_class"] = {
            name: {"PQ": _percent_or_nan(pq[k], present[k]),
                   "SQ": _percent_or_nan(sq[k], present[k]),
                   "RQ": _percent_or_nan(rq[k], present[k]),
                   "TP": int(self.tp[k]), "FP": int(self.fp[k]), "FN": int(self.fn[k])}
            for k, name in enumerate(self.names)}
        return result


def _ids(ids_map) -> torch.Tensor:
    """An (H, W) id map (numpy or torch, any integer dtype) as an int64 tensor."""
    ids = torch.as_tensor(np.asarray(ids_map) if not torch.is_tensor(ids_map) else ids_map)
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"a segment id map is an (H, W) integer array, not "
                         f"{tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def _overlaps(gt_map: torch.Tensor, pred_map: torch.Tensor, gt: dict,
              pred: dict) -> dict[tuple[int, int], int]:
    """{(gt id, pred id): pixel count} with unlisted GT ids turned into VOID (0)."""
    listed = torch.tensor(sorted(gt), dtype=torch.int64, device=gt_map.device)
    gt_map = torch.where(torch.isin(gt_map, listed), gt_map, 0)
    known = torch.tensor([0, *sorted(pred)], dtype=torch.int64, device=pred_map.device)
    stray = pred_map[~torch.isin(pred_map, known)]
    if stray.numel():
        raise ValueError(f"prediction id map has segment id {int(stray[0])}, which no "
                         "predicted segment lists")
    pairs, counts = torch.unique(gt_map * OFFSET + pred_map, return_counts=True)
    return {(int(p) // OFFSET, int(p) % OFFSET): int(c)
            for p, c in zip(pairs.tolist(), counts.tolist(), strict=True)}


def _areas(overlaps: dict[tuple[int, int], int]) -> tuple[dict[int, int], dict[int, int]]:
    gt_area: dict[int, int] = {}
    pred_area: dict[int, int] = {}
    for (gid, pid), count in overlaps.items():
        gt_area[gid] = gt_area.get(gid, 0) + count
        pred_area[pid] = pred_area.get(pid, 0) + count
    return gt_area, pred_area


def _per_class_quality(tp, fp, fn, iou_sum):
    """Per-category PQ, SQ, RQ as fractions (0 where the denominator is 0)."""
    denominator = tp + 0.5 * fp + 0.5 * fn
    safe = np.maximum(denominator, 1e-12)
    pq = np.where(denominator > 0, iou_sum / safe, 0.0)
    sq = np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0)
    rq = np.where(denominator > 0, tp / safe, 0.0)
    return pq, sq, rq


# ----------------------------------------------------------------------------- semantic


class SemanticIoU:
    """Streaming semantic segmentation scores from a (K, K) confusion matrix (GT rows).

    :meth:`update` with predicted and GT label maps of one shape ((H, W) or (B, H, W),
    class indices in [0, K)); GT pixels equal to ``ignore_index`` are not counted.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.names = list(class_names) if class_names is not None else \
            [str(k) for k in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred, gt) -> None:
        """Add one image (or batch) of label maps; pred must be in [0, K) where GT counts."""
        pred, gt = torch.as_tensor(pred), torch.as_tensor(gt).to(torch.as_tensor(pred).device)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth "
                             f"{tuple(gt.shape)} differ in shape")
        counted = gt != self.ignore_index
        pred, gt = pred[counted].long(), gt[counted].long()
        k = self.num_classes
        for side, labels in (("ground truth", gt), ("prediction", pred)):
            if labels.numel() and (labels.min() < 0 or labels.max() >= k):
                raise ValueError(f"{side} labels must be in [0, {k}) (or {self.ignore_index} "
                                 "in the ground truth)")
        pairs = torch.bincount(gt * k + pred, minlength=k * k).reshape(k, k)
        self.confusion += pairs.cpu()

    def compute(self) -> dict:
        """{"mIoU", "pixel_accuracy", "mean_accuracy", "per_class": {name: IoU}}, percent."""
        confusion = self.confusion.double()
        correct = confusion.diag()
        gt_total, pred_total = confusion.sum(1), confusion.sum(0)
        union = gt_total + pred_total - correct
        iou = torch.where(union > 0, correct / union.clamp(min=1), torch.nan)
        accuracy = torch.where(gt_total > 0, correct / gt_total.clamp(min=1), torch.nan)
        total = float(confusion.sum())
        return {
            "mIoU": _mean_percent(iou[union > 0].numpy()),
            "pixel_accuracy": 100 * float(correct.sum()) / total if total else math.nan,
            "mean_accuracy": _mean_percent(accuracy[gt_total > 0].numpy()),
            "per_class": {name: 100 * float(v) for name, v in zip(self.names, iou, strict=True)},
        }


def _mean_percent(values: np.ndarray) -> float:
    return 100 * float(np.mean(values)) if len(values) else math.nan


def _percent_or_nan(value: float, present: bool) -> float:
    return 100 * float(value) if present else math.nan


# ----------------------------------------------------------------------------- reporting


def panoptic_table(metrics: dict) -> Table:
    """PQ, SQ, RQ (%) and the category count for all, thing and stuff categories."""
    table = Table(title="Panoptic quality (%)")
    for column in ("", "PQ", "SQ", "RQ", "#categories"):
        table.add_column(column, justify="right" if column else "left")
    for group in PQ_GROUPS:
        row = metrics[group]
        table.add_row(group, *(metric_cell(row[c]) for c in ("PQ", "SQ", "RQ")), str(row["n"]))
    return table


def per_class_panoptic_table(metrics: dict) -> Table:
    """PQ, SQ, RQ (%) and TP/FP/FN of each category ("-" where it never occurred)."""
    table = Table(title="Panoptic quality per category (%)")
    table.add_column("category")
    for column in ("PQ", "SQ", "RQ", "TP", "FP", "FN"):
        table.add_column(column, justify="right")
    for name, row in metrics["per_class"].items():
        table.add_row(escape(name), *(metric_cell(row[c]) for c in ("PQ", "SQ", "RQ")),
                      *(str(row[c]) for c in ("TP", "FP", "FN")))
    return table


def semantic_table(metrics: dict, *, per_class: bool = False) -> Table:
    """mIoU, pixel and mean accuracy (%), then each class's IoU when ``per_class``."""
    table = Table(title="Semantic segmentation (%)")
    table.add_column("")
    table.add_column("value", justify="right")
    for name in ("mIoU", "pixel_accuracy", "mean_accuracy"):
        table.add_row(name, metric_cell(metrics[name]))
    if per_class:
        for name, iou in metrics["per_class"].items():
            table.add_row(f"IoU {escape(name)}", metric_cell(iou))
    return table
