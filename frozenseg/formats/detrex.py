"""detrex DINO checkpoints (IDEA-Research/detrex, ``projects/dino``).

detectron2's Checkpointer saves ``{'model': state_dict, ...}`` (plus optimizer, scheduler,
iteration or trainer state while training); no configuration is inside. detrex builds DINO
from a LazyConfig; its layout differs from the official DINO's in names only:

* ``backbone.*``: detectron2's ResNet (``stem.conv1(.norm)``, ``res{2..5}.i.conv{1,2,3}(.norm)``,
  ``shortcut(.norm)``; frozen batch norm, stride in the 3x3 conv as torchvision) ->
  torchvision names; detectron2's Swin and detrex's FocalNet already use the official names;
* ``neck.convs.i.{conv,norm}`` then ``neck.extra_convs.j.{conv,norm}`` (ChannelMapper) ->
  ``input_proj.{i, n + j}.{0,1}``; ``transformer.level_embeds`` -> ``level_embed``;
* layers: ``attentions.0`` (encoder: deformable self-attention; decoder: ``.attn.`` wraps
  ``nn.MultiheadAttention``), ``attentions.1`` (decoder cross-attention),
  ``ffns.0.layers.{0.0,1}`` -> ``linear{1,2}``, ``norms.i`` in operation order: encoder
  (norm1, norm2), decoder (norm2 after self-attention, norm1 after cross-attention, norm3);
* ``class_embed.i`` / ``bbox_embed.i`` for i < dec_layers, index dec_layers scores the encoder
  proposals (-> ``transformer.enc_out_*``); ``transformer.decoder.{class,bbox}_embed.i``
  are the same modules registered again, dropped once checked equal;
* ``label_enc`` has num_classes rows (COCO: 80 contiguous classes, no extra row), so
  ``dn_labelbook_size`` = num_classes - 1.

Inference is the official DINO's (max-class proposal scores, query sine embedding y, x, w, h,
normed decoder outputs, inverse_sigmoid eps 1e-3) except for the position embedding of the
feature maps: temperature 10000 with a -0.5 offset in ``dino_r50.py``, which every detrex
DINO config inherits but ``dino_r50_4scale_24ep.py`` (20 and 0, DINO's). Images are RGB,
normalised in 0..255 by ImageNet's mean and std times 255, i.e. ``IMAGENET_MEAN``/``STD`` on
[0, 1]; ``select_box_nums_for_evaluation`` (300) is the post-processing top-k.
detrex evaluates one image at a time: its eval forward passes an all-False padding mask, so
a padded batch would treat padding as image; frozenseg masks padding, which equals detrex
on every image alone.

What the shapes cannot say comes from the training config (``args``): the LazyConfig itself
(``LazyConfig.load('config.yaml')``, or that file as a nested dict), or flat dotted paths
(``{'model.position_embedding.temperature': 20}``); absent values take dino_r50.py's, with a
note where a shipped config differs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from frozenseg.detector.backbones.focalnet import focalnet_config_from_state_dict
from frozenseg.detector.backbones.swin import swin_config_from_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    StateDict,
    backbone_levels,
    check_duplicate,
    count_indexed,
    positive,
    sampling_points,
)
from frozenseg.formats.dino import DUPLICATE_HEADS

RESNET_CHANNELS = [256, 512, 1024, 2048]
# Config entries that change inference without changing a key or shape: only these values
# are reproduced (absent entries take them).
SUPPORTED = {
    "model.position_embedding.normalize": (True,),
    "model.position_embedding.scale": (2 * math.pi,),
    "model.backbone.stages.stride_in_1x1": (False,),
    "model.backbone.stages.res5_dilation": (1,),
    "model.neck.activation": (None,),
    "model.transformer.encoder.post_norm": (False,),
    "model.transformer.learnt_init_query": (True,),
    "dataloader.test.mapper.img_format": ("RGB",),
}
PIXEL_MEAN, PIXEL_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _get(args: Mapping, path: str, default=None):
    """``args[path]`` for a flat dotted key, else the nested entry, else ``default``."""
    if path in args:
        return args[path]
    node = args
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _rules(state_dict: StateDict) -> list:
    """(pattern, replacement) pairs from detrex's names to the canonical ones."""
    dec_layers = count_indexed(state_dict, "transformer.decoder.layers.")
    mapped = count_indexed(state_dict, "neck.convs.")
    part = {"conv": 0, "norm": 1}
    layer = r"^(transformer\.{}coder\.layers\.\d+\.)"
    enc, dec, both = layer.format("en"), layer.format("de"), layer.format("(?:en|de)")
    enc_norms, dec_norms = ("norm1", "norm2"), ("norm2", "norm1", "norm3")
    return [
        (r"^backbone\.stem\.conv1\.norm\.", "backbone.bn1."),
        (r"^backbone\.stem\.conv1\.", "backbone.conv1."),
        (r"^backbone\.res([2-5])\.(\d+)\.(conv[123]|shortcut)\.(norm\.)?", _resnet_name),
        (r"^neck\.convs\.(\d+)\.(conv|norm)\.", lambda m: f"input_proj.{m[1]}.{part[m[2]]}."),
        (r"^neck\.extra_convs\.(\d+)\.(conv|norm)\.",
         lambda m: f"input_proj.{mapped + int(m[1])}.{part[m[2]]}."),
        (r"^transformer\.level_embeds$", "transformer.level_embed"),
        (enc + r"attentions\.0\.", r"\1self_attn."),
        (dec + r"attentions\.0\.attn\.", r"\1self_attn."),
        (dec + r"attentions\.1\.", r"\1cross_attn."),
        (both + r"ffns\.0\.layers\.0\.0\.", r"\1linear1."),
        (both + r"ffns\.0\.layers\.1\.", r"\1linear2."),
        (enc + r"norms\.([01])\.", lambda m: f"{m[1]}{enc_norms[int(m[2])]}."),
        (dec + r"norms\.([012])\.", lambda m: f"{m[1]}{dec_norms[int(m[2])]}."),
        (rf"^(class|bbox)_embed\.{dec_layers}\.", r"transformer.enc_out_\1_embed."),
    ]


