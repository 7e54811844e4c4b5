"""The training and evaluation transforms of Deformable DETR, and large-scale jitter.

Every transform is split in two, because the feature cache stores the parameters of
each augmented view and must be able to rebuild exactly the same view later:

* SAMPLE: ``transform.sample_view((H, W), rng)`` draws the random parameters from the
  image size alone (no pixels) and returns a *view*, a JSON-serialisable dict of
  integer steps;
* APPLY: :func:`apply_view` applies a view's steps, deterministically.

``transform(image, target, rng)`` does both and records the view in
``target["view"]``. A view is::

    {"input_size": [H, W],                       # the size the steps start from
     "steps": [{"op": "hflip"},                   # mirror left-right
               {"op": "resize", "size": [h, w]},  # image bilinear + antialias
               {"op": "crop", "top": t, "left": l, "height": h, "width": w},
               {"op": "pad", "size": [h, w]}]}    # zeros at the bottom and right

All parameters are integers, so a view reproduces its image bit for bit (with the
same torch build: the resampling kernels are deterministic on the CPU).

Images are float tensors (3, H, W). Targets are dicts as
:class:`frozenseg.data.coco.CocoInstances` returns them: ``boxes`` (N, 4) xyxy in
absolute pixels of the current image, ``masks`` (N, H, W) bool, ``labels``,
``iscrowd``, ``area`` (N,). Boxes follow every step (a crop clips them); masks are
resampled once, nearest-neighbour, through the whole view; instances left with an
empty box or no mask pixels are removed (with every field of INSTANCE_FIELDS);
``size`` becomes the output (H, W). A semantic label map ``sem_seg`` (H, W) int64 is
resampled the same way, and the pixels a view pads get ``target["ignore_value"]``
(default 255). Boxes stay xyxy absolute pixels here; DETR's normalised cxcywh form is
:func:`frozenseg.boxes.to_normalized`, for losses.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from frozenseg.detector.frozen import detector_input_size

# The per-instance fields of a target: a crop that removes an instance removes it from all.
INSTANCE_FIELDS = ("boxes", "labels", "masks", "iscrowd", "area", "isthing")

# Deformable DETR's training scales (datasets/coco.py, make_coco_transforms).
TRAIN_SCALES = tuple(range(480, 801, 32))
MAX_SIZE = 1333

Size = tuple[int, int]
Step = dict[str, Any]


# ----------------------------------------------------------------------------- APPLY


def apply_view(image: torch.Tensor, target: dict | None, view: dict) -> tuple[torch.Tensor, dict]:
    """Apply a view's steps to ``image`` (3, H, W) and ``target`` (or None): deterministic.

    The image must have the view's ``input_size``. The image and the boxes go through
    the steps one by one (as in DETR); the masks are resampled once at the end from the
    input masks, so nearest-neighbour errors do not pile up over chained resizes.
    ``sem_seg`` likewise, padding set to ``target.get("ignore_value", 255)``.
    Instances left with an empty box or no mask pixels are removed. Returns the new
    image and a new target dict (the input one is not modified), ``size`` and ``view`` set.
    """
    size = [int(s) for s in image.shape[-2:]]
    if list(view.get("input_size", ())) != size:
        raise ValueError(f"view starts from input_size {view.get('input_size')}, image is {size}")
    target = dict(target) if target is not None else {}
    geometry = Geometry.identity()
    for step in view["steps"]:
        op = step.get("op")
        if op not in _APPLY:
            raise ValueError(f"view step {step}: unknown op {op!r} (known: {sorted(_APPLY)})")
        geometry = geometry.then(step, image.shape[-2:])
        image, target = _APPLY[op](image, target, step)
    if "masks" in target:
        target["masks"] = geometry.resample(target["masks"], image.shape[-2:])
        if any(step["op"] == "crop" for step in view["steps"]) and "area" in target:
            # COCO's area is the segment's: after a crop, what is left of it.
            target["area"] = target["masks"].flatten(1).sum(1).to(target["area"].dtype)
    if "sem_seg" in target:
        target["sem_seg"] = geometry.resample(target["sem_seg"], image.shape[-2:],
                                              fill=target.get("ignore_value", 255))
    target = _drop_vanished(target)
    target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
    target["view"] = copy.deepcopy(view)
    return image, target


def identity_view(size: Sequence[int]) -> dict:
    """The view of an untransformed image of ``size`` (H, W)."""
    return {"input_size": [int(size[0]), int(size[1])], "steps": []}


def _hflip(image: torch.Tensor, target: dict, step: Step) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    if "boxes" in target:
        # xyxy in pixels: the new left edge is the mirror of the old right edge.
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([width - x1, y0, width - x0, y1], dim=-1)
    return image.flip(-1), target


def _resize(image: torch.Tensor, target: dict, step: Step) -> tuple[torch.Tensor, dict]:
    height, width = image.shape[-2:]
    new_h, new_w = (int(s) for s in step["size"])
    if (new_h, new_w) == (height, width):
        return image, target  # nothing to do, and no antialias blur either
    image = TF.resize(image, [new_h, new_w], interpolation=InterpolationMode.BILINEAR,
                      antialias=True)
    ratio_w, ratio_h = new_w / width, new_h / height
    if "boxes" in target:
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    return image, target


def _crop(image: torch.Tensor, target: dict, step: Step) -> tuple[torch.Tensor, dict]:
    top, left, height, width = (int(step[k]) for k in ("top", "left", "height", "width"))
    if top < 0 or left < 0 or top + height > image.shape[-2] or left + width > image.shape[-1]:
        raise ValueError(f"view step {step}: outside the {list(image.shape[-2:])} image")
    image = image[..., top:top + height, left:left + width]
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        limit = torch.tensor([width, height, width, height], dtype=boxes.dtype)
        target["boxes"] = torch.minimum(boxes, limit).clamp(min=0)
        if "area" in target:
            # DETR's area after a crop: the clipped box's (apply_view uses the mask if any).
            boxes = target["boxes"]
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            target["area"] = area.to(target["area"].dtype)
    return image, target


def _pad(image: torch.Tensor, target: dict, step: Step) -> tuple[torch.Tensor, dict]:
    new_h, new_w = (int(s) for s in step["size"])
    pad_h, pad_w = new_h - image.shape[-2], new_w - image.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"view step {step}: the image is larger, {list(image.shape[-2:])}")
    # Bottom and right only, so boxes (xyxy pixels from the top-left) do not move.
    return torch.nn.functional.pad(image, (0, pad_w, 0, pad_h)), target


_APPLY = {"hflip": _hflip, "resize": _resize, "crop": _crop, "pad": _pad}


def _drop_vanished(target: dict) -> dict:
    """Remove instances left with an empty box (DETR's rule after a crop) or no mask pixels.

    DETR looks at boxes alone; a mask target without pixels teaches a mask head nothing
    (detectron2 drops those too).
    """
    keep = None
    if "boxes" in target:
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if "masks" in target:
        has_pixels = target["masks"].flatten(1).any(1)
        keep = has_pixels if keep is None else keep & has_pixels
    if keep is None or bool(keep.all()):
        return target
    for field in INSTANCE_FIELDS:
        if field in target:
            target[field] = target[field][keep]
    return target


@dataclass(frozen=True)
class Geometry:
    """Where a view sends input pixel coordinates: x' = sx*x + tx, y' = sy*y + ty.

    Every step is axis-aligned (flip, resize, crop, pad), so a view is one such map.
    Exact fractions, so the mask a view produces does not depend on float rounding.
    """

    sx: Fraction = Fraction(1)
    tx: Fraction = Fraction(0)
    sy: Fraction = Fraction(1)
    ty: Fraction = Fraction(0)

    @classmethod
    def identity(cls) -> Geometry:
        return cls()

    def then(self, step: Step, size: Sequence[int]) -> Geometry:
        """This map followed by ``step`` applied to an image of ``size`` (H, W)."""
        height, width = int(size[0]), int(size[1])
        if step["op"] == "hflip":
            return Geometry(-self.sx, width - self.tx, self.sy, self.ty)
        if step["op"] == "resize":
            rx, ry = Fraction(int(step["size"][1]), width), Fraction(int(step["size"][0]), height)
            return Geometry(self.sx * rx, self.tx * rx, self.sy * ry, self.ty * ry)
        if step["op"] == "crop":
            return Geometry(self.sx, self.tx - int(step["left"]), self.sy,
                            self.ty - int(step["top"]))
        return self  # pad: coordinates do not move

    def resample(self, masks: torch.Tensor, size: Sequence[int],
                 fill: bool | int = False) -> torch.Tensor:
        """Nearest-neighbour: each output pixel takes the input pixel under its centre.

        Outside the input (padding) is ``fill``. masks: (..., H, W) -> (..., *size),
        any dtype (bool masks, int64 label maps).
        """
        rows, row_ok = _source_index(int(size[0]), self.sy, self.ty, masks.shape[-2])
        cols, col_ok = _source_index(int(size[1]), self.sx, self.tx, masks.shape[-1])
        out = masks[..., rows[:, None], cols[None, :]]
        inside = row_ok[:, None] & col_ok[None, :]
        return out if bool(inside.all()) else torch.where(inside, out, out.new_tensor(fill))


def _source_index(n_out: int, scale: Fraction, shift: Fraction,
                  n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """floor((j + 1/2 - shift) / scale) for j < n_out, in integers; and whether it is inside."""
    j = torch.arange(n_out, dtype=torch.int64)
    num = ((2 * j + 1) * shift.denominator - 2 * shift.numerator) * scale.denominator
    den = 2 * shift.denominator * scale.numerator
    if den < 0:  # a flip: keep the divisor positive for floor division
        num, den = -num, -den
    index = torch.div(num, den, rounding_mode="floor")
    inside = (index >= 0) & (index < n_in)
    return index.clamp(0, max(n_in - 1, 0)), inside


def output_size(steps: Sequence[Step], size: Sequence[int]) -> Size:
    """The (H, W) that ``steps`` turn an image of ``size`` into, without touching pixels."""
    height, width = int(size[0]), int(size[1])
    for step in steps:
        if step["op"] in ("resize", "pad"):
            height, width = (int(s) for s in step["size"])
        elif step["op"] == "crop":
            height, width = int(step["height"]), int(step["width"])
    return height, width


def content_size(view: dict) -> Size:
    """(H, W) of the image content in a view's output: its size before any final padding.

    Large-scale jitter pads to a fixed size; :func:`frozenseg.data.collate.collate`
    marks that padding in the batch's padding mask, as it does its own.
    """
    steps = list(view["steps"])
    while steps and steps[-1]["op"] == "pad":
        steps.pop()
    return output_size(steps, view["input_size"])


# ---------------------------------------------------------------------------- SAMPLE


def as_rng(rng: Any = None) -> Any:
    """A source of ``random()``, ``randint``, ``choice``, ``uniform``.

    None: the ``random`` module itself (DataLoader seeds it in every worker);
    an int: ``random.Random(seed)``; a ``torch.Generator``: a ``random.Random``
    seeded from one draw of it; a ``random.Random``: as is.
    """
    if rng is None:
        return random
    if isinstance(rng, torch.Generator):
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=rng)))
    if isinstance(rng, int):
        return random.Random(rng)
    return rng


class Transform:
    """SAMPLE a view from an image size, then APPLY it; subclasses define ``sample``."""

    def sample(self, size: Size, rng: Any) -> list[Step]:
        """The steps for an image of ``size`` (H, W), drawn from ``rng``."""
        raise NotImplementedError

    def sample_view(self, size: Sequence[int], rng: Any = None) -> dict:
        """SAMPLE: a view (JSON-serialisable) for an image of ``size`` (H, W)."""
        size = (int(size[0]), int(size[1]))
        return {"input_size": list(size), "steps": self.sample(size, as_rng(rng))}

    def __call__(self, image: torch.Tensor, target: dict | None = None,
                 rng: Any = None) -> tuple[torch.Tensor, dict]:
        """SAMPLE + APPLY; the target comes back with ``view`` and ``size`` set."""
        return apply_view(image, target, self.sample_view(image.shape[-2:], rng))


class Compose(Transform):
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def sample(self, size: Size, rng: Any) -> list[Step]:
        steps: list[Step] = []
        for transform in self.transforms:
            # Each transform draws from the size the previous ones produce.
            steps += transform.sample(output_size(steps, size), rng)
        return steps

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomHorizontalFlip(Transform):
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def sample(self, size: Size, rng: Any) -> list[Step]:
        return [{"op": "hflip"}] if rng.random() < self.p else []

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize(Transform):
    """Shorter side to one of ``sizes``, longer side at most ``max_size`` (DETR's rule)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        self.sizes, self.max_size = list(sizes), max_size

    def sample(self, size: Size, rng: Any) -> list[Step]:
        short = rng.choice(self.sizes) if len(self.sizes) > 1 else self.sizes[0]
        max_size = math.inf if self.max_size is None else self.max_size
        new = detector_input_size(size[0], size[1], short=short, max_size=max_size)
        return [{"op": "resize", "size": [int(new[0]), int(new[1])]}]

    def __repr__(self) -> str:
        return f"RandomResize({self.sizes}, max_size={self.max_size})"


class RandomSizeCrop(Transform):
    """A crop of width in [min_size, min(W, max_size)] and height likewise, anywhere."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def sample(self, size: Size, rng: Any) -> list[Step]:
        height, width = size
        # DETR fails on an image smaller than min_size; take the whole side instead.
        crop_w = rng.randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = rng.randint(min(self.min_size, height), min(height, self.max_size))
        top, left = rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)
        return [{"op": "crop", "top": top, "left": left, "height": crop_h, "width": crop_w}]

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect(Transform):
    """``first`` with probability p, else ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def sample(self, size: Size, rng: Any) -> list[Step]:
        chosen = self.first if rng.random() < self.p else self.second
        return chosen.sample(size, rng)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


class ScaleJitter(Transform):
    """Fit the image into output_size x output_size times a scale drawn from ``scale``.

    Detectron2's ResizeScale, the first half of large-scale jitter: the aspect ratio is
    kept and the longer side fits the scaled square.
    """

    def __init__(self, output_size: int, scale: tuple[float, float]) -> None:
        self.output_size, self.scale = output_size, tuple(scale)

    def sample(self, size: Size, rng: Any) -> list[Step]:
        target = self.output_size * rng.uniform(*self.scale)
        factor = min(target / size[0], target / size[1])
        new_h, new_w = max(1, round(size[0] * factor)), max(1, round(size[1] * factor))
        return [{"op": "resize", "size": [new_h, new_w]}]

    def __repr__(self) -> str:
        return f"ScaleJitter({self.output_size}, scale={self.scale})"


class FixedSizeCrop(Transform):
    """Crop to at most output_size x output_size at a random offset, then pad to exactly it.

    Detectron2's FixedSizeCrop, the second half of large-scale jitter: one uniform draw
    places the crop along both axes; the padding (zeros, bottom and right) is part of
    the image, so every output has the same size.
    """

    def __init__(self, output_size: int) -> None:
        self.output_size = output_size

    def sample(self, size: Size, rng: Any) -> list[Step]:
        out = self.output_size
        where = rng.random()
        top, left = round(max(size[0] - out, 0) * where), round(max(size[1] - out, 0) * where)
        crop = {"op": "crop", "top": top, "left": left,
                "height": min(size[0], out), "width": min(size[1], out)}
        steps = [crop] if (crop["height"], crop["width"]) != tuple(size) else []
        if (crop["height"], crop["width"]) != (out, out):
            steps.append({"op": "pad", "size": [out, out]})
        return steps

    def __repr__(self) -> str:
        return f"FixedSizeCrop({self.output_size})"


# ----------------------------------------------------------------------------- recipes


def deformable_detr_train(scales: Sequence[int] = TRAIN_SCALES, max_size: int = MAX_SIZE,
                          crop_scales: Sequence[int] = (400, 500, 600),
                          crop_size: tuple[int, int] = (384, 600)) -> Transform:
    """Deformable DETR's (and DETR's) training augmentation, make_coco_transforms('train').

    Flip with p=0.5; then with p=0.5 resize the shorter side to one of ``scales``
    (longer side <= max_size), otherwise resize the shorter side to one of
    ``crop_scales`` (no size limit), crop a random region whose sides lie in
    ``crop_size`` (capped by the image), and resize as in the first branch.
    """
    resize = RandomResize(scales, max_size=max_size)
    crop_branch = Compose([RandomResize(crop_scales), RandomSizeCrop(*crop_size), resize])
    return Compose([RandomHorizontalFlip(0.5), RandomSelect(resize, crop_branch, p=0.5)])


def scale_flip(scales: Sequence[int] = TRAIN_SCALES, max_size: int = MAX_SIZE) -> Transform:
    """The feature cache's augmented views: flip with p=0.5, shorter side one of ``scales``
    (longer side <= max_size). No crop: a cached view keeps the whole image."""
    return Compose([RandomHorizontalFlip(0.5), RandomResize(scales, max_size=max_size)])


def evaluation(short: int = 800, max_size: int = MAX_SIZE) -> Transform:
    """Deformable DETR's evaluation resize: shorter side 800, longer side <= 1333."""
    return RandomResize([short], max_size=max_size)


def large_scale_jitter(output_size: int = 1024,
                       scale: tuple[float, float] = (0.1, 2.0)) -> Transform:
    """Large-scale jitter (Mask R-CNN LSJ, Mask DINO's COCO recipe).

    Flip with p=0.5, fit into a square of output_size times a uniform scale, then crop
    or zero-pad (bottom, right) to output_size x output_size.
    """
    return Compose([RandomHorizontalFlip(0.5), ScaleJitter(output_size, scale),
                    FixedSizeCrop(output_size)])
