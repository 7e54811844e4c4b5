"""Mask DINO's training loss (paper sec. 4 "Loss function"; DINO's and Mask2Former's terms).

Five terms, one weight each (:class:`LossWeights`, the paper's 4, 5, 2, 5, 5), on every
*prediction set*: each decoder layer's matching queries, the encoder's selected
proposals, and each decoder layer's denoising queries. Every set is matched on its own
(DETR's auxiliary losses): a :class:`HybridMatcher` for the matching queries and the
encoder proposals, the denoising construction itself (``DenoisingQueries.indices``)
for the denoising queries.

* ``cls``: sigmoid focal loss (alpha 0.25, gamma 2) over every query and class; a
  matched query's target is the one-hot of its target's class, every other query's the
  all-zero row (background). Summed, then divided by the number of targets in the batch
  (at least 1): Deformable DETR's ``mean over queries * Q / num_boxes``.
* ``l1``, ``giou``: L1 on normalised cxcywh and 1 - GIoU on the same boxes as xyxy,
  for matched *thing* targets only (decoupled box prediction: a stuff target,
  ``isthing`` False, has no box loss), divided by the number of thing targets.
* ``mask_bce``, ``mask_dice``: Mask2Former's point losses on the matched pairs. Per
  pair, ``num_points`` PointRend points (``uncertain_point_coords``: the
  ``importance`` fraction chosen as the most uncertain of ``oversample`` times as many
  uniform candidates, the rest uniform; no gradient through the choice); the predicted
  logits and the target mask are read bilinearly at those points; BCE is the mean over
  points, dice ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)``; both summed over pairs and
  divided by the number of targets.

Denoising sets: the positives reconstruct their targets (class, thing box, mask); every
other *valid* denoising query (the negatives) gets the background class target; padding
queries (``not dn.valid``) are left out of the class loss. All terms are divided by the
number of positives (``num_groups`` times the targets), their box terms by the positives
of thing targets.

Point frame. A point (x, y) in [0, 1]^2 is normalised over the predicted mask map, the
stride-4 grid of the padded batch (:mod:`frozenseg.maskdino.outputs`): it is the image
pixel (4 w x, 4 h y). The target masks (n, H, W), full resolution on the padded batch,
are read at that pixel (bilinear, zero beyond them), so targets are exact even when H or
W is not a multiple of 4 (then the predicted map reaches a little past the batch).

Empty targets: with no pair in a set its box and mask terms are zeros that still hang
off the predictions' graph, so ``backward()`` works on any batch; the class term is the
background loss of every query. Sets whose ``Predictions.masks`` is None (box-only) are
matched on class and box costs and have no mask terms at all (no keys).

Normalisers are the counts of this process's batch; with several processes they are
not averaged across them (each process normalises its own batch).

Random draws (``generator``), in this order: for each decoder layer, then the encoder
set, then each denoising layer: the matcher's points (matched sets with masks), then,
when the set has pairs, the loss's points (``uncertain_point_coords``: candidates, then
the fresh uniform points).

Differences from the official Mask DINO code, on purpose: box terms are divided by the
thing targets, not by all targets (stuff has no box to count); denoising padding is left
out of the class loss instead of being pushed to background (it is no query at all);
with no denoising (``output.dn`` None) the ``_dn`` terms are absent, not constant zeros.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from frozenseg.losses import mask_loss, point_sample, sample_bitmaps, uncertain_point_coords
from frozenseg.maskdino.matcher import HybridMatcher, Indices, MatchCostWeights
from frozenseg.maskdino.outputs import MaskDINOOutput, Predictions

Target = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the five terms in the total, the one place they live (the paper: 4, 5,
    2, 5, 5). The default matcher uses the same numbers as its cost weights."""

    cls: float = 4.0
    l1: float = 5.0
    giou: float = 2.0
    mask_bce: float = 5.0
    mask_dice: float = 5.0


@dataclass(frozen=True)
class Pairs:
    """The (prediction, target) pairs of one set, over the batch, each (N,) on the
    predictions' device: image, query and target index, and the target's label,
    cxcywh box (N, 4) and isthing."""

    batch: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    isthing: torch.Tensor

    @classmethod
    def gather(cls, indices: Sequence[Indices], targets: Sequence[Target],
               device: torch.device) -> Pairs:
        """Per image (query index, target index) and the image's targets -> Pairs."""
        query = [q.to(device) for q, _ in indices]
        target = [t.to(device) for _, t in indices]
        batch = [torch.full_like(q, b) for b, q in enumerate(query)]
        fields = {key: torch.cat([tgt[key][j] for tgt, j in zip(targets, target, strict=True)])
                  for key in ("labels", "boxes", "isthing")}
        return cls(torch.cat(batch), torch.cat(query), torch.cat(target), **fields)

    def __len__(self) -> int:
        return len(self.batch)


# ----------------------------------------------------------------------------- terms


