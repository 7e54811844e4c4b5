"""Official H-Deformable-DETR checkpoints (HDETR/H-Deformable-DETR @ f58ceb1).

As for Deformable DETR (test_convert_deformable_detr.py): official-layout state dicts are
made from random canonical models by the inverse renaming, plus the training-only
one-to-many query rows; key names and counts were read off the official model (2 encoder
and 2 decoder layers, 4 levels). The side-by-side tests at the end need
``third_party/H-Deformable-DETR`` and skip without it.
"""

from __future__ import annotations

import functools

import official_detr
import pytest
import torch

from frozenseg.convert import convert_state_dict
from frozenseg.detector.config import DetectorConfig

NAME = "h_deformable_detr"
ONE2MANY = 30
SWIN_T = {"name": "swin", "embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24),
          "window_size": 7, "out_indices": (1, 2, 3), "mlp_ratio": 4.0, "patch_size": 4,
          "in_chans": 3, "qkv_bias": True, "patch_norm": True}
VARIANTS = {  # all released configs use --with_box_refine; most --two_stage --mixed_selection
    "r50-mixed": dict(query_init="mixed"),
    "r50-two-stage": dict(query_init="proposals"),
    "r50-single-stage": dict(query_init="learned"),
    "swin-t-mixed": dict(query_init="mixed", backbone=SWIN_T),
}
SMALL = dict(variant=NAME, hidden_dim=32, nheads=2, enc_layers=2, dec_layers=2,
             dim_feedforward=64, num_queries=12, num_classes=91, box_refine=True,
             ref_point_head=False, decoder_norm=False, proposal_score="first_class",
             pos_temperature=10000.0, pos_offset=-0.5)

# Recorded from the official model: (number of keys, keys present, keys absent).
R50_KEYS = ["backbone.0.body.conv1.weight", "backbone.0.body.layer3.5.bn2.running_var",
            "input_proj.0.0.weight", "transformer.decoder.bbox_embed.1.layers.2.bias",
            "transformer.decoder.layers.1.self_attn.in_proj_bias", "class_embed.1.weight"]
TWO_STAGE_KEYS = ["class_embed.2.bias", "bbox_embed.2.layers.2.weight",
                  "transformer.decoder.class_embed.2.weight",
                  "transformer.decoder.bbox_embed.2.layers.0.weight", "transformer.enc_output.bias",
                  "transformer.enc_output_norm.weight", "transformer.pos_trans.bias",
                  "transformer.pos_trans_norm.bias"]
SWIN_KEYS = ["backbone.0.body.patch_embed.proj.weight", "backbone.0.body.patch_embed.norm.bias",
             "backbone.0.body.layers.0.blocks.0.attn.relative_position_bias_table",
             "backbone.0.body.layers.0.blocks.0.attn.relative_position_index",
             "backbone.0.body.layers.2.blocks.5.mlp.fc2.weight",
             "backbone.0.body.layers.2.downsample.reduction.weight",
             "backbone.0.body.norm1.weight", "backbone.0.body.norm3.bias"]
