"""``frozenseg convert``: a checkpoint of any known format -> a verified frozen detector.

The format module renames keys; then every canonical key and every shape is
checked against the model the derived config builds, and nothing is written
unless all match. Output: ``DIR/detector.safetensors`` + ``DIR/config.json``,
written to a temporary folder first and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from frozenseg.detector.classes import class_map
from frozenseg.detector.config import DetectorConfig
from frozenseg.formats import FORMATS, detect_format
from frozenseg.formats.base import Renamed, StateDict

WEIGHTS_FILE, CONFIG_FILE = "detector.safetensors", "config.json"


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message is one line saying why."""


@dataclass
class ConversionReport:
    format: str
    config: DetectorConfig
    notes: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    derived: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # (checkpoint key, its shape, the model's shape)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    source: str = ""
    sha256: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problem(self) -> str:
        """One line naming what does not match (empty when everything does)."""
        parts = []
        if self.mismatched:
            key, got, want = self.mismatched[0]
            parts.append(f"{len(self.mismatched)} shape mismatches, e.g. {key}: checkpoint "
                         f"{list(got)}, model {list(want)}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys, e.g. {', '.join(self.missing[:3])}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys, e.g. "
                         f"{', '.join(self.unexpected[:3])}")
        return "; ".join(parts)


def convert_state_dict(
    state_dict: StateDict, *, format: str = "auto", args: dict | None = None,
    num_classes: int | None = None,
) -> tuple[StateDict, ConversionReport]:
    """Pure conversion: a source state dict -> the canonical one, verified key by key."""
    fmt = detect_format(state_dict) if format == "auto" else _named_format(format)
    config, notes = fmt.derive_config(state_dict, args or {})
    if num_classes is not None and num_classes != config.num_classes:
        raise ConversionError(
            f"the checkpoint's classifier has {config.num_classes} classes, not {num_classes}"
        )
    renamed = fmt.rename(state_dict, config)
    report = _report(fmt.name, config, notes, renamed)
    _verify(renamed.state_dict, config, report)
    return renamed.state_dict, report


def _named_format(name: str):
    if name not in FORMATS:
        raise ConversionError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def _report(name: str, config: DetectorConfig, notes: list[str], r: Renamed) -> ConversionReport:
    return ConversionReport(format=name, config=config, notes=notes, renamed=r.renamed,
                            kept=r.kept, dropped=r.dropped, derived=r.derived)


def _verify(state_dict: StateDict, config: DetectorConfig, report: ConversionReport) -> None:
    """Match every key and shape against the model the config builds (on the meta device)."""
    from frozenseg.detector.model import build_detector

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_detector(config).state_dict().items()}
    report.missing = sorted(set(expected) - set(state_dict))
    # Name unexpected and mismatched keys as the checkpoint does: what the user can look up.
    source_of = {target: source for source, target in report.renamed}
    report.unexpected = sorted(source_of.get(k, k) for k in set(state_dict) - set(expected))
    report.mismatched = [
        (source_of.get(k, k), tuple(state_dict[k].shape), expected[k])
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != expected[k]
    ]


def inspect_checkpoint(
    src: str | Path, *, format: str = "auto", num_classes: int | None = None,
    trust: bool = False, config: str | Path | None = None,
) -> tuple[StateDict, ConversionReport]:
    """Load safely and convert, without writing: what ``frozenseg inspect`` reports.

    The training arguments come from ``config`` (a JSON or YAML file, e.g. detrex's
    config.yaml) when given, else from ``ckpt['args']``, else from a Hugging Face
    config.json beside the checkpoint. Raises ConversionError (one line naming the
    file) when the file is not a checkpoint or its format is unknown; key and shape
    mismatches are left in the report.
    """
    from frozenseg.checkpoint import load_checkpoint

    src = Path(src)
    ckpt = load_checkpoint(src, trust=trust)
    args = read_training_config(config) if config else ckpt.args or _sidecar_config(src)
    try:
        state_dict, report = convert_state_dict(
            ckpt.state_dict, format=format, args=args, num_classes=num_classes
        )
    except (KeyError, IndexError, ValueError) as err:
        raise ConversionError(f"{src}: {_one_line(err)}") from err
    report.source, report.sha256 = src.name, ckpt.sha256
    return state_dict, report


def convert_checkpoint(
    src: str | Path, out_dir: str | Path, *, format: str = "auto",
    num_classes: int | None = None, class_names: list[str] | None = None, trust: bool = False,
    config: str | Path | None = None,
) -> ConversionReport:
    """What ``frozenseg convert`` does: load safely, convert, verify, write atomically."""
    state_dict, report = inspect_checkpoint(src, format=format, num_classes=num_classes,
                                            trust=trust, config=config)
    if not report.ok:
        raise ConversionError(f"{src}: {report.problem()}")
    if class_names is not None and len(class_names) != report.config.num_classes:
        raise ConversionError(f"{len(class_names)} class names for a detector with "
                              f"{report.config.num_classes} classes")
    _write(Path(out_dir), state_dict, report, class_names)
    return report


def read_training_config(path: str | Path) -> dict:
    """A training config as a dict: JSON, or YAML with Python tags ignored (never run).

    detrex / detectron2 save config.yaml with ``!!python/name:`` tags for callables;
    those entries come back as None, which no converter reads.
    """
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConversionError(
            f"{path}: not a readable JSON or YAML config ({_one_line(err)})"
        ) from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a mapping of training settings")
    return data


def _sidecar_config(src: Path) -> dict:
    """A Hugging Face checkpoint's config.json, when it sits beside the weights."""
    path = src.parent / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _write(out_dir: Path, state_dict: StateDict, report: ConversionReport, class_names) -> None:
    write_detector(out_dir, state_dict, report.config, format=report.format,
                   source=report.source, sha256=report.sha256, class_names=class_names)


def write_detector(out_dir: str | Path, state_dict: StateDict, config: DetectorConfig, *,
                   format: str, source: str, sha256: str = "",
                   class_names: list[str] | None = None) -> None:
    """The folder ``load_detector`` reads (weights + config.json), written atomically: a
    staging folder renamed into place. Also for detectors frozenseg trains or makes."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, staging / WEIGHTS_FILE)
        meta = {
            "format": format, "source": source, "sha256": sha256, "config": config.to_dict(),
            "classes": class_map(config.num_classes, class_names),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move staging to out_dir; an existing out_dir is replaced only once staging is complete."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
