"""Record mmdetection's key layout for the small models test_convert_mmdet.py converts.

Run with mmdetection 3.x, mmengine and mmcv importable (mmcv's compiled ops are not needed:
the models are only built): ``python tests/record_mmdet_keys.py``. Writes
``tests/data/mmdet_keys.json``: per variant, the config text mmengine saves in a checkpoint's
meta (``cfg.pretty_text``) and every state-dict key with its shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import mmdet
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

CONFIGS = Path(mmdet.__file__).parent / ".mim" / "configs"
# variant -> (config file, overrides of the model's top level)
VARIANTS = {
    "dino_4scale": ("dino/dino-4scale_r50_8xb2-12e_coco.py", {}),
    "deformable_detr": ("deformable_detr/deformable-detr_r50_16xb2-50e_coco.py", {}),
    "deformable_detr_refine": ("deformable_detr/deformable-detr-refine_r50_16xb2-50e_coco.py", {}),
    "deformable_detr_refine_two_stage": (
        "deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py", {}),
    "dino_5scale_swin": ("dino/dino-5scale_swin-l_8xb2-12e_coco.py", {}),
    "deformable_detr_two_stage": (
        "deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py",
        {"with_box_refine": False}),
}


def small_config(path: str, overrides: dict) -> Config:
    """The shipped config shrunk: 2 + 2 layers, FFN 64, 30 queries, 7 classes (and a
    narrow Swin)."""
    cfg = Config.fromfile(CONFIGS / path)
    model = cfg.model
    model.backbone.init_cfg = None
    for coder in (model.encoder, model.decoder):
        coder.num_layers = 2
        coder.layer_cfg.ffn_cfg.feedforward_channels = 64
    model.num_queries = 30
    model.bbox_head.num_classes = 7
    if model.backbone.type == "SwinTransformer":  # Swin-L's layout, 32 wide, 5 blocks
        model.backbone.update(embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                              window_size=7, with_cp=False)
        model.neck.in_channels = [32, 64, 128, 256]
    model.update(overrides)
    return cfg


def main() -> None:
    register_all_modules()
    recorded = {}
    for name, (path, overrides) in VARIANTS.items():
        cfg = small_config(path, overrides)
        model = MODELS.build(cfg.model)
        recorded[name] = {"mmdet": mmdet.__version__, "cfg": cfg.pretty_text,
                          "keys": {k: list(v.shape) for k, v in model.state_dict().items()}}
    out = Path(__file__).parent / "data" / "mmdet_keys.json"
    out.write_text(json.dumps(recorded, indent=1) + "\n")


if __name__ == "__main__":
    main()
