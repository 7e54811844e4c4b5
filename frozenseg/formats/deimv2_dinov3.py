"""The DINOv3 backbone of Hugging Face DEIMv2 folders (S, M, L, X): its spec and names.

transformers' ``Deimv2DINOv3ConvEncoder`` holds a ``DINOv3ViTBackbone`` (``backbone``),
the spatial tuning adapter (``spatial_tuning_adapter``) and the 1x1 projections of their
concatenated maps (``fusion_proj``), which become the hybrid encoder's input projections
(:mod:`frozenseg.detector.backbones.sta`). transformers 5 saves the ViT's layers as
``backbone.layer.i`` (in memory ``backbone.model.layer.i``); both are read.

What the weights do not say is read from the folder's ``backbone_config``: the heads, the
output layers (``out_indices``), which outputs are layer-normed (``apply_layernorm``; the
last block's always is, unless the weights hold no final norm, as the official DEIMv2's
ViT-Tiny does not), the RoPE base, the LayerNorm eps and the MLP's activation.
Settings frozenseg does not build (biases off, other patch sizes) are refused in one line.
The DINOv3 models take ImageNet-normalised pixels (their image processor normalises).
"""

from __future__ import annotations

from frozenseg.detector.config import IMAGENET_MEAN, IMAGENET_STD
from frozenseg.formats.base import (
    Renamed,
    StateDict,
    apply_rules,
    count_indexed,
    refuse_unsupported,
    saved_or_assumed,
)

CONV_ENCODER = "model.conv_encoder."
VIT = CONV_ENCODER + "backbone."
ADAPTER = CONV_ENCODER + "spatial_tuning_adapter."

# The saved names, the fusion projections as D-FINE's encoder input projections.
TO_D_FINE = [
    (r"^model\.conv_encoder\.backbone\.model\.layer\.", "model.conv_encoder.backbone.layer."),
    (r"^model\.conv_encoder\.fusion_proj\.(\d+)\.conv\.", r"model.encoder_input_proj.\1.0."),
    (r"^model\.conv_encoder\.fusion_proj\.(\d+)\.norm\.", r"model.encoder_input_proj.\1.1."),
]
FIXED = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}
SUPPORTED = {"query_bias": (True,), "value_bias": (True,), "proj_bias": (True,),
             "mlp_bias": (True,), "hidden_act": ("gelu", "silu"),
             "reshape_hidden_states": (True,), "patch_size": (16,), "num_channels": (3,)}
# transformers' DINOv3ViTConfig defaults, for settings a config.json leaves out.
DEFAULTS = {"num_attention_heads": 6, "rope_theta": 100.0, "layer_norm_eps": 1e-5,
            "apply_layernorm": True, "hidden_act": "gelu"}

_LAYER = r"^model\.conv_encoder\.backbone\.layer\.(\d+)\."
RULES = [
    (r"^model\.conv_encoder\.backbone\.embeddings\.patch_embeddings\.",
     "backbone.vit.patch_embed."),
    (r"^model\.conv_encoder\.backbone\.embeddings\.(cls_token|register_tokens)$",
     r"backbone.vit.\1"),
    (r"^model\.conv_encoder\.backbone\.norm\.", "backbone.vit.norm."),
    (_LAYER + r"attention\.o_proj\.", r"backbone.vit.blocks.\1.attn.proj."),
    (_LAYER + r"attention\.", r"backbone.vit.blocks.\1.attn."),
    (_LAYER + r"layer_scale([12])\.lambda1$", r"backbone.vit.blocks.\1.gamma\2"),
    (_LAYER + r"(norm[12])\.", r"backbone.vit.blocks.\1.\2."),
    (r"^model\.conv_encoder\.spatial_tuning_adapter\.", "backbone.sta."),
]
# A plain MLP's two projections are vit.Mlp's fc1 and fc2; a gated one keeps its names.
PLAIN_MLP = [(_LAYER + r"mlp\.up_proj\.", r"backbone.vit.blocks.\1.mlp.fc1."),
             (_LAYER + r"mlp\.down_proj\.", r"backbone.vit.blocks.\1.mlp.fc2.")]
GATED_MLP = [(_LAYER + r"mlp\.", r"backbone.vit.blocks.\1.mlp.")]


def is_dinov3(state_dict: StateDict) -> bool:
    return any(k.startswith(VIT) for k in state_dict)


