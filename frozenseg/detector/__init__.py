"""The frozen DETR-family detector: one canonical deformable DETR and its variants."""
