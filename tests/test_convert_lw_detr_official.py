"""Official LW-DETR checkpoints (Atten4Vis/LW-DETR's main.py: ``{'model', 'args', ...}``)
convert to what transformers' LwDetr converts to, and reproduce its outputs."""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

import official_detr
import pytest
import torch
from artifacts import (
    converts_like_transformers,
    lw_detr_official_args,
    lw_detr_official_checkpoint,
    lw_detr_official_layout,
    lw_detr_official_model,
    rf_detr_official_checkpoint,
)
from test_checkpoint_corpus import images_and_padding
from test_convert_rt_detr import lively
from typer.testing import CliRunner

from frozenseg.checkpoint import load_checkpoint
from frozenseg.cli import app
from frozenseg.convert import convert_state_dict
from frozenseg.detector.frozen import load_detector
from frozenseg.formats import FORMATS

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

# Names read from the official modules (LWDETR; Joiner -> Backbone's ViT with CAE attention
# and MultiScaleProjector's stages_sampling / C2f of ConvX / LayerNorm; Transformer's decoder
# layers with nn.MultiheadAttention, group DETR's two-stage heads) for P3 and P5 levels of a
# ViT narrower than 512 (P3: one ConvTranspose2d; P5: a strided ConvX).
OFFICIAL_KEYS = [
    "backbone.0.encoder.pos_embed", "backbone.0.encoder.patch_embed.proj.weight",
    "backbone.0.encoder.patch_embed.proj.bias", "backbone.0.encoder.blocks.0.norm1.weight",
    "backbone.0.encoder.blocks.0.attn.qkv.weight", "backbone.0.encoder.blocks.0.attn.q_bias",
    "backbone.0.encoder.blocks.1.attn.v_bias", "backbone.0.encoder.blocks.0.attn.proj.weight",
    "backbone.0.encoder.blocks.2.norm2.bias", "backbone.0.encoder.blocks.0.mlp.fc1.weight",
    "backbone.0.encoder.blocks.3.mlp.fc2.bias", "backbone.0.encoder.blocks.0.gamma_1",
    "backbone.0.encoder.blocks.3.gamma_2",
    "backbone.0.projector.stages_sampling.0.0.0.weight",
    "backbone.0.projector.stages_sampling.0.2.0.bias",
    "backbone.0.projector.stages_sampling.1.0.0.conv.weight",
    "backbone.0.projector.stages_sampling.1.2.0.bn.running_var",
    "backbone.0.projector.stages.0.0.cv1.conv.weight",
    "backbone.0.projector.stages.0.0.cv1.bn.num_batches_tracked",
    "backbone.0.projector.stages.1.0.cv2.bn.weight",
    "backbone.0.projector.stages.0.0.m.1.cv2.conv.weight",
    "backbone.0.projector.stages.1.0.m.0.cv1.bn.running_mean",
    "backbone.0.projector.stages.1.1.bias",
    "transformer.decoder.layers.1.self_attn.in_proj_weight",
    "transformer.decoder.layers.0.self_attn.in_proj_bias",
    "transformer.decoder.layers.0.self_attn.out_proj.bias",
    "transformer.decoder.layers.0.norm1.weight", "transformer.decoder.layers.1.norm2.bias",
    "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight",
    "transformer.decoder.layers.0.cross_attn.attention_weights.bias",
    "transformer.decoder.layers.0.cross_attn.value_proj.weight",
    "transformer.decoder.layers.0.cross_attn.output_proj.bias",
    "transformer.decoder.layers.0.linear1.weight", "transformer.decoder.layers.1.linear2.bias",
    "transformer.decoder.layers.0.norm3.weight", "transformer.decoder.norm.weight",
    "transformer.decoder.ref_point_head.layers.1.weight", "transformer.enc_output.2.weight",
    "transformer.enc_output_norm.1.bias", "transformer.enc_out_class_embed.2.weight",
    "transformer.enc_out_bbox_embed.1.layers.2.bias", "class_embed.weight",
    "bbox_embed.layers.2.weight", "query_feat.weight", "refpoint_embed.weight",
]
# Spellings only transformers has: none may be left in the official layout.
TRANSFORMERS_ONLY = re.compile(r"^model\.|layernorm|[qkv]_proj|o_proj|scale_layers|"
                               r"sampling_layers|bottlenecks|projector\..*\.norm\.|"
                               r"intermediate|reference_point|layers\.\d+\.mlp|\.conv[12]\.")
