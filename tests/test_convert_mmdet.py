"""mmdetection checkpoints (DINO, Deformable DETR, DETR, Conditional DETR, DAB-DETR, mmdet 2.x
Deformable DETR, Co-DETR's Co-DINO) convert to the canonical model and reproduce the
original outputs.

The mmdet 3.x layouts were recorded from mmdetection 3.3.0's own models, built from its
shipped configs shrunk (``tests/record_mmdet_keys.py`` -> ``data/mmdet_keys.json``, with the
config text mmengine saves beside the weights). State dicts in those layouts are made here
from random canonical models by the inverse renaming and checked key by key and shape by
shape against the recording. For the plain DETRs and for ``projects/CO-DETR``'s Co-DINO
(``record_co_dino.py``) the recording also holds mmdet's own outputs for seeded weights,
which the converted files must reproduce without mmdet. Sense-X's Co-DINO and mmdet 2.x's
layouts are written from their source text (not built here). When mmdetection, mmengine and
mmcv are importable, converted models also run side by side with mmdet's own DINO,
Deformable DETR, DETR, Conditional DETR, DAB-DETR and (with ``third_party/
mmdetection-projects``) Co-DINO (on the CPU mmcv's deformable attention needs no compiled op).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import official_detr
import pytest
import torch

from frozenseg.convert import convert_state_dict, inspect_checkpoint
from frozenseg.detector.config import DetectorConfig
from frozenseg.detector.model import DeformableDETR, build_detector
from frozenseg.formats import detect_format, mmdet_detr
from frozenseg.formats import mmdet as mmdet_format

RECORDED = json.loads((Path(__file__).parent / "data" / "mmdet_keys.json").read_text())

# The small builds of record_mmdet_keys.py: ResNet-50, 4 levels, 2 + 2 layers, 7 classes.
SMALL = dict(hidden_dim=256, nheads=8, enc_layers=2, dec_layers=2, dim_feedforward=64,
             num_queries=30, num_classes=7, backbone={"name": "resnet50"},
             backbone_levels=(1, 2, 3), num_feature_levels=4)
# mmdet's DINO: the official inference but for the head's inverse_sigmoid clamp (1e-5).
MMDET_DINO = dict(variant="dino", query_init="mixed", box_refine=True,
                  proposal_score="max_class", decoder_norm=True, ref_point_head=True,
                  pos_temperature=20.0, pos_offset=0.0, inverse_sigmoid_eps=1e-3,
                  head_inverse_sigmoid_eps=1e-5, num_select=300, dn_labelbook_size=6)
DEFORMABLE = dict(variant="deformable_detr", pos_temperature=10000.0, pos_offset=-0.5,
                  num_select=100)
# dino-5scale_swin-l's Swin, 32 wide with 5 blocks (record_mmdet_keys.py).
SWIN = {"name": "swin", "embed_dim": 32, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8),
        "window_size": 7, "out_indices": (0, 1, 2, 3), "mlp_ratio": 4.0, "patch_size": 4,
        "in_chans": 3, "qkv_bias": True, "patch_norm": True}
VARIANTS = {
    "dino_4scale": DetectorConfig(**MMDET_DINO, **SMALL),
    "dino_5scale_swin": DetectorConfig(**MMDET_DINO, **{
        **SMALL, "backbone": SWIN, "backbone_levels": (0, 1, 2, 3), "num_feature_levels": 5}),
    "deformable_detr": DetectorConfig(**DEFORMABLE, **SMALL),
    "deformable_detr_refine": DetectorConfig(**DEFORMABLE, **SMALL, box_refine=True),
    "deformable_detr_refine_two_stage": DetectorConfig(**DEFORMABLE, **SMALL, box_refine=True,
                                                       query_init="proposals"),
    "deformable_detr_two_stage": DetectorConfig(**DEFORMABLE, **SMALL, query_init="proposals"),
}
# Co-DINO 5-scale (co_dino_5scale_r50_1x_coco.py, shrunk): eps 1e-3 in the head too.
CO_DINO = DetectorConfig(
    variant="dino", query_init="mixed", box_refine=True, proposal_score="max_class",
    decoder_norm=True, ref_point_head=True, pos_temperature=20.0, pos_offset=0.0,
    inverse_sigmoid_eps=1e-3, num_select=300, dn_labelbook_size=6,
    **{**SMALL, "backbone_levels": (0, 1, 2, 3), "num_feature_levels": 5})
# record_co_dino.py's builds of projects/CO-DETR's LSJ config: the shrunk Co-DINO above, on
# ResNet-50 and on dino_5scale_swin's small Swin.
CO_DINO_RECORDED = {"co_dino": CO_DINO,
                    "co_dino_swin": dataclasses.replace(CO_DINO, backbone=SWIN)}
CLASSES = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train")

# --- mmdet's layouts, generated from a canonical state dict (the inverse renaming) ----------

_ENCODER = {"linear1": "ffn.layers.0.0", "linear2": "ffn.layers.1", "norm1": "norms.0",
            "norm2": "norms.1"}
_DECODER = {"self_attn": "self_attn.attn", "linear1": "ffn.layers.0.0",
            "linear2": "ffn.layers.1", "norm2": "norms.0", "norm1": "norms.1",
            "norm3": "norms.2"}
_MMCV = {"encoder": {"self_attn": "attentions.0", "linear1": "ffns.0.layers.0.0",
                     "linear2": "ffns.0.layers.1", "norm1": "norms.0", "norm2": "norms.1"},
         "decoder": {"self_attn": "attentions.0.attn", "cross_attn": "attentions.1",
                     "linear1": "ffns.0.layers.0.0", "linear2": "ffns.0.layers.1",
                     "norm2": "norms.0", "norm1": "norms.1", "norm3": "norms.2"}}
_TOP = {"transformer.level_embed": "level_embed", "transformer.tgt_embed": "query_embedding",
        "query_embed": "query_embedding", "transformer.enc_output": "memory_trans_fc",
        "transformer.enc_output_norm": "memory_trans_norm", "transformer.pos_trans": "pos_trans_fc",
        "transformer.pos_trans_norm": "pos_trans_norm",
        "transformer.reference_points": "reference_points_fc",
        "label_enc": "dn_query_generator.label_embedding",
        "transformer.decoder.norm": "decoder.norm",
        "transformer.decoder.ref_point_head": "decoder.ref_point_head"}


def _neck_name(key: str, config: DetectorConfig) -> str | None:
    """input_proj.i.{0,1} -> ChannelMapper's neck.{convs,extra_convs}.j.{conv,gn}; the
    convolution's bias (zero) is not saved."""
    m = re.match(r"^input_proj\.(\d+)\.([01])\.(\w+)$", key)
    if m[2] == "0" and m[3] == "bias":
        return None
    n, i = len(config.backbone_levels), int(m[1])
    convs = f"convs.{i}" if i < n else f"extra_convs.{i - n}"
    return f"neck.{convs}.{('conv', 'gn')[int(m[2])]}.{m[3]}"


