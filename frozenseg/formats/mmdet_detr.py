"""mmdetection 3.x DETR, Conditional DETR and DAB-DETR (``configs/{detr, conditional_detr,
dab_detr}``): the plain-attention DETRs of ``detector/plain.py``, from the file mmengine's
CheckpointHook writes (its config text and class names read as for DINO, ``formats/mmdet.py``).

Keys:

* ``backbone.*``: mmdet's ResNet-50/101 (torchvision's names); ``neck.convs.0.conv`` (a
  ChannelMapper of one 1x1 convolution with bias, no norm) -> ``input_proj``;
* ``encoder.layers.N``: mmcv's MultiheadAttention keeps nn.MultiheadAttention as
  ``self_attn.attn`` (its stacked ``in_proj`` split here into q, k, v), ``ffn.layers.{0.0,
  0.1, 1}`` (linear1, DAB-DETR's PReLU, linear2), ``norms.{0, 1}`` -> norm1, norm2;
  DAB-DETR's ``encoder.query_scale``;
* ``decoder.layers.N``: DETR's ``{self, cross}_attn.attn``; Conditional DETR's and
  DAB-DETR's ConditionalAttention ``{self, cross}_attn.{qcontent, qpos, kcontent, kpos, v,
  qpos_sine}_proj`` -> ``{sa, ca}_*_proj`` (the cross-attention's ``qpos_proj`` in the first
  layer only, unless keep_query_pos); ``norms.{0, 1, 2}`` -> norm1..3 (after self-attention,
  cross-attention, FFN); ``decoder.post_norm`` -> ``transformer.decoder.norm``;
  ``decoder.{query_scale, ref_point_head, ref_anchor_head}``;
* ``query_embedding``: DETR's and Conditional DETR's query positions (``query_embed``),
  DAB-DETR's anchor logits (``refpoint_embed``); DAB-DETR's ``patterns``;
* ``bbox_head.fc_cls`` -> ``class_embed``; the box MLP -> ``bbox_embed``: DETRHead's
  ``reg_ffn.layers.{0.0, 1}`` then ``fc_reg`` (DETR, Conditional DETR), DABDETRHead's
  ``fc_reg.layers.{0, 1, 2}``.

From the saved config, as data: the classifier (``bbox_head.loss_cls``: DETR's
CrossEntropyLoss is a softmax whose last logit is "no object"; a sigmoid loss, Conditional
DETR's and DAB-DETR's focal loss, scores each class alone), the position embedding
(normalised; temperature 10000, DAB-DETR's 20), attention heads, FFN activations,
``test_cfg.max_per_img`` (100; DAB-DETR 300) and the image normalisation. The clamps are
mmdet's: DAB-DETR refines its anchors with inverse_sigmoid at eps 1e-5 and its head adds
them at 1e-3 (``head_inverse_sigmoid_eps``); Conditional DETR's head 1e-5. Refused in one line:
other backbones and necks, DAB-DETR's query_dim 2, other query_scale_type or no width/height
modulation (all shown by the keys), different encoder and decoder heads or activations, and
activations other than ReLU and PReLU.
"""

from __future__ import annotations

from collections.abc import Mapping

from frozenseg.detector.config import DetectorConfig
from frozenseg.formats.base import (
    CheckpointFormat,
    Renamed,
    Rule,
    StateDict,
    apply_rules,
    count_indexed,
    positive,
    put_split_in_proj,
    refuse_unsupported,
    rename_key,
)
from frozenseg.formats.huggingface_detr import FIXED, NAMES
from frozenseg.formats.mmdet import (
    SettingsReader,
    backbone_spec,
    image_norm,
    model_settings,
    setting,
    sine_position,
)