def _resnet_name(m: re.Match) -> str:
    """detectron2 ``res{s}.{b}.{conv k | shortcut}(.norm)`` -> torchvision's names."""
    part, norm = m[3], bool(m[4])
    if part == "shortcut":
        part = "downsample.1" if norm else "downsample.0"
    elif norm:
        part = "bn" + part[-1]
    return f"backbone.layer{int(m[1]) - 1}.{m[2]}.{part}."


def _canonical_names(state_dict: StateDict) -> dict[str, str | None]:
    """Each key's canonical name (key counts alone decide); None for a head's decoder copy."""
    rules, names = _rules(state_dict), {}
    for key in state_dict:
        m = DUPLICATE_HEADS.match(key)
        if m and m[1] in state_dict:
            names[key] = None
            continue
        name = m[1] if m else key  # a head saved only as the decoder's copy is the head
        names[key] = next((re.sub(p, r, name, count=1) for p, r in rules if re.match(p, name)),
                          name)
    return names


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    """detrex names -> canonical ones; the decoder's copies of the heads checked, dropped."""
    out = Renamed()
    for key, name in _canonical_names(state_dict).items():
        if name is None:
            original = DUPLICATE_HEADS.match(key)[1]
            check_duplicate(state_dict, key, original)
            out.dropped.append((key, f"duplicate of {original}"))
        else:  # a head saved only as the decoder's copy is the head
            out.put(key, name, state_dict[key])
    return out