def _head_name(key: str, config: DetectorConfig, prefix: str) -> str | None:
    """class_embed.i / bbox_embed.i / the encoder-proposal heads -> {prefix}{cls,reg}_branches."""
    if m := re.match(r"^transformer\.enc_out_(class|bbox)_embed\.(.*)$", key):
        key = f"{m[1]}_embed.{config.dec_layers}.{m[2]}"
    if m := re.match(r"^class_embed\.(\d+)\.(.*)$", key):
        return f"{prefix}cls_branches.{m[1]}.{m[2]}"
    if m := re.match(r"^bbox_embed\.(\d+)\.layers\.(\d)\.(.*)$", key):
        return f"{prefix}reg_branches.{m[1]}.{2 * int(m[2])}.{m[3]}"
    return None


_SWIN_NAMES = [(r"^backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
               (r"\.attn\.", ".attn.w_msa."), (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
               (r"\.mlp\.fc2\.", ".ffn.layers.1."), (r"^backbone\.layers\.", "backbone.stages.")]


def mmdet_name(key: str, config: DetectorConfig) -> str | None:
    """Canonical key -> mmdet 3.x's (None: not saved)."""
    if key.startswith("backbone.") and config.backbone["name"] == "swin":
        for pattern, replacement in _SWIN_NAMES:
            key = re.sub(pattern, replacement, key)
        return key
    if key.startswith("backbone."):
        return key
    if key.startswith("input_proj."):
        return _neck_name(key, config)
    if m := re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.(.*)$", key):
        part = (_ENCODER if m[1] == "encoder" else _DECODER).get(m[3], m[3])
        return f"{m[1]}.layers.{m[2]}.{part}.{m[4]}"
    if (name := _head_name(key, config, "bbox_head.")) is not None:
        return name
    for canonical, theirs in _TOP.items():
        if key == canonical or key.startswith(canonical + "."):
            return theirs + key[len(canonical):]
    raise AssertionError(f"no mmdet name for {key}")


def with_batch_norm_counters(layout: dict) -> dict:
    """mmdet's ResNet has nn.BatchNorm2d (frozen by requires_grad=False and norm_eval): each
    saves a ``num_batches_tracked`` beside its running statistics."""
    out = {}
    for key, tensor in layout.items():
        out[key] = tensor
        if key.endswith(".running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return out


def unfold_order(tensor: torch.Tensor) -> torch.Tensor:
    """The official PatchMerging's channels (x0..x3 concatenated) in mmdet's nn.Unfold order,
    as mmdet's swin2mmdet converter puts them."""
    flat = tensor.reshape(-1, tensor.shape[-1])
    out, channels = flat.shape[0], flat.shape[1] // 4
    unfolded = flat.reshape(out, 4, channels)[:, [0, 2, 1, 3], :].transpose(1, 2)
    return unfolded.reshape(tensor.shape).contiguous()


def mmdet_layout(state_dict: dict, config: DetectorConfig) -> dict:
    """A canonical state dict as mmdet 3.x saves it."""
    return as_saved({mmdet_name(k, config): v for k, v in state_dict.items()})


def as_saved(named: dict) -> dict:
    """Tensors under mmdet's names (None: not saved) as mmdet saves them: Swin's patch
    merging in nn.Unfold order, a step counter beside each batch norm's statistics."""
    return with_batch_norm_counters(
        {k: unfold_order(v) if re.search(r"\.downsample\.(reduction|norm)\.", k) else v
         for k, v in named.items() if k is not None})


def co_dino_name(key: str, config: DetectorConfig, label: str,
                 head: str = "query_head.") -> str | None:
    """Canonical key -> Co-DINO's (mmcv 1.x layer names under query_head.transformer), or
    with ``head`` another head's (mmdet 2.x's bbox_head.transformer)."""
    if key.startswith(("backbone.", "input_proj.")):
        return mmdet_name(key, config)
    t = f"{head}transformer."
    if m := re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.(.*)$", key):
        return f"{t}{m[1]}.layers.{m[2]}.{_MMCV[m[1]].get(m[3], m[3])}.{m[4]}"
    if m := re.match(r"^transformer\.decoder\.ref_point_head\.layers\.(\d)\.(.*)$", key):
        return f"{t}decoder.ref_point_head.{2 * int(m[1])}.{m[2]}"
    if (name := _head_name(key, config, head)) is not None:
        return name
    if key == "transformer.level_embed":
        return t + "level_embeds"
    if key.startswith("label_enc."):
        return f"query_head.{label}{key[len('label_enc'):]}"
    return t + key[len("transformer."):].replace("tgt_embed", "query_embed")


def mmdet2_layout(state_dict: dict, config: DetectorConfig) -> dict:
    """A canonical state dict as mmdet 2.x's Deformable DETR saves it: the transformer in
    the head (``bbox_head.transformer``, mmcv 1.x layer names), the learned queries
    ``bbox_head.query_embedding``."""
    def name(key: str) -> str | None:
        if key.startswith("query_embed."):
            return "bbox_head.query_embedding" + key[len("query_embed"):]
        return co_dino_name(key, config, "", head="bbox_head.")

    return as_saved({name(k): v for k, v in state_dict.items()})


def mmdet2_config_text(config: DetectorConfig) -> str:
    """deformable_detr_r50_16x2_50e_coco.py of mmdet 2.x (and its refine / two-stage
    variants) shrunk as record_mmdet_keys.py shrinks mmdet 3's, as mmcv's Config dumps it."""
    return f"""model = dict(
    type='DeformableDETR',
    backbone=dict(type='ResNet', depth=50, num_stages=4, out_indices=(1, 2, 3),
                  frozen_stages=1, norm_cfg=dict(type='BN', requires_grad=False),
                  norm_eval=True, style='pytorch', init_cfg=None),
    neck=dict(type='ChannelMapper', in_channels=[512, 1024, 2048], kernel_size=1,
              out_channels=256, act_cfg=None, norm_cfg=dict(type='GN', num_groups=32),
              num_outs=4),
    bbox_head=dict(
        type='DeformableDETRHead', num_query={config.num_queries}, num_classes=7,
        in_channels=2048, sync_cls_avg_factor=True, with_box_refine={config.box_refine},
        as_two_stage={config.two_stage},
        transformer=dict(
            type='DeformableDetrTransformer', two_stage_num_proposals={config.num_queries},
            encoder=dict(
                type='DetrTransformerEncoder', num_layers=2,
                transformerlayers=dict(
                    type='BaseTransformerLayer',
                    attn_cfgs=dict(type='MultiScaleDeformableAttention', embed_dims=256),
                    feedforward_channels=64, ffn_dropout=0.1,
                    operation_order=('self_attn', 'norm', 'ffn', 'norm'))),
            decoder=dict(
                type='DeformableDetrTransformerDecoder', num_layers=2,
                return_intermediate=True,
                transformerlayers=dict(
                    type='DetrTransformerDecoderLayer',
                    attn_cfgs=[dict(type='MultiheadAttention', embed_dims=256, num_heads=8,
                                    dropout=0.1),
                               dict(type='MultiScaleDeformableAttention', embed_dims=256)],
                    feedforward_channels=64, ffn_dropout=0.1,
                    operation_order=('self_attn', 'norm', 'cross_attn', 'norm', 'ffn',
                                     'norm')))),
        positional_encoding=dict(type='SinePositionalEncoding', num_feats=128,
                                 normalize=True, offset=-0.5),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(assigner=dict(type='HungarianAssigner',
                                 cls_cost=dict(type='FocalLossCost', weight=2.0),
                                 reg_cost=dict(type='BBoxL1Cost', weight=5.0,
                                               box_format='xywh'),
                                 iou_cost=dict(type='IoUCost', iou_mode='giou',
                                               weight=2.0))),
    test_cfg=dict(max_per_img=100))
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
"""


def co_dino_auxiliary(seed: int = 7) -> dict:
    """Co-DETR's training-only parts (co_dino_5scale_r50_1x_coco.py: RPN, one RoI head,
    one ATSS head, 2 co-heads), as CoDETR's state dict names them."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "query_head.downsample.0.weight": (256, 256, 3, 3), "query_head.downsample.0.bias": (256,),
        "query_head.downsample.1.weight": (256,), "query_head.downsample.1.bias": (256,),
        "rpn_head.rpn_conv.weight": (256, 256, 3, 3), "rpn_head.rpn_conv.bias": (256,),
        "rpn_head.rpn_cls.weight": (9, 256, 1, 1), "rpn_head.rpn_reg.weight": (36, 256, 1, 1),
        "roi_head.0.bbox_head.shared_fcs.0.weight": (1024, 12544),
        "roi_head.0.bbox_head.fc_cls.weight": (8, 1024),
        "roi_head.0.bbox_head.fc_reg.weight": (28, 1024),
        "bbox_head.0.cls_convs.0.conv.weight": (256, 256, 3, 3),
        "bbox_head.0.cls_convs.0.gn.weight": (256,), "bbox_head.0.atss_cls.weight": (7, 256, 3, 3),
        "bbox_head.0.atss_reg.weight": (4, 256, 3, 3), "bbox_head.0.scales.0.scale": (),
    }
    for i in range(2):
        shapes.update({f"query_head.transformer.aux_pos_trans.{i}.weight": (256, 512),
                       f"query_head.transformer.aux_pos_trans.{i}.bias": (256,),
                       f"query_head.transformer.aux_pos_trans_norm.{i}.weight": (256,),
                       f"query_head.transformer.aux_pos_trans_norm.{i}.bias": (256,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def co_dino_layout(state_dict: dict, config: DetectorConfig, *, mmdet3: bool = False,
                   auxiliary: bool = True) -> dict:
    """A canonical state dict as Co-DETR saves it, with its auxiliary heads (unless not
    ``auxiliary``): Sense-X's (mmdet 2.x) or mmdetection's projects/CO-DETR (label embedding
    in the dn generator)."""
    label = "dn_generator.label_embedding" if mmdet3 else "label_embedding"
    layout = as_saved({co_dino_name(k, config, label): v for k, v in state_dict.items()})
    return {**layout, **co_dino_auxiliary()} if auxiliary else layout


def canonical_model(config: DetectorConfig, seed: int = 0) -> torch.nn.Module:
    """A random canonical model mmdet could have saved: input projections without bias, and
    without box refinement one head for every layer (and for the proposals, two-stage)."""
    model = official_detr.perturb(build_detector(config), seed=seed)
    with torch.no_grad():
        for projection in model.input_proj:
            projection[0].bias.zero_()
        if not config.box_refine:
            classes, boxes = list(model.class_embed), list(model.bbox_embed)
            if config.two_stage:
                classes.append(model.transformer.enc_out_class_embed)
                boxes.append(model.transformer.enc_out_bbox_embed)
            for head in classes[1:]:
                head.load_state_dict(classes[0].state_dict())
            for head in boxes[1:]:
                head.load_state_dict(boxes[0].state_dict())
    return model.eval()


@functools.cache
def _random_canonical(name: str) -> dict:
    config = CO_DINO if name == "co_dino" else VARIANTS[name]
    return canonical_model(config).state_dict()


def config_text(name: str) -> str:
    return RECORDED[name]["cfg"]


CO_DINO_CONFIG = """model = dict(
    type='CoDETR',
    backbone=dict(type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                  frozen_stages=1, norm_cfg=dict(type='BN', requires_grad=False),
                  norm_eval=True, style='pytorch'),
    neck=dict(type='ChannelMapper', in_channels=[256, 512, 1024, 2048], kernel_size=1,
              out_channels=256, act_cfg=None, norm_cfg=dict(type='GN', num_groups=32),
              num_outs=5),
    query_head=dict(
        type='CoDINOHead', num_query=30, num_classes=7, num_feature_levels=5,
        in_channels=2048, sync_cls_avg_factor=True, as_two_stage=True,
        with_box_refine=True, mixed_selection=True,
        dn_cfg=dict(type='CdnQueryGenerator', noise_scale=dict(label=0.5, box=0.4),
                    group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=100)),
        transformer=dict(
            type='CoDinoTransformer', with_pos_coord=True, with_coord_feat=False,
            num_co_heads=2, num_feature_levels=5,
            encoder=dict(type='DetrTransformerEncoder', num_layers=2, with_cp=2,
                         transformerlayers=dict(
                             type='BaseTransformerLayer',
                             attn_cfgs=dict(type='MultiScaleDeformableAttention',
                                            embed_dims=256, num_levels=5, dropout=0.0),
                             feedforward_channels=64, ffn_dropout=0.0,
                             operation_order=('self_attn', 'norm', 'ffn', 'norm'))),
            decoder=dict(type='DinoTransformerDecoder', num_layers=2,
                         return_intermediate=True,
                         transformerlayers=dict(
                             type='DetrTransformerDecoderLayer',
                             attn_cfgs=[dict(type='MultiheadAttention', embed_dims=256,
                                             num_heads=8, dropout=0.0),
                                        dict(type='MultiScaleDeformableAttention',
                                             embed_dims=256, num_levels=5, dropout=0.0)],
                             feedforward_channels=64, ffn_dropout=0.0,
                             operation_order=('self_attn', 'norm', 'cross_attn', 'norm',
                                              'ffn', 'norm')))),
        positional_encoding=dict(type='SinePositionalEncoding', num_feats=128,
                                 temperature=20, normalize=True),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0,
                      loss_weight=1.0)),
    test_cfg=[dict(max_per_img=300, nms=dict(type='soft_nms', iou_threshold=0.8)),
              dict(rpn=dict(nms_pre=1000, max_per_img=1000,
                            nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
                   rcnn=dict(score_thr=0.0, nms=dict(type='nms', iou_threshold=0.5),
                             max_per_img=100)),
              dict(nms_pre=1000, min_bbox_size=0, score_thr=0.0,
                   nms=dict(type='nms', iou_threshold=0.6), max_per_img=100)])
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
"""

# --- the recorded layouts ---------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_mmdet_layout_is_the_recorded_one(name):
    with torch.device("meta"):
        model = build_detector(VARIANTS[name])
    layout = mmdet_layout(model.state_dict(), VARIANTS[name])
    assert {k: list(v.shape) for k, v in layout.items()} == RECORDED[name]["keys"]


@pytest.mark.parametrize("name", VARIANTS)
def test_the_recorded_config_text_and_the_shapes_give_the_config(name):
    """The config text mmengine saves is read as data; nothing is assumed."""
    with torch.device("meta"):
        layout = mmdet_layout(build_detector(VARIANTS[name]).state_dict(), VARIANTS[name])
    assert detect_format(layout).name == "mmdet"
    assert mmdet_format.derive_mmdet(layout, {"cfg": config_text(name)}) == (VARIANTS[name], [])


def test_the_improved_dino_position_embedding_comes_from_the_config():
    """dino-4scale_r50_improved: temperature 10000 and offset -0.5, which no weight shows."""
    with torch.device("meta"):
        layout = mmdet_layout(build_detector(VARIANTS["dino_4scale"]).state_dict(),
                              VARIANTS["dino_4scale"])
    saved = {"model": {"positional_encoding": {"num_feats": 128, "normalize": True,
                                               "offset": -0.5, "temperature": 10000},
                       "test_cfg": {"max_per_img": 300}}}
    config, notes = mmdet_format.derive_mmdet(layout, {"cfg": saved})
    assert (config.pos_temperature, config.pos_offset, notes) == (10000.0, -0.5, [])


def test_without_a_config_the_family_defaults_are_assumed_and_said():
    source = mmdet_layout(_random_canonical("dino_4scale"), VARIANTS["dino_4scale"])
    config, notes = mmdet_format.derive_mmdet(source, {})
    assert config == VARIANTS["dino_4scale"]
    assert [n.split(":")[0] for n in notes] == [
        "attention heads (mmcv's default)", "position embedding", "post-processing top-k"]
    source = mmdet_layout(_random_canonical("deformable_detr_refine"),
                          VARIANTS["deformable_detr_refine"])
    config, notes = mmdet_format.derive_mmdet(source, {})
    assert config == VARIANTS["deformable_detr_refine"]
    assert "box refinement: not in the saved config, on as the per-layer heads are separate" \
        in notes


# --- conversion ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_conversion_loads_strictly_and_gives_back_the_canonical_weights(name):
    canonical = _random_canonical(name)
    source = mmdet_layout(canonical, VARIANTS[name])
    converted, report = convert_state_dict(source, args={"cfg": config_text(name)})
    assert report.format == "mmdet" and report.ok, report.problem()
    assert report.config == VARIANTS[name]
    assert {k for k, _ in report.dropped} == {k for k in source if "num_batches_tracked" in k}
    assert sorted(k for k, _ in report.derived) == [
        f"input_proj.{i}.0.bias" for i in range(VARIANTS[name].num_feature_levels)]
    assert converted.keys() == canonical.keys()
    assert all(torch.equal(converted[k], canonical[k]) for k in canonical)


@pytest.mark.parametrize("mmdet3", [False, True], ids=["sense-x", "mmdet-projects"])
def test_co_dino_converts_its_query_head_and_drops_the_training_only_parts(mmdet3):
    canonical = _random_canonical("co_dino")
    source = co_dino_layout(canonical, CO_DINO, mmdet3=mmdet3)
    assert detect_format(source).name == "co_dino"
    converted, report = convert_state_dict(source, args={"config": CO_DINO_CONFIG})
    assert report.ok and report.config == CO_DINO and report.notes == [], report.problem()
    assert all(torch.equal(converted[k], canonical[k]) for k in canonical)
    dropped = dict(report.dropped)
    assert set(co_dino_auxiliary()) <= set(dropped)
    assert dropped["rpn_head.rpn_cls.weight"] == "Co-DETR auxiliary head (training only)"
    assert "positive-query projection" in dropped["query_head.transformer.aux_pos_trans.1.weight"]
    assert "auxiliary heads" in dropped["query_head.downsample.0.weight"]


def test_a_sense_x_lsj_model_says_that_it_leaves_padding_unmasked():
    """Sense-X's co_dino_5scale_lsj_r50_1x_coco.py sets with_attn_mask=False (read from its
    source; mmdet 2.x is not run here): said, as frozenseg masks a padded batch."""
    source = co_dino_layout(_random_canonical("co_dino"), CO_DINO)
    text = CO_DINO_CONFIG.replace("type='CoDETR',", "type='CoDETR', with_attn_mask=False,")
    _, report = convert_state_dict(source, args={"config": text})
    assert report.ok and report.config == CO_DINO
    assert report.notes == [mmdet_format.UNMASKED_LSJ]


def test_mmdet_dino_adds_the_head_reference_at_its_own_clamp():
    """DeformableDETRHead adds inverse_sigmoid(reference) at eps 1e-5; DINO's head at 1e-3."""
    delta, reference = torch.zeros(1, 1, 4), torch.full((1, 1, 4), 1e-4)
    boxes = {eps: DeformableDETR._box(SimpleNamespace(config=dataclasses.replace(
                VARIANTS["dino_4scale"], head_inverse_sigmoid_eps=eps)), delta, reference)
             for eps in (1e-5, None)}
    torch.testing.assert_close(boxes[1e-5], reference)
    torch.testing.assert_close(boxes[None], torch.full((1, 1, 4), 1e-3))


def test_another_backbone_is_refused_by_name():
    source = mmdet_layout(_random_canonical("dino_4scale"), VARIANTS["dino_4scale"])
    other = {k: v for k, v in source.items() if not k.startswith("backbone.")}
    other["backbone.stem.0.conv.weight"] = torch.zeros(32, 3, 3, 3)
    with pytest.raises(ValueError, match="only ResNet and Swin"):
        convert_state_dict(other)


def test_mmdet_patch_merging_order_is_undone():
    weight = torch.randn(8, 16)
    torch.testing.assert_close(mmdet_format.official_merging_order(unfold_order(weight)), weight)
    assert not torch.equal(unfold_order(weight), weight)


@pytest.mark.parametrize("path, value", [
    ("backbone", {"style": "caffe"}),
    ("data_preprocessor", {"bgr_to_rgb": False}),
    ("positional_encoding", {"normalize": False}),
])
def test_config_entries_frozenseg_does_not_reproduce_are_refused(path, value):
    source = mmdet_layout(_random_canonical("dino_4scale"), VARIANTS["dino_4scale"])
    with pytest.raises(ValueError, match="not supported"):
        convert_state_dict(source, args={"cfg": {"model": {path: value}}})


def test_the_config_text_is_read_as_data_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = f"import os\nos.system('touch {marker}')\nmodel = dict(test_cfg=dict(max_per_img=7))\n"
    parsed = mmdet_format.parse_config_text(text)
    assert parsed["model"] == {"test_cfg": {"max_per_img": 7}} and not marker.exists()
    assert mmdet_format.parse_config_text("model = dict(") == {}


# --- files as mmengine and mmcv write them -----------------------------------------------------


def test_an_mmengine_checkpoint_carries_its_class_names(tmp_path):
    """CheckpointHook's file (message hub, optimizer, schedulers) loads safely; its config
    text leaves nothing assumed and dataset_meta names the classes (the corpus checks the
    outputs, tests/test_checkpoint_corpus.py)."""
    from artifacts import mmdet_checkpoint

    _, report = inspect_checkpoint(mmdet_checkpoint(tmp_path, "dino_4scale").path)
    assert report.ok and report.format == "mmdet" and report.notes == []
    assert report.config == VARIANTS["dino_4scale"] and report.class_names == list(CLASSES)


def test_mmengine_ema_the_average_is_taken_and_the_trained_weights_on_request(tmp_path):
    """EMAHook swaps before saving: 'state_dict' is the average, 'ema_state_dict' the trained
    weights ('module.' keys and 'steps')."""
    from artifacts import mmdet_checkpoint

    path = mmdet_checkpoint(tmp_path, "deformable_detr_refine", hook=False, ema=True).path
    _, report = inspect_checkpoint(path)
    assert report.notes[0] == ("weights from ckpt['state_dict']; the file also holds "
                               "ckpt['ema_state_dict'] (--weights model takes it)")
    state_dict, report = inspect_checkpoint(path, weights="model")
    assert report.ok and report.notes[0].startswith("weights from ckpt['ema_state_dict']")
    trained = torch.load(path, weights_only=False)["ema_state_dict"]
    assert torch.equal(state_dict["transformer.level_embed"], trained["module.level_embed"])
    assert torch.equal(state_dict["class_embed.1.weight"],
                       trained["module.bbox_head.cls_branches.1.weight"])


# --- side by side with mmdetection itself -------------------------------------------------------


def _mmdet_model(name: str):
    """mmdet's own model of a recorded variant, with random weights moved off their init."""
    pytest.importorskip("mmdet.registry")
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from record_mmdet_keys import PLAIN_VARIANTS, VARIANTS, small_config

    register_all_modules()
    cfg = small_config(*{**VARIANTS, **PLAIN_VARIANTS}[name])
    return moved_off_init(MODELS.build(copy.deepcopy(cfg.model))), cfg


def moved_off_init(model):
    """mmdet's ``model`` after its init_weights (some parameters are torch.Tensor(n, c) until
    then: garbage), with N(0, 0.05) noise on every weight and running variances in
    [0.5, 1.5), so that no two heads or layers are alike."""
    model.init_weights()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.05)
    return model.eval()


