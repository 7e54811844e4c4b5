"""Official Grounding DINO checkpoints (IDEA-Research/GroundingDINO's layout:
``groundingdino_swint_ogc.pth``, ``groundingdino_swinb_cogcoor.pth``).

The file is ``torch.save({'model': state_dict, ...})``: the released ones hold the model,
a training run's checkpoint (DETR-style ``main.py`` scripts) may add ``optimizer``,
``epoch`` and ``args``, an argparse Namespace holding the config's settings.
Keys: the Swin backbone under ``backbone.0.`` (the official Swin's names: ``attn.qkv``
stacked, ``relative_position_index`` saved, ``norm1..3`` on the stages read), BERT under
``bert.`` (with its pooler and, from older transformers, its ``position_ids`` buffer),
``feat_map`` (BERT -> the detector's width), ``input_proj``, ``transformer.encoder.layers``
(deformable), ``.text_layers`` (the text enhancer, ``nn.MultiheadAttention``) and
``.fusion_layers`` (``gamma_v``/``gamma_l``, ``v_proj``/``l_proj``...),
``transformer.decoder.layers`` (``ca_text``: the text cross-attention, ``catext_norm``),
the box heads twice (``bbox_embed.i`` and the decoder's ``transformer.decoder.bbox_embed.i``,
one module per layer or one shared), ``transformer.enc_out_bbox_embed``, ``enc_output(_norm)``,
``tgt_embed`` and ``level_embed``. The class heads (``ContrastiveEmbed``) have no weights.

They are read as transformers' GroundingDino names (the mapping of transformers'
``convert_grounding_dino_to_hf.py``; the stacked attention projections stay stacked, which
the shared converter makes of transformers' separate ones anyway) and converted by
:mod:`frozenseg.formats.grounding_dino`, which both layouts share.

Settings are in the Python config the official code takes with ``-c``
(``GroundingDINO_SwinT_OGC.py``): ``frozenseg convert --config`` reads it as data (never
run), or they come from the checkpoint's ``args``; the released models' settings are assumed
(and noted) where neither has them. The official model pads its token logits to 256 whatever
the config's ``max_text_len`` says. BERT's own settings are bert-base-uncased's, which the
official code loads by name (its widths from the weights, a head per 64 channels); its
tokenizer must be found as files: beside the checkpoint or in ``--tokenizer``.
"""

from __future__ import annotations

import re

from frozenseg.formats import grounding_dino
from frozenseg.formats.base import (
    StateDict,
    positive,
    read_through,
    refuse_unsupported,
    rename_key,
)

# GroundingDINO.__init__ fixes it (self.max_text_len = 256), and ContrastiveEmbed's default.
MAX_TEXT_LEN = 256
# What GroundingDINO_SwinT_OGC.py sets (GroundingDINO_SwinB_cfg.py differs only in its
# backbone), for the settings that change the computation without changing a key or a shape.
RELEASED = {
    "nheads": 8, "num_queries": 900, "pe_temperatureH": 20, "pe_temperatureW": 20,
    "position_embedding": "sine", "transformer_activation": "relu",
    "two_stage_type": "standard", "query_dim": 4, "num_patterns": 0, "pre_norm": False,
    "sub_sentence_present": True, "use_text_enhancer": True, "use_fusion_layer": True,
    "use_text_cross_attention": True, "text_encoder_type": "bert-base-uncased",
}
SUPPORTED = {name: (RELEASED[name],) for name in (
    "position_embedding", "transformer_activation", "two_stage_type", "query_dim",
    "num_patterns", "pre_norm", "sub_sentence_present", "use_text_enhancer",
    "use_fusion_layer", "use_text_cross_attention")}

SWIN_BLOCK = r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\."
HF_BLOCK = r"model.backbone.model.encoder.layers.\1.blocks.\2."
ENC, TEXT, FUSION = (rf"^transformer\.encoder\.{part}\.(\d+)\."
                     for part in ("layers", "text_layers", "fusion_layers"))
