"""A semantic segmentation dataset: a folder of images and a folder of label PNGs.

``SemanticSegmentation(images_dir, labels_dir, categories=names, transform=...)[i]`` is
``(image, target)``:

* ``image``: float32 (3, H, W), RGB in [0, 1];
* ``target``: ``sem_seg`` (H, W) int64, the class index of each pixel, in
  [0, len(categories)) or ``ignore_value``; ``ignore_value`` (int); ``image_id`` (str,
  the image's file stem); ``file_name`` (the image's name in ``images_dir``);
  ``orig_size`` and ``size`` (2,) int64 (H, W); ``view`` (see
  :mod:`frozenseg.data.transforms`, which resamples ``sem_seg`` nearest-neighbour and
  gives the pixels it pads ``ignore_value``).

The images are the files of ``images_dir`` with an image extension, sorted by name;
the label map of ``x.jpg`` is ``labels_dir/x.png``, one channel (PIL mode L, P for a
palette index, I or I;16) of class indices. That is ADE20K as detectron2 prepares it
(``annotations_detectron2``: 150 classes 0..149, 255 ignored) and frozenseg synth's
layout (``images/{split}`` and ``semantic_{split}``, classes named in
``semantic_categories.json``, read by :func:`read_semantic_categories`).

Failure policy. Images without a label PNG are left out with one warning
(``num_unlabelled`` counts them); no labelled image at all, or two images of one stem,
raise a ``ValueError`` naming the folder. In ``__getitem__`` an image or label map that
cannot be read, a label map of another size, of several channels, or holding a value
that is neither a class index nor ``ignore_value``, warns once per path and returns None.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frozenseg.data.common import ImageDataset, image_to_tensor, read_json, require
from frozenseg.data.images import read_stored
from frozenseg.data.transforms import Transform, identity_view

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_LABEL_MODES = ("L", "P", "I", "I;16")


class SemanticSegmentation(ImageDataset):
    """Images and their label PNGs matched by file stem (see the module docstring)."""

    def __init__(self, images_dir: str | Path, labels_dir: str | Path, *,
                 categories: Sequence[str], ignore_value: int = 255,
                 transform: Transform | None = None) -> None:
        super().__init__(transform)
        self.images_dir, self.labels_dir = Path(images_dir), Path(labels_dir)
        self.category_names = [str(name) for name in categories]
        self.ignore_value = int(ignore_value)
        if 0 <= self.ignore_value < self.num_classes:
            raise ValueError(f"ignore_value {self.ignore_value} is a class index "
                             f"(there are {self.num_classes} categories)")
        self.file_names, self.num_unlabelled = _pair_files(self.images_dir, self.labels_dir)
        if self.num_unlabelled:
            warnings.warn(f"{self.images_dir}: {self.num_unlabelled} image(s) have no label "
                          f"PNG of the same stem in {self.labels_dir}; left out", stacklevel=2)

    def __len__(self) -> int:
        return len(self.file_names)

    @property
    def num_classes(self) -> int:
        return len(self.category_names)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.file_names[index]

    def label_path(self, index: int) -> Path:
        return self.labels_dir / f"{Path(self.file_names[index]).stem}.png"

    def _load(self, index: int) -> tuple[torch.Tensor, dict] | None:
        """The untransformed item, or None when its image or label map cannot be read."""
        pil = self._open(self.image_path(index), "image")
        if pil is None:
            return None
        sem_seg = self._read_labels(self.label_path(index), (pil.height, pil.width))
        return None if sem_seg is None else (image_to_tensor(pil), self._target(index, sem_seg))

    def _read_labels(self, path: Path, size: tuple[int, int]) -> torch.Tensor | None:
        """The label map at ``path`` as int64 (H, W), or None after a warning."""
        pil = self._open(path, "label map", read_stored)
        if pil is None or not self._has_size(pil, path, "label map", size, "its image is"):
            return None
        if pil.mode not in _LABEL_MODES:
            self._warn_once(path, f"label map {path} has mode {pil.mode}, not one channel of "
                                  f"class indices ({', '.join(_LABEL_MODES)}); skipped")
            return None
        labels = torch.from_numpy(np.asarray(pil).astype(np.int64))
        bad = ((labels < 0) | (labels >= self.num_classes)) & (labels != self.ignore_value)
        if bool(bad.any()):
            self._warn_once(path, f"label map {path} holds {int(labels[bad][0])}, neither a "
                                  f"class index (0..{self.num_classes - 1}) nor the ignore "
                                  f"value {self.ignore_value}; skipped")
            return None
        return labels

    def _target(self, index: int, sem_seg: torch.Tensor) -> dict:
        size = torch.tensor(sem_seg.shape, dtype=torch.int64)
        return {"image_id": Path(self.file_names[index]).stem,
                "file_name": self.file_names[index],
                "sem_seg": sem_seg,
                "ignore_value": self.ignore_value,
                "orig_size": size,
                "size": size.clone(),
                "view": identity_view(sem_seg.shape)}

    def __repr__(self) -> str:
        return (f"SemanticSegmentation({str(self.images_dir)!r}, {str(self.labels_dir)!r}: "
                f"{len(self)} images, {self.num_classes} categories, "
                f"transform={self.transform!r})")


def _pair_files(images_dir: Path, labels_dir: Path) -> tuple[list[str], int]:
    """The images of ``images_dir`` with a label PNG (names, sorted) and how many have none."""
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
    names = sorted(p.name for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    stems = [Path(name).stem for name in names]
    if len(set(stems)) != len(stems):
        stem = next(s for s in stems if stems.count(s) > 1)
        raise ValueError(f"{images_dir}: several images have the stem {stem!r}; "
                         f"{labels_dir / (stem + '.png')} cannot label them all")
    labelled_stems = {p.stem for p in labels_dir.glob("*.png")}
    labelled = [name for name, stem in zip(names, stems, strict=True) if stem in labelled_stems]
    if not labelled:
        raise ValueError(f"{images_dir}: no image has a label PNG of the same stem "
                         f"in {labels_dir}")
    return labelled, len(names) - len(labelled)


# ----------------------------------------------------------------------- categories


@dataclass(frozen=True)
class SemanticCategories:
    """What the class indices of a folder of label PNGs mean: index k is ``names[k]``."""

    names: list[str]
    ids: list[int]  # the category ids of the panoptic/instances jsons
    isthing: list[bool]
    ignore_value: int


def read_semantic_categories(path: str | Path) -> SemanticCategories:
    """Read a categories file as frozenseg synth writes it (``semantic_categories.json``).

    The file: ``{"ignore_label": 255, "categories": [{"index": 0, "id": 1, "name": ...,
    "isthing": 1}, ...]}``, the indices 0..K-1 each once.
    """
    path = Path(path)
    data = read_json(path, "semantic categories", fields=("categories",))
    for i, cat in enumerate(data["categories"]):
        require(cat, ("index", "id", "name", "isthing"), path, f"categories[{i}]")
    cats = sorted(data["categories"], key=lambda c: c["index"])
    if [c["index"] for c in cats] != list(range(len(cats))):
        raise ValueError(f"{path}: categories: the 'index' values are not 0..{len(cats) - 1}")
    return SemanticCategories(names=[str(c["name"]) for c in cats],
                              ids=[int(c["id"]) for c in cats],
                              isthing=[bool(c["isthing"]) for c in cats],
                              ignore_value=int(data.get("ignore_label", 255)))