def _mmdet_outputs(model, images, image_sizes):
    """The last decoder layer's logits and boxes as mmdet's DINO / Deformable DETR computes
    them (backbone, neck, transformer, head), for a padded batch of images."""
    from mmdet.structures import DetDataSample

    samples = []
    for size in image_sizes:
        sample = DetDataSample()
        sample.set_metainfo({"batch_input_shape": tuple(images.shape[-2:]), "img_shape": size})
        samples.append(sample)
    with torch.no_grad():
        head_inputs = model.forward_transformer(model.extract_feat(images), samples)
        logits, boxes = model.bbox_head(head_inputs["hidden_states"], head_inputs["references"])
    return logits[-1], boxes[-1]


@pytest.mark.parametrize("name", VARIANTS)
def test_side_by_side_with_mmdetection(name):
    model, cfg = _mmdet_model(name)
    converted, report = convert_state_dict(model.state_dict(), args={"cfg": cfg.pretty_text})
    assert report.ok and report.config == VARIANTS[name], report.problem()
    ours = official_detr.load_converted(report.config, converted)
    images, padding = official_detr.images_and_padding()
    sizes = [tuple((~p).any(1).sum().item() for p in (m, m.T)) for m in padding]
    with torch.no_grad():
        out = ours(images, padding)
        same_size = ours(images, torch.zeros_like(padding))
    for got, size_list in ((out, sizes), (same_size, [tuple(images.shape[-2:])] * 2)):
        logits, boxes = _mmdet_outputs(model, images, size_list)
        torch.testing.assert_close(got.logits[-1], logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.boxes[-1], boxes, atol=1e-4, rtol=0)


