"""Official D-FINE (Peterande/D-FINE) and DEIM (ShihuaHuang95/DEIM, its D-FINE models)
checkpoints, as their solvers save them.

The solver saves ``{'model', 'ema': {'module', 'updates'}, 'optimizer', 'lr_scheduler',
'last_epoch', 'date'}`` and the released weights ``{'model'}`` or ``{'ema'}``; the loader
takes the EMA copy. Keys: ``backbone.`` (HGNetv2, already frozenseg's names),
``encoder.`` (the hybrid encoder: ``nn.MultiheadAttention`` AIFI layers, RepNCSPELAN4
blocks ``cv1``..``cv4`` and SCDown ``downsample_convs.i.0.cv1/cv2``) and ``decoder.``
(``DFINETransformer``: input projections, query selection, ``decoder.decoder.layers`` /
``lqe_layers``, ``dec_score_head`` / ``dec_bbox_head`` / ``pre_bbox_head``, the FDR
constants ``up`` / ``reg_scale``, registered twice, and the anchors of eval_spatial_size).
They are read as transformers' D-FINE names and converted by
:mod:`frozenseg.formats.d_fine`, which both families share. The settings are in the YAML
config (``--config``, or config.yaml beside the weights): its ``HybridEncoder`` and
``DFINETransformer`` sections are read (per-level ``num_points``; DEIM's SiLU
``activation`` and ``mlp_act``, which ``model: DEIM`` applies to more heads than D-FINE's
code does), and its ``model``; the settings frozenseg does not reproduce are refused in one
line.
"""

from __future__ import annotations

import re

from frozenseg.formats import d_fine
from frozenseg.formats.base import (
    StateDict,
    check_duplicate,
    read_through,
    refuse_unsupported,
    rename_key,
)


def _backbone_key(m: re.Match) -> str:
    key = re.sub(r"^stem\.", "embedder.", m[1])
    key = re.sub(r"^stages\.", "encoder.stages.", key)
    key = re.sub(r"(^|\.)conv\.", r"\1convolution.", key)
    return d_fine.BACKBONE + re.sub(r"(^|\.)bn\.", r"\1normalization.", key)


