"""FrozenDetector: DetectorOutput's contract, top-K ranking, batching, external boxes."""

from __future__ import annotations

import pytest
import torch

from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.frozen import FrozenDetector, detector_input_size
from frozenseg.detector.model import build_detector
from frozenseg.formats import d_fine, deimv2, rt_detr

VARIANTS = {
    "deformable-single-stage": dict(query_init="learned", box_refine=False),
    "deformable-box-refine": dict(query_init="learned", box_refine=True),
    "deformable-two-stage": dict(query_init="proposals", box_refine=True),
    "h-deformable-detr": dict(variant="h_deformable_detr", query_init="mixed", box_refine=True),
    "rt-detr": dict(rt_detr.FIXED, backbone={"name": "resnet_vd"}, num_feature_levels=3,
                    dn_labelbook_size=5),
    "d-fine": dict(d_fine.FIXED, backbone={"name": "resnet_vd"}, num_feature_levels=3,
                   dn_labelbook_size=5, csp_blocks=1, csp_expansion=0.5, fdr_bins=8),
    "deimv2-no-gate": dict(deimv2.FIXED, backbone={"name": "resnet_vd"}, num_feature_levels=3,
                           dn_labelbook_size=5, csp_blocks=1, csp_expansion=0.5, fdr_bins=8,
                           csp_trailing_conv=False, fdr_gateway=False, ref_point_layers=3,
                           ref_point_hidden_dim=64),
}


def tiny_detector(**variant) -> FrozenDetector:
    torch.manual_seed(0)
    config = DetectorConfig(hidden_dim=64, enc_layers=2, dec_layers=2, dim_feedforward=32,
                            num_queries=10, num_classes=5, **variant)
    return FrozenDetector(build_detector(config), top_k=7, memory_layer=1)


@pytest.fixture(scope="module", params=VARIANTS.values(), ids=VARIANTS.keys())
def detector(request):
    return tiny_detector(**request.param)


def images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def test_output_contract(detector):
    out = detector(images((64, 96), (48, 80)))
    assert out.queries.shape == (2, 7, 64) and out.boxes.shape == (2, 7, 4)
    assert out.scores.shape == out.labels.shape == out.query_mask.shape == (2, 7)
    assert out.image_sizes.tolist() == [[64, 96], [48, 80]]
    assert out.c1.shape == (2, 256, 16, 24)
    assert out.memory.shape == (2, int(out.spatial_shapes.prod(1).sum()), 64)
    assert out.memory_mask.shape == out.memory.shape[:2]
    # A model that sees the padded canvas (RT-DETR) may put a padded image's boxes in the
    # border: beyond that image's own [0, 1].
    boxes = out.boxes if detector.config.mask_padding else out.boxes[:1]
    assert ((boxes >= 0) & (boxes <= 1)).all() and out.query_mask.all()
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()  # ranked


def test_batch_of_two_equals_two_singles(detector):
    batch = images((64, 96), (64, 96), seed=1)
    together = detector(batch)
    for i, image in enumerate(batch):
        alone = detector([image])
        for name in ("queries", "boxes", "scores", "memory", "c1"):
            torch.testing.assert_close(getattr(together, name)[i], getattr(alone, name)[0],
                                       atol=2e-5, rtol=1e-5, msg=name)
        assert torch.equal(together.labels[i], alone.labels[0])


def test_images_of_different_sizes(detector):
    """The largest image is unpadded, so batching must not change its predictions."""
    batch = images((80, 96), (56, 72), seed=2)
    together, alone = detector(batch), detector(batch[:1])
    torch.testing.assert_close(together.queries[0], alone.queries[0], atol=2e-5, rtol=1e-5)
    assert together.memory_mask[1].any() and not together.memory_mask[0].any()
    assert torch.isfinite(together.queries).all() and torch.isfinite(together.boxes).all()


def test_top_k_is_over_queries_times_classes_like_postprocess(detector):
    batch = images((64, 64), seed=3)
    out = detector(batch)
    padded, padding, _ = detector.preprocess(batch)
    with torch.no_grad():
        raw = detector.model(padded, padding)
    probs = raw.logits[-1].sigmoid().flatten(1)
    scores, index = probs.topk(7, dim=1)
    torch.testing.assert_close(out.scores, scores)
    assert torch.equal(out.labels, index % 5)
    query = index // 5
    torch.testing.assert_close(out.boxes, raw.boxes[-1][0, query[0]][None])
    torch.testing.assert_close(out.queries, raw.decoder_states[-1][0, query[0]][None])


def test_memory_layer_selects_an_encoder_layer():
    det = tiny_detector(query_init="learned")
    batch = images((64, 64), seed=4)
    padded, padding, _ = det.preprocess(batch)
    with torch.no_grad():
        raw = det.model(padded, padding)
    for layer in (1, 2):
        det.memory_layer = layer
        torch.testing.assert_close(det(batch).memory, raw.encoder_states[layer - 1])
    with pytest.raises(ValueError, match="memory_layer 3"):
        FrozenDetector(det.model, memory_layer=3)


def test_frozen_means_eval_and_no_grad(detector):
    detector.train()
    assert not detector.training and not detector.model.training
    assert not any(p.requires_grad for p in detector.parameters())


