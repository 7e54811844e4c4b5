"""Writing files so that a reader never sees half of one: a temporary name, then a rename.

Every file frozenseg writes goes through here (checkpoints, caches, results, recipes,
metrics): an interrupted run leaves the old file or the new one, never a torn one. Tensors
bound for safetensors pass through :func:`unshared` first, whoever made them.
"""

from __future__ import annotations

import contextlib
import os
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
