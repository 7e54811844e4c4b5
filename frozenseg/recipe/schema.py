"""The recipe's schema: one typed section per part, every default, every check of a value.

:mod:`frozenseg.recipe.loader` reads YAML files and overrides into these classes; nothing
here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from frozenseg.recipe.head import HeadConfig


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
    # Open vocabulary (Grounding DINO): what to find, phrases separated by " . " ("cat .
    # dog ."); each phrase is a class, matched to the dataset's categories by name. Needed
    # for an open-vocabulary detector, refused (when its folder is read) for any other.
    prompt: str | None = None

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "detector.top_k", "at least 1", self.top_k)
        _check(self.memory_layer is None or self.memory_layer >= 1, "detector.memory_layer",
               "at least 1 (layers count from 1) or null", self.memory_layer)
        _check(self.finetune_lr_factor > 0, "detector.finetune_lr_factor", "positive",
               self.finetune_lr_factor)
        _check(self.prompt is None or self.prompt.strip(" .?") != "", "detector.prompt",
               "phrases separated by ' . ' (e.g. 'cat . dog .') or null", self.prompt)


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
    # Also cache the backbone's stride-4 map (C1), so that training reads it instead of
    # running the backbone's first stage on every image: a larger cache, for small sets.
    store_c1: bool = False
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


# The sections each mode reads besides the shared ``data`` and ``train``; a recipe holds
# its own mode's (defaults where it leaves one out) and no other mode's.
MODE_SECTIONS = {"head": ("detector", "head", "loss", "eval"), "maskdino": ("maskdino",)}
_SECTION_TYPES = {"detector": DetectorSection, "head": HeadConfig, "loss": LossSection,
                  "eval": EvalSection, "maskdino": MaskDINOSection}


@dataclass(kw_only=True)
class Recipe:
    """A union by mode: ``data`` and ``train`` always, then the sections of ``mode``
    (:data:`MODE_SECTIONS`); the other mode's sections are ``None``."""

    mode: Literal["head", "maskdino"] = "head"
    data: DataSection
    train: TrainSection
    detector: DetectorSection | None = None
    head: HeadConfig | None = None
    loss: LossSection | None = None
    eval: EvalSection | None = None
    maskdino: MaskDINOSection | None = None

    def __post_init__(self) -> None:
        for mode, sections in MODE_SECTIONS.items():
            for name in sections:
                if mode == self.mode and getattr(self, name) is None:
                    setattr(self, name, _SECTION_TYPES[name]())
                if mode != self.mode and getattr(self, name) is not None:
                    raise ValueError(f"{name} is a section of mode {mode}, not of mode "
                                     f"{self.mode}: leave it out")
        if self.mode == "head":
            _check(self.detector.path is not None, "detector.path",
                   "a converted detector folder (mode head trains on its outputs)", None)
        elif self.maskdino.task == "panoptic":
            _check(self.data.train.panoptic is not None, "data.train.panoptic",
                   "a COCO panoptic json (maskdino.task: panoptic)", None)
