"""Recipes: a YAML file (with the bases it names) plus ``key=value`` overrides -> a typed Recipe.

A recipe may name ``base: other.yaml`` (or a list of bases, applied in order; relative to the
recipe's own folder; bases may have bases). Its mapping is deep-merged over the bases':
mappings merge, anything else (numbers, strings, lists, null) replaces. Overrides such as
``train.lr=1e-4`` or ``data.cache=null`` are applied last; their values are YAML.

Scalars are read as YAML 1.2 reads them: ``1e-4`` is a number and ``no``/``yes``/``on``/``off``
stay strings (``train.precision: no``); only ``true``/``false`` are booleans.

Every key is checked: an unknown key, a wrong type or a value out of range is a
:class:`RecipeError` naming the dotted key and the file that set it (``command line`` for an
override). Paths inside a recipe (detector, data, output) are relative to the folder the
command runs in, not to the recipe file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from frozenseg.files import atomic_write_text
from frozenseg.head.config import HeadConfig

if TYPE_CHECKING:

    pass

COMMAND_LINE = "command line"


class RecipeError(ValueError):
    """A recipe cannot be loaded; the message is one line naming the file and the key."""


def _check(ok: bool, key: str, must: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"{key} must be {must}, got {got!r}")


@dataclass
class DetectorSection:
    """The frozen detector: a folder ``frozenseg convert`` wrote (config.json + weights).
    (mode maskdino starts from ``maskdino.init`` instead and needs no path here.)"""

    path: str | None = None
    top_k: int = 100                    # predictions per image given to the head
    # Encoder layer (1-based) whose output is the map E (Table 14: 4 of 6);
    # null: the detector's default (layer 4, or its last if it has fewer).
    memory_layer: int | None = 4
    finetune: Literal["frozen", "partial", "full"] = "frozen"  # Table 16
    finetune_lr_factor: float = 0.1     # the detector's lr = train.lr x this (Table 16)

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "detector.top_k", "at least 1", self.top_k)
        _check(self.memory_layer is None or self.memory_layer >= 1, "detector.memory_layer",
               "at least 1 (layers count from 1) or null", self.memory_layer)
        _check(self.finetune_lr_factor > 0, "detector.finetune_lr_factor", "positive",
               self.finetune_lr_factor)


@dataclass
class SplitSection:
    images: str         # folder of images
    annotations: str    # COCO instances json
    # COCO panoptic json and its PNG folder: mode maskdino's panoptic training and PQ.
    panoptic: str | None = None
    panoptic_png: str | None = None

    def __post_init__(self) -> None:
        _check((self.panoptic is None) == (self.panoptic_png is None), "data.*.panoptic_png",
               "given together with panoptic", self.panoptic_png)


@dataclass
class DataSection:
    train: SplitSection
    val: SplitSection
    transform: Literal["deformable_detr", "lsj", "evaluation"] = "deformable_detr"  # Table 11
    cache: str | None = None        # feature cache of the train split; null: run the detector
    views: int = 1                  # augmented views per image in the cache
    num_workers: int = 2
    # Multiplies every image size of the transforms (train 480..800 / 1333, eval 800 / 1333,
    # LSJ 1024): below 1 for small images (the synthetic ones) or quick runs.
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check(self.views >= 1, "data.views", "at least 1", self.views)
        _check(0 < self.scale <= 4, "data.scale", "in (0, 4]", self.scale)
        _check(self.num_workers >= 0, "data.num_workers", "0 or more", self.num_workers)


@dataclass
class LossSection:
    """Point-sampled mask loss (section 3.5), mask-IoU loss, and which boxes are trained on.

    N = points_fraction x the mask's pixels per instance (Table 6: 0.25, i.e. 75% fewer
    points than pixels; 1.0 stands for the rows without sampled supervision); oversample k:
    k N random candidates; importance beta: beta N of the most uncertain of them, the other
    (1 - beta) N at random. The loss weights are not in the paper: 1.0 each is this
    project's choice.
    """

    points_fraction: float = 0.25
    oversample: float = 3.0
    importance: float = 0.75
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0         # mask scoring (predicted IoU) loss
    assign_iou: float = 0.5         # a proposal learns the mask of a GT box it overlaps this much
    # Boxes the head is trained on: the detector's top-K, the ground-truth boxes (jittered
    # by up to gt_jitter of their size; for a weak detector), or both.
    proposals: Literal["detector", "gt", "both"] = "detector"
    gt_jitter: float = 0.1

    def __post_init__(self) -> None:
        _check(0 < self.points_fraction <= 1, "loss.points_fraction", "in (0, 1]",
               self.points_fraction)
        _check(self.oversample >= 1, "loss.oversample", "at least 1", self.oversample)
        _check(0 <= self.importance <= 1, "loss.importance", "in [0, 1]", self.importance)
        for name in ("bce_weight", "dice_weight", "iou_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name}", "0 or more", getattr(self, name))
        _check(0 <= self.gt_jitter < 0.5, "loss.gt_jitter", "in [0, 0.5)", self.gt_jitter)
        _check(0 <= self.assign_iou <= 1, "loss.assign_iou", "in [0, 1]", self.assign_iou)


@dataclass
class TrainSection:
    """AdamW with step decay (section 3.1). grad_clip (max gradient norm; 0: none) is not in
    the paper: 1.0 is this project's choice."""

    output_dir: str
    batch_size: int = 8
    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-5
    iterations: int = 88_500        # 6 COCO epochs at batch 8
    lr_drops: tuple[float, ...] = (0.9, 0.95)   # fractions of iterations; lr / 10 at each
    grad_clip: float = 1.0
    precision: Literal["no", "fp16", "bf16"] = "no"
    grad_accumulation: int = 1
    checkpoint_every: int = 5000    # iterations; 0: only at the end
    eval_every: int = 0             # iterations; 0: only at the end
    log_every: int = 20
    seed: int = 42
    max_minutes: float | None = None    # stop after this wall time (demos, benchmarks)

    def __post_init__(self) -> None:
        for name in ("batch_size", "iterations", "grad_accumulation", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", "at least 1", getattr(self, name))
        for name in ("weight_decay", "grad_clip", "checkpoint_every", "eval_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", "0 or more", getattr(self, name))
        _check(self.lr > 0, "train.lr", "positive", self.lr)
        _check(all(0 <= b < 1 for b in self.betas), "train.betas", "two numbers in [0, 1)",
               list(self.betas))
        drops = self.lr_drops
        _check(all(0 < d < 1 for d in drops) and list(drops) == sorted(set(drops)),
               "train.lr_drops", "increasing fractions in (0, 1)", list(drops))
        _check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes",
               "positive or null", self.max_minutes)


