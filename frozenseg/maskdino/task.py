"""Mode maskdino: Mask DINO trained whole by the one training loop
(:class:`frozenseg.engine.train.Trainer`), and its round trips with detector folders.

* :func:`build_maskdino`: the model a recipe describes, from random weights
  (``maskdino.model``: DetectorConfig fields) or from a converted DINO (``maskdino.init``,
  any format ``frozenseg convert`` reads): every tensor whose name and shape match is
  loaded, class rows are remapped by name onto the dataset's classes, and the report
  says what was new and which detector classes were dropped.
* :func:`save_as_detector`: a trained joint model as a converted-detector folder, which
  :func:`frozenseg.load_detector` then loads frozen for the mask-head pipeline.
* :class:`MaskDINOTask`: data (panoptic or instance, LSJ or the recipe's transform,
  images without annotations included), losses, optimizer groups (backbone at
  ``backbone_lr_factor``), evaluation (AP, PQ, mIoU).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from frozenseg.checkpoint import load_training_checkpoint
from frozenseg.data import CocoInstances, CocoPanoptic, collate
from frozenseg.data.transforms import boxes_to_cxcywh_normalized
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.model import build_detector
from frozenseg.engine.data import LiveTrainingSet, eval_transform, train_transform
from frozenseg.maskdino.criterion import LossWeights, MaskDINOCriterion
from frozenseg.maskdino.inference import EvalSplit, evaluate_maskdino
from frozenseg.maskdino.matcher import HybridMatcher, MatchCostWeights
from frozenseg.maskdino.model import MaskDINO
from frozenseg.maskdino.postprocess import InferenceSettings

# What every Mask DINO shares with DINO's code (formats/dino.py derives the same for a
# converted DINO), except the queries: unified query selection unless the recipe's
# maskdino.query_init says "mixed" (DINO's).
DINO_FIXED = {"variant": "dino", "query_init": "selected", "box_refine": True,
              "proposal_score": "max_class", "decoder_norm": True, "ref_point_head": True,
              "pos_offset": 0.0, "inverse_sigmoid_eps": 1e-3, "pos_temperature": 20.0}

# Rows indexed by class: remapped by name when the dataset's classes differ.
_CLASS_ROWS = ("class_embed.", "transformer.enc_out_class_embed.", "label_enc.")


def build_maskdino(recipe, class_names: list[str]) -> tuple[MaskDINO, list[str]]:
    """(model, report lines) for ``recipe.maskdino`` and the dataset's classes."""
    section = recipe.maskdino
    shape = {"num_classes": len(class_names), "num_queries": section.num_queries,
             "dec_layers": section.dec_layers, "dn_labelbook_size": len(class_names),
             "query_init": section.query_init}
    if section.init is None:
        base = DetectorConfig.from_dict({**section.model, **DINO_FIXED, **shape})  # shape wins
        detector = build_detector(base)
        detector.init_for_training()
        return _model(detector, section), [
            f"Mask DINO from random weights ({base.backbone['name']} backbone)"]
    from frozenseg.detector.frozen import load_detector

    source = load_detector(section.init)
    if source.config.variant != "dino" or not source.config.two_stage:
        raise ValueError(f"{section.init}: maskdino.init needs a two-stage DINO detector, "
                         f"not {source.config.variant} ({source.config.query_init} queries)")
    config = dataclasses.replace(source.config, **{**DINO_FIXED, **shape})
    detector = build_detector(config)
    detector.init_for_training()  # what the source lacks (new classes) starts as DINO's
    model = _model(detector, section)
    report = _load_matching(model.detector, source.model.state_dict(), source.classes["names"],
                            class_names, section.init)
    return model, report


def _model(detector: nn.Module, section) -> MaskDINO:
    model = MaskDINO(detector, num_denoising=section.num_denoising,
                     box_noise_scale=section.box_noise_scale,
                     mask_enhanced_boxes=section.mask_enhanced_boxes)
    model.set_checkpointing(backbone=section.checkpoint_backbone,
                            encoder=section.checkpoint_encoder,
                            decoder=section.checkpoint_decoder)
    return model


