"""Record mmdetection 3.x's Co-DINO (``projects/CO-DETR``): key layouts, config text and the
query head's outputs on seeded weights, for test_convert_mmdet.py.

``projects/`` is not part of the mmdet wheel: it is read from
``third_party/mmdetection-projects/projects/CO-DETR`` (git-ignored; exported from the
mmdetection repository). Run with mmdetection 3.x, mmengine and mmcv importable (on the CPU
mmcv's deformable attention runs its PyTorch path; no compiled op is needed), from the
repository root: ``PYTHONPATH=.:tests python tests/record_co_dino.py``. It updates the
``co_dino*`` entries of ``tests/data/mmdet_keys.json`` (``record_mmdet_keys.py`` records them
with the rest): per variant the config text mmengine saves (``cfg.pretty_text``), every
state-dict key with its shape (the auxiliary RPN, RoI and ATSS heads included), and
``outputs``: the last decoder layer's logits and boxes that mmdet's own ``CoDETR.predict``
path computes with :func:`record_mmdet_keys.seeded_weights` on
:func:`record_mmdet_keys.plain_inputs` (a padded batch).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = ROOT / "third_party" / "mmdetection-projects"
CONFIGS = PROJECTS / "projects" / "CO-DETR" / "configs" / "codino"
LSJ_CONFIG = "co_dino_5scale_r50_lsj_8xb2_1x_coco.py"
# co_dino_5scale_swin_l_lsj_16xb1_1x_coco.py's backbone, 32 wide with 5 blocks (as the
# recorded mmdet DINO Swin), and its neck.
SMALL_SWIN = dict(type="SwinTransformer", embed_dims=32, depths=[1, 1, 2, 1],
                  num_heads=[1, 2, 4, 8], window_size=7, mlp_ratio=4, qkv_bias=True,
                  qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.3,
                  patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False,
                  convert_weights=True)
# variant -> overrides of the model's top level. The LSJ config's use_lsj=True is meant to
# drop the padding mask at test time, but CoDETR.predict sets img_shape on a copy of each
# sample's metainfo, so mmdet 3 masks the padding all the same: the outputs recorded on a
# padded batch are what frozenseg's masked model computes.
VARIANTS = {
    "co_dino": {},
    "co_dino_swin": {"backbone": SMALL_SWIN, "neck": {"in_channels": [32, 64, 128, 256]}},
}


def available() -> bool:
    return (CONFIGS / LSJ_CONFIG).is_file()


def small_config(overrides: dict):
    """The shipped LSJ config (its dataset base, absent from the wheel, left out) shrunk as
    record_mmdet_keys.py shrinks mmdet's: 2 + 2 layers, FFN 64, 30 queries, 7 classes; the
    auxiliary heads kept (their keys are in every Co-DINO file)."""
    from mmengine.config import Config

    if str(PROJECTS) not in sys.path:  # custom_imports: projects.CO-DETR.codetr
        sys.path.insert(0, str(PROJECTS))
    text = (CONFIGS / LSJ_CONFIG).read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("_base_"))
    cfg = Config.fromstring(text, ".py")
    model = cfg.model
    model.backbone.init_cfg = None
    transformer = model.query_head.transformer
    for coder in (transformer.encoder, transformer.decoder):
        coder.num_layers = 2
        coder.transformerlayers.feedforward_channels = 64
    transformer.encoder.with_cp = 0
    model.query_head.update(num_query=30, num_classes=7)
    model.roi_head[0].bbox_head.num_classes = 7
    model.bbox_head[0].num_classes = 7
    _override(model, overrides)
    return cfg


def _override(model, overrides: dict) -> None:
    for key, value in overrides.items():
        if key == "backbone":
            model.backbone = value
        elif isinstance(value, dict):
            model[key].update(value)
        else:
            model[key] = value


def run_co_dino(model, images: torch.Tensor, padding: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet's ``CoDETR.predict`` on normalised ``images`` (B, 3, H, W) whose ``padding``
    (B, H, W) is True below and right of each image (each sample's ``img_shape``): the
    query head's last-layer logits (B, Q, K) and boxes (B, Q, 4, normalised cxcywh), taken
    where its post-processing starts (``predict_by_feat``; its soft-NMS needs mmcv's
    compiled op)."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    captured = {}

    def capture(all_cls_scores, all_bbox_preds, *rest, batch_img_metas, rescale=True):
        captured["logits"], captured["boxes"] = all_cls_scores[-1], all_bbox_preds[-1]
        return [InstanceData() for _ in batch_img_metas]

    samples = []
    for mask in padding:
        sample = DetDataSample()
        size = tuple(int((~mask).any(dim).sum()) for dim in (1, 0))  # (height, width)
        sample.set_metainfo({"batch_input_shape": tuple(images.shape[-2:]), "img_shape": size,
                             "scale_factor": (1.0, 1.0)})
        samples.append(sample)
    model.query_head.predict_by_feat = capture
    try:
        with torch.no_grad():
            model.predict(images, samples)
    finally:
        del model.query_head.predict_by_feat
    return captured["logits"], captured["boxes"]


def build(name: str):
    """mmdet's own Co-DINO of a variant (its init) and its config."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger

    register_all_modules()
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every key
    cfg = small_config(VARIANTS[name])
    return MODELS.build(cfg.model).eval(), cfg


def record(name: str) -> dict:
    import mmdet
    from record_mmdet_keys import plain_inputs, seeded_weights

    model, cfg = build(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_weights(shapes))
    logits, boxes = run_co_dino(model, *plain_inputs())
    return {"mmdet": mmdet.__version__, "cfg": cfg.pretty_text, "keys": shapes,
            "outputs": {"logits": logits.tolist(), "boxes": boxes.tolist()}}


def record_all() -> dict:
    """Every variant, or nothing when the projects folder is absent."""
    return {name: record(name) for name in VARIANTS} if available() else {}


def main() -> None:
    out = Path(__file__).parent / "data" / "mmdet_keys.json"
    if not available():
        raise SystemExit(f"{CONFIGS / LSJ_CONFIG} is missing: export mmdetection's "
                         f"projects/CO-DETR into {PROJECTS}")
    recorded = json.loads(out.read_text())
    recorded.update(record_all())
    out.write_text(json.dumps(recorded, indent=1) + "\n")


if __name__ == "__main__":
    main()
