"""Official DETR (facebookresearch/detr), Conditional DETR (Atten4Vis/ConditionalDETR) and
DAB-DETR (IDEA-Research/DAB-DETR) checkpoints: ``main.py``'s ``{model, optimizer,
lr_scheduler, epoch, args}``, or a released ``{model}``.

The backbone is torchvision's ResNet under ``backbone.0.body.``; the encoder (and DETR's
decoder) use ``nn.MultiheadAttention``, whose stacked ``in_proj`` is split here into the
plain model's q, k and v projections; DETR calls its cross-attention ``multihead_attn``.
Conditional DETR's and DAB-DETR's decoders already have the plain model's names
(``sa_qcontent_proj`` ..., ``self_attn.out_proj``, ``cross_attn.out_proj``, ``query_scale``,
``ref_point_head``, DAB's ``ref_anchor_head``, ``refpoint_embed``, PReLU ``activation``);
DAB-DETR's refinement head ``transformer.decoder.bbox_embed`` is its ``bbox_embed``, saved
twice. DETR's class head has num_classes + 1 outputs (the last: "no object"), the others
num_classes (sigmoid). Settings from ``args``: heads and DAB's temperatures (the rest is in
the shapes); learned positions, DC5, the pre-norm transformer, the segmentation model and
DAB-DETR's non-default variants (other query scales, no width/height modulation, a box head
per layer, no iterative update, no decoder self-attention) are refused.
"""

from __future__ import annotations

import re

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    apply_rules,
    check_duplicate,
    count_indexed,
    positive,
    put_split_in_proj,
    saved_or_assumed,
)
from frozenseg.formats.huggingface_detr import FIXED

RULES = [
    (r"^backbone\.0\.body\.", "backbone."),
    (r"^transformer\.patterns\.", "patterns."),
    (r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.",
     r"transformer.decoder.layers.\1.cross_attn."),
]
SUPPORTED = {"position_embedding": ("sine", "v2"), "dilation": (False,), "pre_norm": (False,),
             "masks": (False,), "query_scale_type": ("cond_elewise",),
             "modulate_hw_attn": (True,), "bbox_embed_diff_each_layer": (False,),
             "iter_update": (True,), "rm_self_attn_decoder": (False,), "query_dim": (4,)}
NAMES = {"detr": "DETR", "conditional_detr": "Conditional DETR", "dab_detr": "DAB-DETR"}


