"""Mask DINO checkpoints: a joint checkpoint back into a model, and the trained model's
detector as a converted-detector folder (the round trip back to the head pipeline)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from frozenseg.checkpoint import load_training_checkpoint
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.model import build_detector
from frozenseg.maskdino.build import assemble
from frozenseg.maskdino.model import MaskDINO


def save_as_detector(model: MaskDINO, out_dir: str | os.PathLike, class_names: list[str], *,
                     source: str = "", overwrite: bool = False) -> Path:
    """The joint model's detector (everything but the mask branch) as a folder
    ``frozenseg.load_detector`` reads: the round trip back to the head pipeline.
    An existing folder is replaced only if frozenseg wrote it and ``overwrite``."""
    from frozenseg.detector.folder import write_detector

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
    model = assemble(detector, recipe.maskdino)
    model.load_state_dict(state["model"])
    return model.eval(), {"recipe": recipe, "class_names": state["class_names"],
                          "isthing": state.get("isthing")}