OFFICIAL_KEYS = {
    "r50-mixed": (415, R50_KEYS + TWO_STAGE_KEYS + ["query_embed.weight"],
                  ["transformer.reference_points.weight"]),
    "r50-two-stage": (414, R50_KEYS + TWO_STAGE_KEYS, ["query_embed.weight"]),
    "r50-single-stage": (
        389, R50_KEYS + ["query_embed.weight", "transformer.reference_points.bias"],
        ["class_embed.2.weight", "transformer.decoder.class_embed.0.weight"]),
    "swin-t-mixed": (337, SWIN_KEYS + TWO_STAGE_KEYS + ["query_embed.weight"],
                     ["backbone.0.body.norm0.weight", "backbone.0.body.conv1.weight",
                      "backbone.0.body.layers.3.downsample.reduction.weight"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def config_of(variant: str) -> DetectorConfig:
    return DetectorConfig(**{**SMALL, **VARIANTS[variant]})


def args_of(config: DetectorConfig) -> dict:
    """ckpt['args'] as main.py saves it (the fields the converter reads, and a few more)."""
    return {"nheads": config.nheads, "num_queries_one2one": config.num_queries,
            "num_queries_one2many": ONE2MANY, "with_box_refine": config.box_refine,
            "two_stage": config.two_stage, "mixed_selection": config.query_init == "mixed",
            "look_forward_twice": True}


@functools.cache
def checkpoint(variant: str) -> tuple[dict, dict]:
    """(canonical state dict, the same weights in the official layout, with
    ONE2MANY extra query rows where there is a query_embed)."""
    config = config_of(variant)
    canonical = official_detr.canonical_model(config).state_dict()
    width = {"mixed": 1, "learned": 2}.get(config.query_init)
    extra = torch.randn(ONE2MANY, width * config.hidden_dim) if width else None
    return canonical, official_detr.official_layout(canonical, config, extra)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_generated_layout_is_the_official_one(variant):
    _, official = checkpoint(variant)
    count, present, absent = OFFICIAL_KEYS[variant]
    assert len(official) == count
    assert set(present) <= set(official)
    assert not set(absent) & set(official)
    if "query_embed.weight" in official:
        assert official["query_embed.weight"].shape[0] == 12 + ONE2MANY


@pytest.mark.parametrize("variant", VARIANTS)
def test_converts_to_the_canonical_weights(variant):
    canonical, official = checkpoint(variant)
    converted, report = convert_state_dict(official, format=NAME,
                                           args=args_of(config_of(variant)))
    assert report.format == NAME and report.ok, report.problem()
    assert report.config == config_of(variant)
    assert converted.keys() == canonical.keys()
    assert all(torch.equal(converted[k], canonical[k]) for k in canonical)
    if "query_embed.weight" in official:  # the one-to-many rows are dropped, and said so
        assert (f"query_embed.weight[12:{12 + ONE2MANY}]", "one-to-many queries (training only)"
                ) in report.dropped
        assert any("first 12 of 42 rows" in note for note in report.notes)
    official_detr.load_converted(report.config, converted)


def test_the_format_is_recognised_by_its_keys():
    for variant in ("r50-mixed", "swin-t-mixed"):
        _, report = convert_state_dict(checkpoint(variant)[1], args=args_of(config_of(variant)))
        assert report.format == NAME
    # Without mixed selection the keys are Deformable DETR's; the args tell them apart.
    with pytest.raises(ValueError, match="format h_deformable_detr"):
        convert_state_dict(checkpoint("r50-two-stage")[1],
                           args=args_of(config_of("r50-two-stage")))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_batch_of_two_equals_two_singles(variant):
    _, official = checkpoint(variant)
    converted, report = convert_state_dict(official, format=NAME,
                                           args=args_of(config_of(variant)))
    official_detr.assert_batch_equals_singles(
        official_detr.load_converted(report.config, converted))


def test_num_queries_one2one_defaults_to_300_and_must_fit_query_embed():
    _, official = checkpoint("r50-two-stage")
    _, report = convert_state_dict(official, format=NAME, args={"nheads": 2, "topk": 50})
    assert report.ok and (report.config.num_queries, report.config.num_select) == (300, 50)
    assert any(n.startswith("num_queries_one2one") for n in report.notes)
    _, official = checkpoint("r50-mixed")
    with pytest.raises(ValueError, match="42 rows, fewer than the 300"):
        convert_state_dict(official, format=NAME, args={"nheads": 2})


def test_a_renamed_key_and_a_changed_shape_are_reported_by_name():
    _, official = checkpoint("swin-t-mixed")
    args = args_of(config_of("swin-t-mixed"))
    state_dict = dict(official)
    state_dict["transformer.pos_trans.weights"] = state_dict.pop("transformer.pos_trans.weight")
    _, report = convert_state_dict(state_dict, args=args)
    assert (report.missing, report.unexpected) == (["transformer.pos_trans.weight"],
                                                    ["transformer.pos_trans.weights"])
    state_dict = dict(official)
    state_dict["backbone.0.body.layers.1.blocks.1.norm1.weight"] = torch.zeros(10)
    _, report = convert_state_dict(state_dict, args=args)
    assert report.mismatched == [
        ("backbone.0.body.layers.1.blocks.1.norm1.weight", (10,), (192,))]


# --- Side by side with the official code (needs third_party/H-Deformable-DETR) -------------

# Two-stage official code runs only at hidden_dim 256 (128 proposal features per coordinate).
SIDE_BY_SIDE = {
    "r50-mixed": dict(two_stage=True, mixed_selection=True),
    "r50-two-stage": dict(two_stage=True),
    "r50-single-stage": dict(hidden_dim=32, nheads=2),
    "swin-t-mixed": dict(two_stage=True, mixed_selection=True, backbone="swin_tiny"),
}


@pytest.mark.skipif(not official_detr.available(NAME),
                    reason="third_party/H-Deformable-DETR absent")
@pytest.mark.parametrize("variant", SIDE_BY_SIDE)
def test_matches_the_official_model(variant):
    args = official_detr.official_args(
        NAME, enc_layers=2, dec_layers=2, dim_feedforward=64, num_queries_one2one=12,
        num_queries_one2many=ONE2MANY, with_box_refine=True, look_forward_twice=True,
        **SIDE_BY_SIDE[variant])
    assert max(official_detr.compare_with_official(NAME, args).values()) <= 1e-4
