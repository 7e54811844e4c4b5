"""Hugging Face ``DeformableDetrForObjectDetection``, transformers v4 and v5 key names.

v4 hub files name the backbone ``model.backbone.conv_encoder.model.*`` (timm ResNet:
conv1, bn1, layer1...) and keep ``self_attn.out_proj`` and ``layers.N.fc1``; v5 drops
``conv_encoder``, says ``o_proj`` and ``mlp.fc1``. The Hugging Face ResNet backbone
(``embedder``, ``encoder.stages``) is mapped onto torchvision's names.
"""

from __future__ import annotations

import re

import torch

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    apply_rules,
    backbone_levels,
    count_indexed,
    positive,
    substitute_keys,
)

# transformers' own v4 -> v5 renames (its conversion_mapping for deformable_detr).
V4_TO_V5 = [
    (r"backbone\.conv_encoder\.", "backbone."),
    (r"self_attn\.out_proj\.", "self_attn.o_proj."),
    (r"layers\.(\d+)\.fc([12])\.", r"layers.\1.mlp.fc\2."),
]

BACKBONE = r"^model\.backbone\.model\."
RULES = [
    (BACKBONE + r"embedder\.embedder\.convolution\.", "backbone.conv1."),
    (BACKBONE + r"embedder\.embedder\.normalization\.", "backbone.bn1."),
    (
        BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
        lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.0.",
    ),
    (
        BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
        lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.1.",
    ),
    (
        BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
        lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.",
    ),
    (
        BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
        lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.",
    ),
    (BACKBONE, "backbone."),  # timm ResNet: torchvision's names already
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (
        r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.",
        r"transformer.\1.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.",
        r"transformer.encoder.layers.\1.norm1.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.",
        r"transformer.encoder.layers.\1.norm2.",
    ),
    (
        r"^model\.encoder\.layers\.(\d+)\.mlp\.fc([12])\.",
        r"transformer.encoder.layers.\1.linear\2.",
    ),
    (r"^model\.encoder\.", "transformer.encoder."),
    (
        r"^model\.decoder\.layers\.(\d+)\.self_attn\.o_proj\.",
        r"transformer.decoder.layers.\1.self_attn.out_proj.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
        r"transformer.decoder.layers.\1.norm2.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.",
        r"transformer.decoder.layers.\1.norm1.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.",
        r"transformer.decoder.layers.\1.cross_attn.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.",
        r"transformer.decoder.layers.\1.norm3.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.mlp\.fc([12])\.",
        r"transformer.decoder.layers.\1.linear\2.",
    ),
]
QKV = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
HEADS = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
DECODER_HEADS = re.compile(r"^model\.decoder\.(class_embed|bbox_embed)\.(\d+)\.(.*)$")


def to_v5(state_dict: StateDict) -> StateDict:
    return substitute_keys(state_dict, V4_TO_V5)


