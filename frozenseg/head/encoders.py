"""The head's feature path: image feature encoder, neck + fusion into F, RoIAlign, box feature
encoder, query feature encoder (paper eq. 5-11 and 14).

Frames: E's level 0 is stride 8, C1 and F are stride 4 of the padded input batch. Every
per-image map below is cropped to that image's valid area first (C1: ceil(H/4) x ceil(W/4),
which ResNet, Swin and FocalNet all produce; E: read off the memory's padding mask), so
group norm, upsampling and RoIAlign never see another image's padding.
Boxes are absolute (x0, y0, x1, y1) in pixels of the input image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from frozenseg.detector.output import DetectorOutput
from frozenseg.detector.position import feature_position_embedding
from frozenseg.head.blocks import TokenLayout
from frozenseg.ops.levels import level_starts
from frozenseg.ops.tracing import smaller, tensor_values

C1_STRIDE = 4
# RoIAlign bilinear samples per bin side (Mask R-CNN's choice); aligned=True puts pixel
# centres at half-integers, so a box edge at x pixels reads stride-4 coordinate x / 4 - 0.5.
ROI_SAMPLING_RATIO = 2


def memory_layout(output: DetectorOutput, pos: Tensor | None = None) -> TokenLayout:
    """The detector memory's multi-scale layout, padding mask included."""
    return TokenLayout(shapes=output.shapes(), valid_ratios=output.valid_ratios,
                       padding_mask=output.memory_mask, pos=pos)


class ImageFeatureEncoder(nn.Module):
    """Blocks on the detector's encoder maps E (eq. 5); returns E's level 0 as a map.

    Deformable stacks attend across all levels with a sine embedding of each level's
    valid area (Deformable DETR's, offset -0.5) plus a learned level embedding as position;
    map stacks (Swin, ConvNeXt) refine level 0 only. Without a stack, E passes unchanged.
    forward: DetectorOutput -> (B, C, H0, W0), padded like the memory's level 0.
    """

    def __init__(self, *, stack: nn.Module | None, dim: int, levels: int,
                 positional: bool) -> None:
        super().__init__()
        self.stack = stack
        self.level_embed = nn.Parameter(torch.empty(levels, dim)) if positional else None
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def forward(self, output: DetectorOutput) -> Tensor:
        tokens = output.memory
        if self.stack is not None:
            layout = memory_layout(output, self.position(output))
            tokens = self.stack(tokens, layout)
        (h, w), start = output.shapes()[0], 0
        return tokens[:, start : start + h * w].transpose(1, 2).unflatten(2, (h, w))

    def position(self, output: DetectorOutput) -> Tensor | None:
        """(B, S, C) sine embedding of each level's valid area + its level embedding."""
        if self.level_embed is None:
            return None
        b, dim = output.memory.shape[0], self.level_embed.shape[1]
        pos = []
        shapes = output.shapes()
        for level, ((h, w), start) in enumerate(zip(shapes, level_starts(shapes), strict=True)):
            valid = ~output.memory_mask[:, start : start + h * w].view(b, h, w)
            sine = feature_position_embedding(valid, num_feats=dim // 2, temperature=10000.0,
                                              offset=-0.5)
            pos.append(sine.flatten(2).transpose(1, 2) + self.level_embed[level])
        return torch.cat(pos, 1)


