"""The mask head network: the training-free baseline against eq. 1-4, batch == singles on
padded batches, parameter counts per switch, gradients, query selection, O2O isolation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from frozenseg.detector.output import DetectorOutput
from frozenseg.detector.transformer import EncoderLayer
from frozenseg.head import HeadConfig, build_mask_head, count_parameters, estimate_flops
from frozenseg.head.encoders import QueryFeatureEncoder
from frozenseg.head.network import PAD_LOGIT

DIM, C1_DIM, LEVELS, K = 32, 32, 4, 5
SIZES = [(64, 96), (44, 70)]  # (H, W); the second is not a multiple of any stride
# Tiny versions of every switch; windows of 3 never divide the maps, so Swin pads.
TINY = dict(num_heads=2, ffn_dim=64, mapper_dim=16, roi_size=8, window_size=3)
VARIANTS = {
    "default": {},
    "swin": dict(image_encoder="swin", box_encoder="swin"),
    "convnext": dict(image_encoder="convnext", box_encoder="convnext"),
    "all-query-parts-segmenter": dict(query_ffn=True, query_self_attention=True,
                                      mask_head="segmenter", neck=False, mapper_dim=0),
}


def single_output(height: int, width: int, *, seed: int, c1_dim: int = C1_DIM,
                  dtype=torch.float32) -> DetectorOutput:
    """A one-image DetectorOutput with random tensors of consistent shapes, no padding."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(math.ceil(height / 2**s), math.ceil(width / 2**s)) for s in range(3, 3 + LEVELS)]
    tokens = sum(h * w for h, w in shapes)
    centre = 0.2 + 0.6 * torch.rand(1, K, 2, generator=g)
    size = 0.1 + 0.4 * torch.rand(1, K, 2, generator=g)
    return DetectorOutput(
        queries=torch.randn(1, K, DIM, generator=g, dtype=dtype),
        boxes=torch.cat([centre, size], -1).to(dtype),
        scores=torch.rand(1, K, generator=g, dtype=dtype),
        labels=torch.randint(0, 3, (1, K), generator=g),
        query_mask=torch.ones(1, K, dtype=torch.bool),
        memory=torch.randn(1, tokens, DIM, generator=g, dtype=dtype),
        memory_mask=torch.zeros(1, tokens, dtype=torch.bool),
        spatial_shapes=torch.tensor(shapes),
        level_start_index=torch.tensor([0] + [h * w for h, w in shapes]).cumsum(0)[:-1],
        valid_ratios=torch.ones(1, LEVELS, 2, dtype=dtype),
        c1=torch.randn(1, c1_dim, math.ceil(height / 4), math.ceil(width / 4), generator=g,
                       dtype=dtype),
        image_sizes=torch.tensor([[height, width]]),
    )


def pad_to(x: torch.Tensor, size: tuple[int, int], garbage: float) -> torch.Tensor:
    """(..., h, w) -> (..., H, W) with ``garbage`` on the bottom/right padding."""
    out = torch.full((*x.shape[:-2], *size), garbage, dtype=x.dtype)
    out[..., : x.shape[-2], : x.shape[-1]] = x
    return out


def batch_outputs(singles: list[DetectorOutput]) -> DetectorOutput:
    """Pad singles into one batch as the detector does; padding holds large garbage so any
    leak of it into valid outputs shows."""
    shapes = torch.stack([s.spatial_shapes for s in singles]).amax(0)
    memory, masks, ratios = [], [], []
    for s in singles:
        levels, level_masks = [], []
        for (h, w), start, (hp, wp) in zip(s.spatial_shapes.tolist(), s.level_start_index,
                                           shapes.tolist(), strict=True):
            level = s.memory[0, start : start + h * w].T.reshape(DIM, h, w)
            levels.append(pad_to(level, (hp, wp), 50.0).flatten(1).T)
            level_masks.append(pad_to(torch.zeros(h, w, dtype=torch.bool), (hp, wp), 1).flatten())
        memory.append(torch.cat(levels))
        masks.append(torch.cat(level_masks).bool())
        ratios.append(s.spatial_shapes.flip(-1) / shapes.flip(-1))
    c1_size = tuple(torch.tensor([s.c1.shape[-2:] for s in singles]).amax(0).tolist())
    cat = lambda name: torch.cat([getattr(s, name) for s in singles])  # noqa: E731
    return DetectorOutput(
        queries=cat("queries"), boxes=cat("boxes"), scores=cat("scores"), labels=cat("labels"),
        query_mask=cat("query_mask"), memory=torch.stack(memory), memory_mask=torch.stack(masks),
        spatial_shapes=shapes,
        level_start_index=torch.tensor([0] + shapes.prod(1).tolist()).cumsum(0)[:-1],
        valid_ratios=torch.stack(ratios).to(singles[0].memory.dtype),
        c1=torch.cat([pad_to(s.c1, c1_size, -30.0) for s in singles]),
        image_sizes=cat("image_sizes"),
    )


