"""Mode maskdino: Mask DINO trained whole by the one training loop, as a task
(:mod:`frozenseg.engine.task`): data (panoptic or instance, LSJ or the recipe's transform,
images without annotations included), losses, optimizer groups (backbone at
``backbone_lr_factor``), evaluation (AP, PQ, mIoU).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from frozenseg.boxes import to_normalized
from frozenseg.data import CocoInstances, CocoPanoptic, collate
from frozenseg.engine.data import LiveTrainingSet, eval_transform, train_transform
from frozenseg.maskdino.build import build_maskdino
from frozenseg.maskdino.criterion import LossWeights, MaskDINOCriterion
from frozenseg.maskdino.gpu_memory import training_memory
from frozenseg.maskdino.inference import EvalSplit, evaluate_maskdino
from frozenseg.maskdino.matcher import HybridMatcher, MatchCostWeights
from frozenseg.maskdino.model import MaskDINO
from frozenseg.maskdino.postprocess import InferenceSettings


class MaskDINOTask:
    """The joint mode (a :class:`frozenseg.engine.task.Task`)."""

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
                "boxes": to_normalized(target["boxes"][keep].float(),
                                                    target["size"].tolist()).to(self.device),
                "masks": grid, "isthing": isthing.to(self.device)}

    def losses(self, model, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images, padding, targets = batch
        output = model(images, padding, targets, generator=generator)
        return self.criterion(output, targets, generator=generator)

    def describe(self, measure: bool = False) -> list[str]:
        """Where the weights came from, parameters, and (measure) the memory of one
        training step at the recipe's batch size."""
        params = sum(p.numel() for p in self.model.parameters())
        lines = [*self.report, f"Mask DINO: {params / 1e6:.2f} M parameters"]
        return lines + [training_memory(self)] if measure else lines

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
