"""Converted Hugging Face DEIMv2 models (HGNetV2 backbones, with the hybrid or the lite
encoder) reproduce transformers' outputs; the DINOv3 models: test_convert_deimv2_dinov3."""

from __future__ import annotations

import pytest
import torch
from test_convert_d_fine import assert_matches_transformers
from test_convert_d_fine import random_hf_model as d_fine_model
from test_convert_deimv2_dinov3 import converted, outputs
from test_convert_rt_detr import assert_ranks_as_the_post_processor, lively
from weights import perturb

from frozenseg.convert import convert_state_dict
from frozenseg.detector.folder import read_config
from frozenseg.detector.frozen import load_detector

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


# Atto / Femto / Pico's kind: a three-stage HGNetV2 whose last stage (stride 16) feeds the
# lite encoder (no AIFI, two levels); the last stage light, with learnable affines or not.
LITE = {
    "atto": dict(),
    "pico-plain-projected": dict(use_learnable_affine_block=False, encoder_hidden_dim=48,
                                 stage_num_blocks=[1, 1, 2], hidden_expansion=1.0),
}


def lite_hf_model(encoder_hidden_dim: int = 32, decoder: dict | None = None, **backbone):
    """A small random Deimv2ForObjectDetection with the lite encoder, and its config;
    ``decoder``: settings of its decoder (share_bbox_head, use_gateway)."""
    torch.manual_seed(0)
    expansion = backbone.pop("hidden_expansion", 0.5)
    spec = {"stem_channels": [3, 8, 16], "stage_in_channels": [16, 32, 48],
            "stage_mid_channels": [8, 16, 16], "stage_out_channels": [32, 48, 64],
            "stage_num_blocks": [1, 1, 1], "stage_numb_of_layers": [2, 2, 2],
            "stage_light_block": [False, False, True], "stage_kernel_size": [3, 3, 5],
            "stage_downsample": [False, True, True], "use_learnable_affine_block": True,
            **backbone}
    config = transformers.Deimv2Config(
        backbone_config=transformers.HGNetV2Config(
            **spec, hidden_sizes=spec["stage_out_channels"], depths=spec["stage_num_blocks"],
            out_indices=[3]),
        encoder_type="lite", encoder_layers=0, encoder_hidden_dim=encoder_hidden_dim,
        encoder_in_channels=[64], feat_strides=[16], num_feature_levels=2,
        hidden_expansion=expansion, d_model=32, decoder_in_channels=[encoder_hidden_dim] * 2,
        decoder_ffn_dim=64, decoder_layers=3, decoder_attention_heads=2, num_queries=20,
        num_labels=5, depth_mult=0.34, lqe_hidden_dim=16, max_num_bins=8, **(decoder or {}))
    model = transformers.Deimv2ForObjectDetection(config)
    return perturb(lively(model)), config.to_dict()


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_model_matches_transformers(variant):
    assert_matches_transformers(*random_hf_model(**variant), "huggingface_deimv2")


@pytest.mark.parametrize("variant", LITE.values(), ids=LITE.keys())
def test_the_lite_encoder_matches_transformers(variant):
    assert_matches_transformers(*lite_hf_model(**variant), "huggingface_deimv2")


def test_a_lite_folder_converts_to_transformers_outputs_and_runs_any_size(tmp_path):
    """save_pretrained's folder (three backbone stages, no AIFI) converts; the frozen
    detector takes odd sizes (the coarse level's upsampling cropped to the fine one)."""
    hf, _ = lite_hf_model(**LITE["atto"])
    ours = converted(hf, tmp_path)
    assert read_config(tmp_path / "out").encoder == "lite"
    for got, want in zip(outputs(ours), outputs(hf, hf=True), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with torch.no_grad():
        out = load_detector(tmp_path / "out")([torch.rand(3, 100, 70), torch.rand(3, 64, 96)])
    assert out.c1.shape == (2, 32, 25, 24) and out.level_shapes == [(7, 6), (4, 3)]


def test_top_k_ranks_as_the_post_processor():
    assert_ranks_as_the_post_processor(*random_hf_model())


def test_a_lite_encoder_that_config_json_calls_hybrid_is_refused_in_one_line():
    hf, args = lite_hf_model()
    with pytest.raises(ValueError, match="encoder_type='hybrid', but the weights hold a lite"
                       ) as err:
        convert_state_dict(hf.state_dict(), args={**args, "encoder_type": "hybrid"})
    assert "\n" not in str(err.value)


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