def tiny_head(**switches):
    torch.manual_seed(0)
    config = HeadConfig(**{**TINY, **switches})
    return build_mask_head(config, hidden_dim=DIM, c1_channels=C1_DIM, num_levels=LEVELS)


# ---- the training-free baseline (Table 1) --------------------------------------------------

def baseline_reference(single: DetectorOutput, *, roi: bool, fuse: bool, size: int):
    """Eq. 1-4 by hand in float64 for one unpadded image: (mask logits, scores)."""
    (h8, w8), (h4, w4) = single.spatial_shapes[0].tolist(), single.c1.shape[-2:]
    e0 = single.memory[0, : h8 * w8].double().T.reshape(DIM, h8, w8)
    up = F.interpolate(e0[None], scale_factor=2, mode="bilinear")[0, :, :h4, :w4]
    fmap = single.c1[0].double() + up if fuse else up
    q = single.queries[0].double()
    if roi:
        (height, width), (cx, cy, w, h) = single.image_sizes[0].tolist(), single.boxes[0].T
        boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                             (cx + w / 2) * width, (cy + h / 2) * height], -1).double()
        rois = roi_align(fmap[None], [boxes], size, spatial_scale=0.25, sampling_ratio=2,
                         aligned=True)
        logits = torch.einsum("nc,nchw->nhw", q, rois)
    else:
        logits = torch.einsum("nc,chw->nhw", q, fmap)
    prob = logits.sigmoid()
    mean_on = torch.stack([p[p > 0.5].mean() if (p > 0.5).any() else p.new_zeros(())
                           for p in prob])
    return logits, single.scores[0].double() * mean_on


@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "no-fuse"])
@pytest.mark.parametrize("roi", [True, False], ids=["roi", "image"])
def test_training_free_baseline_is_eq_1_to_4(roi, fuse):
    singles = [single_output(h, w, seed=i, dtype=torch.float64) for i, (h, w) in enumerate(SIZES)]
    head = build_mask_head(HeadConfig(trainable=False, roi_align=roi, fuse_c1=fuse, roi_size=7),
                           hidden_dim=DIM, c1_channels=C1_DIM, num_levels=LEVELS)
    out = head(batch_outputs(singles))
    assert out.frame == ("roi" if roi else "image") and out.iou_logits is None
    for i, single in enumerate(singles):
        logits, scores = baseline_reference(single, roi=roi, fuse=fuse, size=7)
        mine = out.mask_logits[out.batch_index == i]
        if not roi:
            h4, w4 = single.c1.shape[-2:]
            assert (mine[:, h4:] == PAD_LOGIT).all() and (mine[:, :, w4:] == PAD_LOGIT).all()
            mine = mine[:, :h4, :w4]
        torch.testing.assert_close(mine, logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.scores[out.batch_index == i], scores,
                                   rtol=1e-10, atol=1e-10)
    assert (out.scores > 0).any()


def test_training_free_baseline_has_no_parameters():
    head = build_mask_head(HeadConfig(trainable=False), hidden_dim=DIM, c1_channels=C1_DIM,
                           num_levels=LEVELS)
    assert sum(p.numel() for p in head.parameters()) == 0


def test_training_free_baseline_needs_matching_c1_width():
    with pytest.raises(ValueError, match=r"48.*32"):
        build_mask_head(HeadConfig(trainable=False), hidden_dim=32, c1_channels=48, num_levels=4)
    # Without fusing C1 the widths do not meet.
    build_mask_head(HeadConfig(trainable=False, fuse_c1=False), hidden_dim=32, c1_channels=48,
                    num_levels=4)


# ---- the trainable head -------------------------------------------------------------------