def _load_matching(detector: nn.Module, source: dict, source_names: list, names: list[str],
                   where: str) -> list[str]:
    """Copy what fits from a detector's state dict; class rows by name. Report lines."""
    target = detector.state_dict()
    rows = _class_rows(source_names, names)
    loaded, new = 0, []
    for key, value in target.items():
        if key in source and key.startswith(_CLASS_ROWS) and value.shape[0] != 0:
            _copy_rows(value, source[key], rows)
            loaded += 1
        elif key in source and source[key].shape == value.shape:
            value.copy_(source[key])
            loaded += 1
        else:
            new.append(key)
    detector.load_state_dict(target)
    matched = sum(r is not None for r in rows)
    dropped = sorted({str(n) for n in source_names if n is not None} - set(names))
    report = [f"from {where}: {loaded} tensors loaded, {len(new)} new "
              f"({', '.join(_prefixes(new)) or 'none'})",
              f"classes: {matched} of {len(names)} matched by name"]
    if dropped:
        report.append(f"detector classes dropped ({len(dropped)}): {', '.join(dropped[:10])}"
                      + (" ..." if len(dropped) > 10 else ""))
    return report


def _class_rows(source_names: list, names: list[str]) -> list[int | None]:
    """For each dataset class, the detector's row of the same name (None: new)."""
    index = {str(n).casefold(): i for i, n in enumerate(source_names) if n is not None}
    return [index.get(n.casefold()) for n in names]


def _copy_rows(value: torch.Tensor, source: torch.Tensor, rows: list[int | None]) -> None:
    """Rows of a class-indexed tensor (classifier weight / bias, label embedding)."""
    for k, row in enumerate(rows):
        if row is not None and k < value.shape[0] and row < source.shape[0] \
                and value.shape[1:] == source.shape[1:]:
            value[k] = source[row]


def _prefixes(keys: list[str], depth: int = 2) -> list[str]:
    return sorted({".".join(k.split(".")[:depth]) for k in keys})


def save_as_detector(model: MaskDINO, out_dir: str | os.PathLike, class_names: list[str], *,
                     source: str = "", overwrite: bool = False) -> Path:
    """The joint model's detector (everything but the mask branch) as a folder
    ``frozenseg.load_detector`` reads: the round trip back to the head pipeline.
    An existing folder is replaced only if frozenseg wrote it and ``overwrite``."""
    from frozenseg.convert import write_detector

    write_detector(out_dir, model.detector.state_dict(), model.config, format="maskdino",
                   source=source, class_names=class_names, overwrite=overwrite)
    return Path(out_dir)


def is_joint_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint frozenseg's joint mode wrote (safe to probe).
    Memory-mapped: only the pickle is read, not the tensors of a large checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a checkpoint, or one the safe loader refuses: not ours
        return False
    return isinstance(state, dict) and {"model", "detector_config", "class_names"} <= set(state)


def load_joint(checkpoint: str | os.PathLike) -> tuple[MaskDINO, dict]:
    """(model in eval mode, {"recipe", "class_names", "isthing"}) of a joint checkpoint,
    rebuilt from what it carries (no init folder needed)."""
    state = load_training_checkpoint(checkpoint)  # one-line CheckpointError (a ValueError)
    if "detector_config" not in state:
        raise ValueError(f"{checkpoint}: not a frozenseg Mask DINO checkpoint")
    from frozenseg.recipe import recipe_from_dict

    recipe = recipe_from_dict(state["recipe"], str(checkpoint))
    detector = build_detector(DetectorConfig.from_dict(state["detector_config"]))
    model = _model(detector, recipe.maskdino)
    model.load_state_dict(state["model"])
    return model.eval(), {"recipe": recipe, "class_names": state["class_names"],
                          "isthing": state.get("isthing")}


