"""Converted Hugging Face D-FINE (and DEIM) models reproduce transformers' own outputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_convert_rt_detr import assert_ranks_as_the_post_processor, images, lively
from weights import perturb

from frozenseg.convert import convert_state_dict
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.model import build_detector

transformers = pytest.importorskip("transformers")

# Small HGNetV2s: four stages of one or two HG blocks, light blocks in the last two (B0-B2
# like, with learnable affines) or none (B4-B5 like).
BACKBONES = {
    "lab": dict(stem_channels=[3, 8, 16], stage_in_channels=[16, 32, 48, 64],
                stage_mid_channels=[8, 16, 16, 32], stage_out_channels=[32, 48, 64, 96],
                stage_num_blocks=[1, 1, 2, 1], stage_numb_of_layers=[2, 2, 2, 2],
                stage_light_block=[False, False, True, True], stage_kernel_size=[3, 3, 5, 5],
                use_learnable_affine_block=True),
    "plain": dict(stem_channels=[3, 8, 16], stage_in_channels=[16, 24, 32, 48],
                  stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[24, 32, 48, 64],
                  stage_num_blocks=[1, 2, 1, 1], stage_numb_of_layers=[3, 2, 2, 2],
                  stage_light_block=[False, False, False, True],
                  stage_kernel_size=[3, 3, 3, 5], use_learnable_affine_block=False),
}
VARIANTS = {
    "s": dict(backbone="lab"),
    "plain-projected": dict(backbone="plain", encoder_hidden_dim=48, hidden_expansion=0.5,
                            depth_mult=0.67),
    # D-FINE-N's layout: two levels (strides 16 and 32), AIFI on the coarser.
    "n-two-levels": dict(backbone="lab", levels=2),
    "bins-16": dict(backbone="lab", max_num_bins=16, reg_scale=8.0, up=0.25, lqe_hidden_dim=8,
                    top_prob_values=3, lqe_layers=3),
    # The released configs' points per level (D-FINE's and DEIM's num_points: [3, 6, 3]).
    "released-points": dict(backbone="lab", decoder_n_points=[3, 6, 3]),
    # Two levels of unequal counts, and the FFN's SiLU (DEIM's activation).
    "two-levels-points-silu": dict(backbone="plain", levels=2, decoder_n_points=[2, 5],
                                   decoder_activation_function="silu"),
}

# DEIM's released activations (its configs/base/deim.yml): SiLU in the decoder's FFN and
# quality heads (activation) and in its MLP heads (mlp_act).
DEIM = dict(decoder_activation_function="silu", head_act="silu")


def random_hf_model(backbone: str = "lab", family: str = "DFine", head_act: str = "relu",
                    **settings):
    """A small random DFineForObjectDetection (or ``family="Deimv2"``: Deimv2...) and its
    config as a dict (config.json). ``head_act``: the activation of the MLP and quality
    heads, which transformers keeps at ReLU and DEIM's released configs set to SiLU: its
    heads are then swapped for DFineMLPs of that activation, as DEIM's code builds them."""
    torch.manual_seed(0)
    spec = BACKBONES[backbone]
    encoder_dim = settings.pop("encoder_hidden_dim", 32)
    levels = settings.pop("levels", 3)
    config = getattr(transformers, f"{family}Config")(
        backbone_config=transformers.HGNetV2Config(
            **spec, hidden_sizes=spec["stage_out_channels"], depths=spec["stage_num_blocks"],
            out_indices=[2, 3, 4][3 - levels:]),
        encoder_hidden_dim=encoder_dim,
        encoder_in_channels=spec["stage_out_channels"][4 - levels:],
        feat_strides=[8, 16, 32][3 - levels:], encode_proj_layers=[levels - 1],
        num_feature_levels=levels, encoder_ffn_dim=48, d_model=32,
        decoder_in_channels=[encoder_dim] * levels, decoder_ffn_dim=64, decoder_layers=3,
        num_queries=20, num_labels=5,
        **{"encoder_attention_heads": 2, "decoder_attention_heads": 2, "depth_mult": 0.34,
           "lqe_hidden_dim": 16, "max_num_bins": 8, **settings},
    )
    model = getattr(transformers, f"{family}ForObjectDetection")(config)
    if head_act != "relu":
        deim_heads(model, head_act)
    return perturb(lively(model)), config.to_dict()