@pytest.mark.parametrize("switches", VARIANTS.values(), ids=VARIANTS.keys())
def test_padded_batch_equals_singles(switches):
    head = tiny_head(**switches).eval()
    singles = [single_output(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    with torch.no_grad():
        together = head(batch_outputs(singles))
        for i, single in enumerate(singles):
            alone, rows = head(single), together.batch_index == i
            for name in ("mask_logits", "iou_logits", "scores", "boxes", "query_index"):
                mine, theirs = getattr(together, name), getattr(alone, name)
                if mine is not None:
                    torch.testing.assert_close(mine[rows], theirs, rtol=1e-5, atol=1e-5,
                                               msg=f"{name} of image {i}")


def test_default_head_size_is_the_papers():
    head = build_mask_head(HeadConfig(), hidden_dim=256, c1_channels=256, num_levels=4)
    # Paper Table 6 / 9: 3.26 M; this head has 2.92 M (see network.build_mask_head).
    assert 2.5e6 < count_parameters(head) < 3.5e6


def params(**switches) -> int:
    config = HeadConfig(**{**TINY, **switches})
    return count_parameters(build_mask_head(config, hidden_dim=DIM, c1_channels=C1_DIM,
                                            num_levels=LEVELS))


@pytest.mark.parametrize("smaller, larger", [
    (dict(mapper_dim=8), dict(mapper_dim=16)),
    (dict(image_encoder_layers=2), dict(image_encoder_layers=3)),
    (dict(box_encoder_layers=2), dict(box_encoder_layers=3)),
    (dict(image_encoder="none"), dict(image_encoder="convnext")),
    (dict(image_encoder="convnext"), dict(image_encoder="deformable")),
    (dict(box_encoder="none"), dict(box_encoder="swin")),
    (dict(roi_size=8), dict(roi_size=16)),
    (dict(neck=False), dict(neck=True)),
    (dict(fuse_c1=False), dict(fuse_c1=True)),
    (dict(query_ffn=False), dict(query_ffn=True)),
    (dict(query_self_attention=False), dict(query_self_attention=True)),
    (dict(query_cross_attention=False), dict(query_cross_attention=True)),
    (dict(mask_head="dot"), dict(mask_head="segmenter")),
    (dict(mask_scoring=False), dict(mask_scoring=True)),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_switch_changes_the_parameter_count(smaller, larger):
    assert params(**smaller) < params(**larger)


def test_switched_off_parts_have_no_parameters():
    head = tiny_head(mask_scoring=False, neck=False)
    names = [name for name, _ in head.named_parameters()]
    assert not any("scoring" in n or "c1_path" in n for n in names)
    # Neck off but C1 wider than C: a plain 1x1 projection remains, with no norm.
    head = build_mask_head(HeadConfig(**TINY, neck=False), hidden_dim=DIM, c1_channels=48,
                           num_levels=LEVELS)
    assert {n for n, _ in head.named_parameters() if "c1_path" in n} == {
        "fusion.c1_path.weight", "fusion.c1_path.bias"}


@pytest.mark.parametrize("switches", VARIANTS.values(), ids=VARIANTS.keys())
def test_gradients_reach_every_parameter(switches):
    head = tiny_head(**switches)
    out = head(batch_outputs([single_output(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]))
    loss = out.mask_logits.sum() + out.scores.sum()
    (loss + out.iou_logits.sum() if out.iou_logits is not None else loss).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing


def test_keep_selects_exactly_those_queries():
    output = batch_outputs([single_output(h, w, seed=i) for i, (h, w) in enumerate(SIZES)])
    keep = torch.tensor([[True, False, True, True, False], [False, True, False, False, True]])
    out = tiny_head()(output, keep)
    assert torch.equal(torch.stack([out.batch_index, out.query_index], 1), keep.nonzero())
    assert torch.equal(out.boxes, output.boxes_xyxy_pixels()[keep])
    assert out.mask_logits.shape == (5, 8, 8) and out.iou_logits.shape == out.scores.shape == (5,)
    empty = tiny_head(query_self_attention=True)(output, torch.zeros_like(keep))
    assert empty.mask_logits.shape == (0, 8, 8) and empty.scores.shape == (0,)


def test_object_to_object_attention_stays_inside_each_image():
    torch.manual_seed(0)
    encoder = QueryFeatureEncoder(in_dim=DIM, dim=16, heads=2, ffn_dim=32, cross_attention=False,
                                  self_attention=True, ffn=False, dropout=0.0)
    queries, rois = torch.randn(5, DIM), torch.randn(5, 4, 16)
    batch_index = torch.tensor([0, 0, 0, 1, 1])
    before = encoder(queries, rois, batch_index, None)
    changed = queries.clone()
    changed[3:] += 1.0
    after = encoder(changed, rois, batch_index, None)
    torch.testing.assert_close(after[:3], before[:3], rtol=0, atol=1e-6)
    changed[2] += 1.0  # a query of image 0 does move its neighbours
    assert not torch.allclose(encoder(changed, rois, batch_index, None)[:2], before[:2])


def test_deformable_blocks_use_gelu_and_the_detector_keeps_relu():
    layer = EncoderLayer(dim=8, ffn_dim=16, levels=1, heads=2, points=1)
    assert layer.activation is F.relu
    head = tiny_head()
    blocks = [m for m in head.modules() if isinstance(m, EncoderLayer)]
    assert len(blocks) == 4 and all(m.activation is F.gelu for m in blocks)


def test_flops_are_counted():
    output = single_output(*SIZES[0], seed=0)
    assert estimate_flops(tiny_head(), output) > estimate_flops(tiny_head(mask_scoring=False),
                                                                output) > 0


def test_half_precision_features_are_cast_to_the_head_dtype():
    output = single_output(*SIZES[0], seed=3)
    cached = dataclasses.replace(output, memory=output.memory.half(), c1=output.c1.half())
    head = tiny_head().eval()
    with torch.no_grad():
        full, half = head(output), head(cached)
    assert half.mask_logits.dtype == torch.float32
    torch.testing.assert_close(half.mask_logits, full.mask_logits, rtol=0.05, atol=0.05)


def reported_under_several_classes(output: DetectorOutput, rows: list[int]) -> DetectorOutput:
    """``output`` with its queries re-listed as ``rows`` (repeats allowed), each repeat under
    another class and score: what a (query, class) top-k gives (DINO's postprocess)."""
    index = torch.tensor(rows)
    g = torch.Generator().manual_seed(7)
    return dataclasses.replace(
        output, queries=output.queries[:, index], boxes=output.boxes[:, index],
        query_mask=output.query_mask[:, index],
        scores=torch.rand(output.scores.shape[0], len(rows), generator=g,
                          dtype=output.scores.dtype),
        labels=torch.arange(len(rows)).expand(output.labels.shape[0], -1) % 3)


@pytest.mark.parametrize("switches", VARIANTS.values(), ids=VARIANTS.keys())
def test_a_query_under_several_classes_is_computed_once_with_the_same_results(
        switches, monkeypatch):
    """The head computes each distinct query once and spreads the results back: masks,
    scores and every parameter's gradient equal those of computing each row (float64),
    object-to-object attention included (a key counted as often as it is listed)."""
    singles = [single_output(h, w, seed=20 + i, dtype=torch.float64)
               for i, (h, w) in enumerate(SIZES)]
    output = reported_under_several_classes(batch_outputs(singles), [0, 1, 0, 2, 0, 1, 3, 4])
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, 2] = False  # one of image 1's repeats is not kept: multiplicities differ per image

    def run():
        head = tiny_head(**switches).double()
        out = head(output, keep)
        (out.mask_logits.square().sum() + out.scores.sum()).backward()
        return out, {n: p.grad for n, p in head.named_parameters()}

    from frozenseg.head import network

    rows = network.select_queries(output, keep)
    once = network.distinct_queries(rows)
    assert once is not None and len(once.selection.queries) == 10  # 5 distinct per image
    assert once.multiplicity.sum() == keep.sum()
    merged, merged_grads = run()
    monkeypatch.setattr(network, "distinct_queries", lambda sel: None)
    each, each_grads = run()
    for name in ("mask_logits", "iou_logits", "scores", "boxes", "batch_index", "query_index"):
        mine, theirs = getattr(merged, name), getattr(each, name)
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # Deformable attention uses its sampling locations and weights in float32 whatever the
    # dtype (frozenseg.ops.functional): gradients summed in another order agree to that.
    for name, grad in each_grads.items():
        torch.testing.assert_close(merged_grads[name], grad, rtol=1e-6,
                                   atol=1e-9 + 1e-7 * float(grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_distinct_queries_keeps_rows_that_differ_in_box_or_state():
    from frozenseg.head import network

    output = reported_under_several_classes(
        single_output(64, 96, seed=3, dtype=torch.float64), [0, 0, 1, 1])
    output.boxes[0, 1, 0] += 1e-9  # the same query state, another box
    output.queries[0, 3, 0] += 1e-9  # the same box, another state
    assert network.distinct_queries(network.select_queries(output, None)) is None