# --- mmdet's DETR, Conditional DETR and DAB-DETR (the plain-attention DETRs) --------------------

# record_mmdet_keys.py's builds of mmdet's shipped configs: ResNet-50, 2 + 2 layers, FFN 64,
# 30 queries, 7 classes; DETR and Conditional DETR keep 100 detections, DAB-DETR 300.
PLAIN_COMMON = dict(backbone={"name": "resnet50"}, hidden_dim=256, nheads=8, enc_layers=2,
                    dec_layers=2, dim_feedforward=64, num_queries=30, num_classes=7,
                    encoder="plain", backbone_levels=(3,), num_feature_levels=1,
                    decoder_norm=True, pos_offset=0.0)
DAB = dict(variant="dab_detr", decoder="anchor", box_refine=True, encoder_pos_scale=True,
           activation="prelu", pos_temperature=20.0, num_select=300,
           head_inverse_sigmoid_eps=1e-3, **PLAIN_COMMON)
PLAIN = {
    "detr": DetectorConfig(variant="detr", decoder="plain", no_object_class=True,
                           pos_temperature=10000.0, num_select=100, **PLAIN_COMMON),
    "conditional_detr": DetectorConfig(variant="conditional_detr", decoder="conditional",
                                       pos_temperature=10000.0, num_select=100,
                                       **PLAIN_COMMON),
    "dab_detr": DetectorConfig(**DAB),
    "dab_detr_patterns": DetectorConfig(**DAB, num_patterns=3),
}


