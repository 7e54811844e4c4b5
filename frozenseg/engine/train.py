"""The one training loop: accelerate (CPU, one or several GPUs, fp16/bf16 autocast,
gradient accumulation), exact resume, checkpoints, progress and metrics.

Checkpoints (``last.pt`` every ``train.checkpoint_every`` steps and at the end, ``best.pt``
by mask AP) are written to a temporary name and renamed, and hold everything a resume
needs: head, optimizer, scheduler, step / epoch / position in the epoch, and the RNG
states. The data side is a function of (seed, epoch, image) (:mod:`frozenseg.engine.data`),
so ``resume=True`` continues exactly where the run stopped: a resumed run ends with the
same weights as an uninterrupted one. They also carry the resolved recipe, so
:func:`load_trained` rebuilds the head (and finds its detector) from the file alone.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from frozenseg.cache.training import check_made_by
from frozenseg.checkpoint import CheckpointError, load_training_checkpoint
from frozenseg.data.coco import CocoInstances
from frozenseg.detector.classes import match_classes
from frozenseg.engine.data import EpochBatches, live_batch, train_transform, training_set
from frozenseg.engine.step import head_losses
from frozenseg.files import atomic_path, atomic_write_text, folder_lock
from frozenseg.head.loss import MaskCriterion, MaskLossWeights
from frozenseg.recipe import (
    Recipe,
    build_mask_head,
    load_recipe,
    load_recipe_detector,
    recipe_differences,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)

LAST, BEST = "last.pt", "best.pt"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says at which step and why."""


@dataclass
class Position:
    step: int = 0       # optimizer steps done
    epoch: int = 0
    batch: int = 0      # batches of this epoch done
    best_ap: float = -1.0


def build_criterion(recipe: Recipe) -> MaskCriterion:
    loss = recipe.loss
    weights = MaskLossWeights(bce=loss.bce_weight, dice=loss.dice_weight, iou=loss.iou_weight)
    return MaskCriterion(weights=weights, point_fraction=loss.points_fraction,
                         oversample=loss.oversample, importance=loss.importance)


def lr_factor(step: int, iterations: int, drops: tuple[float, ...]) -> float:
    """The paper's schedule: the lr is divided by 10 at each fraction of the iterations."""
    return 0.1 ** sum(step >= round(d * iterations) for d in drops)


