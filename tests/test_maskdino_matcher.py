"""Mask DINO's hybrid matcher against obvious cases, float64 loops and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from frozenseg.losses import point_sample
from frozenseg.maskdino.matcher import HybridMatcher, MatchCostWeights
from tests.reference import giou_cxcywh

NUM_CLASSES = 6
POINTS = 400  # enough points for the tests' masks; the default 12544 is for training


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rect_mask(size: int, x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
    """(size, size) bool, True where the pixel centre lies in the normalised rectangle."""
    centres = (torch.arange(size) + 0.5) / size
    inside_x = (centres >= x0) & (centres < x1)
    inside_y = (centres >= y0) & (centres < y1)
    return inside_y[:, None] & inside_x[None, :]


def _targets(n: int, seed: int, size: int = 32, stuff: int = 0) -> dict:
    """n targets: random labels, cxcywh boxes, rectangle masks inside those boxes."""
    g = _gen(seed)
    centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
    wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
    boxes = torch.cat([centre, wh], 1)
    masks = torch.stack([_rect_mask(size, *(b[:2] - b[2:] / 2), *(b[:2] + b[2:] / 2))
                         for b in boxes]) if n else torch.zeros(0, size, size, dtype=torch.bool)
    isthing = torch.ones(n, dtype=torch.bool)
    isthing[:stuff] = False
    return {"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "boxes": boxes,
            "masks": masks, "isthing": isthing}


def _random_predictions(q: int, seed: int, size: int = 16):
    g = _gen(seed)
    logits = 2 * torch.randn(1, q, NUM_CLASSES, generator=g)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(1, q, 2, generator=g),
                       0.05 + 0.4 * torch.rand(1, q, 2, generator=g)], -1)
    masks = 3 * torch.randn(1, q, size, size, generator=g)
    return logits, boxes, masks


# ----------------------------------------------------------------------------- references



def _focal64(logit: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    return (alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
            - (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8))


def _mask_costs64(logits: torch.Tensor, target: torch.Tensor,
                  coords: torch.Tensor) -> tuple[float, float]:
    """BCE and dice of one (h, w) logit map vs one (H, W) mask at coords (P, 2), float64."""
    coords = coords.double()[None]
    x = point_sample(logits.double()[None, None], coords)[0, 0].tolist()
    t = point_sample(target.double()[None, None], coords)[0, 0].tolist()
    bce = sum(max(xi, 0) - xi * ti + math.log1p(math.exp(-abs(xi)))
              for xi, ti in zip(x, t, strict=True)) / len(x)
    probs = [1 / (1 + math.exp(-xi)) for xi in x]
    overlap = 2 * sum(p * ti for p, ti in zip(probs, t, strict=True))
    dice = 1 - (overlap + 1) / (sum(probs) + sum(t) + 1)
    return bce, dice


def _reference_cost(logits, boxes, masks, target, coords, weights) -> torch.Tensor:
    """The total cost (Q, n) of one image by an explicit float64 loop over pairs."""
    q, n = len(logits), len(target["labels"])
    cost = torch.zeros(q, n, dtype=torch.float64)
    box_part = torch.zeros(q, n, dtype=torch.float64)
    for i, j in itertools.product(range(q), range(n)):
        label = int(target["labels"][j])
        pred_box, gt_box = boxes[i].double().tolist(), target["boxes"][j].double().tolist()
        l1 = sum(abs(a - b) for a, b in zip(pred_box, gt_box, strict=True))
        box_part[i, j] = weights.l1 * l1 - weights.giou * giou_cxcywh(pred_box, gt_box)
        cost[i, j] = weights.cls * _focal64(float(logits[i, label]))
        if masks is not None:
            bce, dice = _mask_costs64(masks[i], target["masks"][j], coords)
            cost[i, j] += weights.mask_bce * bce + weights.mask_dice * dice
    things = target["isthing"]
    if not bool(things.all()):  # decoupled stuff boxes: the mean of the things' box cost
        box_part[:, ~things] = box_part[:, things].mean() if bool(things.any()) else 0.0
    return cost + box_part


def _brute_force_minimum(cost: torch.Tensor) -> float:
    """Cheapest one-to-one assignment of min(Q, n) pairs, by enumeration."""
    q, n = cost.shape
    if q >= n:
        return min(sum(float(cost[rows[j], j]) for j in range(n))
                   for rows in itertools.permutations(range(q), n))
    return min(sum(float(cost[i, cols[i]]) for i in range(q))
               for cols in itertools.permutations(range(n), q))


# ----------------------------------------------------------------------------- tests


def test_permuted_targets_are_matched_back():
    target = _targets(4, seed=0)
    perm = torch.tensor([2, 0, 3, 1])  # prediction i copies target perm[i]
    logits = torch.full((1, 4, NUM_CLASSES), -6.0)
    logits[0, torch.arange(4), target["labels"][perm]] = 6.0
    boxes = target["boxes"][perm][None]
    # Mask logits at half the target resolution: the two maps span the same image.
    small = target["masks"][perm].float().reshape(4, 16, 2, 16, 2).mean((2, 4))
    masks = (20 * small - 10)[None]
    pred_idx, tgt_idx = HybridMatcher(num_points=POINTS)(
        logits, boxes, [target], masks, generator=_gen(0))[0]
    assert pred_idx.tolist() == [0, 1, 2, 3]
    assert tgt_idx.tolist() == perm.tolist()
    assert pred_idx.dtype == tgt_idx.dtype == torch.int64


@pytest.mark.parametrize("queries,targets,stuff", [(5, 4, 0), (4, 4, 1), (3, 5, 2), (5, 2, 1)])
def test_matches_brute_force_on_float64_reference(queries, targets, stuff):
    weights = MatchCostWeights()
    matcher = HybridMatcher(weights=weights, num_points=POINTS)
    target = _targets(targets, seed=queries * 10 + targets, stuff=stuff)
    logits, boxes, masks = _random_predictions(queries, seed=targets)
    pred_idx, tgt_idx = matcher(logits, boxes, [target], masks, generator=_gen(7))[0]
    coords = matcher.sample_points(_gen(7), torch.device("cpu"))  # the matcher's points
    reference = _reference_cost(logits[0], boxes[0], masks[0], target, coords, weights)
    ours = matcher.cost_matrix(logits[0], boxes[0], target, masks[0], generator=_gen(7))
    torch.testing.assert_close(ours.double(), reference, atol=1e-4, rtol=1e-5)
    assert len(pred_idx) == min(queries, targets)
    assert len(set(pred_idx.tolist())) == len(set(tgt_idx.tolist())) == len(pred_idx)
    total = float(reference[pred_idx, tgt_idx].sum())
    assert total == pytest.approx(_brute_force_minimum(reference), abs=1e-4)


def test_mask_costs_use_one_point_set_for_predictions_and_targets():
    # Targets at 4x the prediction's resolution, float and bool: both sides must be read
    # at the same normalised points, which a per-pair float64 loop on those points checks.
    matcher = HybridMatcher(num_points=64)
    target = _targets(3, seed=3, size=64)
    logits, boxes, masks = _random_predictions(4, seed=3, size=16)
    coords = matcher.sample_points(_gen(1), torch.device("cpu"))
    costs = matcher.named_costs(logits[0], boxes[0], target, masks[0], generator=_gen(1))
    soft = dict(target, masks=target["masks"].double())
    costs_float = matcher.named_costs(logits[0], boxes[0], soft, masks[0], generator=_gen(1))
    for i, j in itertools.product(range(4), range(3)):
        bce, dice = _mask_costs64(masks[0, i], target["masks"][j], coords)
        assert float(costs["mask_bce"][i, j]) == pytest.approx(bce, abs=1e-5)
        assert float(costs["mask_dice"][i, j]) == pytest.approx(dice, abs=1e-5)
    torch.testing.assert_close(costs["mask_bce"], costs_float["mask_bce"])
    torch.testing.assert_close(costs["mask_dice"], costs_float["mask_dice"])


def test_empty_targets_give_empty_indices():
    logits, boxes, masks = _random_predictions(5, seed=0)
    matcher = HybridMatcher(num_points=POINTS)
    for use_masks in (True, False):
        pred_idx, tgt_idx = matcher(logits, boxes, [_targets(0, seed=0)], masks,
                                    use_masks=use_masks)[0]
        assert pred_idx.shape == tgt_idx.shape == (0,)
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64


def test_more_targets_than_queries_uses_each_query_once():
    target = _targets(5, seed=4)
    logits, boxes, masks = _random_predictions(2, seed=4)
    pred_idx, tgt_idx = HybridMatcher(num_points=POINTS)(logits, boxes, [target], masks)[0]
    assert pred_idx.tolist() == [0, 1]
    assert len(set(tgt_idx.tolist())) == 2 and all(0 <= t < 5 for t in tgt_idx.tolist())


def _stuff_scene(stuff_box: list[float], isthing_second: bool):
    """Target 0 a thing, target 1 stuff (or a thing); query 1 has target 1's mask a bit
    better, query 2 has a box on top of ``stuff_box``'s far-away position."""
    target = _targets(2, seed=5)
    target["labels"] = torch.tensor([1, 2])
    target["boxes"][1] = torch.tensor(stuff_box)
    target["isthing"] = torch.tensor([True, isthing_second])
    logits = torch.full((1, 3, NUM_CLASSES), -6.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 2] = 6.0
    boxes = torch.stack([target["boxes"][0], torch.tensor([0.4, 0.4, 0.3, 0.3]),
                         torch.tensor([0.9, 0.9, 0.1, 0.1])])[None]
    masks = (20 * target["masks"].float() - 10).reshape(2, 16, 2, 16, 2).mean((2, 4))
    masks = torch.stack([masks[0], masks[1], 0.7 * masks[1]])[None]
    return logits, boxes, masks, target


