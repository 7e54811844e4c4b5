"""Hugging Face ``RTDetrForObjectDetection`` and ``RTDetrV2ForObjectDetection`` folders.

transformers 5 keeps these models in memory under new names (``encoder.aifi``,
``self_attn.o_proj``, ``mlp.fc1``) and writes them with ``save_pretrained`` under the
old ones (``encoder.encoder``, ``self_attn.out_proj``, ``fc1``); both are read. The
backbone is transformers' ``RTDetrResNet`` (ResNet-vd), mapped onto the official PResNet
names; the hybrid encoder's convolutions already have the official names. v2 differs only
in its decoder's deformable attention (per-level point counts, an offset scale, a
"discrete" sampling method). Its released setting (the same points on every level, 0.5,
"default") is RT-DETR v1's attention. Per-level counts (``decoder_n_points`` a list; read
from the saved ``n_points_scale``, 1 / n for each of a level's n points) are converted as
D-FINE's are: each head's sum(points) rows, level after level, scattered into the
attention's padded layout. Other offset scales and "discrete" sampling are refused.
"""

from __future__ import annotations

import re

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    apply_rules,
    backbone_levels,
    check_duplicate,
    count_indexed,
    level_points,
    merge_qkv,
    pad_decoder_points,
    positive,
    refuse_unsupported,
    substitute_keys,
)