class HeadTask:
    """Training the mask head (recipe mode "head") on the frozen detector's outputs.

    What the loop asks of a task: ``model`` (the module trained), ``parameter_groups()``,
    ``dataset`` / ``collate`` (items of one image, ``set_epoch``), ``batch(items)``,
    ``losses(model, batch, generator)``, ``evaluate(model, out_dir)`` -> (metrics, the
    metric that picks best.pt, a log line), ``weights_key`` and ``extra_state()`` /
    ``load_extra_state()`` for what else a checkpoint holds.
    """

    weights_key = "head"

    def __init__(self, recipe: Recipe, accelerator) -> None:
        self.recipe, self.accelerator = recipe, accelerator
        if recipe.detector.finetune != "frozen" and recipe.data.cache:
            raise TrainingError(f"detector.finetune: {recipe.detector.finetune} runs the "
                                "detector live; remove data.cache")
        self.detector = load_recipe_detector(recipe)
        self.detector.to(accelerator.device)
        torch.manual_seed(recipe.train.seed)  # the head's initial weights
        self.model = build_mask_head(recipe)
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
        params = self.detector.unfreeze(mode)
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

    def evaluate(self, model, out_dir: Path) -> tuple[dict, float, str]:
        from frozenseg.engine.inference import evaluate

        metrics = evaluate(self.recipe, self.detector, model, out_dir)
        return (metrics, metrics["segm"]["AP"],
                f"mask AP {metrics['segm']['AP']:.2f}, box AP {metrics['bbox']['AP']:.2f}")

    def extra_state(self) -> dict:
        # Fine-tuning: the detector's weights are trained too.
        return {} if self.detector.frozen else {"detector": self.detector.model.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "detector" in state:
            self.detector.model.load_state_dict(state["detector"])


def build_task(recipe: Recipe, accelerator):
    """The task a recipe's mode names."""
    if recipe.mode == "maskdino":
        from frozenseg.maskdino.task import MaskDINOTask

        return MaskDINOTask(recipe, accelerator)
    return HeadTask(recipe, accelerator)


class Trainer:
    """Wires a recipe's task (the head on a frozen detector, or Mask DINO), optimizer and
    schedule; ``run()`` trains."""

    def __init__(self, recipe: Recipe, *, log: Callable[[str], None] = print,
                 evaluate: bool = True) -> None:
        """evaluate: on the val split every ``train.eval_every`` steps and at the end
        (results in ``output_dir/eval``), keeping ``best.pt``."""
        from accelerate import Accelerator

        self.recipe, self.log, self.evaluate = recipe, log, evaluate
        train = recipe.train
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=train.precision,
            gradient_accumulation_steps=train.grad_accumulation)
        self.out = Path(train.output_dir)
        self.task = build_task(recipe, self.accelerator)
        optimizer = torch.optim.AdamW(self.task.parameter_groups(), lr=train.lr,
                                      betas=train.betas, weight_decay=train.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(self.task.model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, train.iterations, train.lr_drops))
        self.dataset, self.collate = self.task.dataset, self.task.collate
        self.position = Position()
        self.good_checkpoint: tuple[Path, int] | None = None  # newest with finite weights
        self._tensorboard = None  # opened on first use; False when not installed
        self.generator = torch.Generator().manual_seed(train.seed)

    @property
    def head(self):
        """The trained module as prepared by accelerate (the head, or Mask DINO)."""
        return self.model

    @property
    def detector(self):
        return self.task.detector

    # ------------------------------------------------------------------ checkpoints

    def save(self, name: str) -> Path:
        """Atomically write a checkpoint (process 0 only). Weights that are no longer finite
        are never written over a good checkpoint: training stops, naming the newest good one."""
        path = self.out / name
        model = self.accelerator.unwrap_model(self.model)
        if not all(bool(p.isfinite().all()) for p in model.parameters()):
            raise TrainingError(f"non-finite weights after step {self.position.step}; "
                                f"{self._newest_good()}")
        if self.accelerator.is_main_process:
            state = {
                self.task.weights_key: self.accelerator.unwrap_model(self.model).state_dict(),
                "recipe": recipe_to_dict(self.recipe),  # so the model can be rebuilt from it
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "position": asdict(self.position),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
            }
            state.update(self.task.extra_state())
            try:
                with atomic_path(path) as tmp:
                    torch.save(state, tmp)
            except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError
                detail = err.strerror if isinstance(err, OSError) and err.strerror else (
                    "the write failed")
                raise TrainingError(f"{path}: cannot write the checkpoint ({detail}; is the "
                                    "disk full?); the previous one, if any, is kept") from None
        self.good_checkpoint = (path, self.position.step)
        return path

    def _newest_good(self) -> str:
        """Where to go back to after a non-finite loss or weights."""
        if self.good_checkpoint is None:
            return "no checkpoint with finite weights was written before it"
        path, step = self.good_checkpoint
        return f"the newest checkpoint with finite weights is {path} (step {step})"

    def load(self, path: Path) -> None:
        """Resume from ``path``: one-line TrainingErrors for a damaged file, or one whose
        weights do not fit this recipe (naming the recipe keys that changed)."""
        try:
            state = load_training_checkpoint(path)
        except CheckpointError as err:
            raise TrainingError(f"{err}; --resume cannot continue from it (move it away to "
                                "start again)") from None
        try:
            self.accelerator.unwrap_model(self.model).load_state_dict(
                state[self.task.weights_key])
            self.task.load_extra_state(state)
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise TrainingError(f"{path}: does not fit this recipe's model ("
                                f"{_what_changed(state, self.recipe, err)})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.position = Position(**state["position"])
        self.good_checkpoint = (path, self.position.step)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    # ------------------------------------------------------------------ the loop

    def batches(self):
        """(batch or None) forever, epoch after epoch, from the saved position."""
        state, train = self.accelerator.state, self.recipe.train
        while True:
            self.dataset.set_epoch(self.position.epoch)
            sampler = EpochBatches(len(self.dataset), train.batch_size, seed=train.seed,
                                   epoch=self.position.epoch, start=self.position.batch,
                                   rank=state.process_index, processes=state.num_processes)
            loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate,
                                num_workers=self.recipe.data.num_workers)
            for items in loader:
                self.position.batch += 1
                yield self.task.batch(items)
            self.position.epoch, self.position.batch = self.position.epoch + 1, 0

    def step(self, batch) -> dict[str, float]:
        """Forward, backward and (every grad_accumulation batches) an optimizer step."""
        train = self.recipe.train
        with self.accelerator.accumulate(self.model), self.accelerator.autocast():
            losses = self.task.losses(self.model, batch, self.generator)
            values = {name: float(value.detach()) for name, value in losses.items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise TrainingError(
                    f"non-finite loss at step {self.position.step + 1}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                    + f"; {self._newest_good()}")
            self.accelerator.backward(losses["loss"])
            if self.accelerator.sync_gradients and train.grad_clip > 0:
                self.accelerator.clip_grad_norm_(self.model.parameters(), train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad()
        return values

    def run(self, *, resume: bool = False, progress: Callable | None = None) -> Position:
        """Train until ``train.iterations`` steps (or ``train.max_minutes``). Process 0
        holds the output folder meanwhile: a second run (or --resume) on it refuses
        (:class:`frozenseg.files.FolderInUse`) instead of racing on last.pt and the log."""
        if not self.accelerator.is_main_process:
            return self._run(resume, progress)
        with folder_lock(self.out):
            return self._run(resume, progress)

    def _run(self, resume: bool, progress: Callable | None) -> Position:
        train = self.recipe.train
        self.out.mkdir(parents=True, exist_ok=True)
        started, metrics = time.monotonic(), self.out / "metrics.jsonl"
        if resume and (self.out / LAST).is_file():
            self.load(self.out / LAST)
            self.log(f"resumed from {self.out / LAST} at step {self.position.step}")
            if self.accelerator.is_main_process:
                truncate_metrics(metrics, self.position.step)
        elif (self.out / LAST).is_file():
            raise TrainingError(f"{self.out} already holds a run ({LAST}); pass --resume "
                                "to continue it, or choose another train.output_dir")
        if self.accelerator.is_main_process:
            save_recipe(self.recipe, self.out / "recipe.yaml")
        batches = self.batches()
        while self.position.step < train.iterations:
            batch = next(batches)
            if batch is None:  # every image of the batch was unreadable (warned)
                continue
            values = self.step(batch)
            if not self.accelerator.sync_gradients:
                continue
            self.scheduler.step()
            self.position.step += 1
            record = {"step": self.position.step, "lr": self.scheduler.get_last_lr()[0], **values}
            if progress:
                progress(record)
            if self.position.step % train.log_every == 0 and self.accelerator.is_main_process:
                self._log_record(metrics, record)
            if train.checkpoint_every and self.position.step % train.checkpoint_every == 0:
                self.save(LAST)
            if train.eval_every and self.position.step % train.eval_every == 0:
                self.evaluate_and_keep_best()
            if train.max_minutes and time.monotonic() - started > 60 * train.max_minutes:
                self.log(f"stopped after {train.max_minutes:g} minutes, at step "
                         f"{self.position.step}")
                break
        self.save(LAST)
        if self.evaluate and not (train.eval_every and self.position.step % train.eval_every == 0):
            self.evaluate_and_keep_best()
        return self.position

    def _log_record(self, metrics: Path, record: dict) -> None:
        """metrics.jsonl always; TensorBoard too when the tensorboard package is installed."""
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: pip install tensorboard
                self._tensorboard = False
            else:
                self._tensorboard = SummaryWriter(self.out / "tensorboard")
        if self._tensorboard:
            for name, value in record.items():
                if name != "step":
                    self._tensorboard.add_scalar(name, value, record["step"])

    def evaluate_and_keep_best(self) -> dict | None:
        """Evaluate on the val split (process 0) and keep best.pt by the task's metric."""
        if not self.evaluate or not self.accelerator.is_main_process:
            return None
        # The task's evaluation puts the model back in training mode itself.
        metrics, score, line = self.task.evaluate(self.accelerator.unwrap_model(self.model),
                                                  self.out / "eval")
        self.log(f"step {self.position.step}: {line}")
        if score > self.position.best_ap:
            self.position.best_ap = score
            self.save(BEST)
        return metrics


def _what_changed(state: dict, recipe: Recipe, err: BaseException) -> str:
    """Why a checkpoint's weights do not load: the model keys of the recipe that differ
    from the checkpoint's own recipe, else the loader's first line."""
    changed = recipe_differences(state.get("recipe", {}), recipe_to_dict(recipe),
                                 sections=("mode", "head", "detector", "maskdino"))
    if not changed:
        return " ".join(str(err).split())[:300]
    keys = "; ".join(f"{key} is {now!r} here, {then!r} in the checkpoint's recipe"
                     for key, then, now in changed[:3])
    return f"{keys}; resume with the recipe it was trained with"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after ``step`` from metrics.jsonl: a resumed run repeats the steps
    between its checkpoint and the stop, and would log them twice. A line torn by the stop
    goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


# ---------------------------------------------------------------------- trained heads


def load_trained(checkpoint: str | os.PathLike | None = None, *, recipe: Recipe | None = None,
                 overrides: Sequence[str] = ()) -> tuple[Any, nn.Module, Recipe]:
    """(detector, head, recipe) of a trained head, ready for inference (eval mode).

    checkpoint: a ``last.pt`` / ``best.pt`` the trainer wrote; it carries its recipe (an
      older one without it: the ``recipe.yaml`` beside it). None with a ``recipe`` whose
      head has no parameters: the training-free baseline.
    recipe: use this recipe instead of the checkpoint's. overrides: ``key=value`` applied
      to the recipe, e.g. ``detector.path=DIR`` for the detector folder on this machine.
    A detector the run fine-tuned gets its trained weights from the checkpoint.
    Raises ValueError (one line, naming the file) for anything that does not fit.
    """
    state = _read_checkpoint(Path(checkpoint)) if checkpoint is not None else {}
    if recipe is None:
        if checkpoint is None:
            raise ValueError("a head checkpoint or a recipe is needed")
        recipe = _checkpoint_recipe(Path(checkpoint), state, overrides)
    elif overrides:
        recipe = recipe_from_dict(recipe_to_dict(recipe), "recipe", overrides)
    head = build_mask_head(recipe)
    if checkpoint is None and any(p.requires_grad for p in head.parameters()):
        raise ValueError("this recipe's head has trainable parameters: a checkpoint is needed")
    detector = load_recipe_detector(recipe)
    where = str(checkpoint)
    if "head" in state:
        _load_weights(head, state["head"], where, "head")
    if "detector" in state:
        _load_weights(detector.model, state["detector"], where, "fine-tuned detector")
    return detector, head.eval(), recipe


def _read_checkpoint(path: Path) -> dict:
    state = load_training_checkpoint(path)  # one-line CheckpointError (a ValueError)
    if "head" not in state:
        raise ValueError(f"{path}: not a frozenseg head checkpoint (no 'head' weights)")
    return state


def _checkpoint_recipe(path: Path, state: dict, overrides: Sequence[str]) -> Recipe:
    if "recipe" in state:
        return recipe_from_dict(state["recipe"], str(path), overrides)
    beside = path.parent / "recipe.yaml"
    if not beside.is_file():
        raise ValueError(f"{path}: carries no recipe and there is no recipe.yaml beside it; "
                         "pass the recipe it was trained with")
    return load_recipe(beside, overrides)


def _load_weights(module: nn.Module, weights: dict, where: str, what: str) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"{where}: the {what} weights do not fit the recipe's model "
                         f"({detail})") from None
