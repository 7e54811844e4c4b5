"""Converted Hugging Face Deformable DETR models reproduce transformers' own outputs."""

from __future__ import annotations

import re

import pytest
import torch
from weights import perturb

from frozenseg.convert import convert_state_dict
from frozenseg.detector.model import build_detector

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "single-stage": dict(two_stage=False, with_box_refine=False),
    "box-refine": dict(two_stage=False, with_box_refine=True),
    "two-stage": dict(two_stage=True, with_box_refine=True),
}


def random_hf_model(two_stage: bool, with_box_refine: bool):
    """A small random DeformableDetrForObjectDetection with a ResNet-50 backbone."""
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(depths=[3, 4, 6, 3],
                                         out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=12,
        two_stage_num_proposals=12, num_labels=5, two_stage=two_stage,
        with_box_refine=with_box_refine,
    )
    model = perturb(transformers.DeformableDetrForObjectDetection(config))
    args = {"encoder_attention_heads": 2, "two_stage_num_proposals": 12,
            "with_box_refine": with_box_refine}
    return model, args


def to_v4_hub_names(state_dict):
    """transformers v4 names, without the tied copies a hub file leaves out."""
    out = {}
    for key, tensor in state_dict.items():
        key = key.replace("model.backbone.", "model.backbone.conv_encoder.")
        key = key.replace("self_attn.o_proj.", "self_attn.out_proj.")
        key = re.sub(r"layers\.(\d+)\.mlp\.fc([12])\.", r"layers.\1.fc\2.", key)
        out[key] = tensor
    return out


def images_and_masks():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    valid = torch.ones(2, 96, 128, dtype=torch.long)
    valid[1, :, 100:] = 0  # the second image is smaller: padded right and bottom
    valid[1, 80:, :] = 0
    return images, valid


@pytest.mark.parametrize("names", ["v5", "v4"])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_model_matches_transformers(variant, names):
    hf, args = random_hf_model(**variant)
    state_dict = hf.state_dict()
    if names == "v4":
        state_dict = to_v4_hub_names(state_dict)
    converted, report = convert_state_dict(state_dict, args=args)
    assert report.format == "huggingface" and report.ok, report.problem()
    ours = build_detector(report.config).eval()
    ours.load_state_dict(converted, strict=True)

    images, valid = images_and_masks()
    with torch.no_grad():
        expected = hf(pixel_values=images, pixel_mask=valid, output_hidden_states=True)
        got = ours(images, valid == 0)
    for layer, (theirs, mine) in enumerate(
        zip(expected.encoder_hidden_states[1:], got.encoder_states, strict=True)
    ):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0, msg=f"encoder layer {layer}")
    torch.testing.assert_close(torch.stack(got.decoder_states, 1),
                               expected.intermediate_hidden_states, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)


def test_hub_file_without_tied_heads_takes_them_from_head_zero():
    hf, args = random_hf_model(two_stage=False, with_box_refine=False)
    state_dict = {k: v for k, v in hf.state_dict().items()
                  if not re.match(r"(class|bbox)_embed\.[1-9]", k)}
    converted, report = convert_state_dict(state_dict, args=args)
    assert report.ok
    assert ("class_embed.1.weight", "tied to class_embed.0.weight") in report.derived
    torch.testing.assert_close(converted["bbox_embed.1.layers.2.bias"],
                               hf.state_dict()["bbox_embed.0.layers.2.bias"])


def test_a_renamed_key_and_a_changed_shape_are_reported_by_name():
    hf, args = random_hf_model(two_stage=False, with_box_refine=False)
    state_dict = dict(hf.state_dict())
    state_dict["model.encoder.layers.1.self_attn.value_projection.weight"] = state_dict.pop(
        "model.encoder.layers.1.self_attn.value_proj.weight")
    _, report = convert_state_dict(state_dict, args=args)
    assert "transformer.encoder.layers.1.self_attn.value_proj.weight" in report.missing
    assert "model.encoder.layers.1.self_attn.value_projection.weight" in " ".join(
        report.unexpected)

    state_dict = dict(hf.state_dict())
    state_dict["model.input_proj.1.1.weight"] = torch.zeros(32)
    _, report = convert_state_dict(state_dict, args=args)
    assert report.mismatched == [("model.input_proj.1.1.weight", (32,), (64,))]
    assert "input_proj.1.1.weight" in report.problem()
