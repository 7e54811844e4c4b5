"""Mask DINO post-processing: one image's final predictions -> instance, panoptic and
semantic results at the original image size (:mod:`frozenseg.maskdino.inference` runs
it over a dataset and evaluates).

Input frames (:mod:`frozenseg.maskdino.outputs`): per image, ``logits`` (Q, K) sigmoid class
logits (no background class), ``boxes`` (Q, 4) normalised cxcywh of the unpadded image, and
``masks`` (Q, h, w) logits on the stride-s grid (s = 4) of the padded batch.

Mask upsampling (:func:`upsample_masks`), on logits, bilinear, align_corners=False: crop
the grid to the ceil(H/s) x ceil(W/s) cells that cover the image (H, W), upsample x s,
crop to (H, W), then resize to the original image size. Official Mask DINO (detectron2's
``sem_seg_postprocess``, as Mask2Former) upsamples the whole padded grid before cropping:
the two differ only in the last s pixels of the image's bottom and right edges, where the
official reads the padding cells. Cropping first keeps an image's results independent of
the batch it came in. The evaluation view is a plain resize of the original, so normalised
boxes mean the same in both: pixels = normalised x original size.

Post-processing follows the official code (IDEA-Research/MaskDINO, ``maskdino.py``) and
its COCO panoptic config; :class:`InferenceSettings` holds the values:

* instance: top ``top_k`` = 100 (query, class) pairs by sigmoid score over Q x K; then, in
  panoptic datasets, only thing classes are kept (after the top-k, as the official); a
  pixel is in the mask where its logit > 0; score = class probability x the mean mask
  probability inside the mask; boxes = the predicted boxes in pixels (or, with
  ``instance_boxes="mask"``, the masks' bounding boxes).
* panoptic: a query is kept when its best sigmoid class probability is > 0.25
  (OBJECT_MASK_THRESHOLD); its score is then that class's entry of softmax(sigmoid / T),
  T = 0.06 (PANO_TRANSFORM_EVAL, PANO_TEMPERATURE; ``temperature=None`` keeps the sigmoid).
  Each pixel goes to the kept query of largest score x mask probability; query k's segment
  is those of its pixels where its mask probability >= 0.5, dropped when the pixels it won
  number fewer than 0.8 (OVERLAP_THRESHOLD) x its own mask's (probability >= 0.5) pixels
  (the official ratio: won pixels, not segment pixels, over the mask's). Stuff queries of
  one class merge into one segment; things stay apart; other pixels are 0 (void).
* semantic: sum over queries of class probability x mask probability, (K, H, W); class
  probabilities as for panoptic (softmax(sigmoid / T)), masks sigmoid; argmax is the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from frozenseg.boxes import to_pixels

TASKS = ("instance", "panoptic", "semantic")
_CHUNK_ELEMENTS = 1 << 24  # upsampled mask elements at once; bounds the transient memory


@dataclass(frozen=True)
class InferenceSettings:
    """Post-processing settings; defaults: official Mask DINO, COCO panoptic config."""

    top_k: int = 100
    object_mask_threshold: float = 0.25
    overlap_threshold: float = 0.8
    temperature: float | None = 0.06
    instance_boxes: str = "predicted"  # or "mask": the masks' bounding boxes
    mask_stride: int = 4

    def __post_init__(self) -> None:
        if self.instance_boxes not in ("predicted", "mask"):
            raise ValueError(f"instance_boxes must be 'predicted' or 'mask', not "
                             f"{self.instance_boxes!r}")
        if self.top_k < 1 or self.mask_stride < 1:
            raise ValueError("top_k and mask_stride must be at least 1")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be positive or None, not {self.temperature}")


# ----------------------------------------------------------------------------- one image


def upsample_masks(mask_logits: Tensor, image_size: Sequence[int],
                   output_size: Sequence[int] | None = None, *, stride: int = 4) -> Tensor:
    """(Q, h, w) logits on the stride grid of the padded batch -> (Q, H', W') float logits.

    image_size: (H, W) of the unpadded image (the view); output_size: (H', W'), default
    (H, W). See the module docstring for the steps; chunked over queries.
    """
    height, width = int(image_size[0]), int(image_size[1])
    rows, cols = -(-height // stride), -(-width // stride)
    if mask_logits.shape[-2] < rows or mask_logits.shape[-1] < cols:
        raise ValueError(f"mask grid {tuple(mask_logits.shape[-2:])} does not cover an image "
                         f"of {height}x{width} at stride {stride}")
    final = (height, width) if output_size is None else (int(output_size[0]),
                                                        int(output_size[1]))
    out = torch.empty(mask_logits.shape[0], *final, device=mask_logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(rows * cols * stride**2, final[0] * final[1], 1))
    for start in range(0, len(out), step):
        up = mask_logits[start:start + step, None, :rows, :cols].float()
        if stride > 1:
            up = F.interpolate(up, size=(rows * stride, cols * stride), mode="bilinear",
                               align_corners=False)[..., :height, :width]
        if final != (height, width):
            up = F.interpolate(up, size=final, mode="bilinear", align_corners=False)
        out[start:start + step] = up[:, 0]
    return out


def instance_inference(logits: Tensor, boxes: Tensor, mask_logits: Tensor, *,
                       isthing: Tensor | None = None, top_k: int = 100,
                       box_source: str = "predicted") -> dict[str, Tensor]:
    """Instances of one image: logits (Q, K), boxes (Q, 4) normalised cxcywh, mask_logits
    (Q, H, W) at the output size. isthing (K,) bool: keep only those classes (after top-k).

    Returns ``scores`` (N,), ``labels`` (N,) contiguous class indices, ``masks`` (N, H, W)
    bool, ``boxes`` (N, 4) xyxy pixels of the output size; best score first, N <= top_k.
    """
    num_classes = logits.shape[-1]
    scores, index = logits.float().sigmoid().flatten().topk(min(top_k, logits.numel()))
    queries, labels = index // num_classes, index % num_classes
    if isthing is not None:
        keep = isthing.to(labels.device)[labels]
        scores, queries, labels = scores[keep], queries[keep], labels[keep]
    masks = mask_logits[queries]
    binary = masks > 0
    scores = scores * _mean_inside(masks.sigmoid(), binary)
    if box_source == "mask":
        pixel_boxes = mask_boxes(binary)
    else:
        pixel_boxes = to_pixels(boxes[queries].float(), mask_logits.shape[-2:])
    order = scores.argsort(descending=True, stable=True)
    return {"scores": scores[order], "labels": labels[order], "masks": binary[order],
            "boxes": pixel_boxes[order]}


def _mean_inside(probs: Tensor, binary: Tensor) -> Tensor:
    """(N,) mean of (N, H, W) ``probs`` over each mask (0 for an empty mask), as official."""
    inside = binary.flatten(1).float()
    return (probs.flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)


def mask_boxes(masks: Tensor) -> Tensor:
    """(N, H, W) bool -> (N, 4) xyxy pixel edges around each mask; zeros for an empty one."""
    rows, cols = masks.any(2), masks.any(1)
    boxes = torch.stack([_first(cols), _first(rows), cols.shape[1] - _first(cols.flip(1)),
                         rows.shape[1] - _first(rows.flip(1))], -1).float()
    return boxes * rows.any(1, keepdim=True)


def _first(flags: Tensor) -> Tensor:
    return flags.float().argmax(1)  # index of the first True (0 when none)


def panoptic_inference(logits: Tensor, mask_logits: Tensor, isthing: Tensor, *,
                       object_mask_threshold: float = 0.25, overlap_threshold: float = 0.8,
                       temperature: float | None = 0.06) -> tuple[Tensor, list[dict]]:
    """Panoptic segmentation of one image (module docstring): logits (Q, K), mask_logits
    (Q, H, W) at the output size, isthing (K,) bool.

    Returns the id map (H, W) int32 (0: void) and its segments, in id order (1, 2, ...):
    {"id", "category_id": the contiguous class index, "isthing", "score" (for merged stuff,
    the best query's), "area": pixels}.
    """
    keep, scores, labels = _panoptic_queries(logits, object_mask_threshold, temperature)
    probs = mask_logits[keep].float().sigmoid()
    ids = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32, device=mask_logits.device)
    if len(probs) == 0:
        return ids, []
    owner = (scores[:, None, None] * probs).argmax(0)
    segments: list[dict] = []
    stuff: dict[int, dict] = {}  # class -> its (merged) segment
    for k, (score, label) in enumerate(zip(scores.tolist(), labels.tolist(), strict=True)):
        mask = _segment_mask(owner == k, probs[k] >= 0.5, overlap_threshold)
        if mask is None:
            continue
        thing = bool(isthing[label])
        if not thing and label in stuff:
            ids[mask] = stuff[label]["id"]
            stuff[label]["score"] = max(stuff[label]["score"], score)
            continue
        segments.append({"id": len(segments) + 1, "category_id": label, "isthing": thing,
                         "score": score})
        ids[mask] = len(segments)
        if not thing:
            stuff[label] = segments[-1]
    areas = torch.bincount(ids.flatten().long(), minlength=len(segments) + 1).tolist()
    for segment in segments:
        segment["area"] = areas[segment["id"]]
    return ids, segments


def _panoptic_queries(logits: Tensor, threshold: float, temperature: float | None):
    """Kept queries (Q,) bool, and their scores and classes (as official: kept on the
    sigmoid, scored on softmax(sigmoid / T) when a temperature is given)."""
    scores, labels = logits.float().sigmoid().max(-1)
    keep = scores > threshold
    scores, labels = _class_probs(logits, temperature).max(-1)
    return keep, scores[keep], labels[keep]


def _segment_mask(won: Tensor, own: Tensor, overlap_threshold: float) -> Tensor | None:
    """A query's segment: the pixels it won and holds at >= 0.5; None when it has none or
    won too few of its own mask's pixels."""
    mask = won & own
    won_area, own_area = int(won.sum()), int(own.sum())
    if won_area == 0 or own_area == 0 or not bool(mask.any()):
        return None
    return None if won_area / own_area < overlap_threshold else mask


def _class_probs(logits: Tensor, temperature: float | None) -> Tensor:
    """(Q, K) sigmoid probabilities, sharpened by softmax(p / T) when T is given."""
    probs = logits.float().sigmoid()
    return probs if temperature is None else F.softmax(probs / temperature, dim=-1)


def semantic_inference(logits: Tensor, mask_logits: Tensor, *,
                       temperature: float | None = 0.06) -> Tensor:
    """(K, H, W) class scores of one image: sum over the Q queries of class probability
    (Q, K) x mask probability (Q, H, W) (module docstring). argmax(0) is the label map."""
    return torch.einsum("qk,qhw->khw", _class_probs(logits, temperature),
                        mask_logits.float().sigmoid())


def postprocess_image(logits: Tensor, boxes: Tensor, masks: Tensor, image_size: Sequence[int],
                      output_size: Sequence[int], *, isthing: Tensor | None = None,
                      tasks: Sequence[str] = TASKS,
                      settings: InferenceSettings = InferenceSettings()) -> dict:
    """The ``tasks`` results of one image at ``output_size`` (the original size).

    logits (Q, K), boxes (Q, 4), masks (Q, h, w): the image's slice of the final
    :class:`~frozenseg.maskdino.outputs.Predictions`; image_size: its unpadded (H, W).
    isthing (K,) bool (default: every class a thing). Returns {"instance": dict of
    :func:`instance_inference`, "panoptic": (id map, segments), "semantic": (K, H, W)}.
    Only the queries a task can use are upsampled (all of them for semantic).
    """
    if isthing is None:
        isthing = torch.ones(logits.shape[-1], dtype=torch.bool)
    used = _used_queries(logits, tasks, settings)
    logits, boxes = logits[used], boxes[used]
    up = upsample_masks(masks[used], image_size, output_size, stride=settings.mask_stride)
    result: dict = {}
    if "instance" in tasks:
        # Top-k over the used queries = top-k over all: they include every top-k pair.
        thing_only = None if bool(isthing.all()) else isthing
        result["instance"] = instance_inference(logits, boxes, up, isthing=thing_only,
                                                top_k=settings.top_k,
                                                box_source=settings.instance_boxes)
    if "panoptic" in tasks:
        result["panoptic"] = panoptic_inference(
            logits, up, isthing, object_mask_threshold=settings.object_mask_threshold,
            overlap_threshold=settings.overlap_threshold, temperature=settings.temperature)
    if "semantic" in tasks:
        result["semantic"] = semantic_inference(logits, up, temperature=settings.temperature)
    return result


def _used_queries(logits: Tensor, tasks: Sequence[str], settings: InferenceSettings) -> Tensor:
    """Sorted indices of the queries the tasks read: top-k pairs' and panoptic-kept ones."""
    num_queries = logits.shape[0]
    used = torch.zeros(num_queries, dtype=torch.bool, device=logits.device)
    if "semantic" in tasks:
        used[:] = True
    if "instance" in tasks:
        top = logits.flatten().topk(min(settings.top_k, logits.numel())).indices
        used[top // logits.shape[-1]] = True
    if "panoptic" in tasks:
        used |= logits.float().sigmoid().amax(-1) > settings.object_mask_threshold
    return used.nonzero().flatten()
