"""Hybrid bipartite matching of Mask DINO (paper sec. 3.3): class, box and mask costs.

Per image, the cost of giving prediction q the target t is::

    w_cls * focal(q, t) + w_l1 * |box_q - box_t|_1 + w_giou * -GIoU(box_q, box_t)
        + w_bce * BCE(mask_q, mask_t) + w_dice * dice(mask_q, mask_t)

and ``scipy.optimize.linear_sum_assignment`` picks the cheapest one-to-one assignment.

* Class: the focal cost of Deformable DETR and DINO on sigmoid probabilities p of the
  target's class, alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)).
* Boxes: normalised (cx, cy, w, h) in [0, 1] for both sides; L1 on those four numbers,
  GIoU on the same boxes as xyxy.
* Decoupled stuff boxes: a stuff target's (``isthing`` False) boxes say nothing useful,
  so its L1 and GIoU costs are replaced by the mean of that cost over the image's thing
  targets (the paper: "the box loss for stuff is set to the mean of thing categories";
  0 in an image without things). A constant down one target's column never changes which
  prediction that target gets; the mean, rather than 0, keeps stuff targets from being
  preferred when there are more targets than queries.
* Masks: Mask2Former's point costs. One set of ``num_points`` uniform random points per
  image is shared by every prediction and every target, so the BCE and dice of each
  pair are measured on the same pixels. A point is (x, y) normalised over a map
  (:mod:`frozenseg.losses` convention): the predicted mask logits (h x w, e.g. the
  1/4 map) and the target masks (H x W) must span the same image extent (both over the
  padded batch, say) and are read at the same normalised points, bilinearly.

Box-only matching (``use_masks=False``) drops the two mask costs: Mask DINO's encoder
proposals (the first stage, before unified query selection) are matched this way when
no mask is predicted for them; everything else should use the hybrid cost.

Everything runs under ``torch.no_grad`` and in float32 whatever the input dtype; the
indices come back on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from frozenseg.losses import point_sample

# Matching result for one image: (prediction indices, target indices), int64, same length.
Indices = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MatchCostWeights:
    """Weights of the five matching costs (Mask DINO appendix: 4, 5, 2, 5, 5)."""

    cls: float = 4.0
    l1: float = 5.0
    giou: float = 2.0
    mask_bce: float = 5.0
    mask_dice: float = 5.0


# ----------------------------------------------------------------------------- costs


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.25,
                     gamma: float = 2.0) -> torch.Tensor:
    """Focal classification cost, (Q, K) logits and (n,) labels -> (Q, n).

    Low when the target's class has a high sigmoid probability (Deformable DETR's matcher).
    """
    prob = logits.sigmoid()
    # The 1e-8 keeps log finite at saturated probabilities (as Deformable DETR does).
    positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    return positive[:, labels] - negative[:, labels]


def box_costs(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 and -GIoU costs of normalised cxcywh boxes, (Q, 4) and (n, 4) -> {l1, giou}: (Q, n)."""
    l1 = torch.cdist(pred_boxes, target_boxes, p=1)
    giou = generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"),
                               box_convert(target_boxes, "cxcywh", "xyxy"))
    return {"l1": l1, "giou": -giou}


