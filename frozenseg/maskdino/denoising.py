"""Unified denoising queries: DINO's contrastive denoising (CDN) plus Mask DINO's mask DN.

During training the decoder gets, before its matching queries, D denoising queries made
from noised ground truth. Each target yields, in every group, a *positive* query (small
box noise; it must reconstruct the target's class, box and, in Mask DINO, its mask) and
a *negative* query (larger box noise; it must predict "no object").

Groups (DINO appendix D.1, dynamic DN groups). With m = the largest target count in
the batch, ``num_groups = max(1, num_denoising // m)``, each group 2 m queries, so
D = pad_size = 2 m num_groups (about 2 num_denoising: DINO's "100 CDN pairs").

Layout of the D denoising queries of every image (DINO's)::

    group g: [2mg, 2mg + m)        positives for targets 0..n_i-1, then padding
             [2mg + m, 2m(g + 1))  negatives for targets 0..n_i-1, then padding

Padding slots (images with fewer than m targets) have label -1 and box 0 and
``valid`` False: the model should give them a zero content query (as DINO does), and no
loss reads them.

Attention mask, (D + Q, D + Q) bool, True = may NOT attend (``nn.MultiheadAttention``'s
convention), rows are queries, columns keys, the D denoising queries first:

* matching queries (rows D:) cannot see any denoising query (they must not learn from
  ground truth);
* a denoising query sees its own group and every matching query, never another group
  (each group is an independent noised copy of the ground truth).

Noise, per group and independently for positives and negatives:

* labels: with probability ``label_noise_ratio * 0.5`` a label is replaced by a class
  drawn uniformly from all ``num_classes`` (it may redraw the same class, as DINO's
  code does; the observed change rate is p (K - 1) / K). The default ratio 0.4 gives
  Mask DINO's 0.2 (DINO's detector configs use 0.5, i.e. 0.25).
* boxes (DINO's CDN): each corner of the xyxy box moves by sign * r * lambda * (w/2 or
  h/2), lambda = ``box_noise_scale``, r ~ U[0, 1) for positives (within lambda1 =
  lambda), r ~ U[1, 2) for negatives (between lambda1 and lambda2 = 2 lambda1), sign
  +-1 uniformly; the corners are then clipped to [0, 1] (which can pull a negative's
  offset below lambda1 at the image border) and turned back into cxcywh. lambda < 0.5
  keeps every noised box's width and height positive.

Random draws (on the generator's device, in this order, each of shape
(B, num_groups, 2, m) [+ (4,)]): label-flip uniforms, replacement classes, box offset
magnitudes, box offset signs. The same generator state and targets give the same queries.

Loss side: split the decoder outputs with :meth:`DenoisingQueries.split`; reconstruct
with :meth:`DenoisingQueries.indices` (per image (query index, target index), the same
format as the matcher's, so the matched-query losses apply unchanged: focal class loss
with background for every other valid denoising query, L1 + GIoU on boxes, and, for
mask denoising, the point-sampled BCE + dice against the *target* masks of those
targets; the noised boxes only steer the decoder). Negatives (``negative``) get class
background only. Normalise by the number of positives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import box_convert


@dataclass(frozen=True)
class DenoisingQueries:
    """Denoising queries of a batch (module docstring for layout and conventions).

    labels: (B, D) int64 noised class, -1 at padding. boxes: (B, D, 4) noised normalised
    cxcywh, 0 at padding. attn_mask: (D + Q, D + Q) bool, True = blocked. positive,
    negative: (B, D) bool. target_index: (B, D) int64, the target (index into that
    image's targets) each query was noised from, -1 at padding; only positives
    reconstruct it. num_groups: groups per image; group_size: 2 m; pad_size: D;
    num_queries: Q, the matching queries after them. D is 0 when no image has a target.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    attn_mask: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    target_index: torch.Tensor
    num_groups: int
    group_size: int
    pad_size: int
    num_queries: int

    @property
    def valid(self) -> torch.Tensor:
        """(B, D) bool: a real (non-padding) denoising query."""
        return self.target_index >= 0

    def indices(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (query index into the D denoising outputs, target index), int64, for
        the positives only: the pairs the reconstruction (class, box, mask) losses use."""
        pairs = []
        for positive, target in zip(self.positive, self.target_index, strict=True):
            query = positive.nonzero()[:, 0]
            pairs.append((query, target[query]))
        return pairs

    def split(self, outputs: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder outputs over D + Q queries (along ``dim``) -> (denoising, matching)."""
        return outputs.split([self.pad_size, outputs.shape[dim] - self.pad_size], dim=dim)


class ContrastiveDenoising:
    """Builds :class:`DenoisingQueries` from a batch's targets (module docstring).

    num_classes: K, the class count (labels in [0, K)); num_queries: Q, the matching
    queries the attention mask covers; num_denoising: the budget of positive/negative
    pairs per image (DINO's 100).
    """

    def __init__(self, *, num_classes: int, num_queries: int, num_denoising: int = 100,
                 label_noise_ratio: float = 0.4, box_noise_scale: float = 0.4) -> None:
        if not 0 <= label_noise_ratio <= 2:
            raise ValueError(f"label_noise_ratio must be in [0, 2] (flip probability "
                             f"ratio / 2), not {label_noise_ratio}")
        if box_noise_scale < 0:
            raise ValueError(f"box_noise_scale must be >= 0, not {box_noise_scale}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale

    def num_groups(self, max_targets: int) -> int:
        """Groups for a batch whose largest image has ``max_targets`` targets (0 if none)."""
        if max_targets == 0 or self.num_denoising <= 0:
            return 0
        return max(1, self.num_denoising // max_targets)

    def __call__(self, targets: Sequence[Mapping[str, torch.Tensor]], *,
                 generator: torch.Generator | None = None) -> DenoisingQueries:
        """targets: per image "labels" (n_i,) int64 in [0, K) and "boxes" (n_i, 4)
        normalised cxcywh. Outputs live on the targets' device."""
        labels, boxes, count = _pad_targets(targets, self.num_classes)
        groups = self.num_groups(labels.shape[1])
        if groups == 0:
            return self._empty(len(targets), labels.device)
        shape = (len(targets), groups, 2, labels.shape[1])  # (B, G, positive/negative, m)
        noised_labels = self._noise_labels(labels[:, None, None].expand(shape), generator)
        noised_boxes = self._noise_boxes(boxes[:, None, None].expand(*shape, 4), generator)
        target_index = torch.arange(shape[-1], device=labels.device).expand(shape)
        valid = target_index < count[:, None, None, None]
        target_index = torch.where(valid, target_index, -1)
        is_positive = torch.tensor([True, False], device=labels.device)[None, None, :, None]
        return DenoisingQueries(
            labels=torch.where(valid, noised_labels, -1).flatten(1),
            boxes=(noised_boxes * valid[..., None]).flatten(1, 3),
            attn_mask=attention_mask(groups, 2 * shape[-1], self.num_queries, labels.device),
            positive=(valid & is_positive).flatten(1),
            negative=(valid & ~is_positive).flatten(1),
            target_index=target_index.flatten(1),
            num_groups=groups, group_size=2 * shape[-1], pad_size=groups * 2 * shape[-1],
            num_queries=self.num_queries)

    def _noise_labels(self, labels: torch.Tensor, generator: torch.Generator | None):
        flip = _rand(labels.shape, generator, labels.device) < self.label_noise_ratio * 0.5
        device = generator.device if generator is not None else labels.device
        drawn = torch.randint(0, self.num_classes, labels.shape, generator=generator,
                              device=device).to(labels.device)
        return torch.where(flip, drawn, labels)

    def _noise_boxes(self, boxes: torch.Tensor, generator: torch.Generator | None):
        """(B, G, 2, m, 4) cxcywh copies -> noised, positives (index 0 of dim 2) inside
        lambda1, negatives between lambda1 and lambda2 (module docstring)."""
        magnitude = _rand(boxes.shape, generator, boxes.device)
        magnitude[:, :, 1] += 1.0  # negatives: [1, 2)
        sign = (_rand(boxes.shape, generator, boxes.device) < 0.5).to(boxes.dtype) * 2 - 1
        half_size = torch.cat([boxes[..., 2:], boxes[..., 2:]], dim=-1) / 2  # (w, h, w, h) / 2
        corners = box_convert(boxes, "cxcywh", "xyxy")
        corners = corners + sign * magnitude * half_size * self.box_noise_scale
        return box_convert(corners.clamp(0.0, 1.0), "xyxy", "cxcywh")

    def _empty(self, batch: int, device: torch.device) -> DenoisingQueries:
        nothing = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        return DenoisingQueries(
            labels=nothing.long(), boxes=torch.zeros(batch, 0, 4, device=device),
            attn_mask=attention_mask(0, 0, self.num_queries, device), positive=nothing,
            negative=nothing.clone(), target_index=nothing.long(), num_groups=0, group_size=0,
            pad_size=0, num_queries=self.num_queries)


def attention_mask(num_groups: int, group_size: int, num_queries: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(D + Q, D + Q) bool self-attention mask, True = blocked, D = num_groups * group_size
    denoising queries first: matching queries see no denoising query; denoising queries
    see their own group and all matching queries."""
    pad_size = num_groups * group_size
    group = torch.arange(pad_size + num_queries, device=device) // max(group_size, 1)
    is_matching = torch.arange(pad_size + num_queries, device=device) >= pad_size
    other_group = group[:, None] != group[None, :]
    # A matching row blocks denoising columns; a denoising row blocks other groups' columns.
    return torch.where(is_matching[:, None], ~is_matching[None, :],
                       other_group & ~is_matching[None, :])


def _pad_targets(targets: Sequence[Mapping[str, torch.Tensor]], num_classes: int):
    """Labels (B, m) int64 and boxes (B, m, 4) float32 padded with 0, and counts (B,)."""
    if not targets:
        raise ValueError("denoising needs at least one image's targets")
    device = targets[0]["labels"].device
    counts = [len(t["labels"]) for t in targets]
    width = max(counts)
    labels = torch.zeros(len(targets), width, dtype=torch.int64, device=device)
    boxes = torch.zeros(len(targets), width, 4, dtype=torch.float32, device=device)
    for b, (target, n) in enumerate(zip(targets, counts, strict=True)):
        if target["boxes"].shape != (n, 4):
            raise ValueError(f"image {b}: boxes {tuple(target['boxes'].shape)} for {n} labels; "
                             "expected (n, 4) normalised cxcywh")
        labels[b, :n] = target["labels"].to(device)
        boxes[b, :n] = target["boxes"].to(device, torch.float32)
    if width and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"target labels must be class indices in [0, {num_classes})")
    return labels, boxes, torch.tensor(counts, device=device)


def _rand(shape: Sequence[int], generator: torch.Generator | None,
          device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 drawn on the generator's device (so a seed is device-independent)."""
    draw_on = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=draw_on).to(device)
