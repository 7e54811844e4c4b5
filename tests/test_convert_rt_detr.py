"""Converted Hugging Face RT-DETR (v1 and v2) models reproduce transformers' own outputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from artifacts import RT_DETR_SMALL, rt_detr_official_layout
from weights import perturb

from frozenseg.convert import convert_checkpoint, convert_state_dict
from frozenseg.detector.frozen import FrozenDetector, load_detector
from frozenseg.detector.model import build_detector

transformers = pytest.importorskip("transformers")

# Small: a bottleneck ResNet-vd of one block per stage, 32-wide encoder and decoder.
BACKBONES = {
    "bottleneck": dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1],
                       layer_type="bottleneck"),
    "basic": dict(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[2, 1, 1, 1],
                  layer_type="basic"),
}
VARIANTS = {
    "v1": dict(version="v1", backbone="bottleneck"),
    "v1-basic-expansion": dict(version="v1", backbone="basic", hidden_expansion=0.5,
                               encoder_hidden_dim=48),
    "v2": dict(version="v2", backbone="bottleneck"),
    "v2-basic": dict(version="v2", backbone="basic"),
}


def random_hf_model(version: str = "v1", backbone: str = "bottleneck",
                    points: list[int] | None = None, **settings):
    """A small random RTDetr(V2)ForObjectDetection and its config as a dict (config.json);
    ``points``: v2 with one sampling point count per decoder level (:func:`per_level_attention`)."""
    torch.manual_seed(0)
    config_class, model_class = {
        "v1": (transformers.RTDetrConfig, transformers.RTDetrForObjectDetection),
        "v2": (transformers.RTDetrV2Config, transformers.RTDetrV2ForObjectDetection),
    }[version]
    width = BACKBONES[backbone]["hidden_sizes"]
    encoder_dim = settings.pop("encoder_hidden_dim", 32)
    config = config_class(
        backbone_config=transformers.RTDetrResNetConfig(**BACKBONES[backbone],
                                                        out_indices=[2, 3, 4]),
        encoder_hidden_dim=encoder_dim, encoder_in_channels=width[1:], encoder_ffn_dim=48,
        encoder_attention_heads=2, d_model=32, decoder_in_channels=[encoder_dim] * 3,
        decoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=2, num_queries=20,
        num_labels=settings.pop("num_labels", 5), **settings,
    )
    model = model_class(config)
    if points is None:
        return perturb(lively(model)), config.to_dict()
    per_level_attention(model, points)
    return perturb(lively(model)), {**config.to_dict(), "decoder_n_points": points}


def per_level_attention(model: torch.nn.Module, points: list[int]) -> None:
    """RT-DETR v2's decoder attention with ``points[l]`` sampling points on level l, laid out
    as the official code's ``num_points: [...]`` (heads x sum(points) rows, each head's
    points level after level; ``n_points_scale`` 1 / n for each of a level's n points).
    transformers 5's config takes one count, but its attention's sampling splits the points
    by ``n_points_list`` and scales them by ``n_points_scale``: only its views read
    n_levels x n_points, so they are set to one "level" of all the points."""
    for layer in model.model.decoder.layers:
        attn = layer.encoder_attn
        rows = attn.n_heads * sum(points)
        attn.sampling_offsets = torch.nn.Linear(attn.d_model, rows * 2)
        attn.attention_weights = torch.nn.Linear(attn.d_model, rows)
        attn.n_points_list, attn.n_levels, attn.n_points = list(points), 1, sum(points)
        attn.n_points_scale = torch.tensor([1 / n for n in points for _ in range(n)])


@torch.no_grad()
def lively(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Matrices at unit gain (1 / sqrt(fan-in)), norm scales near 1, biases near 0:
    transformers' init (small matrices, zero batch-norm scales) leaves the random model's
    memory nearly constant, so that the top-k proposals tie."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() > 1:
            p.copy_(noise / p[0].numel() ** 0.5)
        else:
            p.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model


def images():
    """Two 96 x 128 images (no padding: RT-DETR has no padding mask) of noise."""
    return torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_model_matches_transformers(variant):
    hf, args = random_hf_model(**variant)
    converted, report = convert_state_dict(hf.state_dict(), args=args)
    assert report.format == "huggingface_rt_detr" and report.ok, report.problem()
    ours = build_detector(report.config).eval()
    ours.load_state_dict(converted, strict=True)
    with torch.no_grad():
        expected = hf(pixel_values=images(), output_hidden_states=True)
        got = ours(images(), torch.zeros(2, 96, 128, dtype=torch.bool))
    torch.testing.assert_close(torch.stack(got.decoder_states, 1),
                               expected.intermediate_hidden_states, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_top_k_ranks_as_the_post_processor(version):
    """FrozenDetector's top-K equals transformers' post_process_object_detection."""
    assert_ranks_as_the_post_processor(*random_hf_model(version=version))


def assert_ranks_as_the_post_processor(hf, args: dict) -> None:
    """The converted ``hf``'s FrozenDetector top 20 against RTDetrImageProcessor's (RT-DETR's
    and D-FINE's post-processing): scores, labels, pixel boxes."""
    converted, report = convert_state_dict(hf.state_dict(), args=args)
    model = build_detector(report.config)
    model.load_state_dict(converted)
    detector = FrozenDetector(model, top_k=20)
    processor = transformers.RTDetrImageProcessor()
    with torch.no_grad():
        out = detector(list(images()))
        raw = hf(pixel_values=images())
    results = processor.post_process_object_detection(raw, threshold=0.0,
                                                      target_sizes=[(96, 128)] * 2)
    for i, result in enumerate(results):
        torch.testing.assert_close(out.scores[i], result["scores"][:20], atol=1e-4, rtol=0)
        assert torch.equal(out.labels[i], result["labels"][:20])
        torch.testing.assert_close(out.boxes_xyxy_pixels()[i], result["boxes"][:20],
                                   atol=1e-2, rtol=0)


@pytest.mark.parametrize(("setting", "value", "mention"), [
    ("decoder_method", "discrete", "decoder_method='discrete'"),
    ("decoder_offset_scale", 1.0, "decoder_offset_scale=1.0"),
    ("normalize_before", True, "normalize_before=True"),
])
def test_settings_the_op_does_not_take_are_refused_in_one_line(setting, value, mention):
    hf, args = random_hf_model(version="v2")
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(hf.state_dict(), args={**args, setting: value})
    assert mention in str(err.value) and "\n" not in str(err.value)


UNEVEN_POINTS = [2, 5, 3]  # uneven, so the attention pads levels 0 and 2


def assert_reproduces(detector: torch.nn.Module, hf: torch.nn.Module, width: int = 128) -> None:
    """``detector``'s last-layer logits and boxes are transformers' (``hf``'s), to 1e-4, on
    :func:`images` cut to ``width``."""
    pixels = images()[..., :width]
    with torch.no_grad():
        expected = hf(pixel_values=pixels)
        got = detector(pixels, torch.zeros(2, 96, width, dtype=torch.bool))
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)


