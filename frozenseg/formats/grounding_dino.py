"""Hugging Face ``GroundingDinoForObjectDetection`` folders (transformers 5 ``save_pretrained``).

The folder also holds what ``GroundingDinoProcessor.save_pretrained`` writes: the
tokenizer files travel into the converted detector's ``tokenizer/`` folder
(:func:`tokenizer_files`). The backbone is transformers' Swin (mapped onto the official Swin's
names: the released Grounding DINO models use Swin-T and Swin-B) or ResNet (onto
torchvision's, as for Deformable DETR); BERT keeps transformers' names under
``text_backbone.bert``. transformers' Swin shrinks its window (and stops shifting) on a
stage map no larger than the window, where the official Swin pads: the two agree on
images whose stride-32 map is larger than the window (over 224 px a side for window 7).
transformers 5 saves the per-layer box heads, and the decoder's references to them, once
when they are tied (``decoder_bbox_embed_share``): the missing ones are taken from the
saved one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from frozenseg.detector.backbones.swin import relative_position_index, swin_config_from_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.formats import huggingface
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    apply_rules,
    backbone_levels,
    check_duplicate,
    count_indexed,
    merge_qkv,
    positive,
    substitute_keys,
)

ENC = r"^model\.encoder\.layers\.(\d+)\."
DEC = r"^model\.decoder\.layers\.(\d+)\."
T_ENC, T_DEC = r"transformer.encoder.layers.\1.", r"transformer.decoder.layers.\1."
RULES = [
    *[rule for rule in huggingface.RULES if rule[0].startswith(huggingface.BACKBONE)],
    (r"^model\.input_proj_vision\.", "input_proj."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.text_backbone\.", "text_backbone.bert."),
    (r"^model\.text_projection\.", "text_backbone.projection."),
    (r"^model\.query_position_embeddings\.", "transformer.tgt_embed."),
    (ENC + r"text_enhancer_layer\.layer_norm_before\.", T_ENC + "text_enhancer_layer.norm1."),
    (ENC + r"text_enhancer_layer\.layer_norm_after\.", T_ENC + "text_enhancer_layer.norm2."),
    (ENC + r"text_enhancer_layer\.fc([12])\.", T_ENC + r"text_enhancer_layer.linear\2."),
    (ENC + r"deformable_layer\.self_attn_layer_norm\.", T_ENC + "deformable_layer.norm1."),
    (ENC + r"deformable_layer\.final_layer_norm\.", T_ENC + "deformable_layer.norm2."),
    (ENC + r"deformable_layer\.fc([12])\.", T_ENC + r"deformable_layer.linear\2."),
    (r"^model\.encoder\.", "transformer.encoder."),
    (DEC + r"self_attn_layer_norm\.", T_DEC + "norm2."),
    (DEC + r"encoder_attn_text_layer_norm\.", T_DEC + "norm_text."),
    (DEC + r"encoder_attn_text\.", T_DEC + "text_cross_attn."),
    (DEC + r"encoder_attn_layer_norm\.", T_DEC + "norm1."),
    (DEC + r"encoder_attn\.", T_DEC + "cross_attn."),
    (DEC + r"final_layer_norm\.", T_DEC + "norm3."),
    (DEC + r"fc([12])\.", T_DEC + r"linear\2."),
    (r"^model\.decoder\.layer_norm\.", "transformer.decoder.norm."),
    (r"^model\.decoder\.reference_points_head\.", "transformer.decoder.ref_point_head."),
    (r"^model\.decoder\.", "transformer.decoder."),
    (r"^model\.(enc_output|enc_output_norm)\.", r"transformer.\1."),
    (r"^model\.encoder_output_bbox_embed\.", "transformer.enc_out_bbox_embed."),
]
SWIN = r"^model\.backbone\.model\."
SWIN_PATCHES = "model.backbone.model.embeddings.patch_embeddings.projection.weight"
BLOCK = SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
T_BLOCK = r"backbone.layers.\1.blocks.\2."
SWIN_RULES = [
    (SWIN + r"embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
    (SWIN + r"embeddings\.norm\.", "backbone.patch_embed.norm."),
    (BLOCK + r"layernorm_before\.", T_BLOCK + "norm1."),
    (BLOCK + r"layernorm_after\.", T_BLOCK + "norm2."),
    (BLOCK + r"attention\.self\.", T_BLOCK + "attn."),  # query/key/value: stacked as qkv
    (BLOCK + r"attention\.output\.dense\.", T_BLOCK + "attn.proj."),
    (BLOCK + r"intermediate\.dense\.", T_BLOCK + "mlp.fc1."),
    (BLOCK + r"output\.dense\.", T_BLOCK + "mlp.fc2."),
    (SWIN + r"encoder\.layers\.(\d+)\.downsample\.", r"backbone.layers.\1.downsample."),
    (SWIN + r"hidden_states_norms\.stage(\d)\.", lambda m: f"backbone.norm{int(m[1]) - 1}."),
]
# transformers 5 keeps its Swin in memory under new names (``swin.``, ``q_proj``, ``o_proj``,
# ``mlp.fc1``) and saves it under the old ones; both are read, as the old ones.
SWIN_IN_MEMORY = [
    (r"^model\.backbone\.model\.swin\.(embeddings|encoder)\.", r"model.backbone.model.\1."),
    *[(r"(blocks\.\d+\.attention\.)" + short + r"_proj\.", r"\1self." + long + ".")
      for short, long in (("q", "query"), ("k", "key"), ("v", "value"))],
    (r"(blocks\.\d+\.attention\.)o_proj\.", r"\1output.dense."),
    (r"(blocks\.\d+\.attention\.)relative_position_bias\.", r"\1self."),
    (r"(blocks\.\d+\.)mlp\.fc1\.", r"\1intermediate.dense."),
    (r"(blocks\.\d+\.)mlp\.fc2\.", r"\1output.dense."),
]
# The Swin model's final norm, which the backbone's stage outputs never pass through.
SWIN_UNUSED = re.compile(SWIN + r"swin\.layernorm\.")
SWIN_QKV = re.compile(r"^(backbone\.layers\.\d+\.blocks\.\d+\.attn)\.(query|key|value)\."
                      r"(weight|bias)$")
QKV = re.compile(r"^(.*\.(?:self_attn|text_cross_attn))\.(query|key|value)\.(weight|bias)$")
BOX_HEAD = re.compile(r"^(model\.decoder\.)?bbox_embed\.(\d+)\.(.*)$")

# Fixed in Grounding DINO's code (and transformers'): DINO's decoder and query selection,
# anchors ranked by their best token, inverse sigmoid clamped at 1e-5.
FIXED = {"variant": "grounding_dino", "encoder": "fusion", "box_refine": True,
         "proposal_score": "max_class", "decoder_norm": True, "ref_point_head": True,
         "pos_offset": 0.0, "inverse_sigmoid_eps": 1e-5, "num_select": 100}
# config.json settings that change the computation without changing a key or a shape.
SUPPORTED = {"activation_function": ("relu",), "position_embedding_type": ("sine",),
             "layer_norm_eps": (1e-5,), "query_dim": (4,), "two_stage": (True,)}
BERT_SUPPORTED = {"position_embedding_type": ("absolute",), "hidden_act": ("gelu",)}
BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
             "layer_norm_eps", "pad_token_id")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")


def _check_args(args: dict) -> None:
    for table, settings, what in ((SUPPORTED, args, "config"),
                                  (BERT_SUPPORTED, args.get("text_config") or {}, "text config")):
        for name, allowed in table.items():
            if name in settings and settings[name] not in allowed:
                raise ValueError(f"{what} {name}={settings[name]!r} is not supported "
                                 f"(frozenseg reproduces {allowed[0]!r})")
    backbone = (args.get("backbone_config") or {}).get("model_type", "swin")
    if args.get("use_timm_backbone") or backbone not in ("resnet", "swin"):
        raise ValueError(f"the {'timm' if args.get('use_timm_backbone') else backbone} "
                         "backbone is not supported yet: only transformers' Swin and ResNet")


def _bert_config(sd: StateDict, args: dict) -> dict:
    """The text backbone's BertConfig settings: config.json's text_config, shapes first."""
    text = dict(args.get("text_config") or {})
    words, width = sd["model.text_backbone.embeddings.word_embeddings.weight"].shape
    layer = "model.text_backbone.encoder.layer.0."
    shapes = {
        "vocab_size": words, "hidden_size": width,
        "num_hidden_layers": count_indexed(sd, "model.text_backbone.encoder.layer."),
        "intermediate_size": sd[layer + "intermediate.dense.weight"].shape[0],
        "max_position_embeddings": sd[
            "model.text_backbone.embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": sd["model.text_backbone.embeddings.token_type_embeddings.weight"
                              ].shape[0],
    }
    defaults = {"num_attention_heads": width // 64 or 1, "hidden_act": "gelu",
                "layer_norm_eps": 1e-12, "pad_token_id": 0}
    merged = {**defaults, **text, **shapes}
    return {k: merged[k] for k in BERT_KEYS}


def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
    """Shapes give widths, depths, levels and points; config.json the rest."""
    sd, notes = _saved_names(state_dict), []
    _check_args(args)
    levels, c = sd["model.level_embed"].shape
    heads = args.get("encoder_attention_heads")
    if heads is None:
        heads = 8
        notes.append("attention heads not saved (config.json): assumed 8")
    heads = positive("encoder_attention_heads", heads)
    if args.get("decoder_attention_heads", heads) != heads:
        raise ValueError(f"encoder ({heads}) and decoder ({args['decoder_attention_heads']}) "
                         "attention heads differ: not supported")
    points = [sd[f"model.{part}.layers.0.{attn}.attention_weights.weight"].shape[0]
              // (heads * levels)
              for part, attn in (("encoder", "deformable_layer.self_attn"),
                                 ("decoder", "encoder_attn"))]
    backbone, widths = _backbone(sd)
    stages, levels = backbone_levels(sd, "model.input_proj_vision.", widths)
    learned = "model.query_position_embeddings.weight" in sd
    if "num_queries" not in args and not learned:
        notes.append("query count not saved (config.json num_queries): assumed 900")
    num_queries = (sd["model.query_position_embeddings.weight"].shape[0] if learned
                   else positive("num_queries", args.get("num_queries", 900)))
    max_text_len = positive("max_text_len", args.get("max_text_len", 256))
    config = DetectorConfig(
        **FIXED, backbone=backbone, hidden_dim=c, backbone_levels=stages,
        num_feature_levels=levels, nheads=heads,
        enc_layers=count_indexed(sd, "model.encoder.layers."),
        dec_layers=count_indexed(sd, "model.decoder.layers."),
        dim_feedforward=sd["model.decoder.layers.0.fc1.weight"].shape[0],
        encoder_ffn_dim=sd["model.encoder.layers.0.deformable_layer.fc1.weight"].shape[0],
        enc_n_points=points[0], dec_n_points=points[1], num_queries=num_queries,
        num_classes=max_text_len, query_init="mixed" if learned else "selected",
        pos_temperature=positive("positional_embedding_temperature",
                                 args.get("positional_embedding_temperature", 20), float),
        text_encoder=_bert_config(sd, args), max_text_len=max_text_len,
    )
    return config, notes


def _backbone(sd: StateDict) -> tuple[dict, list[int]]:
    """The backbone spec and its four stage widths, from the backbone's keys and shapes."""
    if SWIN_PATCHES in sd:
        renamed = Renamed()
        _rename_swin({k: v for k, v in sd.items() if re.match(SWIN, k)}, renamed)
        spec = swin_config_from_state_dict({k.removeprefix("backbone."): v
                                            for k, v in renamed.state_dict.items()})
        return {"name": "swin", **spec}, [spec["embed_dim"] * 2**i for i in range(4)]
    depth = {6: 50, 23: 101}.get(huggingface._resnet_blocks(sd))
    if depth is None:
        raise ValueError("unsupported ResNet backbone: only ResNet-50 and ResNet-101")
    return {"name": f"resnet{depth}"}, [256, 512, 1024, 2048]