class MaskDINOTask:
    """The joint mode for :class:`frozenseg.engine.train.Trainer` (see HeadTask)."""

    weights_key = "model"
    detector = None  # no frozen detector: the whole model trains

    def __init__(self, recipe, accelerator) -> None:
        self.recipe, self.device = recipe, accelerator.device
        data = self.training_data(recipe)
        if len(data) == 0:
            raise ValueError(f"{recipe.data.train.images}: no images to train on")
        self.class_names = list(data.category_names)
        self.isthing = list(getattr(data, "is_thing", [True] * len(self.class_names)))
        torch.manual_seed(recipe.train.seed)  # the new parts' initial weights
        self.model, self.report = build_maskdino(recipe, self.class_names)
        section = recipe.maskdino
        cost = MatchCostWeights(cls=section.cls_weight, l1=section.l1_weight,
                                giou=section.giou_weight, mask_bce=section.mask_bce_weight,
                                mask_dice=section.mask_dice_weight)
        self.criterion = MaskDINOCriterion(
            len(self.class_names), matcher=HybridMatcher(weights=cost,
                                                         num_points=section.num_points),
            weights=LossWeights(**dataclasses.asdict(cost)), num_points=section.num_points)
        transform = train_transform(recipe.data.transform, recipe.data.scale)
        self.dataset = LiveTrainingSet(data, transform, seed=recipe.train.seed)
        self.collate = collate

    @staticmethod
    def training_data(recipe):
        split = recipe.data.train
        if recipe.maskdino.task == "panoptic":
            return CocoPanoptic(split.images, split.panoptic, split.panoptic_png)
        return CocoInstances(split.images, split.annotations)

    def parameter_groups(self) -> list[dict]:
        """The backbone at lr x backbone_lr_factor (Mask DINO's 0.1), the rest at lr."""
        lr, factor = self.recipe.train.lr, self.recipe.maskdino.backbone_lr_factor
        backbone = [p for n, p in self.model.named_parameters() if n.startswith(
            "detector.backbone.") and p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith(
            "detector.backbone.") and p.requires_grad]
        return [{"params": rest, "lr": lr}, {"params": backbone, "lr": lr * factor}]

    def batch(self, items):
        """(images, padding, targets) -> (normalised images, padding, loss targets) on the
        device; None when no image of the batch could be read."""
        images, padding, targets = items
        if not targets:
            return None
        config = self.model.config
        mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(config.image_std).view(1, 3, 1, 1)
        normalised = ((images - mean) / std).masked_fill(padding[:, None], 0.0)
        size = images.shape[-2:]
        return (normalised.to(self.device), padding.to(self.device),
                [self._target(t, size) for t in targets])

    def _target(self, target: dict, padded: torch.Size) -> dict:
        """The loss's target (see frozenseg.maskdino.outputs): crowd regions left out."""
        keep = ~target["iscrowd"]
        masks = target["masks"][keep]
        grid = torch.zeros(len(masks), *padded, dtype=torch.bool)
        grid[:, : masks.shape[1], : masks.shape[2]] = masks
        isthing = target.get("isthing", torch.ones_like(target["iscrowd"]))[keep]
        return {"labels": target["labels"][keep].to(self.device),
                "boxes": boxes_to_cxcywh_normalized(target["boxes"][keep],
                                                    target["size"].tolist()).to(self.device),
                "masks": grid, "isthing": isthing.to(self.device)}

    def losses(self, model, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images, padding, targets = batch
        output = model(images, padding, targets, generator=generator)
        return self.criterion(output, targets, generator=generator)

    def evaluate(self, model, out_dir: Path) -> tuple[dict, float, str]:
        return evaluate_joint(model, self.recipe, out_dir)

    def extra_state(self) -> dict:
        # Enough to rebuild the model without the recipe's init folder (load_joint).
        return {"class_names": self.class_names, "isthing": self.isthing,
                "detector_config": self.model.config.to_dict()}

    def load_extra_state(self, state: dict) -> None:
        pass


def evaluate_joint(model: MaskDINO, recipe, out_dir: str | os.PathLike
                   ) -> tuple[dict, float, str]:
    """AP, PQ and mIoU on the recipe's val split (whatever files it names) -> (metrics,
    the score that picks best.pt: PQ when panoptic, else mask AP, a summary line)."""
    split = recipe.data.val
    metrics = evaluate_maskdino(
        model, EvalSplit(split.images, split.annotations, split.panoptic, split.panoptic_png),
        out_dir, transform=eval_transform(recipe.data.scale),
        settings=InferenceSettings(object_mask_threshold=recipe.maskdino.object_threshold,
                                   overlap_threshold=recipe.maskdino.overlap_threshold),
        batch_size=recipe.train.batch_size)
    line = ", ".join(f"{name} {value:.2f}" for name, value in _headline(metrics))
    score = (metrics["panoptic"]["all"]["PQ"] if "panoptic" in metrics
             else metrics["segm"]["AP"])
    return metrics, score, line


def _headline(metrics: dict) -> list[tuple[str, float]]:
    found = []
    if "bbox" in metrics:
        found += [("box AP", metrics["bbox"]["AP"]), ("mask AP", metrics["segm"]["AP"])]
    if "panoptic" in metrics:
        found.append(("PQ", metrics["panoptic"]["all"]["PQ"]))
    if "semantic" in metrics:
        found.append(("mIoU", metrics["semantic"]["mIoU"]))
    return found
