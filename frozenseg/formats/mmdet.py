"""mmdetection checkpoints: mmdet 3.x DINO and Deformable DETR, mmdet 2.x Deformable DETR,
and Co-DETR's Co-DINO; the saved config read as data, the backbone and the image
normalisation, for these and for mmdet 3.x DETR, Conditional DETR and DAB-DETR
(``formats/mmdet_detr.py``, the plain model).

mmengine's CheckpointHook saves ``{'meta': {'cfg': <config text>, 'dataset_meta':
{'classes': ...}, ...}, 'state_dict', 'message_hub', 'optimizer', ...}``; mmdet 2.x (and
Sense-X/Co-DETR, built on it) ``{'meta': {'config': <text>, 'CLASSES': ...}, 'state_dict',
'optimizer'}``. The config text is read as data (never run) for what the weights cannot say.

**mmdet 3.x DINO / Deformable DETR** (``mmdet/models/detectors/{dino,deformable_detr}.py``):

* ``backbone.*``: mmdet's ResNet already has torchvision's names (style ``pytorch``: stride in
  the 3x3 conv); its batch norms' ``num_batches_tracked`` are dropped;
* ``neck.convs.i`` / ``neck.extra_convs.j`` (ChannelMapper of ConvModules, ``.conv`` then
  ``.gn``) -> ``input_proj.{i, n + j}.{0,1}``; with a norm, ConvModule's convolution has no
  bias, so the canonical bias is derived as zero;
* ``level_embed``, ``encoder.layers.N.{self_attn, ffn.layers.{0.0,1}, norms.{0,1}}``,
  ``decoder.layers.N.{self_attn.attn, cross_attn, ffn, norms.{0,1,2}}`` (norms in operation
  order: self-attention, cross-attention, FFN), ``decoder.ref_point_head.layers.*``,
  ``decoder.norm`` -> ``transformer.*``;
* ``query_embedding`` (DINO: the content queries -> ``transformer.tgt_embed``; Deformable DETR:
  query_pos and content -> ``query_embed``), ``memory_trans_{fc,norm}`` -> ``enc_output(_norm)``,
  ``pos_trans_{fc,norm}``, ``reference_points_fc``, ``dn_query_generator.label_embedding``
  (num_classes rows) -> ``label_enc``;
* ``bbox_head.{cls,reg}_branches.i`` (``reg``: Linear, ReLU, Linear, ReLU, Linear) ->
  ``class_embed.i`` / ``bbox_embed.i``, the extra one (index dec_layers) of two-stage models
  -> ``transformer.enc_out_*``. Without box refinement one head is shared by every index.

Inference equals the official models' except one clamp: mmdet's DINO refines references with
``inverse_sigmoid(eps=1e-3)`` but its head (DeformableDETRHead.forward) adds
``inverse_sigmoid(reference)`` at the default 1e-5 (``head_inverse_sigmoid_eps``). Position
embedding (SinePositionalEncoding, normalised): DINO's configs temperature 20, offset 0.0;
Deformable DETR's 10000, -0.5. Post-processing: ``test_cfg.max_per_img`` (DINO 300,
Deformable DETR 100). A batch of same-size images runs without masks in mmdet, which equals
all-valid masks.

**Co-DINO** (Sense-X/Co-DETR ``projects/models``, and mmdet 3.x ``projects/CO-DETR``, which
kept the mmcv 1.x layer names): the DETR query head is ``query_head.*`` (``transformer.`` in
detrex's mmcv names, ``level_embeds``, ``query_embed``, ``enc_output(_norm)``,
``decoder.ref_point_head.{0,2}``, label embedding at ``query_head.label_embedding`` (Sense-X)
or ``query_head.dn_generator.label_embedding`` (mmdet 3)); at inference only it runs, with
eps 1e-3 in both refinement and head, temperature 20, offset 0. Training-only parts are
dropped and listed: the auxiliary ``rpn_head``, ``roi_head`` and ``bbox_head`` (ATSS),
``query_head.downsample`` (their extra level) and the positive-query projections
``query_head.transformer.{aux_pos_trans, aux_pos_trans_norm, pos_feats_trans,
pos_feats_norm, head_pos_embed}``. Co-DETR's test-time soft-NMS of the query head's top 300
is post-processing frozenseg does not reproduce (the detections before it are equal: mmdet
3's project, run side by side, ``benchmarks/exactness_mmdet_co_dino.py``). mmdet 3 masks a
padded batch's padding whatever ``use_lsj`` says; Sense-X's LSJ models
(``with_attn_mask=False``) do not, which a note says (:data:`UNMASKED_LSJ`).

**mmdet 2.x Deformable DETR** (``mmdet/models/utils/transformer.py``'s
DeformableDetrTransformer inside ``DeformableDETRHead``; plain, box refinement, two-stage):
the transformer is ``bbox_head.transformer.*`` with the mmcv 1.x layer names Co-DINO keeps
(``level_embeds``, ``encoder.layers.N.{attentions.0, ffns.0, norms}``, ``decoder.layers.N.
{attentions.0.attn, attentions.1, ffns.0, norms}``, ``reference_points`` or two-stage's
``enc_output(_norm)`` / ``pos_trans(_norm)``), the learned queries ``bbox_head.query_embedding``,
the heads ``bbox_head.{cls,reg}_branches`` as in mmdet 3. It computes the official Deformable
DETR as mmdet 3's does. Settings from ``meta['config']``: ``bbox_head.{with_box_refine,
positional_encoding}``, ``bbox_head.transformer.two_stage_num_proposals`` (the two-stage query
count, default 300), ``test_cfg.max_per_img``; the image normalisation from the top-level
``img_norm_cfg`` (mean, std, to_rgb; Co-DINO's too); class names from ``meta['CLASSES']``.

Backbones: ResNet-50/101 (mmdet's has torchvision's names; style ``pytorch``, no deep stem,
no dilated last stage), and Swin: mmdet's
``patch_embed.projection``, ``stages.i.blocks.j.{attn.w_msa, ffn.layers}``,
``stages.i.downsample`` -> the official names, the patch merging's channels put back in the
official order (mmdet gathers 2x2 patches with nn.Unfold; see
:func:`official_merging_order`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from frozenseg.detector.backbones.swin import swin_config_from_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.formats.base import (
    CheckpointFormat,
    Opaque,
    Renamed,
    StateDict,
    backbone_levels,
    count_indexed,
    positive,
    python_config,
    sampling_points,
)

RESNET_CHANNELS = [256, 512, 1024, 2048]
# mmdet ResNet settings frozenseg's ResNet computes only at these values (DC5's dilated last
# stage is strides (1, 2, 2, 1) and dilations (1, 1, 1, 2); no key shows it).
RESNET_SUPPORTED = (("backbone.style", "pytorch"), ("backbone.deep_stem", False),
                    ("backbone.strides", (1, 2, 2, 2)), ("backbone.dilations", (1, 1, 1, 1)))
PIXEL_MEAN, PIXEL_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
_PART = {"conv": 0, "gn": 1}
_LAYER = r"^(?:query_head\.|bbox_head\.)?(?:transformer\.)?((?:en|de)coder\.layers\.\d+\.)"
# Co-DETR parts that only training runs: (key pattern, why dropped)
CO_DETR_TRAINING_ONLY = [
    (r"^(rpn_head|roi_head|bbox_head)\.", "Co-DETR auxiliary head (training only)"),
    (r"^query_head\.downsample\.", "extra level for Co-DETR's auxiliary heads (training only)"),
    (r"^query_head\.transformer\.(aux_pos_trans|aux_pos_trans_norm|pos_feats_trans|"
     r"pos_feats_norm|head_pos_embed)\.",
     "Co-DETR positive-query projection for the auxiliary heads (training only)"),
]

# Sense-X's LSJ configs (with_attn_mask=False) make the test-time model take each image's
# size as the padded batch's; mmdet 3's use_lsj=True means to, but CoDETR.predict writes
# img_shape into a copy of the metainfo, so its padding stays masked (measured).
UNMASKED_LSJ = ("with_attn_mask=False: Co-DETR leaves the padding of a batch of unequal "
                "images unmasked; frozenseg masks it (equal when no image is padded, as "
                "frozenseg's commands run them one at a time)")


def _branch(prefix: str, dec_layers: int) -> list:
    """Rules for ``{prefix}{cls,reg}_branches.i``: per-layer heads, and index dec_layers (the
    two-stage encoder-proposal head); reg branches are Sequential(Linear, ReLU, ...)."""
    p = re.escape(prefix)
    return [
        (rf"^{p}cls_branches\.{dec_layers}\.", "transformer.enc_out_class_embed."),
        (rf"^{p}reg_branches\.{dec_layers}\.(\d)\.",
         lambda m: f"transformer.enc_out_bbox_embed.layers.{int(m[1]) // 2}."),
        (rf"^{p}cls_branches\.(\d+)\.", r"class_embed.\1."),
        (rf"^{p}reg_branches\.(\d+)\.(\d)\.",
         lambda m: f"bbox_embed.{m[1]}.layers.{int(m[2]) // 2}."),
    ]


def _layer(part: str, canonical: str) -> tuple[str, Callable[[re.Match], str]]:
    """A rule for ``[query_head.][transformer.]{en,de}coder.layers.N.<part>``."""
    return _LAYER + part, lambda m: f"transformer.{m[1]}{canonical}."


def _neck(mapped: int) -> list:
    return [
        (r"^neck\.convs\.(\d+)\.(conv|gn)\.", lambda m: f"input_proj.{m[1]}.{_PART[m[2]]}."),
        (r"^neck\.extra_convs\.(\d+)\.(conv|gn)\.",
         lambda m: f"input_proj.{mapped + int(m[1])}.{_PART[m[2]]}."),
    ]


# mmdet's SwinTransformer -> the official names the canonical Swin keeps.
_SWIN = [
    (r"^backbone\.patch_embed\.projection\.", "backbone.patch_embed.proj."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.",
     r"backbone.layers.\1.blocks.\2.attn."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.",
     r"backbone.layers.\1.blocks.\2.mlp.fc1."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.",
     r"backbone.layers.\1.blocks.\2.mlp.fc2."),
    (r"^backbone\.stages\.(\d+)\.", r"backbone.layers.\1."),
]
_MERGING = re.compile(r"^backbone\.stages\.\d+\.downsample\.(reduction|norm)\.")


def official_merging_order(tensor: torch.Tensor) -> torch.Tensor:
    """mmdet's PatchMerging gathers each 2x2 patch with nn.Unfold, channel c*4 + k for the
    offsets k = (0,0), (0,1), (1,0), (1,1) (row, column); the official one concatenates
    x0..x3, channel j*C + c for (0,0), (1,0), (0,1), (1,1). Its reduction's input columns
    and norm, from the first order to the second (the inverse of mmdet's swin2mmdet)."""
    flat = tensor.reshape(-1, tensor.shape[-1])
    out, channels = flat.shape[0], flat.shape[1] // 4
    reordered = flat.reshape(out, channels, 4)[:, :, [0, 2, 1, 3]].transpose(1, 2)
    return reordered.reshape(tensor.shape).contiguous()


def _mmdet_rules(sd: StateDict) -> list:
    """mmdet 3.x DINO / Deformable DETR names -> canonical ones."""
    dino = "decoder.ref_point_head.layers.0.weight" in sd
    return [
        *_SWIN,
        *_neck(count_indexed(sd, "neck.convs.")),
        (r"^level_embed$", "transformer.level_embed"),
        (r"^query_embedding\.", "transformer.tgt_embed." if dino else "query_embed."),
        (r"^memory_trans_fc\.", "transformer.enc_output."),
        (r"^memory_trans_norm\.", "transformer.enc_output_norm."),
        (r"^pos_trans_fc\.", "transformer.pos_trans."),
        (r"^pos_trans_norm\.", "transformer.pos_trans_norm."),
        (r"^reference_points_fc\.", "transformer.reference_points."),
        (r"^dn_query_generator\.label_embedding\.", "label_enc."),
        (r"^decoder\.(ref_point_head|norm)\.", r"transformer.decoder.\1."),
        _layer(r"self_attn\.attn\.", "self_attn"),
        _layer(r"(?:self|cross)_attn\.", "{}"),
        _layer(r"ffn\.layers\.0\.0\.", "linear1"),
        _layer(r"ffn\.layers\.1\.", "linear2"),
        _layer(r"norms\.(\d)\.", "{}"),
        *_branch("bbox_head.", count_indexed(sd, "decoder.layers.")),
    ]


# mmcv 1.x's BaseTransformerLayer names (Co-DINO, mmdet 2.x): attentions, ffns, norms.
_MMCV_LAYERS = [
    _layer(r"attentions\.0\.attn\.", "self_attn"),
    _layer(r"attentions\.([01])\.", "{}"),
    _layer(r"ffns\.0\.layers\.0\.0\.", "linear1"),
    _layer(r"ffns\.0\.layers\.1\.", "linear2"),
    _layer(r"norms\.(\d)\.", "{}"),
]


def _mmdet2_rules(sd: StateDict) -> list:
    """mmdet 2.x Deformable DETR's names (its transformer inside the head) -> canonical ones."""
    return [
        *_SWIN,
        *_neck(count_indexed(sd, "neck.convs.")),
        (r"^bbox_head\.transformer\.level_embeds$", "transformer.level_embed"),
        (r"^bbox_head\.query_embedding\.", "query_embed."),
        (r"^bbox_head\.transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm|"
         r"reference_points)\.", r"transformer.\1."),
        *_MMCV_LAYERS,
        *_branch("bbox_head.", count_indexed(sd, "bbox_head.transformer.decoder.layers.")),
    ]


def _co_dino_rules(sd: StateDict) -> list:
    """Co-DINO's query head (mmcv 1.x layer names) -> canonical ones."""
    return [
        *_SWIN,
        *_neck(count_indexed(sd, "neck.convs.")),
        (r"^query_head\.transformer\.level_embeds$", "transformer.level_embed"),
        (r"^query_head\.transformer\.query_embed\.", "transformer.tgt_embed."),
        (r"^query_head\.transformer\.(enc_output|enc_output_norm)\.", r"transformer.\1."),
        (r"^query_head\.transformer\.decoder\.ref_point_head\.([02])\.",
         lambda m: f"transformer.decoder.ref_point_head.layers.{int(m[1]) // 2}."),
        (r"^query_head\.transformer\.decoder\.norm\.", "transformer.decoder.norm."),
        (r"^query_head\.(dn_generator\.)?label_embedding\.", "label_enc."),
        *_MMCV_LAYERS,
        *_branch("query_head.", count_indexed(sd, "query_head.transformer.decoder.layers.")),
    ]


# The sublayer names that depend on the layer kind and an index in the source name.
_ENCODER_NORMS, _DECODER_NORMS = ("norm1", "norm2"), ("norm2", "norm1", "norm3")


def _fill(name: str, source: str) -> str:
    """Resolve a ``{}`` left by a layer rule from what the source name says."""
    if "{}" not in name:
        return name
    decoder = ".decoder." in f".{source}"
    if m := re.search(r"\.norms\.(\d)\.", source):
        part = (_DECODER_NORMS if decoder else _ENCODER_NORMS)[int(m[1])]
    elif m := re.search(r"\.attentions\.([01])\.", source):
        part = ("self_attn", "cross_attn")[int(m[1])]
    else:
        part = re.search(r"\.((?:self|cross)_attn)\.", source)[1]
    return name.replace("{}", part)


def _rename_key(key: str, rules: list) -> str:
    for pattern, replacement in rules:
        if m := re.match(pattern, key):
            new = replacement(m) if callable(replacement) else m.expand(replacement)
            return _fill(new, key) + key[m.end():]
    return key


def _why_dropped(key: str, training_only: list) -> str | None:
    if key.endswith(".num_batches_tracked"):
        return "batch-norm step counter (the frozen batch norm has none)"
    return next((why for pattern, why in training_only if re.match(pattern, key)), None)


def _rename(state_dict: StateDict, rules: list, training_only: list) -> Renamed:
    out = Renamed()
    for key, tensor in state_dict.items():
        why = _why_dropped(key, training_only)
        if why is not None:
            out.dropped.append((key, why))
        elif _MERGING.match(key):
            out.put(key, _rename_key(key, rules), official_merging_order(tensor))
        else:
            out.put(key, _rename_key(key, rules), tensor)
    for key in [k for k in out.state_dict if re.match(r"^input_proj\.\d+\.0\.weight$", k)]:
        bias = key[: -len("weight")] + "bias"
        if bias not in out.state_dict:  # ConvModule before a norm: no bias, i.e. zero
            weight = out.state_dict[key]
            out.state_dict[bias] = torch.zeros(weight.shape[0], dtype=weight.dtype)
            out.derived.append((bias, "zeros: mmdet's ChannelMapper convolution has no bias "
                                      "before its group norm"))
    return out


def rename_mmdet(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    return _rename(state_dict, _mmdet_rules(state_dict), [])


def rename_mmdet2(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    return _rename(state_dict, _mmdet2_rules(state_dict), [])


def rename_co_dino(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    return _rename(state_dict, _co_dino_rules(state_dict), CO_DETR_TRAINING_ONLY)


# --- the config text mmengine / mmcv save in meta, read as data ---------------------------


def parse_config_text(text: str) -> dict:
    """The top-level assignments of an mmengine / mmcv config dump, as data ({} if the text
    is not Python)."""
    try:
        return python_config(text)
    except (SyntaxError, ValueError):
        return {}


def saved_config(args: Mapping) -> Mapping:
    """The saved config: ``meta['cfg']`` (mmengine) or ``meta['config']`` (mmcv 1.x), text
    or already a dict; {} if absent."""
    cfg = args.get("cfg", args.get("config"))
    if isinstance(cfg, str):
        cfg = parse_config_text(cfg)
    return cfg if isinstance(cfg, Mapping) else {}


def model_settings(args: Mapping) -> dict:
    """The model section of the saved config; {} if absent."""
    model = saved_config(args).get("model")
    return model if isinstance(model, Mapping) else {}


def with_legacy_image_norm(model: Mapping, args: Mapping) -> Mapping:
    """mmdet 2.x keeps the normalisation beside the model (``img_norm_cfg``: mean, std,
    to_rgb): put as mmdet 3's data_preprocessor, where the model has none."""
    norm = saved_config(args).get("img_norm_cfg")
    if "data_preprocessor" in model or not isinstance(norm, Mapping):
        return model
    pre = {key: norm[key] for key in ("mean", "std") if key in norm}
    return {**model, "data_preprocessor": {**pre, "bgr_to_rgb": norm.get("to_rgb", True)}}


def setting(node, path: str, default=None):
    for part in path.split("."):
        if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return default
    return default if isinstance(node, Opaque) else node


class SettingsReader:
    """Settings from the config, or a default with a note saying it was assumed."""

    def __init__(self, model: Mapping, notes: list[str]) -> None:
        self.model, self.notes = model, notes

    def __call__(self, paths: tuple[str, ...], default, what: str, *, built_in: bool = False):
        """The first path the config sets, else ``default``: noted as assumed unless it is
        the module's own default (``built_in``) and a config was saved."""
        for path in paths:
            value = setting(self.model, path)
            if value is not None:
                return value
        if not (built_in and self.model):
            self.notes.append(f"{what}: not in the saved config, assumed {default}")
        return default


# --- config derivation ---------------------------------------------------------------------


def _canonical(state_dict: StateDict, rules: list, training_only: list) -> StateDict:
    return {_rename_key(k, rules): v for k, v in state_dict.items()
            if _why_dropped(k, training_only) is None}


def backbone_spec(sd: StateDict, model: Mapping) -> tuple[dict, list[int]]:
    """The backbone spec for :func:`build_backbone` and its four stage widths: ResNet
    (mmdet's has torchvision's names) or Swin (renamed to the official names)."""
    inner = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if any(".attn.relative_position_bias_table" in k for k in inner):
        if setting(model, "backbone.use_abs_pos_embed", False):
            raise ValueError("mmdetection Swin with use_abs_pos_embed=True is not supported")
        spec = {"name": "swin", **swin_config_from_state_dict(inner)}
        return spec, [spec["embed_dim"] * 2**i for i in range(4)]
    if "backbone.conv1.weight" not in sd:
        raise ValueError("unsupported mmdetection backbone: only ResNet and Swin are converted")
    for path, accepted in RESNET_SUPPORTED:
        value = setting(model, path, accepted)
        if (tuple(value) if isinstance(value, list) else value) != accepted:
            raise ValueError(f"mmdetection ResNet with {path}={value!r} is not supported "
                             f"(supported: {accepted!r})")
    blocks = count_indexed(sd, "backbone.layer3.")
    depth = {6: 50, 23: 101}.get(blocks)
    if depth is None:
        raise ValueError(f"unsupported ResNet with {blocks} blocks in its third stage")
    return {"name": f"resnet{depth}"}, RESNET_CHANNELS


def image_norm(model: Mapping) -> dict:
    """ImageNet mean/std on RGB in [0, 1], from the data preprocessor when saved."""
    pre = setting(model, "data_preprocessor", {})
    if setting(pre, "bgr_to_rgb", True) is not True:
        raise ValueError("an mmdetection model fed BGR images (data_preprocessor.bgr_to_rgb "
                         "or img_norm_cfg.to_rgb False) is not supported")
    mean, std = setting(pre, "mean", PIXEL_MEAN), setting(pre, "std", PIXEL_STD)
    return {"image_mean": tuple(round(v / 255, 10) for v in mean),
            "image_std": tuple(round(v / 255, 10) for v in std)}


def _common(sd: StateDict, model: Mapping, read: SettingsReader, heads_paths: tuple[str, ...]
            ) -> dict:
    """What every mmdetection deformable DETR derives the same way."""
    c = sd["transformer.level_embed"].shape[1]
    heads = positive("num_heads", read(heads_paths, 8, "attention heads (mmcv's default)",
                                       built_in=True))
    backbone, channels = backbone_spec(sd, model)
    stages, levels = backbone_levels(sd, "input_proj.", channels)
    return dict(
        backbone=backbone, hidden_dim=c, backbone_levels=stages, num_feature_levels=levels,
        nheads=heads, enc_layers=count_indexed(sd, "transformer.encoder.layers."),
        dec_layers=count_indexed(sd, "transformer.decoder.layers."),
        dim_feedforward=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        **sampling_points(sd, heads, levels),
        num_classes=sd["class_embed.0.weight"].shape[0], **image_norm(model),
    )


def sine_position(read: SettingsReader, prefix: str, temperature: float, offset: float) -> dict:
    """SinePositionalEncoding's settings: a saved one's entries with the class defaults
    (temperature 10000, offset 0, not normalised), else the family's with a note."""
    saved = setting(read.model, f"{prefix}positional_encoding")
    if not isinstance(saved, Mapping):
        read.notes.append(f"position embedding: not in the saved config, assumed temperature "
                          f"{temperature:g} and offset {offset:g}")
        return {"pos_temperature": temperature, "pos_offset": offset}
    if setting(saved, "normalize", False) is not True:
        raise ValueError("an unnormalised position embedding (positional_encoding.normalize "
                         "False) is not supported")
    return {"pos_temperature": positive("positional_encoding.temperature",
                                        setting(saved, "temperature", 10000), float),
            "pos_offset": float(setting(saved, "offset", 0.0))}


def derive_mmdet(state_dict: StateDict, args: Mapping) -> tuple[DetectorConfig, list[str]]:
    """mmdet 3.x DINO or Deformable DETR: shapes, then the saved config."""
    model, notes = model_settings(args), []
    read = SettingsReader(model, notes)
    sd = _canonical(state_dict, _mmdet_rules(state_dict), [])
    common = _common(sd, model, read, ("encoder.layer_cfg.self_attn_cfg.num_heads",))
    if "transformer.tgt_embed.weight" in sd:  # DINO
        config = DetectorConfig(
            variant="dino", **common, num_queries=sd["transformer.tgt_embed.weight"].shape[0],
            query_init="mixed", box_refine=True, proposal_score="max_class",
            decoder_norm=True, ref_point_head=True, inverse_sigmoid_eps=1e-3,
            head_inverse_sigmoid_eps=1e-5, dn_labelbook_size=sd["label_enc.weight"].shape[0] - 1,
            **sine_position(read, "", 20.0, 0.0),
            num_select=positive("max_per_img", read(("test_cfg.max_per_img",), 300,
                                                    "post-processing top-k")))
        return config, notes
    return _deformable(sd, read, common, head="", proposals="num_queries"), notes


def derive_mmdet2(state_dict: StateDict, args: Mapping) -> tuple[DetectorConfig, list[str]]:
    """mmdet 2.x Deformable DETR: shapes, then the saved config (``meta['config']``)."""
    model, notes = with_legacy_image_norm(model_settings(args), args), []
    read = SettingsReader(model, notes)
    sd = _canonical(state_dict, _mmdet2_rules(state_dict), [])
    layer = "bbox_head.transformer.encoder.transformerlayers.attn_cfgs"
    common = _common(sd, model, read, (f"{layer}.num_heads", f"{layer}.0.num_heads"))
    return _deformable(sd, read, common, head="bbox_head.",
                       proposals="bbox_head.transformer.two_stage_num_proposals"), notes


def _deformable(sd: StateDict, read: SettingsReader, common: dict, *, head: str,
                proposals: str) -> DetectorConfig:
    """Deformable DETR (single-stage, box refinement, two-stage). mmdet 3.x keeps the
    settings at the model's top level, mmdet 2.x in its head (``head``); ``proposals``: where
    the two-stage proposal count is set."""
    two_stage = "transformer.enc_output.weight" in sd
    refine = setting(read.model, f"{head}with_box_refine")
    if refine is None:
        refine = not _heads_shared(sd, common["dec_layers"])
        read.notes.append(f"box refinement: not in the saved config, {'on' if refine else 'off'}"
                          " as the per-layer heads are " + ("separate" if refine
                                                            else "one shared"))
    queries = (read((proposals,), 300, "queries (two-stage proposals)") if two_stage
               else sd["query_embed.weight"].shape[0])
    return DetectorConfig(
        variant="deformable_detr", **common, num_queries=positive("num_queries", queries),
        query_init="proposals" if two_stage else "learned", box_refine=bool(refine),
        **sine_position(read, head, 10000.0, -0.5),
        num_select=positive("max_per_img", read(("test_cfg.max_per_img",), 100,
                                                "post-processing top-k")))


def _heads_shared(sd: StateDict, layers: int) -> bool:
    """Whether every layer's heads hold one module's weights (no box refinement)."""
    keys = [k for k in sd if re.match(r"^(class|bbox)_embed\.0\.", k)]
    return all(torch.equal(sd[k], sd[k.replace(".0.", f".{i}.", 1)])
               for k in keys for i in range(1, layers))


def derive_co_dino(state_dict: StateDict, args: Mapping) -> tuple[DetectorConfig, list[str]]:
    """Co-DINO's query head: shapes, then the saved config."""
    model, notes = with_legacy_image_norm(model_settings(args), args), []
    read = SettingsReader(model, notes)
    sd = _canonical(state_dict, _co_dino_rules(state_dict), CO_DETR_TRAINING_ONLY)
    layer = "query_head.transformer.encoder.transformerlayers.attn_cfgs"
    common = _common(sd, model, read, (f"{layer}.num_heads", f"{layer}.0.num_heads"))
    test_cfg = setting(model, "test_cfg")
    max_per_img = ("test_cfg.0.max_per_img" if isinstance(test_cfg, (list, tuple))
                   else "test_cfg.max_per_img")
    config = DetectorConfig(
        variant="dino", **common, num_queries=sd["transformer.tgt_embed.weight"].shape[0],
        query_init="mixed", box_refine=True, proposal_score="max_class", decoder_norm=True,
        ref_point_head=True, inverse_sigmoid_eps=1e-3,
        dn_labelbook_size=sd["label_enc.weight"].shape[0] - 1,
        **sine_position(read, "query_head.", 20.0, 0.0),
        num_select=positive("max_per_img", read((max_per_img,), 300, "post-processing top-k")))
    if setting(model, "with_attn_mask") is False:
        notes.append(UNMASKED_LSJ)
    return config, notes


def class_names(meta: Mapping) -> list[str] | None:
    """``meta['dataset_meta']['classes']`` (mmengine) or ``meta['CLASSES']`` (mmcv 1.x)."""
    names = setting(meta, "dataset_meta.classes", meta.get("CLASSES"))
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


MMDET_FORMAT = CheckpointFormat(
    name="mmdet",
    description="mmdetection 3.x DINO / Deformable DETR (open-mmlab/mmdetection)",
    signature=(
        r"^neck\.convs\.0\.conv\.weight$",
        r"^level_embed$",
        r"^encoder\.layers\.0\.self_attn\.sampling_offsets\.weight$",
        r"^decoder\.layers\.0\.cross_attn\.",
        r"^bbox_head\.cls_branches\.0\.weight$",
    ),
    derive_config=derive_mmdet,
    rename=rename_mmdet,
)

MMDET2_FORMAT = CheckpointFormat(
    name="mmdet2",
    description="mmdetection 2.x Deformable DETR (open-mmlab/mmdetection v2)",
    signature=(
        r"^neck\.convs\.0\.conv\.weight$",
        r"^bbox_head\.transformer\.level_embeds$",
        r"^bbox_head\.transformer\.encoder\.layers\.0\.attentions\.0\.sampling_offsets\.",
        r"^bbox_head\.cls_branches\.0\.weight$",
    ),
    derive_config=derive_mmdet2,
    rename=rename_mmdet2,
)

CO_DINO_FORMAT = CheckpointFormat(
    name="co_dino",
    description="Co-DETR Co-DINO (Sense-X/Co-DETR, mmdetection projects/CO-DETR)",
    signature=(
        r"^neck\.convs\.0\.conv\.weight$",
        r"^query_head\.transformer\.level_embeds$",
        r"^query_head\.transformer\.query_embed\.weight$",
        r"^query_head\.transformer\.decoder\.ref_point_head\.0\.weight$",
        r"^query_head\.cls_branches\.0\.weight$",
    ),
    derive_config=derive_co_dino,
    rename=rename_co_dino,
)