VARIANTS = {"p3-p5": dict(scales=(2.0, 0.5)), "p4": dict(scales=(1.0,), out_indices=(2, 4))}


@pytest.fixture(scope="module", params=VARIANTS.values(), ids=VARIANTS.keys())
def official(request):
    """A random transformers LwDetr, its state dict in the official layout, and main.py's
    arguments for it (as a dict, the way the loader hands them on)."""
    hf, config = lw_detr_official_model(**request.param)
    return hf, lw_detr_official_layout(hf.state_dict()), vars(lw_detr_official_args(config))


def test_the_written_layout_has_the_official_modules_names():
    hf, _ = lw_detr_official_model()
    layout = lw_detr_official_layout(hf.state_dict())
    assert not [key for key in OFFICIAL_KEYS if key not in layout]
    assert not [key for key in layout if TRANSFORMERS_ONLY.search(key)]
    assert layout["backbone.0.encoder.blocks.0.attn.qkv.weight"].shape == (3 * 48, 48)
    assert "backbone.0.encoder.blocks.0.attn.qkv.bias" not in layout  # CAE: q_bias, v_bias


def test_the_formats_tell_the_layouts_apart(official, tmp_path):
    """Each official layout matches its own format's keys and no other format's."""
    hf, layout, _ = official
    rf = load_checkpoint(rf_detr_official_checkpoint(tmp_path, released=True).path)
    assert [f.name for f in FORMATS.values() if f.matches(layout)] == ["lw_detr"]
    assert [f.name for f in FORMATS.values() if f.matches(rf.state_dict)] == [
        "huggingface_lw_detr"]
    assert not FORMATS["lw_detr"].matches(hf.state_dict())


def test_converts_to_what_the_transformers_model_converts_to(official):
    """The same canonical tensors and config as transformers' model with its config.json:
    the ViT's outputs, windows and heads, the projector's scales, the queries from args."""
    hf, layout, args = official
    report = converts_like_transformers(hf, layout, args, "lw_detr")
    assert ("backbone.0.encoder.blocks.0.attn.qkv.weight",
            "backbone.vit.blocks.0.attn.q_proj.weight") in report.renamed
    assert report.config.backbone["window_side"] == 4 and report.config.backbone["heads"] == 12


def max_differences(folder, reference) -> tuple[float, float]:
    """Largest |difference| of the logits and boxes of the detector converted into
    ``folder`` and of ``reference`` (transformers' model) on a padded batch."""
    images, padding = images_and_padding()
    with torch.no_grad():
        got = load_detector(folder).model(images, padding)
    logits, boxes = reference(images, padding)
    return ((got.logits[-1] - logits).abs().max().item(),
            (got.boxes[-1] - boxes).abs().max().item())


