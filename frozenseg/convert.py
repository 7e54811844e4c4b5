"""``frozenseg convert``: a checkpoint of any known format -> a verified frozen detector.

The format module renames keys; then every canonical key and every shape is
checked against the model the derived config builds, and nothing is written
unless all match. Output: a detector folder (:mod:`frozenseg.detector.folder`),
written to a temporary folder first and renamed into place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.folder import check_output_folder, config_json, weights_bytes, write_files
from frozenseg.formats import FORMATS, detect_format
from frozenseg.formats.base import Renamed, StateDict, python_config


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
    # (checkpoint key, its shape, a sibling it disagrees with, that one's shape): a tensor
    # the config was read from that is unlike its siblings, so they are the ones reported
    # as mismatched, though this one is at fault
    odd_ones: list[tuple[str, tuple, str, tuple]] = field(default_factory=list)
    source: str = ""
    sha256: str = ""
    # class names the training config carries (a Hugging Face config's id2label), or None
    class_names: list[str | None] | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problem(self) -> str:
        """One line naming what does not match (empty when everything does)."""
        parts = []
        for key, shape, sibling, theirs in self.odd_ones[:1]:
            parts.append(f"{key} is {list(shape)} but {sibling} is {list(theirs)} (the model "
                         f"was sized from {key})")
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
    mismatched = [k for k in sorted(set(expected) & set(state_dict))
                  if tuple(state_dict[k].shape) != expected[k]]
    report.mismatched = [(source_of.get(k, k), tuple(state_dict[k].shape), expected[k])
                         for k in mismatched]
    report.odd_ones = [(source_of.get(k, k), shape, source_of.get(s, s), theirs)
                       for k, shape, s, theirs in _odd_ones_out(state_dict, mismatched)]


def _odd_ones_out(state_dict: StateDict, mismatched: list[str]):
    """Layer-0 keys that fit the model while at least as many of their siblings (the same
    key at other layer indices) do not, all in the same way: the config is read from layer
    0, so a changed layer-0 tensor shows up as its siblings' mismatches."""
    def pattern(key: str) -> str:
        return re.sub(r"\.\d+\.", ".#.", key)

    groups: dict[str, list[str]] = {}
    for key in state_dict:
        groups.setdefault(pattern(key), []).append(key)
    odd = []
    for keys in groups.values():
        bad = [k for k in keys if k in mismatched]
        shapes = {tuple(state_dict[k].shape) for k in bad}
        if bad and len(shapes) == 1 and len(bad) >= len(keys) - len(bad):
            odd += [(k, tuple(state_dict[k].shape), bad[0], shapes.pop()) for k in keys
                    if k not in bad and re.search(r"\.(\d+)\.", k)[1] == "0"][:1]
    return odd


def inspect_checkpoint(
    src: str | Path, *, format: str = "auto", num_classes: int | None = None,
    trust: bool = False, config: str | Path | None = None, weights: str = "auto",
) -> tuple[StateDict, ConversionReport]:
    """Everything ``convert`` does except writing: what ``frozenseg inspect`` reports.

    ``src`` is a checkpoint file, a sharded index or a folder holding either. The
    training arguments come from ``config`` (a JSON or YAML file, e.g. detrex's
    config.yaml) when given, else from ``ckpt['args']``, else from a Hugging Face
    config.json beside the weights. When every key and shape matches, the detector is
    built, loaded strictly, run on a small image and serialised in memory, exactly as
    ``convert`` writes it: a clean report means ``convert`` succeeds. Returns the
    loaded model's state dict (canonical, float32) and the report.

    Raises ConversionError (one line naming the file) when the file is not a checkpoint,
    its format is unknown, or the built detector does not take the weights; key and
    shape mismatches are left in the report.
    """
    state_dict, report, _ = _inspect(src, format=format, num_classes=num_classes,
                                     trust=trust, config=config, weights=weights)
    return state_dict, report


