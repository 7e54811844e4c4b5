"""Official LW-DETR checkpoints (Atten4Vis/LW-DETR), as its ``main.py`` saves them.

``main.py`` saves ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}`` (with
``ema_model`` under ``--use_ema``), ``args`` its argparse.Namespace; the released COCO and
Objects365 files hold ``model`` and ``args`` the same way. Keys: the CAE ViT under
``backbone.0.encoder.`` (``patch_embed.proj``, ``pos_embed`` with a class-token row,
``blocks.i`` with a stacked ``attn.qkv`` without bias beside CAE's ``q_bias`` and ``v_bias``:
the key projection has none; ``gamma_1``/``gamma_2``; no final norm), the projector under
``backbone.0.projector.`` (``stages_sampling.i.j``: ViT output j resampled for level i;
``stages.i.0``: a C2f of ConvX ``cv1``/``cv2`` and bottlenecks ``m.k``; ``stages.i.1``: its
channel layer norm), then the decoder and heads in the layout RF-DETR (a fork) kept:
``transformer.decoder``, group DETR's ``transformer.enc_output(_norm)`` /
``enc_out_class_embed`` / ``enc_out_bbox_embed``, ``refpoint_embed``, ``query_feat``,
``class_embed``, ``bbox_embed``. The ViT and projector are read as transformers' LwDetr
names, and the whole converted by :mod:`frozenseg.formats.lw_detr`, which both share.

Settings come from ``ckpt['args']`` (or ``--config``), read as config.json's: the ViT's
``out_feature_indexes`` count blocks from 0 where transformers' ``out_indices`` count the
patch embedding as stage 0, so each is one more there. The ViT's heads (12) and windows
(16, 4 x 4) are fixed in the official code, not arguments.
"""

from __future__ import annotations

import re

from frozenseg.formats import lw_detr
from frozenseg.formats.base import (
    StateDict,
    positive,
    read_through,
    refuse_unsupported,
    rename_key,
    saved_or_assumed,
)

VIT = r"^backbone\.0\.encoder\."
BLOCK = VIT + r"blocks\.(\d+)\."
HF_BLOCK = r"model.backbone.backbone.encoder.layer.\1."
STAGE = r"^backbone\.0\.projector\.stages\.(\d+)\."
HF_LEVEL = r"model.backbone.projector.scale_layers.\1."
# official name -> transformers' in-memory LwDetr name (first matching rule); the decoder's
# and heads' keys are RF-DETR's layout, which the shared converter reads as they are.
RULES = [
    (VIT + r"pos_embed$", "model.backbone.backbone.embeddings.position_embeddings"),
    (VIT + r"patch_embed\.proj\.", "model.backbone.backbone.embeddings.projection."),
    (BLOCK + r"norm1\.", HF_BLOCK + "layernorm_before."),
    (BLOCK + r"norm2\.", HF_BLOCK + "layernorm_after."),
    (BLOCK + r"attn\.proj\.", HF_BLOCK + "attention.o_proj."),
    (BLOCK + r"attn\.([qv])_bias$", HF_BLOCK + r"attention.\2_proj.bias"),
    (BLOCK + r"mlp\.", HF_BLOCK + "intermediate."),
    (BLOCK + r"gamma_([12])$", HF_BLOCK + r"gamma_\2"),
    (r"^backbone\.0\.projector\.stages_sampling\.(\d+)\.(\d+)\.(\d+)\.",
     HF_LEVEL + r"sampling_layers.\2.layers.\3."),
    (STAGE + r"0\.m\.(\d+)\.cv([12])\.", HF_LEVEL + r"projector_layer.bottlenecks.\2.conv\3."),
    (STAGE + r"0\.cv([12])\.", HF_LEVEL + r"projector_layer.conv\2."),
    (STAGE + r"1\.", HF_LEVEL + "layer_norm."),
]
QKV = re.compile(BLOCK + r"attn\.qkv\.weight$")

# main.py's argparse defaults, for arguments a Namespace may lack.
DEFAULTS = {"encoder": "vit_tiny", "vit_encoder_num_layers": 12, "out_feature_indexes": [-1],
            "projector_scale": "P4", "sa_nheads": 8, "ca_nheads": 8, "num_queries": 300,
            "group_detr": 13, "two_stage": False, "bbox_reparam": False,
            "lite_refpoint_refine": False, "decoder_norm": "LN", "position_embedding": "sine"}
