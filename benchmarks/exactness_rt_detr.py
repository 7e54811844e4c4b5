"""How close converted official RT-DETR and RT-DETRv2 training checkpoints come to the
official code (lyuwenyu/RT-DETR), side by side.

For each variant in ``tests/test_rt_detr_official_code.py`` (the shipped ResNet-18 and
ResNet-50 configs of v1 and v2, included from a small config: width 64, 2 decoder layers, 30
queries, v2 with 2, 3 and 4 points per level; learned query content; anchors made for any
size instead of eval_spatial_size) the official model is built by the repository's own
YAMLConfig, given random weights, saved as its solver saves a training run, converted by
``frozenseg convert`` with the same YAML and loaded with ``load_detector``. Both run on a
batch of two 128 x 160 [0, 1] images, the second a 96 x 128 image padded with zeros (the
official code has no padding mask; frozenseg is given one), fp32 on the CPU. Printed: the
largest absolute difference of the last decoder layer's logits and of its boxes (normalised
cxcywh). The tests require 1e-4. Rows whose code is not in ``third_party/RT-DETR`` are
skipped.

Run (from the repository root, with the repository exported into third_party/RT-DETR):
    PYTHONPATH=.:tests python benchmarks/exactness_rt_detr.py

The output is a markdown table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from test_rt_detr_official_code import REPO, VARIANTS, available, official_differences


def main() -> None:
    torch.set_num_threads(1)  # small models: one thread is as fast and steadier
    print("| variant | logits | boxes |\n| --- | --- | --- |")
    for variant in VARIANTS:
        if not available(variant):
            print(f"| {variant} | (no third_party/{REPO.name}) | |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            logits, boxes = official_differences(variant, Path(tmp))
        print(f"| {variant} | {logits:.1e} | {boxes:.1e} |")


if __name__ == "__main__":
    main()