class Neck(nn.Module):
    """Point-wise conv C1 -> C then GroupNorm (eq. 14); (1, C1, h, w) -> (1, C, h, w).

    Run it on one image's valid crop at a time: group-norm statistics must not count padding.
    """

    def __init__(self, *, in_dim: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.norm = nn.GroupNorm(math.gcd(32, dim), dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class FeatureFusion(nn.Module):
    """F_i = mapper(c1_path(C1_i) + up2(E0_i)) for each image's valid area (eq. 1, 5).

    c1_path: None leaves C1 out (F = up2(E0)); else the neck, a plain 1x1 projection
    (neck off, C1 width != C) or nn.Identity. mapper: the channel mapper, a Linear
    C -> D on each pixel, or None. up2 is a x2 bilinear upsample: stride-8 pixel centres
    land exactly on stride-4 ones, and the result is cropped (or edge-padded) to C1's size.
    ``memory_stride``: E's level-0 stride (8 for most; 32 for the plain DETRs' one level; 16,
    or 14 for a patch-14 ViT, for LW-DETR's projector levels); the upsample is by
    memory_stride / 4, whose pixel centres land on the stride-4 ones.
    forward: (e0 (B, C, H0, W0) from ImageFeatureEncoder, output) -> [F_i (D, h_i, w_i)].
    """

    def __init__(self, *, c1_path: nn.Module | None, mapper: nn.Module | None,
                 memory_stride: float = 8) -> None:
        super().__init__()
        self.c1_path = c1_path
        self.mapper = mapper
        self.scale = memory_stride / C1_STRIDE

    def forward(self, e0: Tensor, output: DetectorOutput) -> list[Tensor]:
        e0_sizes = memory_layout(output).valid_sizes(0)
        maps = []
        for i, (h4, w4) in enumerate(c1_valid_sizes(output)):
            h8, w8 = e0_sizes[i]
            fused = upsample_to(e0[i : i + 1, :, :h8, :w8], (h4, w4), self.scale)
            if self.c1_path is not None:
                fused = fused + self.c1_path(output.c1[i : i + 1, :, :h4, :w4]).to(fused.dtype)
            if self.mapper is not None:
                fused = self.mapper(fused.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            maps.append(fused[0])
        return maps


def c1_valid_sizes(output: DetectorOutput) -> list[tuple[int, int]]:
    """Unpadded (h, w) of each image in C1: ceil(size / 4), at most C1's padded size."""
    hmax, wmax = output.c1.shape[-2:]
    # ceil(n / 4) as (n + 3) // 4, not -(-n // 4): ONNX export turns // into truncation.
    up = C1_STRIDE - 1
    return [(smaller((h + up) // C1_STRIDE, hmax), smaller((w + up) // C1_STRIDE, wmax))
            for h, w in tensor_values(output.image_sizes)]


def upsample_to(x: Tensor, size: tuple[int, int], scale: float = 2.0) -> Tensor:
    """x ``scale`` bilinear upsample of (1, C, h, w), cropped or edge-padded to ``size``."""
    if scale == 1:
        up = x
    else:
        up = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    up = up[..., : size[0], : size[1]]
    pad_h, pad_w = size[0] - up.shape[-2], size[1] - up.shape[-1]
    return F.pad(up, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else up


def roi_features(maps: list[Tensor], boxes: Tensor, counts: list[int], size: int) -> Tensor:
    """RoIAlign of per-image stride-4 maps (D, h_i, w_i) in boxes (N, 4) xyxy pixels.

    Boxes are grouped by image, batch-major, ``counts[i]`` for image i. Returns (N, D, S, S).
    """
    out = []
    for image_map, image_boxes in zip(maps, boxes.split(counts), strict=True):
        if len(image_boxes):
            out.append(roi_align(image_map[None], [image_boxes.to(image_map.dtype)],
                                 output_size=size, spatial_scale=1.0 / C1_STRIDE,
                                 sampling_ratio=ROI_SAMPLING_RATIO, aligned=True))
    if not out:
        return boxes.new_zeros(0, maps[0].shape[0], size, size, dtype=maps[0].dtype)
    return torch.cat(out)


class GridEmbedding(nn.Module):
    """A learned position embedding of the S x S RoI grid; forward() -> (1, S*S, D).

    Learned, as the paper's parameter counts imply (S^2 x D grows 4x per doubling of S).
    """

    def __init__(self, *, size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size * size, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self) -> Tensor:
        return self.weight[None]


class BoxFeatureEncoder(nn.Module):
    """Blocks on each RoI's S x S map (eq. 9); (N, S*S, D) -> (N, S*S, D).

    A deformable stack sees each RoI as one unpadded level (MSDeformAttn with one level)
    and adds ``pos`` to its queries; Swin and ConvNeXt blocks work on the S x S map.
    """

    def __init__(self, *, stack: nn.Module, size: int) -> None:
        super().__init__()
        self.stack = stack
        self.size = size

    def forward(self, rois: Tensor, pos: Tensor | None) -> Tensor:
        layout = TokenLayout.single_map(rois.shape[0], self.size, self.size, like=rois, pos=pos)
        return self.stack(rois, layout)


class QueryFeatureEncoder(nn.Module):
    """Refines the detector's queries for masks (eq. 10-11, Table 5); (N, C) -> (N, D).

    proj: Linear C -> D (the identity when C == D). Then, each switchable and each followed
    by residual + LayerNorm: box-to-object cross-attention (a query attends to its own
    RoI's tokens, keys carrying the RoI grid position), object-to-object self-attention
    (only among queries of the same image), FFN (Linear -> GELU -> Linear).
    """

    def __init__(self, *, in_dim: int, dim: int, heads: int, ffn_dim: int,
                 cross_attention: bool, self_attention: bool, ffn: bool, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.cross_attn = self._attention(cross_attention, dim, heads, dropout)
        self.cross_norm = nn.LayerNorm(dim) if cross_attention else None
        self.self_attn = self._attention(self_attention, dim, heads, dropout)
        self.self_norm = nn.LayerNorm(dim) if self_attention else None
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim)) if ffn else None
        self.ffn_norm = nn.LayerNorm(dim) if ffn else None

    @staticmethod
    def _attention(on: bool, dim: int, heads: int, dropout: float) -> nn.Module | None:
        return nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if on else None

    def forward(self, queries: Tensor, rois: Tensor, batch_index: Tensor,
                pos: Tensor | None, multiplicity: Tensor | None = None) -> Tensor:
        """queries (N, C); rois (N, S*S, D); batch_index (N,); pos (1, S*S, D) or None;
        multiplicity (N,): how many identical queries each row stands for (default one
        each), which self-attention weighs it by, as if each were there that many times."""
        q = self.proj(queries)
        if self.cross_attn is not None and len(q):
            keys = rois if pos is None else rois + pos
            attended = self.cross_attn(q[:, None], keys, rois, need_weights=False)[0][:, 0]
            q = self.cross_norm(q + attended)
        if self.self_attn is not None and len(q):
            mask = batch_index[:, None] != batch_index[None, :]  # True: may not attend
            if multiplicity is not None:  # softmax(s + log m) = m copies of the key
                weight = multiplicity.to(q.dtype).log()[None, :].expand(len(q), -1)
                mask = weight.masked_fill(mask, float("-inf"))
            attended = self.self_attn(q[None], q[None], q[None], attn_mask=mask,
                                      need_weights=False)[0][0]
            q = self.self_norm(q + attended)
        if self.ffn is not None:
            q = self.ffn_norm(q + self.ffn(q))
        return q