def backbone_spec(sd: StateDict, settings: dict, notes: list[str]) -> tuple[dict, list[int]]:
    """The ``dinov3_sta`` backbone spec and its four widths, from the ViT's and the
    adapter's shapes (``sd`` in D-FINE's names) and the folder's ``backbone_config``."""
    read = _settings(settings, notes)
    patch = sd[VIT + "embeddings.patch_embeddings.weight"]
    dim, layers = patch.shape[0], count_indexed(sd, VIT + "layer.")
    out_layers = _out_layers(settings, layers)
    if dim % read["num_attention_heads"] or (dim // read["num_attention_heads"]) % 4:
        raise ValueError(f"a {dim}-wide ViT of {read['num_attention_heads']} heads: RoPE "
                         "needs a head width that is a multiple of 4")
    spec = {"name": "dinov3_sta", "dim": dim, "heads": read["num_attention_heads"],
            "patch": patch.shape[-1], "mlp_dim": sd[f"{VIT}layer.0.mlp.up_proj.weight"].shape[0],
            "registers": sd[VIT + "embeddings.register_tokens"].shape[1],
            "key_bias": f"{VIT}layer.0.attention.k_proj.bias" in sd,
            "gated_mlp": f"{VIT}layer.0.mlp.gate_proj.weight" in sd,
            "activation": read["hidden_act"], "rope_theta": float(read["rope_theta"]),
            "out_layers": out_layers,
            "normed": _normed(sd, bool(read["apply_layernorm"]), out_layers, layers),
            "eps": float(read["layer_norm_eps"]),
            "adapter_dim": sd[ADAPTER + "stem_conv.conv.weight"].shape[0]}
    a = spec["adapter_dim"]
    return spec, [a, dim + 2 * a, dim + 4 * a, dim + 4 * a]


def _settings(settings: dict, notes: list[str]) -> dict:
    """The backbone config's settings that change the computation, checked (one line for
    the first frozenseg does not build), with transformers' defaults for those left out."""
    kind = settings.get("model_type", "dinov3_vit")
    if kind != "dinov3_vit":
        raise ValueError(f"the weights hold a DINOv3 backbone, but the backbone config is "
                         f"{kind!r}: the config and the weights are of different models")
    refuse_unsupported("DEIMv2", [(SUPPORTED, settings, "backbone config")])
    return {name: saved_or_assumed(settings, name, default, notes, "DINOv3 backbone")
            for name, default in DEFAULTS.items()}


def _normed(sd: StateDict, apply_layernorm: bool, out_layers: tuple[int, ...], layers: int
            ) -> tuple[bool, ...]:
    """Which outputs pass the ViT's final LayerNorm: with apply_layernorm every one, else
    the last block's (transformers norms it always); none where the weights hold no final
    norm (the official DEIMv2's distilled ViT-Tiny has none)."""
    if VIT + "norm.weight" not in sd:
        if apply_layernorm:
            raise ValueError("the backbone config sets apply_layernorm, but the weights hold "
                             "no final LayerNorm of the ViT")
        return (False,) * len(out_layers)
    return tuple(apply_layernorm or i == layers for i in out_layers)


def _out_layers(settings: dict, layers: int) -> tuple[int, ...]:
    """out_indices: the three blocks (1..layers) whose outputs DEIMv2 reads."""
    out_layers = tuple(settings.get("out_indices") or ())
    if len(out_layers) != 3 or not all(0 < i <= layers for i in out_layers):
        raise ValueError(f"DEIMv2 with backbone config out_indices={list(out_layers)} is not "
                         f"supported (supported: three of the {layers} layers 1..{layers})")
    return out_layers


def rename_backbone(sd: StateDict, config_backbone: dict, out: Renamed) -> None:
    """The ViT's and the adapter's keys (``sd``, D-FINE's names) into ``out``, canonical;
    the pretraining mask token, batch norm counters and blocks past the last output layer
    dropped."""
    rules = RULES + (GATED_MLP if config_backbone["gated_mlp"] else PLAIN_MLP)
    kept, last = {}, max(config_backbone["out_layers"])
    for key, tensor in sd.items():
        if key.endswith("num_batches_tracked"):
            out.dropped.append((key, "batch norm counter (frozen batch norm keeps none)"))
        elif key == VIT + "embeddings.mask_token":
            out.dropped.append((key, "masked-image pretraining's token: unused at inference"))
        elif key.startswith(VIT + "layer.") and int(key.split(".")[4]) >= last:
            out.dropped.append((key, f"a ViT block after the last output layer ({last})"))
        else:
            kept[key] = tensor
    apply_rules(kept, rules, out)


def split(sd: StateDict) -> tuple[StateDict, StateDict]:
    """(the backbone's keys, the rest)."""
    mine = {k: v for k, v in sd.items() if k.startswith((VIT, ADAPTER))}
    return mine, {k: v for k, v in sd.items() if k not in mine}