DEC = r"^transformer\.decoder\.layers\.(\d+)\."
HF_ENC, HF_DEC = r"model.encoder.layers.\1.", r"model.decoder.layers.\1."
# official name -> transformers' saved GroundingDino name (first matching rule).
RULES = [
    (r"^backbone\.0\.patch_embed\.proj\.",
     "model.backbone.model.embeddings.patch_embeddings.projection."),
    (r"^backbone\.0\.patch_embed\.norm\.", "model.backbone.model.embeddings.norm."),
    (SWIN_BLOCK + r"norm1\.", HF_BLOCK + "layernorm_before."),
    (SWIN_BLOCK + r"norm2\.", HF_BLOCK + "layernorm_after."),
    (SWIN_BLOCK + r"attn\.proj\.", HF_BLOCK + "attention.output.dense."),
    (SWIN_BLOCK + r"attn\.", HF_BLOCK + "attention.self."),  # qkv, relative_position_bias_table
    (SWIN_BLOCK + r"mlp\.fc1\.", HF_BLOCK + "intermediate.dense."),
    (SWIN_BLOCK + r"mlp\.fc2\.", HF_BLOCK + "output.dense."),
    (r"^backbone\.0\.layers\.(\d+)\.downsample\.",
     r"model.backbone.model.encoder.layers.\1.downsample."),
    (r"^backbone\.0\.norm(\d)\.",
     lambda m: f"model.backbone.model.hidden_states_norms.stage{int(m[1]) + 1}."),
    (r"^bert\.", "model.text_backbone."),
    (r"^feat_map\.", "model.text_projection."),
    (r"^input_proj\.", "model.input_proj_vision."),
    (TEXT + r"norm1\.", HF_ENC + "text_enhancer_layer.layer_norm_before."),
    (TEXT + r"norm2\.", HF_ENC + "text_enhancer_layer.layer_norm_after."),
    (TEXT + r"linear([12])\.", HF_ENC + r"text_enhancer_layer.fc\2."),
    (TEXT, HF_ENC + "text_enhancer_layer."),
    (FUSION + r"gamma_v$", HF_ENC + "fusion_layer.vision_param"),
    (FUSION + r"gamma_l$", HF_ENC + "fusion_layer.text_param"),
    (FUSION + r"layer_norm_v\.", HF_ENC + "fusion_layer.layer_norm_vision."),
    (FUSION + r"layer_norm_l\.", HF_ENC + "fusion_layer.layer_norm_text."),
    (FUSION + r"attn\.(values_|out_)?v_proj\.", HF_ENC + r"fusion_layer.attn.\2vision_proj."),
    (FUSION + r"attn\.(values_|out_)?l_proj\.", HF_ENC + r"fusion_layer.attn.\2text_proj."),
    (ENC + r"norm1\.", HF_ENC + "deformable_layer.self_attn_layer_norm."),
    (ENC + r"norm2\.", HF_ENC + "deformable_layer.final_layer_norm."),
    (ENC + r"linear([12])\.", HF_ENC + r"deformable_layer.fc\2."),
    (ENC, HF_ENC + "deformable_layer."),
    (DEC + r"norm1\.", HF_DEC + "encoder_attn_layer_norm."),
    (DEC + r"norm2\.", HF_DEC + "self_attn_layer_norm."),
    (DEC + r"norm3\.", HF_DEC + "final_layer_norm."),
    (DEC + r"catext_norm\.", HF_DEC + "encoder_attn_text_layer_norm."),
    (DEC + r"ca_text\.", HF_DEC + "encoder_attn_text."),
    (DEC + r"cross_attn\.", HF_DEC + "encoder_attn."),
    (DEC + r"linear([12])\.", HF_DEC + r"fc\2."),
    (DEC, HF_DEC),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layer_norm."),
    (r"^transformer\.decoder\.ref_point_head\.", "model.decoder.reference_points_head."),
    (r"^transformer\.decoder\.bbox_embed\.", "model.decoder.bbox_embed."),
    (r"^transformer\.enc_out_bbox_embed\.", "model.encoder_output_bbox_embed."),
    (r"^transformer\.tgt_embed\.", "model.query_position_embeddings."),
    (r"^transformer\.(enc_output|enc_output_norm|level_embed)\b", r"model.\1"),
]
# Saved by the official modules, read by no computation frozenseg reproduces.
DROPPED = [
    (re.compile(SWIN_BLOCK + r"attn\.relative_position_index$"),
     "Swin's index buffer, computed from the window size"),
    (re.compile(r"^bert\.embeddings\.(position_ids|token_type_ids)$"),
     "BERT's index buffer: the prompt's own ids are used"),
    (re.compile(r"^bert\.pooler\."), "BERT's pooler, which Grounding DINO never reads"),
]
SWIN_PATCHES = "backbone.0.patch_embed.proj.weight"