# Arguments that change the computation (or add modules) without a key or shape that says so.
SUPPORTED = {
    "encoder": ("vit_tiny", "vit_small", "vit_base"), "two_stage": (True,),
    "bbox_reparam": (True,), "lite_refpoint_refine": (True,), "decoder_norm": ("LN",),
    "position_embedding": ("sine", "v2"),
}
# Backbone's level2scalefactor; P6 (an extra max-pool level) builds no model that runs.
SCALES = {"P3": 2.0, "P4": 1.0, "P5": 0.5}
VIT_HEADS, VIT_WINDOWS, VIT_EPS = 12, 16, 1e-6


def to_transformers(state_dict: StateDict) -> tuple[StateDict, dict[str, str], list]:
    """(the keys in transformers' names, each new name's official source, nothing dropped).
    The stacked ``qkv`` is split into q, k, v; ConvX's ``bn`` is transformers' ``norm``."""
    out: StateDict = {}
    source: dict[str, str] = {}
    for key, tensor in state_dict.items():
        if m := QKV.match(key):
            for name, part in zip("qkv", tensor.chunk(3), strict=True):
                new = f"model.backbone.backbone.encoder.layer.{m[1]}.attention.{name}_proj.weight"
                out[new], source[new] = part, key
            continue
        new = rename_key(key, RULES) or key
        if new.startswith("model.backbone.projector."):
            new = new.replace(".bn.", ".norm.")
        out[new], source[new] = tensor, key
    return out, source, []


def settings(args: dict) -> tuple[dict, list[str]]:
    """(config.json's settings, notes) from main.py's arguments; one line for the first
    argument frozenseg does not reproduce."""
    if "window_block_indexes" not in args:
        raise ValueError("official LW-DETR needs its training arguments (ckpt['args'] as "
                         "main.py saves them, or --config): window_block_indexes and "
                         "out_feature_indexes, which shapes cannot give")
    notes: list[str] = []
    given = {name: saved_or_assumed(args, name, default, notes, "LW-DETR")
             for name, default in DEFAULTS.items()}
    refuse_unsupported("official LW-DETR", [(SUPPORTED, given, "args")])
    levels = given["projector_scale"]
    levels = [levels] if isinstance(levels, str) else list(levels)
    refuse_unsupported("official LW-DETR", [({"projector_scale": tuple(SCALES)}, {
        "projector_scale": level}, "args") for level in levels])
    return {"decoder_self_attention_heads": given["sa_nheads"],
            "decoder_cross_attention_heads": given["ca_nheads"],
            "num_queries": given["num_queries"], "group_detr": given["group_detr"],
            "projector_scale_factors": [SCALES[level] for level in levels],
            "backbone_config": {"out_indices": _out_indices(given),
                                "window_block_indices": list(args["window_block_indexes"]),
                                "num_windows": VIT_WINDOWS, "num_attention_heads": VIT_HEADS,
                                "layer_norm_eps": VIT_EPS}}, notes


def _out_indices(given: dict) -> list[int]:
    """transformers' out_indices for the ViT's ``out_feature_indexes`` (negative ones count
    from the end, as ViT.__init__ reads them)."""
    depth = positive("vit_encoder_num_layers", given["vit_encoder_num_layers"])
    wanted = {i + depth if i < 0 else i for i in given["out_feature_indexes"]}
    return [i + 1 for i in range(depth) if i in wanted]


FORMAT = read_through(
    lw_detr.FORMAT,
    name="lw_detr",
    description="official LW-DETR (Atten4Vis/LW-DETR main.py layout)",
    signature=(
        r"^backbone\.0\.encoder\.pos_embed$",
        r"^backbone\.0\.encoder\.blocks\.0\.attn\.qkv\.weight$",
        r"^backbone\.0\.projector\.stages\.0\.0\.cv1\.conv\.weight$",
        r"^transformer\.enc_out_class_embed\.0\.weight$",
        r"^query_feat\.weight$",
    ),
    translate=to_transformers,
    settings=settings,
    config_name="args",
)
