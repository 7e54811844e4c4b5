"""Mask DINO inference over a dataset: the model on each image (per-image post-processing
in :mod:`frozenseg.maskdino.postprocess`), COCO instance results, box and mask AP, PQ and
mIoU (:func:`evaluate_maskdino`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from frozenseg.data.coco import CocoInstances
from frozenseg.data.collate import collate
from frozenseg.data.images import read_stored
from frozenseg.data.panoptic import CocoPanoptic, panoptic_to_semantic
from frozenseg.data.transforms import Transform, evaluation
from frozenseg.detector.config import IMAGENET_MEAN, IMAGENET_STD
from frozenseg.evaluation.coco import coco_evaluate, load_ground_truth, write_metrics
from frozenseg.evaluation.panoptic import PanopticQuality, SemanticIoU
from frozenseg.evaluation.results import ResultsWriter, encode_masks
from frozenseg.maskdino.postprocess import (
    TASKS,
    InferenceSettings,
    postprocess_image,
)

IGNORE = 255  # semantic ground truth: void pixels


@dataclass(frozen=True)
class EvalSplit:
    """The files of one evaluation split; a task needs its own (None: not evaluated).

    images: the image folder. instance (box and mask AP): ``instances_json`` (COCO
    instances, things). panoptic (PQ) and semantic (mIoU): ``panoptic_json`` and
    ``panoptic_png``; the model's classes are then the panoptic categories (sorted ids ->
    0..K-1, as :class:`CocoPanoptic`), else the instance categories. Semantic ground truth
    comes from the panoptic one, or from ``semantic_png`` (label PNGs named by the image's
    stem, holding those class indices, 255 void) when given.
    """

    images: str | Path
    instances_json: str | Path | None = None
    panoptic_json: str | Path | None = None
    panoptic_png: str | Path | None = None
    semantic_png: str | Path | None = None

    @classmethod
    def synth(cls, root: str | Path, split: str = "val") -> EvalSplit:
        """The files :func:`frozenseg.synth` writes for ``split``."""
        root = Path(root)
        return cls(images=root / "images" / split,
                   instances_json=root / f"instances_{split}.json",
                   panoptic_json=root / f"panoptic_{split}.json",
                   panoptic_png=root / f"panoptic_{split}", semantic_png=root / f"semantic_{split}")

    def available_tasks(self) -> tuple[str, ...]:
        panoptic = self.panoptic_json is not None and self.panoptic_png is not None
        return tuple(t for t, ok in zip(TASKS, (self.instances_json is not None, panoptic,
                                                panoptic), strict=True) if ok)

    def dataset(self) -> CocoPanoptic | CocoInstances:
        """The untransformed dataset that defines the images and the classes."""
        if self.panoptic_json is not None and self.panoptic_png is not None:
            return CocoPanoptic(self.images, self.panoptic_json, self.panoptic_png)
        if self.instances_json is None:
            raise ValueError("an evaluation split needs instances_json or panoptic_json + "
                             "panoptic_png")
        return CocoInstances(self.images, self.instances_json)


class _EvalItems(Dataset):
    """(view image, meta) per image: meta has ``image_id``, ``orig_size``, ``size`` and
    ``view`` of the view, and the original-size ground truth the tasks need: ``panoptic``
    (id map, segments with dataset category ids) and ``sem_seg`` (H, W) int64."""

    def __init__(self, base, transform: Transform, tasks: Sequence[str],
                 semantic_png: str | Path | None) -> None:
        self.base, self.transform, self.tasks = base, transform, tuple(tasks)
        self.semantic_png = None if semantic_png is None else Path(semantic_png)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        item = self.base[index]
        if item is None:
            return None
        image, target = item
        view_image, view = self.transform(image)
        meta = {"image_id": target["image_id"], "orig_size": target["orig_size"],
                "size": view["size"], "view": view["view"]}
        if "panoptic" in self.tasks:
            meta["panoptic"] = panoptic_ground_truth(target, self.base.category_ids)
        if "semantic" in self.tasks:
            meta["sem_seg"] = (panoptic_to_semantic(target, IGNORE) if self.semantic_png is None
                               else self._labels(index, target["orig_size"]))
        return view_image, meta

    def _labels(self, index: int, size: Tensor) -> Tensor:
        path = self.semantic_png / (Path(self.base.images[index]["file_name"]).stem + ".png")
        labels = torch.from_numpy(np.asarray(read_stored(path)).astype(np.int64))
        if labels.shape != tuple(size.tolist()):
            raise ValueError(f"{path}: label map {tuple(labels.shape)}, image {size.tolist()}")
        return labels


def panoptic_ground_truth(target: dict, category_ids: Sequence[int]) -> tuple[Tensor, list]:
    """A :class:`CocoPanoptic` target -> (id map (H, W) int32, segments {"id", "category_id"
    (the dataset's), "iscrowd"}), segment n having id n + 1."""
    ids = torch.zeros(target["masks"].shape[-2:], dtype=torch.int32)
    segments = []
    for n, (mask, label, crowd) in enumerate(zip(target["masks"], target["labels"].tolist(),
                                                 target["iscrowd"].tolist(), strict=True)):
        ids[mask] = n + 1
        segments.append({"id": n + 1, "category_id": category_ids[label], "iscrowd": int(crowd)})
    return ids, segments


def imagenet_normalizer(mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> Callable[[Tensor, Tensor], Tensor]:
    """preprocess(images (B, 3, H, W) in [0, 1], padding_mask (B, H, W)) -> normalised
    images, padding set to 0 (normalise, then pad: as DETR and the frozen detector)."""
    def preprocess(images: Tensor, padding_mask: Tensor) -> Tensor:
        m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        return ((images - m) / s).masked_fill(padding_mask[:, None], 0.0)
    return preprocess


def _default_preprocess(model) -> Callable[[Tensor, Tensor], Tensor]:
    """The model's detector's mean/std (``model.config.image_mean``), else ImageNet's."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "image_mean"):
        return imagenet_normalizer(config.image_mean, config.image_std)
    return imagenet_normalizer()


def _device(model) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model, items: Dataset, *, tasks: Sequence[str], isthing: Tensor,
            settings: InferenceSettings, preprocess: Callable[[Tensor, Tensor], Tensor],
            batch_size: int = 2, num_workers: int = 0,
            progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[dict, dict]]:
    """(meta, :func:`postprocess_image` result at the original size) of each readable image
    of ``items`` ((view image, meta with ``orig_size``, ``size``) pairs), in order."""
    loader = DataLoader(items, batch_size=batch_size, collate_fn=collate,
                        num_workers=num_workers)
    device, done = _device(model), 0
    for images, padding_mask, metas in loader:
        done += batch_size
        if metas:
            padding_mask = padding_mask.to(device)
            output = model(preprocess(images.to(device), padding_mask), padding_mask)
            yield from _image_results(output, metas, tasks, isthing, settings)
        if progress is not None:
            progress(min(done, len(items)), len(items))


def _image_results(output, metas: list[dict], tasks, isthing, settings):
    final = output.final
    for b, meta in enumerate(metas):
        view = [int(v) for v in output.image_sizes[b]]
        if view != [int(v) for v in meta["size"]]:
            raise ValueError(f"image {meta['image_id']}: the model's image size {view} is "
                             f"not the view's {meta['size'].tolist()}")
        orig = [int(v) for v in meta["orig_size"]]
        yield meta, postprocess_image(final.logits[b], final.boxes[b], final.masks[b], view,
                                      orig, isthing=isthing, tasks=tasks, settings=settings)


def evaluate_maskdino(model, split: EvalSplit, out_dir: str | Path, *,
                      tasks: Sequence[str] | None = None, transform: Transform | None = None,
                      preprocess: Callable[[Tensor, Tensor], Tensor] | None = None,
                      settings: InferenceSettings | None = None, batch_size: int = 2,
                      num_workers: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Evaluate ``model`` (forward(images, padding_mask) -> MaskDINOOutput) on ``split``.

    tasks: default, every task ``split`` has files for. transform: the view (default
    :func:`frozenseg.data.transforms.evaluation`, 800 / 1333). preprocess: default, the
    model's mean/std normalisation (:func:`imagenet_normalizer`). Writes ``results.json``
    (COCO instance results, the dataset's category ids; instance task only) and
    ``metrics.json`` in ``out_dir``; returns {"bbox", "segm", "per_class" (coco_evaluate's),
    "panoptic" (PanopticQuality.compute), "semantic" (SemanticIoU.compute)}, each present
    when its task ran.
    """
    settings = settings or InferenceSettings()
    tasks = _check_tasks(split, tasks)
    base = split.dataset()
    scores = _Scores(base, split, tasks)
    items = _EvalItems(base, transform or evaluation(), tasks, split.semantic_png)
    isthing = torch.tensor(getattr(base, "is_thing", [True] * base.num_classes))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with (ResultsWriter(out / "results.json") if "instance" in tasks
              else contextlib.nullcontext()) as writer:
            for meta, result in predict(
                    model, items, tasks=tasks, isthing=isthing, settings=settings,
                    preprocess=preprocess or _default_preprocess(model),
                    batch_size=batch_size, num_workers=num_workers, progress=progress):
                scores.update(meta, result, writer)
    finally:
        model.train(was_training)
    metrics = scores.compute(out / "results.json")
    write_metrics(metrics, out / "metrics.json")
    return metrics


def _check_tasks(split: EvalSplit, tasks: Sequence[str] | None) -> tuple[str, ...]:
    available = split.available_tasks()
    tasks = available if tasks is None else tuple(tasks)
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        if task not in available:
            raise ValueError(f"task {task!r} needs files this split does not name "
                             "(instance: instances_json; panoptic, semantic: panoptic_json "
                             "and panoptic_png)")
    if not tasks:
        raise ValueError("no task to evaluate")
    return tasks


class _Scores:
    """What evaluation accumulates: instance results (streamed), PQ and the confusion."""

    def __init__(self, base, split: EvalSplit, tasks: Sequence[str]) -> None:
        self.category_ids = list(base.category_ids)
        names = list(base.category_names)
        self.coco = load_ground_truth(split.instances_json) if "instance" in tasks else None
        self.coco_categories = set(self.coco.getCatIds()) if self.coco else set()
        self.image_ids: list[int] = []
        self.pq = self.iou = None
        if "panoptic" in tasks:
            self.pq = PanopticQuality([{"id": c, "name": n, "isthing": t} for c, n, t in zip(
                self.category_ids, names, base.is_thing, strict=True)])
        if "semantic" in tasks:
            self.iou = SemanticIoU(len(names), IGNORE, names)

    def update(self, meta: dict, result: dict, writer) -> None:
        self.image_ids.append(int(meta["image_id"]))
        if "instance" in result:
            writer.write(self._coco_results(int(meta["image_id"]), result["instance"]))
        if "panoptic" in result:
            ids, segments = result["panoptic"]
            segments = [{"id": s["id"], "category_id": self.category_ids[s["category_id"]]}
                        for s in segments]
            self.pq.update(ids.cpu(), segments, *meta["panoptic"])
        if "semantic" in result:
            self.iou.update(result["semantic"].argmax(0).cpu(), meta["sem_seg"])

    def _coco_results(self, image_id: int, instances: dict) -> list[dict]:
        """COCO result dicts; classes the instances json does not have are left out."""
        if image_id not in self.coco.imgs:
            return []
        ids = [self.category_ids[k] for k in instances["labels"].tolist()]
        keep = [i for i, c in enumerate(ids) if c in self.coco_categories]
        masks, boxes = instances["masks"][keep], instances["boxes"][keep].cpu()
        scores = instances["scores"][keep].tolist()
        size = masks.shape[-2:]
        return [{"image_id": image_id, "category_id": ids[i], "bbox": _xywh(box, size),
                 "score": score, "segmentation": rle}
                for i, box, score, rle in zip(keep, boxes, scores, encode_masks(masks),
                                              strict=True)]

    def compute(self, results_path: Path) -> dict:
        metrics: dict = {}
        if self.coco is not None:
            ids = sorted(set(self.image_ids) & set(self.coco.getImgIds()))
            if ids:
                metrics.update(coco_evaluate(self.coco, results_path, image_ids=ids))
        if self.pq is not None:
            metrics["panoptic"] = self.pq.compute()
        if self.iou is not None:
            metrics["semantic"] = self.iou.compute()
        return metrics


def _xywh(box: Tensor, size: Sequence[int]) -> list[float]:
    """xyxy pixels -> COCO [x, y, w, h], clipped to the image of ``size`` (H, W), 2 decimals."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = (min(max(v, 0.0), size[1]) for v in (x0, x1))
    y0, y1 = (min(max(v, 0.0), size[0]) for v in (y0, y1))
    values = [x0, y0, x1 - x0, y1 - y0]
    return [round(v, 2) if math.isfinite(v) else 0.0 for v in values]
