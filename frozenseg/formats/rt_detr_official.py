"""Official RT-DETR and RT-DETRv2 checkpoints (lyuwenyu/RT-DETR, rtdetr_pytorch and
rtdetrv2_pytorch).

The training script saves ``{'model', 'ema': {'module', 'updates'}, 'optimizer', ...}``
and the released weights ``{'ema': {'module'}}``; the loader takes the EMA copy. Keys:
``backbone.`` (PResNet, already frozenseg's ResNet-vd names), ``encoder.`` (the hybrid
encoder, already canonical below ``transformer.encoder.``), ``decoder.`` (its input
projections, query selection heads, decoder and per-layer heads, renamed here). v1 and v2
spell a few Sequential children differently (``0``/``1`` or ``conv``/``norm``,
``proj``/``norm``): both are read. The model's settings are in its YAML config, not in
the file: pass it with ``--config`` (or keep it beside the weights as config.yaml); its
``HybridEncoder`` and ``RTDETRTransformer`` / ``RTDETRTransformerv2`` sections are read,
and what is missing is assumed as the released configs have it, with a note. v2's
per-level point counts (``num_points`` a list) are read from its saved
``num_points_scale`` and scattered into the attention's padded layout, as D-FINE's are.
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
    count_indexed,
    level_points,
    pad_decoder_points,
    positive,
    saved_or_assumed,
    substitute_keys,
)
from frozenseg.formats.rt_detr import FIXED, query_selection_rules

# v1 / v2 spellings of the same Sequential children -> one.
SPELLINGS = [
    (r"^(encoder|decoder)\.input_proj\.(\d+)\.conv\.", r"\1.input_proj.\2.0."),
    (r"^(encoder|decoder)\.input_proj\.(\d+)\.norm\.", r"\1.input_proj.\2.1."),
    (r"^decoder\.enc_output\.proj\.", "decoder.enc_output.0."),
    (r"^decoder\.enc_output\.norm\.", "decoder.enc_output.1."),
]
RULES = [
    (r"^encoder\.", "transformer.encoder."),
    (r"^decoder\.input_proj\.", "input_proj."),
    # The official decoder layer's norm1 follows self-attention, norm2 cross-attention:
    # Deformable DETR's (canonical) order is the other way round.
    (r"^decoder\.decoder\.layers\.(\d+)\.norm1\.", r"transformer.decoder.layers.\1.norm2."),
    (r"^decoder\.decoder\.layers\.(\d+)\.norm2\.", r"transformer.decoder.layers.\1.norm1."),
    (r"^decoder\.decoder\.layers\.", "transformer.decoder.layers."),
    (r"^decoder\.query_pos_head\.", "transformer.decoder.ref_point_head."),
    *query_selection_rules(r"^decoder\."),
    (r"^decoder\.dec_score_head\.", "class_embed."),
    (r"^decoder\.dec_bbox_head\.", "bbox_embed."),
    (r"^decoder\.tgt_embed\.", "transformer.tgt_embed."),
]
POINTS_SCALE = re.compile(r"^decoder\.decoder\.layers\.(\d+)\.cross_attn\.num_points_scale$")
ANCHORS = re.compile(r"^decoder\.(anchors|valid_mask)$")

# YAML settings that change the computation without changing a key or a shape.
SUPPORTED = {
    "HybridEncoder": {"enc_act": ("gelu",), "act": ("silu",), "normalize_before": (False,)},
    "decoder": {"activation": ("relu",), "cross_attn_method": ("default",),
                "query_select_method": ("default",), "eval_idx": (-1,)},
    "PResNet": {"variant": ("d",), "act": ("relu",)},
}


def _sections(args: dict) -> dict[str, dict]:
    """The YAML's sections frozenseg reads (empty where absent)."""
    decoder = args.get("RTDETRTransformerv2") or args.get("RTDETRTransformer") or {}
    return {"HybridEncoder": args.get("HybridEncoder") or {}, "decoder": decoder,
            "PResNet": args.get("PResNet") or {}}


def _check_args(sections: dict[str, dict]) -> None:
    for section, table in SUPPORTED.items():
        for name, accepted in table.items():
            value = sections[section].get(name)
            if name in sections[section] and value not in accepted:
                raise ValueError(f"RT-DETR with {name}={value!r} is not supported (supported: "
                                 f"{', '.join(map(repr, accepted))})")


