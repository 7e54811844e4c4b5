"""What the training loop asks of a mode, and where it finds the modes.

A recipe's ``mode`` names a task: ``head`` (the mask head on a frozen detector,
:class:`frozenseg.head.task.HeadTask`) or ``maskdino`` (the joint mode,
:class:`frozenseg.maskdino.task.MaskDINOTask`). The engine knows them only through this
protocol and the ``frozenseg.modes`` entry points in pyproject.toml: a package can add a
mode the same way, and the engine never imports a mode's code.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

ENTRY_POINTS = "frozenseg.modes"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says at which step and why."""


@runtime_checkable
class Task(Protocol):
    """One mode of training, for :class:`frozenseg.engine.train.Trainer`.

    Built as ``Task(recipe, accelerator)``. The loop trains ``model`` on batches of
    ``dataset`` (items of one image, with ``set_epoch(epoch)``) joined by ``collate`` and
    turned into the model's input by ``batch``; checkpoints hold ``model``'s weights under
    ``weights_key`` plus ``extra_state()``.
    """

    model: nn.Module
    dataset: Dataset
    weights_key: str

    def collate(self, items: list) -> Any: ...

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups (each with its ``lr``)."""

    def batch(self, items: Any) -> Any:
        """A collated batch -> the input of ``losses`` on the device; None to skip it."""

    def losses(self, model: nn.Module, batch: Any,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Named losses, with their weighted sum under ``"loss"``."""

    def evaluate(self, model: nn.Module, out_dir: Path) -> tuple[dict, float, str]:
        """(metrics, the score that picks best.pt, a one-line summary) on the val split;
        leaves the model in training mode."""

    def describe(self, measure: bool = False) -> list[str]:
        """Lines saying what is trained: parameters, cost; ``measure``: also what needs
        a forward pass (FLOPs, memory). Printed by ``frozenseg train``."""

    def extra_state(self) -> dict:
        """What else a checkpoint holds (merged into it)."""

    def load_extra_state(self, state: dict) -> None:
        """Restore ``extra_state`` from a checkpoint being resumed."""


def modes() -> dict[str, Any]:
    """Mode name -> its entry point (not yet loaded)."""
    return {point.name: point for point in entry_points(group=ENTRY_POINTS)}


def build_task(recipe, accelerator) -> Task:
    """The task of ``recipe.mode``, built for ``accelerator``."""
    found = modes()
    if recipe.mode not in found:
        known = ", ".join(sorted(found)) or "none (is frozenseg installed? pip install -e .)"
        raise TrainingError(f"mode {recipe.mode!r} has no task; installed modes: {known}")
    return found[recipe.mode].load()(recipe, accelerator)