def test_per_level_point_counts_convert_from_a_folder(tmp_path):
    """A save_pretrained folder of v2 with points [2, 5, 3]: the counts are read from the
    saved n_points_scale, agree with config.json, and the rows are scattered as D-FINE's."""
    hf, args = random_hf_model(version="v2", points=UNEVEN_POINTS)
    hf.save_pretrained(tmp_path / "hf")
    # transformers writes its one count; a folder of this model says one per level
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({**config, "decoder_n_points": UNEVEN_POINTS}))
    report = convert_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert report.config.dec_n_points == tuple(UNEVEN_POINTS)
    assert_reproduces(load_detector(tmp_path / "out").model, hf.eval())


def test_per_level_point_counts_convert_from_an_official_file(tmp_path):
    """A released RT-DETR v2 file ({'ema': {'module'}}, its YAML beside) with num_points
    [2, 5, 3]: the attention rows and num_points_scale are transformers' (the official row
    layout), every other tensor its canonical conversion written in the official names.
    It converts to the folder's tensors; the official AIFI grid is transformers 5's only on
    square maps, so the outputs are compared on square images."""
    hf, args = random_hf_model(version="v2", points=UNEVEN_POINTS)
    canonical, _ = convert_state_dict(hf.state_dict(), args=args)
    layout = rt_detr_official_layout(canonical, "v2")
    for key, tensor in hf.state_dict().items():
        if m := re.match(r"model\.decoder\.layers\.(\d+)\.encoder_attn\.(sampling_offsets\.|"
                         r"attention_weights\.|n_points_scale)(.*)", key):
            name = "num_points_scale" if m[2] == "n_points_scale" else m[2] + m[3]
            layout[f"decoder.decoder.layers.{m[1]}.cross_attn.{name}"] = tensor
    torch.save({"ema": {"module": layout}}, tmp_path / "rtdetrv2_r50vd_coco.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "HybridEncoder": {"nhead": 2, "use_encoder_idx": [2]},
        "RTDETRTransformerv2": {"nhead": 2, "num_queries": 20, "num_points": UNEVEN_POINTS}}))
    report = convert_checkpoint(tmp_path / "rtdetrv2_r50vd_coco.pth", tmp_path / "out")
    assert report.format == "rt_detr" and report.config.dec_n_points == tuple(UNEVEN_POINTS)
    detector = load_detector(tmp_path / "out").model
    assert detector.state_dict().keys() == canonical.keys()
    assert all(torch.equal(detector.state_dict()[k], canonical[k]) for k in canonical)
    assert_reproduces(detector, hf.eval(), width=96)


