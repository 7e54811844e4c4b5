"""Loading detector checkpoints without running what the file brings.

Checkpoints written by ``torch.save`` are pickles, and unpickling can execute arbitrary code.
:func:`load_checkpoint` therefore loads them with ``torch.load(..., weights_only=True)``, which
only rebuilds tensors, containers and the few harmless globals in :data:`SAFE_GLOBALS`. Anything
else is refused with a one-line :class:`CheckpointError` unless the caller passes ``trust=True``.
``.safetensors`` files hold no pickle at all and are always safe to read.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import pathlib
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SAFE_GLOBALS", "CheckpointError", "LoadedCheckpoint", "load_checkpoint",
           "load_training_checkpoint"]

# numpy pickles a scalar as ``scalar(dtype, raw_bytes)``; the function lives in numpy.core
# (numpy 1.x) or numpy._core (numpy 2.x), so take it from a scalar's own reduce and register it
# under both names: a checkpoint written with either numpy loads under either.
_np_scalar = np.float64(0).__reduce__()[0]
# A dtype is rebuilt as ``numpy.dtype(code, False, True)`` followed by a BUILD (``__setstate__``)
# on the instance, whose class is one of the per-dtype classes (numpy.dtypes.Float64DType, ...).
# The weights-only unpickler only BUILDs allow-listed types, so each numeric class is listed.
_NP_DTYPE_CLASSES = tuple(type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG")

SAFE_GLOBALS: tuple[Any, ...] = (
    # DINO, Deformable DETR and H-Deformable-DETR save ``'args': args``, an argparse.Namespace:
    # a plain attribute bag, rebuilt by setting its __dict__.
    argparse.Namespace,
    # numpy scalars (``'epoch': np.int64(11)``, ``lr=np.float64(1e-4)`` in args): raw bytes plus
    # a dtype, no code. Both module spellings, see _np_scalar above.
    (_np_scalar, "numpy.core.multiarray.scalar"),
    (_np_scalar, "numpy._core.multiarray.scalar"),
    # the dtype those scalars carry, and the concrete dtype classes it is BUILT as.
    np.dtype,
    *_NP_DTYPE_CLASSES,
    # paths in args (``output_dir=Path(...)``): rebuilt from their string parts. Python 3.13
    # pickles the class as pathlib._local.PosixPath, other versions as pathlib.PosixPath.
    (pathlib.PosixPath, "pathlib.PosixPath"),
    (pathlib.PosixPath, "pathlib._local.PosixPath"),
)
"""Globals (besides torch's own tensor machinery) a checkpoint may use under ``trust=False``.

Each entry is data-only: constructing it cannot run code, touch files or import modules.
Deliberately absent: numpy arrays (``numpy.core.multiarray._reconstruct``/``ndarray``; the
DETR-family training scripts don't store any), and every model, optimizer or config class.
"""

# Keys under which training scripts store the weights, in order of preference.
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (pre-1.6, non-zip) format starts by pickling this magic number (a LONG1).
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")
_TRUST_HINT = ("pass --trust-checkpoint (CLI) / trust=True (API) only if the file comes from a "
               "source you trust")


class CheckpointError(ValueError):
    """A checkpoint could not be loaded; the message is one line and names the file."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Model weights and what came with them.

    ``state_dict`` holds tensors only, with any DataParallel ``module.`` prefix removed; ``args``
    is the training-argument dict stored in the file (``ckpt['args']``), or None; ``sha256`` is
    the hex digest of the file's bytes; ``kind`` is ``"pickle"`` or ``"safetensors"``.
    """

    state_dict: dict[str, torch.Tensor]
    args: dict | None
    path: Path
    sha256: str
    kind: str


def load_checkpoint(path: str | Path, *, trust: bool = False) -> LoadedCheckpoint:
    """Load a detector checkpoint (``.pth``/``.pt``/``.bin`` pickle or ``.safetensors``).

    Pickles are read with ``torch.load(weights_only=True)`` and the globals in
    :data:`SAFE_GLOBALS`; a file that needs anything else raises :class:`CheckpointError` naming
    the global. ``trust=True`` loads with ``weights_only=False`` instead, which EXECUTES whatever
    code the pickle carries: use it only for files from a source you trust. Weights are taken from
    ``ckpt['model']``, else ``ckpt['state_dict']``, else ``ckpt['model_state_dict']``, else the
    file itself when it is a bare state dict. Every failure (missing file, directory, not a
    checkpoint, truncated, refused global, no tensors) is a one-line :class:`CheckpointError`.
    """
    path = Path(path).expanduser()
    sha256 = _sha256(path)
    if path.suffix == ".safetensors":
        state_dict = _strip_module(_load_safetensors(path))
        return LoadedCheckpoint(state_dict, None, path, sha256, kind="safetensors")
    obj = _load_pickle(path, trust=trust)
    state_dict = _strip_module(_find_state_dict(path, obj))
    return LoadedCheckpoint(state_dict, _find_args(obj), path, sha256, kind="pickle")


def _sha256(path: Path) -> str:
    """Hex SHA-256 of the file, read in 1 MiB chunks; also the existence/readability check."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    return digest.hexdigest()


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU (no pickle involved)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, or anything else the reader raises on bad bytes
        raise CheckpointError(f"{path}: not a valid safetensors file ({_reason(e)})") from None


def _load_pickle(path: Path, *, trust: bool) -> Any:
    """``torch.load`` onto the CPU: restricted to SAFE_GLOBALS, or unrestricted when trusted."""
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol before refusing a plain (non-torch) pickle.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if trust:
                return torch.load(path, map_location="cpu", weights_only=False)
            present = set(torch.serialization.get_safe_globals())
            # Add only what is not there yet: leaving the context removes what was added.
            with torch.serialization.safe_globals([g for g in SAFE_GLOBALS if g not in present]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here; each becomes one clear line
        raise _explain_load_error(path, e, trust=trust) from None


def _explain_load_error(path: Path, exc: Exception, *, trust: bool) -> CheckpointError:
    """Turn whatever torch.load raised into one line saying what is wrong with the file."""
    return CheckpointError(f"{path}: {_diagnose(path, exc, trust=trust)}")


def _diagnose(path: Path, exc: Exception, *, trust: bool) -> str:
    """What is wrong, judged from torch's error and the file's first bytes."""
    text = _chain_text(exc)
    match = _GLOBAL_RE.search(text)
    if match and not trust:
        return (f"refused to load: it needs the Python global '{match.group(1)}', which is not "
                f"on the safe allow-list; {_TRUST_HINT}")
    head, is_zip = _head(path), zipfile.is_zipfile(path)
    if _LEGACY_MAGIC in head or (is_zip and _has_data_pkl(path)):
        if "Weights only load failed" in text and not trust:
            return f"refused to load: the safe loader rejected it ({_reason(exc)}); {_TRUST_HINT}"
        if trust and isinstance(_chain(exc)[-1], (ImportError, AttributeError)):
            return (f"cannot be unpickled even with trust=True: it needs code that is not "
                    f"importable here ({_reason(exc)})")
        return f"checkpoint is damaged or truncated ({_reason(exc)})"
    if head.startswith(_ZIP_MAGIC):
        if is_zip:
            return "is a zip archive but not a PyTorch checkpoint (no data.pkl inside)"
        return ("checkpoint is truncated or corrupt (its zip archive has no central directory; "
                "was the download or save interrupted?)")
    if head.startswith(b"\x80"):
        return "looks like a plain pickle, not a checkpoint written by torch.save"
    return f"not a PyTorch checkpoint or safetensors file ({_describe(head)})"


def _find_state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """The weights in a loaded pickle: a preferred key's value, else the object itself."""
    if isinstance(obj, torch.nn.Module):  # only reachable with trust=True (torch.save(model))
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: no state dict found: the file holds a "
                              f"{type(obj).__name__}, not a dict of tensors")
    for key in _STATE_DICT_KEYS:
        candidate = obj.get(key)
        if isinstance(candidate, torch.nn.Module):
            return candidate.state_dict()
        if _is_state_dict(candidate):
            return _tensors_only(candidate)
    if _is_state_dict(obj):
        return _tensors_only(obj)
    keys = ", ".join(repr(k) for k in list(obj)[:20]) + (", ..." if len(obj) > 20 else "")
    raise CheckpointError(f"{path}: no state dict found (no tensors under "
                          f"{', '.join(map(repr, _STATE_DICT_KEYS))} or at the top level); "
                          f"top-level keys: {keys or 'none'}")


def _is_state_dict(obj: Any) -> bool:
    """A mapping whose values are mostly tensors."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    return 2 * sum(isinstance(v, torch.Tensor) for v in obj.values()) > len(obj)


def _tensors_only(sd: Mapping) -> dict[str, torch.Tensor]:
    """Drop the (rare) entries that are not ``str -> Tensor``."""
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel's ``module.`` prefix when every key carries it."""
    prefix = "module."
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _find_args(obj: Any) -> dict | None:
    """``ckpt['args']`` as a dict (``vars()`` of a Namespace), or None if absent."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, Mapping) else None


def _has_data_pkl(path: Path) -> bool:
    """Whether a zip archive has the ``<name>/data.pkl`` entry every torch.save zip has."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.rpartition("/")[2] == "data.pkl" for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _head(path: Path, n: int = 32) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _describe(head: bytes) -> str:
    """A few words on what a file that is not a checkpoint seems to be."""
    for magic, what in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                        (b"\x1f\x8b", "gzip data"), (b"%PDF", "a PDF document")):
        if head.startswith(magic):
            return f"it looks like {what}"
    try:  # incremental: a multi-byte character cut off at the end of head is fine
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        text = "\0"
    if all(c.isprintable() or c in "\t\n\r\f" for c in text):
        return "it looks like a text file"
    return f"it starts with {head[:8]!r}"


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception followed by the ones it was raised from or during, innermost last."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _chain_text(exc: BaseException) -> str:
    """All messages along the exception chain."""
    return "\n".join(str(e) for e in _chain(exc))


def _reason(exc: BaseException) -> str:
    """torch's error in a few words: the root cause's first sentence, on one line."""
    root = _chain(exc)[-1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root))  # ANSI colour codes
    text = re.sub(r"^\s*\[enforce fail at [^\]]*\][\s.]*", "", text)  # c10 location prefix
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0].rstrip(".")
    name = type(root).__name__
    return f"{name}: {first[:200]}" if first else name


# ----------------------------------------------------------------- frozenseg's own checkpoints


def load_training_checkpoint(path: str | Path) -> dict:
    """A checkpoint frozenseg's training wrote (``last.pt``, ``best.pt``: weights, optimizer,
    recipe), read weights-only. Such a file never needs a trusted load, so no flag lifts
    the check. Every failure (missing, empty, truncated, not a checkpoint, a refused
    global) is a one-line :class:`CheckpointError` naming the file."""
    path = Path(path).expanduser()
    _sha256(path)  # for its checks: there, a file, readable, not empty
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here; each becomes one clear line
        raise CheckpointError(f"{path}: {_diagnose_own(path, e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a frozenseg checkpoint (it holds a "
                              f"{type(state).__name__}, not a dict)")
    return state


def _diagnose_own(path: Path, exc: Exception) -> str:
    """What is wrong with a file that should be a frozenseg checkpoint."""
    match = _GLOBAL_RE.search(_chain_text(exc))
    if match:
        return (f"refused to load: it needs the Python global '{match.group(1)}', which no "
                "checkpoint frozenseg writes holds (another program's file, or tampered with)")
    return _diagnose(path, exc, trust=True)  # trust=True: no hint to lift a check
