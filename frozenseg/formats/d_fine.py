"""Hugging Face ``DFineForObjectDetection`` folders: D-FINE, and DEIM (D-FINE's architecture).

What differs from RT-DETR (:mod:`frozenseg.formats.rt_detr`, whose helpers this reuses):
an HGNetV2 backbone (transformers' ``HGNetV2Backbone`` names mapped onto D-FINE's), the
hybrid encoder's RepNCSPELAN4 / SCDown fusion, the decoder's maps taken as they are when
the widths agree, and the FDR decoder (gated layers, distribution box heads, the
first-layer ``pre_bbox_head``, LQE quality heads). The FDR constants ``reg_scale`` and
``up`` are saved as tensors and read into the config. transformers 5's in-memory names
(``encoder.aifi``, ``o_proj``, ``mlp.layers.k``) are read as well as the saved ones.
Per-level point counts (the released ``decoder_n_points`` [3, 6, 3]) are read from the
saved ``num_points_scale`` and the cross-attention's heads x sum(points) rows scattered
into the attention's padded layout; the FFN's activation (ReLU or SiLU) is
``decoder_activation_function``. Settings frozenseg does not reproduce (layers after
``eval_idx``, the "discrete" sampling, other activations) are refused in one line.
"""

from __future__ import annotations

import re

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats import rt_detr
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    apply_rules,
    backbone_levels,
    check_duplicate,
    count_indexed,
    merge_qkv,
    pad_decoder_points,
    refuse_unsupported,
    substitute_keys,
)

