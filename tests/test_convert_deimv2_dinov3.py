"""DEIMv2 with a DINOv3 backbone (S, M, L, X): ``save_pretrained`` folders of transformers'
Deimv2ForObjectDetection convert into a detector that reproduces its outputs."""

from __future__ import annotations

import json

import pytest
import torch
from test_convert_rt_detr import images, lively
from weights import perturb

from frozenseg.convert import convert_checkpoint
from frozenseg.detector.backbones import dinov3
from frozenseg.detector.config import IMAGENET_MEAN, IMAGENET_STD, normalize
from frozenseg.detector.folder import read_config, read_weights
from frozenseg.detector.frozen import load_detector
from frozenseg.detector.model import build_detector

transformers = pytest.importorskip("transformers")

# Tiny ViTs as transformers' DEIMv2 conversion configures each size: S and M a distilled
# ViT-Tiny (no registers, no key bias, only the last layer normed), L DINOv3 ViT-S/16
# (registers, key bias, every output normed), X ViT-S+/16 (a gated MLP). Four or five
# blocks, two heads of 16 channels; X's last block is past its outputs.
VITS = {
    "s": dict(num_register_tokens=0, key_bias=False, layerscale_value=1.0,
              apply_layernorm=False, pos_embed_rescale=None, out_indices=[2, 3, 4]),
    "l": dict(num_register_tokens=4, key_bias=True, layerscale_value=1e-5,
              apply_layernorm=True, out_indices=[1, 3, 4]),
    "x": dict(num_register_tokens=4, key_bias=True, layerscale_value=1e-5,
              apply_layernorm=True, use_gated_mlp=True, hidden_act="silu",
              num_hidden_layers=5, out_indices=[2, 3, 4]),
    # As the official DEIMv2 builds them (test_convert_deimv2_official): its ViT-Tiny keeps
    # the key bias and norms with eps 1e-6; its DINOv3 ViTs have 6 heads.
    "official-tiny": dict(num_register_tokens=0, key_bias=True, layerscale_value=1.0,
                          apply_layernorm=False, layer_norm_eps=1e-6, out_indices=[2, 3, 4]),
    "official-dinov3": dict(num_register_tokens=4, key_bias=True, layerscale_value=1e-5,
                            apply_layernorm=True, num_attention_heads=6, out_indices=[1, 3, 4]),
    "official-dinov3-plus": dict(num_register_tokens=4, key_bias=True, layerscale_value=1e-5,
                                 apply_layernorm=True, num_attention_heads=6,
                                 use_gated_mlp=True, hidden_act="silu", out_indices=[2, 3, 4]),
}
VARIANTS = {
    "s": dict(vit="s"),
    "m-projected": dict(vit="s", encoder_hidden_dim=48, hidden_size=48),
    "l": dict(vit="l", use_gateway=False, rope_theta=50.0),
    "x-shared-box-head": dict(vit="x", share_bbox_head=True, adapter=4),
}


def random_hf_model(vit: str = "s", hidden_size: int = 32, adapter: int = 8,
                    rope_theta: float = 100.0, **settings):
    """A small random Deimv2ForObjectDetection with a DINOv3 backbone and its config as a
    dict (config.json)."""
    torch.manual_seed(0)
    encoder_dim = settings.pop("encoder_hidden_dim", 32)
    backbone = transformers.DINOv3ViTConfig(
        **{"num_hidden_layers": 4, "num_attention_heads": 2, **VITS[vit]},
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, rope_theta=rope_theta)
    config = transformers.Deimv2Config(
        backbone_config=backbone, spatial_tuning_adapter_inplanes=adapter,
        encoder_hidden_dim=encoder_dim, encoder_in_channels=[encoder_dim] * 3,
        encoder_ffn_dim=48, encoder_attention_heads=2, encoder_has_trailing_conv=False,
        d_model=32, decoder_in_channels=[encoder_dim] * 3, decoder_ffn_dim=64,
        decoder_layers=3, decoder_attention_heads=2, num_queries=20, num_labels=5,
        depth_mult=0.34, lqe_hidden_dim=16, max_num_bins=8, **settings)
    model = transformers.Deimv2ForObjectDetection(config)
    return perturb(lively(model)), config.to_dict()


def converted(hf, folder):
    """``hf`` written with save_pretrained, converted from that folder, and built."""
    hf.save_pretrained(folder / "hf")
    report = convert_checkpoint(folder / "hf", folder / "out")
    assert report.format == "huggingface_deimv2" and report.ok, report.problem()
    ours = build_detector(read_config(folder / "out")).eval()
    ours.load_state_dict(read_weights(folder / "out"), strict=True)
    return ours


def outputs(model, hf=False):
    """The last layer's (logits, boxes) on the tests' two 96 x 128 images."""
    with torch.no_grad():
        if hf:
            out = model(pixel_values=images())
            return out.logits, out.pred_boxes
        out = model(images(), torch.zeros(2, 96, 128, dtype=torch.bool))
        return out.logits[-1], out.boxes[-1]


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_folder_matches_transformers(variant, tmp_path):
    hf, _ = random_hf_model(**variant)
    ours = converted(hf, tmp_path)
    (logits, boxes), (want_logits, want_boxes) = outputs(ours), outputs(hf, hf=True)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, want_boxes, atol=1e-4, rtol=0)


