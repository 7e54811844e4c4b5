"""Converted Hugging Face LW-DETR and RF-DETR models reproduce transformers' own outputs."""

from __future__ import annotations

import pytest
import torch
from test_convert_rt_detr import lively

from frozenseg.convert import convert_state_dict
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector

transformers = pytest.importorskip("transformers")

# Small: a 48-wide ViT of four blocks (patch 8), a 32-wide decoder of two layers.
VIT = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=8)
VARIANTS = {
    # LW-DETR large-style: P3 and P5 levels (scales 2 and 0.5), 2 x 2 windows.
    "lw-p3p5": dict(family="lw", scales=[2.0, 0.5], windows=4),
    # LW-DETR small-style: one P4 level, 4 x 4 windows, a last block no output reads (as
    # LW-DETR's 10-block ViT with outputs after blocks 2, 4, 5 and 9).
    "lw-p4": dict(family="lw", scales=[1.0], windows=16, out_indices=[1, 2, 3]),
    "rf": dict(family="rf", windows=2, out_indices=[1, 2, 3]),
    "rf-one-window": dict(family="rf", windows=1),
}
SIZE = (64, 96)  # multiples of patch x window side, as both originals require


def random_hf_model(family: str = "lw", scales=(1.0,), windows: int = 4,
                    out_indices=(1, 3, 4), **vit):
    """A small random Lw/RfDetrForObjectDetection and its config as a dict (config.json);
    ``vit``: ViT settings over VIT's."""
    torch.manual_seed(0)
    decoder = dict(d_model=32, decoder_ffn_dim=48, decoder_layers=2, decoder_n_points=2,
                   decoder_self_attention_heads=2, decoder_cross_attention_heads=4,
                   num_queries=12, group_detr=3, num_labels=5, c2f_num_blocks=2)
    if family == "lw":
        backbone = transformers.LwDetrViTConfig(
            **{**VIT, **vit}, image_size=64, pretrain_image_size=48, window_block_indices=[0, 2],
            out_indices=list(out_indices), num_windows=windows)
        config = transformers.LwDetrConfig(backbone_config=backbone,
                                           projector_scale_factors=list(scales), **decoder)
        model = transformers.LwDetrForObjectDetection(config)
    else:
        backbone = transformers.RfDetrDinov2Config(**{**VIT, **vit}, image_size=48,
                                                   out_indices=list(out_indices),
                                                   num_windows=windows)
        config = transformers.RfDetrConfig(backbone_config=backbone, **decoder)
        model = transformers.RfDetrForObjectDetection(config)
    return lively(model).eval(), config.to_dict()


def images(size=SIZE):
    """Two images of noise (normalised pixels: both models take them that way)."""
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def converted(hf, args):
    state, report = convert_state_dict(hf.state_dict(), args=args)
    assert report.format == "huggingface_lw_detr" and report.ok, report.problem()
    ours = build_detector(report.config).eval()
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_model_matches_transformers(variant):
    hf, args = random_hf_model(**variant)
    ours = converted(hf, args)
    with torch.no_grad():
        expected = hf(pixel_values=images())
        got = ours(images(), torch.zeros(2, *SIZE, dtype=torch.bool))
    torch.testing.assert_close(torch.stack(got.decoder_states),  # (layers, B, Q, C)
                               expected.intermediate_hidden_states, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["lw", "rf"])
def test_a_padded_batch_matches_transformers_with_its_pixel_mask(family):
    """Images of two sizes in one batch: the padding is masked as transformers' pixel_mask
    masks it, and boxes are relative to each image's own size in both."""
    hf, args = random_hf_model(family=family, scales=(2.0, 0.5), windows=4)
    ours = converted(hf, args)
    batch = images()
    padding = torch.zeros(2, *SIZE, dtype=torch.bool)
    padding[1, 40:], padding[1, :, 64:] = True, True
    batch = batch.masked_fill(padding[:, None], 0.0)
    with torch.no_grad():
        expected = hf(pixel_values=batch, pixel_mask=(~padding).long())
        got = ours(batch, padding)
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["lw", "rf"])
def test_top_k_ranks_as_the_post_processor(family):
    """FrozenDetector's top-K equals transformers' post_process_object_detection (LW-DETR's
    processor is Deformable DETR's; RF-DETR has its own)."""
    hf, args = random_hf_model(family=family)
    detector = FrozenDetector(converted(hf, args), top_k=20)
    detector.register_buffer("mean", torch.zeros(3, 1, 1), persistent=False)
    detector.register_buffer("std", torch.ones(3, 1, 1), persistent=False)
    processor = (transformers.DeformableDetrImageProcessor() if family == "lw"
                 else transformers.RfDetrImageProcessor())
    with torch.no_grad():
        out = detector(list(images()))
        raw = hf(pixel_values=images())
    results = processor.post_process_object_detection(raw, threshold=0.0,
                                                      target_sizes=[SIZE] * 2, top_k=20)
    for i, result in enumerate(results):
        torch.testing.assert_close(out.scores[i], result["scores"][:20], atol=1e-4, rtol=0)
        assert torch.equal(out.labels[i], result["labels"][:20])
        torch.testing.assert_close(out.boxes_xyxy_pixels()[i], result["boxes"][:20],
                                   atol=1e-2, rtol=0)