@pytest.mark.parametrize("released", [False, True], ids=["main-py-ema", "released"])
def test_frozenseg_convert_reproduces_transformers(tmp_path, released):
    """``frozenseg convert`` on main.py's ``{model, optimizer, lr_scheduler, epoch, args,
    ema_model}`` (the EMA copy taken) and on a released ``{model, args}`` with one P4
    level: transformers' logits and boxes on a padded batch within 1e-4."""
    artifact = lw_detr_official_checkpoint(tmp_path / "run", released=released,
                                           scales=(1.0,) if released else (2.0, 0.5))
    result = runner.invoke(app, ["convert", "--detector", str(artifact.path), "--out",
                                 str(tmp_path / "lw")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "lw_detr" in result.output and "assumed" not in result.output
    assert max(max_differences(tmp_path / "lw", artifact.reference)) < 1e-4


def test_negative_output_indexes_count_from_the_end(official):
    """main.py's default ``out_feature_indexes [-1]`` style: -1 is the last block."""
    hf, layout, args = official
    depth = args["vit_encoder_num_layers"]
    negative = [i - depth if i == depth - 1 else i for i in args["out_feature_indexes"]]
    assert negative != args["out_feature_indexes"]
    converts_like_transformers(hf, layout, {**args, "out_feature_indexes": negative}, "lw_detr")


def test_an_argument_missing_from_the_namespace_is_assumed_and_said(official):
    _, layout, args = official
    del args["group_detr"]
    _, report = convert_state_dict(layout, args=args)
    assert "LW-DETR: args.group_detr not saved, assumed 13" in report.notes


@pytest.mark.parametrize(("setting", "value"), [
    ("encoder", "res18vd"), ("two_stage", False), ("bbox_reparam", False),
    ("lite_refpoint_refine", False), ("decoder_norm", "Identity"),
    ("position_embedding", "learned"), ("projector_scale", ["P3", "P6"]),
])
def test_arguments_frozenseg_does_not_reproduce_are_refused_in_one_line(official, setting,
                                                                       value):
    _, layout, args = official
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(layout, args={**args, setting: value})
    shown = value[-1] if setting == "projector_scale" else value
    assert f"{setting}={shown!r}" in str(err.value) and "\n" not in str(err.value)


def test_a_file_without_its_arguments_is_refused_then_takes_them_from_config(tmp_path):
    """``{model}`` alone: refused in one line naming the file; main.py's arguments written
    to a JSON file and passed as ``--config`` convert it."""
    artifact = lw_detr_official_checkpoint(tmp_path / "run", released=True)
    payload = torch.load(artifact.path, weights_only=False)
    torch.save({"model": payload["model"]}, tmp_path / "bare.pth")
    command = ["convert", "--detector", str(tmp_path / "bare.pth"), "--out",
               str(tmp_path / "out")]
    result = runner.invoke(app, command, terminal_width=300)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "window_block_indexes" in lines[0] and "bare.pth" in lines[0]
    assert not (tmp_path / "out").exists()
    (tmp_path / "args.json").write_text(json.dumps(vars(payload["args"])))
    result = runner.invoke(app, [*command, "--config", str(tmp_path / "args.json")],
                           terminal_width=200)
    assert result.exit_code == 0 and "assumed" not in result.output, result.output
    assert max(max_differences(tmp_path / "out", artifact.reference)) < 1e-4


# --- side by side with the official code (third_party/LW-DETR) -----------------------------

REPO = Path(__file__).resolve().parents[1] / "third_party" / "LW-DETR"


def official_model(args: argparse.Namespace):
    """The official LWDETR as models/lwdetr.py's build() wires it (without its criterion),
    random weights off their init, every deformable attention on the repository's own
    PyTorch core (its export path: the compiled op is not built); and its NestedTensor."""
    with official_detr._importing_from(REPO):
        lwdetr = importlib.import_module("models.lwdetr")
        nested = importlib.import_module("util.misc").NestedTensor
        torch.manual_seed(0)
        model = lwdetr.LWDETR(
            lwdetr.build_backbone(args), lwdetr.build_transformer(args), num_classes=91,
            num_queries=args.num_queries, aux_loss=True, group_detr=args.group_detr,
            two_stage=True, lite_refpoint_refine=True, bbox_reparam=True)
    for module in model.modules():
        if type(module).__name__ == "MSDeformAttn":
            module._export = True
    return lively(model).eval(), nested


def official_differences(folder: Path) -> tuple[float, float]:
    """The official model (a 4-block vit_tiny, P3 and P5) saved as main.py saves it, then
    ``frozenseg convert``-ed: the largest |difference| of logits and boxes on a padded
    batch of two 128 x 192 images (the second 96 x 128)."""
    _, config = lw_detr_official_model()
    args = lw_detr_official_args(config, pretrained_encoder=None, num_feature_levels=2)
    model, nested = official_model(args)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 3}, folder / "lw.pth")
    result = runner.invoke(app, ["convert", "--detector", str(folder / "lw.pth"), "--out",
                                 str(folder / "out")], terminal_width=200)
    assert result.exit_code == 0 and "assumed" not in result.output, result.output
    images = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 128, 192, dtype=torch.bool)
    padding[1, 96:], padding[1, :, 128:] = True, True
    images = images.masked_fill(padding[:, None], 0.0)
    with torch.no_grad():
        expected = model(nested(images, padding))
        got = load_detector(folder / "out").model(images, padding)
    return ((got.logits[-1] - expected["pred_logits"]).abs().max().item(),
            (got.boxes[-1] - expected["pred_boxes"]).abs().max().item())


@pytest.mark.skipif(not (REPO / "models" / "lwdetr.py").is_file(),
                    reason="third_party/LW-DETR (Atten4Vis/LW-DETR) is not there")
def test_the_official_models_own_file_reproduces_it(tmp_path):
    assert max(official_differences(tmp_path)) < 1e-4
