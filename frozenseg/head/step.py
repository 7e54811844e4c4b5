"""One training step of the head: proposals, head forward, losses.

Proposals (recipe ``loss.proposals``): the detector's top-K boxes, each learning the mask
of the ground-truth instance it overlaps most when that IoU >= ``assign_iou`` (crowd
instances are never targets; unassigned proposals get no mask loss, as in Mask R-CNN);
and/or the ground-truth boxes themselves, jittered, with the detector's queries for
them (FrozenDetector.detect_and_embed, or the cache's ground-truth queries).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from frozenseg.boxes import to_normalized
from frozenseg.cache.training import TrainingBatch
from frozenseg.detector.output import DetectorOutput, append_queries, stack_padded
from frozenseg.head.loss import assign_proposals, jitter_boxes


@dataclass
class Proposals:
    """The head's input with the queries to train on: keep (B, K) bool marks them and
    gt_index (B, K) long names each one's ground-truth instance in its image (-1: none)."""

    output: DetectorOutput
    keep: torch.Tensor
    gt_index: torch.Tensor


def detector_proposals(output: DetectorOutput, targets: list[dict],
                       assign_iou: float) -> Proposals:
    """The top-K detections, assigned to ground truth by box IoU."""
    boxes = output.boxes_xyxy_pixels()
    gt_index = torch.stack([
        assign_proposals(boxes[b], t["boxes"].to(boxes), t["iscrowd"].to(boxes.device),
                         assign_iou) for b, t in enumerate(targets)])
    return Proposals(output, output.query_mask & (gt_index >= 0), gt_index)


def ground_truth_proposals(output: DetectorOutput, targets: list[dict], jitter: float,
                           generator: torch.Generator | None) -> Proposals:
    """The ground-truth boxes (queries in target order), each moved by up to ``jitter`` of
    its size; crowd instances are left out."""
    boxes = output.boxes.clone()
    keep = output.query_mask.clone()
    for b, t in enumerate(targets):
        n, size = len(t["boxes"]), t["size"].tolist()
        if n and jitter > 0:
            moved = jitter_boxes(t["boxes"].float(), size, scale=jitter, generator=generator)
            boxes[b, :n] = to_normalized(moved, size).to(boxes)
        keep[b, :n] &= ~t["iscrowd"].to(keep.device).bool()
    gt_index = torch.arange(boxes.shape[1], device=boxes.device).expand(len(targets), -1)
    return Proposals(replace(output, boxes=boxes), keep, gt_index.clone())


def proposals(batch: TrainingBatch, mode: str, *, assign_iou: float, jitter: float,
              generator: torch.Generator | None = None) -> Proposals:
    """``mode``: "detector" | "gt" | "both" (detections first, then ground truth)."""
    if mode == "detector":
        return detector_proposals(batch.detections, batch.targets, assign_iou)
    truth = ground_truth_proposals(batch.ground_truth, batch.targets, jitter, generator)
    if mode == "gt":
        return truth
    found = detector_proposals(batch.detections, batch.targets, assign_iou)
    return Proposals(append_queries(found.output, truth.output),
                     torch.cat([found.keep, truth.keep], 1),
                     torch.cat([found.gt_index, truth.gt_index], 1))


def with_c1(batch: TrainingBatch, detector) -> TrainingBatch:
    """Fill in c1 (the backbone's stride-4 map) when the cache did not store it: each image
    alone, as the cache ran the rest of the detector, then zero-padded into a batch."""
    if batch.detections.c1.numel():
        return batch
    c1 = stack_padded([detector.stage1([image[:, : int(t["size"][0]), : int(t["size"][1])]])
                       for image, t in zip(batch.images, batch.targets, strict=True)])
    return replace(batch, detections=replace(batch.detections, c1=c1),
                   ground_truth=replace(batch.ground_truth, c1=c1))


def head_losses(batch: TrainingBatch, detector, head, criterion, *, mode: str,
                assign_iou: float, jitter: float,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The losses of one batch (see :class:`frozenseg.head.loss.MaskCriterion`)."""
    device = detector.device
    batch = replace(batch, detections=batch.detections.to(device),
                    ground_truth=batch.ground_truth.to(device))
    batch = with_c1(batch, detector)
    chosen = proposals(batch, mode, assign_iou=assign_iou, jitter=jitter, generator=generator)
    out = head(chosen.output, chosen.keep)
    gt_index = chosen.gt_index[out.batch_index, out.query_index]
    return criterion(out.mask_logits, out.iou_logits, out.boxes, out.batch_index, gt_index,
                     [t["masks"] for t in batch.targets], out.frame, generator=generator)
