"""Official DINO checkpoints (IDEA-Research/DINO), and FocalNet-DINO, which shares the layout.

The model is saved as ``ckpt['model']`` with the training ``args`` beside it. Key names
below ``transformer.``, ``input_proj.``, ``class_embed.i``, ``bbox_embed.i`` and
``label_enc`` are already canonical. The backbone is ``backbone.0.body.<torchvision
ResNet>`` or ``backbone.0.<Swin / FocalNet>``; the decoder holds a second reference to
the per-layer heads (``transformer.decoder.{class,bbox}_embed.i``), saved as duplicates.
"""

from __future__ import annotations

import argparse
import re

import torch

from frozenseg.detector.backbones.focalnet import focalnet_config_from_state_dict
from frozenseg.detector.backbones.swin import swin_config_from_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.files import atomic_path
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    apply_rules,
    backbone_levels,
    check_duplicate,
    count_indexed,
    positive,
    sampling_points,
    saved_or_assumed,
)

RULES = [(r"^backbone\.0\.(body\.)?", "backbone.")]
DUPLICATE_HEADS = re.compile(r"^transformer\.decoder\.((class|bbox)_embed\.\d+\..*)$")

# Training arguments that change the inference computation without changing any key or
# shape: frozenseg reproduces only these values (absent arguments take them).
SUPPORTED_ARGS = {
    "two_stage_type": ("standard",),
    "decoder_sa_type": ("sa",),
    "decoder_module_seq": (["sa", "ca", "ffn"],),
    "transformer_activation": ("relu",),
    "position_embedding": ("sine", "v2"),
    "dilation": (False,),
    "dec_layer_number": (None,),
    "two_stage_learn_wh": (False,),
    "two_stage_pat_embed": (0,),
    "two_stage_add_query_num": (0,),
    "use_deformable_box_attn": (False,),
    "add_channel_attention": (False,),
}


def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
    """Widths, depths, levels, queries, classes from shapes; heads and the rest from args."""
    _check_args(args)
    notes: list[str] = []
    c = state_dict["transformer.level_embed"].shape[1]
    heads = positive("nheads", saved_or_assumed(args, "nheads", c // 32, notes,
                                          "attention heads (head dim 32)"))
    backbone, channels = _backbone(state_dict)
    stages, levels = backbone_levels(state_dict, "input_proj.", channels)
    config = DetectorConfig(
        variant="dino", backbone=backbone, hidden_dim=c, backbone_levels=stages,
        num_feature_levels=levels, nheads=heads,
        enc_layers=count_indexed(state_dict, "transformer.encoder.layers."),
        dec_layers=count_indexed(state_dict, "transformer.decoder.layers."),
        dim_feedforward=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        **sampling_points(state_dict, heads, levels),
        num_queries=state_dict["transformer.tgt_embed.weight"].shape[0],
        num_classes=state_dict["class_embed.0.weight"].shape[0],
        # Fixed in DINO's code: two-stage top-k by best class, learned content queries,
        # query_pos from the box sine embedding, normed decoder outputs, eps 1e-3, offset 0.
        query_init="mixed", box_refine=True, proposal_score="max_class", decoder_norm=True,
        ref_point_head=True, pos_offset=0.0, inverse_sigmoid_eps=1e-3,
        pos_temperature=_temperature(args, notes),
        num_select=positive("num_select", saved_or_assumed(args, "num_select", 300, notes,
                                                     "post-processing top-k")),
        dn_labelbook_size=state_dict["label_enc.weight"].shape[0] - 1,
    )
    return config, notes


def _check_args(args: dict) -> None:
    for name, accepted in SUPPORTED_ARGS.items():
        if name in args and args[name] not in accepted:
            raise ValueError(f"DINO trained with {name}={args[name]!r} is not supported "
                             f"(supported: {', '.join(map(repr, accepted))})")


def _temperature(args: dict, notes: list[str]) -> float:
    """The feature-map sine temperature; DINO has one per axis, frozenseg one for both."""
    h = saved_or_assumed(args, "pe_temperatureH", 20, notes, "position temperature")
    h = positive("pe_temperatureH", h, float)
    w = positive("pe_temperatureW", args.get("pe_temperatureW", h), float)
    if h != w:
        raise ValueError(f"different position temperatures for H ({h}) and W ({w})")
    return float(h)


