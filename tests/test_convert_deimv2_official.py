"""Official DEIMv2 checkpoints (the solver's layout, HGNetV2 and DINOv3 models) convert to
a detector that reproduces the official computation, here transformers' DEIMv2 made to
compute as the official code does (no ``enc_output``, the YAML's head activations, the
ViT-Tiny without a final norm); ``benchmarks/exactness_deimv2_official.py`` runs the official
code itself beside it."""

from __future__ import annotations

import re

import pytest
import torch
from artifacts import (
    deimv2_official_checkpoint,
    deimv2_official_layout,
    deimv2_official_yaml,
    on_the_transposed_grid,
)
from test_convert_d_fine import random_hf_model as d_fine_model
from test_convert_deimv2 import LITE, lite_hf_model
from test_convert_deimv2_dinov3 import outputs
from test_convert_deimv2_dinov3 import random_hf_model as dinov3_model
from test_convert_rt_detr import images
from weights import perturb

from frozenseg.convert import convert_checkpoint, convert_state_dict
from frozenseg.detector.frozen import load_detector
from frozenseg.detector.model import build_detector
from frozenseg.formats import FORMATS, detect_format
from frozenseg.formats.deimv2_official import to_transformers

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

BUILDERS = {"hybrid": lambda **s: d_fine_model(family="Deimv2", **s), "lite": lite_hf_model,
            "tiny": dinov3_model, "dinov3": dinov3_model}
# (kind, the transformers model's settings, DINOv3STAs's name): N's two levels, the
# released three-level points, Atto's shared box head without gate, Pico's plain backbone,
# S's distilled ViT-Tiny, L's DINOv3 ViT-S (6 heads) and X's gated ViT-S+.
VARIANTS = {
    "n": ("hybrid", dict(levels=2), None),
    "released-points": ("hybrid", dict(decoder_n_points=[3, 6, 3]), None),
    "atto-shared-box-head": ("lite", dict(decoder=dict(share_bbox_head=True,
                                                        use_gateway=False)), None),
    "pico-plain-projected": ("lite", LITE["pico-plain-projected"], None),
    "s-vit-tiny": ("tiny", dict(vit="official-tiny"), "vit_tiny"),
    "l-dinov3": ("dinov3", dict(vit="official-dinov3", hidden_size=48, use_gateway=False),
                 "dinov3_vits16"),
    "x-dinov3-plus-shared-box-head": ("dinov3", dict(vit="official-dinov3-plus",
                                                     hidden_size=48, share_bbox_head=True,
                                                     adapter=4), "dinov3_vits16plus"),
}


def as_official(hf, vit: str | None, mlp_act: str = "silu"):
    """transformers' DEIMv2 computing what DEIMv2's code computes on the same weights: the
    proposals scored on the encoder tokens as they are (no ``enc_output``), ``mlp_act`` in
    the MLP heads and the decoder's ``activation`` (SiLU) in the quality heads, one
    query_pos (the first references') for every layer, AIFI's positions on the transposed
    grid; the ViT-Tiny with no final norm and layer scales of one; DINOv3's key bias masked
    out (zero)."""
    act = {"silu": torch.nn.SiLU, "relu": torch.nn.ReLU}[mlp_act]
    model = hf.model
    model.enc_output = torch.nn.Identity()
    embed_first_references_only(model.decoder.query_pos_head, len(model.decoder.layers))
    for aifi in getattr(model.encoder, "aifi", []):
        on_the_transposed_grid(aifi.position_embedding)
    for mlp in [model.decoder.query_pos_head, model.decoder.pre_bbox_head, model.enc_bbox_head,
                *model.decoder.bbox_embed, *hf.bbox_embed]:
        mlp.act = act()
    for lqe in model.decoder.lqe_layers:
        lqe.reg_conf.act = torch.nn.SiLU()
    if vit is None:
        return hf
    backbone = model.conv_encoder.backbone
    with torch.no_grad():
        for layer in backbone.model.layer:
            if vit == "tiny":
                layer.layer_scale1.lambda1.fill_(1.0), layer.layer_scale2.lambda1.fill_(1.0)
            else:
                layer.attention.k_proj.bias.zero_()
    if vit == "tiny":
        backbone.norm = torch.nn.Identity()
    return hf


