"""Peer comparison: the frozenseg head vs RF-DETR's own segmentation head, on one frozen RF-DETR.

Setting. One small RF-DETR (transformers ``RfDetrForInstanceSegmentation``, random weights,
seed 0: no trained RF-DETR can be fetched, and training its detector is out of reach on a
CPU) is converted to a frozenseg detector folder and frozen. Both mask heads read the same
frozen outputs and are trained on the same synthetic shapes (``frozenseg synth``), by the
same loop (frozenseg's ``Trainer``: feature cache, AdamW, the recipe's point-sampled BCE +
dice loss, same batch size and lr), for a fixed number of steps each:

* frozenseg: the ``recipes/synth_tiny.yaml`` head (RoIAlign of each box, box and query
  encoders, mask scoring).
* RF-DETR: transformers' own segmentation-head modules, taken from the same
  ``RfDetrForInstanceSegmentation`` (its depthwise-conv blocks, one per decoder layer, the
  1x1 spatial projection, the query MLP block and projection, the bias), run as its
  ``segmentation_head`` runs them on the projector's map at stride 4 (frozenseg's ``c1``,
  the same map upsampled as RF-DETR upsamples it), dotted with each query's decoder state.
  Only the final mask is trained: RF-DETR's auxiliary masks of earlier decoder layers and
  of the encoder proposals are left out (the final mask depends on the last layer's
  queries alone, so inference is RF-DETR's).

Masks are made for the ground-truth boxes in training and evaluation (``loss.proposals:
gt``, ``eval.boxes: gt``): the detector turns each box into a query by running its decoder
on it as an anchor, both heads read that query. Mask AP is then the heads' mask quality on
given boxes, not an instance-segmentation result of RF-DETR (a random detector finds no
shapes). Each mask is scored by the head (frozenseg: predicted IoU; RF-DETR head: the mean
probability over the mask, as it has no quality branch).

With random weights the decoder's query carries little of an object's position, which
RF-DETR's head needs (it has no box crop) and the frozenseg head is given by RoIAlign: the
setting favours the box-reading head, and the RF-DETR head's figures are a floor.

Steps are fixed (defaults chosen so that the training minutes roughly match on a 2-core
CPU); minutes are reported, never used to stop. Torch runs on one thread.

Run (11 to 14 minutes on 2 shared cores; the table is in BENCHMARKS.md):
    PYTHONPATH=. python -m benchmarks.peer_rf_detr
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import frozenseg
from benchmarks.common import cpu_name, table
from benchmarks.train_synth import recipe as synth_recipe
from frozenseg.cache import write_cache
from frozenseg.convert import convert_checkpoint
from frozenseg.data import CocoInstances
from frozenseg.detector.output import DetectorOutput
from frozenseg.engine.data import eval_transform
from frozenseg.engine.train import Trainer
from frozenseg.head import task as head_task
from frozenseg.head.encoders import c1_valid_sizes
from frozenseg.head.network import (
    PAD_LOGIT,
    HeadOutput,
    count_parameters,
    estimate_flops,
    floats_to,
    select_queries,
)
from frozenseg.head.scoring import mask_confidence

# A small RF-DETR: a 4-block DINOv2-style ViT (64 wide, patch 16, 2 x 2 windows), a
# 64-wide decoder of 2 layers; the shapes' 8 classes.
VIT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
           patch_size=16, image_size=64, out_indices=[1, 2, 3], num_windows=2)
DECODER = dict(d_model=64, decoder_ffn_dim=128, decoder_layers=2, decoder_n_points=2,
               decoder_self_attention_heads=2, decoder_cross_attention_heads=4,
               num_queries=30, group_detr=1, num_labels=8, c2f_num_blocks=1)


def rf_detr():
    """The random RfDetrForInstanceSegmentation both heads are measured against."""
    import transformers

    torch.manual_seed(0)
    config = transformers.RfDetrConfig(
        backbone_config=transformers.RfDetrDinov2Config(**VIT), **DECODER)
    return transformers.RfDetrForInstanceSegmentation(config).eval()


class RfDetrMaskHead(nn.Module):
    """RF-DETR's segmentation head (its own modules) behind frozenseg's head contract.

    forward(output, keep=None) -> HeadOutput with frame "image": output.c1 (B, C, H/4, W/4)
    is RF-DETR's projector map at stride 4; each query's mask is its projected decoder state
    dotted with the blocks' map, plus a bias, over its own image (PAD_LOGIT in the padding).
    Scores: detector score x mean probability over the mask (eq. 2 without c_i).
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.blocks = model.blocks
        self.spatial_features_proj = model.spatial_features_proj
        self.query_features_block = model.query_features_block
        self.query_features_proj = model.query_features_proj
        self.segmentation_bias = model.segmentation_bias
        self._mask_logits = type(model).get_mask_logits  # reads only the modules above

    def forward(self, output: DetectorOutput, keep: torch.Tensor | None = None) -> HeadOutput:
        output = floats_to(output, self.segmentation_bias.dtype)
        sel = select_queries(output, keep)
        spatial = output.c1
        for block in self.blocks:  # the final mask reads the last block's map
            spatial = block(spatial)
        spatial = self.spatial_features_proj(spatial)
        logits = spatial.new_full((len(sel.queries), *spatial.shape[-2:]), PAD_LOGIT)
        start = 0
        for i, ((h, w), n) in enumerate(zip(c1_valid_sizes(output), sel.counts, strict=True)):
            if n:
                masks = self._mask_logits(self, sel.queries[None, start : start + n],
                                          spatial[i : i + 1])[0]
                logits[start : start + n, :h, :w] = masks[:, :h, :w]
            start += n
        return HeadOutput(mask_logits=logits, frame="image", iou_logits=None, boxes=sel.boxes,
                          batch_index=sel.batch_index, query_index=sel.query_index,
                          scores=sel.scores * mask_confidence(logits).to(sel.scores.dtype))


