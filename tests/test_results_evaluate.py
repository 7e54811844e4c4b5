"""image_predictions, ResultsWriter and coco_evaluate on a small synthetic dataset."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import roi_align

import frozenseg
from frozenseg.data import CocoInstances, evaluation
from frozenseg.data.transforms import output_size
from frozenseg.evaluation.coco import (
    METRIC_NAMES,
    coco_evaluate,
    metrics_table,
    per_class_table,
    write_metrics,
)
from frozenseg.evaluation.results import ResultsWriter
from frozenseg.head.network import HeadOutput
from frozenseg.head.paste import paste_image_frame_masks, paste_masks
from frozenseg.head.results import image_predictions

ROI = 28


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    frozenseg.synth(root, images=6, seed=0)
    return root


@pytest.fixture(scope="module")
def perfect(dataset):
    """Ground truth as a head output on evaluation(64, 128) views of the train split.

    Boxes: the GT boxes in view pixels; masks: the GT bitmaps RoIAligned into their boxes
    (S x S, aligned) as +-20 logits. Returns (head_output, labels, targets, category_ids).
    """
    coco = CocoInstances(dataset / "images" / "train", dataset / "instances_train.json")
    transform, parts, targets = evaluation(short=64, max_size=128), [], []
    for b in range(len(coco)):
        _, target = coco[b]
        keep = ~target["iscrowd"]  # a crowd region is not something to predict
        orig = target["orig_size"].tolist()
        view = output_size(transform.sample_view(orig)["steps"], orig)
        assert max(view) <= 128 and tuple(view) != tuple(orig)
        scale = torch.tensor([view[1] / orig[1], view[0] / orig[0]] * 2)
        boxes, masks = target["boxes"][keep], target["masks"][keep]
        parts.append((_roi_logits(masks, boxes), boxes * scale, target["labels"][keep], b))
        targets.append({"image_id": target["image_id"], "orig_size": target["orig_size"],
                        "size": torch.tensor(view)})
    return _head_output(parts) + (targets, coco.category_ids)


def _roi_logits(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(n, H, W) bool bitmaps in their (n, 4) xyxy boxes -> (n, S, S) RoI-frame logits."""
    rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None], boxes], 1)
    inside = roi_align(masks[:, None].float(), rois, ROI, spatial_scale=1.0, aligned=True)
    return (inside[:, 0] - 0.5) * 40


def _head_output(parts) -> tuple[HeadOutput, torch.Tensor]:
    """Concatenate per-image (logits, view boxes, labels, b) into a HeadOutput + (B, K) labels."""
    gen = torch.Generator().manual_seed(0)
    logits, boxes, labels, images = zip(*parts, strict=True)
    counts = [len(x) for x in labels]
    n = sum(counts)
    padded = torch.zeros(len(parts), max(counts), dtype=torch.int64)
    for b, image_labels in enumerate(labels):
        padded[b, : len(image_labels)] = image_labels
    output = HeadOutput(
        mask_logits=torch.cat(logits), frame="roi", iou_logits=torch.randn(n, generator=gen),
        boxes=torch.cat(boxes),
        batch_index=torch.cat([torch.full((c,), b) for b, c in zip(images, counts, strict=True)]),
        query_index=torch.cat([torch.arange(c) for c in counts]),
        scores=torch.rand(n, generator=gen) * 0.9 + 0.05)
    return output, padded


def _ids(labels: torch.Tensor, category_ids: list[int]) -> torch.Tensor:
    """(B, K) contiguous labels -> the category ids image_predictions takes."""
    return torch.tensor(category_ids)[labels]


def _flat(per_image: list[list[dict]]) -> list[dict]:
    return [r for results in per_image for r in results]


