"""Official D-FINE / DEIM checkpoints (the solvers' layout) convert to what transformers'
D-FINE converts to, and reproduce its outputs."""

from __future__ import annotations

import re

import pytest
import torch
from artifacts import (
    converts_like_transformers,
    d_fine_official_layout,
    d_fine_official_yaml,
    on_the_transposed_grid,
)
from test_convert_d_fine import DEIM, VARIANTS, random_hf_model
from test_convert_rt_detr import images

from frozenseg.convert import convert_state_dict
from frozenseg.detector.model import build_detector
from frozenseg.formats import FORMATS, detect_format

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# Names read from the official modules (HGNetv2's StemBlock / HG_Stage / HG_Block /
# LightConvBNAct / EseModule, HybridEncoder's TransformerEncoderLayer / RepNCSPELAN4 /
# CSPLayer / VGGBlock / SCDown, DFINETransformer's TransformerDecoder / Gate / LQE / MLP)
# for the "s" variant (light blocks in stages 2 and 3, learnable affines, three levels,
# three decoder layers).
OFFICIAL_KEYS = [
    "backbone.stem.stem1.conv.weight", "backbone.stem.stem1.bn.running_var",
    "backbone.stem.stem1.lab.scale", "backbone.stem.stem2a.conv.weight",
    "backbone.stem.stem4.bn.weight", "backbone.stages.0.blocks.0.layers.0.conv.weight",
    "backbone.stages.0.blocks.0.aggregation.0.conv.weight",
    "backbone.stages.0.blocks.0.aggregation.1.lab.bias",
    "backbone.stages.1.downsample.conv.weight", "backbone.stages.1.downsample.bn.bias",
    "backbone.stages.2.blocks.0.layers.0.conv1.conv.weight",
    "backbone.stages.2.blocks.1.layers.1.conv2.bn.running_mean",
    "encoder.input_proj.0.conv.weight", "encoder.input_proj.2.norm.running_mean",
    "encoder.encoder.0.layers.0.self_attn.in_proj_weight",
    "encoder.encoder.0.layers.0.self_attn.in_proj_bias",
    "encoder.encoder.0.layers.0.self_attn.out_proj.weight",
    "encoder.encoder.0.layers.0.linear1.weight", "encoder.encoder.0.layers.0.linear2.bias",
    "encoder.encoder.0.layers.0.norm1.weight", "encoder.encoder.0.layers.0.norm2.bias",
    "encoder.lateral_convs.1.conv.weight", "encoder.lateral_convs.0.norm.running_var",
    "encoder.fpn_blocks.0.cv1.conv.weight", "encoder.fpn_blocks.0.cv2.0.conv1.conv.weight",
    "encoder.fpn_blocks.0.cv2.0.conv2.norm.weight",
    "encoder.fpn_blocks.0.cv2.0.bottlenecks.0.conv1.conv.weight",
    "encoder.fpn_blocks.0.cv2.0.bottlenecks.0.conv2.norm.bias",
    "encoder.fpn_blocks.1.cv2.1.conv.weight", "encoder.fpn_blocks.0.cv3.0.conv1.conv.weight",
    "encoder.fpn_blocks.0.cv3.1.norm.running_mean", "encoder.fpn_blocks.0.cv4.conv.weight",
    "encoder.downsample_convs.0.0.cv1.conv.weight",
    "encoder.downsample_convs.1.0.cv2.norm.weight", "encoder.pan_blocks.1.cv4.norm.bias",
    "decoder.up", "decoder.reg_scale", "decoder.decoder.up", "decoder.decoder.reg_scale",
    "decoder.decoder.layers.0.self_attn.in_proj_weight",
    "decoder.decoder.layers.2.self_attn.out_proj.bias", "decoder.decoder.layers.0.norm1.weight",
    "decoder.decoder.layers.0.cross_attn.sampling_offsets.weight",
    "decoder.decoder.layers.1.cross_attn.attention_weights.bias",
    "decoder.decoder.layers.0.cross_attn.num_points_scale",
    "decoder.decoder.layers.0.gateway.gate.weight", "decoder.decoder.layers.0.gateway.norm.bias",
    "decoder.decoder.layers.0.linear1.weight", "decoder.decoder.layers.0.linear2.bias",
    "decoder.decoder.layers.0.norm3.weight",
    "decoder.decoder.lqe_layers.2.reg_conf.layers.1.weight",
    "decoder.denoising_class_embed.weight", "decoder.query_pos_head.layers.1.weight",
    "decoder.enc_output.proj.weight", "decoder.enc_output.norm.bias",
    "decoder.enc_score_head.weight", "decoder.enc_bbox_head.layers.2.bias",
    "decoder.dec_score_head.2.weight", "decoder.dec_bbox_head.2.layers.2.weight",
    "decoder.pre_bbox_head.layers.0.weight", "decoder.anchors", "decoder.valid_mask",
]
# Spellings only transformers has: none may be left in the official layout.
TRANSFORMERS_ONLY = re.compile(r"^model\.|^(class|bbox)_embed\.|convolution|normalization|"
                               r"embedder|csp_rep|encoder_attn|_layer_norm|[qkv]_proj|fc[12]\.")


