"""``MaskFrozenDETR``: the frozen detector and its trained mask head, one model.

It owns what both halves need at inference: the detector's normalisation (inside
``FrozenDetector``), the resize to the detector's input (the recipe's evaluation view),
and the device. ``from_pretrained`` reads a head checkpoint the trainer wrote or a folder
``save_pretrained`` wrote; such a folder holds::

    head.safetensors    the head's weights
    config.json         {"recipe": the resolved recipe, "detector": "detector"}
    detector/           the detector folder (detector.safetensors + config.json)
    README.md           a model card: detector, data, recipe, figures where known
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from frozenseg.data.transforms import Transform
from frozenseg.detector.folder import write_detector
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.grounding import TOKENIZER_FOLDER
from frozenseg.files import atomic_folder
from frozenseg.head.network import HeadOutput, build_mask_head
from frozenseg.recipe import Recipe, recipe_from_dict, recipe_to_dict

HEAD_FILE, CONFIG_FILE, DETECTOR_DIR, CARD_FILE = (
    "head.safetensors", "config.json", "detector", "README.md")


class MaskFrozenDETR(nn.Module):
    """``head(detector(images))``, with the recipe both were trained under."""

    def __init__(self, detector: FrozenDetector, head: nn.Module, recipe: Recipe) -> None:
        super().__init__()
        self.detector, self.head, self.recipe = detector, head, recipe

    @property
    def device(self) -> torch.device:
        return self.detector.device

    @property
    def view(self) -> Transform:
        """The resize an image gets before the detector: the recipe's evaluation view."""
        from frozenseg.engine.data import eval_transform

        return eval_transform(self.recipe.data.scale)

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor], boxes: list[torch.Tensor] | None = None,
                labels: list[torch.Tensor] | None = None) -> HeadOutput:
        """Masks for the detections in ``images`` (float RGB (3, H, W) in [0, 1], already
        at the detector's input size: :attr:`view`), or for given ``boxes`` (per image
        (N_i, 4) xyxy pixels of that input) with optional detector ``labels``. For given
        boxes the scores are the masks' predicted quality (the detector's score is 1)."""
        if boxes is None:
            return self.head(self.detector(images))
        return self.head(self.detector.embed_boxes(images, boxes, labels).given_boxes())

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *,
                        device: str | torch.device | None = None) -> MaskFrozenDETR:
        """A head checkpoint (``last.pt`` / ``best.pt``: its recipe names the detector
        folder) or a folder :meth:`save_pretrained` wrote. Eval mode, on ``device`` (the
        GPU when there is one)."""
        path = Path(path)
        if path.is_dir():
            model = cls._from_folder(path)
        else:
            from frozenseg.head.trained import load_trained

            detector, head, recipe = load_trained(path)
            model = cls(detector, head, recipe)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device).eval()

    @classmethod
    def _from_folder(cls, folder: Path) -> MaskFrozenDETR:
        from safetensors.torch import load_file

        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
            recipe = recipe_from_dict(meta["recipe"], str(folder / CONFIG_FILE))
        except FileNotFoundError:
            raise ValueError(f"{folder}: no {CONFIG_FILE} (not a folder save_pretrained "
                             "wrote; a head checkpoint is a file)") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{folder / CONFIG_FILE}: not a frozenseg model config "
                             f"({type(err).__name__}: {err})") from None
        from frozenseg.head.task import recipe_detector

        detector = recipe_detector(recipe, folder / meta.get("detector", DETECTOR_DIR))
        head = build_mask_head(recipe.head, **detector.head_dims)
        weights = folder / HEAD_FILE
        if weights.is_file():
            try:
                head.load_state_dict(load_file(weights))
            except RuntimeError as err:
                raise ValueError(f"{weights}: does not fit the recipe's head "
                                 f"({' '.join(str(err).split())[:200]})") from None
        elif any(p.requires_grad for p in head.parameters()):
            raise ValueError(f"{folder}: no {HEAD_FILE} for a head with trainable parameters")
        return cls(detector, head, recipe)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model as a self-contained folder (see the module docstring), staged
        beside ``folder`` and renamed into place; an existing folder is replaced only with
        ``overwrite``, and only if this method wrote it."""
        from safetensors.torch import save_file

        folder = Path(folder).absolute()
        _check_replaceable(folder, overwrite)
        det, recipe = self.detector, recipe_to_dict(self.recipe)
        open_vocabulary = det.config.open_vocabulary  # its classes are the prompt's phrases
        with atomic_folder(folder) as staging:
            write_detector(staging / DETECTOR_DIR, det.model.state_dict(), det.config,
                           format="frozenseg", source=str(self.recipe.detector.path),
                           class_names=None if open_vocabulary else det.classes["names"])
            if open_vocabulary:  # the prompt as set now travels with the model
                det.tokenizer.save_pretrained(staging / DETECTOR_DIR / TOKENIZER_FOLDER)
                recipe["detector"]["prompt"] = det.prompt.text if det.prompt else None
            head = {k: v.contiguous() for k, v in self.head.state_dict().items()}
            if head:
                save_file(head, staging / HEAD_FILE)
            config = {"recipe": recipe, "detector": DETECTOR_DIR}
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            (staging / CARD_FILE).write_text(model_card(self))
        return folder


def _check_replaceable(folder: Path, overwrite: bool) -> None:
    if not folder.exists():
        return
    ours = folder.is_dir() and (folder / CONFIG_FILE).is_file() and (
        folder / DETECTOR_DIR).is_dir()
    if not ours:
        raise ValueError(f"{folder}: exists and is not a folder save_pretrained wrote: "
                         "choose a new folder")
    if not overwrite:
        raise ValueError(f"{folder}: already holds a saved model; pass overwrite=True to "
                         "replace it")


def model_card(model: MaskFrozenDETR) -> str:
    """README.md of a saved model: what it segments, from what, trained how."""
    recipe, config = model.recipe, model.detector.config
    names = [n for n in model.detector.classes["names"] if n]
    params = sum(p.numel() for p in model.head.parameters())
    lines = [
        "# Mask Frozen-DETR model (frozenseg)", "",
        "A frozen detector and a mask head trained on its outputs.", "",
        f"- detector: {config.variant}, backbone {config.backbone['name']}, "
        f"{config.num_classes} classes, top {model.detector.top_k} detections",
        f"- head: {params / 1e6:.2f} M parameters, trained "
        f"{recipe.train.iterations} steps at lr {recipe.train.lr:g}",
        f"- trained on: {recipe.data.train.annotations}",
        f"- classes: {', '.join(names[:20])}" + (" ..." if len(names) > 20 else ""),
        *([f"- prompt: {recipe.detector.prompt}"] if recipe.detector.prompt else []), "",
        "```python", "import frozenseg", "",
        'model = frozenseg.MaskFrozenDETR.from_pretrained("THIS_FOLDER")',
        "predictor = frozenseg.Predictor(model)",
        "predictor.set_image(image)          # numpy HxWx3 uint8, any size",
        "masks = predictor.predict().masks   # bool N x H x W", "```", "",
    ]
    return "\n".join(lines)