def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
    sections, notes = _sections(args), []
    _check_args(sections)
    encoder, decoder = sections["HybridEncoder"], sections["decoder"]
    sd = substitute_keys(state_dict, SPELLINGS)
    if "decoder.denoising_class_embed.weight" not in sd:
        # frozenseg keeps the denoising label embedding: it embeds external boxes' labels
        raise ValueError("no decoder.denoising_class_embed: a model trained without "
                         "denoising (num_denoising: 0) is not supported")
    c = sd["decoder.enc_output.0.weight"].shape[0]
    encoder_dim = sd["encoder.input_proj.0.0.weight"].shape[0]
    backbone, widths = _backbone(sd)
    stages, levels = backbone_levels(sd, "encoder.input_proj.", widths)
    if count_indexed(sd, "decoder.input_proj.") != levels:
        raise ValueError(f"{count_indexed(sd, 'decoder.input_proj.')} decoder levels from "
                         f"{levels} encoder maps: only as many levels as maps are supported")
    heads = positive("nhead", saved_or_assumed(decoder, "nhead", 8, notes, "attention heads"))
    if encoder.get("nhead", heads) != heads:
        raise ValueError(f"encoder ({encoder['nhead']}) and decoder ({heads}) attention heads "
                         "differ: not supported")
    points = level_points(sd, "decoder.decoder.layers.0.cross_attn.attention_weights.weight",
                          POINTS_SCALE, heads, levels, decoder.get("num_points"))
    if sd["decoder.enc_score_head.weight"].shape[0] == 1:
        raise ValueError("a class-agnostic query selection (query_select_method: agnostic) "
                         "is not supported")
    aifi = tuple(saved_or_assumed(encoder, "use_encoder_idx", [levels - 1], notes, "AIFI levels"))
    encoder_ffn = sd["encoder.encoder.0.layers.0.linear1.weight"].shape[0]
    decoder_ffn = sd["decoder.decoder.layers.0.linear1.weight"].shape[0]
    config = DetectorConfig(
        **{**FIXED, "query_init": "mixed" if "decoder.tgt_embed.weight" in sd else "selected"},
        backbone=backbone, hidden_dim=c, backbone_levels=stages, num_feature_levels=levels,
        nheads=heads, enc_layers=count_indexed(sd, "encoder.encoder.0.layers."),
        dec_layers=count_indexed(sd, "decoder.decoder.layers."), dim_feedforward=decoder_ffn,
        encoder_ffn_dim=None if encoder_ffn == decoder_ffn else encoder_ffn,
        encoder_dim=None if encoder_dim == c else encoder_dim, aifi_levels=aifi,
        aifi_transposed_grid=True,
        csp_blocks=count_indexed(sd, "encoder.fpn_blocks.0.bottlenecks."),
        csp_expansion=sd["encoder.fpn_blocks.0.conv1.conv.weight"].shape[0] / encoder_dim,
        dec_n_points=points,
        num_queries=positive("num_queries", saved_or_assumed(decoder, "num_queries", 300, notes,
                                                     "query count")),
        num_classes=sd["decoder.enc_score_head.weight"].shape[0],
        pos_temperature=positive("pe_temperature", encoder.get("pe_temperature", 10000), float),
        dn_labelbook_size=sd["decoder.denoising_class_embed.weight"].shape[0] - 1,
    )
    return config, notes


def _backbone(sd: StateDict) -> tuple[dict, list[int]]:
    """PResNet's spec and stage widths from its shapes (variant d: the three-conv stem)."""
    if "backbone.conv1.conv1_3.conv.weight" not in sd or count_indexed(
            sd, "backbone.res_layers.") != 4:
        raise ValueError("the backbone is not PResNet variant d (ResNet-vd, four stages): "
                         "not supported")
    bottleneck = "backbone.res_layers.0.blocks.0.branch2c.conv.weight" in sd
    last = "branch2c" if bottleneck else "branch2b"
    widths = [sd[f"backbone.res_layers.{i}.blocks.0.{last}.conv.weight"].shape[0]
              for i in range(4)]
    spec = {"name": "resnet_vd", "block": "bottleneck" if bottleneck else "basic",
            "depths": tuple(count_indexed(sd, f"backbone.res_layers.{i}.blocks.")
                            for i in range(4)),
            "widths": tuple(widths), "stem": sd["backbone.conv1.conv1_3.conv.weight"].shape[0]}
    return spec, widths


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    out, rest = Renamed(), {}
    for key, tensor in substitute_keys(state_dict, SPELLINGS).items():
        if key.endswith("num_batches_tracked"):
            out.dropped.append((key, "batch norm counter (frozen batch norm keeps none)"))
        elif POINTS_SCALE.match(key):
            out.dropped.append((key, "v2's sampling scale, read: 1 / its level's points"))
        elif ANCHORS.match(key):
            out.dropped.append((key, "anchors of eval_spatial_size (made for every size)"))
        else:
            rest[key] = tensor
    apply_rules(rest, RULES, out)
    pad_decoder_points(out, config)
    return out


FORMAT = CheckpointFormat(
    name="rt_detr",
    description="official RT-DETR / RT-DETRv2 (lyuwenyu/RT-DETR layout)",
    signature=(
        r"^backbone\.conv1\.conv1_1\.conv\.weight$",
        r"^encoder\.input_proj\.0\.",
        r"^encoder\.encoder\.0\.layers\.0\.self_attn\.in_proj_weight$",
        r"^decoder\.enc_score_head\.weight$",
        r"^decoder\.decoder\.layers\.0\.cross_attn\.sampling_offsets\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