def official(variant: str = "s", family: str = "D-FINE"):
    """A random transformers model (DEIM's: with its activations, ``DEIM``), its state dict
    in the official layout, and the YAML it was made from."""
    hf, args = random_hf_model(**VARIANTS[variant], **(DEIM if family == "DEIM" else {}))
    return hf, d_fine_official_layout(hf.state_dict()), d_fine_official_yaml(args, family)


def test_the_written_layout_has_the_official_modules_names():
    _, layout, _ = official()
    assert not [key for key in OFFICIAL_KEYS if key not in layout]
    assert not [key for key in layout if TRANSFORMERS_ONLY.search(key)]
    assert layout["encoder.encoder.0.layers.0.self_attn.in_proj_weight"].shape == (96, 32)
    # The decoder's input projections are nn.Identity where the widths agree, else
    # Sequential(conv, norm).
    assert not any(key.startswith("decoder.input_proj.") for key in layout)
    _, projected, _ = official("plain-projected")
    assert {"decoder.input_proj.0.conv.weight", "decoder.input_proj.2.norm.running_var"} <= set(
        projected)


@pytest.mark.parametrize("variant", ["s", "plain-projected", "n-two-levels", "bins-16",
                                     "released-points", "two-levels-points-silu"])
def test_converts_to_what_the_transformers_folder_converts_to(variant):
    """Key by key, the same canonical tensors and the same config."""
    hf, layout, yaml = official(variant)
    report = converts_like_transformers(hf, layout, yaml, "d_fine", aifi_transposed_grid=True)
    dropped = dict(report.dropped)
    assert "decoder.anchors" in dropped and "decoder.decoder.up" in dropped


@pytest.mark.parametrize(("variant", "family"), [
    ("s", "D-FINE"), ("released-points", "D-FINE"), ("released-points", "DEIM")])
def test_the_converted_model_reproduces_transformers(variant, family):
    """DEIM's released config (points [3, 6, 3], SiLU in the FFN and every head) against
    transformers' D-FINE with DEIM's heads swapped in; AIFI's positions on the official
    code's transposed grid (the images are not square: 3 x 4 tokens at stride 32)."""
    hf, layout, yaml = official(variant, family)
    for aifi in hf.model.encoder.aifi:
        on_the_transposed_grid(aifi.position_embedding)
    converted, report = convert_state_dict(layout, args=yaml)
    heads = "silu" if family == "DEIM" else "relu"
    assert (report.config.mlp_activation, report.config.lqe_activation) == (heads, heads)
    ours = build_detector(report.config).eval()
    ours.load_state_dict(converted, strict=True)
    with torch.no_grad():
        expected = hf(pixel_values=images())
        got = ours(images(), torch.zeros(2, 96, 128, dtype=torch.bool))
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("section", "setting", "value"), [
    ("DFINETransformer", "cross_attn_method", "discrete"),
    ("DFINETransformer", "query_select_method", "agnostic"),
    ("DFINETransformer", "activation", "gelu"),
    ("DFINETransformer", "mlp_act", "gelu"),
    ("HybridEncoder", "version", "rt_detrv2"),
    ("DFINETransformer", "eval_idx", 1),
    ("HybridEncoder", "enc_act", "relu"),
])
def test_yaml_settings_frozenseg_does_not_reproduce_are_refused_in_one_line(
        section, setting, value):
    _, layout, yaml = official()
    yaml[section][setting] = value
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(layout, args=yaml)
    assert f"{setting}={value!r}" in str(err.value) and "\n" not in str(err.value)