def _rename_swin(backbone: StateDict, out: Renamed) -> None:
    """transformers' Swin -> the official names: query, key, value stacked as qkv, and the
    relative position index (transformers does not save it) computed from the window."""
    apply_rules(backbone, SWIN_RULES, out)
    merge_qkv(out, SWIN_QKV, ("query", "key", "value"), "{prefix}.qkv.{kind}")
    for key, table in list(out.state_dict.items()):
        if key.endswith(".relative_position_bias_table"):
            window = (math.isqrt(table.shape[0]) + 1) // 2
            index = key.replace("_bias_table", "_index")
            out.state_dict[index] = relative_position_index(window)
            out.derived.append((index, f"computed for window {window}"))


def _saved_names(state_dict: StateDict) -> StateDict:
    """The keys as transformers 5 saves them, with the backbone under model.backbone.model."""
    return substitute_keys(state_dict, [*huggingface.V4_TO_V5[:1], *SWIN_IN_MEMORY])


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    sd, out = _saved_names(state_dict), Renamed()
    heads, rest, swin = {}, {}, {}
    for key, tensor in sd.items():
        if SWIN_UNUSED.match(key):
            out.dropped.append((key, "Swin's final norm, unused by its backbone"))
        elif BOX_HEAD.match(key):
            heads[key] = tensor
        elif config.backbone["name"] == "swin" and re.match(SWIN, key):
            swin[key] = tensor
        else:
            rest[key] = tensor
    _rename_swin(swin, out)
    apply_rules(rest, RULES, out)
    merge_qkv(out, QKV, ("query", "key", "value"))
    _place_box_heads(heads, config, out)
    if "transformer.enc_out_bbox_embed.layers.0.weight" not in out.state_dict:
        for key, tensor in list(out.state_dict.items()):  # two_stage_bbox_embed_share
            if key.startswith("bbox_embed.0."):
                new = "transformer.enc_out_bbox_embed." + key[len("bbox_embed.0."):]
                out.state_dict[new] = tensor
                out.derived.append((new, f"tied to {key}"))
    return out


