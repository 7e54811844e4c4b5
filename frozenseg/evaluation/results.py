"""COCO results files: compressed RLEs, and a streaming, atomic, resumable results writer.

A result is one detection in the format of the COCO results json::

    {"image_id": int, "category_id": int (the dataset's original id),
     "bbox": [x, y, w, h] (ORIGINAL image pixels, clipped to the image, 2 decimals),
     "score": float, "segmentation": {"size": [H, W], "counts": str} (compressed RLE
     at the original size), "mask_quality": float (sigmoid of the predicted IoU;
     absent when the model has no mask scoring; 0, and the score 0, for an empty mask)}

Each mode turns its own outputs into these dicts (:mod:`frozenseg.head.results` for the
mask head, :mod:`frozenseg.maskdino.inference` for Mask DINO).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from frozenseg.files import atomic_write_text


def encode_masks(masks: Tensor) -> list[dict]:
    """(n, H, W) bool masks -> n COCO compressed RLEs {"size": [H, W], "counts": str}."""
    if len(masks) == 0:
        return []
    # (n, W, H) C-contiguous is (H, W, n) Fortran-contiguous: the layout pycocotools wants.
    array = masks.to(torch.uint8).transpose(1, 2).contiguous().cpu().numpy().transpose(2, 1, 0)
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def is_empty(rle: dict) -> bool:
    return int(mask_utils.area(rle)) == 0


class ResultsWriter:
    """Streams a COCO results json array to ``path``, atomically; optionally resumable.

    ``with ResultsWriter(path) as w: w.write(results)`` writes each result as it comes
    (memory stays flat) to a temporary file beside ``path``; a clean exit renames it to
    ``path``. An exception inside the ``with`` leaves whatever was at ``path`` untouched.
    ``count`` is the number of results written.

    Resumable (``resume_key``: any JSON describing the job): the array grows in
    ``.NAME.partial`` beside ``path``, and ``w.checkpoint(progress)`` makes all written so
    far durable and records ``progress`` (any JSON) in ``.NAME.partial.json``. After an
    interruption the partial file stays; ``ResultsWriter(path, resume_key=<same>,
    resume=True)`` cuts it back to the last checkpoint (nothing is written twice) and
    ``w.progress`` says where to continue (None for a fresh start). Without ``resume``
    a waiting partial file is an error, so no interrupted work is thrown away silently.
    """

    def __init__(self, path: str | os.PathLike, *, resume_key: Any = None,
                 resume: bool = False) -> None:
        self.path = Path(path)
        self.resume_key, self.resume = resume_key, resume
        self.count, self.progress = 0, None
        self._file = None
        self._tmp: Path | None = None

    @property
    def _state(self) -> Path:
        return self._tmp.with_name(self._tmp.name + ".json")

    def __enter__(self) -> ResultsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_key is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                       dir=self.path.parent)
            self._tmp, self._file = Path(tmp), os.fdopen(fd, "wb")
        else:
            self._tmp = self.path.with_name(f".{self.path.name}.partial")
            if self._tmp.exists() and self._state.exists():
                self._reopen()
                return self
            self._file = open(self._tmp, "wb")  # closed in __exit__
        self._file.write(b"[")
        return self

    def _reopen(self) -> None:
        """Continue a partial file from its last checkpoint."""
        if not self.resume:
            raise ValueError(f"{self.path}: an interrupted run waits in {self._tmp}; resume it "
                             "(--resume) or delete it to start over")
        state = json.loads(self._state.read_text())
        if state["key"] != self.resume_key:
            changed = sorted(k for k in {**state["key"], **self.resume_key}
                             if state["key"].get(k) != self.resume_key.get(k))
            raise ValueError(f"{self.path}: the interrupted run in {self._tmp} had other "
                             f"settings ({', '.join(changed)}); delete it to start over")
        self._file = open(self._tmp, "r+b")  # closed in __exit__
        self._file.truncate(state["offset"])
        self._file.seek(state["offset"])
        self.count, self.progress = state["count"], state["progress"]

    def write(self, results: Iterable[dict]) -> None:
        """Append result dicts (JSON-serialisable; NaN or infinity raise ValueError)."""
        if self._file is None or self._file.closed:
            raise RuntimeError(f"{self.path}: ResultsWriter.write outside its 'with' block")
        if isinstance(results, dict):
            raise TypeError("ResultsWriter.write takes a list of result dicts, not one dict")
        for result in results:
            text = json.dumps(result, separators=(",", ":"), allow_nan=False)
            self._file.write((("\n," if self.count else "\n") + text).encode())
            self.count += 1

    def checkpoint(self, progress: Any) -> None:
        """Make everything written durable; a resumed run continues from here."""
        if self.resume_key is None:
            raise RuntimeError(f"{self.path}: checkpoint() needs a resumable ResultsWriter")
        self._sync()
        state = {"key": self.resume_key, "offset": self._file.tell(), "count": self.count,
                 "progress": progress}
        atomic_write_text(self._state, json.dumps(state))

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._file is None:
            return
        try:
            if exc_type is None:
                self._file.write(b"\n]\n")
                self._sync()
                self._file.close()
                os.replace(self._tmp, self.path)
                if self.resume_key is not None:
                    self._state.unlink(missing_ok=True)
        finally:
            self._file.close()
            if self.resume_key is None:  # already gone after a successful rename
                self._tmp.unlink(missing_ok=True)
