"""Official DEIMv2 checkpoints (Intellindust-AI-Lab/DEIMv2), as its solver saves them.

The solver saves ``{'date', 'last_epoch', 'model', 'criterion', 'postprocessor', 'ema':
{'module', 'updates'}, 'optimizer', 'lr_scheduler', 'lr_warmup_scheduler', 'scaler'}`` and
the released weights ``{'model'}`` or ``{'ema'}``; the loader takes the EMA copy. Both kinds
of model convert: HGNetV2 (Atto, Femto, Pico with the ``LiteEncoder``; N and the other
``HybridEncoder`` configs) and DINOv3 (S, M: the distilled ``vit_tiny`` / ``vit_tinyplus``
under ``backbone.dinov3._model.``; L, X: DINOv3 ViT-S/16 and ViT-S+/16 under
``backbone.dinov3.``, each beside the spatial tuning adapter ``backbone.sta.`` and the
fusion projections ``backbone.convs`` / ``backbone.norms``). The keys are read as
transformers' DEIMv2 names (the ViTs' stacked ``qkv`` and the decoder's fused SwiGLU
``swish_ffn.w12`` split, RMSNorm ``scale`` as ``weight``) and converted by
:mod:`frozenseg.formats.deimv2`, which both layouts share.

Where the official model computes what transformers' does not, the conversion follows the
official code: the proposals are scored on the encoder tokens as they are (no
``enc_output``); the MLP heads take the YAML's ``mlp_act`` and the quality heads its
``activation``; DINOv3's masked key bias is applied (``qkv.bias_mask``); the ViT-Tiny keeps
its key bias, has no final norm (no output is normed), no layer scales (one) and no
registers, and LayerNorms of eps 1e-6.

The settings are in the YAML config (``--config``, or config.yaml beside the weights, with
its ``__include__`` bases): ``DEIM`` names the backbone, encoder and decoder classes, whose
sections are read with the official constructors' defaults for what they leave out; the
settings frozenseg does not reproduce are refused in one line.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from frozenseg.formats import d_fine_official, deimv2
from frozenseg.formats.base import (
    StateDict,
    check_duplicate,
    read_through,
    refuse_unsupported,
    rename_key,
    substitute_keys,
)

CONV = "model.conv_encoder."
VIT = r"^backbone\.dinov3\.(?:_model\.)?"
HF_VIT = CONV + "backbone."
BLOCK = VIT + r"blocks\.(\d+)\."
HF_BLOCK = HF_VIT + r"model.layer.\1."
ELAN = r"^encoder\.((?:fpn|pan)_blocks?(?:\.\d+)?)\."
LAYER = r"^decoder\.decoder\.layers\.(\d+)\."
HF_LAYER = r"model.decoder.layers.\1."


def _hgnetv2_key(m: re.Match) -> str:
    """HGNetv2 is D-FINE's: its transformers name, under DEIMv2's conv_encoder."""
    return d_fine_official._backbone_key(m).replace("model.backbone.", CONV, 1)


# official name -> transformers' in-memory DEIMv2 name (first matching rule).
BACKBONE_RULES = [
    (r"^backbone\.((?:stem|stages)\..*)$", _hgnetv2_key),
    (VIT + r"patch_embed\.proj\.", HF_VIT + "embeddings.patch_embeddings."),
    (VIT + r"(cls_token|mask_token)$", HF_VIT + r"embeddings.\1"),
    (VIT + r"storage_tokens$", HF_VIT + "embeddings.register_tokens"),
    (BLOCK + r"attn\.proj\.", HF_BLOCK + "attention.o_proj."),
    (BLOCK + r"attn\.qkv\.", HF_BLOCK + "attention.qkv."),  # split below
    (BLOCK + r"ls([12])\.gamma$", HF_BLOCK + r"layer_scale\2.lambda1"),
    (BLOCK + r"mlp\.(fc1|w2)\.", HF_BLOCK + "mlp.up_proj."),
    (BLOCK + r"mlp\.(fc2|w3)\.", HF_BLOCK + "mlp.down_proj."),
    (BLOCK + r"mlp\.w1\.", HF_BLOCK + "mlp.gate_proj."),
    (BLOCK + r"(norm[12])\.", HF_BLOCK + r"\2."),
    (VIT + r"norm\.", HF_VIT + "norm."),
    # the adapter's Sequentials: (conv, norm, GELU, pool) and ([GELU,] conv, norm)
    (r"^backbone\.sta\.stem\.0\.", CONV + "spatial_tuning_adapter.stem_conv.conv."),
    (r"^backbone\.sta\.stem\.1\.", CONV + "spatial_tuning_adapter.stem_conv.norm."),
    (r"^backbone\.sta\.conv2\.0\.", CONV + "spatial_tuning_adapter.conv2.conv."),
    (r"^backbone\.sta\.conv2\.1\.", CONV + "spatial_tuning_adapter.conv2.norm."),
    (r"^backbone\.sta\.conv([34])\.1\.", CONV + r"spatial_tuning_adapter.conv\1.conv."),
    (r"^backbone\.sta\.conv([34])\.2\.", CONV + r"spatial_tuning_adapter.conv\1.norm."),
    (r"^backbone\.convs\.(\d+)\.", CONV + r"fusion_proj.\1.conv."),
    (r"^backbone\.norms\.(\d+)\.", CONV + r"fusion_proj.\1.norm."),
]
ENCODER_RULES = [
    (r"^encoder\.input_proj\.", CONV + "encoder_input_proj."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"model.encoder.aifi.\1.layers.\2.self_attn.o_proj."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm1\.",
     r"model.encoder.aifi.\1.layers.\2.self_attn_layer_norm."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.norm2\.",
     r"model.encoder.aifi.\1.layers.\2.final_layer_norm."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.linear([12])\.",
     lambda m: f"model.encoder.aifi.{m[1]}.layers.{m[2]}.mlp.layers.{int(m[3]) - 1}."),
    (r"^encoder\.encoder\.", "model.encoder.aifi."),
    # RepNCSPELAN4 / 5: cv2 and cv3 are (a CSP block[, its trailing 3x3]), cv4 the output
    (ELAN + r"cv1\.", r"model.encoder.\1.conv1."),
    (ELAN + r"cv([23])\.0\.", lambda m: f"model.encoder.{m[1]}.csp_rep{int(m[2]) - 1}."),
    (ELAN + r"cv([23])\.1\.", lambda m: f"model.encoder.{m[1]}.csp_rep{int(m[2]) - 1}.conv2."),
    (ELAN + r"cv4\.", r"model.encoder.\1.conv2."),
    (r"^encoder\.downsample_convs\.(\d+)\.0\.cv([12])\.",
     r"model.encoder.downsample_convs.\1.conv\2."),
    # the lite encoder: (pool, conv, norm, act) downsamplings and the GAP fusion's conv
    (r"^encoder\.down_sample([12])\.1\.", r"model.encoder.down_conv\1.conv."),
    (r"^encoder\.down_sample([12])\.2\.", r"model.encoder.down_conv\1.norm."),
    (r"^encoder\.bi_fusion\.cv\.", "model.encoder.bi_fusion_conv."),
    (r"^encoder\.", "model.encoder."),
]
LITE_RULES = [(r"^encoder\.input_proj\.", "model.encoder.input_proj."), *ENCODER_RULES]
DECODER_RULES = [
    (r"^decoder\.input_proj\.", "model.decoder_input_proj."),
    (LAYER + r"self_attn\.out_proj\.", HF_LAYER + "self_attn.o_proj."),
    (LAYER + r"norm1\.scale$", HF_LAYER + "self_attn_layer_norm.weight"),
    (LAYER + r"norm2\.scale$", HF_LAYER + "encoder_attn_layer_norm.weight"),
    (LAYER + r"norm3\.scale$", HF_LAYER + "final_layer_norm.weight"),
    (LAYER + r"gateway\.norm\.scale$", HF_LAYER + "gateway.norm.weight"),
    (LAYER + r"cross_attn\.", HF_LAYER + "encoder_attn."),
    (LAYER + r"swish_ffn\.w12\.", HF_LAYER + "mlp.gate_up."),  # split below
    (LAYER + r"swish_ffn\.w3\.", HF_LAYER + "mlp.down_proj."),
    (r"^decoder\.decoder\.", "model.decoder."),
    (r"^decoder\.(up|reg_scale)$", r"model.decoder.\1"),
    (r"^decoder\.(query_pos_head|pre_bbox_head)\.", r"model.decoder.\1."),
    (r"^decoder\.dec_score_head\.", "model.decoder.class_embed."),
    (r"^decoder\.dec_bbox_head\.", "model.decoder.bbox_embed."),
    (r"^decoder\.(enc_score_head|enc_bbox_head|denoising_class_embed)\.", r"model.\1."),
    (r"^decoder\.tgt_embed\.", "model.weight_embedding."),
]
# Stacked projections, split into transformers' (names, chunks).
STACKED = [(re.compile(r"^(.*\.self_attn)\.in_proj_(weight|bias)$"), ("q_proj", "k_proj",
                                                                       "v_proj")),
           (re.compile(r"^(.*\.attention)\.qkv\.(weight|bias)$"), ("q_proj", "k_proj", "v_proj")),
           (re.compile(r"^(.*\.mlp)\.gate_up\.(weight|bias)$"), ("gate_proj", "up_proj"))]
BIAS_MASK = re.compile(VIT + r"blocks\.\d+\.attn\.qkv\.bias_mask$")
PERIODS = re.compile(VIT + r"rope_embed\.periods$")
LITE = "encoder.bi_fusion.cv.conv.weight"
TINY = "backbone.dinov3._model."


def to_transformers(state_dict: StateDict):
    """(transformers' keys, each one's official source, the official keys dropped with why,
    the keys made for what the official model does not save)."""
    rules = BACKBONE_RULES + (LITE_RULES if LITE in state_dict else ENCODER_RULES) + (
        DECODER_RULES)
    out: StateDict = {}
    source: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    for key, tensor in state_dict.items():
        if why := _dropped_why(state_dict, key):
            dropped.append((key, why))
            continue
        new = rename_key(key, rules) or key
        if new.endswith("embeddings.mask_token"):  # DINOv3's (1, dim); transformers' (1, 1, dim)
            tensor = tensor.reshape(1, 1, -1)
        for part, chunk in _split(new, _masked(state_dict, key, tensor)):
            if part in out:
                raise ValueError(f"{key} and {source[part]} are both read as {part}: not "
                                 "DEIMv2's layout (D-FINE's CSP blocks, csp_type: csp?)")
            out[part], source[part] = chunk, key
    made = _tiny_vit_parts(state_dict, out)
    # The shared converter reads DEIMv2's names in D-FINE's spelling and records them so.
    return (out, {**source, **substitute_keys(source, deimv2.TO_D_FINE)}, dropped,
            {**made, **substitute_keys(made, deimv2.TO_D_FINE)})


def _dropped_why(sd: StateDict, key: str) -> str | None:
    if d_fine_official.ANCHORS.match(key):
        return "anchors of eval_spatial_size (made for every size)"
    if m := d_fine_official.SECOND_CONSTANT.match(key):
        check_duplicate(sd, key, f"decoder.{m[1]}")
        return f"duplicate of decoder.{m[1]}"
    if BIAS_MASK.match(key):
        return "applied: the qkv bias times its mask (DINOv3 masks the key bias)"
    if PERIODS.match(key):
        return "read: the RoPE periods of base 100, checked against the YAML's heads"
    return None


def _masked(sd: StateDict, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """DINOv3's qkv bias as the official model adds it: times its saved mask."""
    mask = sd.get(key + "_mask") if key.endswith("qkv.bias") else None
    if mask is None:
        return tensor
    if mask.isnan().any():
        raise ValueError(f"{key}_mask is NaN (never loaded): the official model's outputs "
                         "are NaN")
    return tensor * mask.to(tensor.dtype)


