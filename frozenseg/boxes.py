"""Box conventions, converted in one place.

Two forms travel through frozenseg: DETR's normalised ``(cx, cy, w, h)`` in [0, 1] of an
image's own (unpadded) size, which the detectors predict and the losses compare, and
absolute ``(x0, y0, x1, y1)`` pixels, which datasets, RoIAlign and results use.
``size`` is an image's ``(H, W)``: a pair, or a tensor (..., 2) broadcast against the
boxes' leading dimensions (one size per image of a batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_convert


def _scale(size: Sequence[int] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(W, H, W, H) in ``like``'s dtype and device, with one leading dim per size dim."""
    size = torch.as_tensor(size, device=like.device).to(like.dtype)
    height, width = size.unbind(-1)
    return torch.stack([width, height, width, height], -1)


def to_pixels(boxes: torch.Tensor, size: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(..., 4) normalised cxcywh -> xyxy pixels of an image of ``size``."""
    return box_convert(boxes, "cxcywh", "xyxy") * _scale(size, boxes)


def to_normalized(boxes: torch.Tensor, size: Sequence[int] | torch.Tensor, *,
                  clip: bool = False) -> torch.Tensor:
    """(..., 4) xyxy pixels -> cxcywh normalised by ``size``; ``clip``: first cut the
    boxes to the image."""
    scale = _scale(size, boxes)
    if clip:
        boxes = torch.minimum(boxes.clamp(min=0), scale)
    return box_convert(boxes, "xyxy", "cxcywh") / scale
