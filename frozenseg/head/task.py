"""Mode head: the mask head trained on a frozen detector's outputs (the paper's method),
as a task of the one training loop (:mod:`frozenseg.engine.task`).

Batches come from the feature cache, or from the detector run live on each image
(:func:`live_batch`); both give the same :class:`frozenseg.cache.training.TrainingBatch`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from frozenseg.cache.training import (
    CachedTrainingSet,
    TrainingBatch,
    check_made_by,
    collate_cached,
)
from frozenseg.data.coco import CocoInstances
from frozenseg.data.collate import collate
from frozenseg.data.transforms import Transform
from frozenseg.detector.classes import ClassMapping, match_classes
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.folder import read_config
from frozenseg.detector.frozen import FrozenDetector, load_detector
from frozenseg.detector.output import batch_outputs
from frozenseg.engine.data import LiveTrainingSet, eval_transform, train_transform
from frozenseg.engine.task import TrainingError
from frozenseg.head.loss import MaskCriterion, MaskLossWeights
from frozenseg.head.network import build_mask_head, count_parameters, estimate_flops
from frozenseg.head.step import head_losses
from frozenseg.recipe import Recipe, RecipeError


def recipe_detector(recipe: Recipe, path: str | Path | None = None) -> FrozenDetector:
    """The FrozenDetector at ``path`` (default ``detector.path``), with the recipe's top-K,
    memory layer and prompt. RecipeError (one line) for a prompt that does not fit it."""
    section = recipe.detector
    path = path or section.path
    detector = load_detector(path, top_k=section.top_k, memory_layer=section.memory_layer)
    check_prompt(recipe, detector.config, path)
    if section.prompt is not None:
        try:
            detector.set_prompt(section.prompt)
        except ValueError as err:
            raise RecipeError(f"detector.prompt: {err}") from None
    return detector


def check_prompt(recipe: Recipe, config: DetectorConfig | None = None,
                 path: str | Path | None = None) -> None:
    """RecipeError (one line) unless ``detector.prompt`` is given exactly when the detector
    (``config``, default read from ``path`` or ``detector.path``) is open-vocabulary."""
    path = path or recipe.detector.path
    config = config or read_config(path)
    prompt = recipe.detector.prompt
    if prompt is None and config.open_vocabulary:
        raise RecipeError(f"detector.prompt is missing: {path} is Grounding DINO, which finds "
                          "what a prompt names (detector.prompt: 'cat . dog .'; export and "
                          "predict: --prompt)")
    if prompt is not None and not config.open_vocabulary:
        raise RecipeError(f"detector.prompt is for an open-vocabulary detector (Grounding "
                          f"DINO); {path} is a {config.variant} detector with a fixed set of "
                          "classes: leave the prompt out")


def build_criterion(recipe: Recipe) -> MaskCriterion:
    loss = recipe.loss
    weights = MaskLossWeights(bce=loss.bce_weight, dice=loss.dice_weight, iou=loss.iou_weight)
    return MaskCriterion(weights=weights, point_fraction=loss.points_fraction,
                         oversample=loss.oversample, importance=loss.importance)


class HeadTask:
    """Training the mask head (recipe mode "head") on the frozen detector's outputs
    (a :class:`frozenseg.engine.task.Task`)."""

    weights_key = "head"

    def __init__(self, recipe: Recipe, accelerator) -> None:
        self.recipe, self.accelerator = recipe, accelerator
        if recipe.detector.finetune != "frozen" and recipe.data.cache:
            raise TrainingError(f"detector.finetune: {recipe.detector.finetune} runs the "
                                "detector live; remove data.cache")
        self.detector = recipe_detector(recipe)
        self.detector.to(accelerator.device)
        torch.manual_seed(recipe.train.seed)  # the head's initial weights
        self.model = build_mask_head(recipe.head, **self.detector.head_dims)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise TrainingError("this head has no trainable parameters (head.trainable: false "
                                "is the training-free baseline: evaluate it, don't train it)")
        self.criterion = build_criterion(recipe)
        self.data = data = CocoInstances(recipe.data.train.images, recipe.data.train.annotations)
        if len(data) == 0:
            raise TrainingError(f"{data.annotations_json}: no images to train on")
        self.classes = match_classes(self.detector.classes, data.category_ids,
                                     data.category_names)
        self.dataset, self.collate = training_set(
            data, cache=recipe.data.cache, transform=train_transform(
                recipe.data.transform, recipe.data.scale), seed=recipe.train.seed)
        if recipe.data.cache:
            check_made_by(self.dataset.cache, recipe.detector.path, self.detector)

    def parameter_groups(self) -> list[dict]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.recipe.train.lr}] + self._finetuned()

    def _finetuned(self) -> list[dict]:
        """The detector's optimizer group when the recipe fine-tunes it (Table 16)."""
        recipe, mode = self.recipe, self.recipe.detector.finetune
        if mode == "frozen":
            return []
        if self.accelerator.num_processes > 1:
            raise TrainingError("detector.finetune runs on one process only")
        params = self.detector.finetune(mode)
        return [{"params": params, "lr": recipe.train.lr * recipe.detector.finetune_lr_factor}]

    def batch(self, items):
        if self.recipe.data.cache:
            return items
        return live_batch(self.detector, self.classes, self.data, items)

    def losses(self, model, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        loss = self.recipe.loss
        return head_losses(batch, self.detector, model, self.criterion, mode=loss.proposals,
                           assign_iou=loss.assign_iou, jitter=loss.gt_jitter,
                           generator=generator)

    def describe(self, measure: bool = False) -> list[str]:
        """Trainable parameters, and FLOPs of one forward on the first validation image."""
        recipe = self.recipe
        val = CocoInstances(recipe.data.val.images, recipe.data.val.annotations,
                            transform=eval_transform(recipe.data.scale))
        image, _ = next(item for item in (val[i] for i in range(len(val))) if item is not None)
        output = self.detector([image.to(self.detector.device)])
        flops = estimate_flops(self.model, output)
        return [f"head: {count_parameters(self.model) / 1e6:.2f} M trainable parameters, "
                f"{flops / 2e9:.2f} GMACs for one {image.shape[1]}x{image.shape[2]} image "
                f"with {output.queries.shape[1]} boxes"]

    def evaluate(self, model, out_dir: Path) -> tuple[dict, float, str]:
        from frozenseg.head.inference import evaluate
        from frozenseg.head.segmenter import MaskFrozenDETR

        metrics = evaluate(MaskFrozenDETR(self.detector, model, self.recipe), out_dir)
        return (metrics, metrics["segm"]["AP"],
                f"mask AP {metrics['segm']['AP']:.2f}, box AP {metrics['bbox']['AP']:.2f}")

    def extra_state(self) -> dict:
        # Fine-tuning: the detector's weights are trained too.
        return {} if self.detector.frozen else {"detector": self.detector.model.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "detector" in state:
            self.detector.model.load_state_dict(state["detector"])


def live_batch(detector, classes: ClassMapping, dataset: CocoInstances,
               items: tuple) -> TrainingBatch | None:
    """A collated live batch ((images, padding, targets) from ``collate``) -> TrainingBatch.

    classes: the detector's classes on ``dataset``'s categories, for the targets' labels.
    The detector runs on each image alone, as the cache does (no padding from a batch-mate
    enters the features), for its detections and the targets' boxes at once; the outputs
    are then padded into one batch: training live and from the cache see the same inputs.
    """
    images, padding_mask, targets = items
    if not targets:
        return None
    device = detector.device
    found, truth = [], []
    for image, t in zip(images, targets, strict=True):
        labels = classes.detector_labels(t["labels"], dataset.category_ids)
        out, gt = detector.detect_and_embed(
            [image[:, : int(t["size"][0]), : int(t["size"][1])].to(device)], [t["boxes"]],
            None if labels is None else [labels])
        found.append(out)
        truth.append(gt)
    return TrainingBatch(images, padding_mask, targets, batch_outputs(found),
                         batch_outputs(truth))


def training_set(dataset: CocoInstances, *, cache: str | None, transform: Transform, seed: int):
    """(dataset, collate_fn): over the cache when one is given, else live."""
    if cache:
        return CachedTrainingSet(cache, dataset, seed=seed), collate_cached
    return LiveTrainingSet(dataset, transform, seed=seed), collate