def focal_class_loss(logits: torch.Tensor, classes: torch.Tensor, *, alpha: float = 0.25,
                     gamma: float = 2.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the sigmoid focal loss (RetinaNet) over queries and classes, unnormalised.

    logits: (B, Q, K); classes: (B, Q) int64 target class, -1 for background (an all-zero
    target row); valid: (B, Q) bool, the queries that count (None: all). Returns a scalar.
    """
    onehot = F.one_hot(classes.clamp(min=0), logits.shape[-1]).to(logits.dtype)
    onehot = onehot * (classes >= 0)[..., None]
    loss = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="none")
    return loss.sum() if valid is None else loss[valid].sum()


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed L1 and 1 - GIoU of paired normalised cxcywh boxes, (N, 4) each -> {l1, giou}.

    The elementwise GIoU loss (torchvision) equals DETR's diagonal of the pairwise
    ``generalized_box_iou`` matrix without building the N x N matrix.
    """
    l1 = F.l1_loss(pred, target, reduction="sum")
    giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"),
                                    box_convert(target, "cxcywh", "xyxy"), reduction="sum")
    return {"l1": l1, "giou": giou}


def sample_target_masks(masks: torch.Tensor, index: torch.Tensor, coords: torch.Tensor,
                        map_size: Sequence[int], stride: int = 4) -> torch.Tensor:
    """Target masks read at points of the predicted map (module docstring, point frame).

    masks: (n, H, W) bool or float in [0, 1] on the padded batch; index: (N,) into n;
    coords: (N, P, 2) (x, y) normalised over the (h, w) = ``map_size`` predicted map of
    that batch at ``stride``. Returns (N, P) float32 on the masks' device. Bool masks are
    read without a float copy (``sample_bitmaps``).
    """
    height, width = masks.shape[-2:]
    h, w = map_size
    if not (stride * (h - 1) < height <= stride * h and stride * (w - 1) < width <= stride * w):
        raise ValueError(f"target masks {height}x{width} do not span the stride-{stride} "
                         f"mask map {h}x{w}: expected full resolution on the padded batch")
    pixels = coords.detach().to(masks.device, torch.float32)
    pixels = pixels * pixels.new_tensor([stride * w, stride * h])
    index = index.to(masks.device)
    if masks.dtype == torch.bool:
        return sample_bitmaps(masks, index, pixels)
    normalised = pixels / pixels.new_tensor([width, height])
    return point_sample(masks[index][:, None].float(), normalised)[:, 0]


# ----------------------------------------------------------------------------- criterion


