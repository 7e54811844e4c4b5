"""Datasets, transforms and batching."""

from frozenseg.data.coco import CocoInstances
from frozenseg.data.collate import collate

# The function frozenseg.synth is not re-exported here: as frozenseg.data.synth it would
# shadow the module of that name (and break `import frozenseg.data.synth as ...`).
from frozenseg.data.synth import SynthError, SynthSummary
from frozenseg.data.transforms import (
    apply_view,
    deformable_detr_train,
    evaluation,
    large_scale_jitter,
)

__all__ = [
    "CocoInstances",
    "SynthError",
    "SynthSummary",
    "apply_view",
    "collate",
    "deformable_detr_train",
    "evaluation",
    "large_scale_jitter",
]