def embed_first_references_only(head: torch.nn.Module, layers: int) -> None:
    """transformers' decoder calls its query_pos head once per layer: every call after a
    pass's first returns the first call's embedding (the weights' names stay as they are)."""
    embed, state = head.forward, {"calls": 0}

    def forward(boxes):
        if state["calls"] % layers == 0:
            state["first"] = embed(boxes)
        state["calls"] += 1
        return state["first"]
    head.forward = forward


def official(variant: str, seed: int = 0, mlp_act: str = "silu"):
    """(transformers' model computing as the official one, its state dict in the official
    layout, the YAML it was made from)."""
    kind, settings, vit_name = VARIANTS[variant]
    hf, args = BUILDERS[kind](**settings)
    if seed:
        perturb(hf, seed=seed)
    vit = kind if kind in ("tiny", "dinov3") else None
    as_official(hf, vit, mlp_act)
    heads = args["backbone_config"]["num_attention_heads"] if vit else None
    layout = deimv2_official_layout(hf.state_dict(), vit, heads)
    return hf, layout, deimv2_official_yaml(args, mlp_act=mlp_act, vit_name=vit_name)


def converted(layout: dict, yaml: dict):
    state_dict, report = convert_state_dict(layout, args=yaml)
    assert report.format == "deimv2" and report.ok, report.problem()
    model = build_detector(report.config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model, report


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_converted_model_reproduces_the_official_computation(variant):
    hf, layout, yaml = official(variant)
    ours, report = converted(layout, yaml)
    assert not report.config.proposal_projection and report.config.fdr_query_pos_once
    assert (report.config.mlp_activation, report.config.lqe_activation) == ("silu", "silu")
    for got, want in zip(outputs(ours), outputs(hf, hf=True), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_the_yamls_mlp_act_reaches_the_heads():
    """mlp_act ReLU (the constructor's default) beside the quality heads' SiLU."""
    hf, layout, yaml = official("n", mlp_act="relu")
    ours, report = converted(layout, yaml)
    assert (report.config.mlp_activation, report.config.lqe_activation) == ("relu", "silu")
    for got, want in zip(outputs(ours), outputs(hf, hf=True), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["n", "atto-shared-box-head", "s-vit-tiny", "l-dinov3"])
def test_the_official_keys_read_as_transformers_names(variant):
    """The official -> transformers rename is the inverse of the tests' own (separately
    written) transformers -> official table, key by key and tensor by tensor; what the
    official model does not save is made and said so."""
    hf, layout, _ = official(variant)
    translated, source, dropped, made = to_transformers(layout)
    # the top-level copies of the heads, and the pretraining mask token the ViT-Tiny lacks
    expected = {k: v for k, v in hf.state_dict().items()
                if not k.startswith(("class_embed.", "bbox_embed."))
                and not (variant == "s-vit-tiny" and k.endswith("mask_token"))}
    counters = {k for k in (*translated, *expected) if k.endswith("num_batches_tracked")}
    assert set(translated) - counters == set(expected) - counters
    for key in set(expected) - counters:
        assert torch.equal(translated[key], expected[key]), key
    assert "decoder.anchors" in dict(dropped) and "decoder.decoder.up" in dict(dropped)
    assert all(key in layout for key in source.values())
    assert bool(made) == (variant == "s-vit-tiny")


def test_the_written_layout_has_the_official_modules_names():
    """Names read from DEIMv2's modules (DINOv3STAs, VisionTransformer, HybridEncoder's
    RepNCSPELAN5, DEIMTransformer's RMSNorm and SwiGLUFFN); no transformers spelling."""
    _, layout, _ = official("s-vit-tiny")
    for key in ("backbone.dinov3._model.blocks.0.attn.qkv.bias",
                "backbone.dinov3._model.rope_embed.periods", "backbone.sta.stem.1.running_var",
                "backbone.sta.conv3.1.weight", "backbone.convs.2.weight", "backbone.norms.0.bias",
                "encoder.fpn_blocks.0.cv2.0.bottlenecks.0.conv1.conv.weight",
                "encoder.pan_blocks.0.cv4.norm.weight", "encoder.encoder.0.layers.0.linear1.weight",
                "decoder.decoder.layers.0.swish_ffn.w12.weight",
                "decoder.decoder.layers.2.norm3.scale", "decoder.dec_bbox_head.2.layers.2.bias",
                "decoder.decoder.layers.0.gateway.norm.scale", "decoder.decoder.reg_scale"):
        assert key in layout, key
    transformers_only = re.compile(r"^model\.|conv_encoder|[qkv]_proj|o_proj|csp_rep|lambda1|"
                                   r"_layer_norm|encoder_attn|gate_proj|register_tokens")
    assert not [key for key in layout if transformers_only.search(key)]
    assert detect_format(layout).name == "deimv2" and not FORMATS["d_fine"].matches(layout)


def test_transformers_own_deimv2_computes_something_else():
    """On the same weights transformers' DEIMv2 as it is (proposals through a Linear +
    LayerNorm, ReLU heads) is far from the official computation the conversion follows."""
    hf, layout, yaml = official("n")
    ours, _ = converted(layout, yaml)
    stock, _ = BUILDERS["hybrid"](**VARIANTS["n"][1])
    stock.load_state_dict(hf.state_dict(), strict=False)
    assert (outputs(ours)[0] - outputs(stock.eval(), hf=True)[0]).abs().max() > 1e-2


@pytest.mark.parametrize(("section", "setting", "value"), [
    ("HybridEncoder", "fuse_op", "cat"),
    ("HybridEncoder", "version", "rt_detrv2"),
    ("DEIMTransformer", "cross_attn_method", "discrete"),
    ("DEIMTransformer", "query_select_method", "agnostic"),
    ("DEIMTransformer", "mlp_act", "gelu"),
    ("DEIMTransformer", "eval_idx", 1),
    ("DEIM", "decoder", "DFINETransformer"),
])
def test_yaml_settings_frozenseg_does_not_reproduce_are_refused_in_one_line(
        section, setting, value):
    _, layout, yaml = official("released-points")
    yaml.setdefault(section, {})[setting] = value
    with pytest.raises(ValueError, match=f"{setting}={value!r}") as err:
        convert_state_dict(layout, args=yaml)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("variant", "change", "message"), [
    ("atto-shared-box-head", lambda y: y["DEIM"].update(encoder="HybridEncoder"),
     "DEIM.encoder is HybridEncoder, but the weights hold a LiteEncoder"),
    ("n", lambda y: y["DEIM"].update(backbone="DINOv3STAs"),
     "DEIM.backbone is DINOv3STAs, but the weights hold a HGNetv2"),
    ("s-vit-tiny", lambda y: y["DINOv3STAs"].update(num_heads=4), "YAML's ViT has 4 heads"),
    ("s-vit-tiny", lambda y: y["DINOv3STAs"].update(use_sta=False), "use_sta=False"),
])
def test_a_yaml_of_another_model_is_refused_in_one_line(variant, change, message):
    _, layout, yaml = official(variant)
    change(yaml)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        convert_state_dict(layout, args=yaml)
    assert "\n" not in str(err.value)


def test_d_fines_csp_blocks_in_a_deimv2_file_are_refused():
    """csp_type: csp (D-FINE's CSP block: conv1, conv2 beside the trailing 3x3) would read
    two official tensors as one transformers name: refused, not overwritten."""
    _, layout, yaml = official("n")
    extra = {k.replace(".cv2.0.conv1.", ".cv2.0.conv2."): v for k, v in layout.items()
             if ".cv2.0.conv1." in k}
    with pytest.raises(ValueError, match="both read as"):
        convert_state_dict({**layout, **extra}, args=yaml)


@pytest.mark.parametrize(("variant", "released"), [("s-vit-tiny", False), ("atto-shared-box-head",
                                                                              True)])
def test_a_solver_file_with_its_yaml_beside_it_converts(variant, released, tmp_path):
    """The solver's checkpoint (EMA taken) or a released ``{'model'}`` file, config.yaml beside
    it including its base: converted as ``frozenseg convert`` does, nothing assumed, and the
    loaded detector gives the reference's outputs."""
    artifact = deimv2_official_checkpoint(tmp_path / "run", variant, released=released)
    report = convert_checkpoint(artifact.path, tmp_path / "out")
    assert report.format == "deimv2" and not [n for n in report.notes if "assumed" in n]
    assert ("weights from ckpt['ema']" in " ".join(report.notes)) is not released
    derived = dict(report.derived)
    assert any("no layer scale" in how for how in derived.values()) == (variant == "s-vit-tiny")
    detector = load_detector(tmp_path / "out")
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        got = detector.model(images(), padding)
    logits, boxes = artifact.reference(images(), padding)
    torch.testing.assert_close(got.logits[-1], logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.boxes[-1], boxes, atol=1e-4, rtol=0)
