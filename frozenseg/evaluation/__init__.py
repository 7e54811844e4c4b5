"""Evaluation shared by every mode: COCO box and mask AP, panoptic quality and mIoU, and
the COCO results files they read."""
