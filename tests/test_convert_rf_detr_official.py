"""Official RF-DETR checkpoints (roboflow/rf-detr's main.py: ``{'model', 'args', ...}``):
the keys its modules save, its training arguments read as config.json's settings."""

from __future__ import annotations

import argparse

import pytest
import torch
from artifacts import rf_detr_official_checkpoint

from frozenseg.checkpoint import load_checkpoint
from frozenseg.convert import convert_state_dict

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# Names read from the official modules (LWDETR, Joiner -> Backbone's DinoV2 /
# WindowedDinov2WithRegistersBackbone and MultiScaleProjector's C2f / ConvX with LayerNorm,
# Transformer's decoder layers with nn.MultiheadAttention, group DETR's two-stage heads).
OFFICIAL_KEYS = [
    "backbone.0.encoder.encoder.embeddings.cls_token",
    "backbone.0.encoder.encoder.embeddings.mask_token",
    "backbone.0.encoder.encoder.embeddings.position_embeddings",
    "backbone.0.encoder.encoder.embeddings.patch_embeddings.projection.weight",
    "backbone.0.encoder.encoder.encoder.layer.0.norm1.weight",
    "backbone.0.encoder.encoder.encoder.layer.0.attention.attention.query.weight",
    "backbone.0.encoder.encoder.encoder.layer.1.attention.attention.value.bias",
    "backbone.0.encoder.encoder.encoder.layer.0.attention.output.dense.weight",
    "backbone.0.encoder.encoder.encoder.layer.0.layer_scale1.lambda1",
    "backbone.0.encoder.encoder.encoder.layer.2.mlp.fc2.weight",
    "backbone.0.encoder.encoder.layernorm.weight",
    "backbone.0.projector.stages.0.0.cv1.conv.weight",
    "backbone.0.projector.stages.0.0.cv2.bn.weight",
    "backbone.0.projector.stages.0.0.m.1.cv2.conv.weight",
    "backbone.0.projector.stages.0.1.bias",
    "transformer.decoder.layers.1.self_attn.in_proj_weight",
    "transformer.decoder.layers.0.self_attn.out_proj.bias",
    "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight",
    "transformer.decoder.layers.0.cross_attn.value_proj.weight",
    "transformer.decoder.layers.0.norm3.weight", "transformer.decoder.layers.0.linear2.bias",
    "transformer.decoder.norm.weight", "transformer.decoder.ref_point_head.layers.1.weight",
    "transformer.enc_output.2.weight", "transformer.enc_output_norm.1.bias",
    "transformer.enc_out_class_embed.2.weight", "transformer.enc_out_bbox_embed.1.layers.2.bias",
    "class_embed.weight", "bbox_embed.layers.2.weight", "query_feat.weight",
    "refpoint_embed.weight",
]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    artifact = rf_detr_official_checkpoint(tmp_path_factory.mktemp("rf"), released=True)
    return load_checkpoint(artifact.path)


def test_the_file_has_the_official_modules_names(released):
    assert not [key for key in OFFICIAL_KEYS if key not in released.state_dict]
    assert not [key for key in released.state_dict if key.startswith("model.")]
    assert released.state_dict["query_feat.weight"].shape[0] == 12 * 3  # group DETR's groups


def test_the_training_arguments_give_the_config(released):
    state, report = convert_state_dict(released.state_dict, args=released.args)
    assert report.ok and not [n for n in report.notes if "assumed" in n], report.notes
    config = report.config
    assert config.backbone["out_layers"] == (1, 2, 3) and config.backbone["window_side"] == 2
    assert config.backbone["heads"] == 2 and config.nheads == 2 and config.dec_cross_heads == 4
    assert config.num_queries == 12 and config.dec_layers == 2
    assert torch.equal(state["transformer.tgt_embed.weight"],
                       released.state_dict["query_feat.weight"][:12])


@pytest.mark.parametrize(("setting", "value"), [
    ("lite_refpoint_refine", False), ("bbox_reparam", False), ("two_stage", False),
    ("layer_norm", False), ("segmentation_head", True), ("projector_scale", ["P3", "P5"]),
    ("encoder", "dinov2_registers_windowed_small"),
])
def test_arguments_frozenseg_does_not_reproduce_are_refused_in_one_line(released, setting,
                                                                       value):
    args = {**released.args, setting: value}
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(released.state_dict, args=args)
    assert f"{setting}={value!r}" in str(err.value) and "\n" not in str(err.value)


def test_a_config_json_is_read_as_before(released):
    """args that are a config.json (backbone_config present) are not translated."""
    from frozenseg.formats.lw_detr import official_args

    config = {"out_feature_indexes": [1], "backbone_config": {"out_indices": [1]}}
    assert official_args(config) is config
    assert official_args(vars(argparse.Namespace(num_queries=3)))["num_queries"] == 3
