"""The one training loop: accelerate (CPU, one or several GPUs, fp16/bf16 autocast,
gradient accumulation), exact resume, checkpoints, progress and metrics.

Checkpoints (``last.pt`` every ``train.checkpoint_every`` steps and at the end, ``best.pt``
by the task's score) are written to a temporary name and renamed, and hold everything a
resume needs: the model, optimizer, scheduler, step / epoch / position in the epoch, and the RNG
states. The data side is a function of (seed, epoch, image) (:mod:`frozenseg.engine.data`),
so ``resume=True`` continues exactly where the run stopped: a resumed run ends with the
same weights as an uninterrupted one. They also carry the resolved recipe, so the model
can be rebuilt from the file alone (:func:`frozenseg.head.trained.load_trained`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from frozenseg.checkpoint import CheckpointError, load_training_checkpoint
from frozenseg.engine.data import EpochBatches
from frozenseg.engine.task import TrainingError, build_task
from frozenseg.files import atomic_path, atomic_write_text, folder_lock
from frozenseg.recipe import Recipe, recipe_differences, recipe_to_dict, save_recipe

LAST, BEST = "last.pt", "best.pt"


@dataclass
class Position:
    step: int = 0       # optimizer steps done
    epoch: int = 0
    batch: int = 0      # batches of this epoch done
    best_score: float = -1.0  # the task's evaluation score (mask AP, or PQ) of best.pt


def lr_factor(step: int, iterations: int, drops: tuple[float, ...]) -> float:
    """The paper's schedule: the lr is divided by 10 at each fraction of the iterations."""
    return 0.1 ** sum(step >= round(d * iterations) for d in drops)


class Trainer:
    """Wires a recipe's task (:mod:`frozenseg.engine.task`: the head on a frozen detector,
    Mask DINO, ...), optimizer and schedule; ``run()`` trains."""

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
        if score > self.position.best_score:
            self.position.best_score = score
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
