"""Hugging Face ``Deimv2ForObjectDetection`` folders: an HGNetV2 backbone with the hybrid
encoder (DEIMv2-N's kind) or the lite one (Atto, Femto, Pico), or DINOv3 with the spatial
tuning adapter and the hybrid encoder (S, M, L, X).

DEIMv2 is D-FINE's architecture (:mod:`frozenseg.formats.d_fine`, whose derivation this
reuses) with: the backbone and its input projections under ``model.conv_encoder``;
RepNCSPELAN5 fusion blocks (CSP blocks that split one convolution, with a trailing 3x3 or
not) on levels merged by a sum; decoder layers with RMSNorm, a SwiGLU FFN and the gate or
not; a three-layer query_pos head; optionally one box head shared by every layer (saved
once, under one layer's index: copied to the others). transformers 5 saves DEIMv2 under
its in-memory names. The DINOv3 models' backbone, its settings and names are
:mod:`frozenseg.formats.deimv2_dinov3`'s; the projections of its fused maps are D-FINE's
encoder input projections. The lite encoder (``hybrid.LiteEncoder``: its GAP fusion
saved as ``bi_fusion_conv``) has no AIFI; its input projection is read as the hybrid
encoder's and its single FPN and PAN blocks as the first of D-FINE's; its three-stage
HGNetV2 feeds it the last stage. The proposals pass ``enc_output`` where the weights hold
it (transformers' always do; the official layout, read through this module by
:mod:`frozenseg.formats.deimv2_official`, has none).
"""

from __future__ import annotations

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats import d_fine, deimv2_dinov3
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    count_indexed,
    refuse_unsupported,
    substitute_keys,
)

# DEIMv2's names -> D-FINE's (transformers' saved ones).
TO_D_FINE = [
    (r"^model\.conv_encoder\.model\.", "model.backbone.model."),
    (r"^model\.conv_encoder\.encoder_input_proj\.(\d+)\.conv\.",
     r"model.encoder_input_proj.\1.0."),
    (r"^model\.conv_encoder\.encoder_input_proj\.(\d+)\.norm\.",
     r"model.encoder_input_proj.\1.1."),
    (r"^model\.decoder_input_proj\.(\d+)\.conv\.", r"model.decoder_input_proj.\1.0."),
    (r"^model\.decoder_input_proj\.(\d+)\.norm\.", r"model.decoder_input_proj.\1.1."),
    # the lite encoder's input projection and its single FPN and PAN blocks
    (r"^model\.encoder\.input_proj\.(\d+)\.conv\.", r"model.encoder_input_proj.\1.0."),
    (r"^model\.encoder\.input_proj\.(\d+)\.norm\.", r"model.encoder_input_proj.\1.1."),
    (r"^model\.encoder\.(fpn|pan)_block\.", r"model.encoder.\1_blocks.0."),
    *deimv2_dinov3.TO_D_FINE,
    *d_fine.IN_MEMORY,
]
FIXED = {**d_fine.FIXED, "hybrid_fusion": "elan5", "fdr_layer": "deimv2"}
# DEIMv2's decoder_activation_function is its query_pos head's (its FFN is a SwiGLU).
SUPPORTED = {**d_fine.SUPPORTED, "decoder_activation_function": ("relu",),
             "encoder_fuse_op": ("sum",), "encoder_type": ("hybrid", "lite")}
LITE = "model.encoder.bi_fusion_conv.conv.weight"
BOX_HEAD = "model.decoder.bbox_embed."
QUERY_POS = "model.decoder.query_pos_head.layers."


def _in_d_fine_names(state_dict: StateDict) -> StateDict:
    """The state dict in D-FINE's names (refusing the models frozenseg does not build); a
    DINOv3 backbone's keys stay under ``model.conv_encoder.``."""
    return substitute_keys(state_dict, TO_D_FINE)


