"""The mask head's losses: point-sampled BCE + dice, and the mask-IoU regression.

The loss lives outside the model (DETR's SetCriterion): :class:`MaskCriterion` takes
the head's named outputs and the ground truth and returns named losses, with the
weights in one place (:class:`MaskLossWeights`).

Points follow :mod:`frozenseg.losses` (PointRend's convention).

Frames (see :mod:`frozenseg.head.paste` for the pixel convention):

* "roi": an S x S map over a proposal's box (RoIAlign aligned=True); point (u, v)
  is the image point (x0 + u * (x1 - x0), y0 + v * (y1 - y0)).
* "image": an h x w map on the stride-s grid of the padded batch; point (u, v) is the
  image point (u * s * w, v * s * h).

Targets come from the full-resolution GT bitmap at those image points (bilinear on
the 0/1 mask, zero outside the image), so they are exact at any mask resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, roi_align

from frozenseg.head.paste import roi_points_to_image
from frozenseg.losses import (
    mask_loss,
    point_sample,
    sample_bitmaps,
    uncertain_point_coords,
    uniform_points,
)

FRAMES = ("roi", "image")


# ----------------------------------------------------------------------------- points


def frame_points_to_image(coords: torch.Tensor, frame: str, *, boxes: torch.Tensor | None = None,
                          map_size: Sequence[int] = (0, 0), stride: int = 4) -> torch.Tensor:
    """Normalised points of a "roi" or "image" frame map -> image pixels (N, P, 2).

    "roi" needs boxes (N, 4) xyxy pixels; "image" needs the map's (h, w) and stride.
    """
    if frame == "roi":
        return roi_points_to_image(coords, boxes)
    extent = coords.new_tensor([stride * map_size[1], stride * map_size[0]])
    return coords * extent


# ----------------------------------------------------------------------------- targets


def roi_mask_targets(masks: torch.Tensor, index: torch.Tensor, boxes: torch.Tensor,
                     size: Sequence[int], *, chunk: int = 16) -> torch.Tensor:
    """GT masks resampled into each proposal's frame: (N, h, w) bool.

    masks: (M, H, W) bool; index: (N,) long into M; boxes: (N, 4) xyxy pixels, the
    region the (h, w) grid spans. torchvision roi_align (aligned=True, adaptive
    sampling: the mean of the bitmap over each cell), thresholded >= 0.5 as detectron2's
    Mask R-CNN targets. Float copies of at most ``chunk`` GT masks at a time.
    """
    out = torch.zeros(len(index), *size, dtype=torch.bool, device=masks.device)
    # One zero pixel around the masks makes roi_align's edge clamping read zero off the
    # image, as bilinear with zero padding does (the shift moves the boxes with it).
    padded_boxes = boxes.float() + 1
    for ids in index.unique().split(chunk):
        sel = torch.isin(index, ids)
        local = torch.searchsorted(ids, index[sel]).float()
        bitmaps = F.pad(masks[ids].float(), (1, 1, 1, 1))[:, None]
        rois = torch.cat([local[:, None], padded_boxes[sel]], dim=1)
        soft = roi_align(bitmaps, rois, tuple(size), 1.0, 0, aligned=True)
        out[sel] = soft[:, 0] >= 0.5
    return out


def mask_iou(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of (mask_logits > 0) with bool targets, both (N, h, w) -> (N,) float.

    An empty union counts as IoU 0 (no evidence of a good mask).
    """
    pred = mask_logits.detach() > 0
    inter = (pred & targets).flatten(1).sum(1)
    union = (pred | targets).flatten(1).sum(1)
    return inter.float() / union.clamp(min=1).float()


