"""What the training loop iterates: seeded, resumable batches, from the cache or live.

Every random choice of the data side is a function of (seed, epoch, image): the order
of the images in an epoch (``EpochBatches``) and, when the detector runs live, each
image's augmented view (``LiveTrainingSet``). So a run resumed at step n of an epoch
sees exactly the batches an uninterrupted run would, whatever the DataLoader workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from frozenseg.data.coco import CocoInstances
from frozenseg.data.transforms import (
    MAX_SIZE,
    TRAIN_SCALES,
    Transform,
    deformable_detr_train,
    evaluation,
    large_scale_jitter,
    scale_flip,
)


def _scaled(sizes, scale: float):
    """Image sizes (an int or a sequence) times ``scale``, rounded, at least 8 pixels."""
    if isinstance(sizes, int):
        return max(8, round(sizes * scale))
    return [_scaled(n, scale) for n in sizes]


def train_transform(name: str, scale: float = 1.0) -> Transform:
    """The recipe's ``data.transform``, every size multiplied by ``scale``."""
    if name == "deformable_detr":
        return deformable_detr_train(
            _scaled(TRAIN_SCALES, scale), _scaled(MAX_SIZE, scale),
            _scaled((400, 500, 600), scale), tuple(_scaled((384, 600), scale)))
    if name == "lsj":
        return large_scale_jitter(_scaled(1024, scale))
    return eval_transform(scale)


def eval_transform(scale: float = 1.0) -> Transform:
    return evaluation(_scaled(800, scale), _scaled(MAX_SIZE, scale))


def cache_views(views: int, scale: float = 1.0) -> Transform:
    """The transform a cache of ``views`` views per image samples from: the evaluation
    resize for one view, else flip + shorter side 480..800 (every size x ``scale``)."""
    if views == 1:
        return eval_transform(scale)
    return scale_flip(_scaled(TRAIN_SCALES, scale), _scaled(MAX_SIZE, scale))


class LiveTrainingSet(Dataset):
    """A dataset whose view of image i in epoch e is sampled from ``transform`` with
    ``random.Random(f"{seed}:{e}:{i}")``: items are (image, target) or None (unreadable)."""

    def __init__(self, dataset: CocoInstances, transform: Transform, *, seed: int = 0) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        info = self.dataset.images[i]
        view = self.transform.sample_view((info["height"], info["width"]),
                                          random.Random(f"{self.seed}:{self.epoch}:{i}"))
        return self.dataset.get_view(i, view)


class EpochBatches(Sampler[list[int]]):
    """Batches of indices: a permutation seeded by (seed, epoch), cut into global batches
    of ``batch_size x processes`` (the last may be short), of which process ``rank`` takes
    its ``batch_size`` slice; ``start`` skips the first batches (resuming an epoch)."""

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, processes: int = 1) -> None:
        self.size, self.batch_size, self.seed, self.epoch, self.start = (
            size, batch_size, seed, epoch, start)
        self.rank, self.processes = rank, processes

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.size // (self.batch_size * self.processes))

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.epoch)).tolist()
        width = self.batch_size * self.processes
        for b in range(self.start, self.batches_per_epoch):
            batch = order[b * width : (b + 1) * width]
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