@dataclass
class EvalSection:
    # Boxes the masks are made for: the detector's top-K, or the ground-truth boxes (score
    # 1 x predicted IoU): the head's mask quality alone, whatever the detector.
    boxes: Literal["detector", "gt"] = "detector"
    score_threshold: float = 0.0
    max_per_image: int = 100
    mask_threshold: float = 0.5     # on the mask probability

    def __post_init__(self) -> None:
        _check(0 <= self.score_threshold <= 1, "eval.score_threshold", "in [0, 1]",
               self.score_threshold)
        _check(self.max_per_image >= 1, "eval.max_per_image", "at least 1", self.max_per_image)
        _check(0 < self.mask_threshold < 1, "eval.mask_threshold", "in (0, 1)",
               self.mask_threshold)


@dataclass
class MaskDINOSection:
    """Mode maskdino: Mask DINO trained whole (mask-dino.txt). The model is DINO's, from
    ``init`` (a converted DINO folder: what matches is loaded, classes remapped by name)
    or from ``model`` (DetectorConfig fields, random weights: backbone, widths, layers)."""

    init: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    task: Literal["instance", "panoptic"] = "panoptic"   # panoptic: things and stuff
    # Content queries: "selected" (Mask DINO's unified selection: the top encoder tokens)
    # or "mixed" (DINO's learned content; the detector is then exactly DINO and exports
    # in the official DINO layout).
    query_init: Literal["selected", "mixed"] = "selected"
    num_queries: int = 300
    dec_layers: int = 9
    num_denoising: int = 100        # denoising queries per batch (dynamic groups)
    # Denoising box noise lambda: a positive's corners move by up to lambda/2 of the box
    # size, a negative's up to lambda (Mask DINO 0.4; DINO's detector configs 1.0).
    box_noise_scale: float = 0.4
    mask_enhanced_boxes: bool = False
    backbone_lr_factor: float = 0.1
    # Activation checkpointing, to fit one GPU (recompute instead of keeping).
    checkpoint_backbone: bool = False
    checkpoint_encoder: bool = False
    checkpoint_decoder: bool = False
    num_points: int = 12544         # mask loss and matching points per mask
    cls_weight: float = 4.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    mask_bce_weight: float = 5.0
    mask_dice_weight: float = 5.0
    # Inference.
    object_threshold: float = 0.25  # panoptic: queries scoring less are dropped
    overlap_threshold: float = 0.8  # panoptic: a query keeping less of its mask is dropped

    def __post_init__(self) -> None:
        for name in ("num_queries", "dec_layers", "num_points"):
            _check(getattr(self, name) >= 1, f"maskdino.{name}", "at least 1",
                   getattr(self, name))
        _check(self.num_denoising >= 0, "maskdino.num_denoising", "0 or more",
               self.num_denoising)
        _check(self.backbone_lr_factor >= 0, "maskdino.backbone_lr_factor", "0 or more",
               self.backbone_lr_factor)
        _check(0 <= self.box_noise_scale < 2, "maskdino.box_noise_scale", "in [0, 2)",
               self.box_noise_scale)


