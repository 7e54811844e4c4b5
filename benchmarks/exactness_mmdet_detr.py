"""How close converted mmdetection 3.x DETR, Conditional DETR and DAB-DETR come to mmdet.

For each small build of mmdet's shipped configs in ``tests/record_mmdet_keys.py`` (ResNet-50,
2 + 2 layers, FFN 64, 30 queries, 7 classes; DAB-DETR also with 3 patterns), mmdet's own
model (its init_weights, then N(0, 0.05) noise on every weight) is written as mmengine's
CheckpointHook writes it, converted as ``frozenseg convert`` does, and loaded with
``load_detector``. Both run on a padded batch of two 96 x 128 images, the second 40 x 64
(mmdet with its padding masks; the stride-32 map is padded too), and on the same batch
taken as one size (mmdet without masks), fp32 on the CPU. Printed: the
largest absolute difference of the last decoder layer's logits and of its boxes (normalised
cxcywh), and whether the top-k detections (mmdet's test_cfg.max_per_img) pick the same
queries and classes. The tests require 1e-4.

Run (from the repository root, with mmdetection 3.x, mmengine and mmcv importable):
    PYTHONPATH=.:tests python benchmarks/exactness_mmdet_detr.py

The output is a markdown table.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

import torch
from artifacts import mmdet_recorded_checkpoint
from test_convert_mmdet import PLAIN, _mmdet_model

from frozenseg.convert import convert_checkpoint
from frozenseg.detector.frozen import load_detector


def top_k(logits: torch.Tensor, k: int, softmax: bool) -> torch.Tensor:
    """(query, class) pairs of the k best detections per image, as mmdet's DETRHead picks
    them: a sigmoid over queries x classes, or each query's best non-background class."""
    if softmax:
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        queries = scores.topk(min(k, scores.shape[1]), dim=1).indices
        return torch.stack([queries, labels.gather(1, queries)], -1)
    flat = logits.sigmoid().flatten(1)
    index = flat.topk(min(k, flat.shape[1]), dim=1).indices
    return torch.stack([index // logits.shape[-1], index % logits.shape[-1]], -1)


def differences(name: str, folder: Path) -> list[tuple[str, float, float, bool]]:
    from record_mmdet_keys import run_plain

    torch.manual_seed(0)  # mmdet's init_weights draws from the global generator
    model, cfg = _mmdet_model(name)

    def same_top_k(ours: torch.Tensor, theirs: torch.Tensor, config) -> bool:
        k, softmax = config.num_select, config.no_object_class
        return torch.equal(top_k(ours, k, softmax), top_k(theirs, k, softmax))

    return side_by_side(model, cfg.pretty_text, name, folder, run=run_plain, same=same_top_k)


def side_by_side(model, cfg: str, name: str, folder: Path, *, run, same
                 ) -> list[tuple[str, float, float, bool]]:
    """mmdet's ``model`` (a recorded variant ``name``, config text ``cfg``) written as
    CheckpointHook writes it, converted and loaded as a user would; per batch (padded, same
    size): the largest logits and boxes differences from ``run(model, images, padding)`` and
    ``same(our_logits, their_logits, config)``."""
    from record_mmdet_keys import plain_inputs
    from test_convert_mmdet import CO_DINO_RECORDED

    path = mmdet_recorded_checkpoint(folder / "run", name, cfg=cfg,
                                     state_dict=model.state_dict())
    report = convert_checkpoint(path, folder / "converted")
    assert report.config == {**PLAIN, **CO_DINO_RECORDED}[name], report.config
    ours = load_detector(folder / "converted").model
    images, padding = plain_inputs()
    rows = []
    for batch, mask in (("padded", padding), ("same size", torch.zeros_like(padding))):
        with torch.no_grad():
            got = ours(images, mask)
        logits, boxes = run(model, images, mask)
        rows.append((batch, (got.logits[-1] - logits).abs().max().item(),
                     (got.boxes[-1] - boxes).abs().max().item(),
                     same(got.logits[-1], logits, report.config)))
    return rows


def main() -> None:
    if importlib.util.find_spec("mmdet") is None:
        print("mmdetection is not importable: nothing measured")
        return
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every key
    print_table(PLAIN, differences, "same top-k")


def print_table(names, differences, same: str) -> None:
    """The markdown table of ``differences(name, folder)`` for each name."""
    print(f"| model | batch | logits | boxes | {same} |\n| --- | --- | --- | --- | --- |")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            for batch, logits, boxes, agree in differences(name, Path(tmp)):
                print(f"| {name} | {batch} | {logits:.1e} | {boxes:.1e} | {agree} |")


if __name__ == "__main__":
    main()