def settings(args: dict) -> tuple[dict, list[str]]:
    """(transformers' config.json settings, notes) for the config's settings, the released
    models' where it has none (noted); one line for the first setting frozenseg does not
    reproduce."""
    missing = [name for name in RELEASED if name not in args]
    notes = []
    if len(missing) == len(RELEASED):
        notes.append("no config given (--config GroundingDINO_SwinT_OGC.py) or saved in the "
                     "checkpoint: assumed the released models' settings")
    elif missing:
        notes.append("not in the config, assumed the released models' "
                     + ", ".join(f"{name}={RELEASED[name]!r}" for name in missing))
    merged = {**RELEASED, **args}
    refuse_unsupported("official Grounding DINO", [(SUPPORTED, merged, "config")])
    if merged["pe_temperatureH"] != merged["pe_temperatureW"]:
        raise ValueError(f"official Grounding DINO with pe_temperatureH="
                         f"{merged['pe_temperatureH']!r} and pe_temperatureW="
                         f"{merged['pe_temperatureW']!r} is not supported (equal ones are)")
    if "roberta" in str(merged["text_encoder_type"]).lower():
        raise ValueError(f"official Grounding DINO with text_encoder_type="
                         f"{merged['text_encoder_type']!r} is not supported (BERT's is)")
    return transformers_args(merged), notes


def transformers_args(merged: dict) -> dict:
    """The settings under the names of transformers' config.json, which
    :func:`grounding_dino.derive_config` reads."""
    heads = positive("nheads", merged["nheads"])
    return {"encoder_attention_heads": heads, "decoder_attention_heads": heads,
            "num_queries": positive("num_queries", merged["num_queries"]),
            "positional_embedding_temperature": positive(
                "pe_temperatureH", merged["pe_temperatureH"], float),
            "max_text_len": MAX_TEXT_LEN}


def to_transformers(state_dict: StateDict) -> tuple[StateDict, dict[str, str], list]:
    """(the keys in transformers' saved names, each new name's official source, the
    official keys dropped with why)."""
    if SWIN_PATCHES not in state_dict:
        raise ValueError(f"no {SWIN_PATCHES}: only the Swin backbones of the released models "
                         "are supported (not the official code's ResNet)")
    out: StateDict = {}
    source: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    for key, tensor in state_dict.items():
        why = next((why for pattern, why in DROPPED if pattern.match(key)), None)
        if why is not None:
            dropped.append((key, why))
            continue
        new = rename_key(key, RULES) or key
        out[new], source[new] = tensor, key
    return out, source, dropped


FORMAT = read_through(
    grounding_dino.FORMAT,
    name="grounding_dino",
    description="official Grounding DINO (IDEA-Research/GroundingDINO layout, open vocabulary)",
    signature=(
        r"^bert\.embeddings\.word_embeddings\.weight$",
        r"^feat_map\.weight$",
        r"^transformer\.encoder\.fusion_layers\.0\.attn\.v_proj\.weight$",
        r"^transformer\.decoder\.layers\.0\.ca_text\.in_proj_weight$",
    ),
    translate=to_transformers,
    settings=settings,
    config_name="config",
)