IN_MEMORY = [
    (r"^model\.encoder\.aifi\.", "model.encoder.encoder."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.layers\.(\d+)\.mlp\.layers\.0\.", r".layers.\1.fc1."),
    (r"\.layers\.(\d+)\.mlp\.layers\.1\.", r".layers.\1.fc2."),
]
BACKBONE = "model.backbone.model."
NUM_POINTS_SCALE = re.compile(r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.num_points_scale$")
CONSTANTS = {"model.decoder.reg_scale": "fdr_reg_scale", "model.decoder.up": "fdr_up"}


def _backbone_key(m: re.Match) -> str:
    key = m[1].replace("embedder.", "stem.", 1).replace("encoder.stages.", "stages.", 1)
    return "backbone." + key.replace("convolution.", "conv.").replace("normalization.", "bn.")


RULES = [
    (r"^model\.backbone\.model\.(.*)$", _backbone_key),
    *[rule for rule in rt_detr.RULES if "backbone" not in rule[0]],
]

FIXED = {**rt_detr.FIXED, "variant": "d_fine", "hybrid_fusion": "elan", "decoder": "fdr"}

SUPPORTED = {**rt_detr.SUPPORTED, "decoder_activation_function": ("relu", "silu")}
BACKBONE_SUPPORTED = {
    "hidden_act": ("relu",),
    "stem_strides": ([2, 1, 1, 2, 1], (2, 1, 1, 2, 1)),
    "stage_downsample_strides": ([2, 2, 2, 2], (2, 2, 2, 2)),
}


def derive_config(state_dict: StateDict, args: dict, **fields
                  ) -> tuple[DetectorConfig, list[str]]:
    """What RT-DETR's converter derives (:func:`rt_detr.hybrid_fields`), with the HGNetV2
    backbone, the ELAN blocks' depth and width, the FFN's activation, and the FDR bins,
    constants and quality heads from shapes and the saved tensors. ``fields``: what the
    caller knows beyond transformers' config (the official YAML's head activations)."""
    refuse_unsupported("D-FINE", [(SUPPORTED, args, "config"), (
        BACKBONE_SUPPORTED, args.get("backbone_config") or {}, "backbone config")])
    sd = substitute_keys(state_dict, IN_MEMORY)
    encoder_dim = sd["model.encoder_input_proj.0.0.weight"].shape[0]
    return fdr_config(sd, args, "D-FINE", FIXED, "fc1", csp_expansion=sd[
        "model.encoder.fpn_blocks.0.csp_rep1.conv1.conv.weight"].shape[0] / encoder_dim,
        activation=args.get("decoder_activation_function", "relu"), **fields)


def fdr_config(sd: StateDict, args: dict, family: str, fixed: dict, ffn: str, *,
               backbone: tuple[dict, list[int]] | None = None, extra_levels: int = 0,
               **fields) -> tuple[DetectorConfig, list[str]]:
    """The config of a D-FINE-architecture model (transformers' D-FINE names): ``fixed`` and
    ``fields`` (what the family derives itself) over what they share; ``ffn``: the decoder
    FFN's first projection (its width is dim_feedforward); ``backbone``: the backbone spec
    and its four widths where it is not the HGNetV2 under ``model.backbone.model.``;
    ``extra_levels``: the encoder's maps beyond one per input (DEIMv2's lite encoder: 1)."""
    notes: list[str] = []
    encoder_dim = sd["model.encoder_input_proj.0.0.weight"].shape[0]
    backbone, widths = backbone or _backbone(sd)
    stages, levels = backbone_levels(sd, "model.encoder_input_proj.", widths)
    levels += extra_levels
    projections = "model.decoder_input_proj.0.0.weight" in sd
    feature_levels = args.get("num_feature_levels", levels)
    if projections and count_indexed(sd, "model.decoder_input_proj.") != levels or (
            feature_levels != levels):
        raise ValueError(f"num_feature_levels={feature_levels} from {levels} encoder maps: only "
                         "as many decoder levels as encoder maps are supported")
    if not projections and encoder_dim != sd["model.enc_score_head.weight"].shape[1]:
        raise ValueError(f"no decoder input projections, but the encoder is {encoder_dim} "
                         "wide and the decoder is not")
    layers = count_indexed(sd, "model.decoder.layers.")
    eval_idx = args.get("eval_idx", -1)
    if layers != count_indexed(sd, "model.decoder.class_embed.") or eval_idx not in (
            -1, layers - 1):
        raise ValueError(f"eval_idx={eval_idx} with {layers} decoder layers is not supported "
                         "(only the last layer's output)")
    if "model.denoising_class_embed.weight" not in sd:
        raise ValueError(f"{family} without a denoising label embedding (num_denoising=0) is "
                         "not supported: embedding given boxes needs it")
    quality = sd["model.decoder.lqe_layers.0.reg_conf.layers.0.weight"]
    shared = rt_detr.hybrid_fields(sd, args, levels, notes, NUM_POINTS_SCALE, ffn)
    config = DetectorConfig(
        **{**fixed, **shared}, backbone=backbone, backbone_levels=stages,
        csp_blocks=count_indexed(sd, "model.encoder.fpn_blocks.0.csp_rep1.bottlenecks."),
        hybrid_projections=projections,
        fdr_bins=sd["model.decoder.bbox_embed.0.layers.2.weight"].shape[0] // 4 - 1,
        **{field: float(sd[key].reshape(-1)[0]) for key, field in CONSTANTS.items()},
        lqe_top_k=quality.shape[1] // 4 - 1, lqe_hidden_dim=quality.shape[0],
        lqe_layers=count_indexed(sd, "model.decoder.lqe_layers.0.reg_conf.layers."), **fields,
    )
    return config, notes


def _backbone(sd: StateDict) -> tuple[dict, list[int]]:
    """The HGNetV2 spec and its four stage widths, from the backbone's shapes."""
    stem = BACKBONE + "embedder.stem"
    prefix = BACKBONE + "encoder.stages."
    stages = count_indexed(sd, prefix)
    if f"{stem}4.convolution.weight" not in sd or stages not in (3, 4):
        raise ValueError("the backbone is not transformers' HGNetV2Backbone (a five-convolution "
                         "stem and four stages, or three): not supported")
    spec: dict = {"name": "hgnetv2", "stem": (sd[f"{stem}1.convolution.weight"].shape[0],
                                              sd[f"{stem}4.convolution.weight"].shape[0]),
                  "lab": f"{stem}1.lab.scale" in sd}
    fields = {k: [] for k in ("in_channels", "mid_channels", "out_channels", "blocks", "layers",
                              "kernels", "light", "downsample")}
    for i in range(stages):
        block = f"{prefix}{i}.blocks.0."
        light = f"{block}layers.0.conv1.convolution.weight" in sd
        first = sd[f"{block}layers.0.{'conv2.' if light else ''}convolution.weight"]
        entry = sd[f"{block}layers.0.{'conv1.' if light else ''}convolution.weight"]
        values = {"in_channels": entry.shape[1], "mid_channels": first.shape[0],
                  "out_channels": sd[f"{block}aggregation.1.convolution.weight"].shape[0],
                  "blocks": count_indexed(sd, f"{prefix}{i}.blocks."),
                  "layers": count_indexed(sd, f"{block}layers."), "kernels": first.shape[-1],
                  "light": light,
                  "downsample": f"{prefix}{i}.downsample.convolution.weight" in sd}
        for name, value in values.items():
            fields[name].append(value)
    spec.update({name: tuple(values) for name, values in fields.items()})
    return spec, list(spec["out_channels"])


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    sd, out, rest = substitute_keys(state_dict, IN_MEMORY), Renamed(), {}
    for key, tensor in sd.items():
        if key.endswith("num_batches_tracked"):
            out.dropped.append((key, "batch norm counter (frozen batch norm keeps none)"))
        elif NUM_POINTS_SCALE.match(key):
            out.dropped.append((key, "sampling scale, read: 1 / its level's points"))
        elif key in CONSTANTS:
            out.dropped.append((key, f"read into the config ({CONSTANTS[key]})"))
        elif rt_detr.TOP_HEADS.match(key) and f"model.decoder.{key}" in sd:
            check_duplicate(sd, key, f"model.decoder.{key}")
            out.dropped.append((key, f"duplicate of model.decoder.{key}"))
        else:
            rest[key] = tensor
    apply_rules(rest, RULES, out)
    merge_qkv(out, rt_detr.QKV, ("q", "k", "v"))
    pad_decoder_points(out, config)
    return out


FORMAT = CheckpointFormat(
    name="huggingface_d_fine",
    description="Hugging Face DFineForObjectDetection (D-FINE, DEIM)",
    signature=(
        r"^model\.encoder_input_proj\.0\.0\.weight$",
        r"^model\.enc_score_head\.weight$",
        r"^model\.decoder\.layers\.0\.gateway\.gate\.weight$",
        r"^model\.decoder\.lqe_layers\.0\.reg_conf\.layers\.0\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
