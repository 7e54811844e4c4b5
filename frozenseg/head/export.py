"""Masks out: a detector's predictions, or any detector's boxes, as a COCO results json.

:func:`export_results` runs the frozen detector and the head over a folder of images
(:class:`frozenseg.data.ImageFolder`, from files or from a COCO json's image table) and
streams COCO results (:mod:`frozenseg.evaluation.results`) to a file:

* without ``boxes``: the detector's own top-K detections; ``score`` is the class score
  times the predicted mask IoU, ``mask_quality`` the predicted IoU;
* with ``boxes`` (:func:`read_boxes`: another detector's COCO results json, any
  detector): the same entries in the same order, every field kept as it was, with
  ``segmentation`` and ``mask_quality`` added. The boxes reach the head through
  ``FrozenDetector.embed_boxes``: the decoder runs with them as its reference boxes.
  A box reaching outside its image is clipped for the head (its ``bbox`` stays as
  given); one with nothing left inside the image gets an empty mask and quality 0.

Memory stays flat: results are written as each image is done. The file appears only
when the whole run is done (a temporary name, then a rename); an interrupted run
resumes (``resume=True``) from its last checkpoint without writing anything twice.
``png_dir`` also writes one instance PNG per image (:class:`InstancePngs`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Subset

from frozenseg.data.common import parse_json
from frozenseg.data.folder import ImageFolder
from frozenseg.detector.classes import ClassMapping
from frozenseg.evaluation.results import ResultsWriter, encode_masks
from frozenseg.files import atomic_path, atomic_write_text, inside
from frozenseg.head.inference import predict
from frozenseg.head.results import mask_results, original_to_view_scale


class ExportError(ValueError):
    """Input an export cannot use; the message is one line naming the file."""


@dataclass(frozen=True)
class ExportSettings:
    """score_threshold, max_per_image: which detections are kept (the detector's own
    boxes only; given boxes are all kept); mask_threshold: on the pasted probability."""

    score_threshold: float = 0.0
    max_per_image: int = 100
    mask_threshold: float = 0.5
    batch_size: int = 2


@dataclass
class ExportSummary:
    path: Path
    results: int = 0
    images: int = 0       # images done in this run
    skipped: int = 0      # images that could not be read (warned)
    resumed: int = 0      # images an interrupted run had done
    clipped: int = 0      # given boxes reaching outside their image
    degenerate: int = 0   # given boxes with nothing inside their image: empty masks
    files: list[Path] = field(default_factory=list)


@dataclass
class ExternalBoxes:
    """A COCO results json's entries, and which belong to which image (in the order each
    image first appears)."""

    path: Path
    entries: list[dict]
    by_image: dict[int, list[int]]
    sha256: str


def read_boxes(path: str | os.PathLike, image_ids: Collection[int]) -> ExternalBoxes:
    """A detector's COCO results json (a list of {image_id, bbox [x, y, w, h], ...}).

    Raises ExportError naming the file and the first bad entry, or the ``image_id``s
    that are not among ``image_ids``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        entries = parse_json(raw, path)
    except OSError as err:
        raise ExportError(f"{path}: {err.strerror or err}") from None
    except ValueError as err:  # parse_json's line
        raise ExportError(str(err)) from None
    if not isinstance(entries, list):
        raise ExportError(f"{path}: not a COCO results file: the top level is not a list")
    by_image: dict[int, list[int]] = {}
    for i, entry in enumerate(entries):
        _check_entry(entry, path, i)
        by_image.setdefault(entry["image_id"], []).append(i)
    unknown = sorted(set(by_image) - set(image_ids))
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise ExportError(f"{path}: {len(unknown)} image_id(s) not among the images: {shown}")
    return ExternalBoxes(path, entries, by_image, hashlib.sha256(raw).hexdigest())


def _check_entry(entry, path: Path, i: int) -> None:
    where = f"{path}: entry {i}"
    if not isinstance(entry, dict):
        raise ExportError(f"{where} is not an object")
    if not isinstance(entry.get("image_id"), int):
        raise ExportError(f"{where}: 'image_id' must be an integer, got {entry.get('image_id')!r}")
    box = entry.get("bbox")
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        raise ExportError(f"{where}: 'bbox' must be [x, y, w, h] finite numbers, got {box!r}")
    if "category_id" in entry and not isinstance(entry["category_id"], int):
        raise ExportError(f"{where}: 'category_id' must be an integer")


# ------------------------------------------------------------------------------ export


