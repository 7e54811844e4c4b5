"""A COCO panoptic segmentation dataset (things and stuff), for Mask DINO's joint mode.

``CocoPanoptic(images_dir, panoptic_json, panoptic_png_dir, transform=...)[i]`` is
``(image, target)`` with :class:`frozenseg.data.coco.CocoInstances`' target contract,
one entry per panoptic segment:

* ``image``: float32 (3, H, W), RGB in [0, 1];
* ``target``: ``image_id`` (int), ``boxes`` (N, 4) float32 xyxy in absolute pixels (the
  mask's bounding box, measured on the PNG), ``labels`` (N,) int64 contiguous indices
  over all panoptic categories, things and stuff (sorted ids -> 0..K-1: ``category_ids``
  and ``category_index``), ``masks`` (N, H, W) bool and disjoint, ``iscrowd`` (N,) bool,
  ``isthing`` (N,) bool, ``area`` (N,) float32 (the mask's pixel count), ``orig_size``
  and ``size`` (2,) int64 (H, W), and ``view`` (see :mod:`frozenseg.data.transforms`).

The files are COCO panoptic's: a json with ``images``, ``categories`` (each with
``isthing``) and ``annotations``, one per image: ``image_id``, ``file_name`` of its PNG
in ``panoptic_png_dir`` and ``segments_info`` (``id``, ``category_id``, ``iscrowd``;
``bbox`` and ``area`` are not read: the PNG is the truth they were measured on). The
PNG stores each pixel's segment id as RGB, id = R + 256 G + 256^2 B; 0, and any id that
no segment lists, is void (no mask covers it). :func:`panoptic_to_semantic` turns a
target into a semantic label map.

Failure policy, as CocoInstances': a json that is not COCO panoptic raises a one-line
``ValueError`` naming the file and the field; an image or PNG that cannot be read, or
is not the size the json says, makes ``__getitem__`` warn once per path and return
None. Segments listed in the json but absent from their PNG are dropped, with one
warning for the whole dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.ops import masks_to_boxes

from frozenseg.data.common import (
    ImageDataset,
    check_file_name,
    image_to_tensor,
    read_categories,
    read_images,
    read_json,
    require,
)
from frozenseg.data.images import read_stored
from frozenseg.data.transforms import Transform, identity_view

# (segment id, contiguous label, iscrowd) for each segment of an image.
Segment = tuple[int, int, bool]
_MAX_SEGMENT_ID = 256**3 - 1  # what three 8-bit channels hold


class CocoPanoptic(ImageDataset):
    """A COCO panoptic json, its PNG folder and the images (see the module docstring).

    ``is_thing[k]`` says whether class index k is a thing; ``thing_classes`` and
    ``stuff_classes`` list the class indices of each kind.
    """

    def __init__(self, images_dir: str | Path, panoptic_json: str | Path,
                 panoptic_png_dir: str | Path, *, transform: Transform | None = None) -> None:
        super().__init__(transform)
        self.images_dir = Path(images_dir)
        self.panoptic_json = Path(panoptic_json)
        self.panoptic_png_dir = Path(panoptic_png_dir)
        data = read_json(self.panoptic_json, "COCO panoptic")
        self.category_ids, self.category_names = read_categories(data, self.panoptic_json)
        self.category_index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.is_thing = _read_isthing(data, self.panoptic_json, self.category_ids)
        self.thing_classes = [k for k, thing in enumerate(self.is_thing) if thing]
        self.stuff_classes = [k for k, thing in enumerate(self.is_thing) if not thing]
        self.images = read_images(data, self.panoptic_json)
        self._annotations = _read_annotations(data, self.panoptic_json, self.images,
                                              self.category_index)

    def png_path(self, index: int) -> Path:
        return self.panoptic_png_dir / self._annotations[index]["file_name"]

    def _load(self, index: int) -> tuple[torch.Tensor, dict] | None:
        """The untransformed item, or None when its image or PNG cannot be read."""
        info, path = self.images[index], self.image_path(index)
        size = (info["height"], info["width"])
        pil = self._open(path, "image")
        if pil is None or not self._has_size(pil, path, "image", size,
                                             f"{self.panoptic_json} says"):
            return None
        ids = self._read_ids(index, size)
        return None if ids is None else (image_to_tensor(pil), self._target(index, ids))

    def _read_ids(self, index: int, size: tuple[int, int]) -> torch.Tensor | None:
        """The PNG's segment id per pixel, int64 (H, W), or None after a warning."""
        png = self.png_path(index)
        pil = self._open(png, "panoptic PNG", read_stored)
        if pil is None or not self._has_size(pil, png, "panoptic PNG", size, "its image is"):
            return None
        return torch.from_numpy(rgb_to_id(np.asarray(pil.convert("RGB"))))

    def _target(self, index: int, ids: torch.Tensor) -> dict:
        segments = self._annotations[index]["segments"]
        seg_ids = torch.tensor([s[0] for s in segments], dtype=torch.int64)
        masks = ids[None] == seg_ids[:, None, None]  # (N, H, W)
        present = masks.flatten(1).any(1).tolist()
        if not all(present):
            self._warn_present(index, present.count(False))
            masks = masks[torch.tensor(present)]
            segments = [s for s, keep in zip(segments, present, strict=True) if keep]
        labels = torch.tensor([s[1] for s in segments], dtype=torch.int64)
        size = torch.tensor(ids.shape, dtype=torch.int64)
        return {
            "image_id": self.images[index]["id"],
            # masks_to_boxes gives the last pixel; xyxy pixel edges end one further.
            "boxes": masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]),
            "labels": labels,
            "masks": masks,
            "iscrowd": torch.tensor([s[2] for s in segments], dtype=torch.bool),
            "isthing": torch.tensor(self.is_thing, dtype=torch.bool)[labels],
            "area": masks.flatten(1).sum(1).to(torch.float32),
            "orig_size": size,
            "size": size.clone(),
            "view": identity_view(ids.shape),
        }

    def _warn_present(self, index: int, missing: int) -> None:
        self._warn_once("segments missing from their PNG",
                        f"{self.png_path(index)}: {missing} segment(s) listed in "
                        f"{self.panoptic_json} have no pixels in the PNG; dropped (this "
                        "warning is shown once per dataset)")

    def __repr__(self) -> str:
        return (f"CocoPanoptic({str(self.panoptic_json)!r}: {len(self)} images, "
                f"{len(self.thing_classes)} thing + {len(self.stuff_classes)} stuff "
                f"categories, transform={self.transform!r})")


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG pixels (H, W, 3) uint8 -> segment ids (H, W) int64, R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_to_semantic(target: dict, ignore_value: int = 255) -> torch.Tensor:
    """Each pixel's class, (H, W) int64, from a panoptic target; ``ignore_value`` where void.

    ``target["masks"]`` (N, H, W) bool must be disjoint (as CocoPanoptic's are, before
    and after a transform); ``target["labels"]`` (N,) are the classes. Crowd segments
    keep their class, as in detectron2's semantic files made from COCO panoptic.
    """
    masks, labels = target["masks"], target["labels"]
    semantic = torch.full(masks.shape[-2:], ignore_value, dtype=torch.int64)
    for mask, label in zip(masks, labels, strict=True):
        semantic[mask] = label
    return semantic


