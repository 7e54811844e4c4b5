"""Batching for the datasets of frozenseg.data: pad images, drop failed items."""

from __future__ import annotations

import torch

from frozenseg.data.transforms import content_size


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``[(image, target) | None, ...]`` -> ``(images, padding_mask, targets)``.

    images: (B, 3, Hmax, Wmax) float, each image at the top-left, zeros elsewhere;
    padding_mask: (B, Hmax, Wmax) bool, True on padding (DETR's mask convention): the
    batch's, and the padding a transform added (large-scale jitter), which the
    target's ``view`` records;
    targets: the targets, unchanged (boxes stay xyxy absolute pixels of their image).

    None items, images the dataset could not read (it has warned), are dropped, so B
    may be smaller than the batch size, or 0: a loop should skip an empty batch.
    """
    items = [item for item in batch if item is not None]
    if not items:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.bool), []
    images = [image for image, _ in items]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    batched = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    padding_mask = torch.ones(len(images), height, width, dtype=torch.bool)
    for i, (image, target) in enumerate(items):
        h, w = image.shape[-2:]
        batched[i, :, :h, :w] = image
        if isinstance(target, dict) and "view" in target:
            h, w = (min(a, b) for a, b in zip(content_size(target["view"]), (h, w), strict=True))
        padding_mask[i, :h, :w] = False
    return batched, padding_mask, [target for _, target in items]
