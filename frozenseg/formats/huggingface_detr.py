"""Hugging Face ``DetrForObjectDetection``, ``ConditionalDetrForObjectDetection`` and
``DabDetrForObjectDetection`` folders: the plain-attention DETRs (``detector/plain.py``).

transformers 5 keeps these models in memory under other names than ``save_pretrained``
writes (``o_proj`` / ``out_proj``, ``mlp.fc1`` / ``fc1``, Conditional DETR's
``self_attn.q_content_proj`` / ``sa_qcontent_proj``, a backbone with or without
``conv_encoder``); both are read, mapped first onto the saved names. The backbone is
transformers' ResNet (or timm's, already torchvision's names) as for Deformable DETR.
Settings that change the computation without a key or a shape (the learned position
embedding, DC5's dilation, DAB-DETR's pre-norm encoder or unequal temperatures, other
activations) are refused in one line.
"""

from __future__ import annotations

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats import huggingface
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    apply_rules,
    check_duplicate,
    count_indexed,
    positive,
    substitute_keys,
)

# In-memory names -> save_pretrained's (DAB-DETR's nested names flattened like them).
SAVED_NAMES = [
    (r"^model\.backbone\.conv_encoder\.", "model.backbone."),
    (r"^model\.backbone\.model\._backbone\.", "model.backbone.model."),  # DAB's timm ResNet
    (r"\.o_proj\.", ".out_proj."),
    (r"\.mlp\.", "."),
    # DAB-DETR
    (r"\.self_attn\.self_attn_(query|key)_(content|pos)_proj\.",
     lambda m: f".sa_{m[1][0]}{m[2]}_proj."),
    (r"\.self_attn\.self_attn_value_proj\.", ".sa_v_proj."),
    (r"\.self_attn\.self_attn\.output_proj\.", ".self_attn.out_proj."),
    (r"\.self_attn\.self_attn_layer_norm\.", ".self_attn_layer_norm."),
    (r"\.cross_attn\.cross_attn_(query|key)_(content|pos|pos_sine)_proj\.",
     lambda m: f".ca_{m[1][0]}{m[2]}_proj."),
    (r"\.cross_attn\.cross_attn_value_proj\.", ".ca_v_proj."),
    (r"\.cross_attn\.cross_attn\.output_proj\.", ".encoder_attn.out_proj."),
    (r"\.cross_attn\.cross_attn_layer_norm\.", ".encoder_attn_layer_norm."),
]