def _place_box_heads(heads: StateDict, config: DetectorConfig, out: Renamed) -> None:
    """``bbox_embed.i`` per decoder layer: its own, the decoder's copy, or (tied, saved
    once) layer 0's; the decoder's copies of saved heads must equal them."""
    for i in range(config.dec_layers):
        for prefix in (f"bbox_embed.{i}.", f"model.decoder.bbox_embed.{i}.", "bbox_embed.0.",
                       "model.decoder.bbox_embed.0."):
            found = {k: v for k, v in heads.items() if k.startswith(prefix)}
            if found:
                break
        else:
            return  # reported as missing keys
        for key, tensor in found.items():
            new = f"bbox_embed.{i}." + key[len(prefix):]
            if prefix.endswith(f".{i}."):
                out.put(key, new, tensor)
            else:
                out.state_dict[new] = tensor
                out.derived.append((new, f"tied to {key}"))
    for key in heads:
        if key.startswith("model.decoder.") and key[len("model.decoder."):] in heads:
            check_duplicate(heads, key[len("model.decoder."):], key)
            out.dropped.append((key, f"duplicate of {key[len('model.decoder.'):]}"))


def tokenizer_files(source: str | Path) -> dict[str, bytes]:
    """The prompt tokenizer's files in ``source`` (a folder) or beside it (a file), as
    GroundingDinoProcessor.save_pretrained writes them or as the hub keeps
    bert-base-uncased, keyed by their place in the detector folder; ValueError naming the
    folder when there is none."""
    from frozenseg.detector.grounding import TOKENIZER_FOLDER

    if not Path(source).exists():
        raise ValueError(f"{source}: no such folder (the tokenizer files' folder)")
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    found = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES
             if (folder / name).is_file()}
    if not ({"tokenizer.json", "vocab.txt"} & set(found)):
        raise ValueError(f"{folder}: Grounding DINO needs its tokenizer files (tokenizer.json "
                         "or vocab.txt: bert-base-uncased's for the official models, or what "
                         "GroundingDinoProcessor.save_pretrained writes) beside the weights, "
                         "or in the folder --tokenizer names")
    found["tokenizer_config.json"] = _naming_the_class(folder / "tokenizer_config.json",
                                                       found.get("tokenizer_config.json"))
    return {f"{TOKENIZER_FOLDER}/{name}": data for name, data in found.items()}


def _naming_the_class(path: Path, config: bytes | None) -> bytes:
    """tokenizer_config.json naming its tokenizer class: the hub's bert-base-uncased names
    none (transformers reads the class from the model's config.json, which the detector
    folder does not hold), and Grounding DINO's text encoder is always BERT."""
    try:
        settings = json.loads(config) if config else {}
    except ValueError:
        settings = None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not a JSON object")
    if "tokenizer_class" in settings:
        return config
    return json.dumps({**settings, "tokenizer_class": "BertTokenizer"}, indent=2).encode()


FORMAT = CheckpointFormat(
    name="huggingface_grounding_dino",
    description="Hugging Face GroundingDinoForObjectDetection (open vocabulary)",
    signature=(
        r"^model\.text_backbone\.embeddings\.word_embeddings\.weight$",
        r"^model\.encoder\.layers\.0\.fusion_layer\.attn\.vision_proj\.weight$",
        r"^model\.input_proj_vision\.0\.0\.weight$",
        r"^model\.decoder\.layers\.0\.encoder_attn_text\.query\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
