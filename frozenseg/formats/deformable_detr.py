"""Official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR, main.py).

Single-stage, ``--with_box_refine`` and ``--two_stage`` models share one layout:

* ``backbone.0.body.*``: the torchvision ResNet (frozen batch norm) -> ``backbone.*``;
* ``input_proj.*``, ``query_embed`` (single-stage, Q x 2C) and ``transformer.*``: canonical;
* ``class_embed.i``, ``bbox_embed.i.layers.j``: one head per decoder layer. Without box
  refinement one head is shared, so every index stores the same tensors. Two-stage adds
  index ``dec_layers``, the head scoring the encoder proposals
  (-> ``transformer.enc_out_{class,bbox}_embed``);
* ``transformer.decoder.bbox_embed.i`` (box refinement) and ``transformer.decoder.class_embed.i``
  (two-stage) are the same modules registered a second time: dropped once checked equal.

The official two-stage code runs only with box refinement (its encoder reads
``decoder.bbox_embed[dec_layers]``), and only at width 256 (proposals are embedded with 128
features per coordinate); proposals are scored on class 0. Shapes give every width and
depth, but not heads apart from sampling points: nheads comes from the args.

Everything the shapes cannot say comes from ``ckpt['args']`` (main.py's arguments), with
the official defaults (and a note) where a checkpoint saved none.
"""

from __future__ import annotations

import re

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    backbone_levels,
    check_duplicate,
    count_indexed,
    positive,
    sampling_points,
)

BODY = "backbone.0.body."
RESNET_CHANNELS = [256, 512, 1024, 2048]
HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
DUPLICATE_HEAD = re.compile(r"^transformer\.decoder\.((class|bbox)_embed\.\d+\..*)$")
# Keys only DINO-style checkpoints have: those are another format's.
DINO_MARKERS = re.compile(
    r"^(transformer\.tgt_embed\.|transformer\.enc_out_|transformer\.decoder\.ref_point_head\.|"
    r"label_enc\.)"
)


def arg(args: dict, name: str, default, notes: list[str]):
    """``args[name]``, or the official default with a note saying it was assumed."""
    if args.get(name) is None:
        notes.append(f"{name} not in the checkpoint's args: assumed {default} "
                     "(the training script's default)")
        return default
    return args[name]


def resnet_backbone(sd: StateDict, args: dict) -> dict:
    """ResNet-50 or -101, told apart by the number of blocks in layer3."""
    if args.get("dilation"):
        raise ValueError("dilated (DC5) ResNet backbones are not supported")
    if any(k.startswith("backbone.1.") for k in sd):
        raise ValueError("learned position embeddings (backbone.1.*) are not supported")
    blocks = count_indexed(sd, f"{BODY}layer3.")
    depth = {6: 50, 23: 101}.get(blocks)
    if depth is None:
        raise ValueError(f"unsupported ResNet backbone: {blocks} blocks in layer3 (6 or 23)")
    return {"name": f"resnet{depth}"}


def transformer_config(
    sd: StateDict, args: dict, notes: list[str], stage_channels: list[int]
) -> dict:
    """DetectorConfig fields read off the shapes (nheads from args): widths, depths, levels,
    sampling points, classes. Layer 0 stands for all layers."""
    levels, c = sd["transformer.level_embed"].shape
    heads = positive("nheads", arg(args, "nheads", 8, notes))
    points = sampling_points(sd, heads, levels)
    stages, levels = backbone_levels(sd, "input_proj.", stage_channels)
    return dict(
        hidden_dim=c, backbone_levels=stages, num_feature_levels=levels, nheads=heads,
        enc_layers=count_indexed(sd, "transformer.encoder.layers."),
        dec_layers=count_indexed(sd, "transformer.decoder.layers."),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        **points,
        num_classes=sd["class_embed.0.weight"].shape[0],
    )


def stage_flags(sd: StateDict, args: dict, notes: list[str]) -> tuple[bool, bool]:
    """(two_stage, box_refine) from the keys the official code registers only then."""
    two_stage = "transformer.enc_output.weight" in sd
    box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in sd)
    for name, value in (("two_stage", two_stage), ("with_box_refine", box_refine)):
        if name in args and bool(args[name]) != value:
            notes.append(f"args say {name}={args[name]}, but the keys say {value}: keys win")
    return two_stage, box_refine


def derive_config(sd: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
    if "num_queries_one2one" in args:
        raise ValueError("the checkpoint's args name num_queries_one2one: an "
                         "H-Deformable-DETR checkpoint, convert it with format h_deformable_detr")
    notes: list[str] = []
    two_stage, box_refine = stage_flags(sd, args, notes)
    if two_stage:  # the number of proposals kept is main.py's --num_queries
        num_queries = positive("num_queries", arg(args, "num_queries", 300, notes))
    else:
        num_queries = sd["query_embed.weight"].shape[0]
    config = DetectorConfig(
        variant="deformable_detr", backbone=resnet_backbone(sd, args),
        **transformer_config(sd, args, notes, RESNET_CHANNELS), num_queries=num_queries,
        query_init="proposals" if two_stage else "learned", box_refine=box_refine,
        proposal_score="first_class", pos_temperature=10000.0, pos_offset=-0.5,
        inverse_sigmoid_eps=1e-5,
    )
    return config, notes


def canonical_name(key: str, config: DetectorConfig) -> str:
    """backbone.0.body.* -> backbone.*; two-stage: head index dec_layers -> enc_out_*."""
    if key.startswith(BODY):
        return "backbone." + key[len(BODY):]
    m = HEAD.match(key)
    if config.two_stage and m and int(m[2]) == config.dec_layers:
        return f"transformer.enc_out_{m[1]}.{m[3]}"
    return key


def rename(sd: StateDict, config: DetectorConfig) -> Renamed:
    """Rename to the canonical layout. The decoder's copies of the heads are dropped once
    checked equal to them (a copy that differs raises ValueError); a copy saved without
    the head itself is taken as the head."""
    out = Renamed()
    for key, tensor in sd.items():
        m = DUPLICATE_HEAD.match(key)
        if m and m[1] in sd:
            check_duplicate(sd, key, m[1])
            out.dropped.append((key, f"duplicate of {m[1]}"))
        else:
            out.put(key, canonical_name(m[1] if m else key, config), tensor)
    return out


SIGNATURE = (
    r"^backbone\.0\.body\.",
    r"^transformer\.level_embed$",
    r"^transformer\.encoder\.layers\.0\.self_attn\.sampling_offsets\.weight$",
    r"^input_proj\.0\.0\.weight$",
    r"^class_embed\.0\.weight$",
)


def is_h_deformable_detr(sd: StateDict) -> bool:
    """Keys only H-Deformable-DETR has: a Swin body, or mixed selection's C-wide query_embed
    next to two-stage heads."""
    mixed = ("transformer.enc_output.weight" in sd and "query_embed.weight" in sd
             and sd["query_embed.weight"].shape[1] == sd["transformer.level_embed"].shape[1])
    return mixed or f"{BODY}patch_embed.proj.weight" in sd


def matches_official_layout(sd: StateDict) -> bool:
    return not any(DINO_MARKERS.match(k) for k in sd)


FORMAT = CheckpointFormat(
    name="deformable_detr",
    description="official Deformable DETR (fundamentalvision/Deformable-DETR): single-stage, "
                "box refinement, two-stage",
    signature=SIGNATURE,
    derive_config=derive_config,
    rename=rename,
    refine_match=lambda sd: matches_official_layout(sd) and not is_h_deformable_detr(sd),
)