def _inspect(src, *, format, num_classes, trust, config, weights
             ) -> tuple[StateDict, ConversionReport, bytes | None]:
    """:func:`inspect_checkpoint`, and the weights file's bytes it serialised (None when
    the report is not ok): what ``convert`` writes, serialised once."""
    from frozenseg.checkpoint import load_checkpoint

    src = Path(src)
    ckpt = load_checkpoint(src, trust=trust, weights=weights)
    args = read_training_config(config) if config else ckpt.args or _sidecar_config(ckpt.path)
    try:
        state_dict, report = convert_state_dict(
            ckpt.state_dict, format=format, args=args, num_classes=num_classes
        )
    except KeyError as err:
        raise ConversionError(f"{ckpt.path}: no key {err.args[0]!r}, which the "
                              f"{_format_name(ckpt.state_dict, format)} layout has: the "
                              f"checkpoint is incomplete or of another format") from None
    except (IndexError, ValueError, TypeError, ZeroDivisionError) as err:
        raise ConversionError(f"{ckpt.path}: {_one_line(err)}") from None
    report.source, report.sha256 = ckpt.path.name, ckpt.sha256
    report.class_names = _label_names(args, report.config.num_classes)
    report.notes[:0] = _weights_notes(ckpt)
    if not report.ok:
        return state_dict, report, None
    state_dict, serialised = _prove(state_dict, report, ckpt.path)
    return state_dict, report, serialised