def derive_config(state_dict: StateDict, args: Mapping) -> tuple[DetectorConfig, list[str]]:
    """Widths, depths, levels, queries, classes from shapes; the rest from the LazyConfig."""
    _check_args(args)
    notes: list[str] = []
    sd = {name: state_dict[k] for k, name in _canonical_names(state_dict).items() if name}
    c = sd["transformer.level_embed"].shape[1]
    heads = _get(args, "model.transformer.encoder.num_heads")
    if heads is None:
        heads = c // 32
        notes.append(f"attention heads (head dim 32): not in the config, assumed {heads}")
    heads = positive("model.transformer.encoder.num_heads", heads)
    backbone, channels = _backbone(sd, args)
    stages, levels = backbone_levels(sd, "input_proj.", channels)
    temperature = _get(args, "model.position_embedding.temperature")
    offset = _get(args, "model.position_embedding.offset")
    if temperature is None and offset is None:
        notes.append("position embedding: not in the config, assumed temperature 10000 and "
                     "offset -0.5 (dino_r50.py; dino_r50_4scale_24ep.py uses 20 and 0.0)")
    config = DetectorConfig(
        variant="dino", backbone=backbone, hidden_dim=c, backbone_levels=stages,
        num_feature_levels=levels, nheads=heads,
        enc_layers=count_indexed(sd, "transformer.encoder.layers."),
        dec_layers=count_indexed(sd, "transformer.decoder.layers."),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        **sampling_points(sd, heads, levels),
        num_queries=sd["transformer.tgt_embed.weight"].shape[0],
        num_classes=sd["class_embed.0.weight"].shape[0],
        query_init="mixed", box_refine=True, proposal_score="max_class", decoder_norm=True,
        ref_point_head=True, inverse_sigmoid_eps=1e-3,
        pos_temperature=positive("model.position_embedding.temperature",
                                 10000 if temperature is None else temperature, float),
        pos_offset=float(-0.5 if offset is None else offset),
        dn_labelbook_size=sd["label_enc.weight"].shape[0] - 1,
        num_select=positive("model.select_box_nums_for_evaluation",
                            _get(args, "model.select_box_nums_for_evaluation", 300)),
        image_mean=tuple(round(v / 255, 10) for v in _get(args, "model.pixel_mean", PIXEL_MEAN)),
        image_std=tuple(round(v / 255, 10) for v in _get(args, "model.pixel_std", PIXEL_STD)),
    )
    return config, notes


def _check_args(args: Mapping) -> None:
    for path, accepted in SUPPORTED.items():
        value = _get(args, path, accepted[0])
        if value not in accepted:
            raise ValueError(f"detrex DINO with {path}={value!r} is not supported "
                             f"(supported: {', '.join(map(repr, accepted))})")
    dec_heads = _get(args, "model.transformer.decoder.num_heads")
    if dec_heads not in (None, _get(args, "model.transformer.encoder.num_heads", dec_heads)):
        raise ValueError("encoder and decoder with different numbers of heads are not supported")


def _backbone(sd: StateDict, args: Mapping) -> tuple[dict, list[int]]:
    """The backbone spec for :func:`build_backbone`, and its four stage widths."""
    if "backbone.conv1.weight" in sd:
        blocks = count_indexed(sd, "backbone.layer3.")
        depth = {6: 50, 23: 101}.get(blocks)
        if depth is None:
            raise ValueError(f"unsupported ResNet with {blocks} blocks in res4")
        return {"name": f"resnet{depth}"}, RESNET_CHANNELS
    inner = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if any(".modulation." in k for k in inner):
        spec = focalnet_config_from_state_dict(inner)
        # detrex's FocalNet never normalises the modulator (its default; no DINO config sets
        # it, FocalNet-L fl4 included); use_postln goes with layer scale in every config.
        spec.update(
            normalize_modulator=_get(args, "model.backbone.normalize_modulator", False),
            use_postln=_get(args, "model.backbone.use_postln", spec["use_postln"]),
        )
        spec = {"name": "focalnet", **spec}
    elif any(".attn.relative_position_bias_table" in k for k in inner):
        spec = {"name": "swin", **swin_config_from_state_dict(inner)}
    else:
        raise ValueError("unsupported detrex DINO backbone: not ResNet, Swin or FocalNet "
                         "(ConvNeXt, InternImage, ViTDet and EVA are not supported)")
    return spec, [spec["embed_dim"] * 2**i for i in range(4)]


FORMAT = CheckpointFormat(
    name="detrex_dino",
    description="detrex DINO (IDEA-Research/detrex projects/dino, detectron2 layout)",
    signature=(
        r"^neck\.convs\.0\.conv\.weight$",
        r"^transformer\.level_embeds$",
        r"^transformer\.tgt_embed\.weight$",
        r"^transformer\.encoder\.layers\.0\.attentions\.0\.",
        r"^transformer\.decoder\.ref_point_head\.layers\.0\.weight$",
        r"^label_enc\.weight$",
        r"^class_embed\.0\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