# transformers 5's in-memory names -> the names its save_pretrained writes.
IN_MEMORY = [
    (r"^model\.encoder\.aifi\.", "model.encoder.encoder."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.layers\.(\d+)\.mlp\.fc([12])\.", r".layers.\1.fc\2."),
]

BACKBONE = r"^model\.backbone\.model\."
STAGE = BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
BN = r"(convolution|normalization)\."


def _cn(m: re.Match, group: int) -> str:
    return "conv." if m[group] == "convolution" else "norm."


def query_selection_rules(prefix: str) -> list[tuple[str, str]]:
    """RT-DETR's query selection (enc_output Linear + LayerNorm, enc_score_head,
    enc_bbox_head) and denoising label embedding under ``prefix``, both layouts alike."""
    return [(prefix + r"enc_output\.0\.", "transformer.enc_output."),
            (prefix + r"enc_output\.1\.", "transformer.enc_output_norm."),
            (prefix + r"enc_score_head\.", "transformer.enc_out_class_embed."),
            (prefix + r"enc_bbox_head\.", "transformer.enc_out_bbox_embed."),
            (prefix + r"denoising_class_embed\.", "label_enc.")]


RULES = [
    (BACKBONE + r"embedder\.embedder\.(\d)\." + BN,
     lambda m: f"backbone.conv1.conv1_{int(m[1]) + 1}.{_cn(m, 2)}"),
    (STAGE + r"layer\.(\d)\." + BN,
     lambda m: f"backbone.res_layers.{m[1]}.blocks.{m[2]}.branch2{'abc'[int(m[3])]}.{_cn(m, 4)}"),
    (STAGE + r"shortcut\.1\." + BN,  # average pool, then the 1x1 ConvNorm
     lambda m: f"backbone.res_layers.{m[1]}.blocks.{m[2]}.short.conv.{_cn(m, 3)}"),
    (STAGE + r"shortcut\." + BN,
     lambda m: f"backbone.res_layers.{m[1]}.blocks.{m[2]}.short.{_cn(m, 3)}"),
    (r"^model\.encoder_input_proj\.", "transformer.encoder.input_proj."),
    (r"^model\.encoder\.encoder\.(\d+)\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"transformer.encoder.encoder.\1.layers.\2.norm1."),
    (r"^model\.encoder\.encoder\.(\d+)\.layers\.(\d+)\.final_layer_norm\.",
     r"transformer.encoder.encoder.\1.layers.\2.norm2."),
    (r"^model\.encoder\.encoder\.(\d+)\.layers\.(\d+)\.fc([12])\.",
     r"transformer.encoder.encoder.\1.layers.\2.linear\3."),
    (r"^model\.encoder\.", "transformer.encoder."),
    (r"^model\.decoder_input_proj\.", "input_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"transformer.decoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.",
     r"transformer.decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.",
     r"transformer.decoder.layers.\1.cross_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.",
     r"transformer.decoder.layers.\1.norm3."),
    (r"^model\.decoder\.layers\.(\d+)\.fc([12])\.", r"transformer.decoder.layers.\1.linear\2."),
    (r"^model\.decoder\.query_pos_head\.", "transformer.decoder.ref_point_head."),
    (r"^model\.decoder\.((class|bbox)_embed\.)", r"\1"),
    (r"^model\.decoder\.", "transformer.decoder."),
    *query_selection_rules(r"^model\."),
    (r"^model\.weight_embedding\.", "transformer.tgt_embed."),
]
QKV = re.compile(r"^(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$")
TOP_HEADS = re.compile(r"^(class|bbox)_embed\.\d+\.")
N_POINTS_SCALE = re.compile(r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.n_points_scale$")

# Fixed in RT-DETR's code: the top-k encoder tokens by best class give the anchors and the
# content (unless learned); query_pos = MLP(box); no padding mask; pixels in [0, 1] (its
# image processor does not normalise).
FIXED = {"variant": "rt_detr", "encoder": "hybrid", "query_init": "selected",
         "box_refine": True, "proposal_score": "max_class", "ref_point_head": True,
         "ref_point_input": "box", "mask_padding": False, "inverse_sigmoid_eps": 1e-5,
         "num_select": 300, "image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}

# config.json settings that change the computation without changing a key or a shape:
# frozenseg reproduces only these values (absent settings take them).
SUPPORTED = {
    "normalize_before": (False,),
    "activation_function": ("silu",),
    "encoder_activation_function": ("gelu",),
    "decoder_activation_function": ("relu",),
    "decoder_method": ("default",),
    "decoder_offset_scale": (0.5,),
    "layer_norm_eps": (1e-5,),
    "batch_norm_eps": (1e-5,),
}
BACKBONE_SUPPORTED = {
    "hidden_act": ("relu",),
    "downsample_in_first_stage": (False,),
    "downsample_in_bottleneck": (False,),
}


def _check_args(args: dict) -> None:
    refuse_unsupported("RT-DETR", [(SUPPORTED, args, "config"), (
        BACKBONE_SUPPORTED, args.get("backbone_config") or {}, "backbone config")])


def hybrid_fields(sd: StateDict, args: dict, levels: int, notes: list[str],
                  points_scale: re.Pattern, ffn: str = "fc1") -> dict:
    """The config fields RT-DETR and D-FINE derive alike (transformers' saved names): widths,
    heads, layers, points, AIFI levels, queries, classes and the label embedding. ``ffn``:
    the decoder FFN's first projection, whose width is dim_feedforward."""
    c = sd["model.enc_score_head.weight"].shape[1]  # it reads the hidden_dim-wide tokens
    encoder_dim = sd["model.encoder_input_proj.0.0.weight"].shape[0]
    saved_aifi = count_indexed(sd, "model.encoder.encoder.")
    heads = _heads(args, c, notes, aifi=bool(saved_aifi))
    if args.get("decoder_n_levels", levels) != levels:
        raise ValueError(f"decoder_n_levels={args['decoder_n_levels']} differs from the "
                         f"{levels} feature levels: not supported")
    points = level_points(sd, "model.decoder.layers.0.encoder_attn.attention_weights.weight",
                          points_scale, heads, levels, args.get("decoder_n_points"))
    # No AIFI saved and encoder_layers 0: no attention (DEIMv2's lite encoder has none).
    aifi = tuple(args.get("encode_proj_layers", [levels - 1])) if saved_aifi or args.get(
        "encoder_layers", 1) else ()
    if len(aifi) != saved_aifi:
        raise ValueError(f"encode_proj_layers {list(aifi)} does not match the "
                         f"{count_indexed(sd, 'model.encoder.encoder.')} AIFI encoders saved")
    if "num_queries" not in args:
        notes.append("query count not saved (config.json num_queries): assumed 300")
    if args.get("eval_size") or args.get("anchor_image_size"):
        notes.append("eval_size / anchor_image_size set: frozenseg computes the position "
                     "embedding and anchors of every input size, as at that size")
    decoder_ffn = sd[f"model.decoder.layers.0.{ffn}.weight"].shape[0]
    aifi_ffn = sd.get("model.encoder.encoder.0.layers.0.fc1.weight")
    encoder_ffn = decoder_ffn if aifi_ffn is None else aifi_ffn.shape[0]
    return dict(
        query_init="mixed" if "model.weight_embedding.weight" in sd else "selected",
        hidden_dim=c, num_feature_levels=levels, nheads=heads,
        enc_layers=count_indexed(sd, "model.encoder.encoder.0.layers."),
        dec_layers=count_indexed(sd, "model.decoder.layers."),
        dim_feedforward=decoder_ffn,
        encoder_ffn_dim=None if encoder_ffn == decoder_ffn else encoder_ffn,
        encoder_dim=None if encoder_dim == c else encoder_dim, aifi_levels=aifi,
        dec_n_points=points, num_queries=positive("num_queries", args.get("num_queries", 300)),
        num_classes=sd["model.enc_score_head.weight"].shape[0],
        pos_temperature=positive("positional_encoding_temperature",
                                 args.get("positional_encoding_temperature", 10000), float),
        dn_labelbook_size=sd["model.denoising_class_embed.weight"].shape[0] - 1,
    )


def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
    """Widths, depths, levels and classes from shapes; heads, queries and the AIFI levels
    from config.json (passed as args)."""
    _check_args(args)
    sd, notes = substitute_keys(state_dict, IN_MEMORY), []
    encoder_dim = sd["model.encoder_input_proj.0.0.weight"].shape[0]
    backbone, widths = _backbone(sd)
    stages, levels = backbone_levels(sd, "model.encoder_input_proj.", widths)
    feature_levels = count_indexed(sd, "model.decoder_input_proj.")
    if feature_levels != levels:
        raise ValueError(f"{feature_levels} decoder levels from {levels} encoder maps: only "
                         "num_feature_levels equal to the encoder's maps is supported")
    csp_hidden = sd["model.encoder.fpn_blocks.0.conv1.conv.weight"].shape[0]
    shared = hybrid_fields(sd, args, levels, notes, N_POINTS_SCALE)
    config = DetectorConfig(
        **{**FIXED, **shared},
        backbone=backbone, backbone_levels=stages,
        csp_blocks=count_indexed(sd, "model.encoder.fpn_blocks.0.bottlenecks."),
        csp_expansion=csp_hidden / encoder_dim,
    )
    return config, notes


def _heads(args: dict, c: int, notes: list[str], aifi: bool = True) -> int:
    """The attention heads; the encoder's must be the decoder's unless it has no AIFI."""
    encoder = args.get("encoder_attention_heads") if aifi else args.get(
        "decoder_attention_heads")
    decoder = args.get("decoder_attention_heads", encoder)
    if encoder is None:
        encoder = decoder = c // 32
        notes.append(f"attention heads not saved: assumed {encoder} (head dim 32)")
    if encoder != decoder:
        raise ValueError(f"encoder ({encoder}) and decoder ({decoder}) attention heads differ: "
                         "not supported")
    return positive("encoder_attention_heads", encoder)


def _backbone(sd: StateDict) -> tuple[dict, list[int]]:
    """The ResNet-vd spec and its four stage widths, from the backbone's shapes."""
    prefix = "model.backbone.model.encoder.stages."
    stem_key = "model.backbone.model.embedder.embedder.2.convolution.weight"
    if stem_key not in sd or count_indexed(sd, prefix) != 4:
        raise ValueError("the backbone is not transformers' RTDetrResNet (ResNet-vd with a "
                         "three-convolution stem and four stages): not supported")
    bottleneck = f"{prefix}0.layers.0.layer.2.convolution.weight" in sd
    last = 2 if bottleneck else 1
    widths = [sd[f"{prefix}{i}.layers.0.layer.{last}.convolution.weight"].shape[0]
              for i in range(4)]
    spec = {"name": "resnet_vd", "block": "bottleneck" if bottleneck else "basic",
            "depths": tuple(count_indexed(sd, f"{prefix}{i}.layers.") for i in range(4)),
            "widths": tuple(widths), "stem": sd[stem_key].shape[0]}
    return spec, widths


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    sd, out, rest = substitute_keys(state_dict, IN_MEMORY), Renamed(), {}
    for key, tensor in sd.items():
        if key.endswith("num_batches_tracked"):
            out.dropped.append((key, "batch norm counter (frozen batch norm keeps none)"))
        elif N_POINTS_SCALE.match(key):
            out.dropped.append((key, "v2's sampling scale, read: 1 / its level's points"))
        elif TOP_HEADS.match(key) and f"model.decoder.{key}" in sd:
            check_duplicate(sd, key, f"model.decoder.{key}")
            out.dropped.append((key, f"duplicate of model.decoder.{key}"))
        else:
            rest[key] = tensor
    apply_rules(rest, RULES, out)
    merge_qkv(out, QKV, ("q", "k", "v"))
    pad_decoder_points(out, config)
    return out


FORMAT = CheckpointFormat(
    name="huggingface_rt_detr",
    description="Hugging Face RTDetrForObjectDetection / RTDetrV2ForObjectDetection",
    signature=(
        r"^model\.encoder_input_proj\.0\.0\.weight$",
        r"^model\.enc_score_head\.weight$",
        r"^model\.decoder\.query_pos_head\.layers\.0\.weight$",
        r"^model\.decoder\.layers\.0\.encoder_attn\.sampling_offsets\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
    # D-FINE's keys include all of these: its gated decoder layers tell it apart.
    refine_match=lambda sd: not any(".gateway." in key for key in sd),
)