def copy_shared_box_head(sd: StateDict, prefix: str, layers: int) -> list[tuple[str, str]]:
    """share_bbox_head: one module for every layer, saved once (under one layer's index):
    copy it to the other layers' keys under ``prefix``; the (key, how) of each copy."""
    saved = [i for i in range(layers) if f"{prefix}{i}.layers.0.weight" in sd]
    if len(saved) != 1 or layers == 1:
        return []
    source, copies = f"{prefix}{saved[0]}.", []
    for key in [k for k in sd if k.startswith(source)]:
        for i in sorted(set(range(layers)) - set(saved)):
            copy = f"{prefix}{i}." + key[len(source):]
            sd[copy] = sd[key]
            copies.append((copy, f"the box head shared by every layer, saved as {key}"))
    return copies


def derive_config(state_dict: StateDict, args: dict, **fields
                  ) -> tuple[DetectorConfig, list[str]]:
    """D-FINE's derivation, with the ELAN5 width and trailing convolution, the gate, the
    query_pos head's depth and width, the SwiGLU width and whether the proposals pass
    ``enc_output`` from shapes. ``fields``: what the caller knows beyond transformers'
    config (the official YAML's head activations)."""
    backbone_settings = args.get("backbone_config") or {}
    refuse_unsupported("DEIMv2", [(SUPPORTED, args, "config")])
    sd, notes, fixed, backbone = _in_d_fine_names(state_dict), [], FIXED, None
    if deimv2_dinov3.is_dinov3(sd):
        backbone = deimv2_dinov3.backbone_spec(sd, backbone_settings, notes)
        fixed = {**FIXED, **deimv2_dinov3.FIXED}
    else:
        refuse_unsupported("DEIMv2", [(d_fine.BACKBONE_SUPPORTED, backbone_settings,
                                       "backbone config")])
    lite = _lite(sd, args)
    fixed = {**fixed, "encoder": "lite"} if lite else fixed
    copy_shared_box_head(sd, BOX_HEAD, count_indexed(sd, "model.decoder.layers."))
    encoder_dim = sd["model.encoder_input_proj.0.0.weight"].shape[0]
    csp = "model.encoder.fpn_blocks.0.csp_rep1."
    config, more = d_fine.fdr_config(
        sd, args, "DEIMv2", fixed, "mlp.gate_proj", backbone=backbone, extra_levels=int(lite),
        csp_expansion=sd[f"{csp}conv1.conv.weight"].shape[0] // 2 / encoder_dim,
        csp_trailing_conv=f"{csp}conv2.conv.weight" in sd,
        fdr_gateway="model.decoder.layers.0.gateway.gate.weight" in sd,
        ref_point_layers=count_indexed(sd, QUERY_POS),
        ref_point_hidden_dim=sd[f"{QUERY_POS}0.weight"].shape[0],
        proposal_projection="model.enc_output.0.weight" in sd, **fields)
    return config, notes + more


def _lite(sd: StateDict, args: dict) -> bool:
    """Whether the encoder is the lite one (its GAP fusion saved), as config.json says."""
    lite = LITE in sd
    if args.get("encoder_type", "lite" if lite else "hybrid") != ("lite" if lite else "hybrid"):
        raise ValueError(f"config.json says encoder_type={args['encoder_type']!r}, but the "
                         f"weights hold {'a lite' if lite else 'a hybrid'} encoder")
    return lite


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    backbone, rest = deimv2_dinov3.split(_in_d_fine_names(state_dict))
    out = d_fine.rename(rest, config)
    if backbone:
        deimv2_dinov3.rename_backbone(backbone, config.backbone, out)
    out.derived.extend(copy_shared_box_head(out.state_dict, "bbox_embed.", config.dec_layers))
    return out


FORMAT = CheckpointFormat(
    name="huggingface_deimv2",
    description="Hugging Face Deimv2ForObjectDetection (HGNetV2, lite and DINOv3 models)",
    signature=(
        r"^model\.conv_encoder\.",
        r"^model\.enc_score_head\.weight$",
        r"^model\.decoder\.lqe_layers\.0\.reg_conf\.layers\.0\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