def deim_heads(model, act: str) -> None:
    """DEIM's DFINETransformer: ``mlp_act`` in the query_pos, proposal box, first-layer box
    and distribution heads, the decoder's ``activation`` in the quality heads (LQE)."""
    from transformers.models.d_fine.modeling_d_fine import DFineMLP

    inner = model.model
    for owner, name in ((inner.decoder, "query_pos_head"), (inner, "enc_bbox_head")):
        old = getattr(owner, name)
        dims = [layer.in_features for layer in old.layers] + [old.layers[-1].out_features]
        setattr(owner, name, DFineMLP(dims[0], dims[1], dims[-1], len(old.layers), act))
    # The decoder runs its own copies of the top-level box heads.
    for mlp in [inner.decoder.pre_bbox_head, *model.bbox_embed, *inner.decoder.bbox_embed,
                *(lqe.reg_conf for lqe in inner.decoder.lqe_layers)]:
        mlp.act = DFineMLP(1, 1, 1, 1, act).act


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_converted_model_matches_transformers(variant):
    assert_matches_transformers(*random_hf_model(**variant), "huggingface_d_fine")


def assert_matches_transformers(hf, args: dict, format: str) -> None:
    """The converted ``hf`` gives transformers' decoder states, logits and boxes."""
    converted, report = convert_state_dict(hf.state_dict(), args=args)
    assert report.format == format and report.ok, report.problem()
    ours = build_detector(report.config).eval()
    ours.load_state_dict(converted, strict=True)
    with torch.no_grad():
        expected = hf(pixel_values=images(), output_hidden_states=True)
        got = ours(images(), torch.zeros(2, 96, 128, dtype=torch.bool))
    # transformers stacks D-FINE's layers first (layer, batch, query, channel).
    torch.testing.assert_close(torch.stack(got.decoder_states),
                               expected.intermediate_hidden_states, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits[-1], expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=0)


def test_top_k_ranks_as_the_post_processor():
    """FrozenDetector's top-K equals transformers' post_process_object_detection."""
    assert_ranks_as_the_post_processor(*random_hf_model())


