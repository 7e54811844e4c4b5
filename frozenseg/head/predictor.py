"""``Predictor``: masks for one image at a time, at the image's own size.

In the style of segment-anything's predictor: ``set_image`` runs the detector's backbone
and encoder once; ``predict`` then decodes the detector's own detections, or any boxes
given, and runs the mask head, as often as wanted on the same encoding::

    predictor = Predictor(MaskFrozenDETR.from_pretrained("runs/x/best.pt"))
    predictor.set_image(image)                   # numpy HxWx3 uint8, PIL, or a tensor
    found = predictor.predict()                  # the detector's detections
    mine = predictor.predict(boxes=[[10, 20, 200, 180]])   # masks for these boxes
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from frozenseg.data.common import image_to_tensor
from frozenseg.data.images import to_rgb
from frozenseg.head.results import original_boxes, original_masks, original_to_view_scale
from frozenseg.head.segmenter import MaskFrozenDETR


@dataclass
class Prediction:
    """N instances of one image, best score first; pixels are the image's own.

    masks         (N, H, W) bool
    boxes         (N, 4) float xyxy, the boxes the masks were made for
    scores        (N,) detector score x mask quality (given boxes: the mask quality)
    labels        (N,) the detector's class index
    mask_quality  (N,) predicted IoU of each mask, or None for a head without mask scoring
    """

    masks: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    mask_quality: Tensor | None

    def __len__(self) -> int:
        return len(self.scores)


class Predictor:
    """Masks for one image: the detector runs once per ``set_image``."""

    def __init__(self, model: MaskFrozenDETR, *, mask_threshold: float = 0.5) -> None:
        self.model, self.mask_threshold = model.eval(), mask_threshold
        self._encoding = None
        self._image_size = self._view_size = None

    def set_image(self, image: np.ndarray | Tensor | Image.Image) -> None:
        """``image``: numpy (H, W, 3) uint8 RGB (or float in [0, 1]), a PIL image, or a
        tensor (3, H, W) float in [0, 1] or uint8. Any size: it is resized to the
        detector's input as in evaluation."""
        pixels = as_image_tensor(image)
        self._image_size = tuple(pixels.shape[-2:])
        view, _ = self.model.view(pixels)
        self._view_size = tuple(view.shape[-2:])
        self._encoding = self.model.detector.encode([view.to(self.model.device)])

    @torch.no_grad()
    def predict(self, boxes: Tensor | Sequence | None = None,
                labels: Tensor | Sequence[int] | None = None, *,
                score_threshold: float = 0.0, max_instances: int | None = None) -> Prediction:
        """Masks for the detector's detections, or for ``boxes`` ((N, 4) xyxy pixels of the
        image given to ``set_image``) with optional detector class ``labels``. Instances
        scoring below ``score_threshold`` are dropped, the rest sorted best first."""
        if self._encoding is None:
            raise RuntimeError("call set_image(image) before predict()")
        detector = self.model.detector
        if boxes is None:
            found = detector.detect(self._encoding)
        else:
            found = self._embedded(boxes, labels)
        masks = self.model.head(found)
        keep = masks.scores >= score_threshold
        index = keep.nonzero().flatten()
        index = index[masks.scores[index].float().argsort(descending=True, stable=True)]
        index = index[:max_instances]
        boxes_px = original_boxes(masks, index, self._view_size, self._image_size)
        chunks = list(original_masks(masks, index, boxes_px, self._view_size,
                                     self._image_size, self.mask_threshold))
        pasted = torch.cat(chunks) if chunks else torch.zeros(
            0, *self._image_size, dtype=torch.bool, device=boxes_px.device)
        quality = None if masks.iou_logits is None else masks.iou_logits[index].float().sigmoid()
        return Prediction(masks=pasted, boxes=boxes_px, scores=masks.scores[index].float(),
                          labels=found.labels[masks.batch_index, masks.query_index][index],
                          mask_quality=quality)

    def _embedded(self, boxes, labels):
        device = self.model.device
        boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        to_view = original_to_view_scale(self._view_size, self._image_size)
        given = None if labels is None else [torch.as_tensor(labels, dtype=torch.long,
                                                             device=device).reshape(-1)]
        if given is not None and len(given[0]) != len(boxes):
            raise ValueError(f"{len(given[0])} labels for {len(boxes)} boxes")
        found = self.model.detector.embed(self._encoding, [(boxes * to_view).float().to(device)],
                                          given)
        return found.given_boxes()


def as_image_tensor(image: np.ndarray | Tensor | Image.Image) -> Tensor:
    """(3, H, W) float in [0, 1] from what people hold an image in."""
    if isinstance(image, Image.Image):
        return image_to_tensor(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array has shape {image.shape}, expected (H, W, 3) RGB")
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: may be read-only
    elif isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor has shape {tuple(image.shape)}, expected "
                             "(3, H, W)")
        pixels = image
    else:
        raise TypeError(f"image is a {type(image).__name__}: expected a numpy array, a "
                        "tensor or a PIL image")
    if pixels.dtype == torch.uint8:
        return pixels.float().div_(255)
    if not pixels.is_floating_point():
        raise ValueError(f"image is {pixels.dtype}: expected uint8, or float in [0, 1]")
    return pixels.float()
