"""What the datasets of frozenseg.data share: json checks, unreadable files, views.

* The json readers raise a one-line ``ValueError`` naming the file and the field for
  anything that is not the expected COCO format.
* :class:`ImageDataset` is the base of the datasets: a subclass reads the untransformed
  item in ``_load(index)`` (or returns None); ``__getitem__`` transforms it and
  :meth:`ImageDataset.get_view` rebuilds a recorded view. A file that cannot be read,
  or has the wrong size, never stops an epoch: the dataset warns once per path and
  returns None, and :func:`frozenseg.data.collate.collate` drops the Nones.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from frozenseg.data.images import IMAGE_ERRORS, read_image
from frozenseg.data.transforms import Transform, apply_view
from frozenseg.files import is_relative_name

Item = tuple[torch.Tensor, dict]


class ImageDataset(Dataset):
    """``(image, target)`` items: ``_load`` reads one untransformed, ``transform`` augments it.

    Holds nothing but plain Python data, so it pickles into DataLoader workers.
    """

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform
        self._warned: set[str] = set()

    # COCO-style datasets set these; others override the three methods below.
    images_dir: Path
    images: list[dict]
    category_ids: list[int]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.images[index]["file_name"]

    def __getitem__(self, index: int) -> Item | None:
        """``(image, target)``, or None (with a warning) when a file cannot be read."""
        loaded = self._load(index)
        if loaded is None or self.transform is None:
            return loaded
        return self.transform(*loaded)

    def get_view(self, index: int, view: dict) -> Item | None:
        """Item ``index`` transformed by a recorded ``view`` (``target["view"]``), exactly."""
        loaded = self._load(index)
        return None if loaded is None else apply_view(*loaded, view)

    def _load(self, index: int) -> Item | None:
        """The untransformed item, or None (after a warning) when a file cannot be read."""
        raise NotImplementedError

    def _open(self, path: Path, what: str,
              read: Callable[[Path], Image.Image] = read_image) -> Image.Image | None:
        """The file decoded by ``read`` (:func:`frozenseg.data.images.read_image`: an upright
        8-bit RGB picture; ``read_stored`` for label maps), or None after a warning."""
        try:
            return read(path)
        except IMAGE_ERRORS as error:
            self._warn_once(path, f"cannot read {what} {path} ({type(error).__name__}: {error}); "
                                  "skipped")
            return None

    def _has_size(self, pil: Image.Image, path: Path, what: str, size: Sequence[int],
                  source: str) -> bool:
        """Whether ``pil`` is ``size`` (H, W); if not, warn once (``source`` names who says so)."""
        if (pil.height, pil.width) == (size[0], size[1]):
            return True
        self._warn_once(path, f"{what} {path} is {pil.height}x{pil.width} (HxW), {source} "
                              f"{size[0]}x{size[1]}; skipped")
        return False

    def _warn_once(self, key: Path | str, message: str) -> None:
        # Once per key and process: each DataLoader worker has its own copy of the set.
        if str(key) not in self._warned:
            self._warned.add(str(key))
            warnings.warn(message, stacklevel=3)


def image_to_tensor(pil: Image.Image) -> torch.Tensor:
    """An RGB PIL image as float32 (3, H, W) in [0, 1]."""
    return TF.pil_to_tensor(pil).float().div_(255)


# --------------------------------------------------------------------------------- json


def read_json(path: Path, kind: str = "COCO instances",
              fields: Sequence[str] = ("images", "annotations", "categories")) -> dict:
    """The json object at ``path``, checked to hold a list under each of ``fields``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotations file")
    data = parse_json(path.read_bytes(), path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a COCO file: the top level is not an object")
    for field in fields:
        if not isinstance(data.get(field), list):
            raise ValueError(f"{path}: not a {kind} file: no '{field}' list")
    return data


def parse_json(raw: bytes | str, path: Path) -> Any:
    """The JSON value of ``raw`` (the contents of ``path``); anything else is a one-line
    ValueError naming the file, nesting too deep included (Python's parser recurses, so
    100,000 '[' were a RecursionError)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None


def require(item: Any, fields: Sequence[str], path: Path, where: str) -> None:
    """Raise unless ``item`` is a dict holding every one of ``fields``."""
    if not isinstance(item, dict):
        raise ValueError(f"{path}: {where} is not an object")
    for field in fields:
        if field not in item:
            raise ValueError(f"{path}: {where} has no '{field}'")


def check_file_name(name: Any, path: Path, where: str) -> None:
    """Raise unless ``name`` is a relative name that stays inside the folder it is joined
    to: a ``file_name`` with ``..`` or an absolute path would read, or make export write,
    files anywhere."""
    if not is_relative_name(str(name)):
        raise ValueError(f"{path}: {where}: 'file_name' {name!r} is not a relative path "
                         "inside its folder (absolute, empty, or with '..')")


def read_categories(data: dict, path: Path) -> tuple[list[int], list[str]]:
    """Original category ids sorted (contiguous index -> id) and their names."""
    for i, cat in enumerate(data["categories"]):
        require(cat, ("id",), path, f"categories[{i}]")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: categories: duplicate 'id'")
    return ids, [str(c.get("name", c["id"])) for c in cats]


def read_images(data: dict, path: Path) -> list[dict]:
    """Image records sorted by id (the order torchvision's and DETR's CocoDetection use)."""
    images = []
    for i, im in enumerate(data["images"]):
        require(im, ("id", "file_name", "height", "width"), path, f"images[{i}]")
        for field in ("id", "height", "width"):
            if not isinstance(im[field], int) or isinstance(im[field], bool):
                raise ValueError(f"{path}: images[{i}]: '{field}' is not an integer")
        check_file_name(im["file_name"], path, f"images[{i}]")
        images.append({"id": im["id"], "file_name": str(im["file_name"]),
                       "height": im["height"], "width": im["width"]})
    if len({im["id"] for im in images}) != len(images):
        raise ValueError(f"{path}: images: duplicate 'id'")
    return sorted(images, key=lambda im: im["id"])
