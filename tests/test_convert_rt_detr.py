"""Converted Hugging Face RT-DETR (v1 and v2) models reproduce transformers' own outputs."""

from __future__ import annotations

import pytest
import torch
from weights import perturb

from frozenseg.convert import convert_state_dict
from frozenseg.detector.frozen import FrozenDetector
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


def random_hf_model(version: str = "v1", backbone: str = "bottleneck", **settings):
    """A small random RTDetr(V2)ForObjectDetection and its config as a dict (config.json)."""
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
    return perturb(lively(model_class(config))), config.to_dict()


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


def test_per_level_point_counts_are_refused():
    """RT-DETR v2's converter does not scatter per-level points (D-FINE's does)."""
    hf, args = random_hf_model(version="v2")
    state_dict = dict(hf.state_dict())
    for key in [k for k in state_dict if k.endswith("encoder_attn.n_points_scale")]:
        state_dict[key] = torch.tensor([1 / 2] * 2 + [1 / 4] * 4 + [1 / 6] * 6)
    with pytest.raises(ValueError, match=r"per-level point counts \[2, 4, 6\]"):
        convert_state_dict(state_dict, args={**args, "decoder_n_points": [2, 4, 6]})


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