def test_embed_boxes_returns_exactly_the_given_boxes(detector):
    batch = images((64, 96), (48, 80), seed=5)
    boxes = [torch.tensor([[8.0, 4.0, 40.0, 60.0], [0.0, 0.0, 96.0, 64.0]]),
             torch.tensor([[10.0, 10.0, 30.0, 20.0]])]
    out = detector.embed_boxes(batch, boxes)
    assert out.queries.shape == (2, 2, 64)
    assert out.query_mask.tolist() == [[True, True], [True, False]]
    expected = torch.tensor([[24 / 96, 32 / 64, 32 / 96, 56 / 64], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(out.boxes[0], expected)
    torch.testing.assert_close(out.boxes_xyxy_pixels()[1, 0], boxes[1][0])
    alone = detector.embed_boxes(batch[:1], boxes[:1])  # the unpadded image: same queries
    torch.testing.assert_close(out.queries[0], alone.queries[0], atol=2e-5, rtol=1e-5)


def test_embed_boxes_with_no_boxes_and_labels_kept(detector):
    batch = images((64, 64), (64, 64), seed=6)
    boxes = [torch.zeros(0, 4), torch.tensor([[1.0, 2.0, 30.0, 40.0]])]
    out = detector.embed_boxes(batch, boxes, labels=[torch.zeros(0, dtype=torch.long),
                                                    torch.tensor([3])])
    assert out.query_mask.tolist() == [[False], [True]] and out.labels[1, 0] == 3


@pytest.mark.parametrize("size, expected", [
    ((480, 640), (800, 1066)), ((640, 480), (1066, 800)), ((800, 1200), (800, 1200)),
    ((300, 1200), (333, 1332)), ((1000, 1000), (800, 800)),
])
def test_detector_input_size_follows_the_800_1333_rule(size, expected):
    assert detector_input_size(*size) == expected


def test_coco_class_maps():
    from frozenseg.detector.classes import class_map

    slots = class_map(91)
    assert slots["category_ids"][1] == 1 and slots["names"][1] == "person"
    assert slots["category_ids"][12] is None and slots["names"][90] == "toothbrush"
    contiguous = class_map(80)
    assert contiguous["category_ids"][:3] == [1, 2, 3] and contiguous["category_ids"][-1] == 90
    assert contiguous["names"][11] == "stop sign"
    assert class_map(5)["category_ids"] == [0, 1, 2, 3, 4]


def test_images_smaller_than_the_query_count_still_work():
    det = tiny_detector(variant="h_deformable_detr", query_init="mixed", box_refine=True)
    out = det(images((16, 16), seed=7))  # 4 levels of 2x2, 1x1, 1x1, 1x1: 7 positions < 10
    assert out.queries.shape[1] == 7 and torch.isfinite(out.boxes).all()


def test_stage1_is_the_c1_of_the_full_forward(detector):
    batch = images((64, 96), (48, 80), seed=3)
    torch.testing.assert_close(detector.stage1(batch), detector(batch).c1, atol=0, rtol=0)


def test_detect_and_embed_equals_the_two_calls(detector):
    batch = images((64, 96), (48, 80), seed=4)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0]]), torch.tensor([[0.0, 0.0, 30.0, 20.0],
                                                                   [10.0, 12.0, 70.0, 44.0]])]
    found, embedded = detector.detect_and_embed(batch, boxes)
    alone, boxed = detector(batch), detector.embed_boxes(batch, boxes)
    for a, b in ((found, alone), (embedded, boxed)):
        for name in ("queries", "boxes", "scores", "labels", "query_mask", "memory"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)


@pytest.mark.parametrize("variant,reaches", [
    (dict(variant="dino", query_init="mixed", box_refine=True, decoder_norm=True,
          ref_point_head=True, proposal_score="max_class"), True),
    (dict(query_init="proposals", box_refine=True), False),
    (dict(variant="h_deformable_detr", query_init="mixed", box_refine=True), False),
])
def test_last_layer_box_loss_reaches_the_previous_box_head_only_in_dino(variant, reaches):
    """DINO's look forward twice: the last layer's box is relative to a reference that the
    previous layer's box head refined, with its gradient; Deformable DETR detaches it."""
    torch.manual_seed(0)
    config = DetectorConfig(hidden_dim=64, enc_layers=1, dec_layers=2, dim_feedforward=32,
                            num_queries=10, num_classes=5, **variant)
    model = build_detector(config).train()
    for head in model.bbox_embed:  # non-zero deltas, so every path carries a gradient
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    image = torch.rand(1, 3, 64, 96)
    raw = model(image, torch.zeros(1, 64, 96, dtype=torch.bool))
    raw.boxes[-1].sum().backward()
    grad = model.bbox_embed[0].layers[-1].weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == reaches
    # The boxes themselves are the same either way: inference does not change.
    with torch.no_grad():
        again = model(image, torch.zeros(1, 64, 96, dtype=torch.bool))
    torch.testing.assert_close(again.boxes[-1], raw.boxes[-1].detach())


def test_a_model_that_sees_the_padded_canvas_gives_boxes_in_each_images_frame():
    """RT-DETR does not mask padding: it predicts relative to the padded batch, and
    DetectorOutput's boxes are converted to each image's own size."""
    det = tiny_detector(**VARIANTS["rt-detr"])
    batch = images((64, 96), (48, 80), seed=8)
    out = det(batch)
    padded, padding, _ = det.preprocess(batch)
    with torch.no_grad():
        raw = det.model(padded, padding)
    scores, index = raw.logits[-1][1].sigmoid().flatten().topk(7)
    canvas = raw.boxes[-1][1, index // 5] * torch.tensor([96.0, 64.0, 96.0, 64.0])
    torch.testing.assert_close(out.scores[1], scores)
    own = out.boxes[1] * torch.tensor([80.0, 48.0, 80.0, 48.0])
    torch.testing.assert_close(own, canvas)
    boxes = [torch.zeros(0, 4), torch.tensor([[8.0, 4.0, 40.0, 30.0]])]
    embedded = det.embed_boxes(batch, boxes)
    torch.testing.assert_close(embedded.boxes_xyxy_pixels()[1, 0], boxes[1][0])
