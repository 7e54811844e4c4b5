"""Hugging Face ``LwDetrForObjectDetection`` and ``RfDetrForObjectDetection`` folders.

Both are a windowed ViT (LW-DETR: a CAE ViT, ``LwDetrViTBackbone``; RF-DETR: DINOv2,
``RfDetrDinov2Backbone``), a C2f multi-scale projector in place of an encoder, and a
two-stage deformable decoder without box refinement whose boxes move by ``scaled``
deltas. transformers 5 writes them with ``save_pretrained`` under different names than it
holds in memory: LW-DETR's ViT attention under its old names (``attention.attention.query``,
``attention.output``), RF-DETR everything under Roboflow's own layout (``backbone.0.encoder
.encoder``, ``projector.stages``, ``transformer.decoder.layers.i.norm1`` ...); both spellings
and the in-memory one are read (mapped onto the in-memory names first). Group DETR's extra
query groups and proposal heads train only: the first group is kept, the others dropped.

RF-DETR's own training script (roboflow/rf-detr) saves that layout too, in
``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'ema_model'}`` (released weights:
``{'model', 'args'}``): its ``args`` (an argparse.Namespace) are read as config.json's
settings (:func:`official_args`), DINOv2's heads from its width (64 channels a head).
"""

from __future__ import annotations

import re

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    apply_rules,
    count_indexed,
    merge_qkv,
    points_per_head,
    positive,
    refuse_unsupported,
    substitute_keys,
)
from frozenseg.formats.rt_detr import QKV

VIT = "model.backbone.backbone."
PROJ = "model.backbone.projector."
ATTN = r"\.attention\.attention\."