@pytest.mark.parametrize("family", ["lw", "rf"])
def test_the_frozen_detector_gives_the_whole_contract(family):
    """memory: the projector levels; c1: the finest (stage1 recomputes it); embed_boxes runs
    the decoder on given boxes; the head is sized from the detector; any image size runs."""
    hf, args = random_hf_model(family=family, scales=(2.0, 0.5), windows=4)
    detector = FrozenDetector(converted(hf, args), top_k=10)
    sizes = [(61, 90), (50, 70)]  # not multiples of the window tiling: padded inside
    pictures = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(h)) for h, w in sizes]
    out = detector(pictures)
    strides = detector.model.backbone.strides
    assert out.level_shapes == [(-(-61 // s), -(-90 // s)) for s in map(int, strides)]
    assert out.memory.shape == (2, sum(h * w for h, w in out.level_shapes), 32)
    assert out.c1.shape == (2, 32, -(-61 // 4), -(-90 // 4))  # the finest level, at stride 4
    torch.testing.assert_close(detector.stage1(pictures), out.c1)
    assert detector.head_dims == {"hidden_dim": 32, "num_levels": len(strides), "c1_channels": 32,
                                  "memory_stride": strides[0]}  # patch 8: P3 4, P4 8
    boxes = [torch.tensor([[4.0, 5.0, 40.0, 50.0], [10.0, 2.0, 30.0, 20.0]]),
             torch.tensor([[0.0, 0.0, 70.0, 50.0]])]
    embedded = detector.embed_boxes(pictures, boxes)
    assert embedded.queries.shape == (2, 2, 32) and embedded.query_mask.tolist() == [
        [True, True], [True, False]]
    # Each image's boxes are decoded alone (a ViT sees the padded canvas, so an image alone
    # is another input than the same image padded in a batch, as in the originals).
    first = detector.embed_boxes(pictures, [boxes[0], boxes[1][:0]])
    torch.testing.assert_close(first.queries[0], embedded.queries[0], atol=1e-5, rtol=0)
    assert torch.isfinite(out.queries).all() and torch.isfinite(embedded.queries).all()


@pytest.mark.parametrize(("family", "setting", "value", "mention"), [
    ("lw", "decoder_activation_function", "gelu", "decoder_activation_function='gelu'"),
    ("lw", "attention_bias", False, "attention_bias=False"),
    ("rf", "use_swiglu_ffn", True, "use_swiglu_ffn=True"),
    ("lw", "hidden_act", "relu", "hidden_act='relu'"),
])
def test_settings_frozenseg_does_not_reproduce_are_refused_in_one_line(family, setting, value,
                                                                        mention):
    hf, args = random_hf_model(family=family)
    if setting in args["backbone_config"]:
        args = {**args, "backbone_config": {**args["backbone_config"], setting: value}}
    else:
        args = {**args, setting: value}
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(hf.state_dict(), args=args)
    assert mention in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("stride", [8, 14, 16])
def test_the_head_fusion_puts_a_level_of_any_stride_on_the_stride_4_grid(stride):
    """A map of each cell's pixel centre, upsampled by stride / 4 as the head's fusion does,
    gives the stride-4 cells' own centres (bilinear is exact on a linear ramp, inside)."""
    from frozenseg.head.encoders import upsample_to

    cells = 6
    centres = (torch.arange(cells, dtype=torch.float64) + 0.5) * stride
    up = upsample_to(centres.expand(1, 1, cells, cells).clone(), (cells * stride // 4,) * 2,
                     stride / 4)
    expected = (torch.arange(up.shape[-1], dtype=torch.float64) + 0.5) * 4
    inside = slice(stride // 4, -(stride // 4))
    torch.testing.assert_close(up[0, 0, 0, inside], expected[inside])


@pytest.mark.parametrize(("change", "mention"), [
    ({"decoder_activation_function": "gelu"}, "decoder_activation_function='gelu'"),
    ({"backbone_config": None}, "needs its config.json"),
])
def test_convert_refuses_a_folder_in_one_line_naming_the_file(tmp_path, change, mention):
    import json

    from typer.testing import CliRunner

    from frozenseg.cli import app

    hf, _ = random_hf_model(family="lw")
    hf.save_pretrained(tmp_path / "lw")
    settings = json.loads((tmp_path / "lw" / "config.json").read_text())
    (tmp_path / "lw" / "config.json").write_text(json.dumps({**settings, **change}))
    result = CliRunner().invoke(app, ["convert", "--detector", str(tmp_path / "lw"),
                                      "--out", str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and mention in lines[0] and "model.safetensors" in lines[0], lines
    assert not (tmp_path / "out").exists()
