"""Official DINO checkpoints convert to the canonical model and reproduce DINO's outputs.

Without the official code, state dicts in DINO's layout are made from the canonical model
by the inverse renaming and checked, key by key and shape by shape, against the layout
recorded from IDEA-Research/DINO (``data/dino_official_keys.json``). When
``third_party/DINO`` holds that repository, converted models also run side by side with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch
from weights import perturb

from frozenseg.convert import convert_checkpoint, convert_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.frozen import load_detector
from frozenseg.detector.model import build_detector
from frozenseg.formats import detect_format, dino

RECORDED = json.loads((Path(__file__).parent / "data" / "dino_official_keys.json").read_text())
DINO_REPO = Path(__file__).resolve().parents[1] / "third_party" / "DINO"

# Every DINO model: the inference settings of the official code.
DINO = dict(
    variant="dino", query_init="mixed", box_refine=True, proposal_score="max_class",
    decoder_norm=True, ref_point_head=True, pos_temperature=20.0, pos_offset=0.0,
    inverse_sigmoid_eps=1e-3, num_select=300,
)
# The small official builds the recorded layouts come from.
SMALL = dict(hidden_dim=256, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=64,
             num_queries=30, num_classes=7, dn_labelbook_size=7)
SWIN_T = {"name": "swin", "embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24),
          "window_size": 7, "out_indices": (1, 2, 3), "mlp_ratio": 4.0, "patch_size": 4,
          "in_chans": 3, "qkv_bias": True, "patch_norm": True}
VARIANTS = {
    "resnet50_4scale": DetectorConfig(**DINO, **SMALL, backbone={"name": "resnet50"},
                                      backbone_levels=(1, 2, 3), num_feature_levels=4),
    "resnet50_5scale": DetectorConfig(**DINO, **SMALL, backbone={"name": "resnet50"},
                                      backbone_levels=(0, 1, 2, 3), num_feature_levels=5),
    "swin_T_224_1k_4scale": DetectorConfig(**DINO, **SMALL, backbone=SWIN_T,
                                           backbone_levels=(1, 2, 3), num_feature_levels=4),
}
RESNET_VARIANTS = ["resnet50_4scale", "resnet50_5scale"]
# FocalNet-DINO: DINO's layout with a FocalNet under backbone.0. (a tiny one here).
FOCALNET = {"name": "focalnet", "embed_dim": 32, "depths": (1, 1, 1, 1),
            "focal_levels": (2, 2, 2, 2), "focal_windows": (3, 3, 3, 3), "out_indices": (1, 2, 3),
            "use_conv_embed": False, "use_layerscale": False, "use_postln": False,
            "use_postln_in_modulation": False, "normalize_modulator": False, "mlp_ratio": 4.0,
            "patch_size": 4, "in_chans": 3, "patch_norm": True}
CONVERTED = {**VARIANTS, "focalnet_4scale": dataclasses.replace(
    VARIANTS["resnet50_4scale"], backbone=FOCALNET)}
ARGS = {"nheads": 8, "num_select": 300, "pe_temperatureH": 20, "pe_temperatureW": 20}


def random_official_state_dict(variant: str) -> dict:
    config = CONVERTED[variant]
    return dino.official_state_dict(perturb(build_detector(config)).state_dict(), config)


def images_and_padding():
    """Two images of different sizes in one padded batch: (2, 3, 96, 128), (2, 96, 128)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, 70:] = True  # the second image is 70 x 90, padded right and bottom
    padding[1, :, 90:] = True
    images[1, :, padding[1]] = 0.0
    return images, padding


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_layout_is_the_recorded_one(variant):
    with torch.device("meta"):
        model = build_detector(VARIANTS[variant])
    layout = dino.official_state_dict(model.state_dict(), VARIANTS[variant])
    assert {k: list(v.shape) for k, v in layout.items()} == RECORDED[variant]


def test_full_size_dino_config_is_derived_from_shapes_with_or_without_args():
    """DINO-4scale R50 on COCO: 900 queries, 91 classes, 92 label_enc rows, FFN 2048."""
    config = DetectorConfig(**DINO, hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6,
                            dim_feedforward=2048, num_queries=900, num_classes=91,
                            dn_labelbook_size=91, backbone={"name": "resnet50"},
                            backbone_levels=(1, 2, 3), num_feature_levels=4)
    with torch.device("meta"):
        layout = dino.official_state_dict(build_detector(config).state_dict(), config)
    assert detect_format(layout).name == "dino"
    assert dino.derive_config(layout, ARGS) == (config, [])
    derived, notes = dino.derive_config(layout, {})
    assert derived == config
    assert [n.split(":")[0] for n in notes] == [
        "attention heads (head dim 32)", "position temperature", "post-processing top-k"]