def prepare(work: Path, images: int, scale: float) -> tuple[Path, Path, Path]:
    """Synthetic data, the converted RF-DETR folder and its train cache."""
    frozenseg.synth(work / "synth", images=images, seed=0)
    model = rf_detr()
    model.model.save_pretrained(work / "rf-detr-hf")  # the detection part: what converts
    convert_checkpoint(work / "rf-detr-hf", work / "detector", overwrite=True)
    dataset = CocoInstances(work / "synth/images/train", work / "synth/instances_train.json")
    write_cache(str(work / "detector"), dataset, work / "cache", dtype="fp16", top_k=20,
                transform=eval_transform(scale), resume=True)
    return work / "synth", work / "detector", work / "cache"


def recipe(work: Path, steps: int, name: str, scale: float):
    """train_synth's recipe on this work folder (its detector, data and cache), ``steps``."""
    return synth_recipe(work, work / "synth", work / "cache", scale, f"train.iterations={steps}",
                        f"train.output_dir={work / f'run-{name}-{int(time.time())}'}")


def trainer(r, head: nn.Module | None) -> Trainer:
    """frozenseg's Trainer; with ``head``, that module is trained instead of the recipe's."""
    if head is None:
        return Trainer(r, log=lambda _: None, evaluate=False)
    with mock.patch.object(head_task, "build_mask_head", lambda *_, **__: head):
        return Trainer(r, log=lambda _: None, evaluate=False)


def probe(detector, size: int, instances: int) -> DetectorOutput:
    """One size x size image of noise and ``instances`` boxes on a grid, as given boxes."""
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    side = int(instances ** 0.5 + 0.999)
    cell = size / side
    boxes = torch.tensor([[c * cell + 2, r * cell + 2, (c + 1) * cell - 2, (r + 1) * cell - 2]
                          for r in range(side) for c in range(side)][:instances])
    return detector.embed_boxes([image], [boxes]).given_boxes()


def cost(head: nn.Module, output: DetectorOutput, repeats: int) -> tuple[float, float]:
    """GMACs (FlopCounterMode FLOPs / 2) and median CPU ms of one head forward."""
    head.eval()
    gmacs = estimate_flops(head, output) / 2e9  # FlopCounterMode, outside no_grad
    with torch.no_grad():
        for _ in range(3):
            head(output)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            head(output)
            times.append(time.perf_counter() - started)
    return gmacs, 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=150, help="synthetic images (20%% val)")
    parser.add_argument("--steps", default="640,750",
                        help="training steps: frozenseg head, RF-DETR head")
    parser.add_argument("--scale", type=float, default=0.32, help="data.scale (eval ~256 px)")
    parser.add_argument("--size", type=int, default=256, help="image side for GMACs and ms")
    parser.add_argument("--instances", type=int, default=10, help="boxes for GMACs and ms")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards (median)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/frozenseg-peer-rf-detr"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = dict(zip(("frozenseg", "RF-DETR"), map(int, args.steps.split(",")), strict=True))
    prepare(args.work, args.images, args.scale)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread; "
          f"{args.images} synthetic images, masks for the ground-truth boxes", flush=True)
    rows = []
    for name, n in steps.items():
        r = recipe(args.work, n, name, args.scale)
        head = None if name == "frozenseg" else RfDetrMaskHead(rf_detr())
        t = trainer(r, head)
        model = t.accelerator.unwrap_model(t.model)
        params = count_parameters(model)
        started = time.perf_counter()
        t.run()
        minutes = (time.perf_counter() - started) / 60
        metrics, _, _ = t.task.evaluate(model, Path(r.train.output_dir) / "eval")
        gmacs, ms = cost(model, probe(t.task.detector, args.size, args.instances), args.repeats)
        segm = metrics["segm"]
        rows.append([f"{name} head", f"{params / 1e6:.3f}", f"{gmacs:.3f}", f"{ms:.1f}", n,
                     f"{minutes:.2f}", f"{segm['AP']:.1f}", f"{segm['AP50']:.1f}",
                     f"{segm['AP75']:.1f}"])
        print(table(COLUMNS, rows[-1:]), flush=True)
    print(table(COLUMNS, rows))


COLUMNS = ["mask head", "M params", "GMACs", "CPU ms", "steps", "train min", "mask AP",
           "AP50", "AP75"]


if __name__ == "__main__":
    main()