def test_a_silu_decoder_without_the_model_it_configures_is_refused():
    """DEIM's quality heads take the decoder's activation and D-FINE's do not: a YAML whose
    ``model`` names neither cannot say which."""
    _, layout, yaml = official("released-points", "DEIM")
    del yaml["model"]
    with pytest.raises(ValueError, match="without model: DEIM or DFINE") as err:
        convert_state_dict(layout, args=yaml)
    assert "\n" not in str(err.value)


def test_heads_the_yaml_leaves_out_are_the_official_modules_eight():
    """The released YAMLs leave ``nhead`` out: HybridEncoder and DFINETransformer default to 8
    heads whatever the width (N: 128 wide, heads of 16), not the width / 32 assumed for
    transformers' config.json, which misreads the points per head and refused N."""
    hf, args = random_hf_model(**VARIANTS["s"], encoder_attention_heads=8,
                               decoder_attention_heads=8)
    yaml = d_fine_official_yaml(args)
    del yaml["HybridEncoder"]["nhead"], yaml["DFINETransformer"]["nhead"]
    report = converts_like_transformers(hf, d_fine_official_layout(hf.state_dict()), yaml,
                                        "d_fine", aifi_transposed_grid=True)
    assert report.config.nheads == 8


def test_the_formats_tell_the_layouts_apart():
    hf, layout, _ = official()
    assert detect_format(layout).name == "d_fine"
    assert not FORMATS["rt_detr"].matches(layout)
    assert not FORMATS["d_fine"].matches(hf.state_dict())


def test_a_config_reads_its_includes_and_deims_silu_decoder(tmp_path):
    """D-FINE's and DEIM's configs name their bases in ``__include__`` (relative paths, the
    file's own settings last): DEIM's base sets the decoder's activations to silu, which
    the converted DEIM file takes."""
    import yaml as pyyaml

    from frozenseg.convert import convert_checkpoint, read_training_config

    _, layout, settings = official("released-points", "DEIM")
    (tmp_path / "base").mkdir()
    (tmp_path / "deim").mkdir()
    decoder = {k: v for k, v in settings["DFINETransformer"].items()
               if k not in ("activation", "mlp_act")}
    base = {**settings, "model": "DEIM", "DFINETransformer": {**decoder, "num_queries": 300}}
    (tmp_path / "base" / "dfine.yml").write_text(pyyaml.safe_dump(base))
    (tmp_path / "base" / "deim.yml").write_text(pyyaml.safe_dump(
        {"DFINETransformer": {"activation": "silu", "mlp_act": "silu"}}))
    top = {"__include__": ["../base/dfine.yml"],
           "DFINETransformer": {"num_queries": settings["DFINETransformer"]["num_queries"]}}
    (tmp_path / "deim" / "dfine.yml").write_text(pyyaml.safe_dump(top))
    (tmp_path / "deim" / "deim.yml").write_text(pyyaml.safe_dump(
        {"__include__": ["./dfine.yml", "../base/deim.yml"]}))
    read = read_training_config(tmp_path / "deim" / "deim.yml")
    assert read["DFINETransformer"] == settings["DFINETransformer"]
    assert read["HybridEncoder"] == settings["HybridEncoder"]
    torch.save({"model": layout}, tmp_path / "deim.pth")
    report = convert_checkpoint(tmp_path / "deim.pth", tmp_path / "out",
                                config=tmp_path / "deim" / "deim.yml")
    assert report.ok and not report.notes
    config = report.config
    assert (config.activation, config.mlp_activation, config.lqe_activation) == ("silu",) * 3
    assert config.dec_n_points == (3, 6, 3)
    # Without DEIM's base the same weights read as D-FINE's ReLU decoder.
    _, relu = convert_state_dict(layout, args=read_training_config(tmp_path / "deim" /
                                                                   "dfine.yml"))
    assert (relu.config.activation, relu.config.mlp_activation) == ("relu", "relu")
    (tmp_path / "deim" / "deim.yml").write_text(pyyaml.safe_dump(
        {"__include__": ["../base/gone.yml"]}))
    with pytest.raises(ValueError, match="gone.yml is not there"):
        convert_checkpoint(tmp_path / "deim.pth", tmp_path / "out2",
                           config=tmp_path / "deim" / "deim.yml")
