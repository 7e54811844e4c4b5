"""D-FINE's decoder: Fine-grained Distribution Refinement (FDR).

Each layer is self-attention -> add & norm2 -> deformable cross-attention (no value or
output projection: it samples the memory itself) merged with its input by a gate
(``gateway``: sigmoid gates over both, then a LayerNorm) -> FFN -> add & norm3. query_pos
is an MLP of the current box, clamped to [-10, 10].

Boxes: the first layer's ``pre_bbox_head`` refines the anchor once (inverse-sigmoid delta);
that box is every later box's origin. Each layer's box head predicts, for the four edges,
logits over ``bins + 1`` offsets, added to the previous layer's logits (the distributions
refine layer on layer) and read from the head on this layer's plus the previous layer's
output. The expected offset under a non-uniform weighting function ``W`` (of ``up`` and
``reg_scale``) moves each edge of the origin box: left = cx - (reg_scale / 2 + d) * w /
reg_scale, and so on. A quality head (LQE) adds to each layer's class logits a score of how
peaked those distributions are (the top-k probabilities of each edge and their mean).

Names follow transformers' ``DFineDecoder`` (``query_pos_head`` as ``ref_point_head``,
``pre_bbox_head``, ``lqe_layers.i.reg_conf``, ``gateway.gate``/``gateway.norm``); the
class and box heads are the model's ``class_embed`` / ``bbox_embed``.
Shapes: B batch, Q queries, C width, S memory positions; boxes normalised (cx, cy, w, h).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from frozenseg.detector.transformer import (
    ACTIVATIONS,
    MLP,
    GatedFFN,
    inverse_sigmoid,
    run_layer,
)
from frozenseg.ops import MSDeformAttn


def norm(style: str, dim: int) -> nn.Module:
    """D-FINE's LayerNorm, or DEIMv2's RMSNorm (eps 1e-6)."""
    return nn.LayerNorm(dim) if style == "d_fine" else nn.RMSNorm(dim, eps=1e-6)


class Gate(nn.Module):
    """norm(g1 * residual + g2 * update), (g1, g2) = sigmoid(gate([residual, update]))."""

    def __init__(self, *, dim: int, style: str = "d_fine") -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        self.norm = norm(style, dim)

    def forward(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        g1, g2 = self.gate(torch.cat([residual, update], -1)).sigmoid().chunk(2, -1)
        return self.norm(g1 * residual + g2 * update)


class GatedDecoderLayer(nn.Module):
    """style "d_fine": LayerNorms and a Linear-activation-Linear FFN (``linear1``,
    ``linear2``; ReLU, DEIM's SiLU); "deimv2": RMSNorms and a SwiGLU FFN (``mlp``). Without
    ``gateway`` (DEIMv2's option) the cross-attention is added to its input and normed
    (``norm1``). ``points``: per head on every level, or one count per level (D-FINE's
    released [3, 6, 3], padded in the attention: :class:`MSDeformAttn`)."""

    def __init__(self, *, dim: int, ffn_dim: int, levels: int, heads: int,
                 points: int | Sequence[int], activation: str = "relu", style: str = "d_fine",
                 gateway: bool = True) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = norm(style, dim)
        self.cross_attn = MSDeformAttn(d_model=dim, n_levels=levels, n_heads=heads,
                                       n_points=points, projections=False)
        if gateway:
            self.gateway = Gate(dim=dim, style=style)
        else:
            self.norm1 = norm(style, dim)
        if style == "d_fine":
            self.linear1 = nn.Linear(dim, ffn_dim)
            self.linear2 = nn.Linear(ffn_dim, dim)
        else:
            self.mlp = GatedFFN(dim=dim, hidden_dim=ffn_dim)
        self.norm3 = norm(style, dim)
        self.activation = ACTIVATIONS[activation]

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "mlp"):
            return self.mlp(x)
        return self.linear2(self.activation(self.linear1(x)))

    def forward(self, tgt, query_pos, reference, memory, shapes, memory_mask,
                self_attn_mask=None):
        """tgt, query_pos: (B, Q, C); reference: (B, Q, 1, 4); memory: (B, S, C)."""
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, k, tgt, attn_mask=self_attn_mask,
                                              need_weights=False)[0])
        attended = self.cross_attn(tgt + query_pos, reference, memory, shapes, None,
                                   memory_mask)
        tgt = (self.gateway(tgt, attended) if hasattr(self, "gateway")
               else self.norm1(tgt + attended))
        return self.norm3((tgt + self.ffn(tgt)).clamp(min=-65504, max=65504))


class QualityHead(nn.Module):
    """LQE: logits (B, Q, K) + MLP(top-k probabilities and their mean, per edge)."""

    def __init__(self, *, bins: int, top_k: int, hidden_dim: int, layers: int,
                 activation: str = "relu") -> None:
        super().__init__()
        self.bins, self.top_k = bins, top_k
        self.reg_conf = MLP(in_dim=4 * (top_k + 1), hidden_dim=hidden_dim, out_dim=1,
                            num_layers=layers, activation=activation)

    def forward(self, logits: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        b, q, _ = corners.shape
        probs = corners.view(b, q, 4, self.bins + 1).softmax(-1)
        top = probs.topk(self.top_k, dim=-1).values
        stat = torch.cat([top, top.mean(-1, keepdim=True)], -1).view(b, q, -1)
        return logits + self.reg_conf(stat)


def weighting_function(bins: int, up: float, reg_scale: float, like: torch.Tensor
                       ) -> torch.Tensor:
    """W(n), (bins + 1,): 0 in the middle, growing geometrically to +-up * reg_scale at
    bins / 2 - 1 steps from it, with +-2 up * reg_scale at both ends."""
    bound = abs(up) * abs(reg_scale)
    step = torch.tensor(bound + 1, dtype=torch.float32) ** (2 / (bins - 2))
    powers = step ** torch.arange(1, bins // 2, dtype=torch.float32)
    right = powers - 1
    values = torch.cat([torch.tensor([-2 * bound]), -right.flip(0), torch.zeros(1), right,
                        torch.tensor([2 * bound])])
    return values.to(like)


def distance_to_box(origin: torch.Tensor, distance: torch.Tensor, reg_scale: float
                    ) -> torch.Tensor:
    """Origin boxes (.., 4) cxcywh moved by edge offsets (.., 4) (left, top, right, bottom,
    in units of the box size / reg_scale, from reg_scale / 2) -> cxcywh."""
    reg_scale = abs(reg_scale)
    centre, size = origin[..., :2], origin[..., 2:] / reg_scale
    top_left = centre - (0.5 * reg_scale + distance[..., :2]) * size
    bottom_right = centre + (0.5 * reg_scale + distance[..., 2:]) * size
    return box_convert(torch.cat([top_left, bottom_right], -1), "xyxy", "cxcywh")


class FDRDecoder(nn.Module):
    """The layers, query_pos head (box -> C), first-layer box head (``activation``: its
    MLP's) and quality heads. ``query_pos_once``: every layer reads the query_pos of the
    first references (DEIMv2's official decoder) instead of its own references' (D-FINE's,
    transformers')."""

    def __init__(self, *, layers: list[GatedDecoderLayer], ref_point_head: MLP, dim: int,
                 bins: int, reg_scale: float, up: float, quality: list[QualityHead],
                 activation: str = "relu", query_pos_once: bool = False) -> None:
        super().__init__()
        self.query_pos_once = query_pos_once
        self.layers = nn.ModuleList(layers)
        self.ref_point_head = ref_point_head
        self.pre_bbox_head = MLP(in_dim=dim, hidden_dim=dim, out_dim=4, num_layers=3,
                                 activation=activation)
        self.lqe_layers = nn.ModuleList(quality)
        self.bins, self.reg_scale, self.up = bins, reg_scale, up

    def forward(self, tgt, reference, memory, memory_mask, shapes, *, bbox_embed,
                self_attn_mask=None):
        """tgt: (B, Q, C) content; reference: (B, Q, 4) anchor boxes; bbox_embed: per-layer
        distribution heads (C -> 4 (bins + 1)). Returns per layer the output (B, Q, C), the
        box (B, Q, 4) and the edge logits (B, Q, 4 (bins + 1))."""
        project = weighting_function(self.bins, self.up, self.reg_scale, memory)
        states, boxes, corners = [], [], []
        previous_state, previous_corners, origin = 0, 0, None
        for i, layer in enumerate(self.layers):
            if i == 0 or not self.query_pos_once:
                query_pos = self.ref_point_head(reference).clamp(min=-10, max=10)
            tgt = run_layer(self, layer, tgt, query_pos, reference[:, :, None], memory,
                            shapes, memory_mask, self_attn_mask)
            if origin is None:
                origin = (self.pre_bbox_head(tgt) + inverse_sigmoid(reference, 1e-5)
                          ).sigmoid().detach()
            logits = bbox_embed[i](tgt + previous_state) + previous_corners
            box = distance_to_box(origin, self.integral(logits, project), self.reg_scale)
            states.append(tgt)
            boxes.append(box)
            corners.append(logits)
            previous_state, previous_corners, reference = tgt.detach(), logits, box.detach()
        return states, boxes, corners

    def integral(self, corners: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
        """Edge logits (B, Q, 4 (bins + 1)) -> expected offsets (B, Q, 4) under W."""
        b, q, _ = corners.shape
        probs = corners.view(b, q, 4, self.bins + 1).softmax(-1)
        return F.linear(probs, project[None]).squeeze(-1)