def mask_costs(point_logits: torch.Tensor, point_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE (mean over points) and dice (+1 smoothing) of every pair, as :func:`mask_loss`.

    point_logits: (Q, P); point_targets: (n, P) in [0, 1], at the same P points.
    Returns {"mask_bce", "mask_dice"}: (Q, n).
    """
    num_points = point_logits.shape[1]
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x): two matrix products.
    bce_if_one = nn.functional.softplus(-point_logits)
    bce_if_zero = nn.functional.softplus(point_logits)
    bce = (bce_if_one @ point_targets.T + bce_if_zero @ (1 - point_targets).T) / num_points
    probs = point_logits.sigmoid()
    overlap = 2 * probs @ point_targets.T
    total = probs.sum(1)[:, None] + point_targets.sum(1)[None, :]
    return {"mask_bce": bce, "mask_dice": 1 - (overlap + 1) / (total + 1)}


def decouple_stuff(cost: torch.Tensor, isthing: torch.Tensor) -> torch.Tensor:
    """``cost`` (Q, n), each stuff column replaced by the mean over thing columns (0 if none)."""
    if bool(isthing.all()):
        return cost
    fill = cost[:, isthing].mean() if bool(isthing.any()) else cost.new_zeros(())
    return torch.where(isthing[None, :], cost, fill)


def sample_masks_at(masks: torch.Tensor, coords: torch.Tensor, *, chunk: int = 16) -> torch.Tensor:
    """Bilinear values of (n, H, W) masks (bool or float) at normalised points (P, 2) ->
    (n, P) float32. Float copies of at most ``chunk`` full-resolution masks at a time."""
    points = coords.to(masks.device, torch.float32)[None]
    values = [point_sample(part[:, None].float(), points.expand(len(part), -1, -1))[:, 0]
              for part in masks.split(chunk)]
    return torch.cat(values) if values else points.new_zeros((0, coords.shape[0]))


# ----------------------------------------------------------------------------- matcher


class HybridMatcher(nn.Module):
    """Mask DINO's one-to-one matching of queries to targets (module docstring)."""

    def __init__(self, *, weights: MatchCostWeights | None = None, num_points: int = 12544,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if num_points < 1:
            raise ValueError(f"num_points must be at least 1, not {num_points}")
        self.weights = weights or MatchCostWeights()
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                targets: Sequence[Mapping[str, torch.Tensor]],
                pred_masks: torch.Tensor | None = None, *, use_masks: bool = True,
                generator: torch.Generator | None = None) -> list[Indices]:
        """Match each image's queries to its targets.

        pred_logits: (B, Q, K) class logits (sigmoid, no background class);
        pred_boxes: (B, Q, 4) normalised cxcywh; pred_masks: (B, Q, h, w) mask logits,
        needed when ``use_masks``. targets: per image a mapping with "labels" (n,) int64,
        "boxes" (n, 4) normalised cxcywh, "masks" (n, H, W) bool or float in [0, 1]
        (when ``use_masks``; same extent as pred_masks), and optionally "isthing" (n,)
        bool (default: all things). generator: draws the mask points (B draws of
        (num_points, 2), in image order, on the generator's device), for reproducibility.

        Returns per image (pred_idx, target_idx), int64 CPU tensors of length
        min(Q, n), pred_idx ascending. With n > Q the targets missing from target_idx
        stay unmatched; with n == 0 both are empty.
        """
        if use_masks and pred_masks is None:
            raise ValueError("use_masks=True needs pred_masks (or match boxes only: "
                             "use_masks=False)")
        if len(targets) != len(pred_logits):
            raise ValueError(f"{len(targets)} targets for a batch of {len(pred_logits)}")
        indices = []
        for b, target in enumerate(targets):
            masks = pred_masks[b] if use_masks else None
            cost = self.cost_matrix(pred_logits[b], pred_boxes[b], target, masks,
                                    generator=generator)
            indices.append(_assign(cost))
        return indices

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor,
                    target: Mapping[str, torch.Tensor], masks: torch.Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """The weighted total cost of one image, (Q, n) float32 (box-only if masks is None).

        logits: (Q, K); boxes: (Q, 4) normalised cxcywh; masks: (Q, h, w) logits or None;
        target: as in :meth:`forward`.
        """
        costs = self.named_costs(logits, boxes, target, masks, generator=generator)
        return sum(getattr(self.weights, name) * cost for name, cost in costs.items())

    @torch.no_grad()
    def named_costs(self, logits: torch.Tensor, boxes: torch.Tensor,
                    target: Mapping[str, torch.Tensor], masks: torch.Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The unweighted costs of one image by name (cls, l1, giou[, mask_bce, mask_dice]),
        each (Q, n) float32; arguments as :meth:`cost_matrix`."""
        labels = target["labels"].to(logits.device)
        target_boxes = target["boxes"].to(logits.device, torch.float32)
        isthing = target.get("isthing")
        isthing = (torch.ones_like(labels, dtype=torch.bool) if isthing is None
                   else isthing.to(logits.device, torch.bool))
        costs = {"cls": focal_class_cost(logits.float(), labels, alpha=self.focal_alpha,
                                         gamma=self.focal_gamma)}
        for name, cost in box_costs(boxes.float(), target_boxes).items():
            costs[name] = decouple_stuff(cost, isthing)
        if masks is not None:
            coords = self.sample_points(generator, masks.device)
            point_logits = point_sample(masks[:, None].float(),
                                        coords[None].expand(len(masks), -1, -1))[:, 0]
            point_targets = sample_masks_at(target["masks"], coords).to(masks.device)
            costs.update(mask_costs(point_logits, point_targets))
        return costs

    def sample_points(self, generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
        """(num_points, 2) uniform (x, y) in [0, 1], float32 on ``device``.

        Drawn on the generator's device, so a seed gives the same points anywhere.
        """
        draw_on = generator.device if generator is not None else device
        coords = torch.rand(self.num_points, 2, generator=generator, device=draw_on)
        return coords.to(device)


def _assign(cost: torch.Tensor) -> Indices:
    """linear_sum_assignment of a (Q, n) cost -> (rows, cols) int64 CPU tensors."""
    cost = cost.cpu()
    if not bool(torch.isfinite(cost).all()):
        raise ValueError("matching cost has NaN or inf entries (non-finite predictions, or "
                         "boxes that are not normalised cxcywh?)")
    rows, cols = linear_sum_assignment(cost.numpy())
    return (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