def _backbone(state_dict: StateDict) -> tuple[dict, list[int]]:
    """The backbone spec for :func:`build_backbone`, and its four stage widths."""
    if "backbone.0.body.conv1.weight" in state_dict:
        blocks = count_indexed(state_dict, "backbone.0.body.layer3.")
        depth = {6: 50, 23: 101}.get(blocks)
        if depth is None:
            raise ValueError(f"unsupported ResNet with {blocks} blocks in layer3")
        return {"name": f"resnet{depth}"}, [256, 512, 1024, 2048]
    inner = {k[len("backbone.0."):]: v for k, v in state_dict.items()
             if k.startswith("backbone.0.")}
    if any(".modulation." in k for k in inner):
        spec = {"name": "focalnet", **focalnet_config_from_state_dict(inner)}
    elif any(".attn.relative_position_bias_table" in k for k in inner):
        spec = {"name": "swin", **swin_config_from_state_dict(inner)}
    else:
        raise ValueError("unknown DINO backbone: neither ResNet, Swin nor FocalNet keys")
    return spec, [spec["embed_dim"] * 2**i for i in range(4)]


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    """Strip the backbone prefix; drop the decoder's copies of the heads once checked."""
    out, rest = Renamed(), {}
    for key, tensor in state_dict.items():
        m = DUPLICATE_HEADS.match(key)
        if m and m[1] in state_dict:
            check_duplicate(state_dict, key, m[1])
            out.dropped.append((key, f"duplicate of {m[1]}"))
        elif m:  # only the decoder's copy was saved: it is the head
            out.put(key, m[1], tensor)
        else:
            rest[key] = tensor
    apply_rules(rest, RULES, out)
    return out


def official_state_dict(state_dict: StateDict, config: DetectorConfig) -> StateDict:
    """Canonical keys -> DINO's (the inverse of :func:`rename`): the backbone under
    ``backbone.0.`` (+ ``body.`` for a ResNet), and the decoder's second reference to every
    per-layer head, as DINO's own checkpoints hold them."""
    prefix = "backbone.0.body." if config.backbone["name"].startswith("resnet") else "backbone.0."
    out = {}
    for key, tensor in state_dict.items():
        out[key.replace("backbone.", prefix, 1) if key.startswith("backbone.") else key] = tensor
        if key.startswith(("class_embed.", "bbox_embed.")):
            out[f"transformer.decoder.{key}"] = tensor.clone()
    return out


def official_args(config: DetectorConfig) -> dict:
    """The training arguments DINO's main.py saves that :func:`derive_config` reads (the
    rest comes from the weights' shapes)."""
    return {"nheads": config.nheads, "num_select": config.num_select,
            "num_queries": config.num_queries, "num_classes": config.num_classes,
            "pe_temperatureH": int(config.pos_temperature),
            "pe_temperatureW": int(config.pos_temperature), "two_stage_type": "standard"}


def save_official(state_dict: StateDict, config: DetectorConfig, path) -> None:
    """A DINO-layout checkpoint as DINO's main.py writes it: {'model', 'args' (a
    Namespace)}; only an exactly DINO model (variant dino, mixed queries) qualifies."""
    if config.variant != "dino" or config.query_init != "mixed":
        raise ValueError(f"only a DINO detector (variant dino, mixed queries) has "
                         f"DINO's layout, not {config.variant} with {config.query_init} queries")
    with atomic_path(path) as tmp:
        torch.save({"model": official_state_dict(state_dict, config),
                    "args": argparse.Namespace(**official_args(config))}, tmp)


FORMAT = CheckpointFormat(
    name="dino",
    description="official DINO / FocalNet-DINO (IDEA-Research/DINO layout)",
    signature=(
        r"^backbone\.0\.",
        r"^transformer\.level_embed$",
        r"^transformer\.tgt_embed\.weight$",
        r"^transformer\.decoder\.ref_point_head\.layers\.0\.weight$",
        r"^transformer\.enc_out_class_embed\.weight$",
        r"^label_enc\.weight$",
        r"^class_embed\.0\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
