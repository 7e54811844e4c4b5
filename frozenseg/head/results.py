"""Head outputs -> COCO results (:mod:`frozenseg.evaluation.results`'s format)::

    {"image_id": int, "category_id": int (the dataset's original id),
     "bbox": [x, y, w, h] (ORIGINAL image pixels, clipped to the image, 2 decimals),
     "score": float, "segmentation": {"size": [H, W], "counts": str} (compressed RLE
     at the original size), "mask_quality": float (sigmoid of the predicted IoU;
     absent when the head has no mask scoring; 0, and the score 0, for an empty mask)}

Frames. The head works on the detector's input image (the "view": the evaluation
transform's plain resize of the original, ``target["size"]``), so its boxes are xyxy
pixels of the view. Because the view is a plain resize, original = view * (orig / size)
per axis (no crop, no flip). RoI-frame masks are pasted straight into the original
image with their boxes scaled that way: the RoI frame spans its box whatever the
resolution, so this is exact, and cheaper than pasting at the view size and resizing.
Image-frame masks (stride-4 maps of the padded batch) are upsampled to the view, then
resized bilinearly to the original size, both on probabilities
(:func:`frozenseg.head.paste.paste_image_frame_masks`); they are thresholded once, at
the end. Boxes are clipped to the image for ``bbox`` but pasted unclipped (the RoI
frame refers to the box the head saw).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from frozenseg.evaluation.results import encode_masks, is_empty
from frozenseg.head.network import HeadOutput
from frozenseg.head.paste import paste_image_frame_masks, paste_masks

# Pixels (masks x H x W, bool) pasted and RLE-encoded at once; bounds the memory used.
_CHUNK_PIXELS = 1 << 24


def image_predictions(head_output: HeadOutput, category_ids: Tensor, targets: Sequence[dict],
                      *, score_threshold: float = 0.0, max_per_image: int = 100,
                      mask_threshold: float = 0.5) -> list[list[dict]]:
    """COCO result dicts (see the module docstring) for each image of a batch.

    head_output: the head's masks for the batch (boxes xyxy pixels of each view).
    category_ids: (B, K) the dataset category id of each query
      (:meth:`frozenseg.detector.classes.ClassMapping.to_category_ids` of the detector's
      labels); -1 marks a class that is no category of the dataset: dropped.
    targets: B dicts with ``image_id``, ``orig_size`` (H, W) and ``size`` (H, W) of the view.
    Per image: masks scoring below ``score_threshold`` are dropped, the rest sorted by
    score (best first, ties in query order) and cut to ``max_per_image``; a pixel is in a
    mask where its pasted probability is >= ``mask_threshold``.
    Returns B lists of result dicts, in the order of ``targets``.
    """
    _check_frame(head_output)
    per_query = category_ids[head_output.batch_index, head_output.query_index]
    results = []
    for b, target in enumerate(targets):
        index = _selected(head_output, per_query, b, score_threshold, max_per_image)
        rles, quality = mask_results(head_output, index, target, mask_threshold)
        orig = _hw(target["orig_size"])
        boxes = _clipped_xywh(original_boxes(head_output, index, _hw(target["size"]), orig).cpu(),
                              orig)
        results.append([  # score = class score x mask quality: 0 for an empty mask
            _result(int(target["image_id"]), c, box, 0.0 if is_empty(rle) else score, rle, q)
            for c, box, score, rle, q in zip(per_query[index].tolist(), boxes,
                                             head_output.scores[index].float().tolist(),
                                             rles, quality, strict=True)])
    return results


def _check_frame(head_output: HeadOutput) -> None:
    if head_output.frame not in ("roi", "image"):
        raise ValueError(f"unknown mask frame {head_output.frame!r} (expected 'roi' or 'image')")


def _selected(head_output: HeadOutput, per_query: Tensor, b: int, score_threshold: float,
              max_per_image: int) -> Tensor:
    """(n,) indices into the N masks: image b's with a category, score >= threshold, best
    first, top n."""
    keep = (head_output.batch_index == b) & (per_query >= 0)
    keep &= head_output.scores >= score_threshold
    index = keep.nonzero().flatten()
    order = head_output.scores[index].float().argsort(descending=True, stable=True)
    return index[order[:max_per_image]]


def mask_results(head_output: HeadOutput, index: Tensor, target: dict,
                 mask_threshold: float = 0.5) -> tuple[list[dict], list[float | None]]:
    """RLEs at the original size and predicted IoUs (None without mask scoring) of the
    masks ``index`` (indices into the head's N masks, all of the image ``target``)."""
    _check_frame(head_output)
    orig, view = _hw(target["orig_size"]), _hw(target["size"])
    boxes = original_boxes(head_output, index, view, orig)
    masks = original_masks(head_output, index, boxes, view, orig, mask_threshold)
    rles = [rle for chunk in masks for rle in encode_masks(chunk)]
    if head_output.iou_logits is None:
        return rles, [None] * len(index)
    # An empty mask covers none of its object, whatever the head predicted for it.
    predicted = head_output.iou_logits[index].float().sigmoid().tolist()
    return rles, [0.0 if is_empty(rle) else q for rle, q in zip(rles, predicted, strict=True)]


def original_boxes(head_output: HeadOutput, index: Tensor, view: Sequence[int],
                   orig: Sequence[int]) -> Tensor:
    """(n, 4) xyxy boxes of the masks ``index`` in the original image's pixels."""
    scale = view_to_original_scale(view, orig)
    return head_output.boxes[index].float() * scale.to(head_output.boxes.device)


def _hw(size) -> tuple[int, int]:
    return int(size[0]), int(size[1])


def original_to_view_scale(view: Sequence[int], orig: Sequence[int]) -> Tensor:
    """(4,) float64 (sx, sy, sx, sy), sx = W_view / W_orig: xyxy original pixels -> the
    view's. In float64, so that boxes given in the original's pixels reach the head the
    same way from the export and from the Predictor."""
    sx, sy = view[1] / orig[1], view[0] / orig[0]
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float64)