def derive_config_for(variant: str):
    name = NAMES[variant]

    def derive_config(state_dict: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
        """Width, depths, queries, classes from shapes; attention heads from args."""
        for setting, accepted in SUPPORTED.items():
            if setting in args and args[setting] not in accepted:
                raise ValueError(f"{name} trained with {setting}={args[setting]!r} is not "
                                 f"supported (supported: {', '.join(map(repr, accepted))})")
        if "transformer.encoder.norm.weight" in state_dict:
            raise ValueError(f"transformer.encoder.norm is saved: {name}'s pre-norm "
                             "transformer (pre_norm=True) is not supported")
        heights, widths = args.get("pe_temperatureH", 20), args.get("pe_temperatureW", 20)
        if variant == "dab_detr" and heights != widths:
            raise ValueError(f"DAB-DETR trained with pe_temperatureH={heights!r} and "
                             f"pe_temperatureW={widths!r} is not supported (only equal ones)")
        return _shapes(state_dict, args, variant)

    return derive_config


def _shapes(state_dict: StateDict, args: dict, variant: str
            ) -> tuple[DetectorConfig, list[str]]:
    """Width, depths, queries, classes from the shapes; attention heads from args."""
    notes: list[str] = []
    c, channels = state_dict["input_proj.weight"].shape[:2]
    depth = {6: 50, 23: 101}.get(count_indexed(state_dict, "backbone.0.body.layer3."))
    if depth is None or channels != 2048:
        raise ValueError("the backbone is not a ResNet-50 or ResNet-101 (2048 channels at "
                         "stride 32): not supported")
    heads = positive("nheads", saved_or_assumed(args, "nheads", 8, notes, "attention heads"))
    encoder_ffn = state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0]
    decoder_ffn = state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0]
    dec_layers = count_indexed(state_dict, "transformer.decoder.layers.")
    settings = {}
    if variant == "dab_detr":
        settings = {
            "pos_temperature": positive("pe_temperatureH", args.get("pe_temperatureH", 20),
                                        float),
            "keep_query_pos": dec_layers > 1 and (
                "transformer.decoder.layers.1.ca_qpos_proj.weight" in state_dict),
            "num_patterns": len(state_dict.get("transformer.patterns.weight", ())),
            "activation": ("prelu" if "transformer.encoder.layers.0.activation.weight"
                           in state_dict else "relu")}
    queries = state_dict["refpoint_embed.weight" if variant == "dab_detr"
                         else "query_embed.weight"].shape[0]
    config = DetectorConfig(
        **{**FIXED[variant], **settings}, backbone={"name": f"resnet{depth}"}, hidden_dim=c,
        nheads=heads,
        enc_layers=count_indexed(state_dict, "transformer.encoder.layers."),
        dec_layers=dec_layers, dim_feedforward=decoder_ffn,
        encoder_ffn_dim=None if encoder_ffn == decoder_ffn else encoder_ffn,
        num_queries=queries,
        num_classes=state_dict["class_embed.weight"].shape[0] - int(variant == "detr"),
    )
    return config, notes


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    out, rest = Renamed(), {}
    for key, tensor in state_dict.items():
        if put_split_in_proj(out, key, tensor, _renamed):
            continue
        if key.endswith("num_batches_tracked"):
            out.dropped.append((key, "batch norm counter (frozen batch norm keeps none)"))
        elif key.startswith("transformer.decoder.bbox_embed."):  # DAB-DETR's, the same module
            original = key[len("transformer.decoder."):]
            if original in state_dict:
                check_duplicate(state_dict, key, original)
                out.dropped.append((key, f"duplicate of {original}"))
            else:  # a file that kept only the decoder's name for it
                rest[original] = tensor
        else:
            rest[key] = tensor
    apply_rules(rest, RULES, out)
    return out


def _renamed(key: str) -> str:
    for pattern, replacement in RULES:
        key = re.sub(pattern, replacement, key)
    return key


FORMAT = CheckpointFormat(
    name="detr",
    description="official DETR (facebookresearch/detr)",
    signature=(
        r"^backbone\.0\.body\.conv1\.weight$",
        r"^input_proj\.weight$",
        r"^query_embed\.weight$",
        r"^transformer\.decoder\.layers\.0\.multihead_attn\.in_proj_weight$",
    ),
    derive_config=derive_config_for("detr"),
    rename=rename,
)
CONDITIONAL_FORMAT = CheckpointFormat(
    name="conditional_detr",
    description="official Conditional DETR (Atten4Vis/ConditionalDETR)",
    signature=(
        r"^backbone\.0\.body\.conv1\.weight$",
        r"^input_proj\.weight$",
        r"^query_embed\.weight$",
        r"^transformer\.decoder\.layers\.0\.ca_qpos_sine_proj\.weight$",
        r"^transformer\.decoder\.ref_point_head\.layers\.0\.weight$",
    ),
    derive_config=derive_config_for("conditional_detr"),
    rename=rename,
)
DAB_FORMAT = CheckpointFormat(
    name="dab_detr",
    description="official DAB-DETR (IDEA-Research/DAB-DETR)",
    signature=(
        r"^backbone\.0\.body\.conv1\.weight$",
        r"^input_proj\.weight$",
        r"^refpoint_embed\.weight$",
        r"^transformer\.decoder\.ref_anchor_head\.layers\.0\.weight$",
    ),
    derive_config=derive_config_for("dab_detr"),
    rename=rename,
)
