"""How close converted official DETR, Conditional DETR and DAB-DETR checkpoints come to the
official code (facebookresearch/detr, Atten4Vis/ConditionalDETR, IDEA-Research/DAB-DETR),
side by side.

For each variant in ``tests/test_detr_official_code.py`` (DETR; Conditional DETR; DAB-DETR
as main.py builds it by default, with 3 patterns, and with ReLU and position temperature
10000) the official model is built from its main.py's own arguments (ResNet-50, width 256,
2 encoder and 3 decoder layers, FFN 96, 30 queries) by its own build function, given random
weights, saved as main.py saves a checkpoint, converted by ``frozenseg convert`` and loaded
with ``load_detector``. Both run on a batch of two normalised 128 x 192 images, the second a
96 x 128 image padded with zeros (the official code with its padding mask), and on the same
images taken as one size, fp32 on the CPU. Printed: the largest absolute difference of the
last decoder layer's logits and of its boxes (normalised cxcywh). The tests require 1e-4.
Rows whose repository is not in ``third_party/`` are skipped.

Run (from the repository root, with the repositories exported into third_party/detr,
third_party/ConditionalDETR and third_party/DAB-DETR):
    PYTHONPATH=.:tests python benchmarks/exactness_detr.py

The output is a markdown table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from test_detr_official_code import REPOS, VARIANTS, available, differences


def main() -> None:
    torch.set_num_threads(1)  # small models: one thread is as fast and steadier
    print("| variant | batch | logits | boxes |\n| --- | --- | --- | --- |")
    for variant, (name, _) in VARIANTS.items():
        if not available(variant):
            print(f"| {variant} | (no third_party/{REPOS[name][0]}) | | |")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for batch, (logits, boxes) in differences(variant, Path(tmp)).items():
                print(f"| {variant} | {batch} | {logits:.1e} | {boxes:.1e} |")


if __name__ == "__main__":
    main()
