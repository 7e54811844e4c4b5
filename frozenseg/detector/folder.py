"""The converted-detector folder, and the one place that reads or writes it.

A folder holds two files (and Grounding DINO's tokenizer)::

    detector.safetensors   the canonical DeformableDETR's state dict (each tensor once)
    config.json            {"format": the checkpoint format it came from, "source": the
                            file's name, "sha256": the file's hash, "config": the
                            DetectorConfig, "classes": {"names", "category_ids"} per
                            classifier index (see detector.classes)}
    tokenizer/             an open-vocabulary detector's (Grounding DINO's) prompt tokenizer

``frozenseg convert`` writes it, the joint mode writes its trained detector as one, and
``load_detector``, the feature cache (which records config.json's hash as the detector's
identity) and the demo read it through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from frozenseg.detector.classes import class_map
from frozenseg.detector.config import DetectorConfig
from frozenseg.files import atomic_folder, unshared

WEIGHTS_FILE, CONFIG_FILE = "detector.safetensors", "config.json"


class DetectorFolderError(ValueError):
    """A path is not a detector folder, or one cannot be written there; one line naming it."""


# ----------------------------------------------------------------------------- reading


def read_meta(folder: str | os.PathLike) -> dict:
    """config.json of a detector folder, checked to hold a detector config."""
    folder = Path(folder)
    hint = f"(write one with frozenseg convert --detector CHECKPOINT --out {folder})"
    if not folder.is_dir():
        raise DetectorFolderError(f"{folder}: not a detector folder {hint}")
    path = folder / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DetectorFolderError(f"{path} is missing {hint}") from None
    except (OSError, ValueError) as err:
        raise DetectorFolderError(f"{path}: not readable JSON ({err})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict)):
        raise DetectorFolderError(f"{path}: not a detector config (no 'config' mapping)")
    return meta


def read_config(folder: str | os.PathLike) -> DetectorConfig:
    """The DetectorConfig of a detector folder (weights not read)."""
    path = Path(folder) / CONFIG_FILE
    try:
        return DetectorConfig.from_dict(read_meta(folder)["config"])
    except (TypeError, KeyError) as err:
        raise DetectorFolderError(f"{path}: not a detector config ({err})") from None


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise DetectorFolderError(f"{path} is missing (write it with frozenseg convert)")
    return load_file(path)


def read_tokenizer(folder: str | os.PathLike):
    """An open-vocabulary detector's prompt tokenizer (its ``tokenizer/``), or None when the
    folder has none (a closed-set detector)."""
    from frozenseg.detector.grounding import TOKENIZER_FOLDER, load_tokenizer

    path = Path(folder) / TOKENIZER_FOLDER
    if not path.is_dir():
        if read_config(folder).open_vocabulary:
            raise DetectorFolderError(f"{path} is missing: Grounding DINO needs its tokenizer "
                                      "(convert the save_pretrained folder again)")
        return None
    return load_tokenizer(path)


def config_path(folder: str | os.PathLike) -> Path:
    """config.json: its sha256 is the detector's identity in a feature cache."""
    return Path(folder) / CONFIG_FILE


def is_detector_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a detector folder frozenseg wrote: its config.json says so."""
    try:
        meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"format", "config"} <= set(meta)


# ----------------------------------------------------------------------------- writing


def write_detector(out_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                   config: DetectorConfig, *, format: str, source: str, sha256: str = "",
                   class_names: list[str] | None = None, overwrite: bool = False) -> None:
    """Write a detector folder atomically: staged beside ``out_dir``, then renamed into
    place. An existing ``out_dir`` is replaced only if frozenseg wrote it and ``overwrite``."""
    write_files(out_dir, weights_bytes(state_dict),
                config_json(config, format=format, source=source, sha256=sha256,
                            class_names=class_names), overwrite=overwrite)


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """detector.safetensors in memory (tensors that share storage written once each)."""
    from safetensors.torch import save

    return save(unshared(state_dict))


def config_json(config: DetectorConfig, *, format: str, source: str, sha256: str = "",
                class_names: list[str] | None = None) -> str:
    """config.json's text: where the detector came from, its config, its classes."""
    meta = {"format": format, "source": source, "sha256": sha256, "config": config.to_dict(),
            "classes": class_map(config.num_classes, class_names)}
    return json.dumps(meta, indent=2) + "\n"


def write_files(out_dir: str | os.PathLike, weights: bytes, meta: str, *,
                overwrite: bool, extra: dict[str, bytes] | None = None) -> None:
    """The folder's two files, already serialised, staged and renamed into place, with
    ``extra`` files (relative path: bytes; an open-vocabulary detector's tokenizer)."""
    check_output_folder(out_dir, overwrite=overwrite)
    with atomic_folder(out_dir) as staging:
        (staging / WEIGHTS_FILE).write_bytes(weights)
        (staging / CONFIG_FILE).write_text(meta)
        for name, data in (extra or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)


def check_output_folder(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse, in one line, to replace anything but a detector folder frozenseg wrote,
    and that one only when asked to: frozenseg never deletes a user's files."""
    out_dir = Path(out_dir).absolute()
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or not is_detector_folder(out_dir):
        what = "a directory" if out_dir.is_dir() else "a file"
        raise DetectorFolderError(f"{out_dir}: exists and is {what} frozenseg did not write "
                                  "as a detector folder: choose a new --out folder")
    if not overwrite:
        raise DetectorFolderError(f"{out_dir}: already holds a converted detector; pass "
                                  "--overwrite to replace it")