@pytest.mark.parametrize("variant", CONVERTED)
def test_conversion_loads_strictly_and_drops_only_the_head_copies(variant):
    source = random_official_state_dict(variant)
    converted, report = convert_state_dict(source, args=ARGS)
    assert report.format == "dino" and report.ok, report.problem()
    assert report.config.to_dict() == CONVERTED[variant].to_dict()
    assert {k for k, _ in report.dropped} == {
        k for k in source if k.startswith(("transformer.decoder.class_embed.",
                                           "transformer.decoder.bbox_embed."))}
    assert ("backbone.0.body.layer1.0.conv1.weight" in dict(report.renamed)) == (
        variant.startswith("resnet"))
    model = build_detector(report.config)
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.label_enc.weight, source["label_enc.weight"])


@pytest.mark.parametrize("variant", RESNET_VARIANTS)
def test_a_batch_of_two_images_of_different_sizes_equals_two_singles(variant):
    """Each image alone (with its own padding, which DETR's outputs depend on) gives what
    it gives in the batch; the smaller image also runs at its own, unpadded size."""
    converted, report = convert_state_dict(random_official_state_dict(variant), args=ARGS)
    model = build_detector(report.config).eval()
    model.load_state_dict(converted, strict=True)
    images, padding = images_and_padding()
    with torch.no_grad():
        batch = model(images, padding)
        singles = [model(images[i : i + 1], padding[i : i + 1]) for i in range(2)]
        alone = model(images[1:, :, :70, :90], padding[1:, :70, :90])
    for i, single in enumerate(singles):
        torch.testing.assert_close(single.logits[-1][0], batch.logits[-1][i], atol=1e-4, rtol=0)
        torch.testing.assert_close(single.boxes[-1][0], batch.boxes[-1][i], atol=1e-4, rtol=0)
    assert alone.boxes[-1].shape == (1, 30, 4) and alone.boxes[-1].isfinite().all()


def test_a_renamed_key_and_a_changed_shape_are_reported_by_name():
    source = random_official_state_dict("resnet50_4scale")
    renamed = dict(source)
    renamed["transformer.encoder.layers.1.self_attn.value_projection.weight"] = renamed.pop(
        "transformer.encoder.layers.1.self_attn.value_proj.weight")
    _, report = convert_state_dict(renamed, args=ARGS)
    assert report.missing == ["transformer.encoder.layers.1.self_attn.value_proj.weight"]
    assert report.unexpected == ["transformer.encoder.layers.1.self_attn.value_projection.weight"]

    reshaped = dict(source, **{"input_proj.1.1.weight": torch.zeros(32)})
    _, report = convert_state_dict(reshaped, args=ARGS)
    assert report.mismatched == [("input_proj.1.1.weight", (32,), (256,))]
    assert "input_proj.1.1.weight" in report.problem()


def test_the_decoder_head_copies_must_equal_the_heads():
    source = random_official_state_dict("resnet50_4scale")
    source["transformer.decoder.bbox_embed.1.layers.2.bias"] += 1.0
    with pytest.raises(ValueError, match=r"transformer\.decoder\.bbox_embed\.1\.layers\.2\.bias"):
        convert_state_dict(source, args=ARGS)


def test_a_head_saved_only_as_the_decoder_copy_is_used():
    source = random_official_state_dict("resnet50_4scale")
    head = source.pop("class_embed.1.weight")
    converted, report = convert_state_dict(source, args=ARGS)
    assert report.ok and torch.equal(converted["class_embed.1.weight"], head)


@pytest.mark.parametrize("arg, value", [("decoder_sa_type", "ca_label"),
                                        ("two_stage_learn_wh", True), ("dilation", True)])
def test_training_arguments_frozenseg_does_not_reproduce_are_refused(arg, value):
    with pytest.raises(ValueError, match=arg):
        convert_state_dict(random_official_state_dict("resnet50_4scale"),
                           args={**ARGS, arg: value})


def test_convert_checkpoint_reads_a_dino_checkpoint_file(tmp_path):
    """As DINO's main.py saves it: {'model': state_dict, 'args': argparse.Namespace, ...}."""
    source = random_official_state_dict("resnet50_4scale")
    path = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": source, "args": argparse.Namespace(**ARGS, num_queries=30),
                "epoch": 11}, path)
    report = convert_checkpoint(path, tmp_path / "out")
    assert report.format == "dino" and report.config == VARIANTS["resnet50_4scale"]
    assert (tmp_path / "out" / "detector.safetensors").is_file()


# --- side by side with the official code (third_party/DINO) --------------------------------


