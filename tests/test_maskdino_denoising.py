"""Contrastive (and mask) denoising queries: groups, noise bands, attention mask, metadata."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert

from frozenseg.maskdino.denoising import ContrastiveDenoising, DenoisingQueries, attention_mask

NUM_CLASSES = 10
QUERIES = 7


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _targets(counts: list[int], seed: int = 0) -> list[dict]:
    """Boxes well inside the image (|shift| <= 0.8 * half size never reaches an edge)."""
    g = _gen(seed)
    targets = []
    for n in counts:
        centre = 0.4 + 0.2 * torch.rand(n, 2, generator=g)
        wh = 0.05 + 0.15 * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([centre, wh], 1)})
    return targets


def _builder(**kwargs) -> ContrastiveDenoising:
    return ContrastiveDenoising(num_classes=NUM_CLASSES, num_queries=QUERIES, **kwargs)


@pytest.mark.parametrize("counts,total,groups", [
    ([1], 100, 100), ([3, 1], 100, 33), ([100], 100, 1), ([150, 2], 100, 1),
    ([7, 0, 4], 10, 1), ([4, 5], 20, 4), ([2], 1, 1),
])
def test_dynamic_group_count(counts, total, groups):
    dn = _builder(num_denoising=total)(_targets(counts), generator=_gen(0))
    width = max(counts)
    assert dn.num_groups == groups
    assert dn.group_size == 2 * width and dn.pad_size == 2 * width * groups
    assert dn.labels.shape == dn.target_index.shape == (len(counts), dn.pad_size)
    assert dn.boxes.shape == (len(counts), dn.pad_size, 4)
    assert dn.attn_mask.shape == (dn.pad_size + QUERIES,) * 2
    # Every target appears once per group as a positive and once as a negative.
    assert dn.positive.sum(1).tolist() == [n * groups for n in counts]
    assert dn.negative.sum(1).tolist() == [n * groups for n in counts]


def _corner_shift_in_half_sizes(dn: DenoisingQueries, targets: list[dict]) -> torch.Tensor:
    """|corner shift| / (box_noise_scale * half size) of every valid query, (N, 4)."""
    ratios = []
    for b, target in enumerate(targets):
        valid = dn.valid[b]
        source = target["boxes"][dn.target_index[b, valid]]
        shift = (box_convert(dn.boxes[b, valid], "cxcywh", "xyxy")
                 - box_convert(source, "cxcywh", "xyxy")).abs()
        half = torch.cat([source[:, 2:], source[:, 2:]], 1) / 2
        ratios.append(shift / (0.4 * half))
    return torch.cat(ratios)


def test_positives_inside_lambda1_negatives_between_lambda1_and_lambda2():
    targets = _targets([5, 3, 8], seed=1)
    dn = _builder(box_noise_scale=0.4)(targets, generator=_gen(1))
    ratio = _corner_shift_in_half_sizes(dn, targets)
    kind = torch.cat([dn.positive[b, dn.valid[b]] for b in range(len(targets))])
    eps = 1e-3  # float32 rounding of the shifts, relative to half sizes of a few percent
    assert bool((ratio[kind] < 1 + eps).all())
    assert bool((ratio[~kind] >= 1 - eps).all()) and bool((ratio[~kind] < 2 + eps).all())
    # The bands are filled, not just respected: the draw is uniform over them.
    assert float(ratio[kind].max()) > 0.9 and float(ratio[~kind].max()) > 1.9


def test_boxes_are_clipped_to_the_image():
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.02, 0.98, 0.04, 0.04]])}]
    dn = _builder()(targets, generator=_gen(2))
    corners = box_convert(dn.boxes[dn.valid], "cxcywh", "xyxy")
    assert bool((corners >= 0).all() and (corners <= 1).all())
    assert bool((dn.boxes[dn.valid][:, 2:] > 0).all())


@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0])
def test_label_flip_rate(ratio):
    # 64 images x 100 targets x 2 queries: 12800 draws; flipped labels are redrawn
    # uniformly (the same class 1 time in K), so labels change with p (K - 1) / K.
    targets = _targets([100] * 64, seed=3)
    dn = _builder(num_denoising=100, label_noise_ratio=ratio)(targets, generator=_gen(3))
    original = torch.stack([t["labels"][dn.target_index[b]] for b, t in enumerate(targets)])
    changed = (dn.labels != original).double().mean().item()
    expected = 0.5 * ratio * (NUM_CLASSES - 1) / NUM_CLASSES
    sigma = (expected * (1 - expected) / dn.labels.numel()) ** 0.5
    assert abs(changed - expected) <= 4 * sigma + 1e-12
    assert bool((dn.labels >= 0).all() and (dn.labels < NUM_CLASSES).all())


def test_attention_mask_blocks_ground_truth_leaks_and_other_groups():
    dn = _builder(num_denoising=6)(_targets([2, 3]), generator=_gen(4))
    assert dn.num_groups == 2 and dn.group_size == 6
    mask, pad = dn.attn_mask, dn.pad_size
    assert mask.dtype == torch.bool
    assert bool(mask[pad:, :pad].all())  # matching queries cannot see denoising ones
    assert not bool(mask[pad:, pad:].any())  # matching queries see each other
    assert not bool(mask[:pad, pad:].any())  # denoising queries see matching ones
    for i in range(dn.num_groups):
        rows = slice(i * dn.group_size, (i + 1) * dn.group_size)
        for j in range(dn.num_groups):
            cols = slice(j * dn.group_size, (j + 1) * dn.group_size)
            assert bool(mask[rows, cols].all()) if i != j else not bool(mask[rows, cols].any())


def test_attention_mask_without_denoising_queries():
    assert not bool(attention_mask(0, 0, 5).any())
    assert attention_mask(3, 4, 2).shape == (14, 14)


def test_layout_positives_then_negatives_per_group():
    targets = _targets([2, 3], seed=5)
    dn = _builder(num_denoising=6, label_noise_ratio=0.0)(targets, generator=_gen(5))
    m = 3
    for g in range(dn.num_groups):
        start = g * 2 * m
        assert dn.target_index[0, start:start + 2 * m].tolist() == [0, 1, -1, 0, 1, -1]
        assert dn.target_index[1, start:start + 2 * m].tolist() == [0, 1, 2, 0, 1, 2]
        assert dn.positive[1, start:start + 2 * m].tolist() == [True] * 3 + [False] * 3
    # Without label noise every valid query carries its target's class; padding is -1.
    for b, target in enumerate(targets):
        valid = dn.valid[b]
        assert torch.equal(dn.labels[b, valid], target["labels"][dn.target_index[b, valid]])
        assert bool((dn.labels[b, ~valid] == -1).all())
        assert bool((dn.boxes[b, ~valid] == 0).all())


def test_indices_and_split_for_the_loss():
    targets = _targets([2, 0, 1], seed=6)
    dn = _builder(num_denoising=4)(targets, generator=_gen(6))
    indices = dn.indices()
    assert [len(q) for q, _ in indices] == [2 * dn.num_groups, 0, dn.num_groups]
    for b, (query, target) in enumerate(indices):
        assert query.dtype == target.dtype == torch.int64
        assert bool(dn.positive[b, query].all())
        assert torch.equal(target, dn.target_index[b, query])
    outputs = torch.randn(3, dn.pad_size + QUERIES, 5)
    denoising, matching = dn.split(outputs)
    assert denoising.shape == (3, dn.pad_size, 5) and matching.shape == (3, QUERIES, 5)


def test_images_without_targets():
    dn = _builder()(_targets([0, 4, 0]), generator=_gen(7))
    assert dn.num_groups == 25
    for b in (0, 2):
        assert not bool(dn.valid[b].any()) and not bool(dn.positive[b].any())
        assert bool((dn.labels[b] == -1).all())
    empty = _builder()(_targets([0, 0]), generator=_gen(7))
    assert empty.num_groups == empty.pad_size == 0
    assert empty.labels.shape == (2, 0) and empty.boxes.shape == (2, 0, 4)
    assert empty.attn_mask.shape == (QUERIES, QUERIES) and not bool(empty.attn_mask.any())
    assert [len(q) for q, _ in empty.indices()] == [0, 0]
    assert _builder(num_denoising=0)(_targets([3]), generator=_gen(7)).pad_size == 0


def test_reproducible_with_a_generator():
    targets = _targets([3, 5], seed=8)
    a = _builder()(targets, generator=_gen(9))
    b = _builder()(targets, generator=_gen(9))
    c = _builder()(targets, generator=_gen(10))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.boxes, c.boxes)


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="labels"):
        _builder()([{"labels": torch.tensor([NUM_CLASSES]), "boxes": torch.rand(1, 4)}])
    with pytest.raises(ValueError, match="boxes"):
        _builder()([{"labels": torch.tensor([1]), "boxes": torch.rand(2, 4)}])
    with pytest.raises(ValueError, match="label_noise_ratio"):
        _builder(label_noise_ratio=3.0)
