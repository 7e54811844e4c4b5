"""frozenseg: instance segmentation from a frozen DETR-family detector."""

__version__ = "0.1.0"
