"""Backbones: each returns the four stage maps at strides 4, 8, 16 and 32.

A backbone module has a ``channels`` list (the four stage widths) and
``forward(images, stages=4) -> list[Tensor]`` (the first ``stages`` maps: training
from the feature cache recomputes only stage 1). ``BUILDERS`` maps a config's backbone name to
its builder; the config's other backbone entries are the builder's arguments.

``vit_projector`` (LW-DETR, RF-DETR) returns C1 (stride 4) and then the projector's
levels instead of stages; it also has ``strides``, the levels' strides. ``dinov3_sta``
(DEIMv2 S-X) returns its adapter's stride-4 map, then three levels at strides 8, 16, 32.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from frozenseg.detector.backbones.focalnet import build_focalnet
from frozenseg.detector.backbones.hgnetv2 import HGNetV2
from frozenseg.detector.backbones.resnet import ResNet
from frozenseg.detector.backbones.resnet_vd import ResNetVd
from frozenseg.detector.backbones.sta import build_dinov3_sta
from frozenseg.detector.backbones.swin import build_swin
from frozenseg.detector.backbones.vit import build_vit_projector

# Swin and FocalNet take the keyword arguments their ``*_config_from_state_dict`` derive.
BUILDERS = {
    "resnet50": lambda: ResNet(depth=50),
    "resnet101": lambda: ResNet(depth=101),
    "resnet_vd": ResNetVd,  # RT-DETR's PResNet: block, depths, widths, stem
    "hgnetv2": HGNetV2,  # D-FINE's and DEIM's: stem and per-stage widths, blocks, kernels
    "swin": build_swin,
    "focalnet": build_focalnet,
    # LW-DETR / RF-DETR: a windowed ViT and the multi-scale projector (its levels, not stages)
    "vit_projector": build_vit_projector,
    # DEIMv2 S-X: DINOv3's ViT beside the spatial tuning adapter (``sta.py``)
    "dinov3_sta": build_dinov3_sta,
}


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    spec = dict(spec)
    name = spec.pop("name")
    if name not in BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](**spec)