# Saved spellings (LW-DETR's ViT, Roboflow's RF-DETR layout) -> transformers' in-memory names.
TO_MEMORY = [
    (ATTN + "query.", ".attention.q_proj."), (ATTN + "key.", ".attention.k_proj."),
    (ATTN + "value.", ".attention.v_proj."),
    (r"\.attention\.output\.(dense\.)?", ".attention.o_proj."),
    (r"^backbone\.0\.encoder\.encoder\.", VIT),
    (r"^backbone\.0\.projector\.stages\.0\.0\.m\.(\d+)\.cv([12])\.",
     PROJ + r"projector_layer.bottlenecks.\1.conv\2."),
    (r"^backbone\.0\.projector\.stages\.0\.0\.cv([12])\.", PROJ + r"projector_layer.conv\1."),
    (r"^backbone\.0\.projector\.stages\.0\.1\.", PROJ + "layer_norm."),
    (r"^(model\.backbone\.projector\.projector_layer\..*conv[12])\.bn\.", r"\1.norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.",
     r"model.decoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.",
     r"model.decoder.layers.\1.cross_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear([12])\.", r"model.decoder.layers.\1.mlp.fc\2."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
    (r"^transformer\.", "model."),
    (r"^refpoint_embed\.", "model.reference_point_embed."),
    (r"^query_feat\.", "model.query_feat."),
]

LAYER = r"^model\.backbone\.backbone\.encoder\.layer\.(\d+)\."
DECODER = r"^model\.decoder\.layers\.(\d+)\."
RULES = [
    (VIT.replace(".", r"\.") + r"embeddings\.(patch_embeddings\.)?projection\.",
     "backbone.vit.patch_embed."),
    (r"^model\.backbone\.backbone\.embeddings\.position_embeddings$", "backbone.vit.pos_embed"),
    (r"^model\.backbone\.backbone\.embeddings\.cls_token$", "backbone.vit.cls_token"),
    (LAYER + r"(layernorm_before|norm1)\.", r"backbone.vit.blocks.\1.norm1."),
    (LAYER + r"(layernorm_after|norm2)\.", r"backbone.vit.blocks.\1.norm2."),
    (LAYER + r"attention\.o_proj\.", r"backbone.vit.blocks.\1.attn.proj."),
    (LAYER + r"attention\.", r"backbone.vit.blocks.\1.attn."),
    (LAYER + r"(intermediate|mlp)\.", r"backbone.vit.blocks.\1.mlp."),
    (LAYER + r"(gamma_|layer_scale)([12])(\.lambda1)?$", r"backbone.vit.blocks.\1.gamma\3"),
    (r"^model\.backbone\.backbone\.layernorm\.", "backbone.vit.norm."),
    (r"^model\.backbone\.projector\.scale_layers\.(\d+)\.sampling_layers\.(\d+)\.layers\.",
     r"backbone.projector.levels.\1.sample.\2."),
    (r"^model\.backbone\.projector\.scale_layers\.(\d+)\.projector_layer\.bottlenecks\.",
     r"backbone.projector.levels.\1.c2f.blocks."),
    (r"^model\.backbone\.projector\.scale_layers\.(\d+)\.projector_layer\.",
     r"backbone.projector.levels.\1.c2f."),
    (r"^model\.backbone\.projector\.scale_layers\.(\d+)\.layer_norm\.",
     r"backbone.projector.levels.\1.norm."),
    (r"^model\.backbone\.projector\.projector_layer\.bottlenecks\.",
     "backbone.projector.levels.0.c2f.blocks."),
    (r"^model\.backbone\.projector\.projector_layer\.", "backbone.projector.levels.0.c2f."),
    (r"^model\.backbone\.projector\.layer_norm\.", "backbone.projector.levels.0.norm."),
    (DECODER + r"self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (DECODER + r"cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (DECODER + r"layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (DECODER + r"mlp\.fc([12])\.", r"transformer.decoder.layers.\1.linear\2."),
    (DECODER + r"self_attn\.o_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.", "transformer.decoder."),
    (r"^model\.(enc_output|enc_output_norm|enc_out_class_embed|enc_out_bbox_embed)\.0\.",
     r"transformer.\1."),
]
GROUP_HEADS = re.compile(r"^model\.(enc_output|enc_output_norm|enc_out_class_embed|"
                         r"enc_out_bbox_embed)\.([1-9]\d*)\.")
BLOCK = re.compile(r"^model\.backbone\.backbone\.encoder\.layer\.(\d+)\.")
TOP_HEADS = re.compile(r"^(class|bbox)_embed\.(.*)$")
QUERY_TABLES = {"model.query_feat.weight": "transformer.tgt_embed.weight",
                "model.reference_point_embed.weight": "transformer.refpoint_embed.weight"}

# Fixed in both: the top-k proposals by best class give the anchors (moved by the learned
# per-query deltas), the content is learned, query_pos = MLP(sine(box)), boxes move by
# scaled deltas, a LayerNorm on every decoder output, ImageNet normalisation, padding masked.
FIXED = {"variant": "lw_detr", "encoder": "none", "query_init": "mixed", "box_refine": False,
         "proposal_score": "max_class", "decoder_norm": True, "ref_point_head": True,
         "ref_point_input": "sine", "box_delta": "scaled", "anchor_delta": True,
         "mask_padding": True}

# config.json settings that change the computation without changing a key or a shape.
SUPPORTED = {
    "decoder_activation_function": ("relu",),
    "attention_bias": (True,),
    "batch_norm_eps": (1e-5,),
}
BACKBONE_SUPPORTED = {
    "hidden_act": ("gelu",),
    "qkv_bias": (True,),
    "use_absolute_position_embeddings": (True,),
    "use_swiglu_ffn": (False,),
    "apply_layernorm": (True,),
    "reshape_hidden_states": (True,),
}


# RF-DETR's training arguments that change the computation: frozenseg reproduces these.
OFFICIAL_SUPPORTED = {
    "encoder": ("dinov2_windowed_small", "dinov2_windowed_base"),
    "two_stage": (True,), "bbox_reparam": (True,), "lite_refpoint_refine": (True,),
    "layer_norm": (True,), "segmentation_head": (False,), "projector_scale": (["P4"], ("P4",)),
}
# RF-DETR's argument -> config.json's name (backbone_config's for the ViT's).
OFFICIAL_NAMES = {"sa_nheads": "decoder_self_attention_heads",
                  "ca_nheads": "decoder_cross_attention_heads", "num_queries": "num_queries",
                  "group_detr": "group_detr", "dec_layers": "decoder_layers"}
OFFICIAL_BACKBONE = {"out_feature_indexes": "out_indices", "num_windows": "num_windows"}


def official_args(args: dict) -> dict:
    """RF-DETR's training arguments (``ckpt['args']``) as config.json's settings; other
    args (a config.json) as they are."""
    if "out_feature_indexes" not in args or "backbone_config" in args:
        return args
    refuse_unsupported("RF-DETR", [(OFFICIAL_SUPPORTED, args, "args")])
    out = {new: args[old] for old, new in OFFICIAL_NAMES.items() if old in args}
    out["backbone_config"] = {new: args[old] for old, new in OFFICIAL_BACKBONE.items()
                              if old in args}
    return out


def _family(sd: StateDict) -> str:
    return "RF-DETR" if f"{VIT}embeddings.cls_token" in sd else "LW-DETR"


def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
    """Widths, depths, levels, scales and classes from shapes; heads, query count, window
    layout and the ViT's output layers from config.json (passed as args)."""
    sd, notes = substitute_keys(state_dict, TO_MEMORY), []
    family = _family(sd)
    args = official_args(args)
    refuse_unsupported(family, [(SUPPORTED, args, "config"), (
        BACKBONE_SUPPORTED, args.get("backbone_config") or {}, "backbone config")])
    c = sd["model.enc_output.0.weight"].shape[0]
    backbone = _backbone(sd, args, family, c, notes)
    levels = len(backbone["scales"])
    self_heads = _setting(args, "decoder_self_attention_heads", 8, notes)
    cross_heads = _setting(args, "decoder_cross_attention_heads", 16, notes)
    points = points_per_head(sd, "model.decoder.layers.0.cross_attn.attention_weights.weight",
                             cross_heads, levels)
    rows = sd["model.query_feat.weight"].shape[0]
    queries = _setting(args, "num_queries", rows // _setting(args, "group_detr", 13, notes),
                       notes)
    if rows % queries:
        raise ValueError(f"{rows} learned queries are not a whole number of groups of "
                         f"num_queries={queries}")
    config = DetectorConfig(
        **FIXED, backbone=backbone, hidden_dim=c, backbone_levels=tuple(range(1, levels + 1)),
        num_feature_levels=levels, nheads=self_heads,
        dec_cross_heads=None if cross_heads == self_heads else cross_heads,
        enc_layers=0, dec_layers=count_indexed(sd, "model.decoder.layers."),
        dim_feedforward=sd["model.decoder.layers.0.mlp.fc1.weight"].shape[0],
        dec_n_points=points, num_queries=queries,
        num_classes=sd["model.enc_out_class_embed.0.weight"].shape[0],
        dn_labelbook_size=sd["model.enc_out_class_embed.0.weight"].shape[0],
        num_select=100 if family == "LW-DETR" else queries,
    )
    return config, notes


def _setting(args: dict, name: str, default, notes: list[str]):
    if name not in args:
        notes.append(f"{name} not saved (config.json): assumed {default}")
    return positive(name, args.get(name, default))


def _backbone(sd: StateDict, args: dict, family: str, c: int, notes: list[str]) -> dict:
    """The ViT and projector spec: shapes give widths, depth, patch, grid and scales;
    config.json the heads, windows, windowed blocks and output layers."""
    bb = args.get("backbone_config") or {}
    if not bb:
        raise ValueError(f"{family} needs its config.json (backbone_config: heads, windows, "
                         "output layers), which shapes cannot give")
    dim, _, patch, _ = sd[f"{VIT}embeddings.projection.weight" if family == "LW-DETR"
                          else f"{VIT}embeddings.patch_embeddings.projection.weight"].shape
    positions = sd[f"{VIT}embeddings.position_embeddings"].shape[1] - 1
    grid = int(round(positions**0.5))
    if grid * grid != positions:
        raise ValueError(f"{positions} ViT positions are not a square grid: not supported")
    out_layers = tuple(bb.get("out_indices") or ())
    if not out_layers or min(out_layers) < 1:
        raise ValueError(f"backbone_config out_indices={out_layers!r}: expected layer numbers "
                         ">= 1 (the stem's own map is not supported)")
    if family == "LW-DETR":
        side = int(round(positive("num_windows", bb.get("num_windows", 16)) ** 0.5))
        window_blocks = tuple(bb.get("window_block_indices", ()))
    else:
        side = positive("num_windows", bb.get("num_windows", 4))
        window_blocks = tuple(sorted(set(range(max(out_layers) + 1)) - set(out_layers)))
    heads = positive("num_attention_heads", bb.get("num_attention_heads", dim // 64))
    mlp = sd[f"{VIT}encoder.layer.0.{'intermediate' if family == 'LW-DETR' else 'mlp'}"
             ".fc1.weight"].shape[0]
    scales = _scales(sd, dim, family)
    if "projector_scale_factors" in args and tuple(args["projector_scale_factors"]) != scales:
        raise ValueError(f"projector_scale_factors {args['projector_scale_factors']} do not "
                         f"match the saved projector's {list(scales)}")
    level = (f"{PROJ}scale_layers.0.projector_layer." if family == "LW-DETR"
             else f"{PROJ}projector_layer.")
    hidden = sd[f"{level}bottlenecks.0.conv1.conv.weight"].shape[0]
    return {"name": "vit_projector", "flavour": "cae" if family == "LW-DETR" else "dinov2",
            "dim": dim, "heads": heads, "mlp_dim": mlp,
            "patch": patch, "pretrain_grid": grid, "window_side": side,
            "window_blocks": window_blocks, "out_layers": out_layers,
            "eps": float(bb.get("layer_norm_eps", 1e-6)), "scales": scales,
            "projector_dim": c, "blocks": count_indexed(sd, f"{level}bottlenecks."),
            "expansion": hidden / c, "norm": "batch" if family == "LW-DETR" else "layer",
            "norm_eps": float(args.get("layer_norm_eps", 1e-5)) if family == "RF-DETR" else 1e-5,
            "activation": _activation(args)}


def _activation(args: dict) -> str:
    act = args.get("activation_function", "silu")
    if act not in ("silu", "relu", "gelu"):
        raise ValueError(f"config activation_function={act!r} is not supported (supported: "
                         "'silu', 'relu', 'gelu')")
    return act


def _scales(sd: StateDict, dim: int, family: str) -> tuple[float, ...]:
    """Each projector level's scale, read off its first resampling path."""
    if family == "RF-DETR":
        return (1.0,)
    scales = []
    for level in range(count_indexed(sd, f"{PROJ}scale_layers.")):
        path = f"{PROJ}scale_layers.{level}.sampling_layers.0.layers."
        first = sd.get(f"{path}0.conv.weight")
        if f"{path}0.weight" in sd or f"{path}1.weight" in sd:
            scales.append(2.0)
        elif first is not None and first.shape[-1] == 3:
            scales.append(0.5)
        elif first is None:
            scales.append(1.0)
        else:
            raise ValueError(f"projector level {level}'s resampling is not one LW-DETR builds")
    return tuple(scales)


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    sd, out, rest = substitute_keys(state_dict, TO_MEMORY), Renamed(), {}
    source = _sources(state_dict)
    q = config.num_queries
    for key, tensor in sd.items():
        original = source[key]
        if key.endswith("num_batches_tracked"):
            out.dropped.append((original, "batch norm counter (frozen batch norm keeps none)"))
        elif key.endswith("embeddings.mask_token"):
            out.dropped.append((original, "DINOv2's mask token (masked-image pretraining only)"))
        elif (m := BLOCK.match(key)) and int(m[1]) >= max(config.backbone["out_layers"]):
            out.dropped.append((original, "ViT block after the last output layer (never read)"))
        elif GROUP_HEADS.match(key):
            out.dropped.append((original, "group DETR proposal head of a training-only group"))
        elif key in QUERY_TABLES:
            out.put(original, QUERY_TABLES[key], tensor[:q].clone())
            out.dropped.append((original, f"rows {q}.. (group DETR's training-only groups)"))
        elif m := TOP_HEADS.match(key):
            for i in range(config.dec_layers):  # one head shared by every decoder layer
                out.put(original, f"{m[1]}_embed.{i}.{m[2]}", tensor)
        else:
            rest[key] = tensor
    renamed = Renamed()
    apply_rules(rest, RULES, renamed)
    merge_qkv(renamed, QKV, ("q", "k", "v"))
    for name, target in renamed.renamed:
        out.renamed.append((source.get(name, name), target))
    out.kept += renamed.kept
    out.state_dict.update(renamed.state_dict)
    return out


def _sources(state_dict: StateDict) -> dict[str, str]:
    """In-memory name -> the checkpoint's own name, for the report."""
    return {next(iter(substitute_keys({k: None}, TO_MEMORY))): k for k in state_dict}


FORMAT = CheckpointFormat(
    name="huggingface_lw_detr",
    description="Hugging Face LwDetrForObjectDetection / RfDetrForObjectDetection, official "
                "RF-DETR (roboflow/rf-detr) checkpoints",
    signature=(
        r"^(model\.)?(backbone\.backbone\.embeddings|backbone\.0\.encoder\.encoder\.embeddings)\.",
        r"^(model\.|transformer\.)?enc_out_class_embed\.0\.weight$",
        r"^(model\.query_feat|query_feat)\.weight$",
        r"^(model\.decoder|transformer\.decoder)\.layers\.0\.cross_attn\.sampling_offsets\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
