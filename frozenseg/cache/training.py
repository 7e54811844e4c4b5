"""Training from the feature cache: each image's pixels, ground truth and cached outputs.

``CachedTrainingSet(cache, dataset)[i]`` picks one of image i's cached views (a different
one each epoch: ``set_epoch``, seeded, the same in every DataLoader worker), rebuilds the
image and its ground truth under exactly that view (``dataset.get_view``), and returns
them with the cached detector outputs. ``collate_cached`` batches such items into what
one training step needs, the same as running the detector live on the batch would give
(up to padding: cached images were run alone).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from frozenseg.boxes import to_normalized
from frozenseg.cache.store import (
    CachedImage,
    CacheError,
    FeatureCache,
    prompt_identity,
    sha256_file,
)
from frozenseg.data.collate import collate
from frozenseg.detector.output import DetectorOutput, batch_outputs


@dataclass
class TrainingBatch:
    """One step's input. images (B, 3, H, W) padded, padding_mask (B, H, W) True on pad,
    targets (boxes xyxy pixels of each image), detections: the detector's top-K,
    ground_truth: the queries of the targets' boxes in target order (boxes normalised
    cxcywh, labels the targets'). c1 is empty (B, 0, 0, 0) when it must be recomputed
    (FrozenDetector.stage1)."""

    images: torch.Tensor
    padding_mask: torch.Tensor
    targets: list[dict]
    detections: DetectorOutput
    ground_truth: DetectorOutput


class CachedTrainingSet(Dataset):
    def __init__(self, cache: FeatureCache | str | Path, dataset, *, seed: int = 0) -> None:
        """cache: a complete cache of ``dataset`` (CocoInstances; its own transform is not
        used: the view comes from the cache). Raises CacheError when the cache was made
        from another annotations file."""
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        recorded = self.cache.index["recipe"]["dataset"]
        if recorded["sha256"] != sha256_file(Path(dataset.annotations_json)):
            raise CacheError(f"{self.cache.dir} was made from {recorded['annotations']}, "
                             f"not {dataset.annotations_json}")
        self.views: dict[int, list[int]] = {}
        for image, view in self.cache.entries:
            self.views.setdefault(image, []).append(view)
        self.images = sorted(self.views)  # images the cache could read

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict, CachedImage] | None:
        image_index = self.images[i]
        view = random.Random(f"{self.seed}:{self.epoch}:{image_index}").choice(
            self.views[image_index])
        cached = self.cache[self.cache.position(image_index, view)]
        loaded = self.dataset.get_view(image_index, cached.view)
        return None if loaded is None else (*loaded, cached)


def check_made_by(cache: FeatureCache, detector_dir: str | Path, detector) -> None:
    """Raise CacheError (naming both) unless ``cache`` was written by the converted detector
    in ``detector_dir`` with ``detector``'s top-K, memory layer and prompt."""
    from frozenseg.detector.folder import config_path

    made = cache.index["recipe"]
    config = config_path(detector_dir)
    mine = {"config": sha256_file(config), "top_k": detector.top_k,
            "memory_layer": detector.memory_layer, **prompt_identity(detector)}
    theirs = {"config": made["detector"].get("config_sha256", "(a detector object)"),
              "top_k": made["top_k"], "memory_layer": made["memory_layer"],
              **{k: v for k, v in made["detector"].items() if k == "prompt"}}
    if mine != theirs:
        source = made["detector"].get("source") or "?"
        raise CacheError(f"{cache.dir} was made by detector {source} ({_made(theirs)}), not "
                         f"by {detector_dir} ({_made(mine)})")


def _made(identity: dict) -> str:
    """check_made_by's identity in words."""
    prompt = f", prompt {identity['prompt']!r}" if "prompt" in identity else ""
    return (f"config sha256 {identity['config'][:12]}, top-k {identity['top_k']}, memory "
            f"layer {identity['memory_layer']}{prompt}")


def collate_cached(batch: list) -> TrainingBatch | None:
    """``CachedTrainingSet`` items -> a TrainingBatch; None items (unreadable images) are
    dropped, and a batch with none left is None."""
    items = [item for item in batch if item is not None]
    if not items:
        return None
    images, padding_mask, targets = collate([(image, target) for image, target, _ in items])
    cached = [c for _, _, c in items]
    detections = batch_outputs([c.to_output() for c in cached])
    ground_truth = _ground_truth(detections, cached, targets)
    return TrainingBatch(images, padding_mask, targets, detections, ground_truth)


def _ground_truth(detections: DetectorOutput, cached: list[CachedImage],
                  targets: list[dict]) -> DetectorOutput:
    """The cached ground-truth queries as a DetectorOutput over the detections' memory."""
    width = max(len(t["boxes"]) for t in targets)
    b, c = len(targets), detections.queries.shape[-1]
    queries, boxes = torch.zeros(b, width, c), torch.zeros(b, width, 4)
    labels, mask = torch.zeros(b, width, dtype=torch.long), torch.zeros(b, width, dtype=torch.bool)
    for i, (item, target) in enumerate(zip(cached, targets, strict=True)):
        n = len(target["boxes"])
        queries[i, :n] = item.gt_queries
        boxes[i, :n] = to_normalized(target["boxes"].float(), target["size"])
        labels[i, :n], mask[i, :n] = target["labels"], True
    return replace(detections, queries=queries, boxes=boxes, scores=mask.float(),
                   labels=labels, query_mask=mask)
