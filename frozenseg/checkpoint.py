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
import json
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

__all__ = ["EMA_KEYS", "MMENGINE_TRAINED", "SAFE_GLOBALS", "CheckpointError", "LoadedCheckpoint",
           "load_checkpoint", "load_training_checkpoint"]

# numpy pickles a scalar as ``scalar(dtype, raw_bytes)``; the function lives in numpy.core
# (numpy 1.x) or numpy._core (numpy 2.x), so take it from a scalar's own reduce and register it
# under both names: a checkpoint written with either numpy loads under either.
_np_scalar = np.float64(0).__reduce__()[0]
# A dtype is rebuilt as ``numpy.dtype(code, False, True)`` followed by a BUILD (``__setstate__``)
# on the instance, whose class is one of the per-dtype classes (numpy.dtypes.Float64DType, ...).
# The weights-only unpickler only BUILDs allow-listed types, so each numeric class is listed.
_NP_DTYPE_CLASSES = tuple(type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG")

# numpy arrays pickle as ``_reconstruct(ndarray, (0,), b'b')`` then a BUILD with their raw bytes
# and dtype (an object array's items are unpickled by the same restricted unpickler).
_np_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]


class MMEngineRecord:
    """Stand-in for mmengine's ``HistoryBuffer`` (the logged scalars in a training
    checkpoint's ``message_hub``): an attribute bag, filled from the pickle's state, that
    never runs mmengine's code. frozenseg reads nothing from it."""


def _method_name(owner: Any, name: str) -> str:
    """Stand-in for ``getattr`` in a pickle: HistoryBuffer keeps bound methods
    (``getattr(buffer, 'mean')``); this returns the name and looks nothing up."""
    return name


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
    # mmengine's CheckpointHook saves 'message_hub', whose logged scalars are HistoryBuffers
    # holding numpy arrays and bound methods: rebuilt as inert records, arrays from raw bytes
    # (both numpy module spellings), method references as their names.
    (MMEngineRecord, "mmengine.logging.history_buffer.HistoryBuffer"),
    (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_np_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    (_method_name, "builtins.getattr"),
    (_method_name, "__builtin__.getattr"),
)
"""Globals (besides torch's own tensor machinery) a checkpoint may use under ``trust=False``.

Each entry is data-only: constructing it cannot run code, touch files or import modules.
Numpy arrays are rebuilt from their bytes (mmengine's message hub stores some); ``getattr``
is never called (its stand-in returns the attribute's name). Deliberately absent: every
model, optimizer or config class.
"""

# Keys under which training scripts store the weights, in order of preference.
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
# ... and their exponential moving average, where the training script keeps one: DINO's
# main.py ('ema_model'), detectron2 / detrex's EMA hook ('ema_state'), RT-DETR and its
# descendants ({'ema': {'module': state_dict, 'updates': n}}), timm ('state_dict_ema').
EMA_KEYS = ("ema_model", "ema_state", "ema", "state_dict_ema", "model_ema")
# mmengine's EMAHook swaps the copies before it saves: 'state_dict' holds the average (what
# mmdetection evaluates and publishes) and 'ema_state_dict' the trained weights, as
# 'module.'-prefixed keys beside the average's 'steps'.
MMENGINE_TRAINED = "ema_state_dict"
WEIGHT_CHOICES = ("auto", "model", "ema")
# What a model folder holds, in the order a folder is searched: Hugging Face's save_pretrained
# (sharded or not, safetensors or pickle), else the one checkpoint file in it.
_FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors",
                 "pytorch_model.bin.index.json", "pytorch_model.bin")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
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
    # where the weights were found: ckpt['model'], ckpt['ema_model'], ... (None: top level)
    weights_key: str | None = None
    # the other copy left in the file (the trained weights when the EMA was taken, or back)
    other_key: str | None = None


def load_checkpoint(path: str | Path, *, trust: bool = False,
                    weights: str = "auto") -> LoadedCheckpoint:
    """Load a detector checkpoint: a file, a sharded index, or a folder holding one.

    A file is a ``.pth``/``.pt``/``.bin`` pickle or ``.safetensors``; an index is Hugging
    Face's ``*.index.json`` (its shards are read and merged); a folder is a
    ``save_pretrained`` folder or a folder with exactly one checkpoint file.

    Pickles are read with ``torch.load(weights_only=True)`` and the globals in
    :data:`SAFE_GLOBALS`; a file that needs anything else raises :class:`CheckpointError` naming
    the global. ``trust=True`` loads with ``weights_only=False`` instead, which EXECUTES whatever
    code the pickle carries: use it only for files from a source you trust. Weights are taken from
    ``ckpt['model']``, else ``ckpt['state_dict']``, else ``ckpt['model_state_dict']``, else the
    file itself when it is a bare state dict. ``weights``: ``auto`` takes the EMA copy where
    the file has one (``ema_model``, ``ema_state``, ``ema``: what the projects evaluate),
    ``model`` the trained weights, ``ema`` insists on the EMA copy. Every failure (missing
    file, empty folder, not a checkpoint, truncated, refused global, no tensors) is a
    one-line :class:`CheckpointError`.
    """
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_CHOICES)}")
    path = _weights_file(Path(path).expanduser())
    if path.name.endswith(".index.json"):
        return _load_sharded(path, trust=trust, weights=weights)
    sha256 = _sha256(path)
    if path.suffix == ".safetensors":
        state_dict = _strip_module(_load_safetensors(path))
        return LoadedCheckpoint(state_dict, None, path, sha256, kind="safetensors")
    obj = _load_pickle(path, trust=trust)
    key, other = _choose_weights(path, obj, weights)
    state_dict = _strip_module(_find_state_dict(path, obj, key))
    return LoadedCheckpoint(state_dict, _find_args(obj), path, sha256, kind="pickle",
                            weights_key=key, other_key=other)


