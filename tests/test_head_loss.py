"""The mask head's losses against float64 loops, numpy and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from frozenseg.head.loss import (
    MaskCriterion,
    MaskLossWeights,
    assign_proposals,
    frame_points_to_image,
    jitter_boxes,
    mask_iou,
    roi_mask_targets,
)
from frozenseg.head.paste import image_points_to_roi, roi_points_to_image
from frozenseg.losses import mask_loss, point_sample, sample_bitmaps, uncertain_point_coords


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _point_reference(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """float64 loop: cell coordinate x * W - 0.5 (align_corners=False), zero off the map."""
    n, c, h, w = maps.shape
    out = torch.zeros(n, c, coords.shape[1], dtype=torch.float64)
    for i in range(n):
        for p, (x, y) in enumerate(coords[i].tolist()):
            px, py = x * w - 0.5, y * h - 0.5
            x0, y0 = math.floor(px), math.floor(py)
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[i, :, p] += wy * wx * maps[i, :, yy, xx].double()
    return out


def _rectangle(height: int, width: int, rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[0, rows, cols] = True
    return mask


# ----------------------------------------------------------------------------- points


def test_point_sample_matches_float64_loop():
    gen = _gen(0)
    maps = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    coords = torch.rand(2, 11, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    torch.testing.assert_close(point_sample(maps, coords), _point_reference(maps, coords))
    torch.testing.assert_close(point_sample(maps.float(), coords.float()),
                               _point_reference(maps, coords).float())


def test_point_sample_gradcheck():
    gen = _gen(1)
    maps = torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = (torch.rand(1, 5, 2, generator=gen, dtype=torch.float64) * 0.8 + 0.1)
    assert torch.autograd.gradcheck(lambda m: point_sample(m, coords), (maps,))


def test_uncertain_points_keep_the_most_uncertain_candidates():
    logits = torch.randn(3, 1, 6, 6, generator=_gen(2), dtype=torch.float64)
    coords = uncertain_point_coords(logits, 8, oversample=3, importance=0.75, generator=_gen(5))
    assert coords.shape == (3, 8, 2) and coords.dtype == torch.float64
    assert bool(((coords >= 0) & (coords <= 1)).all())
    # the candidates are the generator's first draw
    candidates = torch.rand(3, 24, 2, generator=_gen(5)).double()
    uncertainty = _point_reference(logits, candidates)[:, 0].abs()
    for i in range(3):
        order = uncertainty[i].argsort()[:6]
        torch.testing.assert_close(coords[i, :6], candidates[i, order])
    again = uncertain_point_coords(logits, 8, oversample=3, importance=0.75, generator=_gen(5))
    assert torch.equal(coords, again)
    other = uncertain_point_coords(logits, 8, oversample=3, importance=0.75, generator=_gen(6))
    assert not torch.equal(coords, other)


def test_uncertain_points_extremes():
    logits = torch.randn(2, 1, 4, 4, generator=_gen(3))
    assert uncertain_point_coords(logits, 5, importance=0.0, generator=_gen(0)).shape == (2, 5, 2)
    assert uncertain_point_coords(logits, 5, importance=1.0, generator=_gen(0)).shape == (2, 5, 2)


def test_sample_bitmaps_is_bilinear_on_the_float_mask():
    gen = _gen(4)
    masks = torch.rand(3, 6, 9, generator=gen) > 0.5
    index = torch.tensor([2, 0, 2, 1])
    points = torch.rand(4, 13, 2, generator=gen, dtype=torch.float64) * 12 - 1.5
    got = sample_bitmaps(masks, index, points)
    scale = torch.tensor([9.0, 6.0], dtype=torch.float64)
    expected = _point_reference(masks[index, None].double(), points / scale)[:, 0]
    torch.testing.assert_close(got, expected)


def test_roi_points_round_trip_and_hit_a_rectangle_exactly():
    gt = _rectangle(30, 40, slice(5, 20), slice(8, 30))  # pixels x in [8, 30), y in [5, 20)
    boxes = torch.tensor([[4.3, 2.7, 27.9, 24.1]], dtype=torch.float64)
    coords = torch.rand(1, 400, 2, generator=_gen(5), dtype=torch.float64)
    points = frame_points_to_image(coords, "roi", boxes=boxes)
    torch.testing.assert_close(points, roi_points_to_image(coords, boxes))
    torch.testing.assert_close(image_points_to_roi(points, boxes), coords)
    targets = sample_bitmaps(gt, torch.tensor([0]), points)[0]
    x, y = points[0, :, 0], points[0, :, 1]
    inside = (x > 8.5) & (x < 29.5) & (y > 5.5) & (y < 19.5)
    outside = (x < 7.5) | (x > 30.5) | (y < 4.5) | (y > 20.5)
    assert bool(inside.any()) and bool(outside.any())
    assert bool((targets[inside] == 1).all()) and bool((targets[outside] == 0).all())


def test_image_frame_points_cover_the_padded_frame():
    coords = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.125, 0.5]]])
    points = frame_points_to_image(coords, "image", map_size=(3, 4), stride=4)
    torch.testing.assert_close(points, torch.tensor([[[0.0, 0.0], [16.0, 12.0], [2.0, 6.0]]]))


# ----------------------------------------------------------------------------- losses


def test_mask_loss_matches_hand_formulas():
    logits = torch.tensor([[0.3, -1.2, 2.0], [-0.5, 0.1, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64)
    bce, dice = [], []
    for row_x, row_t in zip(logits.tolist(), targets.tolist(), strict=True):
        probs = [1 / (1 + math.exp(-x)) for x in row_x]
        bce.append(sum(-(t * math.log(p) + (1 - t) * math.log(1 - p))
                       for p, t in zip(probs, row_t, strict=True)) / len(row_x))
        inter = sum(p * t for p, t in zip(probs, row_t, strict=True))
        dice.append(1 - (2 * inter + 1) / (sum(probs) + sum(row_t) + 1))
    losses = mask_loss(logits, targets)
    assert losses["loss_mask_bce"].item() == pytest.approx(sum(bce) / 2, rel=1e-12)
    assert losses["loss_mask_dice"].item() == pytest.approx(sum(dice) / 2, rel=1e-12)


def test_perfect_prediction_has_no_loss():
    targets = (torch.rand(3, 50, generator=_gen(6)) > 0.5).double()
    losses = mask_loss(60 * (2 * targets - 1), targets)
    assert losses["loss_mask_dice"].item() < 1e-12
    assert losses["loss_mask_bce"].item() < 1e-12


@pytest.mark.parametrize("cell", [1, 2])
def test_iou_target_matches_numpy_when_cells_are_pixel_blocks(cell):
    gen = _gen(7)
    s = 4
    gt = torch.rand(2, 20, 24, generator=gen) > 0.4
    boxes = torch.tensor([[3.0, 2.0, 3.0 + s * cell, 2.0 + s * cell],
                          [10.0, 9.0, 10.0 + s * cell, 9.0 + s * cell]])
    index = torch.tensor([1, 0])
    logits = torch.randn(2, s, s, generator=gen)
    target = roi_mask_targets(gt, index, boxes, (s, s), chunk=1)
    iou = mask_iou(logits, target)
    for i, (x0, y0) in enumerate(((3, 2), (10, 9))):
        crop = gt[index[i], y0:y0 + s * cell, x0:x0 + s * cell].numpy().astype(float)
        blocks = crop.reshape(s, cell, s, cell).mean(axis=(1, 3)) >= 0.5
        np.testing.assert_array_equal(target[i].numpy(), blocks)
        pred = logits[i].numpy() > 0
        expected = (pred & blocks).sum() / max((pred | blocks).sum(), 1)
        assert iou[i].item() == pytest.approx(expected)


def test_roi_targets_read_zero_off_the_image():
    gt = torch.ones(1, 4, 4, dtype=torch.bool)
    target = roi_mask_targets(gt, torch.tensor([0]), torch.tensor([[-4.0, 0.0, 4.0, 4.0]]), (4, 8))
    expected = torch.tensor([[False] * 4 + [True] * 4] * 4)
    assert torch.equal(target[0], expected)


# ----------------------------------------------------------------------------- criterion


def _criterion_inputs(gen):
    """Two images; proposals 0, 2, 3 positive, 1 and 4 negative."""
    gt_masks = [torch.rand(2, 24, 30, generator=gen) > 0.5,
                torch.rand(1, 20, 28, generator=gen) > 0.5]
    boxes = torch.tensor([[2.0, 3.0, 20.0, 18.0], [0.0, 0.0, 5.0, 5.0], [4.5, 1.2, 25.0, 22.0],
                          [1.0, 1.0, 27.0, 19.0], [3.0, 3.0, 9.0, 9.0]])
    batch_index = torch.tensor([0, 0, 0, 1, 1])
    gt_index = torch.tensor([1, -1, 0, 0, -1])
    logits = torch.randn(5, 8, 8, generator=gen, requires_grad=True)
    iou_logits = torch.randn(5, generator=gen, requires_grad=True)
    return logits, iou_logits, boxes, batch_index, gt_index, gt_masks


def test_criterion_named_losses_and_weighted_sum():
    logits, iou_logits, boxes, batch_index, gt_index, gt_masks = _criterion_inputs(_gen(8))
    weights = MaskLossWeights(bce=2.0, dice=0.5, iou=3.0)
    losses = MaskCriterion(weights=weights)(logits, iou_logits, boxes, batch_index, gt_index,
                                            gt_masks, generator=_gen(0))
    assert set(losses) == {"loss_mask_bce", "loss_mask_dice", "loss_mask_iou", "loss"}
    total = (2 * losses["loss_mask_bce"] + 0.5 * losses["loss_mask_dice"]
             + 3 * losses["loss_mask_iou"])
    torch.testing.assert_close(losses["loss"], total)
    losses["loss"].backward()
    assert logits.grad[[1, 4]].abs().sum() == 0 and logits.grad[[0, 2, 3]].abs().sum() > 0
    assert iou_logits.grad[[1, 4]].abs().sum() == 0 and iou_logits.grad[[0, 2, 3]].abs().sum() > 0


def test_criterion_is_its_parts_per_image():
    """The criterion equals the public pieces composed by hand, one proposal at a time."""
    logits, iou_logits, boxes, batch_index, gt_index, gt_masks = _criterion_inputs(_gen(14))
    losses = MaskCriterion()(logits, iou_logits, boxes, batch_index, gt_index, gt_masks,
                             generator=_gen(4))
    pos = [0, 2, 3]
    coords = uncertain_point_coords(logits[pos, None].detach(), 16, generator=_gen(4))
    point_logits = point_sample(logits[pos, None].detach(), coords)[:, 0]
    targets, ious = [], []
    for row, i in enumerate(pos):
        gt = gt_masks[batch_index[i]]
        points = roi_points_to_image(coords[row:row + 1], boxes[i:i + 1])
        targets.append(sample_bitmaps(gt, gt_index[i:i + 1], points)[0])
        roi_gt = roi_mask_targets(gt, gt_index[i:i + 1], boxes[i:i + 1], (8, 8))
        ious.append(mask_iou(logits[i:i + 1], roi_gt)[0])
    expected = mask_loss(point_logits, torch.stack(targets))
    for name in ("loss_mask_bce", "loss_mask_dice"):
        torch.testing.assert_close(losses[name].detach(), expected[name])
    iou_loss = ((iou_logits[pos].detach().sigmoid() - torch.stack(ious)) ** 2).mean()
    torch.testing.assert_close(losses["loss_mask_iou"].detach(), iou_loss)


def test_criterion_ignores_negatives():
    logits, iou_logits, boxes, batch_index, gt_index, gt_masks = _criterion_inputs(_gen(9))
    criterion = MaskCriterion()
    full = criterion(logits, iou_logits, boxes, batch_index, gt_index, gt_masks, generator=_gen(1))
    pos = gt_index >= 0
    only = criterion(logits[pos], iou_logits[pos], boxes[pos], batch_index[pos], gt_index[pos],
                     gt_masks, generator=_gen(1))
    for name in full:
        torch.testing.assert_close(full[name], only[name])


def test_criterion_perfect_masks_and_scores():
    """GT covers each box entirely and logits are large: every loss is ~0."""
    gt_masks = [torch.ones(1, 40, 40, dtype=torch.bool)]
    boxes = torch.tensor([[5.0, 6.0, 30.0, 33.0], [1.5, 2.5, 38.0, 39.0]])
    logits = torch.full((2, 8, 8), 40.0)
    losses = MaskCriterion()(logits, torch.full((2,), 40.0), boxes, torch.tensor([0, 0]),
                             torch.tensor([0, 0]), gt_masks, generator=_gen(2))
    for name, value in losses.items():
        assert value.item() < 1e-6, name


def test_criterion_zero_positives_backprop():
    logits = torch.randn(3, 8, 8, requires_grad=True)
    iou_logits = torch.randn(3, requires_grad=True)
    losses = MaskCriterion()(logits, iou_logits, torch.zeros(3, 4),
                             torch.zeros(3, dtype=torch.long), torch.full((3,), -1),
                             [torch.zeros(0, 10, 10, dtype=torch.bool)])
    assert all(value.item() == 0 for value in losses.values())
    losses["loss"].backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert torch.equal(iou_logits.grad, torch.zeros_like(iou_logits))


def test_criterion_image_frame():
    gen = _gen(10)
    gt_masks = [torch.rand(2, 21, 30, generator=gen) > 0.5,
                torch.rand(1, 24, 25, generator=gen) > 0.5]
    logits = torch.randn(3, 6, 8, generator=gen, requires_grad=True)  # padded 24 x 32
    losses = MaskCriterion(point_fraction=0.5)(
        logits, torch.randn(3), torch.zeros(3, 4), torch.tensor([0, 0, 1]),
        torch.tensor([1, 0, 0]), gt_masks, "image", generator=_gen(3))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="frame"):
        MaskCriterion()(logits, None, torch.zeros(3, 4), torch.zeros(3, dtype=torch.long),
                        torch.zeros(3, dtype=torch.long), gt_masks, "pixels")


# ----------------------------------------------------------------------------- proposals


def _assign_brute_force(proposals, gts, crowd, threshold):
    out = []
    for p in proposals.tolist():
        best, best_j = -1.0, -1
        for j, g in enumerate(gts.tolist()):
            if crowd[j]:
                continue
            iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
            ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
            iou = inter / union
            if iou > best:
                best, best_j = iou, j
        out.append(best_j if best >= threshold else -1)
    return torch.tensor(out, dtype=torch.long)


def test_assign_proposals_matches_brute_force():
    gen = _gen(11)
    lo = torch.rand(40, 2, generator=gen) * 20
    proposals = torch.cat([lo, lo + torch.rand(40, 2, generator=gen) * 10 + 1], 1)
    gts = torch.cat([proposals[::5] + 0.7, proposals[:1] + 0.0], 0)
    crowd = torch.zeros(len(gts), dtype=torch.bool)
    crowd[[2, 8]] = True  # 8 is an exact copy of proposal 0
    for threshold in (0.3, 0.5, 0.7):
        got = assign_proposals(proposals, gts, crowd, threshold)
        assert torch.equal(got, _assign_brute_force(proposals, gts, crowd, threshold))


def test_assign_proposals_edges():
    gt = torch.tensor([[0.0, 0.0, 2.0, 1.0]])
    half = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.9, 1.0]])  # IoU 0.5 and 0.45
    assert assign_proposals(half, gt, torch.tensor([False])).tolist() == [0, -1]
    assert assign_proposals(half, gt, torch.tensor([True])).tolist() == [-1, -1]
    assert assign_proposals(half, torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool)).tolist() \
        == [-1, -1]
    assert assign_proposals(torch.zeros(0, 4), gt, torch.tensor([False])).shape == (0,)


def test_jitter_boxes_in_image_nondegenerate_reproducible():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 8.0], [30.0, 20.0, 40.0, 30.0], [5.0, 5.0, 5.0, 5.0],
                          [39.8, 29.9, 40.0, 30.0], [12.0, 7.0, 25.0, 19.0]])
    out = jitter_boxes(boxes, (30, 40), scale=0.4, generator=_gen(12))
    assert bool((out[:, :2] >= 0).all()) and bool((out[:, 2] <= 40).all())
    assert bool((out[:, 3] <= 30).all())
    assert bool((out[:, 2:] - out[:, :2] >= 1.0 - 1e-6).all())
    assert torch.equal(out, jitter_boxes(boxes, (30, 40), scale=0.4, generator=_gen(12)))
    assert not torch.equal(out, jitter_boxes(boxes, (30, 40), scale=0.4, generator=_gen(13)))
    # a moderate box moves, by at most scale * its size per coordinate
    moved = (out[4] - boxes[4]).abs()
    assert bool((moved > 0).all()) and bool((moved <= 0.4 * 13 + 1e-6).all())
    with pytest.raises(ValueError, match="scale"):
        jitter_boxes(boxes, (30, 40), scale=0.5)


def test_point_fraction_one_is_the_dense_loss_on_every_cell():
    """Dense loss (no sampling): BCE over all S x S cells against the RoI-aligned target."""
    from frozenseg.head.loss import MaskCriterion

    torch.manual_seed(0)
    s = 8
    logits = torch.randn(2, s, s, dtype=torch.float32)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0]])
    masks = torch.zeros(1, 16, 32, dtype=torch.bool)
    masks[0, 4:12, 6:20] = True
    criterion = MaskCriterion(point_fraction=1.0)
    losses = criterion(logits, None, boxes, torch.zeros(2, dtype=torch.long),
                       torch.zeros(2, dtype=torch.long), [masks])
    # Cell (i, j) of box b covers the 2x2 pixels at (y0 + 2i, x0 + 2j): its centre is a pixel
    # corner, where bilinear sampling of the 0/1 mask averages those four pixels.
    expected = []
    for b, (x0, y0) in enumerate(((0, 0), (8, 0))):
        mask = masks[0].double()
        cells = torch.stack([torch.stack([
            mask[y0 + 2 * i : y0 + 2 * i + 2, x0 + 2 * j : x0 + 2 * j + 2].mean()
            for j in range(s)]) for i in range(s)])
        expected.append(torch.nn.functional.binary_cross_entropy_with_logits(
            logits[b].double(), cells, reduction="none").mean())
    torch.testing.assert_close(losses["loss_mask_bce"].double(), torch.stack(expected).mean(),
                               rtol=1e-5, atol=1e-6)
