"""frozenseg: instance segmentation from a frozen DETR-family detector."""

__version__ = "0.1.0"

# The public API, imported on first use so that `import frozenseg` (and the CLI's
# --help) stays light.
_API = {
    "convert_checkpoint": "frozenseg.convert",
    "load_detector": "frozenseg.detector.frozen",
    "synth": "frozenseg.data.synth",
    "load_recipe": "frozenseg.recipe",
    "build_mask_head": "frozenseg.head.network",
    "load_trained": "frozenseg.head.trained",
    "export_results": "frozenseg.head.export",
    "MaskFrozenDETR": "frozenseg.head.segmenter",
    "Predictor": "frozenseg.head.predictor",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'frozenseg' has no attribute {name!r}")