LAYER = r"^model\.(encoder|decoder)\.layers\.(\d+)\."
RULES = [
    *[rule for rule in huggingface.RULES if rule[0].startswith(huggingface.BACKBONE)],
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.query_refpoint_embeddings\.", "refpoint_embed."),
    (r"^model\.patterns\.", "patterns."),
    (LAYER + r"self_attn_layer_norm\.", r"transformer.\1.layers.\2.norm1."),
    (LAYER + r"encoder_attn_layer_norm\.", r"transformer.\1.layers.\2.norm2."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.",
     r"transformer.encoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.",
     r"transformer.decoder.layers.\1.norm3."),
    (LAYER + r"fc([12])\.", r"transformer.\1.layers.\2.linear\3."),
    (LAYER + r"activation_fn\.", r"transformer.\1.layers.\2.activation."),
    (LAYER + r"encoder_attn\.", r"transformer.\1.layers.\2.cross_attn."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.(encoder|decoder)\.", r"transformer.\1."),
    (r"^(class_labels_classifier|class_embed)\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
]

# config.json settings frozenseg reproduces only at these values (absent: the default).
SUPPORTED = {
    "position_embedding_type": ("sine",),
    "dilation": (False,),
    "normalize_before": (False,),
    "query_dim": (4,),
    "sine_position_embedding_scale": (None, 6.283185307179586),
}
BACKBONE_SUPPORTED = {
    "hidden_act": ("relu",),
    "layer_type": ("bottleneck",),
    "downsample_in_first_stage": (False,),
    "downsample_in_bottleneck": (False,),
}
ACTIVATIONS = {"detr": ("relu",), "conditional_detr": ("relu",), "dab_detr": ("prelu", "relu")}
NAMES = {"detr": "DETR", "conditional_detr": "Conditional DETR", "dab_detr": "DAB-DETR"}


# Fixed in each family's code: one stride-32 level of the plain encoder, the decoder kind,
# the final decoder norm, positions counted from 1 (no offset), the post-processing.
FIXED = {
    variant: {"variant": variant, "encoder": "plain", "backbone_levels": (3,),
              "num_feature_levels": 1, "decoder_norm": True, "pos_offset": 0.0,
              "num_select": 100, **extra}
    for variant, extra in (
        ("detr", {"decoder": "plain", "no_object_class": True}),
        ("conditional_detr", {"decoder": "conditional"}),
        ("dab_detr", {"decoder": "anchor", "box_refine": True, "encoder_pos_scale": True,
                      "activation": "prelu", "pos_temperature": 20.0}),
    )
}


def _check_args(variant: str, args: dict) -> None:
    backbone = args.get("backbone_config") or {}
    for table, settings, what in ((SUPPORTED, args, "config"),
                                  (BACKBONE_SUPPORTED, backbone, "backbone config")):
        for name, accepted in table.items():
            if name in settings and settings[name] not in accepted:
                raise ValueError(f"{NAMES[variant]} with {what} {name}={settings[name]!r} is "
                                 f"not supported (supported: {', '.join(map(repr, accepted))})")
    activation = args.get("activation_function", ACTIVATIONS[variant][0])
    if activation not in ACTIVATIONS[variant]:
        raise ValueError(f"{NAMES[variant]} with config activation_function={activation!r} is "
                         f"not supported (supported: {', '.join(map(repr, ACTIVATIONS[variant]))})")
    heights, widths = args.get("temperature_height", 20), args.get("temperature_width", 20)
    if variant == "dab_detr" and heights != widths:
        raise ValueError(f"DAB-DETR with config temperature_height={heights!r} and "
                         f"temperature_width={widths!r} is not supported (only equal ones)")


# Conditional DETR's in-memory decoder names (DETR's decoder keeps self_attn.v_proj).
CONDITIONAL_SAVED_NAMES = [
    (r"^(model\.decoder\.layers\.\d+)\.self_attn\.([qk])_(content|pos)_proj\.",
     r"\1.sa_\2\3_proj."),
    (r"^(model\.decoder\.layers\.\d+)\.self_attn\.v_proj\.", r"\1.sa_v_proj."),
    (r"^(model\.decoder\.layers\.\d+)\.encoder_attn\.([qk])_(content|pos|pos_sine)_proj\.",
     r"\1.ca_\2\3_proj."),
    (r"^(model\.decoder\.layers\.\d+)\.encoder_attn\.v_proj\.", r"\1.ca_v_proj."),
]


def _saved(state_dict: StateDict, variant: str) -> StateDict:
    extra = CONDITIONAL_SAVED_NAMES if variant == "conditional_detr" else []
    return substitute_keys(state_dict, SAVED_NAMES + extra)


def derive_config_for(variant: str):
    def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
        """Widths, depths, queries, classes from shapes; heads, activation, temperatures
        from config.json (passed as args)."""
        _check_args(variant, args)
        sd, notes = _saved(state_dict, variant), []
        c, channels = sd["model.input_projection.weight"].shape[:2]
        blocks = (count_indexed(sd, "model.backbone.model.encoder.stages.2.layers.")
                  or count_indexed(sd, "model.backbone.model.layer3."))
        depth = {6: 50, 23: 101}.get(blocks)
        if depth is None or channels != 2048:
            raise ValueError("the backbone is not a ResNet-50 or ResNet-101 (2048 channels at "
                             "stride 32): not supported")
        heads = _heads(args, c, notes)
        if args.get("auxiliary_loss"):
            notes.append("auxiliary_loss=True: transformers 5 then feeds each decoder layer "
                         "the previous one's normed output, the original code does not; "
                         "frozenseg computes the original")
        classifier = sd.get("class_labels_classifier.weight", sd.get("class_embed.weight"))
        anchors = variant == "dab_detr"
        queries = sd["model.query_refpoint_embeddings.weight" if anchors
                     else "model.query_position_embeddings.weight"].shape[0]
        dec_layers = count_indexed(sd, "model.decoder.layers.")
        encoder_ffn = sd["model.encoder.layers.0.fc1.weight"].shape[0]
        decoder_ffn = sd["model.decoder.layers.0.fc1.weight"].shape[0]
        settings = {}
        if anchors:
            settings = {
                "pos_temperature": positive("temperature_height",
                                            args.get("temperature_height", 20), float),
                "keep_query_pos": dec_layers > 1 and (
                    "model.decoder.layers.1.ca_qpos_proj.weight" in sd),
                "num_patterns": len(sd.get("model.patterns.weight", ())),
                "activation": ("prelu" if "model.encoder.layers.0.activation_fn.weight" in sd
                               else "relu")}
        config = DetectorConfig(
            **{**FIXED[variant], **settings}, backbone={"name": f"resnet{depth}"},
            hidden_dim=c, nheads=heads, enc_layers=count_indexed(sd, "model.encoder.layers."),
            dec_layers=dec_layers, dim_feedforward=decoder_ffn,
            encoder_ffn_dim=None if encoder_ffn == decoder_ffn else encoder_ffn,
            num_queries=queries, num_classes=classifier.shape[0] - int(variant == "detr"),
        )
        return config, notes

    return derive_config


def _heads(args: dict, c: int, notes: list[str]) -> int:
    encoder = args.get("encoder_attention_heads")
    decoder = args.get("decoder_attention_heads", encoder)
    if encoder is None:
        encoder = decoder = 8 if c % 8 == 0 else c // 32
        notes.append(f"attention heads not saved: assumed {encoder}")
    if encoder != decoder:
        raise ValueError(f"encoder ({encoder}) and decoder ({decoder}) attention heads differ: "
                         "not supported")
    return positive("encoder_attention_heads", encoder)


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    sd, out, rest = _saved(state_dict, config.variant), Renamed(), {}
    for key, tensor in sd.items():
        if key.endswith("num_batches_tracked"):
            out.dropped.append((key, "batch norm counter (frozen batch norm keeps none)"))
        elif key.startswith("model.decoder.bbox_embed."):  # DAB-DETR's tied refinement head
            original = "bbox_predictor." + key[len("model.decoder.bbox_embed."):]
            if original in sd:
                check_duplicate(sd, key, original)
                out.dropped.append((key, f"duplicate of {original}"))
            else:
                rest[original] = tensor
        else:
            rest[key] = tensor
    apply_rules(rest, RULES, out)
    return out


def _format(variant: str, architecture: str, signature: tuple[str, ...]) -> CheckpointFormat:
    return CheckpointFormat(name=f"huggingface_{variant}",
                            description=f"Hugging Face {architecture}", signature=signature,
                            derive_config=derive_config_for(variant), rename=rename)


DETR = _format("detr", "DetrForObjectDetection", (
    r"^model\.input_projection\.weight$",
    r"^model\.query_position_embeddings\.weight$",
    r"^model\.decoder\.layers\.0\.self_attn\.q_proj\.weight$",
    r"^class_labels_classifier\.weight$",
))
CONDITIONAL_DETR = _format("conditional_detr", "ConditionalDetrForObjectDetection", (
    r"^model\.input_projection\.weight$",
    r"^model\.query_position_embeddings\.weight$",
    r"^model\.decoder\.ref_point_head\.layers\.0\.weight$",
    r"^model\.decoder\.query_scale\.layers\.0\.weight$",
))
DAB_DETR = _format("dab_detr", "DabDetrForObjectDetection", (
    r"^model\.input_projection\.weight$",
    r"^model\.query_refpoint_embeddings\.weight$",
    r"^model\.decoder\.ref_anchor_head\.layers\.0\.weight$",
))
FORMATS = (DETR, CONDITIONAL_DETR, DAB_DETR)