def test_stuff_targets_ignore_box_cost():
    matcher = HybridMatcher(num_points=POINTS)
    near, far = [0.4, 0.4, 0.3, 0.3], [0.9, 0.9, 0.1, 0.1]
    results = {}
    for name, box, isthing in (("stuff near", near, False), ("stuff far", far, False),
                               ("thing far", far, True)):
        logits, boxes, masks, target = _stuff_scene(box, isthing)
        pred_idx, tgt_idx = matcher(logits, boxes, [target], masks, generator=_gen(0))[0]
        results[name] = dict(zip(tgt_idx.tolist(), pred_idx.tolist(), strict=True))
    assert results["stuff near"] == results["stuff far"] == {0: 0, 1: 1}
    assert results["thing far"] == {0: 0, 1: 2}  # a thing's box does count


def test_stuff_box_cost_is_the_things_mean():
    target = _targets(3, seed=6, stuff=1)
    logits, boxes, _ = _random_predictions(4, seed=6)
    costs = HybridMatcher().named_costs(logits[0], boxes[0], target)
    for name in ("l1", "giou"):
        expected = costs[name][:, 1:].mean()
        torch.testing.assert_close(costs[name][:, 0], expected.expand(4))
    assert set(costs) == {"cls", "l1", "giou"}  # no masks given: box-only


