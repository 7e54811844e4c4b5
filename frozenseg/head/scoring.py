"""From refined queries and box features to mask logits and mask quality scores.

Mask heads (Table 12): dot product q . R (eq. 4) or a Segmenter-style head. Scores: the
predicted mask IoU of Mask Scoring R-CNN (eq. 12-13) for trained heads, and the training-
free confidence of eq. 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from frozenseg.detector.transformer import MLP


class DotProductMask(nn.Module):
    """logits[n, s] = q[n] . R[n, s]; (N, D), (N, S*S, D) -> (N, S*S). No parameters."""

    def forward(self, queries: Tensor, rois: Tensor) -> Tensor:
        return torch.einsum("nd,nsd->ns", queries, rois)


class SegmenterMask(nn.Module):
    """Segmenter's mask head: separate linear projections of q and R, each LayerNormed,
    then a dot product scaled by 1/sqrt(D); (N, D), (N, S*S, D) -> (N, S*S)."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(dim, dim)
        self.roi_proj = nn.Linear(dim, dim)
        self.query_norm = nn.LayerNorm(dim)
        self.roi_norm = nn.LayerNorm(dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, queries: Tensor, rois: Tensor) -> Tensor:
        q = self.query_norm(self.query_proj(queries))
        r = self.roi_norm(self.roi_proj(rois))
        return torch.einsum("nd,nsd->ns", q, r) * self.scale


class MaskScoring(nn.Module):
    """Predicted mask IoU (eq. 12): Cat(sigmoid(M), R) -> 3x3 convs -> flatten -> MLP.

    Three 3x3 stride-2 convs (ReLU) take (N, D+1, S, S) to (N, D, ceil(S/8), ceil(S/8));
    a 3-layer MLP of width D turns the flattened map into one IoU logit per mask, (N,).
    The flattened size grows with S^2, as the paper's counts do (Table 9). The mask enters
    detached: the IoU loss trains the scorer, not the masks it judges (Mask Scoring R-CNN).
    """

    def __init__(self, *, dim: int, size: int, num_convs: int = 3) -> None:
        super().__init__()
        layers, side = [], size
        for i in range(num_convs):
            layers += [nn.Conv2d(dim + 1 if i == 0 else dim, dim, 3, stride=2, padding=1),
                       nn.ReLU()]
            side = (side + 1) // 2
        self.convs = nn.Sequential(*layers)
        self.mlp = MLP(in_dim=dim * side * side, hidden_dim=dim, out_dim=1, num_layers=3)

    def forward(self, mask_logits: Tensor, rois: Tensor) -> Tensor:
        """mask_logits (N, S, S); rois (N, D, S, S) -> IoU logits (N,)."""
        mask = mask_logits.detach().sigmoid()[:, None].to(rois.dtype)
        x = self.convs(torch.cat([mask, rois], 1))
        return self.mlp(x.flatten(1))[:, 0]


def mask_confidence(mask_logits: Tensor) -> Tensor:
    """Eq. 2 without c_i: mean probability over the pixels whose probability is > 0.5.

    mask_logits (N, ...) -> (N,), 0 for a mask with no such pixel. Computed in the frame
    the logits are in (the RoI grid for RoI masks, rather than after pasting: the paste
    only resamples, so the mean barely moves).
    """
    prob = mask_logits.flatten(1).sigmoid()
    on = prob > 0.5
    return (prob * on).sum(1) / on.sum(1).clamp(min=1)