@dataclass(kw_only=True)
class Recipe:
    mode: Literal["head", "maskdino"] = "head"
    detector: DetectorSection = field(default_factory=DetectorSection)
    data: DataSection
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection
    eval: EvalSection = field(default_factory=EvalSection)
    maskdino: MaskDINOSection = field(default_factory=MaskDINOSection)

    def __post_init__(self) -> None:
        if self.mode == "head":
            _check(self.detector.path is not None, "detector.path",
                   "a converted detector folder (mode head trains on its outputs)", None)
        elif self.maskdino.task == "panoptic":
            _check(self.data.train.panoptic is not None, "data.train.panoptic",
                   "a COCO panoptic json (maskdino.task: panoptic)", None)


# ----------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: 1e-4 is a float; yes/no/on/off are strings."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver(_FLOAT, _EXPONENT_FLOAT, list("-+0123456789."))


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """The recipe at ``path`` with its bases merged in, then ``key.sub=value`` overrides."""
    origins: dict[str, str] = {}
    data = _load_file(Path(path), origins, chain=())
    return _validated(data, origins, str(path), overrides)


def recipe_from_dict(data: dict, source: str, overrides: Iterable[str] = ()) -> Recipe:
    """A recipe from plain data (``recipe_to_dict``'s, e.g. the one a head checkpoint
    carries), then overrides; ``source`` names it in error messages."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, not a {type(data).__name__}")
    data, origins = copy.deepcopy(data), {}
    _record(data, source, origins)
    return _validated(data, origins, source, overrides)


def _validated(data: dict, origins: dict[str, str], source: str,
               overrides: Iterable[str]) -> Recipe:
    for item in [overrides] if isinstance(overrides, str) else overrides:
        _apply_override(data, item, origins)
    return _Validator(origins, source).section(Recipe, data, "")


def _load_file(path: Path, origins: dict[str, str], chain: tuple[tuple[Path, str], ...]) -> dict:
    real = path.resolve()
    if any(real == seen for seen, _ in chain):
        raise RecipeError("base cycle: " + " -> ".join([name for _, name in chain] + [str(path)]))
    data = _read_yaml(path, chain[-1][1] if chain else None)
    bases = data.pop("base", None)
    bases = [bases] if isinstance(bases, str) else bases or []
    if not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise RecipeError(f"{path}: base must be a file name or a list of them, got {bases!r}")
    merged: dict = {}
    for base in bases:
        parent = _load_file(path.parent / base, origins, (*chain, (real, str(path))))
        merged = _merge(merged, parent)
    _record(data, str(path), origins)
    return _merge(merged, data)


def _read_yaml(path: Path, referrer: str | None) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        named = f"{referrer}: base {path}" if referrer else str(path)
        raise RecipeError(f"{named}: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except RecursionError:  # the parser recurses: thousands of nested '[' exhaust the stack
        raise RecipeError(f"{path}: not valid YAML (nested too deeply)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, not a {type(data).__name__}")
    return data


def _merge(base: dict, child: dict) -> dict:
    """``child`` deep-merged over ``base``: mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _record(data: dict, source: str, origins: dict[str, str], prefix: str = "") -> None:
    """Remember which file (or the command line) set each dotted key."""
    for key, value in data.items():
        dotted = _join(prefix, key)
        origins[dotted] = source
        if isinstance(value, dict):
            _record(value, source, origins, dotted)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 0.0001)``; the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise RecipeError(f"{COMMAND_LINE}: {item!r} is not key=value (e.g. train.lr=1e-4)")
    try:
        return key, yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        raise RecipeError(f"{COMMAND_LINE}: {key}: {text!r} is not a YAML value") from None


