"""MaskFrozenDETR and Predictor: one model object, masks at the image's own size, the same
masks the COCO export writes, a saved folder that loads back equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import frozenseg
from frozenseg.data import CocoInstances, ImageFolder
from frozenseg.detector.classes import match_classes
from frozenseg.engine.data import eval_transform
from frozenseg.head.export import masks_for_boxes
from frozenseg.head.inference import predict as dataset_predict
from frozenseg.head.predictor import Predictor
from frozenseg.head.segmenter import MaskFrozenDETR
from tests.tiny import SCALE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model(trained):
    return MaskFrozenDETR.from_pretrained(trained, device="cpu")


def _val_image(data, index: int = 0):
    val = CocoInstances(data / "images" / "val", data / "instances_val.json",
                        transform=eval_transform(SCALE))
    info = val.images[index]
    return val, info, np.asarray(Image.open(data / "images" / "val" / info["file_name"])
                                 .convert("RGB"))


def test_predictor_gives_the_masks_the_export_writes(model, data):
    """set_image on a numpy array + predict() equals the dataset path (COCO results, RLE at
    the original size) on the same image, mask for mask."""
    val, info, pixels = _val_image(data)
    target, results = next(dataset_predict(model, val, batch_size=1))
    assert int(target["image_id"]) == info["id"]
    predictor = Predictor(model)
    predictor.set_image(pixels)
    found = predictor.predict(max_instances=100)
    categories = torch.tensor(val.category_ids)
    kept = [i for i, label in enumerate(found.labels.tolist())
            if label < len(categories)]  # the export drops classes the dataset lacks
    assert len(results) == len(kept) > 0
    for result, i in zip(results, kept, strict=True):
        assert found.masks[i].shape == pixels.shape[:2]
        expected = mask_utils.decode(result["segmentation"]).astype(bool)
        assert np.array_equal(found.masks[i].numpy(), expected)
        assert found.scores[i].item() == pytest.approx(result["score"], abs=1e-6)
        assert found.mask_quality[i].item() == pytest.approx(result["mask_quality"], abs=1e-6)
    assert torch.equal(found.scores, found.scores.sort(descending=True).values)


def test_given_boxes_reuse_the_encoding(model, data, monkeypatch):
    """Box sets on one image run the encoder once and give what the model gives on the
    resized image from scratch; for given boxes the score is the mask quality."""
    _, _, pixels = _val_image(data, 1)
    predictor = Predictor(model)
    predictor.set_image(pixels)
    h, w = pixels.shape[:2]
    boxes = torch.tensor([[2.0, 3.0, w / 2, h / 2], [w / 3, h / 4, w - 1.0, h - 2.0]])
    monkeypatch.setattr(model.detector.model, "encode", None)  # a second encoding fails
    first = predictor.predict(boxes, labels=[0, 1])
    predictor.predict(boxes[:1])
    again = predictor.predict(boxes, labels=[0, 1])
    monkeypatch.undo()
    assert first.masks.shape == (2, h, w)
    assert torch.equal(first.masks, again.masks) and torch.equal(first.scores, again.scores)
    torch.testing.assert_close(first.scores, first.mask_quality)
    torch.testing.assert_close(first.boxes.sort(0).values, boxes.sort(0).values)
    view, _ = model.view(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255)
    scale = torch.tensor([view.shape[2] / w, view.shape[1] / h] * 2)
    direct = model([view], [boxes * scale], [torch.tensor([0, 1])])
    torch.testing.assert_close(direct.scores.sort(descending=True).values, first.scores)


def test_given_boxes_give_the_masks_export_boxes_writes(model, data):
    """predict(boxes) equals ``frozenseg export --boxes`` (masks_for_boxes) for the same
    boxes and classes, mask for mask and quality for quality."""
    _, _, pixels = _val_image(data, 1)
    dataset = ImageFolder.from_coco(data / "images" / "val", data / "instances_val.json",
                                    transform=eval_transform(SCALE))
    classes = match_classes(model.detector.classes, dataset.category_ids,
                            dataset.category_names)
    h, w = pixels.shape[:2]
    entries = [{"bbox": [3.0, 4.5, w / 2, h / 3], "category_id": dataset.category_ids[0]},
               {"bbox": [w / 4, h / 5, w / 2, h / 2], "category_id": dataset.category_ids[-1]}]
    exported, _, _ = masks_for_boxes(model, classes, dataset[1], entries)
    predictor = Predictor(model)
    predictor.set_image(pixels)
    xyxy = [[x, y, x + bw, y + bh] for x, y, bw, bh in (e["bbox"] for e in entries)]
    found = predictor.predict(xyxy, classes.to_detector([e["category_id"] for e in entries]))
    for (rle, quality), box in zip(exported, xyxy, strict=True):
        i = int(torch.isclose(found.boxes, torch.tensor(box)).all(1).nonzero())
        assert np.array_equal(found.masks[i].numpy(), mask_utils.decode(rle).astype(bool))
        assert found.mask_quality[i].item() == pytest.approx(quality, abs=1e-6)


def test_image_formats_people_hold(model, data):
    """numpy uint8, PIL and float tensors give the same prediction."""
    _, info, pixels = _val_image(data)
    predictor = Predictor(model)
    outputs = []
    for image in (pixels, Image.fromarray(pixels),
                  torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255):
        predictor.set_image(image)
        outputs.append(predictor.predict())
    for other in outputs[1:]:
        assert torch.equal(other.masks, outputs[0].masks)
        torch.testing.assert_close(other.scores, outputs[0].scores)


def test_save_pretrained_loads_back_equal(model, data, tmp_path):
    folder = model.save_pretrained(tmp_path / "model")
    assert {p.name for p in folder.iterdir()} == {"head.safetensors", "config.json",
                                                   "detector", "README.md"}
    assert "MaskFrozenDETR.from_pretrained" in (folder / "README.md").read_text()
    again = frozenseg.MaskFrozenDETR.from_pretrained(folder, device="cpu")
    _, _, pixels = _val_image(data)
    first, second = Predictor(model), frozenseg.Predictor(again)
    first.set_image(pixels)
    second.set_image(pixels)
    a, b = first.predict(), second.predict()
    assert torch.equal(a.masks, b.masks) and torch.equal(a.scores, b.scores)
    with pytest.raises(ValueError, match="already holds a saved model"):
        model.save_pretrained(folder)
    model.save_pretrained(folder, overwrite=True)
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="not a folder save_pretrained wrote"):
        model.save_pretrained(tmp_path / "mine", overwrite=True)


def test_bad_input_is_named(model):
    predictor = Predictor(model)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict()
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        predictor.set_image(np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        predictor.set_image([[0, 1]])
    predictor.set_image(np.zeros((40, 50, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="1 labels for 2 boxes"):
        predictor.predict([[0, 0, 10, 10], [5, 5, 20, 20]], labels=[0])
