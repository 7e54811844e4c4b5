"""Official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR @ 11169a6).

State dicts in the official layout are made from a random canonical model by the inverse
renaming (``official_detr.official_layout``); key names and counts read off the official
model (2 encoder and 2 decoder layers, 4 levels, ResNet-50) show that the layout is the real
one. The side-by-side tests at the end run the official model from ``third_party/`` and
skip without it.
"""

from __future__ import annotations

import dataclasses
import functools

import official_detr
import pytest
import torch

from frozenseg.convert import convert_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.model import build_detector

NAME = "deformable_detr"
VARIANTS = {
    "single-stage": dict(query_init="learned", box_refine=False),
    "box-refine": dict(query_init="learned", box_refine=True),
    "two-stage": dict(query_init="proposals", box_refine=True),
}
SMALL = dict(variant=NAME, hidden_dim=32, nheads=2, enc_layers=2, dec_layers=2,
             dim_feedforward=64, num_queries=12, num_classes=91)

# Recorded from the official model: (number of keys, keys present, keys absent).
COMMON_KEYS = [
    "backbone.0.body.conv1.weight", "backbone.0.body.bn1.running_var",
    "backbone.0.body.layer1.0.downsample.0.weight", "backbone.0.body.layer4.2.bn3.running_mean",
    "input_proj.0.0.weight", "input_proj.3.1.bias", "transformer.level_embed",
    "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
    "transformer.encoder.layers.0.norm2.bias",
    "transformer.decoder.layers.1.cross_attn.value_proj.weight",
    "transformer.decoder.layers.0.self_attn.in_proj_weight",
    "transformer.decoder.layers.0.norm3.weight", "class_embed.1.bias",
    "bbox_embed.1.layers.2.weight",
]
OFFICIAL_KEYS = {
    "single-stage": (377, ["query_embed.weight", "transformer.reference_points.weight"],
                     ["transformer.decoder.bbox_embed.0.layers.0.weight", "class_embed.2.weight"]),
    "box-refine": (389, ["query_embed.weight", "transformer.decoder.bbox_embed.1.layers.2.bias"],
                   ["transformer.decoder.class_embed.0.weight", "class_embed.2.weight"]),
    "two-stage": (414, [
        "class_embed.2.weight", "bbox_embed.2.layers.0.weight",
        "transformer.decoder.class_embed.2.bias",
        "transformer.decoder.bbox_embed.2.layers.2.weight",
        "transformer.enc_output.weight", "transformer.enc_output_norm.bias",
        "transformer.pos_trans.weight", "transformer.pos_trans_norm.weight",
    ], ["query_embed.weight", "transformer.reference_points.weight"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def config_of(variant: str, **changes) -> DetectorConfig:
    return DetectorConfig(**{**SMALL, **VARIANTS[variant], **changes})


def args_of(config: DetectorConfig) -> dict:
    """ckpt['args'] as main.py saves it (the fields the converter reads)."""
    return {"nheads": config.nheads, "num_queries": config.num_queries,
            "with_box_refine": config.box_refine, "two_stage": config.two_stage}


@functools.cache
def checkpoint(variant: str) -> tuple[dict, dict]:
    """(canonical state dict, the same weights in the official layout)."""
    config = config_of(variant)
    canonical = official_detr.canonical_model(config).state_dict()
    return canonical, official_detr.official_layout(canonical, config)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_generated_layout_is_the_official_one(variant):
    _, official = checkpoint(variant)
    count, present, absent = OFFICIAL_KEYS[variant]
    assert len(official) == count
    assert set(COMMON_KEYS + present) <= set(official)
    assert not set(absent) & set(official)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converts_to_the_canonical_weights(variant):
    canonical, official = checkpoint(variant)
    converted, report = convert_state_dict(official, args=args_of(config_of(variant)))
    assert report.format == NAME and report.ok, report.problem()
    assert report.config == config_of(variant) and not report.notes
    assert converted.keys() == canonical.keys()
    assert all(torch.equal(converted[k], canonical[k]) for k in canonical)
    copies = {k for k in official if k.startswith("transformer.decoder.") and "_embed." in k}
    assert {key for key, _ in report.dropped} == copies
    official_detr.load_converted(report.config, converted)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_batch_of_two_equals_two_singles(variant):
    _, official = checkpoint(variant)
    converted, report = convert_state_dict(official, args=args_of(config_of(variant)))
    official_detr.assert_batch_equals_singles(
        official_detr.load_converted(report.config, converted))


def test_a_renamed_key_and_a_changed_shape_are_reported_by_name():
    _, official = checkpoint("single-stage")
    args = args_of(config_of("single-stage"))
    state_dict = dict(official)
    state_dict["transformer.encoder.layers.1.self_attn.value_projection.weight"] = state_dict.pop(
        "transformer.encoder.layers.1.self_attn.value_proj.weight")
    _, report = convert_state_dict(state_dict, args=args)
    assert report.missing == ["transformer.encoder.layers.1.self_attn.value_proj.weight"]
    assert report.unexpected == ["transformer.encoder.layers.1.self_attn.value_projection.weight"]

    state_dict = dict(official)
    state_dict["backbone.0.body.layer2.0.bn1.weight"] = torch.zeros(64)
    _, report = convert_state_dict(state_dict, args=args)
    assert report.mismatched == [("backbone.0.body.layer2.0.bn1.weight", (64,), (128,))]
    assert "backbone.0.body.layer2.0.bn1.weight" in report.problem()


def test_the_decoder_copy_of_a_head_must_equal_it():
    _, official = checkpoint("box-refine")
    state_dict = dict(official)
    key = "transformer.decoder.bbox_embed.1.layers.0.bias"
    state_dict[key] = state_dict[key] + 1
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_state_dict(state_dict, args=args_of(config_of("box-refine")))
    del state_dict["bbox_embed.1.layers.0.bias"]  # a copy alone is taken as the head
    converted, report = convert_state_dict(state_dict, args=args_of(config_of("box-refine")))
    assert report.ok and (key, "bbox_embed.1.layers.0.bias") in report.renamed


def test_without_args_the_official_defaults_are_assumed_and_noted():
    _, official = checkpoint("two-stage")
    _, report = convert_state_dict(official)
    assert report.ok  # heads vs points is a guess the shapes cannot check: the notes say so
    assert (report.config.nheads, report.config.dec_n_points, report.config.num_queries) == (
        8, 1, 300)
    assert sorted(n.split()[0] for n in report.notes) == ["nheads", "num_queries"]


def test_single_scale_reads_layer4_only():
    config = dataclasses.replace(config_of("single-stage"), num_feature_levels=1,
                                 backbone_levels=(3,))
    with torch.device("meta"):
        canonical = build_detector(config).state_dict()
    official = official_detr.official_layout(canonical, config)
    _, report = convert_state_dict(official, args=args_of(config))
    assert report.ok and report.config == config


def test_unsupported_checkpoints_are_refused_with_the_reason():
    _, official = checkpoint("single-stage")
    args = args_of(config_of("single-stage"))
    with pytest.raises(ValueError, match="DC5"):
        convert_state_dict(official, args={**args, "dilation": True})
    with pytest.raises(ValueError, match="h_deformable_detr"):
        convert_state_dict(official, format=NAME, args={**args, "num_queries_one2one": 12})


# --- Side by side with the official code (needs third_party/Deformable-DETR) ---------------

# The official two-stage code embeds proposals with 128 features per coordinate whatever the
# width (get_proposal_pos_embed), so it runs only at hidden_dim 256.
SIDE_BY_SIDE = {
    "single-stage": dict(hidden_dim=32, nheads=2),
    "box-refine": dict(hidden_dim=32, nheads=2, with_box_refine=True),
    "two-stage": dict(hidden_dim=256, nheads=8, with_box_refine=True, two_stage=True),
}


@pytest.mark.skipif(not official_detr.available(NAME), reason="third_party/Deformable-DETR absent")
@pytest.mark.parametrize("variant", SIDE_BY_SIDE)
def test_matches_the_official_model(variant):
    args = official_detr.official_args(NAME, enc_layers=2, dec_layers=2, dim_feedforward=64,
                                       num_queries=12, **SIDE_BY_SIDE[variant])
    assert max(official_detr.compare_with_official(NAME, args).values()) <= 1e-4