LAYER = r"^(encoder|decoder)\.layers\.(\d+)\."
_ATTENTION = {"self": "sa", "cross": "ca"}
COMMON_RULES: list[Rule] = [
    (r"^neck\.convs\.0\.conv\.", "input_proj."),
    # mmcv's MultiheadAttention (its in_proj already split into q_proj, k_proj, v_proj)
    (LAYER + r"(self|cross)_attn\.attn\.", r"transformer.\1.layers.\2.\3_attn."),
    # ConditionalAttention: the output projection, then the separate q, k, v projections
    (LAYER + r"(self|cross)_attn\.out_proj\.", r"transformer.\1.layers.\2.\3_attn.out_proj."),
    (LAYER + r"(self|cross)_attn\.(\w+_proj)\.",
     lambda m: f"transformer.{m[1]}.layers.{m[2]}.{_ATTENTION[m[3]]}_{m[4]}."),
    (LAYER + r"ffn\.layers\.0\.0\.", r"transformer.\1.layers.\2.linear1."),
    (LAYER + r"ffn\.layers\.0\.1\.", r"transformer.\1.layers.\2.activation."),
    (LAYER + r"ffn\.layers\.1\.", r"transformer.\1.layers.\2.linear2."),
    (LAYER + r"norms\.(\d)\.", lambda m: f"transformer.{m[1]}.layers.{m[2]}.norm{int(m[3]) + 1}."),
    (r"^(encoder|decoder)\.(query_scale|ref_point_head|ref_anchor_head)\.", r"transformer.\1.\2."),
    (r"^decoder\.post_norm\.", "transformer.decoder.norm."),
    (r"^bbox_head\.fc_cls\.", "class_embed."),
    (r"^bbox_head\.reg_ffn\.layers\.0\.0\.", "bbox_embed.layers.0."),
    (r"^bbox_head\.reg_ffn\.layers\.1\.", "bbox_embed.layers.1."),
    (r"^bbox_head\.fc_reg\.layers\.", "bbox_embed.layers."),  # DAB-DETR's MLP
    (r"^bbox_head\.fc_reg\.", "bbox_embed.layers.2."),  # after DETRHead's reg_ffn
]
TEMPERATURE = {"detr": 10000.0, "conditional_detr": 10000.0, "dab_detr": 20.0}
MAX_PER_IMG = {"detr": 100, "conditional_detr": 100, "dab_detr": 300}
ACTIVATIONS = {"ReLU": "relu", "PReLU": "prelu"}
# DAB-DETR decoder options frozenseg computes only at these values (the keys show them).
DAB_SUPPORTED = {"query_dim": (4,), "with_modulated_hw_attn": (True,),
                 "query_scale_type": ("cond_elewise",)}


def rules(variant: str) -> list[Rule]:
    queries = "refpoint_embed." if variant == "dab_detr" else "query_embed."
    return [(r"^query_embedding\.", queries), *COMMON_RULES]


def rename(state_dict: StateDict, config: DetectorConfig) -> Renamed:
    out, rest, variant_rules = Renamed(), {}, rules(config.variant)
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            out.dropped.append((key, "batch-norm step counter (the frozen batch norm has none)"))
        elif not put_split_in_proj(out, key, tensor,
                                   lambda k: rename_key(k, variant_rules) or k):
            rest[key] = tensor
    apply_rules(rest, variant_rules, out)
    return out


def variant_of(state_dict: StateDict) -> str:
    """DETR has no reference points; DAB-DETR's queries are anchors (4 wide, not C)."""
    if "decoder.ref_point_head.layers.0.weight" not in state_dict:
        return "detr"
    width = state_dict["neck.convs.0.conv.weight"].shape[0]
    queries = state_dict["query_embedding.weight"].shape[1]
    return "conditional_detr" if queries == width else "dab_detr"


def derive_config(state_dict: StateDict, args: Mapping) -> tuple[DetectorConfig, list[str]]:
    """Widths, depths, queries, classes and DAB-DETR's options from the shapes; the rest
    from the saved config (``meta['cfg']``)."""
    model, notes = model_settings(args), []
    read = SettingsReader(model, notes)
    sd, variant = state_dict, variant_of(state_dict)
    width = sd["neck.convs.0.conv.weight"].shape[0]
    num_classes, softmax = _classifier(sd, model, variant, notes)
    fields = {
        **FIXED[variant], "backbone": _backbone(sd, model), "hidden_dim": width,
        "nheads": _heads(read), "activation": _activation(sd, read),
        "enc_layers": count_indexed(sd, "encoder.layers."),
        "dec_layers": count_indexed(sd, "decoder.layers."),
        **_ffn_widths(sd), "num_queries": sd["query_embedding.weight"].shape[0],
        "num_classes": num_classes, "no_object_class": softmax, **image_norm(model),
        **sine_position(read, "", TEMPERATURE[variant], 0.0),
        "num_select": positive("max_per_img", read(("test_cfg.max_per_img",),
                                                   MAX_PER_IMG[variant],
                                                   "post-processing top-k")),
    }
    if variant != "detr":
        fields["keep_query_pos"] = "decoder.layers.1.cross_attn.qpos_proj.weight" in sd
    if variant == "dab_detr":
        refuse_unsupported("mmdetection DAB-DETR", [(DAB_SUPPORTED, _dab_options(sd, width),
                                                     "decoder")])
        fields.update(num_patterns=len(sd.get("patterns.weight", ())),
                      head_inverse_sigmoid_eps=1e-3)
    return DetectorConfig(**fields), notes


