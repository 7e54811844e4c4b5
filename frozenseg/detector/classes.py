"""What a detector's class indices mean: names and dataset category ids.

COCO detectors come in two layouts: 91 slots indexed by the COCO category id itself
(official DETR, Deformable DETR, DINO, H-DETR, Hugging Face; unused ids never fire)
and 80 contiguous classes (detectron2 / detrex). Both map back to COCO's ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
    20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl",
    52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch",
    64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
    80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def class_map(num_classes: int, names: list[str] | None = None) -> dict[str, list]:
    """{"names": [...], "category_ids": [...]}, one entry per classifier index.

    Given names are contiguous classes 0..K-1. Without names, 91 and 80 classes are
    taken to be COCO's two layouts; other counts get no names. None marks a slot that
    stands for no category.
    """
    if names is not None:
        return {"names": list(names), "category_ids": list(range(num_classes))}
    if num_classes == 91:
        ids = [i if i in COCO_CATEGORIES else None for i in range(91)]
        return {"names": [COCO_CATEGORIES.get(i) for i in range(91)], "category_ids": ids}
    if num_classes == len(COCO_CATEGORIES):
        return {"names": list(COCO_CATEGORIES.values()), "category_ids": list(COCO_CATEGORIES)}
    return {"names": [None] * num_classes, "category_ids": list(range(num_classes))}


class ClassMapping:
    """Between a detector's class indices and a dataset's category ids.

    ``category_ids[i]`` is the dataset category id of detector class i, or None where
    the class is no category of the dataset (its predictions are dropped).
    """

    def __init__(self, category_ids: Sequence[int | None]) -> None:
        self.category_ids = list(category_ids)
        self._index = {cid: i for i, cid in enumerate(self.category_ids) if cid is not None}

    def to_category_ids(self, labels: Tensor) -> Tensor:
        """Detector class indices -> dataset category ids, -1 where there is none."""
        table = torch.tensor([-1 if c is None else c for c in self.category_ids],
                             dtype=torch.int64, device=labels.device)
        return table[labels]

    def to_detector(self, category_ids: Sequence[int]) -> list[int] | None:
        """Dataset category ids -> detector class indices; None if one has no class."""
        labels = [self._index.get(int(c)) for c in category_ids]
        return None if None in labels else labels

    def detector_labels(self, labels: Tensor, dataset_category_ids: Sequence[int]
                        ) -> Tensor | None:
        """A dataset's contiguous labels (its ``category_ids[label]``) -> detector class
        indices, the labels ``FrozenDetector.embed_boxes`` takes; None if one has no class
        (the boxes then get the detector's mean content query)."""
        mapped = self.to_detector([dataset_category_ids[i] for i in labels.tolist()])
        return None if mapped is None else torch.tensor(mapped, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"ClassMapping({self.category_ids})"


def match_classes(detector_classes: dict, category_ids: Sequence[int],
                  category_names: Sequence[str]) -> ClassMapping:
    """How a detector's classes (``FrozenDetector.classes``) map onto a dataset's categories.

    * By name, when the detector names its classes (COCO's 91 and 80 layouts always do,
      a converted detector does with ``--class-names``); a dataset category the detector
      does not know gets a warning, no overlap at all is an error.
    * An unnamed detector follows the detectron2 convention: class i is the dataset's
      i-th category in id order (a detector trained on this dataset).
    """
    names = detector_classes["names"]
    if all(n is None for n in names):
        return ClassMapping([category_ids[i] if i < len(category_ids) else None
                             for i in range(len(names))])
    by_name = {name.casefold(): cid for cid, name in zip(category_ids, category_names,
                                                           strict=True)}
    mapped = [None if n is None else by_name.get(n.casefold()) for n in names]
    found = {c for c in mapped if c is not None}
    if not found:
        raise ValueError(f"the detector's classes ({_first(names)}) share no name with the "
                         f"dataset's categories ({_first(category_names)}); convert the "
                         "detector with --class-names")
    missing = [n for cid, n in zip(category_ids, category_names, strict=True) if cid not in found]
    if missing:
        warnings.warn(f"the detector has no class for {len(missing)} dataset categories "
                      f"({_first(missing)}): they get no predictions", stacklevel=2)
    return ClassMapping(mapped)


def detector_category_ids(detector_classes: dict) -> ClassMapping:
    """The detector's own category ids (no dataset given: a folder of images)."""
    return ClassMapping(detector_classes["category_ids"])


def classes_for(detector_classes: dict, category_ids: Sequence[int],
                category_names: Sequence[str]) -> tuple[ClassMapping, dict[int, str]]:
    """(mapping, category id -> name) for results on a dataset: its categories when it has
    some (:func:`match_classes`), else the detector's own ids and names (a folder of
    images)."""
    if category_ids:
        classes = match_classes(detector_classes, category_ids, category_names)
        return classes, dict(zip(category_ids, category_names, strict=True))
    classes = detector_category_ids(detector_classes)
    names = {cid: name for cid, name in zip(classes.category_ids, detector_classes["names"],
                                            strict=True) if cid is not None and name}
    return classes, names


def _first(names: Sequence[str | None], n: int = 5) -> str:
    shown = ", ".join(str(name) for name in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