def _apply_override(data: dict, item: str, origins: dict[str, str]) -> None:
    key, value = parse_override(item)
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
            origins[".".join(parts[: i + 1])] = COMMAND_LINE
        elif not isinstance(node[part], dict):
            raise RecipeError(f"{COMMAND_LINE}: {'.'.join(parts[: i + 1])} is a value, "
                              f"not a section: cannot set {key}")
        node = node[part]
    origins[key] = COMMAND_LINE
    if isinstance(value, dict):  # a mapping merges into the section, as in a file
        _record(value, COMMAND_LINE, origins, key)
        if isinstance(node.get(parts[-1]), dict):
            value = _merge(node[parts[-1]], value)
    node[parts[-1]] = value


class _Validator:
    """Turns the merged mapping into dataclasses, checking every key against the field types."""

    def __init__(self, origins: dict[str, str], default: str) -> None:
        self.origins, self.default = origins, default

    def where(self, key: str) -> str:
        """The file (or the command line) that set ``key``, or else its nearest section."""
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.default

    def fail(self, key: str, message: str) -> typing.NoReturn:
        raise RecipeError(f"{self.where(key)}: {message}")

    def section(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, dict):
            self.fail(prefix, f"{prefix} must be a mapping of keys, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        for name in data:
            if name not in hints:
                self._unknown(prefix, str(name), [f.name for f in fields])
        for f in fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in data:
                self.fail(prefix, f"missing key {_join(prefix, f.name)}")
        values = {f.name: self.value(data[f.name], hints[f.name], _join(prefix, f.name))
                  for f in fields if f.name in data}
        try:
            return cls(**values)
        except ValueError as err:  # the section's own checks name the key first
            named = re.match(r"[\w.]+", str(err))
            self.fail(named[0] if named else prefix, str(err))

    def _unknown(self, prefix: str, name: str, valid: list[str]) -> typing.NoReturn:
        key = _join(prefix, name)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = (f"did you mean {_join(prefix, close[0])}?" if close
                else f"valid keys: {', '.join(_join(prefix, v) for v in valid)}")
        self.fail(key, f"unknown key {key} ({hint})")

    def value(self, value: Any, hint: Any, key: str) -> Any:
        if dataclasses.is_dataclass(hint):
            return self.section(hint, value, key)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is Literal:
            if isinstance(value, str) and value in args:
                return value
            self.fail(key, f"{key} is {value!r}; one of {', '.join(args)}")
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1 and _fits(value, inner[0]):
                return self.value(value, inner[0], key)
        elif origin is tuple:
            if isinstance(value, (list, tuple)):
                items = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
                if len(items) == len(value) and all(map(_fits, value, items)):
                    return tuple(self.value(v, t, key) for v, t in zip(value, items, strict=True))
        elif origin is dict:  # free-form (checked where it is used, e.g. DetectorConfig)
            if isinstance(value, dict) and all(isinstance(k, str) for k in value):
                return dict(value)
        elif _fits(value, hint):
            if hint is float and not math.isfinite(value):  # YAML's .inf and .nan
                self.fail(key, f"{key} must be a finite number, got {value!r}")
            return float(value) if hint is float else value
        self.fail(key, f"{key} must be {_describe(hint)}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a scalar matches a plain type (ints pass for floats; bools only for bools)."""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is Literal:
        return True  # its own checks follow
    return isinstance(hint, type) and isinstance(value, hint)


def _describe(hint: Any) -> str:
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is Literal:
        return f"one of {', '.join(args)}"
    if origin is dict:
        return "a mapping of keys"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# ----------------------------------------------------------------------------- saving


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain YAML-safe data (tuples become lists)."""
    return _plain(dataclasses.asdict(recipe))


def recipe_differences(before: dict, after: dict, sections: Iterable[str]) -> list[tuple]:
    """(dotted key, value in ``before``, value in ``after``) for every key of ``sections``
    (recipe dicts, :func:`recipe_to_dict`) whose value differs, in key order."""
    flat_before, flat_after, sections = _flat(before), _flat(after), set(sections)
    keys = sorted(k for k in flat_before.keys() | flat_after.keys()
                  if k.split(".")[0] in sections and flat_before.get(k) != flat_after.get(k))
    return [(k, flat_before.get(k), flat_after.get(k)) for k in keys]


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: value}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, _join(prefix, key)))
        else:
            flat[_join(prefix, key)] = value
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (no bases), atomically: a temporary name, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "# The resolved recipe: bases and overrides applied.\n"
                      + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
