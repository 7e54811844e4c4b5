"""Record mmdetection's key layout for the small models test_convert_mmdet.py converts.

Run with mmdetection 3.x, mmengine and mmcv importable (mmcv's compiled ops are not needed:
the models are only built, and the plain DETRs run): from the repository root,
``PYTHONPATH=.:tests python tests/record_mmdet_keys.py``. Writes
``tests/data/mmdet_keys.json``: per variant, the config text mmengine saves in a checkpoint's
meta (``cfg.pretty_text``) and every state-dict key with its shape; for the plain DETRs
(DETR, Conditional DETR, DAB-DETR) also ``outputs``: the last decoder layer's logits and
boxes mmdet computes with :func:`seeded_weights` on :func:`plain_inputs`, which the tests
reproduce from the converted checkpoint without mmdet. Co-DINO's entries (``co_dino*``) come
from ``record_co_dino.py`` when mmdetection's ``projects/CO-DETR`` is in ``third_party/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

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
# The plain-attention DETRs, whose outputs are recorded too.
PLAIN_VARIANTS = {
    "detr": ("detr/detr_r50_8xb2-150e_coco.py", {}),
    "conditional_detr": ("conditional_detr/conditional-detr_r50_8xb2-50e_coco.py", {}),
    "dab_detr": ("dab_detr/dab-detr_r50_8xb2-50e_coco.py", {}),
    "dab_detr_patterns": ("dab_detr/dab-detr_r50_8xb2-50e_coco.py", {"num_patterns": 3}),
}


def small_config(path: str, overrides: dict):
    """The shipped config shrunk: 2 + 2 layers, FFN 64, 30 queries, 7 classes (and a
    narrow Swin)."""
    import mmdet
    from mmengine.config import Config

    cfg = Config.fromfile(Path(mmdet.__file__).parent / ".mim" / "configs" / path)
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


def seeded_weights(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights any environment makes alike from a layout's shapes (one generator, keys in
    order): matrices and kernels N(0, 1 / fan-in), norm scales near 1 (a PReLU's slope near
    0.25), biases and running means N(0, 0.01), running variances in [0.5, 1.5), so that
    a random ResNet-50 and transformer keep their activations in range. DAB-DETR's first
    four anchors sit at the left edge (x logit -9, sigmoid 1.2e-4), between the 1e-5 its
    decoder clamps references at and the 1e-3 of its head, so that the two differ."""
    g = torch.Generator().manual_seed(seed)
    weights = {key: _seeded(key, shape, g) for key, shape in shapes.items()}
    anchors = weights.get("query_embedding.weight")
    if anchors is not None and anchors.shape[1] == 4:
        anchors[:4, 0] = -9.0
    return weights


def _seeded(key: str, shape: list[int], g: torch.Generator) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    noise = torch.randn(shape, generator=g)
    if len(shape) > 1:
        return noise / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return noise * 0.1 + (0.25 if shape == [1] else 1.0)
    return noise * 0.1


def plain_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised images padded to 96 x 128, the second 40 x 64 (zeros below and to the
    right), so that the stride-32 map of the plain DETRs (3 x 4) has padding too."""
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, 40:], padding[1, :, 64:] = True, True
    return images.masked_fill(padding[:, None], 0.0), padding


def plain_outputs(model) -> dict[str, list]:
    """The last decoder layer's logits and boxes of mmdet's ``model`` (a DETR, Conditional
    DETR or DAB-DETR holding its weights) on :func:`plain_inputs`."""
    logits, boxes = run_plain(model, *plain_inputs())
    return {"logits": logits.tolist(), "boxes": boxes.tolist()}


def run_plain(model, images: torch.Tensor, padding: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet's plain DETR on normalised ``images`` (B, 3, H, W) whose ``padding`` (B, H, W)
    is True below and right of each image (none: mmdet runs without masks): the last
    decoder layer's logits (B, Q, K) and boxes (B, Q, 4), normalised cxcywh."""
    from mmdet.structures import DetDataSample

    samples = []
    for mask in padding:
        sample = DetDataSample()
        size = tuple(int((~mask).any(dim).sum()) for dim in (1, 0))  # (height, width)
        sample.set_metainfo({"batch_input_shape": tuple(images.shape[-2:]), "img_shape": size})
        samples.append(sample)
    with torch.no_grad():
        head_inputs = model.forward_transformer(model.extract_feat(images), samples)
        logits, boxes = model.bbox_head(**head_inputs)
    return logits[-1], boxes[-1]


def record(path: str, overrides: dict, *, outputs: bool) -> dict:
    import mmdet
    from mmdet.registry import MODELS

    cfg = small_config(path, overrides)
    model = MODELS.build(cfg.model).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    recorded = {"mmdet": mmdet.__version__, "cfg": cfg.pretty_text, "keys": shapes}
    if outputs:
        model.load_state_dict(seeded_weights(shapes))
        recorded["outputs"] = plain_outputs(model)
    return recorded


def main() -> None:
    from mmdet.utils import register_all_modules
    from record_co_dino import record_all

    register_all_modules()
    recorded = {name: record(*spec, outputs=False) for name, spec in VARIANTS.items()}
    recorded.update({name: record(*spec, outputs=True) for name, spec in PLAIN_VARIANTS.items()})
    recorded.update(record_all())
    out = Path(__file__).parent / "data" / "mmdet_keys.json"
    out.write_text(json.dumps(recorded, indent=1) + "\n")


if __name__ == "__main__":
    main()
