"""How close converted mmdetection 3.x Co-DINO (``projects/CO-DETR``) comes to mmdet.

For each small build of the project's LSJ config in ``tests/record_co_dino.py`` (5 levels,
2 + 2 layers, FFN 64, 30 queries, 7 classes, its auxiliary RPN, RoI and ATSS heads; on
ResNet-50 and on a 32-wide Swin), mmdet's own model (its init, then N(0, 0.05) noise on every
weight) is written as mmengine's CheckpointHook writes it, converted as ``frozenseg convert``
does (the training-only heads dropped), and loaded with ``load_detector``. Both run on a
padded batch of two 96 x 128 images, the second 40 x 64 (mmdet through ``CoDETR.predict``
with each image's ``img_shape``), and on the same batch taken as one size, fp32 on the CPU.
Printed: the largest absolute difference of the query head's last-layer logits and of its
boxes (normalised cxcywh), and whether the 100 best detections before Co-DETR's soft-NMS are
the same (query, class) pairs (test_cfg's max_per_img, 300, would take all 30 x 7). The tests
require 1e-4.

Run (from the repository root, with mmdetection 3.x, mmengine and mmcv importable and
mmdetection's ``projects/CO-DETR`` exported into ``third_party/mmdetection-projects``):
    PYTHONPATH=.:tests python benchmarks/exactness_mmdet_co_dino.py

The output is a markdown table.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from exactness_mmdet_detr import print_table, side_by_side, top_k
from test_convert_mmdet import CO_DINO_RECORDED, mmdet_co_dino

TOP_K = 100


def same_detections(ours: torch.Tensor, theirs: torch.Tensor, config=None) -> bool:
    """Whether the TOP_K best (query, class) pairs of each image are the same set: scores
    closer than the differences may swap places within it."""
    return all(
        {tuple(p) for p in top_k(a[None], TOP_K, softmax=False)[0].tolist()}
        == {tuple(p) for p in top_k(b[None], TOP_K, softmax=False)[0].tolist()}
        for a, b in zip(ours, theirs, strict=True))


def differences(name: str, folder: Path) -> list[tuple[str, float, float, bool]]:
    from record_co_dino import run_co_dino

    model, cfg = mmdet_co_dino(name)
    return side_by_side(model, cfg.pretty_text, name, folder, run=run_co_dino,
                        same=same_detections)


def main() -> None:
    from record_co_dino import available

    if importlib.util.find_spec("mmdet") is None or not available():
        print("mmdetection or third_party/mmdetection-projects is missing: nothing measured")
        return
    warnings.filterwarnings("ignore")  # mmdet's deprecation and meshgrid warnings
    print_table(CO_DINO_RECORDED, differences, f"same top-{TOP_K}")


if __name__ == "__main__":
    main()