def test_the_frozen_detector_normalises_and_ranks_as_transformers(tmp_path):
    """Images in [0, 1]: FrozenDetector's top 20 (ImageNet-normalised inside) against
    transformers' on the pixels its image processor normalises, post-processed."""
    hf, _ = random_hf_model(**VARIANTS["l"])
    converted(hf, tmp_path)
    detector = load_detector(tmp_path / "out", top_k=20)
    pixels = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = detector(list(pixels))
        raw = hf(pixel_values=normalize(pixels, None, IMAGENET_MEAN, IMAGENET_STD))
    results = transformers.RTDetrImageProcessor().post_process_object_detection(
        raw, threshold=0.0, target_sizes=[(96, 128)] * 2)
    for i, result in enumerate(results):
        torch.testing.assert_close(out.scores[i], result["scores"][:20], atol=1e-4, rtol=0)
        assert torch.equal(out.labels[i], result["labels"][:20])
        torch.testing.assert_close(out.boxes_xyxy_pixels()[i], result["boxes"][:20],
                                   atol=1e-2, rtol=0)


def test_the_config_says_what_the_weights_cannot(tmp_path):
    """Heads, outputs, norms, RoPE base and the ImageNet normalisation from config.json;
    the rest from shapes."""
    hf, _ = random_hf_model(**VARIANTS["x-shared-box-head"])
    converted(hf, tmp_path)
    config = read_config(tmp_path / "out")
    spec = config.backbone
    assert spec["name"] == "dinov3_sta" and (spec["dim"], spec["heads"]) == (32, 2)
    assert spec["out_layers"] == (2, 3, 4) and spec["normed"] == (True, True, True)
    assert (spec["registers"], spec["gated_mlp"], spec["activation"]) == (4, True, "silu")
    assert spec["adapter_dim"] == 4 and config.image_std == (0.229, 0.224, 0.225)
    assert not any(k.startswith("backbone.vit.blocks.4.") for k in read_weights(
        tmp_path / "out"))  # the block past the outputs is not kept


@pytest.mark.parametrize("mistake", ["no rope", "no adapter", "every output normed"])
def test_each_part_of_the_backbone_matters(mistake, tmp_path, monkeypatch):
    """The converted model matches transformers (above); leaving out RoPE, the adapter's
    maps or the choice of normed outputs moves the logits far beyond the tests' 1e-4."""
    hf, _ = random_hf_model(**VARIANTS["s"])
    ours = converted(hf, tmp_path)
    vit, sta = ours.backbone.vit, ours.backbone.sta
    if mistake == "no rope":  # every angle zero: no rotation
        monkeypatch.setattr(dinov3, "rope_table", lambda h, w, head_dim, **_: (
            torch.ones(h * w, head_dim), torch.zeros(h * w, head_dim)))
    elif mistake == "no adapter":
        for conv in (sta.conv2, sta.conv3, sta.conv4):
            conv.norm.weight.zero_(), conv.norm.bias.zero_()
    else:
        vit.normed = (True, True, True)
    assert (outputs(ours)[0] - outputs(hf, hf=True)[0]).abs().max() > 1e-3


def test_any_input_size_runs_and_the_stride_4_map_is_the_adapters_stem(tmp_path):
    """Sides that are not multiples of 32 are padded inside the backbone and the maps
    cropped to ceil(side / stride); C1 alone runs the adapter's stem only; the frozen
    detector gives the whole contract on a batch of two sizes."""
    hf, _ = random_hf_model(**VARIANTS["s"])
    backbone = converted(hf, tmp_path).backbone
    maps = backbone(torch.randn(1, 3, 100, 70))
    assert [tuple(m.shape[-2:]) for m in maps] == [(25, 18), (13, 9), (7, 5), (4, 3)]
    assert [m.shape[1] for m in maps] == backbone.channels == [8, 48, 64, 64]
    image = images()[:1]
    torch.testing.assert_close(backbone(image, stages=1)[0], backbone(image)[0])
    detector = load_detector(tmp_path / "out")
    with torch.no_grad():
        out = detector([torch.rand(3, 100, 70), torch.rand(3, 64, 96)])
    assert out.c1.shape == (2, 8, 25, 24) and out.boxes.shape[:2] == out.scores.shape
    assert out.level_shapes == [(13, 12), (7, 6), (4, 3)]


@pytest.mark.parametrize(("setting", "value", "mention"), [
    ("query_bias", False, "query_bias=False"),
    ("hidden_act", "relu", "hidden_act='relu'"),
    ("out_indices", [3, 4], "out_indices=[3, 4]"),
])
def test_unsupported_backbone_settings_are_refused_in_one_line(setting, value, mention,
                                                               tmp_path):
    """On disk: the one-line refusal names the folder and the setting; nothing written."""
    hf, _ = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["backbone_config"][setting] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    message = str(err.value)
    assert "hf" in message and mention in message and "\n" not in message
    assert not (tmp_path / "out").exists()