def _split(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    for pattern, names in STACKED:
        if m := pattern.match(key):
            return [(f"{m[1]}.{name}.{m[2]}", chunk)
                    for name, chunk in zip(names, tensor.chunk(len(names)), strict=True)]
    return [(key, tensor)]


def _tiny_vit_parts(sd: StateDict, out: StateDict) -> dict[str, str]:
    """The distilled ViT-Tiny (S, M) has no registers and no layer scales: an empty
    register table and scales of one, in ``out``; {key: how}."""
    if not any(k.startswith(TINY) for k in sd):
        return {}
    dim = out[HF_VIT + "embeddings.cls_token"].shape[-1]
    made = {HF_VIT + "embeddings.register_tokens": torch.zeros(1, 0, dim)}
    for block in {m[1] for k in sd if (m := re.match(BLOCK, k))}:
        for i in (1, 2):
            made[f"{HF_VIT}model.layer.{block}.layer_scale{i}.lambda1"] = torch.ones(dim)
    out.update(made)
    return {key: ("the ViT-Tiny has no register tokens: none" if "register" in key
                  else "the ViT-Tiny's blocks have no layer scale: one") for key in made}


# YAML settings that change the computation without changing a key or a shape.
ACTIVATIONS = ("relu", "silu")
SUPPORTED = {
    "DEIM": {"backbone": ("HGNetv2", "DINOv3STAs"), "encoder": ("HybridEncoder", "LiteEncoder"),
             "decoder": ("DEIMTransformer",)},
    "HybridEncoder": {"enc_act": ("gelu",), "act": ("silu",), "version": ("dfine", "deim"),
                      "fuse_op": ("sum",)},
    "LiteEncoder": {"act": ("silu",), "csp_type": ("csp2",)},
    "DEIMTransformer": {"activation": ACTIVATIONS, "mlp_act": ACTIVATIONS,
                        "cross_attn_method": ("default",), "query_select_method": ("default",)},
    "HGNetv2": {"act": ("relu",)},
    "DINOv3STAs": {"use_sta": (True,), "patch_size": (16,),
                   "name": ("vit_tiny", "vit_tinyplus", "dinov3_vits16", "dinov3_vits16plus")},
}
# The official constructors' defaults, for what a YAML leaves out.
DEFAULT_PARTS = {"backbone": "HGNetv2", "encoder": "HybridEncoder", "decoder": "DEIMTransformer"}
# DinoVisionTransformer's fixed configs (the ViT-Tiny's heads are the YAML's num_heads).
DINOV3_HEADS = 6


def _parts(args: dict) -> dict[str, str]:
    """The backbone, encoder and decoder classes the YAML's ``DEIM`` section names."""
    if args.get("model", "DEIM") != "DEIM":
        raise ValueError(f"the YAML's model is {args['model']!r}: official DEIMv2 configs "
                         "build model: DEIM")
    named = args.get("DEIM") or {}
    refuse_unsupported("DEIMv2", [(SUPPORTED["DEIM"], named, "DEIM")])
    return {part: named.get(part, default) for part, default in DEFAULT_PARTS.items()}


def _sections(args: dict) -> tuple[dict[str, str], dict[str, dict]]:
    """(the classes, each class's YAML section), the unsupported settings refused."""
    parts = _parts(args)
    sections = {kind: args.get(name) or {} for kind, name in parts.items()}
    refuse_unsupported("DEIMv2", [(SUPPORTED[name], sections[kind], name)
                                  for kind, name in parts.items() if name in SUPPORTED])
    return parts, sections


def transformers_args(args: dict) -> dict:
    """The YAML's settings under the names of transformers' DEIMv2 config.json, which
    :func:`deimv2.derive_config` reads."""
    parts, sections = _sections(args)
    encoder, decoder = sections["encoder"], sections["decoder"]
    lite = parts["encoder"] == "LiteEncoder"
    out = {"num_feature_levels": decoder.get("num_levels", 3),
           "decoder_n_points": decoder.get("num_points", 4),
           "num_queries": decoder.get("num_queries", 300), "eval_idx": decoder.get("eval_idx", -1),
           "decoder_attention_heads": decoder.get("nhead", 8),
           "encoder_attention_heads": decoder.get("nhead", 8) if lite else encoder.get("nhead", 8),
           "encoder_layers": 0 if lite else encoder.get("num_encoder_layers", 1),
           "encode_proj_layers": [] if lite else encoder.get("use_encoder_idx", [2]),
           "positional_encoding_temperature": encoder.get("pe_temperature", 10000)}
    if parts["backbone"] == "DINOv3STAs":
        out["backbone_config"] = _vit_settings(sections["backbone"])
    else:
        out["backbone_config"] = {"model_type": "hgnet_v2"}
    return out


def _vit_settings(sta: dict) -> dict:
    """transformers' DINOv3ViTConfig settings of the ViT the YAML's DINOv3STAs builds."""
    name = sta.get("name")
    if name is None:
        raise ValueError("the YAML's DINOv3STAs has no name: the official code needs one")
    dinov3 = name.startswith("dinov3")
    return {"model_type": "dinov3_vit", "rope_theta": 100.0,
            "num_attention_heads": DINOV3_HEADS if dinov3 else sta.get("num_heads", 3),
            "out_indices": [i + 1 for i in sta.get("interaction_indexes", [])],
            # DINOv3 norms every output (get_intermediate_layers); the ViT-Tiny has no norm
            "apply_layernorm": dinov3, "layer_norm_eps": 1e-5 if dinov3 else 1e-6,
            "hidden_act": "silu" if name == "dinov3_vits16plus" else "gelu"}


def official_fields(args: dict) -> dict:
    """What the official code computes and transformers' DEIMv2 does not: DEIMTransformer's
    MLP heads (query_pos, proposal box, first-layer box, distribution) take ``mlp_act`` and
    its quality heads ``activation`` (its FFN is a SwiGLU); every decoder layer reads the
    query_pos of the first references; AIFI's sine positions are laid out on the transposed
    grid (transformers 5: row-major; the same on square grids)."""
    decoder = _sections(args)[1]["decoder"]
    return {"mlp_activation": decoder.get("mlp_act", "relu"),
            "lqe_activation": decoder.get("activation", "relu"), "fdr_query_pos_once": True,
            "aifi_transposed_grid": True}


def _check_against_weights(state_dict: StateDict, args: dict) -> None:
    """The YAML's classes and ViT heads must be the ones the weights were saved from."""
    parts, sections = _sections(args)
    kinds = {"encoder": ("LiteEncoder" if LITE in state_dict else "HybridEncoder"),
             "backbone": ("DINOv3STAs" if any(k.startswith("backbone.dinov3.")
                                              for k in state_dict) else "HGNetv2")}
    for kind, held in kinds.items():
        if parts[kind] != held:
            raise ValueError(f"the YAML's DEIM.{kind} is {parts[kind]}, but the weights hold "
                             f"a {held}: the config and the weights are of different models")
    periods = next((t for k, t in state_dict.items() if PERIODS.match(k)), None)
    if periods is not None:
        _check_rope(periods, _vit_settings(sections["backbone"]),
                    state_dict[next(k for k in state_dict if k.endswith("cls_token"))])


def _check_rope(periods: torch.Tensor, vit: dict, cls_token: torch.Tensor) -> None:
    """The saved RoPE periods, base ** (4k / head_dim) for k < head_dim / 4, give the head
    width: the YAML's heads must give the same, and the base must be the code's 100."""
    head_dim, dim = 4 * len(periods), cls_token.shape[-1]
    expected = vit["rope_theta"] ** (torch.arange(len(periods), dtype=torch.float64)
                                     * 4 / head_dim)
    if dim != vit["num_attention_heads"] * head_dim:
        raise ValueError(f"the YAML's ViT has {vit['num_attention_heads']} heads, but its "
                         f"saved RoPE periods are of {head_dim}-wide heads of a {dim}-wide ViT")
    if not torch.allclose(periods.double(), expected, rtol=1e-4):
        raise ValueError("the ViT's saved RoPE periods are not of base 100, the official "
                         "code's: not supported")


THROUGH = read_through(
    deimv2.FORMAT,
    name="deimv2",
    description="official DEIMv2 (Intellindust-AI-Lab/DEIMv2 layout: HGNetV2 and DINOv3)",
    signature=(
        r"^decoder\.decoder\.layers\.0\.swish_ffn\.w12\.weight$",
        r"^decoder\.decoder\.lqe_layers\.0\.reg_conf\.layers\.0\.weight$",
        r"^decoder\.dec_bbox_head\.0\.layers\.0\.weight$",
        r"^decoder\.enc_score_head\.weight$",
        r"^encoder\.",
    ),
    translate=to_transformers,
    settings=lambda args: (transformers_args(args), []),
    config_name="YAML",
    fields=official_fields,
)


def derive_config(state_dict: StateDict, args: dict):
    _check_against_weights(state_dict, args)
    return THROUGH.derive_config(state_dict, args)


FORMAT = dataclasses.replace(THROUGH, derive_config=derive_config)
