"""Contrastive (and mask) denoising queries: groups, noise bands, attention mask, metadata."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from frozenseg.detector.transformer import MLP, Decoder, DecoderLayer
from frozenseg.maskdino.criterion import box_losses
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


def _inside_boxes(boxes: torch.Tensor, levels: list[tuple[int, int]]) -> torch.Tensor:
    """(B, n, 4) cxcywh -> (B, S, 1): 1 at the cell centres of every level inside a box."""
    corners = box_convert(boxes, "cxcywh", "xyxy")[:, :, None]  # (B, n, 1, 4)
    flat = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                indexing="ij")
        x, y = xs.flatten()[None, None], ys.flatten()[None, None]  # (1, 1, h w)
        inside = ((x >= corners[..., 0]) & (x <= corners[..., 2])
                  & (y >= corners[..., 1]) & (y <= corners[..., 3]))
        flat.append(inside.any(1).float())
    return torch.cat(flat, 1)[..., None]


def test_the_decoder_learns_to_denoise_boxes_the_memory_shows():
    """The box path end to end, DINO's way (CDN queries, per-layer box heads from zero
    deltas, look forward twice): when the memory plainly marks the objects, a small
    decoder trained on the denoising loss alone brings its positives' boxes well inside
    the noise they started from. A decoder that cannot learn to move a box (a broken
    reference scaling, refinement or gradient) stays at the noise level."""
    torch.manual_seed(0)
    dim, levels, batch, objects = 32, [(32, 32), (16, 16)], 8, 2
    shapes = levels
    decoder = Decoder(layers=[DecoderLayer(dim=dim, ffn_dim=64, levels=2, heads=4, points=4)
                              for _ in range(2)],
                      dim=dim, norm=True, ref_point_head=True, inverse_sigmoid_eps=1e-3,
                      look_forward_twice=True)
    box_heads = nn.ModuleList(MLP(in_dim=dim, hidden_dim=dim, out_dim=4, num_layers=3)
                              for _ in range(2))
    for head in box_heads:
        nn.init.zeros_(head.layers[-1].weight)
        nn.init.zeros_(head.layers[-1].bias)
    embed, content = nn.Linear(1, dim), nn.Parameter(torch.randn(dim))
    denoising = ContrastiveDenoising(num_classes=1, num_queries=0, num_denoising=8)
    params = [*decoder.parameters(), *box_heads.parameters(), *embed.parameters(), content]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = _gen(0)

    def loss_and_noise() -> tuple[torch.Tensor, float, float]:
        """(training loss, GIoU loss of the noised boxes, of the last layer's)."""
        boxes = torch.cat([0.25 + 0.5 * torch.rand(batch, objects, 2, generator=g),
                           0.15 + 0.25 * torch.rand(batch, objects, 2, generator=g)], -1)
        dn = denoising([{"labels": torch.zeros(objects, dtype=torch.int64), "boxes": b}
                        for b in boxes], generator=g)
        memory = embed(_inside_boxes(boxes, levels))
        states, references = decoder(
            content.expand(batch, dn.pad_size, -1) * dn.valid[..., None], dn.boxes, memory,
            torch.zeros(memory.shape[:2], dtype=torch.bool), shapes,
            torch.ones(batch, 2, 2), bbox_embed=box_heads, self_attn_mask=dn.attn_mask)
        wanted = boxes.gather(1, dn.target_index.clamp(min=0)[..., None].expand(-1, -1, 4))
        positive = dn.positive
        total = 0.0
        for state, reference, head in zip(states, references, box_heads, strict=True):
            predicted = decoder.refine(reference, head(state))
            terms = box_losses(predicted[positive], wanted[positive])
            total = total + (5 * terms["l1"] + 2 * terms["giou"]) / positive.sum()
        noise = box_losses(dn.boxes[positive], wanted[positive])["giou"] / positive.sum()
        return total, float(noise), float(terms["giou"].detach() / positive.sum())

    for _ in range(200):
        loss, noise, last = loss_and_noise()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        noise, last = torch.tensor([loss_and_noise()[1:] for _ in range(4)]).mean(0).tolist()
    assert last < 0.7 * noise, f"last layer GIoU loss {last:.3f}, noise {noise:.3f}"