def _recorded_outputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet 3.3.0's last-layer logits and boxes for the seeded weights (the recorder's)."""
    outputs = RECORDED[name]["outputs"]
    return torch.tensor(outputs["logits"]), torch.tensor(outputs["boxes"])


def _plain_outputs(config: DetectorConfig, state_dict: dict):
    from record_mmdet_keys import plain_inputs

    model = official_detr.load_converted(config, state_dict)
    images, padding = plain_inputs()
    with torch.no_grad():
        out = model(images, padding)
    return out.logits[-1], out.boxes[-1]


@pytest.mark.parametrize("name", PLAIN)
def test_an_mmengine_file_of_a_plain_detr_gives_mmdetections_outputs(name, tmp_path):
    """CheckpointHook's file, converted as ``frozenseg convert`` does, gives the logits and
    boxes mmdet itself computed from the same weights on a padded batch (recorded)."""
    from artifacts import mmdet_recorded_checkpoint

    state_dict, report = inspect_checkpoint(mmdet_recorded_checkpoint(tmp_path, name))
    assert report.ok and report.format == "mmdet_detr", report.problem()
    assert report.config == PLAIN[name] and report.notes == []
    assert report.class_names == list(CLASSES)
    assert all("num_batches_tracked" in k for k, _ in report.dropped)
    logits, boxes = _plain_outputs(report.config, state_dict)
    expected_logits, expected_boxes = _recorded_outputs(name)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, expected_boxes, atol=1e-4, rtol=0)


def test_a_wrong_norm_mapping_loads_but_misses_the_recorded_outputs():
    """A decoder layer's norms swapped (norms.0 follows self-attention, norms.1
    cross-attention): every key and shape still fits, only the outputs tell."""
    from record_mmdet_keys import seeded_weights

    weights = seeded_weights(RECORDED["conditional_detr"]["keys"])
    for part in ("weight", "bias"):
        first, second = (f"decoder.layers.1.norms.{i}.{part}" for i in (0, 1))
        weights[first], weights[second] = weights[second], weights[first]
    converted, report = convert_state_dict(weights, args={"cfg": config_text("conditional_detr")})
    assert report.ok
    logits, _ = _plain_outputs(report.config, converted)
    assert (logits - _recorded_outputs("conditional_detr")[0]).abs().max() > 1e-2


def test_dab_detrs_head_adds_its_anchors_at_its_own_clamp():
    """The recorded anchors at the left edge: their boxes need the head's eps 1e-3."""
    from record_mmdet_keys import seeded_weights

    converted, report = convert_state_dict(seeded_weights(RECORDED["dab_detr"]["keys"]),
                                           args={"cfg": config_text("dab_detr")})
    config = dataclasses.replace(report.config, head_inverse_sigmoid_eps=None)
    _, boxes = _plain_outputs(config, converted)
    _, expected = _recorded_outputs("dab_detr")
    assert (boxes[:, :4, 0] - expected[:, :4, 0]).abs().min() > 1e-4
    torch.testing.assert_close(boxes[:, 4:], expected[:, 4:], atol=1e-4, rtol=0)