@pytest.fixture(scope="module")
def official():
    """IDEA-Research/DINO's model builder on the CPU.

    Its deformable attention calls a compiled extension; the import is stubbed and the
    attention runs the repository's own pure-PyTorch ``ms_deform_attn_core_pytorch``.
    """
    if not (DINO_REPO / "models" / "dino" / "dino.py").is_file():
        pytest.skip("third_party/DINO (IDEA-Research/DINO) is not there")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "MultiScaleDeformableAttention",
                   types.ModuleType("MultiScaleDeformableAttention"))
        mp.syspath_prepend(str(DINO_REPO))
        # Other official repositories also have top-level models/ and util/ packages.
        for name in [n for n in sys.modules if n.split(".")[0] in ("models", "util")]:
            mp.delitem(sys.modules, name)
        model = importlib.import_module("models.dino.dino")
        core = importlib.import_module(
            "models.dino.ops.functions.ms_deform_attn_func").ms_deform_attn_core_pytorch
        mp.setattr("models.dino.ops.modules.ms_deform_attn.MSDeformAttnFunction",
                   types.SimpleNamespace(apply=lambda v, s, _i, loc, w, _step: core(v, s, loc, w)))
        mp.setattr("models.dino.backbone.is_main_process", lambda: False)  # no download
        yield model.build_dino, importlib.import_module("util.misc").NestedTensor
    for name in [n for n, m in sys.modules.items()
                 if str(getattr(m, "__file__", "")).startswith(str(DINO_REPO))]:
        del sys.modules[name]


def official_model(build_dino, variant: str, **changes):
    """An official DINO as ``VARIANTS[variant]`` describes, eval mode, random weights."""
    scale = 5 if "5scale" in variant else 4
    cfg = runpy.run_path(str(DINO_REPO / "config" / "DINO" / f"DINO_{scale}scale.py"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(SMALL, device="cpu", **changes)
    cfg["backbone"] = "swin_T_224_1k" if "swin" in variant else "resnet50"
    model, _, _ = build_dino(argparse.Namespace(**cfg))
    return perturb(model), cfg


def run_official(model, NestedTensor, images, padding):
    """pred_logits/pred_boxes per decoder layer, encoder memory and decoder states."""
    captured = {}
    hooks = [
        model.transformer.encoder.register_forward_hook(
            lambda m, i, out: captured.update(memory=out[0])),
        model.transformer.decoder.register_forward_hook(
            lambda m, i, out: captured.update(states=torch.stack(out[0]))),
    ]
    with torch.no_grad():
        out = model(NestedTensor(images, padding))
    for hook in hooks:
        hook.remove()
    layers = [*out["aux_outputs"], out]
    captured["logits"] = torch.stack([o["pred_logits"] for o in layers])
    captured["boxes"] = torch.stack([o["pred_boxes"] for o in layers])
    return captured


SIDE_BY_SIDE = {
    # Separate per-layer heads; layer 0's pushes reference w, h past 1 - 1e-3 and layer 1's
    # pulls them back, so the final boxes show DINO's inverse_sigmoid clamp (eps 1e-3).
    "resnet50_4scale": dict(dec_pred_class_embed_share=False, dec_pred_bbox_embed_share=False),
    "resnet50_5scale": {},  # the official setting: one head shared by all decoder layers
    "swin_T_224_1k_4scale": {},
}


@pytest.mark.parametrize("variant", SIDE_BY_SIDE)
def test_converted_model_matches_the_official_dino(official, variant):
    build_dino, NestedTensor = official
    theirs, cfg = official_model(build_dino, variant, **SIDE_BY_SIDE[variant])
    if not cfg.get("dec_pred_bbox_embed_share", True):
        with torch.no_grad():
            theirs.bbox_embed[0].layers[2].bias[2:] = 12.0
            theirs.bbox_embed[1].layers[2].bias[2:] = -8.0
    converted, report = convert_state_dict(theirs.state_dict(), args=cfg)
    assert report.ok and report.config.to_dict() == VARIANTS[variant].to_dict()
    ours = build_detector(report.config).eval()
    ours.load_state_dict(converted, strict=True)
    images, padding = images_and_padding()
    expected = run_official(theirs, NestedTensor, images, padding)
    with torch.no_grad():
        got = ours(images, padding)
    mine = {"memory": got.encoder_states[-1], "states": torch.stack(got.decoder_states),
            "logits": torch.stack(got.logits), "boxes": torch.stack(got.boxes)}
    errors = {k: (mine[k] - expected[k]).abs().max().item() for k in mine}
    print(f"{variant}: max abs error", errors)
    assert max(errors.values()) <= 1e-4, errors


def test_a_checkpoint_saved_as_main_py_saves_it_converts(official, tmp_path):
    """The official model with its default shared heads, saved by main.py's call: its heads
    reach convert as views of one storage, and the converted detector still matches."""
    build_dino, NestedTensor = official
    theirs, cfg = official_model(build_dino, "resnet50_5scale", use_ema=False)
    assert theirs.class_embed[0].weight is theirs.class_embed[1].weight  # shared, as built
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": theirs.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 11).state_dict(),
                "epoch": 11, "args": argparse.Namespace(**cfg)}, path)
    convert_checkpoint(path, tmp_path / "converted")
    ours = load_detector(tmp_path / "converted").model
    images, padding = images_and_padding()
    expected = run_official(theirs, NestedTensor, images, padding)
    with torch.no_grad():
        got = ours(images, padding)
    torch.testing.assert_close(torch.stack(got.boxes), expected["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(got.logits), expected["logits"], atol=1e-4, rtol=0)