def _label_names(args: dict, num_classes: int) -> list[str | None] | None:
    """The class names in a Hugging Face config's ``id2label``, when it names every class
    (transformers' placeholders ``LABEL_i`` name none; COCO's unused slots, "N/A", are
    None), or in mmdetection's meta (``dataset_meta.classes`` / ``CLASSES``); else None."""
    labels = args.get("id2label")
    if not isinstance(labels, dict):
        from frozenseg.formats.mmdet import class_names  # mmdetection's meta

        names = class_names(args)
        return names if names is not None and len(names) == num_classes else None
    names = [labels.get(str(i), labels.get(i)) for i in range(num_classes)]
    if not all(isinstance(n, str) for n in names) or all(
            re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return [None if n == "N/A" else n for n in names]


def _format_name(state_dict: StateDict, format: str) -> str:
    try:
        return detect_format(state_dict).name if format == "auto" else format
    except ValueError:
        return format


def _weights_notes(ckpt) -> list[str]:
    """Which copy of the weights was taken, and dtypes that are not float32."""
    from frozenseg.checkpoint import EMA_KEYS, MMENGINE_TRAINED

    notes = []
    if ckpt.other_key is not None:
        averaged = ckpt.weights_key in EMA_KEYS or ckpt.other_key == MMENGINE_TRAINED
        flag = "model" if averaged else "ema"
        notes.append(f"weights from ckpt[{ckpt.weights_key!r}]; the file also holds "
                     f"ckpt[{ckpt.other_key!r}] (--weights {flag} takes it)")
    dtypes = {t.dtype for t in ckpt.state_dict.values() if t.is_floating_point()}
    if dtypes - {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        notes.append(f"weights saved as {names}: the detector keeps them as float32")
    return notes


def _prove(state_dict: StateDict, report: ConversionReport, path: Path
           ) -> tuple[StateDict, bytes]:
    """Build the detector, load it strictly, run it on a small image and serialise it as
    ``write_detector`` does: the model's own state dict and its safetensors bytes."""
    from frozenseg.detector.model import build_detector

    model = build_detector(report.config).eval()
    text = {}
    if report.config.open_vocabulary:
        from frozenseg.detector.grounding import Prompt

        text = {"prompt": Prompt.probe()}
    try:
        model.load_state_dict(state_dict, strict=True)
        with torch.no_grad():
            image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
            out = model(image, torch.zeros(1, 64, 96, dtype=torch.bool), **text)
    except (RuntimeError, ValueError) as err:
        raise ConversionError(f"{path}: the converted detector does not run "
                              f"({_one_line(err)})") from None
    logits = out.logits[-1]  # an open-vocabulary detector's: -inf past the prompt
    logits = logits[..., : len(text["prompt"].input_ids)] if text else logits
    if not (logits.isfinite().all() and out.boxes[-1].isfinite().all()):
        raise ConversionError(f"{path}: the converted detector gives non-finite outputs on "
                              "a test image (are the weights damaged?)")
    state_dict = model.state_dict()
    return state_dict, weights_bytes(state_dict)


def convert_checkpoint(
    src: str | Path, out_dir: str | Path, *, format: str = "auto",
    num_classes: int | None = None, class_names: list[str] | None = None, trust: bool = False,
    config: str | Path | None = None, weights: str = "auto", overwrite: bool = False,
    tokenizer: str | Path | None = None,
) -> ConversionReport:
    """What ``frozenseg convert`` does: :func:`inspect_checkpoint`, then write atomically.
    ``out_dir`` must not exist, or be a detector folder frozenseg wrote and ``overwrite``.
    ``tokenizer``: the folder of an open-vocabulary detector's tokenizer files, when they
    are not beside the checkpoint (the official Grounding DINO's bert-base-uncased)."""
    check_output_folder(out_dir, overwrite=overwrite)
    _, report, serialised = _inspect(src, format=format, num_classes=num_classes,
                                     trust=trust, config=config, weights=weights)
    if not report.ok:
        raise ConversionError(f"{src}: {report.problem()}")
    if class_names is not None and len(class_names) != report.config.num_classes:
        raise ConversionError(f"{len(class_names)} class names for a detector with "
                              f"{report.config.num_classes} classes")
    class_names = report.class_names if class_names is None else class_names
    meta = config_json(report.config, format=report.format, source=report.source,
                       sha256=report.sha256, class_names=class_names)
    write_files(out_dir, serialised, meta, overwrite=overwrite,
                extra=_companion_files(tokenizer or src, report))
    return report


def _companion_files(src: str | Path, report: ConversionReport) -> dict[str, bytes]:
    """Files the detector needs at run time, in ``src`` or beside it: an open-vocabulary
    detector's tokenizer."""
    if not report.config.open_vocabulary:
        return {}
    from frozenseg.formats.grounding_dino import tokenizer_files

    try:
        return tokenizer_files(src)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def read_training_config(path: str | Path, *, _seen: tuple[Path, ...] = ()) -> dict:
    """A training config as a dict: JSON, YAML with Python tags ignored, or a Python file's
    top-level assignments read as data (Grounding DINO's ``GroundingDINO_SwinT_OGC.py``);
    nothing in it is run.

    detrex / detectron2 save config.yaml with ``!!python/name:`` tags for callables;
    those entries come back as None, which no converter reads. ``__include__`` bases
    (RT-DETR's, D-FINE's, DEIM's configs) are read and merged under the file's settings.
    """
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    path = Path(path)
    try:
        text = path.read_text()
        readers = {".json": json.loads, ".py": python_config}
        data = readers.get(path.suffix, lambda t: yaml.load(t, Loader=_Loader))(text)
    except (OSError, ValueError, SyntaxError, yaml.YAMLError) as err:
        raise ConversionError(
            f"{path}: not a readable JSON, YAML or Python config ({_one_line(err)})"
        ) from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a mapping of training settings")
    return _with_includes(data, path, _seen or (path.resolve(),))


def _with_includes(data: dict, path: Path, seen: tuple[Path, ...]) -> dict:
    """RT-DETR's, D-FINE's and DEIM's YAML configs name their bases in ``__include__``
    (paths relative to the file): the bases merged in order, the file's own settings last."""
    includes = data.pop("__include__", None) or []
    merged: dict = {}
    for name in [includes] if isinstance(includes, str) else includes:
        base = (path.parent / str(name)).resolve()
        if base in seen or not base.is_file():
            why = "includes itself" if base in seen else "is not there"
            raise ConversionError(f"{path}: its __include__ {name} {why}")
        _merge(merged, read_training_config(base, _seen=(*seen, base)))
    return _merge(merged, data)


def _merge(into: dict, settings: dict) -> dict:
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _sidecar_config(weights: Path) -> dict:
    """The training config saved beside the weights: Hugging Face's config.json, or the
    config.yaml detectron2 / detrex write into their output folder. {} if none reads."""
    for name in ("config.json", "config.yaml"):
        path = weights.parent / name
        if path.is_file():
            try:
                return read_training_config(path)
            except ConversionError:
                return {}
    return {}


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