def test_the_classifier_comes_from_the_saved_loss():
    """A DETR head trained with a sigmoid loss has no "no object" logit: its 8 outputs are
    8 classes; without a config each family's own classifier is assumed, and said."""
    from record_mmdet_keys import seeded_weights

    weights = seeded_weights(RECORDED["detr"]["keys"])
    saved = {"model": {"bbox_head": {"loss_cls": {"type": "FocalLoss"}, "num_classes": 8}}}
    config, _ = mmdet_detr.derive_config(weights, {"cfg": saved})
    assert (config.no_object_class, config.num_classes) == (False, 8)
    config, notes = mmdet_detr.derive_config(weights, {})
    assert config == PLAIN["detr"]
    assert [n.split(":")[0] for n in notes] == [
        "classifier", "attention heads", "encoder FFN activation", "decoder FFN activation",
        "position embedding", "post-processing top-k"]


def _without(weights: dict, prefix: str) -> dict:
    return {k: v for k, v in weights.items() if not k.startswith(prefix)}


# (variant, change to the config text, change to the weights, what the one line says)
REFUSED = {
    "dc5": ("detr", ("style='pytorch'", "style='pytorch', strides=(1, 2, 2, 1)"), None,
            "backbone.strides=(1, 2, 2, 1) is not supported"),
    "unnormalised-position": ("detr", ("normalize=True", "normalize=False"), None,
                              "positional_encoding.normalize False"),
    "classes-disagree": ("detr", ("use_sigmoid=False", "use_sigmoid=True"), None,
                         "fc_cls has 8 outputs, not the config's num_classes=7"),
    "gelu": ("dab_detr", ("type='PReLU'", "type='GELU'"), None,
             "encoder FFN activation 'GELU' is not supported"),
    "query-dim-2": ("dab_detr", None,
                    lambda w: {**w, "query_embedding.weight": torch.zeros(30, 2)},
                    "decoder query_dim=2 is not supported"),
    "fix-elewise": ("dab_detr", None,
                    lambda w: {**_without(w, "decoder.query_scale."),
                               "decoder.query_scale.weight": torch.zeros(2, 256)},
                    "decoder query_scale_type='fix_elewise' is not supported"),
    "normed-neck": ("conditional_detr", None,
                    lambda w: {**w, "neck.convs.0.gn.weight": torch.ones(256)},
                    "this neck or backbone differs"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_frozenseg_does_not_compute_is_refused_in_one_line_naming_the_file(case, tmp_path):
    from artifacts import mmdet_recorded_checkpoint
    from record_mmdet_keys import seeded_weights

    from frozenseg.convert import ConversionError

    name, text_change, weights_change, says = REFUSED[case]
    cfg = config_text(name)
    if text_change is not None:
        assert text_change[0] in cfg
        cfg = cfg.replace(*text_change)
    weights = seeded_weights(RECORDED[name]["keys"])
    weights = weights if weights_change is None else weights_change(weights)
    path = mmdet_recorded_checkpoint(tmp_path, name, cfg=cfg, state_dict=weights)
    with pytest.raises(ConversionError) as error:
        inspect_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and str(path.name) in message and says in message, message


@pytest.mark.parametrize("name", PLAIN)
def test_plain_detrs_side_by_side_with_mmdetection(name):
    """mmdet's own model (its init, then noise on every weight), padded and same-size."""
    from record_mmdet_keys import run_plain

    assert_side_by_side(*_mmdet_model(name), PLAIN[name], run_plain)


def assert_side_by_side(model, cfg, expected: DetectorConfig, run) -> None:
    """mmdet's ``model`` (built from ``cfg``), converted, gives ``expected`` as its config
    and the last layer's logits and boxes ``run(model, images, padding)`` gives, on a padded
    batch and on the same images taken as one size."""
    from record_mmdet_keys import plain_inputs

    converted, report = convert_state_dict(model.state_dict(), args={"cfg": cfg.pretty_text})
    assert report.ok and report.config == expected, report.problem()
    ours = official_detr.load_converted(report.config, converted)
    images, padding = plain_inputs()
    for mask in (padding, torch.zeros_like(padding)):
        with torch.no_grad():
            got = ours(images, mask)
        logits, boxes = run(model, images, mask)
        torch.testing.assert_close(got.logits[-1], logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.boxes[-1], boxes, atol=1e-4, rtol=0)


# --- mmdet 2.x Deformable DETR (mmcv 1.x's save_checkpoint) -----------------------------------

DEFORMABLE_VARIANTS = [n for n in VARIANTS if n.startswith("deformable_detr")]


@pytest.mark.parametrize("name", DEFORMABLE_VARIANTS)
def test_an_mmdet2_deformable_detr_file_reproduces_its_model(name, tmp_path):
    """mmcv 1.x's file ({meta: {config text, CLASSES}, state_dict, optimizer}) converts, with
    nothing assumed, to the model it was written from: the canonical Deformable DETR, which
    computes mmdet 3's (side by side above) and so mmdet 2's, the same transformer."""
    from artifacts import mmdet2_checkpoint
    from official_detr import images_and_padding

    artifact = mmdet2_checkpoint(tmp_path, name)
    state_dict, report = inspect_checkpoint(artifact.path)
    assert report.ok and report.format == "mmdet2", report.problem()
    assert report.config == VARIANTS[name] and report.notes == []
    assert report.class_names == list(CLASSES)
    model = official_detr.load_converted(report.config, state_dict)
    images, padding = images_and_padding()
    with torch.no_grad():
        got = model(images, padding)
    logits, boxes = artifact.reference(images, padding)
    torch.testing.assert_close(got.logits[-1], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.boxes[-1], boxes, atol=1e-5, rtol=0)


def test_mmdet2s_layer_names_are_mmcvs():
    """The encoder and decoder layers as mmcv's BaseTransformerLayer names them, built with
    mmdet 2.x Deformable DETR's layer configs (mmcv 2 kept the class)."""
    pytest.importorskip("mmcv.ops")
    from mmcv.cnn.bricks.transformer import BaseTransformerLayer

    config = VARIANTS["deformable_detr_refine"]
    with torch.device("meta"):
        layout = mmdet2_layout(build_detector(config).state_dict(), config)
    text = mmdet_format.parse_config_text(mmdet2_config_text(config))
    coders = text["model"]["bbox_head"]["transformer"]
    for coder in ("encoder", "decoder"):
        settings = {k: v for k, v in coders[coder]["transformerlayers"].items() if k != "type"}
        layer = BaseTransformerLayer(**settings)
        prefix = f"bbox_head.transformer.{coder}.layers.1."
        ours = {k[len(prefix):]: list(v.shape) for k, v in layout.items() if k.startswith(prefix)}
        assert ours == {k: list(v.shape) for k, v in layer.state_dict().items()}


# --- mmdetection 3.x's Co-DINO (projects/CO-DETR): recorded, and side by side -------------------


def _recorded_co_dino(name: str) -> tuple[dict, dict, dict]:
    """The recorded variant's seeded weights, converted, and the report's dropped keys."""
    from record_mmdet_keys import seeded_weights

    weights = seeded_weights(RECORDED[name]["keys"])
    converted, report = convert_state_dict(weights, args={"cfg": config_text(name)})
    assert report.ok and report.format == "co_dino", report.problem()
    return weights, converted, dict(report.dropped)


@pytest.mark.parametrize("name", CO_DINO_RECORDED)
def test_co_dinos_query_head_is_laid_out_as_projects_co_detr_builds_it(name):
    """The query head written from Co-DETR's source is the one mmdet 3.3 built from
    projects/CO-DETR (recorded); every other recorded key is a training-only part or a
    batch-norm counter, dropped with its reason."""
    config = CO_DINO_RECORDED[name]
    with torch.device("meta"):
        layout = co_dino_layout(build_detector(config).state_dict(), config, mmdet3=True,
                                auxiliary=False)
    _, _, dropped = _recorded_co_dino(name)
    recorded = RECORDED[name]["keys"]
    assert {k: s for k, s in recorded.items() if k not in dropped} == {
        k: list(v.shape) for k, v in layout.items() if "num_batches_tracked" not in k}
    training_only = {k for k, why in dropped.items() if "Co-DETR" in why}
    assert {k.split(".")[0] for k in training_only} == {"rpn_head", "roi_head", "bbox_head",
                                                          "query_head"}
    assert set(dropped) - training_only == {k for k in recorded if "num_batches_tracked" in k}


@pytest.mark.parametrize("name", CO_DINO_RECORDED)
def test_an_mmengine_file_of_co_dino_gives_mmdetections_outputs(name, tmp_path):
    """CheckpointHook's file of projects/CO-DETR's Co-DINO, converted as ``frozenseg
    convert`` does, gives the query head's last-layer logits and boxes that mmdet's own
    CoDETR.predict computed from the same weights on a padded batch (recorded)."""
    from artifacts import mmdet_recorded_checkpoint

    state_dict, report = inspect_checkpoint(mmdet_recorded_checkpoint(tmp_path, name))
    assert report.ok and report.format == "co_dino", report.problem()
    assert report.config == CO_DINO_RECORDED[name] and report.notes == []
    assert report.class_names == list(CLASSES)
    logits, boxes = _plain_outputs(report.config, state_dict)
    expected_logits, expected_boxes = _recorded_outputs(name)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, expected_boxes, atol=1e-4, rtol=0)


def _swap_decoder_norms(weights: dict) -> dict:
    """norms.0 (after self-attention) and norms.1 (after cross-attention) of decoder layer 1."""
    prefix = "query_head.transformer.decoder.layers.1.norms"
    out = dict(weights)
    for part in ("weight", "bias"):
        out[f"{prefix}.0.{part}"], out[f"{prefix}.1.{part}"] = (weights[f"{prefix}.1.{part}"],
                                                                weights[f"{prefix}.0.{part}"])
    return out


# (change to the weights, change to the converted config): each still loads strictly
CO_DINO_MISTAKES = {
    "decoder-norms-swapped": (_swap_decoder_norms, {}),
    # mmdet's LSJ config asks for use_lsj=True, yet its predict masks the padding
    "padding-unmasked": (None, {"mask_padding": False}),
}


@pytest.mark.parametrize("mistake", CO_DINO_MISTAKES)
def test_a_wrong_co_dino_mapping_loads_but_misses_the_recorded_outputs(mistake):
    from record_mmdet_keys import seeded_weights

    change_weights, change_config = CO_DINO_MISTAKES[mistake]
    weights = seeded_weights(RECORDED["co_dino"]["keys"])
    weights = weights if change_weights is None else change_weights(weights)
    converted, report = convert_state_dict(weights, args={"cfg": config_text("co_dino")})
    assert report.ok
    logits, boxes = _plain_outputs(dataclasses.replace(report.config, **change_config),
                                   converted)
    expected_logits, expected_boxes = _recorded_outputs("co_dino")
    worst = max((logits - expected_logits).abs().max(), (boxes - expected_boxes).abs().max())
    assert worst > 1e-2


def mmdet_co_dino(name: str):
    """mmdet's own Co-DINO of a recorded variant (projects/CO-DETR from third_party/), moved
    off its init (drawn from a seed of its own), and its config."""
    pytest.importorskip("mmdet.registry")
    record_co_dino = pytest.importorskip("record_co_dino")
    if not record_co_dino.available():
        pytest.skip("third_party/mmdetection-projects holds no projects/CO-DETR")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, cfg = record_co_dino.build(name)
        # CoDINOHead.init_weights (DeformableDETRHead's) never calls its transformer's, so
        # level_embeds stays torch.Tensor(n, c): uninitialised memory, at times NaN
        model.query_head.transformer.init_weights()
        return moved_off_init(model), cfg


@pytest.mark.parametrize("name", CO_DINO_RECORDED)
def test_co_dino_side_by_side_with_mmdetection(name):
    """mmdet's own Co-DINO (its init, then noise on every weight), padded and same-size."""
    from record_co_dino import run_co_dino

    assert_side_by_side(*mmdet_co_dino(name), CO_DINO_RECORDED[name], run_co_dino)
