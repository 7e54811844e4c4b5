"""Head outputs -> COCO results: per-image result dicts, and a streaming results file.

A result is one detection in the format of the COCO results json::

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

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from frozenseg.files import atomic_write_text
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
        boxes = _clipped_xywh(_original_boxes(head_output, index, target).cpu(),
                              _hw(target["orig_size"]))
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
    boxes = _original_boxes(head_output, index, target)
    masks = _original_masks(head_output, index, boxes, view, orig, mask_threshold)
    rles = [rle for chunk in masks for rle in encode_masks(chunk)]
    if head_output.iou_logits is None:
        return rles, [None] * len(index)
    # An empty mask covers none of its object, whatever the head predicted for it.
    predicted = head_output.iou_logits[index].float().sigmoid().tolist()
    return rles, [0.0 if is_empty(rle) else q for rle, q in zip(rles, predicted, strict=True)]


def is_empty(rle: dict) -> bool:
    return int(mask_utils.area(rle)) == 0


def _original_boxes(head_output: HeadOutput, index: Tensor, target: dict) -> Tensor:
    """(n, 4) xyxy boxes of the masks ``index`` in the original image's pixels."""
    scale = view_to_original_scale(_hw(target["size"]), _hw(target["orig_size"]))
    return head_output.boxes[index].float() * scale.to(head_output.boxes.device)


def _hw(size) -> tuple[int, int]:
    return int(size[0]), int(size[1])


def view_to_original_scale(view: Sequence[int], orig: Sequence[int]) -> Tensor:
    """(4,) float32 (sx, sy, sx, sy), sx = W_orig / W_view: xyxy view pixels -> original."""
    sx, sy = orig[1] / view[1], orig[0] / view[0]
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


def _original_masks(head_output: HeadOutput, index: Tensor, boxes: Tensor, view: tuple,
                    orig: tuple, threshold: float) -> Iterator[Tensor]:
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


def encode_masks(masks: Tensor) -> list[dict]:
    """(n, H, W) bool masks -> n COCO compressed RLEs {"size": [H, W], "counts": str}."""
    if len(masks) == 0:
        return []
    # (n, W, H) C-contiguous is (H, W, n) Fortran-contiguous: the layout pycocotools wants.
    array = masks.to(torch.uint8).transpose(1, 2).contiguous().cpu().numpy().transpose(2, 1, 0)
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


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


class ResultsWriter:
    """Streams a COCO results json array to ``path``, atomically; optionally resumable.

    ``with ResultsWriter(path) as w: w.write(results)`` writes each result as it comes
    (memory stays flat) to a temporary file beside ``path``; a clean exit renames it to
    ``path``. An exception inside the ``with`` leaves whatever was at ``path`` untouched.
    ``count`` is the number of results written.

    Resumable (``resume_key``: any JSON describing the job): the array grows in
    ``.NAME.partial`` beside ``path``, and ``w.checkpoint(progress)`` makes all written so
    far durable and records ``progress`` (any JSON) in ``.NAME.partial.json``. After an
    interruption the partial file stays; ``ResultsWriter(path, resume_key=<same>,
    resume=True)`` cuts it back to the last checkpoint (nothing is written twice) and
    ``w.progress`` says where to continue (None for a fresh start). Without ``resume``
    a waiting partial file is an error, so no interrupted work is thrown away silently.
    """

    def __init__(self, path: str | os.PathLike, *, resume_key: Any = None,
                 resume: bool = False) -> None:
        self.path = Path(path)
        self.resume_key, self.resume = resume_key, resume
        self.count, self.progress = 0, None
        self._file = None
        self._tmp: Path | None = None

    @property
    def _state(self) -> Path:
        return self._tmp.with_name(self._tmp.name + ".json")

    def __enter__(self) -> ResultsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_key is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                       dir=self.path.parent)
            self._tmp, self._file = Path(tmp), os.fdopen(fd, "wb")
        else:
            self._tmp = self.path.with_name(f".{self.path.name}.partial")
            if self._tmp.exists() and self._state.exists():
                self._reopen()
                return self
            self._file = open(self._tmp, "wb")  # closed in __exit__
        self._file.write(b"[")
        return self

    def _reopen(self) -> None:
        """Continue a partial file from its last checkpoint."""
        if not self.resume:
            raise ValueError(f"{self.path}: an interrupted run waits in {self._tmp}; resume it "
                             "(--resume) or delete it to start over")
        state = json.loads(self._state.read_text())
        if state["key"] != self.resume_key:
            changed = sorted(k for k in {**state["key"], **self.resume_key}
                             if state["key"].get(k) != self.resume_key.get(k))
            raise ValueError(f"{self.path}: the interrupted run in {self._tmp} had other "
                             f"settings ({', '.join(changed)}); delete it to start over")
        self._file = open(self._tmp, "r+b")  # closed in __exit__
        self._file.truncate(state["offset"])
        self._file.seek(state["offset"])
        self.count, self.progress = state["count"], state["progress"]

    def write(self, results: Iterable[dict]) -> None:
        """Append result dicts (JSON-serialisable; NaN or infinity raise ValueError)."""
        if self._file is None or self._file.closed:
            raise RuntimeError(f"{self.path}: ResultsWriter.write outside its 'with' block")
        if isinstance(results, dict):
            raise TypeError("ResultsWriter.write takes a list of result dicts, not one dict")
        for result in results:
            text = json.dumps(result, separators=(",", ":"), allow_nan=False)
            self._file.write((("\n," if self.count else "\n") + text).encode())
            self.count += 1

    def checkpoint(self, progress: Any) -> None:
        """Make everything written durable; a resumed run continues from here."""
        if self.resume_key is None:
            raise RuntimeError(f"{self.path}: checkpoint() needs a resumable ResultsWriter")
        self._sync()
        state = {"key": self.resume_key, "offset": self._file.tell(), "count": self.count,
                 "progress": progress}
        atomic_write_text(self._state, json.dumps(state))

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._file is None:
            return
        try:
            if exc_type is None:
                self._file.write(b"\n]\n")
                self._sync()
                self._file.close()
                os.replace(self._tmp, self.path)
                if self.resume_key is not None:
                    self._state.unlink(missing_ok=True)
        finally:
            self._file.close()
            if self.resume_key is None:  # already gone after a successful rename
                self._tmp.unlink(missing_ok=True)