# --------------------------------------------------------------------------- reading


def _read_isthing(data: dict, path: Path, category_ids: list[int]) -> list[bool]:
    """Whether each category (in ``category_ids`` order) is a thing."""
    isthing = {}
    for i, cat in enumerate(data["categories"]):
        require(cat, ("isthing",), path, f"categories[{i}]")
        isthing[int(cat["id"])] = bool(cat["isthing"])
    return [isthing[cid] for cid in category_ids]


def _read_annotations(data: dict, path: Path, images: list[dict],
                      category_index: dict[int, int]) -> list[dict]:
    """For each image (in ``images`` order): its PNG's ``file_name`` and its ``segments``."""
    known = {im["id"] for im in images}
    per_image: dict[int, dict] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        require(ann, ("image_id", "file_name", "segments_info"), path, where)
        if ann["image_id"] not in known:
            raise ValueError(f"{path}: {where}: 'image_id' {ann['image_id']} is not in 'images'")
        if ann["image_id"] in per_image:
            raise ValueError(f"{path}: {where}: 'image_id' {ann['image_id']} already has an "
                             "annotation")
        check_file_name(ann["file_name"], path, where)
        per_image[ann["image_id"]] = {
            "file_name": str(ann["file_name"]),
            "segments": _read_segments(ann["segments_info"], path, where, category_index)}
    for im in images:
        if im["id"] not in per_image:
            raise ValueError(f"{path}: images: id {im['id']} has no entry in 'annotations'")
    return [per_image[im["id"]] for im in images]


def _read_segments(segments_info: object, path: Path, where: str,
                   category_index: dict[int, int]) -> list[Segment]:
    if not isinstance(segments_info, list):
        raise ValueError(f"{path}: {where}: 'segments_info' is not a list")
    segments = []
    for j, seg in enumerate(segments_info):
        here = f"{where}.segments_info[{j}]"
        require(seg, ("id", "category_id"), path, here)
        seg_id = seg["id"]
        if not isinstance(seg_id, int) or isinstance(seg_id, bool) \
                or not 0 < seg_id <= _MAX_SEGMENT_ID:
            raise ValueError(f"{path}: {here}: 'id' {seg_id!r} is not a segment id "
                             f"(an integer in 1..{_MAX_SEGMENT_ID})")
        if seg["category_id"] not in category_index:
            raise ValueError(f"{path}: {here}: 'category_id' {seg['category_id']} "
                             "is not in 'categories'")
        segments.append((seg_id, category_index[seg["category_id"]], bool(seg.get("iscrowd", 0))))
    if len({s[0] for s in segments}) != len(segments):
        raise ValueError(f"{path}: {where}: 'segments_info' has a duplicate 'id'")
    return segments