def _pycocotools_stats(annotations: Path, results_path: Path, iou_type: str,
                       image_ids=None) -> list[float]:
    """stats[0:6] * 100 straight from pycocotools (-1 as NaN); segm reads results w/o bbox."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        if iou_type == "bbox":
            dt = gt.loadRes(str(results_path))
        else:
            anns = json.loads(results_path.read_text())
            for ann in anns:
                ann.pop("bbox")
            dt = gt.loadRes(anns)
        coco_eval = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [s * 100 if s >= 0 else math.nan for s in coco_eval.stats[:6]]


# ------------------------------------------------------------------------- image_predictions


def test_perfect_predictions_score_full_marks(dataset, perfect):
    output, labels, targets, category_ids = perfect
    annotations = dataset / "instances_train.json"
    results = _flat(image_predictions(output, _ids(labels, category_ids), targets))
    gt = json.loads(annotations.read_text())
    expected = sorted((a["image_id"], a["category_id"]) for a in gt["annotations"]
                      if not a["iscrowd"])
    assert category_ids != list(range(len(category_ids)))  # the ids are not contiguous
    assert sorted((r["image_id"], r["category_id"]) for r in results) == expected
    metrics = coco_evaluate(annotations, results)
    assert metrics["bbox"]["AP"] == pytest.approx(100, abs=1e-6)
    assert metrics["segm"]["AP"] > 90
    assert set(metrics["per_class"]["segm"]) == {c["name"] for c in gt["categories"]}


def test_results_are_pasted_masks_at_the_original_size(perfect):
    output, labels, targets, category_ids = perfect
    per_image = image_predictions(output, _ids(labels, category_ids), targets, mask_threshold=0.4)
    for b, (results, target) in enumerate(zip(per_image, targets, strict=True)):
        (H, W), (h, w) = target["orig_size"].tolist(), target["size"].tolist()
        index = (output.batch_index == b).nonzero().flatten()
        index = index[output.scores[index].argsort(descending=True)]
        boxes = output.boxes[index] * torch.tensor([W / w, H / h, W / w, H / h])
        expected = paste_masks(output.mask_logits[index].sigmoid(), boxes, (H, W), 0.4)
        masks = mask_utils.decode([r["segmentation"] for r in results])
        assert masks.shape == (H, W, len(index))
        assert np.array_equal(masks.transpose(2, 0, 1), expected.numpy())
        assert [r["score"] for r in results] == output.scores[index].tolist()
        quality = [r["mask_quality"] for r in results]
        assert quality == pytest.approx(output.iou_logits[index].sigmoid().tolist())
        x0, y0 = boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H)
        widths = boxes[:, 2].clamp(0, W) - x0
        assert [r["bbox"][0] for r in results] == pytest.approx(x0.tolist(), abs=0.006)
        assert [r["bbox"][1] for r in results] == pytest.approx(y0.tolist(), abs=0.006)
        assert [r["bbox"][2] for r in results] == pytest.approx(widths.tolist(), abs=0.011)
        assert all(isinstance(r["segmentation"]["counts"], str) for r in results)


def test_selection_and_batch_equals_singles(perfect):
    output, labels, targets, category_ids = perfect
    full = image_predictions(output, _ids(labels, category_ids), targets)
    cut = image_predictions(output, _ids(labels, category_ids), targets, score_threshold=0.4,
                            max_per_image=3)
    for results, kept in zip(full, cut, strict=True):
        assert kept == [r for r in results if r["score"] >= 0.4][:3]
        assert [r["score"] for r in results] == sorted((r["score"] for r in results),
                                                        reverse=True)
    for b in (0, 3):
        mine = output.batch_index == b
        single = HeadOutput(mask_logits=output.mask_logits[mine], frame="roi",
                            iou_logits=output.iou_logits[mine], boxes=output.boxes[mine],
                            batch_index=torch.zeros(int(mine.sum()), dtype=torch.int64),
                            query_index=output.query_index[mine], scores=output.scores[mine])
        assert image_predictions(single, _ids(labels[b:b + 1], category_ids),
                                 targets[b:b + 1]) == [full[b]]


def test_image_frame_masks_are_upsampled_then_resized():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 6, generator=gen) * 4  # stride 4 over a padded 16 x 24 batch
    output = HeadOutput(mask_logits=logits, frame="image", iou_logits=None,
                        boxes=torch.tensor([[1.0, 2.0, 9.0, 10.0]] * 3),
                        batch_index=torch.zeros(3, dtype=torch.int64),
                        query_index=torch.arange(3), scores=torch.tensor([0.2, 0.9, 0.5]))
    target = {"image_id": 7, "orig_size": torch.tensor([30, 50]), "size": torch.tensor([12, 20])}
    (results,) = image_predictions(output, torch.tensor([[15, 4, 8]]), [target])
    order = [1, 2, 0]
    expected = paste_image_frame_masks(logits[order].sigmoid(), (12, 20), output_size=(30, 50),
                                       threshold=0.5)
    masks = mask_utils.decode([r["segmentation"] for r in results]).transpose(2, 0, 1)
    assert np.array_equal(masks, expected.numpy())
    assert [r["category_id"] for r in results] == [4, 8, 15]
    assert results[0]["bbox"] == [2.5, 5.0, 20.0, 20.0]
    assert all("mask_quality" not in r for r in results)


# ------------------------------------------------------------------------------ ResultsWriter


def test_results_writer_streams_and_is_atomic(tmp_path):
    path = tmp_path / "results.json"
    first = [{"image_id": 1, "score": 0.5}, {"image_id": 2, "score": 0.25}]
    with ResultsWriter(path) as writer:
        writer.write(first[:1])
        writer.write([])
        writer.write(first[1:])
    assert json.loads(path.read_text()) == first and writer.count == 2
    with pytest.raises(KeyError), ResultsWriter(path) as writer:
        writer.write([{"image_id": 3, "score": 1.0}])
        raise KeyError("stopped")
    with pytest.raises(ValueError), ResultsWriter(path) as writer:
        writer.write([{"image_id": 3, "score": math.nan}])
    assert json.loads(path.read_text()) == first
    assert os.listdir(tmp_path) == ["results.json"]
    with ResultsWriter(tmp_path / "empty.json"):
        pass
    assert json.loads((tmp_path / "empty.json").read_text()) == []


# ---------------------------------------------------------------------------- coco_evaluate


def test_empty_results_score_zero(dataset, tmp_path):
    annotations = dataset / "instances_train.json"
    with ResultsWriter(tmp_path / "empty.json"):
        pass
    for results in ([], tmp_path / "empty.json"):
        metrics = coco_evaluate(annotations, results)
        for iou_type in ("bbox", "segm"):
            assert {k: metrics[iou_type][k] for k in METRIC_NAMES} == dict.fromkeys(
                METRIC_NAMES, 0.0)
            assert metrics[iou_type]["best_f1"]["score"] is None
            assert all(v == 0 or math.isnan(v) for v in metrics["per_class"][iou_type].values())


def test_image_ids_restrict_the_evaluation(dataset, perfect):
    output, labels, targets, category_ids = perfect
    annotations = dataset / "instances_train.json"
    results = [r for r in _flat(image_predictions(output, _ids(labels, category_ids), targets))
               if r["image_id"] != 2]
    assert coco_evaluate(annotations, results, ("bbox",))["bbox"]["AP"] < 95
    others = [t["image_id"] for t in targets if t["image_id"] != 2]
    subset = coco_evaluate(annotations, results, ("bbox",), image_ids=others)
    assert subset["bbox"]["AP"] == pytest.approx(100, abs=1e-6)
    assert coco_evaluate(annotations, results, ("bbox",), image_ids=[2])["bbox"]["AP"] == 0
    with pytest.raises(ValueError, match="not in the annotations"):
        coco_evaluate(annotations, results, image_ids=[2, 999])


def test_numbers_are_pycocotools_own(dataset, perfect, tmp_path):
    output, labels, targets, category_ids = perfect
    gen = torch.Generator().manual_seed(2)
    sizes = (output.boxes[:, 2:] - output.boxes[:, :2]).repeat(1, 2)
    noisy = HeadOutput(
        mask_logits=output.mask_logits + 15 * torch.randn(output.mask_logits.shape, generator=gen),
        frame="roi", iou_logits=output.iou_logits,
        boxes=output.boxes + 0.1 * sizes * torch.randn(output.boxes.shape, generator=gen),
        batch_index=output.batch_index, query_index=output.query_index,
        scores=torch.rand(output.scores.shape, generator=gen))
    labels = labels.clone()
    labels[:, ::3] = (labels[:, ::3] + 1) % len(category_ids)  # some wrong classes
    annotations, path = dataset / "instances_train.json", tmp_path / "results.json"
    with ResultsWriter(path) as writer:
        for results in image_predictions(noisy, _ids(labels, category_ids), targets):
            writer.write(results)
    for image_ids in (None, [1, 3, 4]):
        metrics = coco_evaluate(annotations, path, image_ids=image_ids)
        for iou_type in ("bbox", "segm"):
            mine = [metrics[iou_type][name] for name in METRIC_NAMES]
            direct = _pycocotools_stats(annotations, path, iou_type, image_ids)
            assert mine == pytest.approx(direct, rel=1e-12, nan_ok=True)
            assert 5 < mine[0] < 95
            per_class = [v for v in metrics["per_class"][iou_type].values() if not math.isnan(v)]
            assert np.mean(per_class) == pytest.approx(mine[0], rel=1e-9)


def test_tables_and_metrics_file(tmp_path):
    metrics = {"bbox": dict.fromkeys(METRIC_NAMES, 12.5) | {"APl": math.nan},
               "per_class": {"bbox": {"ellipse": 40.0, "ring": math.nan}}}
    assert metrics_table(metrics).row_count == 1
    assert per_class_table(metrics, "bbox").row_count == 2
    with pytest.raises(ValueError, match="segm"):
        per_class_table(metrics, "segm")
    write_metrics(metrics, tmp_path / "metrics.json")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["bbox"]["APl"] is None and written["per_class"]["bbox"]["ellipse"] == 40.0
    assert os.listdir(tmp_path) == ["metrics.json"]


def _boxes_ground_truth(boxes: list[list[float]]) -> dict:
    """A one-image COCO instances dict with one category, a box annotation per box."""
    return {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
            "categories": [{"id": 1, "name": "shape"}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0}
                            for i, box in enumerate(boxes)]}


@pytest.mark.parametrize("tied", [False, True])
def test_the_best_f1_threshold_is_counted_by_hand(tmp_path, tied):
    """Three objects; detections at 0.9 (hit), 0.8 (hit), 0.3 (miss), 0.2 (hit): F1 by
    threshold is 0.5, 0.8, 0.67, 0.86, so 0.2 wins. Tied at 0.3, the miss and the third
    hit enter together: 0.3 wins with the same counts."""
    objects = [[0, 0, 20, 20], [40, 40, 20, 20], [70, 0, 20, 20]]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_boxes_ground_truth(objects)))
    scores = [0.9, 0.8, 0.3, 0.3 if tied else 0.2]
    boxes = [objects[0], objects[1], [0, 70, 20, 20], objects[2]]
    results = [{"image_id": 1, "category_id": 1, "bbox": box, "score": score}
               for box, score in zip(boxes, scores, strict=True)]
    best = coco_evaluate(path, results, ("bbox",))["bbox"]["best_f1"]
    assert best["score"] == pytest.approx(scores[3])
    assert (best["precision"], best["recall"]) == (pytest.approx(3 / 4), 1.0)
    assert best["f1"] == pytest.approx(2 * 0.75 / 1.75)
    empty = coco_evaluate(path, [], ("bbox",))["bbox"]["best_f1"]
    assert empty["score"] is None
