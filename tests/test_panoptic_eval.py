"""PQ on hand-computed images (Kirillov et al. / COCO panopticapi rules) and mIoU vs numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rich.console import Console

from frozenseg.evaluation.panoptic import (
    PanopticQuality,
    SemanticIoU,
    panoptic_table,
    per_class_panoptic_table,
    semantic_table,
)

# Category ids as COCO's (not contiguous); 1 and 3 things, 2 stuff, 4 never seen.
CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0},
              {"id": 3, "name": "car", "isthing": 1}, {"id": 4, "name": "road", "isthing": 0}]


def _map(*runs: tuple[int, int]) -> np.ndarray:
    """A 1 x 20 id map from (id, length) runs; the rest is 0 (VOID / unassigned)."""
    ids = np.zeros((1, 20), np.int64)
    start = 0
    for sid, length in runs:
        ids[0, start:start + length] = sid
        start += length
    return ids


def _seg(sid: int, category: int, crowd: bool = False) -> dict:
    return {"id": sid, "category_id": category, "iscrowd": int(crowd)}


def _pq(*images) -> dict:
    pq = PanopticQuality(CATEGORIES)
    for image in images:
        pq.update(*image)
    return pq.compute()


def test_perfect_match():
    gt = _map((7, 10))
    result = _pq((gt, [_seg(7, 1)], gt, [_seg(7, 1)]))
    # One TP with IoU 1: PQ = SQ = RQ = 1 for "person", the only category seen.
    assert result["per_class"]["person"] == {"PQ": 100.0, "SQ": 100.0, "RQ": 100.0,
                                             "TP": 1, "FP": 0, "FN": 0}
    assert result["all"] == {"PQ": 100.0, "SQ": 100.0, "RQ": 100.0, "n": 1}
    assert result["things"]["n"] == 1 and result["stuff"]["n"] == 0
    assert math.isnan(result["stuff"]["PQ"])
    assert math.isnan(result["per_class"]["road"]["PQ"])  # absent from GT and predictions


def test_iou_above_half_is_a_true_positive():
    # GT person: 10 pixels; prediction: 6 of them. IoU = 6 / 10 = 0.6 > 0.5: TP.
    # SQ = 0.6, RQ = 1 / (1 + 0 + 0) = 1, PQ = 0.6.
    result = _pq((_map((5, 6)), [_seg(5, 1)], _map((8, 10)), [_seg(8, 1)]))
    row = result["per_class"]["person"]
    assert (row["TP"], row["FP"], row["FN"]) == (1, 0, 0)
    assert row["PQ"] == pytest.approx(60.0) and row["SQ"] == pytest.approx(60.0)
    assert row["RQ"] == pytest.approx(100.0)


def test_iou_below_half_is_a_false_positive_and_a_false_negative():
    # GT person pixels 0..9 (the rest "sky", so nothing is VOID); prediction: person on
    # pixels 0..3 and sky on 4..19. Person IoU = 4 / 10 = 0.4: no match, 1 FP + 1 FN,
    # PQ = SQ = RQ = 0. Sky: inter 10, union 16 + 10 - 10 = 16, IoU 0.625: TP.
    gt = (_map((1, 10), (2, 10)), [_seg(1, 1), _seg(2, 2)])
    pred = (_map((3, 4), (4, 16)), [_seg(3, 1), _seg(4, 2)])
    result = _pq((*pred, *gt))
    person, sky = result["per_class"]["person"], result["per_class"]["sky"]
    assert (person["TP"], person["FP"], person["FN"]) == (0, 1, 1)
    assert person["PQ"] == person["SQ"] == person["RQ"] == 0.0
    assert sky["SQ"] == pytest.approx(62.5) and sky["PQ"] == pytest.approx(62.5)
    # Things {person: 0}, stuff {sky: 62.5}, all: (0 + 62.5) / 2.
    assert result["things"]["PQ"] == 0.0 and result["stuff"]["PQ"] == pytest.approx(62.5)
    assert result["all"]["PQ"] == pytest.approx(31.25) and result["all"]["n"] == 2


def test_predicted_pixels_on_void_leave_the_union():
    # GT person on pixels 0..9, VOID on 10..19; prediction person on 4..15: 6 pixels on
    # the person, 6 on VOID. Union = 12 + 10 - 6 - 6 (VOID part) = 10, IoU 0.6: TP.
    # (Counting VOID it would be 6 / 16 = 0.375: no match.)
    gt = _map((1, 10))
    pred = np.zeros_like(gt)
    pred[0, 4:16] = 9
    result = _pq((pred, [_seg(9, 1)], gt, [_seg(1, 1)]))
    assert result["per_class"]["person"]["TP"] == 1
    assert result["per_class"]["person"]["SQ"] == pytest.approx(60.0)


@pytest.mark.parametrize("on_void,false_positives", [(6, 0), (5, 1)])
def test_unmatched_prediction_mostly_on_void_is_not_a_false_positive(on_void, false_positives):
    # GT sky on pixels 0..9, VOID on 10..19; a predicted car (no car in the GT) of 10
    # pixels with ``on_void`` of them on VOID: ignored when more than half (6/10), an FP
    # at exactly half (5/10). A car with no FP and no GT leaves "car" out entirely.
    gt = _map((1, 10))
    pred = np.zeros_like(gt)
    pred[0, 10 - (10 - on_void):10 + on_void] = 3
    result = _pq((pred, [_seg(3, 3)], gt, [_seg(1, 2)]))
    car = result["per_class"]["car"]
    assert car["FP"] == false_positives
    assert math.isnan(car["PQ"]) if not false_positives else car["PQ"] == 0.0


def test_crowd_regions():
    # GT: person crowd on 0..9, sky on 10..19. Predictions: a person on 0..5 plus 10..11
    # (6 of 8 pixels on the person crowd: ignored, no FP), a car on 6..9 (on a crowd of
    # another class: an FP), sky on 12..19 (IoU 8/10 = 0.8: TP). The crowd is never FN.
    gt = (_map((1, 10), (2, 10)), [_seg(1, 1, crowd=True), _seg(2, 2)])
    pred = np.zeros((1, 20), np.int64)
    pred[0, 0:6] = pred[0, 10:12] = 5
    pred[0, 6:10] = 6
    pred[0, 12:20] = 7
    result = _pq((pred, [_seg(5, 1), _seg(6, 3), _seg(7, 2)], *gt))
    person, car, sky = (result["per_class"][k] for k in ("person", "car", "sky"))
    assert (person["TP"], person["FP"], person["FN"]) == (0, 0, 0)
    assert (car["TP"], car["FP"], car["FN"]) == (0, 1, 0)
    assert sky["TP"] == 1 and sky["SQ"] == pytest.approx(80.0)


def test_crowd_is_never_matched_even_when_identical():
    gt = _map((1, 10))
    result = _pq((gt, [_seg(1, 1)], gt, [_seg(1, 1, crowd=True)]))
    assert result["per_class"]["person"]["TP"] == 0
    assert result["all"]["n"] == 0 and math.isnan(result["all"]["PQ"])


def test_things_stuff_split_and_prediction_only_class():
    # Image 1: GT person 0..4, sky 5..14, VOID 15..19; prediction person 0..4 (IoU 1),
    # sky 5..10 (IoU 6 / 10 = 0.6).
    image1 = (_map((1, 5), (2, 6)), [_seg(1, 1), _seg(2, 2)],
              _map((1, 5), (2, 10)), [_seg(1, 1), _seg(2, 2)])
    # Image 2: GT sky everywhere; prediction: car on 0..3 (an FP, car seen only here),
    # sky on 4..19 (IoU 16/20 = 0.8).
    image2 = (_map((3, 4), (4, 16)), [_seg(3, 3), _seg(4, 2)], _map((2, 20)), [_seg(2, 2)])
    result = _pq(image1, image2)
    # person: PQ 100. car: TP 0, FP 1 -> PQ 0. sky: TP 2, IoU sum 0.6 + 0.8 = 1.4,
    # SQ 0.7, RQ 1, PQ 0.7. things = (100 + 0) / 2 = 50, stuff = 70, all = 170 / 3.
    assert result["per_class"]["sky"]["PQ"] == pytest.approx(70.0)
    assert result["per_class"]["car"]["PQ"] == 0.0 and result["per_class"]["car"]["FP"] == 1
    assert result["things"]["PQ"] == pytest.approx(50.0) and result["things"]["n"] == 2
    assert result["stuff"]["PQ"] == pytest.approx(70.0) and result["stuff"]["n"] == 1
    assert result["all"]["PQ"] == pytest.approx(170.0 / 3)
    # SQ averages the per-class SQ (car: 0): (100 + 0 + 70) / 3; RQ (1 + 0 + 1) / 3.
    assert result["all"]["SQ"] == pytest.approx(170.0 / 3)
    assert result["all"]["RQ"] == pytest.approx(200.0 / 3)


def test_streaming_accumulates_over_images():
    # Image 1: person found (IoU 1). Image 2: person missed (FN).
    # TP 1, FN 1: SQ 1, RQ 1 / (1 + 0.5) = 2/3, PQ 2/3.
    gt = _map((1, 10))
    pq = PanopticQuality(CATEGORIES)
    pq.update(torch.as_tensor(gt), [_seg(1, 1)], torch.as_tensor(gt), [_seg(1, 1)])
    pq.update(np.zeros_like(gt), [], gt, [_seg(1, 1)])
    person = pq.compute()["per_class"]["person"]
    assert person["PQ"] == pytest.approx(200 / 3) and person["RQ"] == pytest.approx(200 / 3)
    assert person["SQ"] == pytest.approx(100.0)
    pq.reset()
    assert pq.compute()["all"]["n"] == 0


def test_bad_panoptic_input_is_refused():
    gt = _map((1, 10))
    pq = PanopticQuality(CATEGORIES)
    with pytest.raises(ValueError, match="no predicted segment lists"):
        pq.update(_map((9, 3)), [], gt, [_seg(1, 1)])
    with pytest.raises(ValueError, match="no pixels"):
        pq.update(_map((9, 3)), [_seg(9, 1), _seg(8, 1)], gt, [_seg(1, 1)])
    with pytest.raises(ValueError, match="category_id"):
        pq.update(_map((9, 3)), [_seg(9, 77)], gt, [_seg(1, 1)])
    with pytest.raises(ValueError, match="size"):
        pq.update(np.zeros((2, 20), np.int64), [], gt, [_seg(1, 1)])


# ----------------------------------------------------------------------------- mIoU


def _reference_semantic(preds, gts, k, ignore):
    """Per-class IoU and pixel accuracy by explicit float64 counting."""
    tp, fp, fn = np.zeros(k), np.zeros(k), np.zeros(k)
    correct = counted = 0.0
    for pred, gt in zip(preds, gts, strict=True):
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist(), strict=True):
            if g == ignore:
                continue
            counted += 1
            if p == g:
                tp[g] += 1
                correct += 1
            else:
                fp[p] += 1
                fn[g] += 1
    union, gt_total = tp + fp + fn, tp + fn
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    class_accuracy = np.where(gt_total > 0, tp / np.maximum(gt_total, 1), np.nan)
    return iou, correct / counted, np.nanmean(class_accuracy)


def test_miou_matches_a_float64_loop():
    rng = np.random.default_rng(0)
    k, ignore = 6, 255
    preds, gts = [], []
    for _ in range(3):
        # Classes 0..3 in the GT, 0..4 predicted (4 only there: IoU 0, averaged), 5 nowhere
        # (left out of the mean); a fifth of the GT ignored; 40% of the pixels right.
        gt = rng.integers(0, 4, (17, 23))
        gt[rng.random(gt.shape) < 0.2] = ignore
        pred = rng.integers(0, 5, (17, 23))
        agree = (rng.random(gt.shape) < 0.4) & (gt != ignore)
        preds.append(np.where(agree, gt, pred))
        gts.append(gt)
    metric = SemanticIoU(k, ignore_index=ignore)
    for pred, gt in zip(preds, gts, strict=True):
        metric.update(torch.as_tensor(pred), torch.as_tensor(gt))
    result = metric.compute()
    iou, accuracy, mean_accuracy = _reference_semantic(preds, gts, k, ignore)
    assert math.isnan(result["per_class"]["5"]) and math.isnan(iou[5])
    assert result["per_class"]["4"] == 0.0  # predicted only: IoU 0, in the mean
    np.testing.assert_allclose([result["per_class"][str(c)] for c in range(5)],
                               100 * iou[:5], rtol=1e-12)
    assert result["mIoU"] == pytest.approx(100 * np.nanmean(iou), rel=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(100 * accuracy, rel=1e-12)
    assert result["mean_accuracy"] == pytest.approx(100 * mean_accuracy, rel=1e-12)


def test_miou_batch_equals_singles_and_refuses_bad_labels():
    rng = np.random.default_rng(1)
    pred, gt = rng.integers(0, 4, (2, 8, 8)), rng.integers(0, 4, (2, 8, 8))
    batch, singles = SemanticIoU(4), SemanticIoU(4)
    batch.update(pred, gt)
    for p, g in zip(pred, gt, strict=True):
        singles.update(p, g)
    assert torch.equal(batch.confusion, singles.confusion)
    with pytest.raises(ValueError, match="prediction"):
        batch.update(np.full((2, 2), 4), np.zeros((2, 2), np.int64))
    batch.update(np.full((2, 2), 4), np.full((2, 2), 255))  # ignored pixels: any prediction


def test_tables_render():
    pq = PanopticQuality(CATEGORIES)
    gt = _map((1, 10))
    pq.update(gt, [_seg(1, 1)], gt, [_seg(1, 1)])
    metrics = pq.compute()
    semantic = SemanticIoU(3, class_names=["a", "b", "c"])
    semantic.update(np.array([[0, 1]]), np.array([[0, 2]]))
    console = Console(record=True, width=120)
    for table in (panoptic_table(metrics), per_class_panoptic_table(metrics),
                  semantic_table(semantic.compute(), per_class=True)):
        console.print(table)
    text = console.export_text()
    assert "100.0" in text and "person" in text and "IoU c" in text and "-" in text
