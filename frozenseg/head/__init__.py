"""The Mask Frozen-DETR head: a light mask network on a frozen detector's outputs."""

from frozenseg.head.network import (
    HeadOutput,
    MaskHead,
    TrainingFreeHead,
    build_mask_head,
    count_parameters,
    estimate_flops,
)
from frozenseg.head.scoring import mask_confidence
from frozenseg.recipe.head import HeadConfig

__all__ = [
    "HeadConfig", "HeadOutput", "MaskHead", "TrainingFreeHead", "build_mask_head",
    "count_parameters", "estimate_flops", "mask_confidence",
]
