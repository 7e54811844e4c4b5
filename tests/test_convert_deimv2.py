"""Converted Hugging Face DEIMv2 models (HGNetV2 backbones) reproduce transformers' outputs."""

from __future__ import annotations

import pytest
import torch
from test_convert_d_fine import assert_matches_transformers
from test_convert_d_fine import random_hf_model as d_fine_model
from test_convert_rt_detr import assert_ranks_as_the_post_processor

from frozenseg.convert import convert_state_dict

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "n": dict(),
    "no-gate-shared-box-head-no-trailing-conv": dict(
        use_gateway=False, share_bbox_head=True, encoder_has_trailing_conv=False,
        hidden_expansion=0.5, backbone="plain"),
    "projected": dict(encoder_hidden_dim=48, depth_mult=0.67),
    # Per-level points (D-FINE's released [3, 6, 3]) go through D-FINE's converter too.
    "released-points": dict(decoder_n_points=[3, 6, 3]),
}


def random_hf_model(**settings):
    """A small random Deimv2ForObjectDetection and its config as a dict (config.json)."""
    return d_fine_model(family="Deimv2", **settings)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_model_matches_transformers(variant):
    assert_matches_transformers(*random_hf_model(**variant), "huggingface_deimv2")


def test_top_k_ranks_as_the_post_processor():
    assert_ranks_as_the_post_processor(*random_hf_model())


def test_lite_models_are_refused_in_one_line():
    hf, args = random_hf_model()
    state_dict = {**hf.state_dict(), "model.encoder.bi_fusion_conv.conv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(state_dict, args=args)
    assert "encoder_type='lite'" in str(err.value) and "\n" not in str(err.value)


def test_dinov3_weights_with_an_hgnetv2_config_are_refused_in_one_line():
    hf, args = random_hf_model()
    state_dict = {**hf.state_dict(),
                  "model.conv_encoder.backbone.embeddings.cls_token": torch.zeros(1)}
    with pytest.raises(ValueError, match="backbone config is 'hgnet_v2'") as err:
        convert_state_dict(state_dict, args=args)
    assert "\n" not in str(err.value)


def test_concatenated_levels_are_refused_in_one_line():
    hf, args = random_hf_model()
    with pytest.raises(ValueError, match="encoder_fuse_op='cat' is not supported"):
        convert_state_dict(hf.state_dict(), args={**args, "encoder_fuse_op": "cat"})