class MaskDINOCriterion(nn.Module):
    """Named losses of a :class:`MaskDINOOutput` (module docstring for every convention).

    num_classes: K; matcher: default a :class:`HybridMatcher` with ``weights`` as its cost
    weights and the same ``num_points`` and focal parameters; weights: the total's
    weights; num_points, oversample, importance: PointRend sampling per mask (Mask2Former:
    112 * 112, 3, 0.75); mask_stride: the predicted masks' stride on the padded batch.
    """

    def __init__(self, num_classes: int, *, matcher: HybridMatcher | None = None,
                 weights: LossWeights | None = None, num_points: int = 12544,
                 oversample: float = 3.0, importance: float = 0.75, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, mask_stride: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weights = weights or LossWeights()
        self.matcher = matcher or HybridMatcher(
            weights=MatchCostWeights(**asdict(self.weights)), num_points=num_points,
            focal_alpha=focal_alpha, focal_gamma=focal_gamma)
        self.num_points = num_points
        self.oversample = oversample
        self.importance = importance
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.mask_stride = mask_stride

    def forward(self, output: MaskDINOOutput, targets: Sequence[Target], *,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses of one batch.

        output: the model's :class:`MaskDINOOutput` (B images); targets: per image
        "labels" (n,) int64 in [0, K), "boxes" (n, 4) normalised cxcywh, "masks" (n, H, W)
        bool on the padded batch at full resolution (may stay on the CPU), optionally
        "isthing" (n,) bool (default all things). generator: the point draws.

        Returns float32 scalars: "loss", the weighted total, and the unweighted terms
        "cls", "l1", "giou", "mask_bce", "mask_dice" of the last layer, "<term>_<i>" of
        decoder layer i < L - 1, "<term>_enc" of the encoder proposals, "<term>_dn" and
        "<term>_dn_<i>" of the denoising queries (when ``output.dn`` is not None).
        """
        if len(targets) != output.final.logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of "
                             f"{output.final.logits.shape[0]}")
        targets = [_on_device(t, output.final.logits.device) for t in targets]
        total, named = 0.0, {}
        for suffix, terms in self._sets(output, targets, generator):
            total = total + sum(getattr(self.weights, k) * v for k, v in terms.items())
            named.update({name + suffix: value for name, value in terms.items()})
        return {"loss": total, **named}

    def _sets(self, output: MaskDINOOutput, targets: list[dict[str, torch.Tensor]],
              generator: torch.Generator | None) -> Iterator[tuple[str, dict]]:
        """(name suffix, terms) of every prediction set, in the module docstring's order."""
        counts = _counts(torch.cat([t["isthing"] for t in targets]))
        last = len(output.layers) - 1
        for i, predictions in enumerate(output.layers):
            yield ("" if i == last else f"_{i}"), self._matched_terms(
                predictions, targets, counts, generator)
        yield "_enc", self._matched_terms(output.encoder, targets, counts, generator)
        if (output.dn is None) != (output.denoising is None):
            raise ValueError("output.dn and output.denoising must both be given or both None")
        if output.dn is None:
            return
        # The positives reconstruct their targets; normalised by the positives' count.
        device = output.final.logits.device
        pairs = Pairs.gather(output.dn.indices(), targets, device)
        valid, last = output.dn.valid.to(device), len(output.denoising) - 1
        for i, predictions in enumerate(output.denoising):
            yield ("_dn" if i == last else f"_dn_{i}"), self.terms(
                predictions, targets, pairs, _counts(pairs.isthing), valid=valid,
                generator=generator)

    def _matched_terms(self, predictions: Predictions, targets: list[dict[str, torch.Tensor]],
                       counts: tuple[float, float],
                       generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Match one set with the matcher, then :meth:`terms`."""
        use_masks = predictions.masks is not None
        indices = self.matcher(predictions.logits.detach(), predictions.boxes.detach(), targets,
                               predictions.masks.detach() if use_masks else None,
                               use_masks=use_masks, generator=generator)
        pairs = Pairs.gather(indices, targets, predictions.logits.device)
        return self.terms(predictions, targets, pairs, counts, generator=generator)

    def terms(self, predictions: Predictions, targets: Sequence[Target], pairs: Pairs,
              counts: tuple[float, float], *, valid: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The unweighted terms of one set given its pairs.

        counts: (targets, thing targets) normalisers, each >= 1; valid: (B, Q) bool, the
        queries the class loss counts (None: all). Returns {cls, l1, giou[, mask_bce,
        mask_dice]} (mask terms only when ``predictions.masks`` is not None).
        """
        num_targets, num_things = counts
        logits = predictions.logits.float()
        classes = torch.full(logits.shape[:2], -1, dtype=torch.int64, device=logits.device)
        classes[pairs.batch, pairs.query] = pairs.labels
        terms = {"cls": focal_class_loss(logits, classes, alpha=self.focal_alpha,
                                         gamma=self.focal_gamma, valid=valid) / num_targets}
        things = pairs.isthing
        boxes = predictions.boxes.float()[pairs.batch[things], pairs.query[things]]
        for name, value in box_losses(boxes, pairs.boxes[things].float()).items():
            terms[name] = value / num_things
        if predictions.masks is not None:
            masks = self._mask_losses(predictions.masks, targets, pairs, generator)
            terms.update({name: value / num_targets for name, value in masks.items()})
        return terms

    def _mask_losses(self, masks: torch.Tensor, targets: Sequence[Target], pairs: Pairs,
                     generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Summed point BCE and dice of the pairs' masks; masks: (B, Q, h, w) logits."""
        logits = masks[pairs.batch, pairs.query].float()  # (N, h, w)
        if len(pairs) == 0:  # zero, but on the graph, so backward() runs
            zero = masks.sum() * 0.0
            return {"mask_bce": zero, "mask_dice": zero.clone()}
        coords = uncertain_point_coords(logits[:, None], self.num_points,
                                        oversample=self.oversample, importance=self.importance,
                                        generator=generator)
        point_logits = point_sample(logits[:, None], coords)[:, 0]
        point_targets = torch.zeros_like(point_logits)
        for b in pairs.batch.unique().tolist():
            sel = pairs.batch == b
            values = sample_target_masks(targets[b]["masks"], pairs.target[sel], coords[sel],
                                         masks.shape[-2:], self.mask_stride)
            point_targets[sel] = values.to(point_targets)
        # mask_loss averages over masks; the set's terms are sums over masks / num_targets.
        losses = mask_loss(point_logits, point_targets)
        return {"mask_bce": losses["loss_mask_bce"] * len(pairs),
                "mask_dice": losses["loss_mask_dice"] * len(pairs)}


def _counts(isthing: torch.Tensor) -> tuple[float, float]:
    """(targets, thing targets) among (N,) isthing flags, each at least 1 (DETR's clamp)."""
    return max(float(len(isthing)), 1.0), max(float(isthing.sum()), 1.0)


def _on_device(target: Target, device: torch.device) -> dict[str, torch.Tensor]:
    """labels, boxes and isthing (default all True) on the predictions' device; masks stay
    where they are (only their sampled points move)."""
    labels = target["labels"].to(device)
    isthing = target.get("isthing")
    isthing = (torch.ones_like(labels, dtype=torch.bool) if isthing is None
               else isthing.to(device, torch.bool))
    return {"labels": labels, "boxes": target["boxes"].to(device), "isthing": isthing,
            "masks": target.get("masks")}