def cell_centres(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(height * width, 2) normalised (x, y) centres of a height x width grid's cells,
    row-major; point_sample at them reads each cell's own value exactly."""
    ys = (torch.arange(height, device=like.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=like.device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1)


@dataclass
class MaskLossWeights:
    """Weights of the named losses, the one place they live.

    bce = dice = 1: Mask2Former's 5 / 5 is scaled against its class loss (weight 2) and
    its matching costs; here the class is the frozen detector's and only the mask terms
    and the IoU term train the head, so only their ratio matters (AdamW is nearly
    invariant to the overall scale), and 1 : 1 keeps Mask2Former's ratio.
    iou = 1: Mask Scoring R-CNN's weight for its MaskIoU L2 loss.
    """

    bce: float = 1.0
    dice: float = 1.0
    iou: float = 1.0


# ----------------------------------------------------------------------------- criterion


class MaskCriterion(nn.Module):
    """Named losses of the mask head on its positive proposals (Mask R-CNN style).

    Mask loss: point-sampled BCE + dice, num_points = point_fraction * h * w of each
    mask (the paper: a quarter of the mask's pixels), PointRend sampling with
    ``oversample`` and ``importance``; point_fraction 1 is the dense loss, on every cell
    centre of the mask (the paper's rows without sampled supervision). IoU loss: L2
    between sigmoid(iou_logits) and the IoU of the predicted mask (> 0) with the GT mask
    in the mask's own frame (Mask Scoring R-CNN's L2 regression; the target is computed
    without gradient, so nothing flows into the mask through it). Proposals with gt index
    -1 contribute nothing.
    """

    def __init__(self, *, weights: MaskLossWeights | None = None, point_fraction: float = 0.25,
                 oversample: float = 3.0, importance: float = 0.75, stride: int = 4) -> None:
        super().__init__()
        self.weights = weights or MaskLossWeights()
        self.point_fraction = point_fraction
        self.oversample = oversample
        self.importance = importance
        self.stride = stride

    def forward(self, mask_logits: torch.Tensor, iou_logits: torch.Tensor | None,
                boxes: torch.Tensor, batch_index: torch.Tensor, gt_index: torch.Tensor,
                gt_masks: Sequence[torch.Tensor], frame: str = "roi", *,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses for N proposals.

        mask_logits: (N, S, S) RoI frame or (N, h, w) stride-s image frame of the padded
        batch; iou_logits: (N,) or None; boxes: (N, 4) xyxy pixels of the input image
        (the RoI frame's boxes); batch_index: (N,) long; gt_index: (N,) long into that
        image's GT, -1 for none; gt_masks: per image (M_i, H_i, W_i) bool at input
        resolution, top-left in the padded batch (they may stay on the CPU: only the
        sampled targets move). Returns {"loss_mask_bce", "loss_mask_dice",
        "loss_mask_iou" (iou_logits given), "loss" (weighted sum)}.
        """
        if frame not in FRAMES:
            raise ValueError(f"frame is {frame!r}; one of {', '.join(FRAMES)}")
        pos = gt_index >= 0
        if not bool(pos.any()):
            return self._weighted(self._zero_losses(mask_logits, iou_logits))
        logits, boxes = mask_logits[pos], boxes[pos]
        batch_index, gt_index = batch_index[pos], gt_index[pos]
        losses = self._point_losses(logits, boxes, batch_index, gt_index, gt_masks, frame,
                                    generator)
        if iou_logits is not None:
            target = self._iou_targets(logits, boxes, batch_index, gt_index, gt_masks, frame)
            losses["loss_mask_iou"] = F.mse_loss(iou_logits[pos].sigmoid(), target)
        return self._weighted(losses)

    def _point_losses(self, logits, boxes, batch_index, gt_index, gt_masks, frame, generator):
        height, width = logits.shape[-2:]
        if self.point_fraction >= 1:  # no sampling (the paper's dense rows): every cell centre
            coords = cell_centres(height, width, logits)[None].expand(len(logits), -1, -1)
        else:
            num_points = max(1, int(self.point_fraction * height * width))
            coords = uncertain_point_coords(logits[:, None], num_points,
                                            oversample=self.oversample,
                                            importance=self.importance, generator=generator)
        point_logits = point_sample(logits[:, None], coords)[:, 0]
        points = frame_points_to_image(coords, frame, boxes=boxes, map_size=(height, width),
                                       stride=self.stride)
        targets = torch.zeros_like(point_logits)
        for b in batch_index.unique().tolist():
            sel, gt = batch_index == b, gt_masks[b]
            values = sample_bitmaps(gt, gt_index[sel].to(gt.device),
                                    points[sel].detach().to(gt.device))
            targets[sel] = values.to(targets)
        return mask_loss(point_logits, targets)

    def _iou_targets(self, logits, boxes, batch_index, gt_index, gt_masks, frame):
        size = logits.shape[-2:]
        if frame == "image":
            # The whole padded frame is every proposal's region.
            frame_box = boxes.new_tensor([0, 0, self.stride * size[1], self.stride * size[0]])
            boxes = frame_box.expand(len(boxes), 4)
        target = torch.zeros(len(logits), device=logits.device)
        for b in batch_index.unique().tolist():
            sel, gt = batch_index == b, gt_masks[b]
            roi_gt = roi_mask_targets(gt, gt_index[sel].to(gt.device),
                                      boxes[sel].detach().to(gt.device), size)
            target[sel] = mask_iou(logits[sel], roi_gt.to(logits.device))
        return target.to(logits.dtype)

    @staticmethod
    def _zero_losses(mask_logits, iou_logits):
        # Zero, but still a function of the inputs, so backward() runs on any batch.
        zero = mask_logits.sum() * 0.0
        losses = {"loss_mask_bce": zero, "loss_mask_dice": zero.clone()}
        if iou_logits is not None:
            losses["loss_mask_iou"] = iou_logits.sum() * 0.0
        return losses

    def _weighted(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = {f"loss_mask_{k}": v for k, v in asdict(self.weights).items()}
        losses["loss"] = sum(weights[name] * value for name, value in losses.items())
        return losses


def assign_proposals(proposal_boxes: torch.Tensor, gt_boxes: torch.Tensor,
                     iscrowd: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Index of each proposal's GT: highest box IoU if >= threshold, else -1.

    proposal_boxes: (K, 4), gt_boxes: (M, 4), both xyxy pixels; iscrowd: (M,) bool.
    Crowd GTs are never assigned (they are not mask targets). Returns (K,) long.
    """
    none = torch.full((len(proposal_boxes),), -1, dtype=torch.long, device=proposal_boxes.device)
    if len(gt_boxes) == 0 or len(proposal_boxes) == 0:
        return none
    iou = box_iou(proposal_boxes, gt_boxes).nan_to_num(0.0)
    iou[:, iscrowd.bool()] = -1.0
    best, index = iou.max(dim=1)
    return torch.where(best >= threshold, index, none)


def jitter_boxes(boxes: torch.Tensor, image_size: Sequence[int], *, scale: float = 0.1,
                 generator: torch.Generator | None = None, min_size: float = 1.0) -> torch.Tensor:
    """Randomly shifted copies of boxes, to add GT boxes as extra proposals.

    boxes: (M, 4) xyxy pixels; image_size: (H, W). Each coordinate moves by
    U(-scale, scale) times the box's width (x) or height (y); scale < 0.5 keeps x0 < x1.
    Clipped to the image, then widened to at least min(min_size, image side) pixels so
    no box is degenerate. Returns (M, 4) xyxy pixels.
    """
    if not 0 <= scale < 0.5:
        raise ValueError(f"jitter scale must be in [0, 0.5), not {scale}")
    height, width = float(image_size[0]), float(image_size[1])
    limit = boxes.new_tensor([width, height, width, height])
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = uniform_points(len(boxes), 2, generator, boxes).reshape(-1, 4)
    jittered = torch.minimum((boxes + (2 * noise - 1) * scale * size).clamp(min=0), limit)
    return _widen(jittered, limit[:2], min_size)


def _widen(boxes: torch.Tensor, limit: torch.Tensor, min_size: float) -> torch.Tensor:
    """Boxes at least min(min_size, limit) wide and tall, kept inside [0, limit]."""
    lo, hi = boxes[:, :2], boxes[:, 2:]
    need = torch.minimum(limit.new_tensor(min_size).expand_as(limit), limit)
    hi = torch.maximum(hi, torch.minimum(lo + need, limit))
    lo = torch.minimum(lo, hi - need)
    return torch.cat([lo, hi], dim=1)
