"""Converted Hugging Face DETR, Conditional DETR and DAB-DETR models reproduce transformers'
own outputs (the plain-attention DETRs of frozenseg.detector.plain)."""

from __future__ import annotations

import pytest
import torch
from test_convert_rt_detr import lively
from weights import perturb

from frozenseg.convert import convert_state_dict
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector

transformers = pytest.importorskip("transformers")

ARCHITECTURES = {
    "detr": ("DetrConfig", "DetrForObjectDetection", "d_model"),
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection", "d_model"),
    "dab_detr": ("DabDetrConfig", "DabDetrForObjectDetection", "hidden_size"),
}
VARIANTS = {
    "detr": dict(variant="detr"),
    "conditional-detr": dict(variant="conditional_detr"),
    "dab-detr": dict(variant="dab_detr"),
    "dab-detr-patterns-keep-query-pos": dict(variant="dab_detr", num_patterns=2,
                                             keep_query_pos=True),
    "dab-detr-relu-3-layers": dict(variant="dab_detr", activation_function="relu",
                                   decoder_layers=3),
    # the hub's released folders: timm's ResNet-50 (DAB-DETR's under its own _backbone)
    "detr-timm": dict(variant="detr", timm=True),
    "dab-detr-timm": dict(variant="dab_detr", timm=True),
}


def random_hf_model(variant: str = "detr", timm: bool = False, **settings):
    """A small random model (ResNet-50 trunk, Hugging Face's or ``timm``'s; 64 wide, 2 + 2
    layers) and its config.json."""
    torch.manual_seed(0)
    config_name, model_name, width = ARCHITECTURES[variant]
    backbone = ({"use_timm_backbone": True, "backbone": "resnet50"} if timm else
                {"use_timm_backbone": False, "backbone_config": transformers.ResNetConfig(
                    depths=[3, 4, 6, 3], out_features=["stage4"])})
    config = getattr(transformers, config_name)(
        **backbone, use_pretrained_backbone=False,
        **{width: 64}, encoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=48, num_queries=12, num_labels=5,
        **{"decoder_layers": 2, **settings})
    model = getattr(transformers, model_name)(config)
    return perturb(lively(model)), config.to_dict()


def images_and_masks():
    """Two noise images, the second padded right and bottom (a smaller image)."""
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, 96, 128, dtype=torch.long)
    valid[1, :, 100:] = 0
    valid[1, 70:, :] = 0
    return images, valid