def view_to_original_scale(view: Sequence[int], orig: Sequence[int]) -> Tensor:
    """(4,) float32 (sx, sy, sx, sy), sx = W_orig / W_view: xyxy view pixels -> original."""
    sx, sy = orig[1] / view[1], orig[0] / view[0]
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


def original_masks(head_output: HeadOutput, index: Tensor, boxes: Tensor, view: Sequence[int],
                   orig: Sequence[int], threshold: float) -> Iterator[Tensor]:
    """(n, H, W) bool masks at the original size, a bounded number of pixels at a time.

    boxes: (len(index), 4) xyxy in original pixels (used by RoI-frame masks only).
    """
    step = max(1, _CHUNK_PIXELS // max(orig[0] * orig[1], 1))
    for start in range(0, len(index), step):
        probs = head_output.mask_logits[index[start:start + step]].float().sigmoid()
        if head_output.frame == "roi":
            yield paste_masks(probs, boxes[start:start + step], orig, threshold)
        else:
            yield paste_image_frame_masks(probs, view, output_size=orig, threshold=threshold)


def _clipped_xywh(boxes: Tensor, orig: tuple[int, int]) -> list[list[float]]:
    """(n, 4) xyxy original pixels -> [x, y, w, h] lists clipped to the image, 2 decimals."""
    x0, x1 = boxes[:, 0::2].clamp(0, orig[1]).unbind(1)
    y0, y1 = boxes[:, 1::2].clamp(0, orig[0]).unbind(1)
    xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], 1).double()
    return [[round(v, 2) for v in box] for box in xywh.tolist()]


def _result(image_id: int, category_id: int, bbox: list[float], score: float, rle: dict,
            quality: float | None) -> dict:
    result = {"image_id": image_id, "category_id": int(category_id), "bbox": bbox,
              "score": score, "segmentation": rle}
    if quality is not None:
        result["mask_quality"] = quality
    return result
