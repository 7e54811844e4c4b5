"""A trained head, with its detector, back from a checkpoint the trainer wrote."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from frozenseg.checkpoint import load_training_checkpoint
from frozenseg.head.network import build_mask_head
from frozenseg.head.task import recipe_detector
from frozenseg.recipe import Recipe, RecipeError, recipe_from_dict, recipe_to_dict


def load_trained(checkpoint: str | os.PathLike | None = None, *, recipe: Recipe | None = None,
                 overrides: Sequence[str] = ()) -> tuple[Any, nn.Module, Recipe]:
    """(detector, head, recipe) of a trained head, ready for inference (eval mode).

    checkpoint: a ``last.pt`` / ``best.pt`` the trainer wrote; it carries its recipe.
      None with a ``recipe`` whose head has no parameters: the training-free baseline.
    recipe: use this recipe instead of the checkpoint's. overrides: ``key=value`` applied
      to the recipe, e.g. ``detector.path=DIR`` for the detector folder on this machine
      (``detector.prompt=...``: another prompt for an open-vocabulary detector).
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
    where = str(checkpoint)
    try:
        detector = recipe_detector(recipe)
    except RecipeError as err:  # detector.prompt: name the checkpoint that carries it
        raise RecipeError(f"{where}: {err}" if checkpoint is not None else str(err)) from None
    head = build_mask_head(recipe.head, **detector.head_dims)
    if checkpoint is None and any(p.requires_grad for p in head.parameters()):
        raise ValueError("this recipe's head has trainable parameters: a checkpoint is needed")
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
    if "recipe" not in state:
        raise ValueError(f"{path}: carries no recipe; pass the recipe it was trained with")
    return recipe_from_dict(state["recipe"], str(path), overrides)


def _load_weights(module: nn.Module, weights: dict, where: str, what: str) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"{where}: the {what} weights do not fit the recipe's model "
                         f"({detail})") from None
