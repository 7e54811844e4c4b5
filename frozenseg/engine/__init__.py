"""Training, evaluation and export: the loop, COCO AP, results files."""

from frozenseg.engine.evaluate import (
    coco_evaluate,
    metrics_table,
    per_class_table,
    write_metrics,
)
from frozenseg.engine.results import ResultsWriter, encode_masks, image_predictions

__all__ = [
    "ResultsWriter",
    "coco_evaluate",
    "encode_masks",
    "image_predictions",
    "metrics_table",
    "per_class_table",
    "write_metrics",
]