def _weights_file(path: Path) -> Path:
    """A folder -> the weights file (or index) in it; a file -> itself."""
    if not path.is_dir():
        return path
    for name in _FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir()
                   if p.suffix in _CHECKPOINT_SUFFIXES and not p.name.startswith(".")
                   and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{path}: is a directory with no checkpoint file in it (looked "
                              f"for {', '.join(_FOLDER_FILES)} or one *.pth/.pt/.bin/"
                              f".safetensors/.ckpt file)")
    names = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
    raise CheckpointError(f"{path}: is a directory with {len(found)} checkpoint files "
                          f"({names}): pass the one to use")


def _load_sharded(index: Path, *, trust: bool, weights: str) -> LoadedCheckpoint:
    """Hugging Face's sharded checkpoint: ``{"weight_map": {key: shard file}}`` beside its
    shards; they are loaded one by one and merged. The digest covers index and shards."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index (a json with a "
                              f"weight_map): {_reason(e)}") from None
    digest = hashlib.sha256(bytes.fromhex(_sha256(index)))
    state_dict: dict[str, torch.Tensor] = {}
    for name in shards:
        if Path(name).name != name:
            raise CheckpointError(f"{index}: shard {name!r} is not a file beside the index")
        shard = load_checkpoint(index.parent / name, trust=trust, weights=weights)
        digest.update(bytes.fromhex(shard.sha256))
        state_dict.update(shard.state_dict)
    missing = sorted(set(weight_map) - set(state_dict))
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} keys of the weight_map are in no "
                              f"shard, e.g. {missing[0]}")
    return LoadedCheckpoint(_strip_module(state_dict), None, index, digest.hexdigest(),
                            kind="sharded")


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


def _choose_weights(path: Path, obj: Any, weights: str) -> tuple[str | None, str | None]:
    """(the key whose weights to load, the other copy left in the file) by ``weights``;
    (None, None) for a file with neither (a bare state dict, say)."""
    if not isinstance(obj, Mapping):
        return None, None
    if isinstance(obj.get(MMENGINE_TRAINED), Mapping) and _is_state_dict(obj.get("state_dict")):
        if weights == "model":
            return MMENGINE_TRAINED, "state_dict"
        return "state_dict", MMENGINE_TRAINED
    model = next((k for k in _STATE_DICT_KEYS if _weights_under(obj, k) is not None), None)
    ema = next((k for k in EMA_KEYS if _weights_under(obj, k) is not None), None)
    if weights == "ema" and ema is None:
        raise CheckpointError(f"{path}: has no EMA copy of the weights (looked for "
                              f"{', '.join(map(repr, EMA_KEYS))}); top-level keys: "
                              f"{_top_level_keys(obj)}")
    if weights == "model" or ema is None:
        return model, ema
    return ema, model


def _weights_under(obj: Mapping, key: str) -> Any:
    """A state dict (or module) at ``obj[key]``, looking one level into RT-DETR's
    ``{'module': state_dict, 'updates': n}`` EMA record; None if there is none."""
    candidate = obj.get(key)
    if isinstance(candidate, Mapping) and _is_state_dict(candidate.get("module")):
        candidate = candidate["module"]
    if isinstance(candidate, torch.nn.Module) or _is_state_dict(candidate):
        return candidate
    return None


def _find_state_dict(path: Path, obj: Any, key: str | None) -> dict[str, torch.Tensor]:
    """The weights in a loaded pickle: ``obj[key]``'s, else the object itself."""
    if isinstance(obj, torch.nn.Module):  # only reachable with trust=True (torch.save(model))
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: no state dict found: the file holds a "
                              f"{type(obj).__name__}, not a dict of tensors")
    if key == MMENGINE_TRAINED:
        prefix = "module."
        return {k[len(prefix):]: v for k, v in _tensors_only(obj[key]).items()
                if k.startswith(prefix)}
    if key is not None:
        found = _weights_under(obj, key)
        return found.state_dict() if isinstance(found, torch.nn.Module) else _tensors_only(found)
    if _is_state_dict(obj):
        return _tensors_only(obj)
    raise CheckpointError(f"{path}: no state dict found (no tensors under "
                          f"{', '.join(map(repr, _STATE_DICT_KEYS))} or at the top level); "
                          f"top-level keys: {_top_level_keys(obj)}")


def _top_level_keys(obj: Mapping) -> str:
    keys = ", ".join(repr(k) for k in list(obj)[:20]) + (", ..." if len(obj) > 20 else "")
    return keys or "none"


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
    """``ckpt['args']`` as a dict (``vars()`` of a Namespace), else mmdetection's
    ``ckpt['meta']`` (its config text and dataset classes), or None if absent."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if args is None and isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping):
        args = obj["meta"]  # mmengine / mmcv: {'meta': {'cfg' or 'config': text, ...}}
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