def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
    """Shapes give widths, depths, levels, classes; config.json (as args) gives the rest."""
    sd, notes = to_v5(state_dict), []
    levels, c = sd["model.level_embed"].shape
    heads = args.get("encoder_attention_heads")
    if heads is None:
        heads = c // 32
        notes.append(f"attention heads not saved: assumed {heads} (head dim 32)")
    heads = positive("encoder_attention_heads", heads)
    two_stage = "model.enc_output.weight" in sd
    box_refine = args.get(
        "with_box_refine", any(k.startswith("model.decoder.bbox_embed.") for k in sd)
    )
    if two_stage:
        num_queries = positive("two_stage_num_proposals",
                               args.get("two_stage_num_proposals", 300))
        if "two_stage_num_proposals" not in args:
            notes.append("two-stage proposal count not saved: assumed 300")
    else:
        num_queries = sd["model.query_position_embeddings.weight"].shape[0]
    points = [
        sd[f"model.{part}.layers.0.{attn}.attention_weights.weight"].shape[0] // (heads * levels)
        for part, attn in (("encoder", "self_attn"), ("decoder", "encoder_attn"))
    ]
    depth = {6: 50, 23: 101}.get(_resnet_blocks(sd))
    if depth is None:
        raise ValueError(f"unsupported ResNet with {_resnet_blocks(sd)} blocks in stage 3")
    stages, levels = backbone_levels(sd, "model.input_proj.", [256, 512, 1024, 2048])
    config = DetectorConfig(
        variant="deformable_detr",
        backbone={"name": f"resnet{depth}"},
        hidden_dim=c,
        backbone_levels=stages,
        num_feature_levels=levels,
        nheads=heads,
        enc_layers=count_indexed(sd, "model.encoder.layers."),
        dec_layers=count_indexed(sd, "model.decoder.layers."),
        dim_feedforward=sd["model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        enc_n_points=points[0],
        dec_n_points=points[1],
        num_queries=num_queries,
        num_classes=_head(sd, "class_embed.0.weight").shape[0],
        query_init="proposals" if two_stage else "learned",
        box_refine=bool(box_refine),
    )
    return config, notes


def _head(sd: StateDict, key: str) -> torch.Tensor:
    """A head's tensor under its own name or, as transformers 5's save_pretrained writes
    heads tied to the decoder's, only under ``model.decoder.``."""
    return sd[key] if key in sd else sd[f"model.decoder.{key}"]


def _resnet_blocks(sd: StateDict) -> int:
    for prefix in ("model.backbone.model.encoder.stages.2.layers.", "model.backbone.model.layer3."):
        if n := count_indexed(sd, prefix):
            return n
    return 0


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    sd, out = to_v5(state_dict), Renamed()
    heads, qkv, rest = {}, {}, {}
    for key, tensor in sd.items():
        if HEADS.match(key) or DECODER_HEADS.match(key):
            heads[key] = tensor
        elif m := QKV.match(key):
            qkv[(int(m[1]), m[3]), m[2]] = (key, tensor)
        else:
            rest[key] = tensor
    apply_rules(rest, RULES, out)
    _merge_qkv(qkv, out)
    _place_heads(heads, config, out)
    return out


def _merge_qkv(qkv: dict, out: Renamed) -> None:
    """Separate q, k, v projections -> nn.MultiheadAttention's stacked in_proj."""
    for layer, kind in sorted({key for key, _ in qkv}):
        parts = [qkv[(layer, kind), name] for name in "qkv"]
        target = f"transformer.decoder.layers.{layer}.self_attn.in_proj_{kind}"
        out.state_dict[target] = torch.cat([t for _, t in parts])
        out.renamed.extend((src, target) for src, _ in parts)


def _place_heads(heads: StateDict, config: DetectorConfig, out: Renamed) -> None:
    """Per-layer heads; index dec_layers (two-stage) is the encoder-proposal head.

    ``heads`` holds the top-level heads and their copies under model.decoder. Hub files
    drop weights tied to another key: a missing head comes from its model.decoder. copy,
    or from head 0 when the layers share one head.
    """
    used = set()
    for name in ("class_embed", "bbox_embed"):
        for i in range(config.dec_layers + int(config.two_stage)):
            target = f"{name}.{i}." if i < config.dec_layers else f"transformer.enc_out_{name}."
            for prefix in (f"{name}.{i}.", f"model.decoder.{name}.{i}.", f"{name}.0."):
                found = {k: v for k, v in heads.items() if k.startswith(prefix)}
                if found:
                    break
            for key, tensor in found.items():
                new = target + key[len(prefix) :]
                if prefix == f"{name}.0." and i != 0:
                    out.state_dict[new] = tensor
                    out.derived.append((new, f"tied to {key}"))
                else:
                    out.put(key, new, tensor)
                    used.add(key)
    out.dropped.extend((k, "duplicate of a top-level head") for k in heads if k not in used)


FORMAT = CheckpointFormat(
    name="huggingface",
    description="Hugging Face DeformableDetrForObjectDetection (transformers v4 or v5 names)",
    signature=(
        r"^model\.level_embed$",
        r"^model\.encoder\.layers\.0\.self_attn\.sampling_offsets\.",
        r"^model\.input_proj\.0\.0\.weight$",
        r"^(model\.decoder\.)?class_embed\.0\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