@torch.no_grad()
def export_results(model, dataset: ImageFolder, out: str | os.PathLike, *,
                   classes: ClassMapping, settings: ExportSettings = ExportSettings(),
                   boxes: ExternalBoxes | None = None, png_dir: str | os.PathLike | None = None,
                   resume: bool = False, job: dict | None = None,
                   progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Masks by ``model`` (a :class:`frozenseg.MaskFrozenDETR`) for ``dataset``'s images
    (its transform is the view the head saw in training: ``model.view``) -> COCO results
    at ``out``.

    classes: detector class -> category id (``match_classes`` for an annotated dataset,
      ``detector_category_ids`` for plain images).
    job: JSON describing the inputs (paths of detector, head, images); a resumed run must
      have the same job, settings, boxes and png_dir as the interrupted one.
    progress(done, total): called with images done (including a resumed run's).
    """
    summary = ExportSummary(Path(out))
    pngs = InstancePngs(png_dir, dataset) if png_dir is not None else None
    key = {**(job or {}), "settings": asdict(settings), "png_dir": str(png_dir),
           "boxes": boxes.sha256 if boxes else None, "images": len(dataset)}
    model.eval()
    with ResultsWriter(out, resume_key=key, resume=resume) as writer:
        if boxes is None:
            _detections(model, dataset, writer, classes, settings, pngs, summary,
                        progress)
        else:
            _given_boxes(model, dataset, writer, classes, settings, boxes, pngs,
                         summary, progress)
    summary.results = writer.count
    if isinstance(dataset, ImageFolder) and not dataset.category_ids:
        summary.files.append(write_image_table(dataset, classes, model.detector.classes, out))
    return summary


def _detections(model, dataset, writer, classes, settings, pngs, summary,
                progress) -> None:
    """The detector's own boxes, ``batch_size`` images at a time; a checkpoint per batch."""
    start = (writer.progress or {}).get("done", 0)
    summary.resumed = start

    def batch_done(done: int, _total: int) -> None:
        writer.checkpoint({"done": start + done})
        if progress:
            progress(start + done, len(dataset))

    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    for target, results in predict(
            model, Subset(dataset, range(start, len(dataset))), classes=classes,
            batch_size=settings.batch_size, score_threshold=settings.score_threshold,
            max_per_image=settings.max_per_image, mask_threshold=settings.mask_threshold,
            progress=batch_done):
        writer.write(results)
        summary.images += 1
        if pngs:
            pngs.write(dataset.images[index_of[int(target["image_id"])]],
                       [r["segmentation"] for r in results])
    summary.skipped = len(dataset) - start - summary.images


def _given_boxes(model, dataset, writer, classes, settings, boxes, pngs, summary,
                 progress) -> None:
    """Another detector's boxes, image by image in the order the images first appear;
    entries are written in their original order (a small buffer holds the entries of an
    image that comes out of order)."""
    order = list(boxes.by_image)
    state = writer.progress or {"images": 0, "next": 0, "pending": {}, "counts": [0, 0]}
    pending = {int(k): v for k, v in state["pending"].items()}
    next_entry, (summary.clipped, summary.degenerate) = state["next"], state["counts"]
    summary.resumed = state["images"]
    index_of = {im["id"]: i for i, im in enumerate(dataset.images)}
    device = model.device
    for n in range(state["images"], len(order)):
        index = index_of[order[n]]
        item = dataset[index]
        entry_ids = boxes.by_image[order[n]]
        if item is None:
            raise ExportError(f"{dataset.image_path(index)}: cannot be read, and "
                              f"{boxes.path} has {len(entry_ids)} boxes on it")
        entries = [boxes.entries[i] for i in entry_ids]
        masks, clipped, degenerate = masks_for_boxes(
            model, classes, (item[0].to(device), item[1]), entries,
            settings.mask_threshold)
        summary.clipped += clipped
        summary.degenerate += degenerate
        for i, entry, (rle, quality) in zip(entry_ids, entries, masks, strict=True):
            pending[i] = {**entry, "segmentation": rle,
                          **({} if quality is None else {"mask_quality": quality})}
        while next_entry in pending:
            writer.write([pending.pop(next_entry)])
            next_entry += 1
        if pngs:
            pngs.write(dataset.images[index], [rle for rle, _ in masks])
        summary.images += 1
        writer.checkpoint({"images": n + 1, "next": next_entry, "pending": pending,
                           "counts": [summary.clipped, summary.degenerate]})
        if progress:
            progress(n + 1, len(order))


@torch.no_grad()
def masks_for_boxes(model, classes: ClassMapping, item: tuple, entries: list[dict],
                    mask_threshold: float = 0.5) -> tuple[list[tuple[dict, float | None]],
                                                          int, int]:
    """([(RLE, mask quality)] per entry, in order; boxes clipped; boxes degenerate).

    item: (image, target) of the view (``target["size"]``) of the original image
    (``target["orig_size"]``); entries: COCO results on it (``bbox`` xywh, original pixels;
    ``category_id`` optional, used for the detector's label embedding where it has one).
    """
    image, target = item
    height, width = (int(v) for v in target["orig_size"])
    xywh = torch.tensor([e["bbox"] for e in entries], dtype=torch.float64).reshape(-1, 4)
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    inside = torch.stack([xyxy[:, 0].clamp(0, width), xyxy[:, 1].clamp(0, height),
                          xyxy[:, 2].clamp(0, width), xyxy[:, 3].clamp(0, height)], 1)
    clipped = int((inside != xyxy).any(1).sum())
    valid = (inside[:, 2] > inside[:, 0]) & (inside[:, 3] > inside[:, 1])
    empty = encode_masks(torch.zeros(1, height, width, dtype=torch.bool))[0]
    masks: list[tuple[dict, float | None]] = [(empty, 0.0)] * len(entries)
    kept = valid.nonzero().flatten().tolist()
    if kept:
        scale = original_to_view_scale([int(v) for v in target["size"]], (height, width))
        view_boxes = (inside[kept] * scale).float().to(image.device)
        categories = [entries[i].get("category_id") for i in kept]
        labels = None if None in categories else classes.to_detector(categories)
        head_output = model([image], [view_boxes], None if labels is None
                            else [torch.tensor(labels, device=image.device)])
        order = head_output.query_index.argsort()  # the masks in the order of the boxes
        rles, quality = mask_results(head_output, order, target, mask_threshold)
        for i, rle, q in zip(kept, rles, quality, strict=True):
            masks[i] = (rle, q)
    return masks, clipped, len(entries) - len(kept)


# ------------------------------------------------------------------------------ side files


class InstancePngs:
    """One PNG per image of ``dataset`` in ``folder`` (the image's file name, extension
    .png): pixel value k is the image's k-th result in the json (1-based; 0: no instance),
    where two masks overlap, the earlier (the better scoring, for the detector's own
    boxes). 8-bit up to 255 instances, else 16-bit."""

    def __init__(self, folder: str | os.PathLike, dataset: ImageFolder) -> None:
        self.paths = dict(zip((im["id"] for im in dataset.images),
                              per_image_paths(folder, dataset, ".png"), strict=True))

    def write(self, image: dict, rles: list[dict]) -> Path:
        ids = np.zeros((image["height"], image["width"]),
                       dtype=np.uint8 if len(rles) < 256 else np.uint16)
        for k in range(len(rles), 0, -1):  # the first result painted last: on top
            ids[mask_utils.decode(rles[k - 1]).astype(bool)] = k
        path = self.paths[image["id"]]
        with atomic_path(path) as tmp:
            Image.fromarray(ids).save(tmp, format="PNG")
        return path


def per_image_paths(folder: str | os.PathLike, dataset: ImageFolder, suffix: str) -> list[Path]:
    """The file of each image of ``dataset`` in ``folder``, named after the image (``a/b.jpg``
    -> ``a/b`` + ``suffix``), checked before anything is written: inside ``folder`` (see
    :func:`frozenseg.files.inside`) and never one of the images themselves (a PNG image
    with its results folder set to its own folder)."""
    paths = [inside(folder, im["file_name"]).with_suffix(suffix) for im in dataset.images]
    sources = {dataset.image_path(i).resolve() for i in range(len(dataset))}
    for path in paths:
        if path.resolve() in sources:
            raise ExportError(f"{path}: would overwrite that input image; write to another "
                              "folder")
    return paths


def write_image_table(dataset: ImageFolder, classes: ClassMapping, detector_classes: dict,
                      out: str | os.PathLike) -> Path:
    """``<out>.images.json`` beside results on plain images: a COCO file with the image
    table (ids, file names, sizes) and the detector's categories, so that
    ``COCO(images_json).loadRes(results)`` works and ids lead back to files."""
    out = Path(out)
    names = detector_classes["names"]
    categories = [{"id": cid, "name": names[i] if names[i] is not None else str(cid)}
                  for i, cid in enumerate(classes.category_ids) if cid is not None]
    path = out.with_name(out.stem + ".images.json")
    atomic_write_text(path, json.dumps({"images": dataset.images, "annotations": [],
                                        "categories": categories}) + "\n")
    return path