def converted(hf, args):
    state_dict, report = convert_state_dict(hf.state_dict(), args=args)
    assert report.ok, report.problem()
    model = build_detector(report.config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model, report


@pytest.mark.parametrize("settings", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_model_matches_transformers(settings):
    hf, args = random_hf_model(**settings)
    ours, report = converted(hf, args)
    assert report.format == f"huggingface_{settings['variant']}"
    images, valid = images_and_masks()
    with torch.no_grad():
        expected = hf(pixel_values=images, pixel_mask=valid, output_hidden_states=True)
        got = ours(images, valid == 0)
    memory = got.encoded.encoder_states[-1]
    valid_memory = ~got.encoded.mask
    torch.testing.assert_close(memory[valid_memory],
                               expected.encoder_last_hidden_state[valid_memory],
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(got.decoder_states[-1], expected.last_hidden_state,
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)
    assert (got.logits[-1].std() > 0.1) and (got.boxes[-1].std() > 0.01)  # not degenerate


def test_the_memory_is_the_last_encoder_state_at_stride_32():
    hf, args = random_hf_model("detr")
    model, _ = converted(hf, args)
    detector = FrozenDetector(model, top_k=5)
    images, _ = images_and_masks()
    out = detector(list(images))
    assert out.spatial_shapes.tolist() == [[3, 4]] and out.memory.shape == (2, 12, 64)
    assert out.c1.shape[-2:] == (24, 32) and detector.head_dims["num_levels"] == 1
    assert detector.head_dims["memory_stride"] == 32


def _post_processor(variant: str):
    return (transformers.DetrImageProcessor() if variant == "detr"
            else transformers.ConditionalDetrImageProcessor())


@pytest.mark.parametrize("variant", ["detr", "conditional_detr", "dab_detr"])
def test_top_k_ranks_as_the_post_processor(variant):
    """DETR: softmax without the no-object class, one detection per query; Conditional and
    DAB-DETR: sigmoid top-k over queries x classes. Boxes as the post-processor gives them."""
    hf, args = random_hf_model(variant)
    model, _ = converted(hf, args)
    detector = FrozenDetector(model, top_k=10)
    images, _ = images_and_masks()
    with torch.no_grad():
        out = detector(list(images))
        batch, padding, _ = detector.preprocess(list(images))  # normalised, as the processor
        raw = hf(pixel_values=batch, pixel_mask=(~padding).long())
    results = _post_processor(variant).post_process_object_detection(
        raw, threshold=-1.0, target_sizes=[(96, 128)] * 2)
    for i, result in enumerate(results):
        order = result["scores"].argsort(descending=True)[:10]
        torch.testing.assert_close(out.scores[i], result["scores"][order], atol=1e-4, rtol=0)
        assert torch.equal(out.labels[i], result["labels"][order])
        torch.testing.assert_close(out.boxes_xyxy_pixels()[i], result["boxes"][order],
                                   atol=1e-2, rtol=0)


def test_dab_detr_takes_external_boxes_as_anchors():
    """A box given to a DAB-DETR is an anchor: its own anchors, given as boxes, give back
    the states its own queries reach (zero content, the same anchors, all together)."""
    hf, args = random_hf_model("dab_detr")
    model, _ = converted(hf, args)
    g = torch.Generator().manual_seed(2)
    anchors = torch.cat([torch.rand(12, 2, generator=g) * 0.4 + 0.3,
                         torch.rand(12, 2, generator=g) * 0.3 + 0.1], 1)
    with torch.no_grad():
        model.refpoint_embed.weight.copy_(torch.logit(anchors))
    detector = FrozenDetector(model, top_k=12)
    image = images_and_masks()[0][0]
    scale = torch.tensor([128.0, 96.0] * 2)
    pixels = torch.cat([anchors[:, :2] - anchors[:, 2:] / 2,
                        anchors[:, :2] + anchors[:, 2:] / 2], 1) * scale
    with torch.no_grad():
        batch, padding, _ = detector.preprocess([image])
        raw = model(batch, padding)
        given = detector.embed_boxes([image], [pixels])
    torch.testing.assert_close(given.queries[0], raw.decoder_states[-1][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["detr", "conditional_detr"])
def test_external_boxes_take_the_best_overlapping_query(variant):
    """DETR and Conditional DETR build no query from a box: each given box takes the query
    whose predicted box overlaps it most, so a detection given back as a box returns it."""
    hf, args = random_hf_model(variant)
    model, _ = converted(hf, args)
    with torch.no_grad():  # boxes of about half the image, most of them inside it
        model.bbox_embed.layers[-1].weight.mul_(0.3)
        model.bbox_embed.layers[-1].bias.zero_()
    detector = FrozenDetector(model, top_k=8)
    image = images_and_masks()[0][0]
    with torch.no_grad():
        out = detector([image])
        boxes = out.boxes_xyxy_pixels()[0]
        inside = ((boxes[:, :2] >= 0) & (boxes[:, 2:] <= torch.tensor([128, 96]))).all(1)
        assert inside.sum() >= 2, "given boxes are clipped to the image: keep whole ones"
        given = detector.embed_boxes([image], [boxes[inside]])
    torch.testing.assert_close(given.queries[0], out.queries[0, inside], atol=1e-5, rtol=0)
    torch.testing.assert_close(given.scores[0], out.scores[0, inside], atol=1e-5, rtol=0)
    assert torch.equal(given.labels[0], out.labels[0, inside])


@pytest.mark.parametrize(("variant", "setting", "value"), [
    ("detr", "position_embedding_type", "learned"),
    ("detr", "dilation", True),
    ("conditional_detr", "activation_function", "gelu"),
    ("dab_detr", "normalize_before", True),
    ("dab_detr", "temperature_width", 10000),
])
def test_unsupported_settings_are_refused_in_one_line(variant, setting, value):
    hf, args = random_hf_model(variant)
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(hf.state_dict(), args={**args, setting: value})
    assert f"{setting}={value!r}" in str(err.value) and "\n" not in str(err.value)


OFFICIAL = {"detr": {}, "conditional_detr": {},
            "dab_detr": dict(num_patterns=2, keep_query_pos=True)}


@pytest.mark.parametrize("variant", OFFICIAL)
def test_an_official_checkpoint_matches_transformers(tmp_path, variant):
    """facebookresearch/detr's, Atten4Vis/ConditionalDETR's and IDEA-Research/DAB-DETR's
    layouts (nn.MultiheadAttention's stacked in_proj, backbone.0.body., DETR's multihead_attn,
    DAB's transformer.patterns and twice-saved box head) convert to what transformers
    computes for the same weights."""
    from artifacts import detr_official_checkpoint

    from frozenseg.convert import convert_checkpoint
    from frozenseg.detector.frozen import load_detector

    artifact = detr_official_checkpoint(tmp_path / "detr", variant, **OFFICIAL[variant])
    report = convert_checkpoint(artifact.path, tmp_path / "converted")
    assert report.format == variant and report.config == artifact.config and not report.notes
    images, valid = images_and_masks()
    with torch.no_grad():
        got = load_detector(tmp_path / "converted").model(images, valid == 0)
    logits, boxes = artifact.reference(images, valid == 0)
    torch.testing.assert_close(got.logits[-1], logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("variant", "setting", "value"), [
    ("detr", "pre_norm", True), ("detr", "position_embedding", "learned"),
    ("dab_detr", "query_scale_type", "cond_scalar"), ("dab_detr", "pe_temperatureW", 10000),
])
def test_an_official_setting_frozenseg_does_not_compute_is_refused(tmp_path, variant, setting,
                                                                     value):
    from artifacts import detr_official_checkpoint

    artifact = detr_official_checkpoint(tmp_path / "detr", variant)
    ckpt = torch.load(artifact.path, weights_only=False)
    setattr(ckpt["args"], setting, value)
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(ckpt["model"], args=vars(ckpt["args"]))
    assert f"{setting}={value!r}" in str(err.value) and "\n" not in str(err.value)
