"""Writing files so that a reader never sees half of one: a temporary name, then a rename.

Every file frozenseg writes goes through here (checkpoints, caches, results, recipes,
metrics): an interrupted run leaves the old file or the new one, never a torn one.
Names taken from data are joined with :func:`inside`, a folder that a run writes for a
long time (train's output, a cache) is held with :func:`folder_lock`, and tensors
bound for safetensors pass through :func:`unshared` first, whoever made them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the callers; `frozenseg --help` stays quick
    import torch


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


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_path` for a folder: a staging folder beside ``folder`` to fill; when
    the block ends cleanly it takes ``folder``'s place (an existing one is moved aside
    first and deleted after), when it raises it is removed and ``folder`` is untouched."""
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after the rename


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, contiguous, each with a storage of its own.

    safetensors refuses two names for one storage, and checkpoints are full of them: DINO's
    shared class and box heads, Deformable DETR's ``ModuleList([head] * n)``, the decoder's
    second reference to every head, Hugging Face's tied weights. ``torch.save`` keeps the
    sharing, so a loaded checkpoint has it too. Tensors whose storage another one uses
    are copied; the rest pass unchanged (no copy of a large model that shares nothing).
    """
    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    users = Counter(storage(t) for t in tensors.values() if t.numel())
    return {name: (t.clone() if t.numel() and users[storage(t)] > 1 else t).contiguous()
            for name, t in tensors.items()}


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


LOCK_FILE = ".frozenseg.lock"


class FolderInUse(RuntimeError):
    """Another process holds the folder; the message is one line naming it and its pid."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder`` for this process while the block runs: two trainings (or two caches)
    on one folder would interleave their logs and race on the same files.

    The lock is an advisory ``flock`` on ``folder/.frozenseg.lock``, which holds the
    holder's pid for the message. The kernel releases it when its process dies, so the
    lock file of a killed run (a dead pid) is simply taken over. Raises FolderInUse naming
    the holder's pid when another process holds it.
    """
    import fcntl  # POSIX only; frozenseg runs on Linux and macOS

    path = Path(folder) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path, fcntl) as handle:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path, fcntl) -> Iterator:
    """The lock file open and flock-ed; retried when the file was replaced meanwhile (its
    holder removed it between our open and our lock)."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise FolderInUse(f"{path.parent}: in use by process {holder} (lock {path}); "
                              "wait for it to end, or stop it") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    with handle:
        yield handle