def test_box_only_matching_and_flag_checks():
    target = _targets(3, seed=8)
    logits, boxes, masks = _random_predictions(4, seed=8)
    matcher = HybridMatcher(num_points=POINTS)
    with pytest.raises(ValueError, match="pred_masks"):
        matcher(logits, boxes, [target])
    box_only = matcher(logits, boxes, [dict(target, masks=None)], use_masks=False)[0]
    weights = MatchCostWeights(mask_bce=0.0, mask_dice=0.0)
    zero_mask_weight = HybridMatcher(weights=weights, num_points=POINTS)(
        logits, boxes, [target], masks)[0]
    assert [t.tolist() for t in box_only] == [t.tolist() for t in zero_mask_weight]


def test_reproducible_and_computed_in_float32():
    target = _targets(4, seed=9)
    logits, boxes, masks = _random_predictions(6, seed=9)
    matcher = HybridMatcher(num_points=POINTS)
    a = matcher.cost_matrix(logits[0], boxes[0], target, masks[0], generator=_gen(3))
    b = matcher.cost_matrix(logits[0], boxes[0], target, masks[0], generator=_gen(3))
    c = matcher.cost_matrix(logits[0], boxes[0], target, masks[0], generator=_gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    half = matcher.cost_matrix(logits[0].bfloat16(), boxes[0].bfloat16(), target,
                               masks[0].bfloat16(), generator=_gen(3))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, a, atol=0.2, rtol=0.05)


def test_batch_gives_the_same_answer_as_singles():
    targets = [_targets(3, seed=10), _targets(0, seed=11), _targets(2, seed=12, stuff=1)]
    preds = [_random_predictions(4, seed=s) for s in (10, 11, 12)]
    logits, boxes, masks = (torch.cat(parts) for parts in zip(*preds, strict=True))
    matcher = HybridMatcher(num_points=POINTS)
    batch = matcher(logits, boxes, targets, masks, generator=_gen(5))
    g = _gen(5)  # singles in image order draw the same points from one stream
    for b, target in enumerate(targets):
        single = matcher(logits[b:b + 1], boxes[b:b + 1], [target], masks[b:b + 1],
                         generator=g)[0]
        assert [t.tolist() for t in single] == [t.tolist() for t in batch[b]]