def test_per_level_point_counts_the_scales_contradict_are_refused():
    hf, args = random_hf_model(version="v2", points=UNEVEN_POINTS)
    with pytest.raises(ValueError, match=r"not 3 levels of \[2, 5, 3\] points") as err:
        convert_state_dict(hf.state_dict(), args={**args, "decoder_n_points": [3, 5, 2]})
    assert "\n" not in str(err.value)


def test_an_official_model_trained_without_denoising_is_refused_in_one_line():
    """num_denoising: 0 builds no denoising label embedding, which frozenseg keeps to embed
    external boxes' labels: said as such, not as a file of another format."""
    layout = rt_detr_official_layout(build_detector(RT_DETR_SMALL).state_dict(), "v2")
    del layout["decoder.denoising_class_embed.weight"]
    with pytest.raises(ValueError, match=r"num_denoising: 0\) is not supported") as err:
        convert_state_dict(layout, args={"RTDETRTransformerv2": {"nhead": 2}})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("transposed", [False, True])
def test_the_aifi_position_embedding_lays_out_a_non_square_grid_as_its_source(transposed):
    """transformers 5 embeds row-major (row, column); the official code (and transformers 4)
    builds a width x height grid, flattens it and uses it on the row-major positions."""
    from frozenseg.detector.position import grid_position_embedding

    h, w, dim, t = 3, 5, 16, 10000.0
    omega = 1.0 / t ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    if transposed:
        first, second = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="ij")
    else:
        first, second = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    a, b = first.flatten()[:, None] * omega, second.flatten()[:, None] * omega
    expected = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], 1).float()
    got = grid_position_embedding(h, w, dim=dim, temperature=t, like=torch.zeros(1),
                                  transposed=transposed)
    torch.testing.assert_close(got, expected)
    square = grid_position_embedding(4, 4, dim=dim, temperature=t, like=torch.zeros(1))
    torch.testing.assert_close(square, grid_position_embedding(
        4, 4, dim=dim, temperature=t, like=torch.zeros(1), transposed=True))
