"""Mask DINO's criterion against perfect predictions, float64 loops and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from frozenseg.losses import point_sample, uncertain_point_coords
from frozenseg.maskdino.criterion import LossWeights, MaskDINOCriterion
from frozenseg.maskdino.denoising import ContrastiveDenoising, DenoisingQueries, attention_mask
from frozenseg.maskdino.matcher import HybridMatcher
from frozenseg.maskdino.outputs import MaskDINOOutput, Predictions
from tests.reference import giou_cxcywh

K = 5  # classes
SIZE = 64  # full-resolution padded batch; predicted masks are SIZE / 4
POINTS = 256
BIG = 20.0  # a confident logit
TERMS = ("cls", "l1", "giou", "mask_bce", "mask_dice")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _target(rects: list[tuple[int, int, int, int]], labels: list[int], stuff: int = 0,
            size: int = SIZE) -> dict:
    """Targets from rectangles (x0, y0, x1, y1) in 4-pixel cells: their masks are constant
    on every cell of the predicted map; the first ``stuff`` targets are stuff."""
    n = len(rects)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        masks[i, 4 * y0:4 * y1, 4 * x0:4 * x1] = True
        boxes[i] = torch.tensor([x0 + x1, y0 + y1, 2 * (x1 - x0), 2 * (y1 - y0)]) * 2 / size
    isthing = torch.arange(n) >= stuff
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": boxes, "masks": masks,
            "isthing": isthing}


def _two_images() -> list[dict]:
    return [_target([(2, 2, 10, 8), (0, 8, 16, 16)], [1, 3], stuff=1),
            _target([(4, 4, 14, 14)], [0])]


def _perfect(targets: list[dict], queries: int) -> Predictions:
    """Query j of each image copies target j exactly; the other queries say background."""
    logits = torch.full((len(targets), queries, K), -BIG)
    boxes = torch.tensor([0.5, 0.5, 0.2, 0.2]).repeat(len(targets), queries, 1)
    masks = torch.full((len(targets), queries, SIZE // 4, SIZE // 4), -BIG)
    for b, target in enumerate(targets):
        n = len(target["labels"])
        logits[b, torch.arange(n), target["labels"]] = BIG
        boxes[b, :n] = target["boxes"]
        cells = target["masks"].float().reshape(n, SIZE // 4, 4, SIZE // 4, 4).mean((2, 4))
        masks[b, :n] = BIG * (2 * cells - 1)
    return Predictions(logits, boxes, masks)


def _random(batch: int, queries: int, seed: int, size: int = SIZE // 4) -> Predictions:
    g = _gen(seed)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(batch, queries, 2, generator=g),
                       0.1 + 0.4 * torch.rand(batch, queries, 2, generator=g)], -1)
    return Predictions(2 * torch.randn(batch, queries, K, generator=g), boxes,
                       3 * torch.randn(batch, queries, size, size, generator=g))


def _output(layers: list[Predictions], encoder: Predictions | None = None,
            denoising: list[Predictions] | None = None,
            dn: DenoisingQueries | None = None, size: int = SIZE) -> MaskDINOOutput:
    batch = layers[0].logits.shape[0]
    return MaskDINOOutput(layers=layers, encoder=encoder or layers[-1], denoising=denoising,
                          dn=dn, image_sizes=torch.tensor([[size, size]] * batch),
                          padded_size=(size, size))


def _grad(p: Predictions) -> Predictions:
    return Predictions(*(t.clone().requires_grad_(True) for t in (p.logits, p.boxes, p.masks)))


class FixedMatcher(HybridMatcher):
    """Returns the given per-image (query, target) indices, drawing nothing."""

    def __init__(self, indices: list[tuple[list[int], list[int]]]) -> None:
        super().__init__()
        self.fixed = [(torch.tensor(q, dtype=torch.int64), torch.tensor(t, dtype=torch.int64))
                      for q, t in indices]

    def forward(self, *args, **kwargs):
        return self.fixed


# ----------------------------------------------------------------------------- references


def _focal64(logit: float, t: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """-alpha_t (1 - p_t)^gamma log p_t, from the formula."""
    p = 1 / (1 + math.exp(-logit))
    p_t = p if t else 1 - p
    alpha_t = alpha if t else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)



def _class_reference(logits: torch.Tensor, assigned: dict, norm: float,
                     valid: torch.Tensor | None = None) -> float:
    """Focal loss summed over (valid) queries and classes; assigned: (b, q) -> class."""
    total = 0.0
    for b, q, k in torch.cartesian_prod(*(torch.arange(s) for s in logits.shape)).tolist():
        if valid is None or bool(valid[b, q]):
            total += _focal64(float(logits[b, q, k]), assigned.get((b, q)) == k)
    return total / norm


def _box_reference(boxes: torch.Tensor, targets: list[dict], pairs) -> tuple[float, float]:
    """Summed L1 and 1 - GIoU over (b, q, t) pairs of thing targets, float64."""
    l1 = giou = 0.0
    for b, q, t in pairs:
        if bool(targets[b]["isthing"][t]):
            pred, gt = boxes[b, q].double().tolist(), targets[b]["boxes"][t].double().tolist()
            l1 += sum(abs(x - y) for x, y in zip(pred, gt, strict=True))
            giou += 1 - giou_cxcywh(pred, gt)
    return l1, giou


def _mask_reference(masks: torch.Tensor, targets: list[dict], pairs,
                    coords: torch.Tensor) -> tuple[float, float]:
    """Summed point BCE (mean over points) and dice over pairs, float64; coords (N, P, 2)
    over the predicted map, which spans 4 h x 4 w target pixels."""
    bce = dice = 0.0
    for i, (b, q, t) in enumerate(pairs):
        target = targets[b]["masks"][t].double()
        scale = torch.tensor([4 * masks.shape[-1] / target.shape[1],
                              4 * masks.shape[-2] / target.shape[0]], dtype=torch.float64)
        point = coords[i].double()[None]
        x = point_sample(masks[b, q].double()[None, None], point)[0, 0]
        y = point_sample(target[None, None], point * scale)[0, 0]
        bce += float((x.clamp(min=0) - x * y + (-x.abs()).exp().log1p()).mean())
        p = x.sigmoid()
        dice += float(1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1))
    return bce, dice


# ----------------------------------------------------------------------------- tests


def test_perfect_predictions_give_near_zero_loss_and_perturbations_raise_each_term():
    targets = _two_images()
    criterion = MaskDINOCriterion(K, num_points=POINTS, importance=0.0)
    perfect = _perfect(targets, queries=4)
    base = criterion(_output([perfect]), targets, generator=_gen(0))
    assert base["cls"] < 1e-6 and base["l1"] < 1e-6 and base["giou"] < 1e-5
    # Not zero: at a mask edge the prediction's logits ramp over its 4-pixel cells and
    # the target over one pixel, so bilinear reads disagree within a pixel of the edges.
    assert base["mask_bce"] < 0.1 and base["mask_dice"] < 0.03

    def perturbed(change) -> dict:
        p = Predictions(perfect.logits.clone(), perfect.boxes.clone(), perfect.masks.clone())
        change(p)
        return criterion(_output([p]), targets, generator=_gen(0))

    cls = perturbed(lambda p: p.logits[0, 0, 1].fill_(0.0))
    box = perturbed(lambda p: p.boxes[1, 0, :2].add_(0.05))
    mask = perturbed(lambda p: p.masks[0, 0, 3:6, 3:6].neg_())
    for losses, moved in ((cls, {"cls"}), (box, {"l1", "giou"}),
                          (mask, {"mask_bce", "mask_dice"})):
        for term in TERMS:
            if term in moved:
                assert losses[term] > base[term] + 1e-3, term
            else:
                assert losses[term] == pytest.approx(float(base[term]), abs=1e-7), term


def test_class_loss_equals_float64_focal_loop():
    targets = _two_images()
    # Image 0: target 1 matched to query 3, target 0 left unmatched (still normalises).
    indices = [([3], [1]), ([0], [0])]
    criterion = MaskDINOCriterion(K, matcher=FixedMatcher(indices), num_points=16)
    predictions = _random(2, 4, seed=1)
    losses = criterion(_output([predictions]), targets)
    assigned = {(0, 3): 3, (1, 0): 0}
    expected = _class_reference(predictions.logits, assigned, norm=3)
    assert float(losses["cls"]) == pytest.approx(expected, rel=1e-5)


def test_box_losses_equal_float64_reference_for_things_only():
    targets = _two_images()  # image 0: target 0 stuff, target 1 thing
    indices = [([2, 0], [0, 1]), ([1], [0])]
    criterion = MaskDINOCriterion(K, matcher=FixedMatcher(indices), num_points=16)
    predictions = _random(2, 3, seed=2)
    losses = criterion(_output([predictions]), targets)
    l1, giou = _box_reference(predictions.boxes, targets, [(0, 2, 0), (0, 0, 1), (1, 1, 0)])
    assert float(losses["l1"]) == pytest.approx(l1 / 2, rel=1e-5)  # two thing targets
    assert float(losses["giou"]) == pytest.approx(giou / 2, rel=1e-5)


def test_moving_a_stuff_box_changes_nothing():
    targets = _two_images()
    criterion = MaskDINOCriterion(K, num_points=POINTS)
    output = _output([_random(2, 4, seed=3), _random(2, 4, seed=4)], _random(2, 4, seed=5))
    before = criterion(output, targets, generator=_gen(1))
    targets[0]["boxes"][0] = torch.tensor([0.9, 0.1, 0.05, 0.05])
    after = criterion(output, targets, generator=_gen(1))
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


@pytest.mark.parametrize("size", [SIZE, SIZE - 2])  # SIZE - 2: the map reaches past the batch
@pytest.mark.parametrize("soft", [False, True])
def test_mask_losses_equal_float64_reference_on_the_same_points(size, soft):
    targets = _two_images()
    for target in targets:
        target["masks"] = target["masks"][:, :size, :size]
        if soft:
            target["masks"] = target["masks"].double() * 0.75
    indices = [([1, 2], [0, 1]), ([3], [0])]
    criterion = MaskDINOCriterion(K, matcher=FixedMatcher(indices), num_points=POINTS,
                                  importance=0.0)
    predictions = _random(2, 4, seed=6)
    losses = criterion(_output([predictions], size=size), targets, generator=_gen(7))
    # Importance 0: the candidates are drawn and dropped, then the points are uniform.
    coords = uncertain_point_coords(torch.zeros(3, 1, SIZE // 4, SIZE // 4), POINTS, importance=0.0,
                                    generator=_gen(7))
    bce, dice = _mask_reference(predictions.masks, targets, [(0, 1, 0), (0, 2, 1), (1, 3, 0)],
                                coords)
    assert float(losses["mask_bce"]) == pytest.approx(bce / 3, rel=1e-5)
    assert float(losses["mask_dice"]) == pytest.approx(dice / 3, rel=1e-5)


def _hand_made_denoising(queries: int) -> DenoisingQueries:
    """One group, m = 2: image 0 has targets 0, 1; image 1 has target 0 and padding."""
    target_index = torch.tensor([[0, 1, 0, 1], [0, -1, 0, -1]])
    positive = torch.tensor([[True, True, False, False], [True, False, False, False]])
    return DenoisingQueries(
        labels=torch.tensor([[1, 3, 1, 3], [0, -1, 0, -1]]), boxes=torch.rand(2, 4, 4),
        attn_mask=attention_mask(1, 4, queries), positive=positive,
        negative=(target_index >= 0) & ~positive, target_index=target_index, num_groups=1,
        group_size=4, pad_size=4, num_queries=queries)


def _denoising_predictions(targets: list[dict]) -> Predictions:
    """Positives reconstruct their targets, negatives say background, padding is garbage."""
    perfect = _perfect(targets, queries=2)  # query j copies target j
    garbage = _random(2, 4, seed=8)
    logits = torch.cat([perfect.logits, torch.full((2, 2, K), -BIG)], 1)
    boxes = torch.cat([perfect.boxes, garbage.boxes[:, 2:]], 1)
    masks = torch.cat([perfect.masks, garbage.masks[:, 2:]], 1)
    padding = [1, 3]  # of image 1
    logits[1, padding] = BIG
    boxes[1, padding] = garbage.boxes[1, padding]
    masks[1, padding] = garbage.masks[1, padding]
    return Predictions(logits, boxes, masks)


def test_denoising_positives_reconstruct_negatives_background_padding_excluded():
    targets = _two_images()
    dn = _hand_made_denoising(queries=4)
    criterion = MaskDINOCriterion(K, num_points=POINTS, importance=0.0)
    matched = _perfect(targets, queries=4)
    good = _denoising_predictions(targets)
    losses = criterion(_output([matched, matched], denoising=[good, good], dn=dn), targets,
                       generator=_gen(2))
    for suffix in ("_dn", "_dn_0"):
        assert losses["cls" + suffix] < 1e-6  # padding says +BIG everywhere: not counted
        assert losses["l1" + suffix] < 1e-6 and losses["giou" + suffix] < 1e-5
        assert losses["mask_bce" + suffix] < 0.1 and losses["mask_dice" + suffix] < 0.03
    # A negative that claims class 2: (1 - alpha) * BIG (its BCE) over 3 positives.
    bad = _denoising_predictions(targets)
    bad.logits[0, 2, 2] = BIG
    worse = criterion(_output([matched], denoising=[bad], dn=dn), targets, generator=_gen(2))
    assert float(worse["cls_dn"]) == pytest.approx(0.75 * BIG / 3, rel=1e-4)


def test_denoising_terms_equal_float64_references():
    targets = _two_images()
    dn = _hand_made_denoising(queries=4)
    criterion = MaskDINOCriterion(K, matcher=FixedMatcher([([], []), ([], [])]),
                                  num_points=POINTS, importance=0.0)
    predictions = _random(2, 4, seed=9)
    losses = criterion(_output([_random(2, 4, seed=10)], denoising=[predictions], dn=dn),
                       targets, generator=_gen(3))
    assigned = {(0, 0): 1, (0, 1): 3, (1, 0): 0}  # positives get their targets' true labels
    expected = _class_reference(predictions.logits, assigned, norm=3, valid=dn.valid)
    assert float(losses["cls_dn"]) == pytest.approx(expected, rel=1e-5)
    pairs = [(0, 0, 0), (0, 1, 1), (1, 0, 0)]
    l1, giou = _box_reference(predictions.boxes, targets, pairs)  # two thing positives
    assert float(losses["l1_dn"]) == pytest.approx(l1 / 2, rel=1e-5)
    assert float(losses["giou_dn"]) == pytest.approx(giou / 2, rel=1e-5)
    # Draws: the matched layer (no pairs: no draws), the encoder (the same), then dn.
    coords = uncertain_point_coords(torch.zeros(3, 1, SIZE // 4, SIZE // 4), POINTS, importance=0.0,
                                    generator=_gen(3))
    bce, dice = _mask_reference(predictions.masks, targets, pairs, coords)
    assert float(losses["mask_bce_dn"]) == pytest.approx(bce / 3, rel=1e-5)
    assert float(losses["mask_dice_dn"]) == pytest.approx(dice / 3, rel=1e-5)


def test_empty_targets_are_finite_differentiable_and_class_only():
    empty = _target([], [])
    targets = [empty, dict(empty)]
    layers = [_grad(_random(2, 3, seed=s)) for s in range(2)]
    encoder = _grad(_random(2, 3, seed=2))
    losses = MaskDINOCriterion(K, num_points=POINTS)(_output(layers, encoder), targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name, value in losses.items():
        if name == "loss" or name.startswith("cls"):
            assert value > 0, name
        else:
            assert value == 0, name
    assert layers[0].logits.grad is not None and torch.isfinite(layers[0].logits.grad).all()
    assert layers[0].masks.grad is not None and encoder.boxes.grad is not None


def test_gradients_flow_to_every_set_and_skip_padding():
    targets = [_target([(2, 2, 10, 8), (0, 8, 16, 16), (6, 0, 12, 6)], [1, 3, 4], stuff=1),
               _target([], [])]  # one image without targets: its dn slots are all padding
    dn = ContrastiveDenoising(num_classes=K, num_queries=4, num_denoising=4)(
        targets, generator=_gen(4))
    layers = [_grad(_random(2, 4, seed=s)) for s in range(3)]
    encoder = _grad(_random(2, 4, seed=3))
    denoising = [_grad(_random(2, dn.pad_size, seed=4 + s)) for s in range(3)]
    output = _output(layers, encoder, denoising, dn)
    losses = MaskDINOCriterion(K, num_points=POINTS)(output, targets, generator=_gen(5))
    losses["loss"].backward()
    for p in [*layers, encoder, *denoising]:
        for tensor in (p.logits, p.boxes, p.masks):
            assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
            assert tensor.grad.abs().sum() > 0
    for p in denoising:  # padding queries are in no loss
        assert p.logits.grad[~dn.valid].abs().sum() == 0
        assert p.masks.grad[~dn.positive].abs().sum() == 0


def test_names_and_weighted_total():
    targets = _two_images()
    dn = _hand_made_denoising(queries=4)
    layers = [_random(2, 4, seed=s) for s in range(3)]
    output = _output(layers, _random(2, 4, seed=3), [_random(2, 4, seed=4 + s) for s in range(3)],
                     dn)
    weights = LossWeights(cls=1.0, l1=2.0, giou=3.0, mask_bce=4.0, mask_dice=5.0)
    losses = MaskDINOCriterion(K, weights=weights, num_points=POINTS)(output, targets)
    suffixes = ["", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1"]
    assert set(losses) == {"loss"} | {t + s for t in TERMS for s in suffixes}
    total = sum(getattr(weights, t) * losses[t + s] for t in TERMS for s in suffixes)
    torch.testing.assert_close(losses["loss"], total)


def test_sets_without_masks_have_no_mask_terms():
    targets = _two_images()
    boxes_only = _random(2, 4, seed=11)
    boxes_only.masks = None
    output = _output([_random(2, 4, seed=12)], boxes_only)
    losses = MaskDINOCriterion(K, num_points=POINTS)(output, targets)
    assert "mask_bce_enc" not in losses and "l1_enc" in losses and "mask_bce" in losses
    assert torch.isfinite(losses["loss"])


def test_target_masks_at_the_wrong_resolution_are_refused():
    targets = _two_images()
    for target in targets:
        target["masks"] = target["masks"][:, ::2, ::2]  # the map's size x 2, not x 4
    with pytest.raises(ValueError, match="do not span"):
        MaskDINOCriterion(K, num_points=POINTS)(_output([_random(2, 4, seed=0)]), targets)
