"""DetectorOutput: the one contract between the frozen detector and the trainable head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from frozenseg.boxes import to_pixels
from frozenseg.ops.levels import level_shapes as read_level_shapes


@dataclass
class DetectorOutput:
    """What the frozen detector gives the mask head, for a batch of B images.

    queries         (B, K, C)  last decoder layer hidden states of the K predictions
    boxes           (B, K, 4)  normalised (cx, cy, w, h) relative to each image's own,
                               unpadded size (multiply by image_sizes to get pixels)
    scores          (B, K)     class probability of the prediction (sigmoid; DETR's softmax)
    labels          (B, K)     class index (contiguous, as the detector's classifier)
    query_mask      (B, K)     True for real predictions (False pads ragged batches)
    memory          (B, S, C)  output of the chosen encoder layer, all levels flattened (a
                               hybrid encoder, RT-DETR's: the maps its decoder reads)
    memory_mask     (B, S)     True at padding positions of the memory
    spatial_shapes  (L, 2)     (H, W) of each level; level_start_index (L,); valid_ratios
                               (B, L, 2) the unpadded fraction (w, h) of each level
    c1              (B, C1, H/4, W/4) the backbone's stride-4 map
    image_sizes     (B, 2)     unpadded (H, W) of each input image, in pixels
    level_shapes    spatial_shapes as (H, W) pairs of Python ints, where the producer has
                    them (the detector, batch_outputs); None: read from spatial_shapes.
                    Deformable attention takes these (:meth:`shapes`), so nothing is read
                    back from a device and compiled or traced graphs keep sizes free.
    """

    queries: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    query_mask: torch.Tensor
    memory: torch.Tensor
    memory_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    c1: torch.Tensor
    image_sizes: torch.Tensor
    level_shapes: list[tuple[int, int]] | None = None

    def shapes(self) -> list[tuple[int, int]]:
        """The (H, W) of each level as int pairs: level_shapes, or spatial_shapes read back."""
        if self.level_shapes is not None:
            return self.level_shapes
        return read_level_shapes(self.spatial_shapes)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DetectorOutput:
        """The same output with ``fn`` applied to every tensor field."""
        return DetectorOutput(**{f.name: _apply(fn, getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str) -> DetectorOutput:
        """The same output on another device (dtypes unchanged)."""
        return self.map_tensors(lambda t: t.to(device))

    def given_boxes(self) -> DetectorOutput:
        """Boxes given from outside (``embed_boxes``) are taken as certain: score 1, so a
        mask's final score is its predicted quality alone."""
        return replace(self, scores=self.query_mask.to(self.scores.dtype))

    def boxes_xyxy_pixels(self) -> torch.Tensor:
        """(B, K, 4) absolute (x0, y0, x1, y1) in each image's pixels."""
        return to_pixels(self.boxes, self.image_sizes[:, None])


QUERY_FIELDS = ("queries", "boxes", "scores", "labels", "query_mask")


def append_queries(output: DetectorOutput, extra: DetectorOutput) -> DetectorOutput:
    """``output`` with ``extra``'s queries after its own (K + K' per image): e.g. detections
    plus the queries of ground-truth boxes (FrozenDetector.detect_and_embed). Both must
    describe the same images; the memory, c1 and sizes are ``output``'s."""
    if output.queries.shape[0] != extra.queries.shape[0]:
        raise ValueError(f"batches of {output.queries.shape[0]} and {extra.queries.shape[0]} "
                         "images cannot be joined")
    joined = {name: torch.cat([getattr(output, name), getattr(extra, name).to(
        getattr(output, name).dtype)], 1) for name in QUERY_FIELDS}
    rest = {f.name: getattr(output, f.name) for f in fields(output) if f.name not in joined}
    return DetectorOutput(**joined, **rest)


def batch_outputs(outputs: list[DetectorOutput]) -> DetectorOutput:
    """Batches of one image each (e.g. read from the feature cache) -> one padded batch.

    Each level of the memory is padded at the bottom and right to the largest (H_l, W_l)
    of the batch (memory_mask True there, valid_ratios the kept fraction, as the detector
    computes for a padded batch); queries are padded to the largest K (query_mask False);
    c1 is padded likewise, or stays empty (B, 0, 0, 0) when the outputs have none.
    """
    shapes = torch.stack([o.spatial_shapes for o in outputs])  # (B, L, 2)
    padded = shapes.amax(0)
    starts = torch.cat([padded.new_zeros(1), padded.prod(1).cumsum(0)[:-1]])
    memory = outputs[0].memory.new_zeros(len(outputs), int(padded.prod(1).sum()),
                                         outputs[0].memory.shape[-1])
    memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
    for i, o in enumerate(outputs):
        for level, ((h, w), (hp, wp)) in enumerate(zip(shapes[i].tolist(), padded.tolist(),
                                                       strict=True)):
            source = o.memory[0, int(o.level_start_index[level]):][: h * w].reshape(h, w, -1)
            target = memory[i, int(starts[level]):][: hp * wp].view(hp, wp, -1)
            target[:h, :w] = source
            memory_mask[i, int(starts[level]):][: hp * wp].view(hp, wp)[:h, :w] = False
    ratios = (shapes.flip(-1) / padded.flip(-1)).to(outputs[0].valid_ratios.dtype)
    valid_ratios = torch.cat([o.valid_ratios for o in outputs]) * ratios
    queries = {name: stack_padded([getattr(o, name) for o in outputs]) for name in QUERY_FIELDS}
    return DetectorOutput(
        **queries, memory=memory, memory_mask=memory_mask, spatial_shapes=padded,
        level_start_index=starts, valid_ratios=valid_ratios,
        c1=stack_padded([o.c1 for o in outputs]),
        image_sizes=torch.cat([o.image_sizes for o in outputs]),
        level_shapes=[(h, w) for h, w in padded.tolist()],
    )


def _apply(fn, value):
    return fn(value) if isinstance(value, torch.Tensor) else value


def stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Batches of one -> one batch, every other dim zero-padded (False for bool) at the end
    to the largest size."""
    size = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = tensors[0].new_zeros(len(tensors), *size[1:])
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, n) for n in t.shape[1:]))] = t[0]
    return out