def _backbone(sd: StateDict, model: Mapping) -> dict:
    """ResNet-50/101 read by a neck of one 1x1 convolution of its last stage, no norm."""
    spec, widths = backbone_spec(sd, model)
    neck = sd["neck.convs.0.conv.weight"]
    one_level = (count_indexed(sd, "neck.convs.") == 1 and neck.shape[-1] == 1
                 and not any(k.startswith(("neck.extra_convs.", "neck.convs.0.gn."))
                             for k in sd))
    if not spec["name"].startswith("resnet") or not one_level or neck.shape[1] != widths[3]:
        raise ValueError("mmdetection's DETR, Conditional DETR and DAB-DETR are supported "
                         "with a ResNet whose last stage one 1x1 convolution without norm "
                         "reads (ChannelMapper, in_channels=[2048]); this neck or backbone "
                         "differs")
    return spec


def _ffn_widths(sd: StateDict) -> dict:
    encoder = sd["encoder.layers.0.ffn.layers.0.0.weight"].shape[0]
    decoder = sd["decoder.layers.0.ffn.layers.0.0.weight"].shape[0]
    return {"dim_feedforward": decoder, "encoder_ffn_dim": None if encoder == decoder
            else encoder}


def _heads(read: SettingsReader) -> int:
    """One head count for every attention (mmdet's layers default to 8)."""
    encoder = read(("encoder.layer_cfg.self_attn_cfg.num_heads",), 8, "attention heads",
                   built_in=True)
    for path in ("decoder.layer_cfg.self_attn_cfg.num_heads",
                 "decoder.layer_cfg.cross_attn_cfg.num_heads"):
        if (other := setting(read.model, path, encoder)) != encoder:
            raise ValueError(f"{path}={other!r} differs from the encoder's {encoder!r} "
                             "attention heads: not supported")
    return positive("num_heads", encoder)


def _activation(sd: StateDict, read: SettingsReader) -> str:
    """The FFN activation, ReLU or PReLU (whose slope is a key), alike in both stacks."""
    kinds = []
    for coder in ("encoder", "decoder"):
        shown = "PReLU" if f"{coder}.layers.0.ffn.layers.0.1.weight" in sd else "ReLU"
        kind = read((f"{coder}.layer_cfg.ffn_cfg.act_cfg.type",), shown,
                    f"{coder} FFN activation", built_in=True)
        if kind not in ACTIVATIONS:
            raise ValueError(f"an mmdetection {coder} FFN activation {kind!r} is not "
                             f"supported (supported: {', '.join(ACTIVATIONS)})")
        kinds.append(kind)
    if kinds[0] != kinds[1]:
        raise ValueError(f"encoder ({kinds[0]}) and decoder ({kinds[1]}) FFN activations "
                         "differ: not supported")
    return ACTIVATIONS[kinds[0]]


def _classifier(sd: StateDict, model: Mapping, variant: str, notes: list[str]
                ) -> tuple[int, bool]:
    """(num_classes, softmax): mmdet's DETRHead has num_classes + 1 outputs, the last "no
    object", unless its loss is a sigmoid one (``use_sigmoid``, FocalLoss's default)."""
    loss = setting(model, "bbox_head.loss_cls")
    if isinstance(loss, Mapping):
        softmax = not loss.get("use_sigmoid", loss.get("type") != "CrossEntropyLoss")
    else:
        softmax = variant == "detr"
        notes.append(f"classifier: not in the saved config, assumed "
                     f"{'a softmax with a no-object class' if softmax else 'a sigmoid per class'}"
                     f" as in mmdetection's {NAMES[variant]}")
    outputs = sd["bbox_head.fc_cls.weight"].shape[0]
    num_classes = outputs - int(softmax)
    saved = setting(model, "bbox_head.num_classes", num_classes)
    if saved != num_classes:
        raise ValueError(f"bbox_head.fc_cls has {outputs} outputs, not the config's "
                         f"num_classes={saved!r}" + (" + 1 (no object)" if softmax else ""))
    return num_classes, bool(softmax)


def _dab_options(sd: StateDict, width: int) -> dict:
    """DAB-DETR's decoder options as its keys show them."""
    scale = sd.get("decoder.query_scale.layers.1.weight")
    scale_type = ("fix_elewise" if "decoder.query_scale.weight" in sd
                  else "cond_elewise" if scale is not None and scale.shape[0] == width
                  else "cond_scalar")
    return {"query_dim": sd["query_embedding.weight"].shape[1],
            "with_modulated_hw_attn": "decoder.ref_anchor_head.layers.0.weight" in sd,
            "query_scale_type": scale_type}


FORMAT = CheckpointFormat(
    name="mmdet_detr",
    description="mmdetection 3.x DETR / Conditional DETR / DAB-DETR (open-mmlab/mmdetection)",
    signature=(
        r"^neck\.convs\.0\.conv\.weight$",
        r"^query_embedding\.weight$",
        r"^encoder\.layers\.0\.self_attn\.attn\.in_proj_weight$",
        r"^decoder\.layers\.0\.",
        r"^bbox_head\.fc_cls\.weight$",
    ),
    derive_config=derive_config,
    rename=rename,
)
