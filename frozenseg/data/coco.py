"""A COCO-format instance segmentation dataset.

``CocoInstances(images_dir, annotations_json, transform=...)[i]`` is ``(image, target)``:

* ``image``: float32 (3, H, W), RGB in [0, 1];
* ``target``: ``image_id`` (int), ``boxes`` (N, 4) float32 xyxy in absolute pixels
  of the returned image, ``labels`` (N,) int64 contiguous class indices,
  ``masks`` (N, H, W) bool, ``iscrowd`` (N,) bool, ``area`` (N,) float32,
  ``orig_size`` (2,) int64 (H, W) as read, ``size`` (2,) int64 (H, W) after the
  transform, and ``view``: the transform's parameters (see
  :mod:`frozenseg.data.transforms`), from which :meth:`CocoInstances.get_view`
  rebuilds exactly the same item.

Category ids need not be contiguous: they are sorted and mapped to 0..K-1
(``category_ids[index]`` is the original id, ``category_index[id]`` the index).

Failure policy. The json is checked when the dataset is built: anything that is not
COCO raises a one-line ``ValueError`` naming the file and the field. Degenerate
annotations (a polygon of fewer than 3 points, a box of zero area once clipped to
the image, no segmentation at all) are dropped with one warning for the whole
dataset (``num_dropped`` counts them). An image that
cannot be read (missing, corrupt, or not the size the json says) never stops an
epoch: ``__getitem__`` warns once per path and returns None, and
:func:`frozenseg.data.collate.collate` drops the Nones.

Images are opened only in ``__getitem__`` and the dataset holds nothing but plain
Python data, so it pickles into DataLoader workers, where decoding happens. A
transform draws its parameters from Python's ``random`` module, which DataLoader
seeds differently in every worker and epoch; ``target["view"]`` records them.
Pixels are read as stored (no EXIF rotation), the frame COCO annotations refer to.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from frozenseg.data.common import (
    ImageDataset,
    image_to_tensor,
    read_categories,
    read_images,
    read_json,
    require,
)
from frozenseg.data.transforms import Transform, identity_view


class CocoInstances(ImageDataset):
    """A COCO instances json over a folder of images (see the module docstring)."""

    def __init__(self, images_dir: str | Path, annotations_json: str | Path, *,
                 transform: Transform | None = None) -> None:
        super().__init__(transform)
        self.images_dir = Path(images_dir)
        self.annotations_json = Path(annotations_json)
        data = read_json(self.annotations_json)
        self.category_ids, self.category_names = read_categories(data, self.annotations_json)
        self.category_index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = read_images(data, self.annotations_json)
        per_image, self.num_dropped = _read_annotations(
            data, self.annotations_json, {im["id"]: im for im in self.images}, self.category_index)
        self._annotations = [per_image.get(im["id"], []) for im in self.images]
        if self.num_dropped:
            warnings.warn(f"{self.annotations_json}: dropped {self.num_dropped} degenerate "
                          "annotation(s) (polygon of < 3 points, zero-area box, "
                          "or no segmentation)", stacklevel=2)

    def _load(self, index: int) -> tuple[torch.Tensor, dict] | None:
        """The untransformed item, or None when its image cannot be read."""
        info, path = self.images[index], self.image_path(index)
        pil = self._open(path, "image")
        # Masks are decoded at the json's size; a mismatched image has no valid targets.
        if pil is None or not self._has_size(pil, path, "image", (info["height"], info["width"]),
                                             f"{self.annotations_json} says"):
            return None
        return image_to_tensor(pil), self._target(index)

    def _target(self, index: int) -> dict:
        info, anns = self.images[index], self._annotations[index]
        height, width = info["height"], info["width"]
        masks = [decode_segmentation(a["segmentation"], height, width) for a in anns]
        masks = (torch.from_numpy(np.stack(masks)).bool() if masks
                 else torch.zeros((0, height, width), dtype=torch.bool))
        area = [a["area"] if a["area"] is not None else float(m.sum())
                for a, m in zip(anns, masks, strict=True)]
        size = torch.tensor([height, width], dtype=torch.int64)
        return {
            "image_id": info["id"],
            "boxes": torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "masks": masks,
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.bool),
            "area": torch.tensor(area, dtype=torch.float32),
            "orig_size": size,
            "size": size.clone(),
            "view": identity_view((height, width)),
        }

    def __repr__(self) -> str:
        return (f"CocoInstances({str(self.annotations_json)!r}: {len(self)} images, "
                f"{self.num_classes} categories, transform={self.transform!r})")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE with str or list counts) as an (H, W) uint8 mask."""
    if isinstance(segmentation, list):  # polygons: the union of the parts
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE (crowds)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE
        rle = segmentation
    return mask_utils.decode(rle)


# --------------------------------------------------------------------------- reading


def _read_annotations(data: dict, path: Path, images: dict[int, dict],
                      category_index: dict[int, int]) -> tuple[dict[int, list[dict]], int]:
    """Compact annotation records grouped by image id, and how many were degenerate."""
    per_image: dict[int, list[dict]] = {}
    dropped = 0
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict)
                                       and "id" in ann else "")
        require(ann, ("image_id", "bbox", "category_id"), path, where)
        if ann["image_id"] not in images:
            raise ValueError(f"{path}: {where}: 'image_id' {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in category_index:
            raise ValueError(f"{path}: {where}: 'category_id' {ann['category_id']} "
                             "is not in 'categories'")
        image = images[ann["image_id"]]
        record = _annotation_record(ann, image, category_index, path, where)
        if record is None:
            dropped += 1
        else:
            per_image.setdefault(image["id"], []).append(record)
    return per_image, dropped


def _annotation_record(ann: dict, image: dict, category_index: dict[int, int],
                       path: Path, where: str) -> dict | None:
    """The fields ``__getitem__`` needs, or None for a degenerate annotation."""
    bbox = ann["bbox"]
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4
            and all(isinstance(v, int | float) for v in bbox)):
        raise ValueError(f"{path}: {where}: 'bbox' is not [x, y, width, height]")
    # xywh -> xyxy, clipped to the image as DETR does; nothing left means degenerate.
    x, y, w, h = (float(v) for v in bbox)
    box = [min(max(x, 0.0), image["width"]), min(max(y, 0.0), image["height"]),
           min(max(x + w, 0.0), image["width"]), min(max(y + h, 0.0), image["height"])]
    segmentation = _checked_segmentation(ann.get("segmentation"), image, path, where)
    if box[2] <= box[0] or box[3] <= box[1] or segmentation is None:
        return None
    area = ann.get("area")
    return {"box": box, "label": category_index[ann["category_id"]],
            "iscrowd": bool(ann.get("iscrowd", 0)), "segmentation": segmentation,
            "area": float(area) if isinstance(area, int | float) else None}


def _checked_segmentation(seg: Any, image: dict, path: Path, where: str) -> Any:
    """The segmentation with degenerate polygon parts removed; None if nothing is left."""
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise ValueError(f"{path}: {where}: 'segmentation' RLE needs 'counts' and 'size'")
        if list(seg["size"]) != [image["height"], image["width"]]:
            raise ValueError(f"{path}: {where}: 'segmentation' size {seg['size']} is not the "
                             f"image's [{image['height']}, {image['width']}]")
        return seg
    if seg is None or isinstance(seg, list):
        # A part needs 3 (x, y) points; pycocotools would also read a 4-number part as a box.
        parts = [p for p in seg or [] if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        return parts or None
    raise ValueError(f"{path}: {where}: 'segmentation' is neither polygons nor RLE")
