"""Transforms: SAMPLE + APPLY reproduce a recorded view exactly; targets stay consistent."""

from __future__ import annotations

import json
import random

import pytest
import torch

from frozenseg.data.transforms import (
    TRAIN_SCALES,
    apply_view,
    deformable_detr_train,
    evaluation,
    large_scale_jitter,
    output_size,
)
from frozenseg.detector.frozen import detector_input_size

FIELDS = ("boxes", "labels", "masks", "iscrowd", "area", "size")
TRANSFORMS = {
    "train": deformable_detr_train,
    "eval": evaluation,  # deterministic: a few seeds are enough
    "lsj": lambda: large_scale_jitter(output_size=256),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(height: int = 120, width: int = 160, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """A random image with rectangle instances: their masks' boxes are their boxes."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=gen)
    rects = [(5, 10, 60, 50), (70, 20, 150, 110), (0, 0, 160, 8), (100, 90, 104, 94)]
    masks = torch.zeros(len(rects), height, width, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, rects, strict=True):
        mask[y0:y1, x0:x1] = True
    target = {
        "image_id": 3,
        "boxes": torch.tensor(rects, dtype=torch.float32),
        "labels": torch.arange(len(rects)),
        "masks": masks,
        "iscrowd": torch.tensor([False, False, True, False]),
        "area": masks.flatten(1).sum(1).float(),
        "size": torch.tensor([height, width]),
    }
    return image, target


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> None:
    assert torch.equal(a[0], b[0])
    for key in FIELDS:
        assert a[1][key].dtype == b[1][key].dtype and torch.equal(a[1][key], b[1][key]), key
    assert a[1]["view"] == b[1]["view"]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_sample_apply_equals_recorded_view_and_boxes_match_masks(name):
    transform = TRANSFORMS[name]()
    image, target = _sample()
    for seed in range(3 if name == "eval" else 20):
        out = transform(image, target, random.Random(seed))
        view = json.loads(json.dumps(out[1]["view"]))  # the view survives JSON
        assert view == transform.sample_view(image.shape[-2:], random.Random(seed))
        _assert_same(out, apply_view(image, target, view))
        _assert_boxes_match_masks(*out)


def test_torch_generator_and_int_seeds_are_accepted():
    transform, (image, target) = deformable_detr_train(), _sample()
    a = transform(image, target, torch.Generator().manual_seed(4))
    b = transform(image, target, torch.Generator().manual_seed(4))
    _assert_same(a, b)
    _assert_same(transform(image, target, 9), transform(image, target, 9))


def test_flip_twice_is_identity():
    image, target = _sample()
    flip = {"input_size": [120, 160], "steps": [{"op": "hflip"}, {"op": "hflip"}]}
    once = apply_view(image, target, {"input_size": [120, 160], "steps": [{"op": "hflip"}]})
    assert not torch.equal(once[0], image)
    assert once[1]["boxes"][0].tolist() == [100, 10, 155, 50]
    twice = apply_view(image, target, flip)
    assert torch.equal(twice[0], image)
    for key in ("boxes", "masks", "labels", "area"):
        assert torch.equal(twice[1][key], target[key])


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy pixel-edge boxes of non-empty masks: first and one past the last row/column."""
    boxes = []
    for mask in masks:
        cols = torch.nonzero(mask.any(0)).flatten()
        rows = torch.nonzero(mask.any(1)).flatten()
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _assert_boxes_match_masks(image: torch.Tensor, target: dict) -> None:
    """Every field has one entry per instance, boxes lie in the image, each box is its mask's."""
    height, width = image.shape[-2:]
    boxes, masks = target["boxes"], target["masks"]
    assert masks.shape == (len(boxes), height, width)
    assert all(len(target[k]) == len(boxes) for k in ("labels", "iscrowd", "area"))
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
    assert masks.flatten(1).any(1).all()  # instances without pixels are removed
    diff = (_mask_boxes(masks) - boxes).abs()
    assert (diff <= 1).all(), (diff, target["view"])


@pytest.mark.parametrize("size, expected", [
    ((480, 640), (800, 1066)), ((640, 480), (1066, 800)), ((400, 1200), (444, 1332)),
    ((800, 1000), (800, 1000)),
])
def test_evaluation_resize_800_1333(size, expected):
    image, target = _sample(*size)
    out_image, out = evaluation()(image, target)
    assert tuple(out_image.shape[-2:]) == expected == detector_input_size(*size)
    assert out["size"].tolist() == list(expected)
    if expected == size:
        assert torch.equal(out_image, image)  # no resampling when nothing changes


def test_train_short_side_and_crop_branch():
    transform = deformable_detr_train()
    crops = 0
    for seed in range(200):
        view = transform.sample_view((300, 400), random.Random(seed))
        steps = view["steps"]
        # Aspect ratios here stay under 1333/800, so the short side is always a scale.
        assert min(output_size(steps, (300, 400))) in TRAIN_SCALES
        crop = [s for s in steps if s["op"] == "crop"]
        if crop:
            crops += 1
            assert [s["op"] for s in steps if s["op"] != "hflip"] == ["resize", "crop", "resize"]
            assert min(steps[-3]["size"]) in (400, 500, 600)
            assert 384 <= crop[0]["height"] <= 600 and 384 <= crop[0]["width"] <= 600
    assert 60 < crops < 140  # p = 0.5
    out_image, out = transform(*_sample(300, 400), random.Random(1))
    assert min(out_image.shape[-2:]) in TRAIN_SCALES


@pytest.mark.parametrize("side", [256, 1024])
def test_lsj_output_size_fixed(side):
    transform, (image, target) = large_scale_jitter(output_size=side), _sample()
    for seed in range(6):
        out_image, out = transform(image, target, random.Random(seed))
        assert tuple(out_image.shape) == (3, side, side)
        assert out["masks"].shape[-2:] == (side, side)
        assert out["size"].tolist() == [side, side]


def test_lsj_pads_with_zeros_at_bottom_right():
    image, target = _sample()
    view = {"input_size": [120, 160], "steps": [{"op": "pad", "size": [128, 200]}]}
    out_image, out = apply_view(image, target, view)
    assert torch.equal(out_image[:, :120, :160], image)
    assert out_image[:, 120:].abs().sum() == 0 and out_image[:, :, 160:].abs().sum() == 0
    assert torch.equal(out["boxes"], target["boxes"])


def test_crop_removes_vanished_instances():
    image, target = _sample()
    view = {"input_size": [120, 160],
            "steps": [{"op": "crop", "top": 60, "left": 80, "height": 40, "width": 40}]}
    out_image, out = apply_view(image, target, view)
    assert out_image.shape == (3, 40, 40)
    assert out["labels"].tolist() == [1, 3]  # 0 and 2 lie outside the crop
    assert out["boxes"].tolist() == [[0, 0, 40, 40], [20, 30, 24, 34]]
    assert out["area"].tolist() == [1600, 16]


def test_view_for_another_size_is_refused():
    image, target = _sample()
    with pytest.raises(ValueError, match="input_size"):
        apply_view(image, target, {"input_size": [10, 10], "steps": []})
    with pytest.raises(ValueError, match="unknown op"):
        apply_view(image, target, {"input_size": [120, 160], "steps": [{"op": "rotate"}]})
