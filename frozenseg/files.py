"""Writing files so that a reader never sees half of one: a temporary name, then a rename.

Every file frozenseg writes goes through here (checkpoints, caches, results, recipes,
metrics): an interrupted run leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block
    ends cleanly, removed when it raises (``path`` then keeps what it had)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # already gone after a successful rename


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name`` for a ``name`` taken from data (a json's ``file_name``), refusing
    one that would reach outside ``folder``: an absolute name, or one with ``..``. A
    results file's PNG must never overwrite the user's own files. Raises a one-line
    ValueError naming the name and the folder."""
    if not is_relative_name(name):
        raise ValueError(f"{name!r} is not a file name inside {folder} (absolute, empty, "
                         "or with '..'): refused")
    return Path(folder) / name


def is_relative_name(name: str) -> bool:
    """Whether ``name`` stays inside any folder it is joined to (relative, no ``..``)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts
