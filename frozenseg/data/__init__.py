"""Datasets, transforms and batching."""

from frozenseg.data.coco import CocoInstances
from frozenseg.data.collate import collate
from frozenseg.data.folder import ImageFolder
from frozenseg.data.panoptic import CocoPanoptic, panoptic_to_semantic, rgb_to_id
from frozenseg.data.semantic import (
    SemanticCategories,
    SemanticSegmentation,
    read_semantic_categories,
)

# The function frozenseg.synth is not re-exported here: as frozenseg.data.synth it would
# shadow the module of that name (and break `import frozenseg.data.synth as ...`).
from frozenseg.data.synth import SynthError, SynthSummary
from frozenseg.data.transforms import (
    apply_view,
    deformable_detr_train,
    evaluation,
    large_scale_jitter,
    scale_flip,
)

__all__ = [
    "CocoInstances",
    "CocoPanoptic",
    "ImageFolder",
    "SemanticCategories",
    "SemanticSegmentation",
    "SynthError",
    "SynthSummary",
    "apply_view",
    "collate",
    "deformable_detr_train",
    "evaluation",
    "large_scale_jitter",
    "panoptic_to_semantic",
    "read_semantic_categories",
    "rgb_to_id",
    "scale_flip",
]