LAYER = r"^(encoder\.encoder\.\d+|decoder\.decoder)\.layers\.(\d+)\."
# official name -> transformers' saved D-FINE name (first matching rule).
RULES = [
    (r"^backbone\.(.*)$", _backbone_key),
    (r"^(encoder|decoder)\.input_proj\.(\d+)\.conv\.", r"model.\1_input_proj.\2.0."),
    (r"^(encoder|decoder)\.input_proj\.(\d+)\.norm\.", r"model.\1_input_proj.\2.1."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm1\.",
     r"model.encoder.encoder.\1.layers.\2.self_attn_layer_norm."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm2\.",
     r"model.encoder.encoder.\1.layers.\2.final_layer_norm."),
    (r"^decoder\.decoder\.layers\.(\d+)\.norm1\.",
     r"model.decoder.layers.\1.self_attn_layer_norm."),
    (r"^decoder\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.final_layer_norm."),
    (r"^decoder\.decoder\.layers\.(\d+)\.cross_attn\.", r"model.decoder.layers.\1.encoder_attn."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.linear([12])\.",
     r"model.encoder.encoder.\1.layers.\2.fc\3."),
    (r"^decoder\.decoder\.layers\.(\d+)\.linear([12])\.", r"model.decoder.layers.\1.fc\2."),
    (r"^decoder\.decoder\.(layers|lqe_layers)\.", r"model.decoder.\1."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv1\.", r"model.encoder.\1_blocks.\2.conv1."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv2\.0\.", r"model.encoder.\1_blocks.\2.csp_rep1."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv2\.1\.", r"model.encoder.\1_blocks.\2.conv2."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv3\.0\.", r"model.encoder.\1_blocks.\2.csp_rep2."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv3\.1\.", r"model.encoder.\1_blocks.\2.conv3."),
    (r"^encoder\.(fpn|pan)_blocks\.(\d+)\.cv4\.", r"model.encoder.\1_blocks.\2.conv4."),
    (r"^encoder\.downsample_convs\.(\d+)\.0\.cv([12])\.",
     r"model.encoder.downsample_convs.\1.conv\2."),
    (r"^encoder\.", "model.encoder."),
    (r"^decoder\.(up|reg_scale)$", r"model.decoder.\1"),
    (r"^decoder\.(query_pos_head|pre_bbox_head)\.", r"model.decoder.\1."),
    (r"^decoder\.dec_score_head\.", "model.decoder.class_embed."),
    (r"^decoder\.dec_bbox_head\.", "model.decoder.bbox_embed."),
    (r"^decoder\.enc_output\.proj\.", "model.enc_output.0."),
    (r"^decoder\.enc_output\.norm\.", "model.enc_output.1."),
    (r"^decoder\.(enc_score_head|enc_bbox_head|denoising_class_embed)\.", r"model.\1."),
    (r"^decoder\.tgt_embed\.", "model.weight_embedding."),
]
IN_PROJ = re.compile(r"^(.*\.self_attn)\.in_proj_(weight|bias)$")
ANCHORS = re.compile(r"^decoder\.(anchors|valid_mask)$")
SECOND_CONSTANT = re.compile(r"^decoder\.decoder\.(up|reg_scale)$")

# YAML settings that change the computation without changing a key or a shape.
# DEIM's released configs (configs/base/deim.yml) set activation and mlp_act to silu.
ACTIVATIONS = ("relu", "silu")
OFFICIAL_HEADS = 8  # HybridEncoder's and DFINETransformer's nhead default
SUPPORTED = {
    "HybridEncoder": {"enc_act": ("gelu",), "act": ("silu",), "normalize_before": (False,),
                      "version": ("dfine",)},
    "DFINETransformer": {"activation": ACTIVATIONS, "mlp_act": ACTIVATIONS,
                         "cross_attn_method": ("default",), "query_select_method": ("default",)},
    "HGNetv2": {"use_lab": (True, False)},
}


def _sections(args: dict) -> dict[str, dict]:
    return {name: args.get(name) or {} for name in SUPPORTED}


def transformers_args(args: dict) -> dict:
    """The YAML's settings under the names of transformers' D-FINE config.json, which
    :func:`d_fine.derive_config` reads (absent ones stay absent)."""
    sections = _sections(args)
    refuse_unsupported("D-FINE/DEIM", [(table, sections[name], name)
                                  for name, table in SUPPORTED.items()])
    encoder, decoder = sections["HybridEncoder"], sections["DFINETransformer"]
    out = {}
    for target, section, name in (
            ("encoder_attention_heads", encoder, "nhead"),
            ("decoder_attention_heads", decoder, "nhead"),
            ("encode_proj_layers", encoder, "use_encoder_idx"),
            ("positional_encoding_temperature", encoder, "pe_temperature"),
            ("num_queries", decoder, "num_queries"), ("eval_idx", decoder, "eval_idx"),
            ("num_feature_levels", decoder, "num_levels"),
            ("decoder_n_points", decoder, "num_points"),
            ("decoder_activation_function", decoder, "activation")):
        if name in section:
            out[target] = section[name]
    # Unsaid, each module's own default holds, whatever the width: N is 128 wide with 8
    # heads of 16, not the width / 32 that transformers' config.json would be assumed to say.
    out.setdefault("encoder_attention_heads", OFFICIAL_HEADS)
    out.setdefault("decoder_attention_heads", OFFICIAL_HEADS)
    return out


def to_transformers(state_dict: StateDict) -> tuple[StateDict, dict[str, str], list]:
    """(the keys in transformers' saved names, each new name's official source, the
    official keys dropped with why). ``in_proj`` is split into q, k, v."""
    out: StateDict = {}
    source: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    for key, tensor in state_dict.items():
        if ANCHORS.match(key):
            dropped.append((key, "anchors of eval_spatial_size (made for every size)"))
            continue
        if m := SECOND_CONSTANT.match(key):
            check_duplicate(state_dict, key, f"decoder.{m[1]}")
            dropped.append((key, f"duplicate of decoder.{m[1]}"))
            continue
        new = rename_key(key, RULES) or key
        if m := IN_PROJ.match(new):
            for name, part in zip("qkv", tensor.chunk(3), strict=True):
                out[f"{m[1]}.{name}_proj.{m[2]}"] = part
                source[f"{m[1]}.{name}_proj.{m[2]}"] = key
        else:
            out[new], source[new] = tensor, key
    return out, source, dropped


def official_fields(args: dict) -> dict:
    """What the official code computes and transformers' D-FINE config cannot say: AIFI's
    positions on the transposed grid (its ``build_2d_sincos_position_embedding(w, h)``, as
    RT-DETR's; the same on square maps only), and the head activations transformers keeps
    at ReLU: DEIM's MLP heads take ``mlp_act``, and its quality heads the decoder's
    ``activation``; D-FINE's code (``model: DFINE``) has ReLU quality heads and no
    ``mlp_act``."""
    decoder = _sections(args)["DFINETransformer"]
    activation = decoder.get("activation", "relu")
    if activation != "relu" and args.get("model") not in ("DEIM", "DFINE"):
        raise ValueError(f"activation={activation!r} without model: DEIM or DFINE in the "
                         "config: DEIM's quality heads take it, D-FINE's do not")
    return {"aifi_transposed_grid": True, "mlp_activation": decoder.get("mlp_act", "relu"),
            "lqe_activation": activation if args.get("model") == "DEIM" else "relu"}


FORMAT = read_through(
    d_fine.FORMAT,
    name="d_fine",
    description="official D-FINE / DEIM (Peterande/D-FINE, ShihuaHuang95/DEIM layout)",
    signature=(
        r"^backbone\.stem\.stem1\.conv\.weight$",
        r"^encoder\.fpn_blocks\.0\.cv4\.conv\.weight$",
        r"^decoder\.decoder\.layers\.0\.gateway\.gate\.weight$",
        # D-FINE's FFN (DEIMv2's decoder layers, official_deimv2, have a SwiGLU instead)
        r"^decoder\.decoder\.layers\.0\.linear1\.weight$",
        r"^decoder\.decoder\.lqe_layers\.0\.reg_conf\.layers\.0\.weight$",
        r"^decoder\.dec_bbox_head\.0\.layers\.0\.weight$",
    ),
    translate=to_transformers,
    settings=lambda args: (transformers_args(args), []),
    config_name="YAML",
    fields=official_fields,
)
