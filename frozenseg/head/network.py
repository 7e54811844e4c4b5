"""MaskHead: wires the Mask Frozen-DETR parts together; ``build_mask_head`` builds it.

Two composers share one forward contract (:class:`HeadOutput`): :class:`MaskHead`, the
trainable network (Fig. 7), and :class:`TrainingFreeHead`, the parameter-free baseline of
Table 1 (eq. 1-4). Only :func:`build_mask_head` reads a :class:`HeadConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from frozenseg.detector.output import DetectorOutput
from frozenseg.head.blocks import build_stack
from frozenseg.head.encoders import (
    BoxFeatureEncoder,
    FeatureFusion,
    GridEmbedding,
    ImageFeatureEncoder,
    Neck,
    QueryFeatureEncoder,
    c1_valid_sizes,
    roi_features,
)
from frozenseg.head.scoring import DotProductMask, MaskScoring, SegmenterMask, mask_confidence
from frozenseg.recipe.head import HeadConfig

# Image-frame masks (roi_align=False) outside an image's valid area: probability ~0, and
# finite so a loss on them stays finite.
PAD_LOGIT = -1e4


@dataclass
class HeadOutput:
    """Masks for the N selected queries of a batch, ordered by (image, query).

    mask_logits  (N, S, S) in each box's RoI frame (frame "roi": the S x S grid covers the
                 box edge to edge), or (N, H/4, W/4) in the padded batch's stride-4 frame
                 (frame "image"; PAD_LOGIT outside the image's own ceil(H/4) x ceil(W/4))
    frame        "roi" | "image"
    iou_logits   (N,) predicted mask IoU logits, or None without mask scoring
    boxes        (N, 4) absolute (x0, y0, x1, y1) in pixels of the input image: the boxes
                 the RoI masks refer to
    batch_index  (N,) long, image of each mask; query_index (N,) long, its detector query
    scores       (N,) detector score x sigmoid(iou_logits), or x eq. 2 confidence
    """

    mask_logits: Tensor
    frame: str
    iou_logits: Tensor | None
    boxes: Tensor
    batch_index: Tensor
    query_index: Tensor
    scores: Tensor


@dataclass
class Selection:
    """The kept queries, flattened batch-major; counts[i] of them belong to image i."""

    batch_index: Tensor
    query_index: Tensor
    queries: Tensor
    boxes: Tensor
    scores: Tensor
    counts: list[int]


def select_queries(output: DetectorOutput, keep: Tensor | None) -> Selection:
    """keep (B, K) bool, default output.query_mask; boxes come out xyxy pixels."""
    keep = output.query_mask if keep is None else keep
    batch_index, query_index = keep.nonzero(as_tuple=True)
    return Selection(batch_index=batch_index, query_index=query_index,
                     queries=output.queries[keep], boxes=output.boxes_xyxy_pixels()[keep],
                     scores=output.scores[keep], counts=keep.sum(1).tolist())


@dataclass
class Distinct:
    """The selection with each query once: a detector that ranks (query, class) pairs (DINO
    and most since) reports one query under several classes, with the same box and hidden
    state, so its mask is the same. selection: the distinct rows (first occurrences,
    image-major); inverse (N,): each original row's distinct row; multiplicity (M,): how
    many original rows each distinct row stands for."""

    selection: Selection
    inverse: Tensor
    multiplicity: Tensor


def distinct_queries(sel: Selection) -> Distinct | None:
    """The distinct rows of ``sel`` (same image, box and query state), or None when every
    row is distinct already or a graph is being traced or compiled (the row count would
    depend on the data)."""
    if len(sel.queries) < 2 or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    # float32 or wider: exact for the image index and for the rows' own values.
    dtype = torch.promote_types(torch.promote_types(sel.boxes.dtype, sel.queries.dtype),
                                torch.float32)
    key = torch.cat([sel.batch_index[:, None], sel.boxes, sel.queries], 1).to(dtype).detach()
    rows, inverse, multiplicity = torch.unique(key, dim=0, return_inverse=True,
                                               return_counts=True)
    if len(rows) == len(key):
        return None
    order = torch.arange(len(key), device=key.device)
    # Indexing (not the unique values) keeps the rows differentiable where the input is.
    first = order.new_full((len(rows),), len(key)).scatter_reduce_(0, inverse, order, "amin")
    batch_index = sel.batch_index[first]  # unique sorts by image first: images stay grouped
    counts = torch.bincount(batch_index, minlength=len(sel.counts)).tolist()
    chosen = Selection(batch_index=batch_index, query_index=sel.query_index[first],
                       queries=sel.queries[first], boxes=sel.boxes[first],
                       scores=sel.scores[first], counts=counts)
    return Distinct(chosen, inverse, multiplicity)


def floats_to(output: DetectorOutput, dtype: torch.dtype) -> DetectorOutput:
    """``output`` with its floating tensors in ``dtype`` (a feature cache may hold float16;
    the head computes in its parameters' dtype, and autocast lowers it where asked)."""
    return output.map_tensors(lambda x: _float_to(x, dtype))


def _float_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype) if x.is_floating_point() else x


class MaskHead(nn.Module):
    """The trainable Mask Frozen-DETR head.

    forward(output, keep=None) -> HeadOutput with frame "roi":
      output: the frozen detector's DetectorOutput for B padded images (queries (B, K, C),
        boxes (B, K, 4) normalised cxcywh of each unpadded image, memory (B, S, C) with its
        padding mask, c1 (B, C1, H/4, W/4), image_sizes (B, 2)).
      keep: (B, K) bool, the queries to make masks for; default output.query_mask.
    Floating inputs are cast to the head's parameter dtype first.
    Path: E -> image encoder -> F = neck(C1) + up2(E level 0) -> channel mapper ->
    RoIAlign S x S in each box -> box encoder -> query encoder -> mask -> IoU score.
    """

    def __init__(self, *, image_encoder: ImageFeatureEncoder, fusion: FeatureFusion,
                 roi_size: int, roi_pos: GridEmbedding | None,
                 box_encoder: BoxFeatureEncoder | None, query_encoder: QueryFeatureEncoder,
                 mask: nn.Module, scoring: MaskScoring | None) -> None:
        super().__init__()
        self.image_encoder, self.fusion = image_encoder, fusion
        self.roi_size, self.roi_pos = roi_size, roi_pos
        self.box_encoder, self.query_encoder = box_encoder, query_encoder
        self.mask, self.scoring = mask, scoring

    def forward(self, output: DetectorOutput, keep: Tensor | None = None) -> HeadOutput:
        param = next(self.parameters(), None)
        output = floats_to(output, param.dtype) if param is not None else output
        sel = select_queries(output, keep)
        # Each distinct query is computed once (the same numbers as computing every row:
        # self-attention weighs a distinct key by its multiplicity), then spread back.
        once = distinct_queries(sel)
        work = once.selection if once is not None else sel
        maps = self.fusion(self.image_encoder(output), output)
        rois = roi_features(maps, work.boxes, work.counts, self.roi_size)  # (M, D, S, S)
        rois = rois.flatten(2).transpose(1, 2)  # (M, S*S, D)
        pos = self.roi_pos() if self.roi_pos is not None else None
        if self.box_encoder is not None:
            rois = self.box_encoder(rois, pos)
        multiplicity = once.multiplicity if once is not None else None
        queries = self.query_encoder(work.queries.to(rois.dtype), rois, work.batch_index, pos,
                                     multiplicity=multiplicity)
        logits = self.mask(queries, rois).unflatten(1, (self.roi_size, self.roi_size))
        iou = None
        if self.scoring is not None:
            iou = self.scoring(logits, rois.transpose(1, 2).unflatten(2, logits.shape[1:]))
        if once is not None:
            logits = logits[once.inverse]
            iou = iou[once.inverse] if iou is not None else None
        quality = iou.sigmoid() if iou is not None else mask_confidence(logits)
        return HeadOutput(mask_logits=logits, frame="roi", iou_logits=iou, boxes=sel.boxes,
                          batch_index=sel.batch_index, query_index=sel.query_index,
                          scores=sel.scores * quality.to(sel.scores.dtype))


class TrainingFreeHead(nn.Module):
    """The baseline of Table 1: no parameters; masks = q . F (eq. 1, 3-4), scores eq. 2.

    F = C1 + up2(E level 0) with ``fuse_c1``, else up2(E level 0). With ``roi_size`` the
    masks are q . RoIAlign(F) in each box (frame "roi"); with None, q . F over the image
    (frame "image"). Same forward contract as :class:`MaskHead`; iou_logits is None.
    """

    def __init__(self, *, fuse_c1: bool, roi_size: int | None, memory_stride: float = 8) -> None:
        super().__init__()
        self.image_encoder = ImageFeatureEncoder(stack=None, dim=0, levels=0, positional=False)
        self.fusion = FeatureFusion(c1_path=nn.Identity() if fuse_c1 else None, mapper=None,
                                    memory_stride=memory_stride)
        self.roi_size = roi_size

    def forward(self, output: DetectorOutput, keep: Tensor | None = None) -> HeadOutput:
        sel = select_queries(output, keep)
        maps = self.fusion(self.image_encoder(output), output)
        if self.roi_size is not None:
            rois = roi_features(maps, sel.boxes, sel.counts, self.roi_size)
            logits = torch.einsum("nc,nchw->nhw", sel.queries.to(rois.dtype), rois)
        else:
            logits = image_frame_logits(maps, sel, output)
        return HeadOutput(mask_logits=logits, frame="image" if self.roi_size is None else "roi",
                          iou_logits=None, boxes=sel.boxes, batch_index=sel.batch_index,
                          query_index=sel.query_index,
                          scores=sel.scores * mask_confidence(logits).to(sel.scores.dtype))


def image_frame_logits(maps: list[Tensor], sel: Selection, output: DetectorOutput) -> Tensor:
    """q . F_i for each query over its image's map, in the padded (N, H/4, W/4) frame."""
    height, width = output.c1.shape[-2:]
    logits = maps[0].new_full((len(sel.queries), height, width), PAD_LOGIT)
    start = 0
    for (h, w), image_map, n in zip(c1_valid_sizes(output), maps, sel.counts, strict=True):
        queries = sel.queries[start : start + n].to(image_map.dtype)
        logits[start : start + n, :h, :w] = torch.einsum("nc,chw->nhw", queries, image_map)
        start += n
    return logits


def build_mask_head(config: HeadConfig, *, hidden_dim: int, c1_channels: int,
                    num_levels: int, memory_stride: float = 8) -> nn.Module:
    """The head ``config`` describes, for a detector of width ``hidden_dim`` (C), a stride-4
    map of ``c1_channels`` (C1) and ``num_levels`` encoder levels, the first at
    ``memory_stride`` (8 for most; 32 for the plain DETRs, 16 or 14 for LW-DETR / RF-DETR).

    Sizes not in the config: box-encoder FFNs keep the detector's FFN ratio
    (ffn_dim * D / C, as the paper's Table 4 parameter counts imply); the query FFN uses
    ffn_dim. Without the neck, a C1 of another width still needs a 1x1 projection to C.
    """
    if not config.trainable:
        if config.fuse_c1 and c1_channels != hidden_dim:
            raise ValueError(f"the training-free head adds C1 to E: C1 has {c1_channels} "
                             f"channels but the detector's width is {hidden_dim}")
        return TrainingFreeHead(fuse_c1=config.fuse_c1,
                                roi_size=config.roi_size if config.roi_align else None,
                                memory_stride=memory_stride)
    if not config.roi_align:
        raise ValueError("head.roi_align=false exists only for the training-free baseline "
                         "(head.trainable=false, Table 1)")
    dim = config.mapper_dim or hidden_dim
    box_stack = build_stack(config.box_encoder, depth=config.box_encoder_layers, dim=dim,
                            ffn_dim=config.ffn_dim * dim // hidden_dim, levels=1,
                            heads=config.num_heads, points=config.num_points,
                            window=config.window_size)
    needs_pos = config.query_cross_attention or (
        box_stack is not None and config.box_encoder == "deformable")
    return MaskHead(
        image_encoder=_image_encoder(config, hidden_dim, num_levels),
        fusion=FeatureFusion(c1_path=_c1_path(config, hidden_dim, c1_channels),
                             mapper=nn.Linear(hidden_dim, dim) if config.mapper_dim else None,
                             memory_stride=memory_stride),
        roi_size=config.roi_size,
        roi_pos=GridEmbedding(size=config.roi_size, dim=dim) if needs_pos else None,
        box_encoder=BoxFeatureEncoder(stack=box_stack, size=config.roi_size) if box_stack else None,
        query_encoder=QueryFeatureEncoder(
            in_dim=hidden_dim, dim=dim, heads=config.num_heads, ffn_dim=config.ffn_dim,
            cross_attention=config.query_cross_attention,
            self_attention=config.query_self_attention, ffn=config.query_ffn,
            dropout=config.dropout),
        mask=SegmenterMask(dim=dim) if config.mask_head == "segmenter" else DotProductMask(),
        scoring=MaskScoring(dim=dim, size=config.roi_size) if config.mask_scoring else None,
    )


def _image_encoder(config: HeadConfig, hidden_dim: int, num_levels: int) -> ImageFeatureEncoder:
    stack = build_stack(config.image_encoder, depth=config.image_encoder_layers, dim=hidden_dim,
                        ffn_dim=config.ffn_dim, levels=num_levels, heads=config.num_heads,
                        points=config.num_points, window=config.window_size)
    deformable = stack is not None and config.image_encoder == "deformable"
    return ImageFeatureEncoder(stack=stack, dim=hidden_dim, levels=num_levels,
                               positional=deformable)


def _c1_path(config: HeadConfig, hidden_dim: int, c1_channels: int) -> nn.Module | None:
    if not config.fuse_c1:
        return None
    if config.neck:
        return Neck(in_dim=c1_channels, dim=hidden_dim)
    if c1_channels != hidden_dim:
        return nn.Conv2d(c1_channels, hidden_dim, kernel_size=1)  # widths must match to add
    return nn.Identity()


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (requires_grad) of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def estimate_flops(head: nn.Module, output: DetectorOutput, keep: Tensor | None = None) -> int:
    """FLOPs (multiply and add counted separately) of one forward, by FlopCounterMode.

    Counts matrix products, convolutions and attention; leaves out deformable sampling,
    RoIAlign, norms and activations (a few FLOPs per element). Halve for "MACs"/fvcore units.
    """
    counter = FlopCounterMode(display=False)
    # Not under no_grad: FlopCounterMode's module hooks fail on parameters used there.
    with counter:
        head(output, keep)
    return counter.get_total_flops()
