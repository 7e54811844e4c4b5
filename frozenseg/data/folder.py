"""Images without annotations: files and folders, for export and predict.

``ImageFolder(paths, transform=...)[i]`` is ``(image, target)`` like
:class:`frozenseg.data.CocoInstances`, with no objects in the target (empty ``boxes``,
``labels``, ``masks``), so the same transforms, collate and inference code run on it.

Image ids follow COCO's file naming when they can: if every file name is a number
(``000000139.jpg``), that number is the id; otherwise ids are 1, 2, ... in sorted
order. ``images`` is the COCO ``images`` table (id, file_name, height, width), which
export writes beside its results so they can be evaluated or joined back to files.
A folder is searched recursively; ``file_name`` is relative to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from frozenseg.data.common import (
    ImageDataset,
    image_to_tensor,
    read_categories,
    read_images,
    read_json,
)
from frozenseg.data.images import IMAGE_ERRORS, image_size
from frozenseg.data.transforms import Transform, identity_view

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageFolder(ImageDataset):
    """Image files, given one by one or as folders (see the module docstring).

    :meth:`from_coco` takes the images (and categories) of a COCO json instead, without
    reading its annotations: the fast way to run over an annotated dataset's images.
    """

    def __init__(self, paths: str | Path | Iterable[str | Path], *,
                 transform: Transform | None = None) -> None:
        super().__init__(transform)
        files = list_images([paths] if isinstance(paths, (str, Path)) else paths)
        ids = _image_ids([name for name, _ in files])
        self._paths = [path for _, path in files]
        self.images = [{"id": image_id, "file_name": name, **_header_size(path)}
                       for image_id, (name, path) in zip(ids, files, strict=True)]
        self.category_ids, self.category_names = [], []

    @classmethod
    def from_coco(cls, images_dir: str | Path, annotations_json: str | Path, *,
                  transform: Transform | None = None) -> ImageFolder:
        """The images a COCO json lists (ids, file names, sizes) and its categories."""
        path = Path(annotations_json)
        data = read_json(path, "COCO", fields=("images", "categories"))
        folder = cls.__new__(cls)
        ImageDataset.__init__(folder, transform)
        folder.images = [{k: im[k] for k in ("id", "file_name", "height", "width")}
                         for im in read_images(data, path)]
        folder._paths = [Path(images_dir) / im["file_name"] for im in folder.images]
        folder.category_ids, folder.category_names = read_categories(data, path)
        return folder

    def image_path(self, index: int) -> Path:
        return self._paths[index]

    def _load(self, index: int) -> tuple[torch.Tensor, dict] | None:
        pil = self._open(self._paths[index], "image")
        if pil is None:
            return None
        size = torch.tensor([pil.height, pil.width], dtype=torch.int64)
        target = {
            "image_id": self.images[index]["id"],
            "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, pil.height, pil.width, dtype=torch.bool),
            "iscrowd": torch.zeros(0, dtype=torch.bool), "area": torch.zeros(0),
            "orig_size": size, "size": size.clone(), "view": identity_view(tuple(size.tolist())),
        }
        return image_to_tensor(pil), target

    def __repr__(self) -> str:
        return f"ImageFolder({len(self)} images, transform={self.transform!r})"


def list_images(paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(file_name, path) of every image: a file as given (its name), a folder searched
    recursively (names relative to it), in sorted order. Raises ValueError naming a path
    that does not exist, a file that is not an image, or two images of the same name."""
    found: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{path}: not an image file (expected one of "
                                 f"{', '.join(IMAGE_SUFFIXES)})")
            found.append((path.name, path))
        else:
            raise ValueError(f"{path}: no such file or folder")
    names = [name for name, _ in found]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two images are named {twice[0]}: give their folders instead")
    if not found:
        raise ValueError(f"no images in {', '.join(str(p) for p in paths)}")
    return found


def _image_ids(names: list[str]) -> list[int]:
    stems = [Path(name).stem for name in names]
    if all(stem.isdigit() for stem in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(stem) for stem in stems]
    return list(range(1, len(names) + 1))


def _header_size(path: Path) -> dict:
    """{"height", "width"} as displayed (EXIF orientation applied), from the file's header
    (no decoding); None when unreadable (the dataset warns when it tries to load it)."""
    try:
        height, width = image_size(path)
    except IMAGE_ERRORS:
        return {"height": None, "width": None}
    return {"height": height, "width": width}