def test_the_frozen_detector_gives_the_whole_contract_and_embeds_given_boxes():
    """DetectorOutput's fields, and embed_boxes: given boxes run the FDR decoder as anchors,
    their labels through the denoising label embedding."""
    hf, args = random_hf_model()
    converted, report = convert_state_dict(hf.state_dict(), args=args)
    model = build_detector(report.config)
    model.load_state_dict(converted)
    detector = FrozenDetector(model, top_k=10)
    batch = [images()[0], images()[1][:, :80, :112]]
    out = detector(batch)
    assert out.queries.shape == (2, 10, 32) and out.boxes.shape == (2, 10, 4)
    assert out.memory.shape[1] == sum(h * w for h, w in out.level_shapes)
    assert out.c1.shape == (2, 32, 24, 32) and out.level_shapes == [(12, 16), (6, 8), (3, 4)]
    assert ((out.boxes >= 0) & (out.boxes <= 1)).all()
    boxes = [torch.tensor([[8.0, 10.0, 60.0, 70.0], [30.0, 5.0, 120.0, 90.0]]),
             torch.tensor([[0.0, 0.0, 50.0, 40.0]])]
    labels = [torch.tensor([1, 4]), torch.tensor([2])]
    embedded = detector.embed_boxes(batch, boxes, labels)
    assert embedded.queries.shape == (2, 2, 32)
    assert embedded.query_mask.tolist() == [[True, True], [True, False]]
    assert torch.equal(embedded.labels[0], labels[0])
    unlabelled = detector.embed_boxes(batch, boxes)
    assert not torch.allclose(unlabelled.queries[0], embedded.queries[0])
    # One image alone embeds its boxes as in the batch (no canvas: same size as the largest).
    alone = detector.embed_boxes(batch[:1], boxes[:1], labels[:1])
    torch.testing.assert_close(alone.queries[0], embedded.queries[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("setting", "value", "mention"), [
    ("decoder_method", "discrete", "decoder_method='discrete'"),
    ("decoder_offset_scale", 1.0, "decoder_offset_scale=1.0"),
    ("eval_idx", 1, "eval_idx=1"),
    ("decoder_activation_function", "gelu", "decoder_activation_function='gelu'"),
])
def test_settings_frozenseg_does_not_reproduce_are_refused_in_one_line(setting, value,
                                                                      mention):
    hf, args = random_hf_model()
    with pytest.raises(ValueError, match="not supported") as err:
        convert_state_dict(hf.state_dict(), args={**args, setting: value})
    assert mention in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_file_with_an_unsupported_setting_names_the_file(tmp_path):
    """On disk, the one-line refusal names the folder's config and the setting."""
    from frozenseg.convert import convert_checkpoint

    hf, _ = random_hf_model()
    hf.config.decoder_method = "discrete"
    hf.save_pretrained(tmp_path / "dfine")
    with pytest.raises(ValueError) as err:
        convert_checkpoint(tmp_path / "dfine", tmp_path / "out")
    message = str(err.value)
    assert "dfine" in message and "decoder_method='discrete'" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_per_level_points_are_read_from_the_scales_and_padded():
    """[3, 6, 3] from num_points_scale; each head's 12 rows scattered into 3 levels of 6
    points, the padding's rows zero."""
    hf, args = random_hf_model(**VARIANTS["released-points"])
    converted, report = convert_state_dict(hf.state_dict(), args=args)
    assert report.config.dec_n_points == (3, 6, 3)
    source = hf.state_dict()["model.decoder.layers.1.encoder_attn.attention_weights.weight"]
    rows = converted["transformer.decoder.layers.1.cross_attn.attention_weights.weight"]
    assert source.shape == (2 * 12, 32) and rows.shape == (2 * 3 * 6, 32)
    rows = rows.view(2, 3, 6, 32)
    for head, (level, start, n) in itertools.product(range(2), [(0, 0, 3), (1, 3, 6),
                                                                (2, 9, 3)]):
        assert torch.equal(rows[head, level, :n], source[head * 12 + start:][:n])
        assert not rows[head, level, n:].any()
    offsets = converted["transformer.decoder.layers.0.cross_attn.sampling_offsets.bias"]
    assert offsets.shape == (2 * 3 * 6 * 2,) and not offsets.view(2, 3, 6, 2)[:, 0, 3:].any()
    assert any("padded to 6" in how for _, how in report.derived)


@pytest.mark.parametrize("mistake", ["one scale", "no mask", "rows at the end"])
def test_each_part_of_the_padding_matters(mistake):
    """The converted model matches transformers (above); each way of getting the padding
    wrong moves the logits far beyond the tests' 1e-4."""
    hf, args = random_hf_model(**VARIANTS["released-points"])
    converted, report = convert_state_dict(hf.state_dict(), args=args)
    ours = build_detector(report.config).eval()
    ours.load_state_dict(converted)
    for i, layer in enumerate(ours.transformer.decoder.layers):
        attention = layer.cross_attn
        if mistake == "one scale":  # every level's offsets in units of size / 6
            mask = attention._padding(torch.device("cpu"))  # the mask as it was
            attention._padding = lambda device, mask=mask: mask
            attention.level_counts = (6, 6, 6)
        elif mistake == "no mask":  # the padded points share the softmax at logit 0
            attention.padded = False
        else:  # each head's 12 rows then 6 zero rows, not level by level
            source = hf.state_dict()[
                f"model.decoder.layers.{i}.encoder_attn.attention_weights.weight"]
            rows = torch.cat([source.view(2, 12, 32), source.new_zeros(2, 6, 32)], 1)
            attention.attention_weights.weight.data = rows.reshape(36, 32)
    with torch.no_grad():
        expected = hf(pixel_values=images()).logits
        got = ours(images(), torch.zeros(2, 96, 128, dtype=torch.bool)).logits[-1]
    assert (got - expected).abs().max() > 1e-3


@pytest.mark.parametrize(("change", "message"), [
    ({"model.decoder.layers.1.encoder_attn.num_points_scale": torch.tensor(
        [1 / 4] * 12)}, "differs from model.decoder.layers.0"),
    ({"model.decoder.layers.0.encoder_attn.num_points_scale": torch.tensor(
        [1 / 3] * 2 + [1 / 6] * 10)}, "is not 1 / n for each of a level's n points"),
    ({"decoder_n_points": [4, 4, 4]}, "the config [4, 4, 4]"),
])
def test_sampling_scales_that_disagree_are_refused_in_one_line(change, message):
    hf, args = random_hf_model(**VARIANTS["released-points"])
    keys = {k: v for k, v in change.items() if k.startswith("model.")}
    state_dict = {**hf.state_dict(), **keys}
    args = {**args, **{k: v for k, v in change.items() if k not in keys}}
    with pytest.raises(ValueError) as err:
        convert_state_dict(state_dict, args=args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rt_detr_does_not_claim_d_fine_keys():
    from frozenseg.formats import FORMATS, detect_format

    hf, _ = random_hf_model()
    state_dict = hf.state_dict()
    assert detect_format(state_dict).name == "huggingface_d_fine"
    assert not FORMATS["huggingface_rt_detr"].matches(state_dict)
